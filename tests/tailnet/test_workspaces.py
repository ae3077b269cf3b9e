"""Workspace snapshot diffs (spec §5 rules) and the in-memory provider."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from tailnet.identity import Principal
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.workspaces import (
    EMPTY_SNAPSHOT,
    AgentState,
    InMemoryWorkspaceProvider,
    WorkspaceSnapshot,
    WorkspaceState,
    diff_snapshots,
    update_is_empty,
)

W1, W2 = uuid.UUID(int=1), uuid.UUID(int=2)
A1, A2, A3 = uuid.UUID(int=11), uuid.UUID(int=12), uuid.UUID(int=13)
RUNNING, STOPPED = pb.Workspace.RUNNING, pb.Workspace.STOPPED


def snap(*ws: WorkspaceState) -> WorkspaceSnapshot:
    return WorkspaceSnapshot({w.id: w for w in ws})


def ws(wid: uuid.UUID, name: str = "w", status: pb.Workspace.Status = RUNNING,
       *agents: tuple[uuid.UUID, str]) -> WorkspaceState:
    return WorkspaceState(wid, name, status, frozenset(AgentState(a, n) for a, n in agents))


def ids(items: object) -> list[tuple[bytes, str]]:
    return [(x.id, x.name) for x in items]  # type: ignore[attr-defined]


def test_first_update_is_full_snapshot() -> None:
    upd = diff_snapshots(EMPTY_SNAPSHOT, snap(ws(W1, "one", RUNNING, (A1, "a"), (A2, "b"))))
    assert ids(upd.upserted_workspaces) == [(W1.bytes, "one")]
    assert ids(upd.upserted_agents) == [(A1.bytes, "a"), (A2.bytes, "b")]
    assert all(a.workspace_id == W1.bytes for a in upd.upserted_agents)
    assert not upd.deleted_workspaces and not upd.deleted_agents


def test_status_change_upserts_workspace_only() -> None:
    old = snap(ws(W1, "one", RUNNING, (A1, "a")))
    upd = diff_snapshots(old, snap(ws(W1, "one", STOPPED, (A1, "a"))))
    assert [(w.id, w.status) for w in upd.upserted_workspaces] == [(W1.bytes, STOPPED)]
    assert not upd.upserted_agents and not upd.deleted_agents


def test_renamed_agent_is_delete_plus_add() -> None:
    old = snap(ws(W1, "one", RUNNING, (A1, "a")))
    upd = diff_snapshots(old, snap(ws(W1, "one", RUNNING, (A1, "renamed"))))
    assert not upd.upserted_workspaces
    assert ids(upd.upserted_agents) == [(A1.bytes, "renamed")]
    assert ids(upd.deleted_agents) == [(A1.bytes, "a")]


def test_vanished_workspace_deletes_agents_with_last_known_values() -> None:
    old = snap(ws(W1, "one", STOPPED, (A1, "a")), ws(W2, "two"))
    upd = diff_snapshots(old, snap(ws(W2, "two")))
    assert [(w.id, w.name, w.status) for w in upd.deleted_workspaces] == [(W1.bytes, "one", STOPPED)]
    assert ids(upd.deleted_agents) == [(A1.bytes, "a")]
    assert update_is_empty(diff_snapshots(old, old))


def apply(state: dict[bytes, tuple[str, int, dict[bytes, str]]], upd: pb.WorkspaceUpdate) -> None:
    """Apply an update the way Coder's client does; unknown references are fatal."""
    for w in upd.upserted_workspaces:
        agents = state[w.id][2] if w.id in state else {}
        state[w.id] = (w.name, w.status, agents)
    for a in upd.deleted_agents:
        assert a.id in state[a.workspace_id][2], "delete of unknown agent"
        del state[a.workspace_id][2][a.id]
    for w in upd.deleted_workspaces:
        assert w.id in state, "delete of unknown workspace"
        assert not state[w.id][2], "workspace deleted before its agents"
        del state[w.id]
    for a in upd.upserted_agents:
        assert a.workspace_id in state, "agent references unknown workspace"
        state[a.workspace_id][2][a.id] = a.name


def as_state(s: WorkspaceSnapshot) -> dict[bytes, tuple[str, int, dict[bytes, str]]]:
    return {
        w.id.bytes: (w.name, w.status, {a.id.bytes: a.name for a in w.agents})
        for w in s.workspaces.values()
    }


_wids = [uuid.UUID(int=i) for i in range(1, 4)]
_aids = [uuid.UUID(int=100 + i) for i in range(6)]


@st.composite
def snapshots(draw: st.DrawFn) -> WorkspaceSnapshot:
    out = []
    free = list(_aids)
    for wid in draw(st.sets(st.sampled_from(_wids))):
        agents = []
        picked = draw(st.lists(st.sampled_from(free), unique=True, max_size=3)) if free else []
        for aid in picked:
            free.remove(aid)
            agents.append((aid, draw(st.sampled_from(["a", "b"]))))
        out.append(ws(wid, draw(st.sampled_from(["x", "y"])),
                      draw(st.sampled_from([RUNNING, STOPPED])), *agents))
    return snap(*out)


@settings(max_examples=60)
@given(st.lists(snapshots(), min_size=1, max_size=5))
def test_client_applying_diffs_tracks_server_state(seq: list[WorkspaceSnapshot]) -> None:
    client: dict[bytes, tuple[str, int, dict[bytes, str]]] = {}
    prev = EMPTY_SNAPSHOT
    for s in seq:
        apply(client, diff_snapshots(prev, s))
        assert client == as_state(s)
        prev = s


async def test_in_memory_provider_filters_and_notifies() -> None:
    owner, other = uuid.uuid4(), uuid.uuid4()
    p = InMemoryWorkspaceProvider()
    p.upsert_workspace(owner, W1, "one")
    p.upsert_agent(W1, A1, "main")
    me = Principal("user", owner)
    them = Principal("user", other)
    assert p.agent_owner(A1) == owner and p.agent_owner(A3) is None
    assert p.can_access(me, A1) and not p.can_access(them, A1)
    assert p.can_access(Principal("control_plane", uuid.uuid4()), A1)
    assert not p.can_access(Principal("agent", A1), A1)
    assert await p.authorize_tunnel(me, A1)

    mine = p.subscribe(owner, me)
    theirs = p.subscribe(owner, them)
    assert set((await asyncio.wait_for(anext(mine), 10)).workspaces) == {W1}
    assert not (await asyncio.wait_for(anext(theirs), 10)).workspaces
    nxt = asyncio.ensure_future(anext(mine))
    await asyncio.sleep(0)
    assert not nxt.done()
    p.upsert_agent(W1, A2, "second")
    s = await asyncio.wait_for(nxt, 10)
    assert {a.id for a in s.workspaces[W1].agents} == {A1, A2}
    p.share_workspace(W1, other)
    assert set((await asyncio.wait_for(anext(theirs), 10)).workspaces) == {W1}
    p.delete_workspace(W1)
    assert p.agent_owner(A1) is None
    assert not (await asyncio.wait_for(anext(mine), 10)).workspaces
    await mine.aclose()  # type: ignore[attr-defined]
    await theirs.aclose()  # type: ignore[attr-defined]
