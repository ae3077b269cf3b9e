"""LISTEN on a dedicated PostgreSQL connection, reconnecting with backoff.

Flow::

    start() ── connect ── LISTEN ch1..chN ──► on_notify(channel, payload) per message
                 ▲                                   (called on the event loop, in order)
                 │ backoff 50 ms … backoff_max
    connection terminated / probe failed ──► reconnect ──► on_reconnect()

Invariant: ``on_reconnect`` is called after every *re*-connection, once LISTEN is
active again, so the owner can resynchronise from the tables: everything
committed before that point is read by the resync, everything after is notified.
Notifications sent while no connection was listening are lost by PostgreSQL;
the resync is what makes that harmless.

A cheap ``SELECT 1`` probe every ``probe_interval`` seconds detects half-open
connections that never report termination.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]

__all__ = ["Listener"]

_log = logging.getLogger(__name__)


class Listener:
    """One LISTEN connection for ``channels`` (see module docstring)."""

    def __init__(
        self,
        dsn: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_reconnect: Callable[[], None],
        *,
        backoff_max: float = 2.0,
        probe_interval: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._channels = tuple(channels)
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._backoff_max = backoff_max
        self._probe_interval = probe_interval
        self._connect_timeout = connect_timeout
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def backend_pid(self) -> int | None:
        """PID of the listening backend (tests terminate it to simulate a drop)."""
        conn = self._conn
        return None if conn is None else int(conn.get_server_pid())

    async def start(self) -> None:
        """Connect and LISTEN once (raising on failure), then keep it alive in the background."""
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pg-listener")

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_conn()

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        try:
            self._on_notify(channel, payload)
        except Exception:
            _log.exception("notification handler failed for channel %s", channel)

    def _terminated(self, conn: Any) -> None:
        # Only the current connection counts: a late callback from one already
        # replaced must not make the fresh connection look lost.
        if conn is self._conn:
            self._lost.set()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
        try:
            conn.add_termination_listener(self._terminated)
            for ch in self._channels:
                await conn.add_listener(ch, self._dispatch)
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        self._conn = conn

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()

    async def _run(self) -> None:
        while not self._stopped:
            try:
                await asyncio.wait_for(self._lost.wait(), self._probe_interval)
            except TimeoutError:
                try:
                    await self._conn.fetchval("SELECT 1", timeout=self._probe_interval)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _log.warning("LISTEN connection probe failed: %r", exc)
            _log.warning("LISTEN connection lost; reconnecting")
            old, self._conn = self._conn, None
            if old is not None:
                old.terminate()
            delay = 0.05
            while not self._stopped:
                try:
                    await self._connect()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _log.info("LISTEN reconnect failed (%r); retrying in %.2fs", exc, delay)
                    await asyncio.sleep(delay)  # backoff between reconnect attempts
                    delay = min(delay * 2, self._backoff_max)
            if self._stopped:
                return
            self.reconnects += 1
            _log.info("LISTEN connection re-established")
            try:
                self._on_reconnect()
            except Exception:
                _log.exception("reconnect handler failed")
