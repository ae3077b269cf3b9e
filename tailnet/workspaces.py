"""Workspace updates: snapshots, the diff protocol and the workspace-provider interface.

Protocol (spec §5, Coder ``coderd/workspaceupdates.go``): a ``WorkspaceUpdates``
stream sends, first, ``diff_snapshots(EMPTY, current)`` — every readable
workspace and agent as upserts, which the client treats as a *snapshot* — then,
whenever the owner's workspaces change, the diff against the previous snapshot,
skipping empty diffs.

Diff rules (:func:`diff_snapshots`):

* new workspace → upsert it and all its agents;
* existing workspace whose name or status changed → upsert it;
* agents of a workspace are compared as sets of ``(id, name)``: additions are
  upserted, removals deleted (a renamed agent is delete + add);
* vanished workspace → delete it and all its agents;
* deleted entries carry the last known name/status; entries are ordered by id.

Because clients process upserted workspaces, then deleted agents, deleted
workspaces, upserted agents, and treat a reference to an unknown workspace as
fatal, every update produced here only references workspaces the client has
been sent (or is sent in the same message).

A :class:`WorkspaceProvider` (implemented by the control plane) yields *full*
snapshots of what a principal may read for one owner; the service diffs them.
:class:`InMemoryWorkspaceProvider` is the embedded default and also answers
tunnel authorization (``can_access``/``authorize_tunnel``).

Read rule of the in-memory provider: a ``control_plane`` principal reads
everything; a ``user`` reads workspaces it owns or that were shared with it
(:meth:`InMemoryWorkspaceProvider.share_workspace`); an ``agent`` reads nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tailnet.identity import Principal
from tailnet.signal import VersionSignal
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "AgentState",
    "WorkspaceState",
    "WorkspaceSnapshot",
    "EMPTY_SNAPSHOT",
    "diff_snapshots",
    "update_is_empty",
    "WorkspaceProvider",
    "InMemoryWorkspaceProvider",
]


@dataclass(frozen=True, slots=True)
class AgentState:
    """One workspace agent as streamed to clients."""

    id: uuid.UUID
    name: str


@dataclass(frozen=True, slots=True)
class WorkspaceState:
    """One workspace with its agents."""

    id: uuid.UUID
    name: str
    status: pb.Workspace.Status
    agents: frozenset[AgentState] = frozenset()


@dataclass(frozen=True, slots=True)
class WorkspaceSnapshot:
    """Everything a subscriber may see for one owner, keyed by workspace id."""

    workspaces: Mapping[uuid.UUID, WorkspaceState] = field(default_factory=dict)


EMPTY_SNAPSHOT = WorkspaceSnapshot()


def _ws_pb(ws: WorkspaceState) -> pb.Workspace:
    return pb.Workspace(id=ws.id.bytes, name=ws.name, status=ws.status)


def _agent_pb(ws_id: uuid.UUID, agent: AgentState) -> pb.Agent:
    return pb.Agent(id=agent.id.bytes, name=agent.name, workspace_id=ws_id.bytes)


def _agents_sorted(agents: frozenset[AgentState]) -> list[AgentState]:
    return sorted(agents, key=lambda a: (a.id.bytes, a.name))


def diff_snapshots(old: WorkspaceSnapshot, new: WorkspaceSnapshot) -> pb.WorkspaceUpdate:
    """The update that turns a client holding ``old`` into one holding ``new``."""
    upd = pb.WorkspaceUpdate()
    for ws_id in sorted(new.workspaces, key=lambda u: u.bytes):
        ws = new.workspaces[ws_id]
        prev = old.workspaces.get(ws_id)
        if prev is None:
            upd.upserted_workspaces.append(_ws_pb(ws))
            upd.upserted_agents.extend(_agent_pb(ws_id, a) for a in _agents_sorted(ws.agents))
            continue
        if prev.name != ws.name or prev.status != ws.status:
            upd.upserted_workspaces.append(_ws_pb(ws))
        upd.upserted_agents.extend(
            _agent_pb(ws_id, a) for a in _agents_sorted(ws.agents - prev.agents)
        )
        upd.deleted_agents.extend(
            _agent_pb(ws_id, a) for a in _agents_sorted(prev.agents - ws.agents)
        )
    for ws_id in sorted(old.workspaces, key=lambda u: u.bytes):
        if ws_id in new.workspaces:
            continue
        prev = old.workspaces[ws_id]
        upd.deleted_workspaces.append(_ws_pb(prev))
        upd.deleted_agents.extend(_agent_pb(ws_id, a) for a in _agents_sorted(prev.agents))
    return upd


def update_is_empty(upd: pb.WorkspaceUpdate) -> bool:
    """True if ``upd`` changes nothing."""
    return not (
        upd.upserted_workspaces
        or upd.upserted_agents
        or upd.deleted_workspaces
        or upd.deleted_agents
    )


class WorkspaceProvider(Protocol):
    """Source of workspace snapshots, implemented by the control plane.

    ``subscribe`` returns an async iterator that yields the current full
    snapshot of ``owner_id``'s workspaces *as readable by* ``principal`` at once,
    then a new full snapshot after each (possibly coalesced) change. It ends
    when closed by the consumer (``aclose``).
    """

    def subscribe(
        self, owner_id: uuid.UUID, principal: Principal
    ) -> AsyncIterator[WorkspaceSnapshot]: ...


@dataclass(slots=True)
class _Workspace:
    owner_id: uuid.UUID
    name: str
    status: pb.Workspace.Status
    shared_with: set[uuid.UUID] = field(default_factory=set)


class InMemoryWorkspaceProvider:
    """Workspaces and agents kept in memory (embedded default).

    Mutators must run on the event loop that serves subscribers (not
    thread-safe). Each mutation bumps a version and wakes subscribers, which
    then take a fresh snapshot; bursts of mutations coalesce.
    """

    def __init__(self) -> None:
        self._workspaces: dict[uuid.UUID, _Workspace] = {}
        self._agents: dict[uuid.UUID, tuple[uuid.UUID, str]] = {}  # agent -> (ws, name)
        self._signal = VersionSignal()

    # -- mutation ---------------------------------------------------------
    def _changed(self) -> None:
        self._signal.bump()

    def upsert_workspace(
        self,
        owner_id: uuid.UUID,
        workspace_id: uuid.UUID,
        name: str,
        status: pb.Workspace.Status = pb.Workspace.RUNNING,
    ) -> None:
        """Create or update a workspace (its owner may change too)."""
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            self._workspaces[workspace_id] = _Workspace(owner_id, name, status)
        else:
            ws.owner_id, ws.name, ws.status = owner_id, name, status
        self._changed()

    def delete_workspace(self, workspace_id: uuid.UUID) -> None:
        """Remove a workspace and its agents (no error if unknown)."""
        if self._workspaces.pop(workspace_id, None) is None:
            return
        for agent_id in [a for a, (w, _) in self._agents.items() if w == workspace_id]:
            del self._agents[agent_id]
        self._changed()

    def share_workspace(self, workspace_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """Let ``user_id`` read (and open tunnels to) another owner's workspace."""
        self._workspaces[workspace_id].shared_with.add(user_id)
        self._changed()

    def upsert_agent(self, workspace_id: uuid.UUID, agent_id: uuid.UUID, name: str) -> None:
        """Create or update an agent; ``workspace_id`` must exist (``KeyError``)."""
        if workspace_id not in self._workspaces:
            raise KeyError(f"unknown workspace {workspace_id}")
        self._agents[agent_id] = (workspace_id, name)
        self._changed()

    def delete_agent(self, agent_id: uuid.UUID) -> None:
        """Remove an agent (no error if unknown)."""
        if self._agents.pop(agent_id, None) is not None:
            self._changed()

    # -- queries ----------------------------------------------------------
    def agent_owner(self, agent_id: uuid.UUID) -> uuid.UUID | None:
        """The owner of the workspace that holds ``agent_id``."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return None
        return self._workspaces[entry[0]].owner_id

    def _can_read(self, principal: Principal, ws: _Workspace) -> bool:
        if principal.kind == "control_plane":
            return True
        if principal.kind == "user":
            return ws.owner_id == principal.id or principal.id in ws.shared_with
        return False

    def can_access(self, principal: Principal, agent_id: uuid.UUID) -> bool:
        """May ``principal`` open a tunnel to ``agent_id``? (unknown agent → False)"""
        entry = self._agents.get(agent_id)
        if entry is None:
            return False
        return self._can_read(principal, self._workspaces[entry[0]])

    async def authorize_tunnel(self, principal: Principal, agent_id: uuid.UUID) -> bool:
        """:meth:`can_access` in the service's ``tunnel_authorizer`` shape."""
        return self.can_access(principal, agent_id)

    def snapshot(self, owner_id: uuid.UUID, principal: Principal) -> WorkspaceSnapshot:
        """``owner_id``'s workspaces that ``principal`` may read."""
        agents: dict[uuid.UUID, set[AgentState]] = {}
        for agent_id, (ws_id, name) in self._agents.items():
            agents.setdefault(ws_id, set()).add(AgentState(agent_id, name))
        out: dict[uuid.UUID, WorkspaceState] = {}
        for ws_id, ws in self._workspaces.items():
            if ws.owner_id != owner_id or not self._can_read(principal, ws):
                continue
            out[ws_id] = WorkspaceState(
                ws_id, ws.name, ws.status, frozenset(agents.get(ws_id, ()))
            )
        return WorkspaceSnapshot(out)

    async def subscribe(
        self, owner_id: uuid.UUID, principal: Principal
    ) -> AsyncIterator[WorkspaceSnapshot]:
        seen = self._signal.version
        yield self.snapshot(owner_id, principal)
        while True:
            seen = await self._signal.wait_changed(seen)
            yield self.snapshot(owner_id, principal)
