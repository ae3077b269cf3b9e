"""The ``derper --workers N`` supervisor: starts, watches and restarts the workers.

Processes::

    derper (supervisor) ── stdin: spec JSON ──► derper worker 0 … N-1 (python -m derp … --worker-stdin)
           ▲                                          │ each: DerpServer + STUN on the same ports
           └──────────── stdout: ready JSON ──────────┘ (SO_REUSEPORT), WorkerNode links (Unix sockets)

Flow:

1. The CLI validates every flag and loads the server key once (so all workers
   share it, also a ``--dev`` random key), then hands over to :class:`Supervisor`.
2. Worker 0 starts first with the requested ports (port 0: it picks them) and
   reports the ports it bound; workers 1…N-1 then start one by one on those
   ports. A worker reports ready once it listens and its links to every
   lower-index sibling are up, so when the last one is ready every pair is linked.
3. The supervisor prints the usual startup lines, then waits. A worker that
   exits while the supervisor is not stopping is restarted (same index, same
   ports) after :data:`RESTART_DELAY` (backing off while it keeps crashing); its clients reconnect to whichever
   worker the kernel picks, the siblings dropped its keys (PeerGone) when its
   links broke.
4. SIGTERM / SIGINT are forwarded to every worker (each sends Restarting to its
   own clients on SIGTERM, as a single process does), then the supervisor
   waits for them (SIGKILL after ``grace`` seconds) and exits 0.

The spec is one JSON line on the worker's stdin: it carries the server private
key (never on the command line or in the environment, never logged).

Limits as totals: ``--max-connections`` and the accept limits hold for the
host, not per worker. The CLI creates a small shared file in the socket
directory before the first worker starts (:mod:`derp.workers.shared`, only when
a limit is set); every worker maps it and decides each accepted socket under
a file lock against the sum of every worker's open sockets and one shared
token bucket; the check and the reservation of the place are one step under
that lock, so the totals are exact: two workers accepting at the same instant
cannot overshoot. What remains errs on the refusing side only: a socket that
closed is published at the end of its worker's event-loop iteration (a sibling
may refuse in that instant although a place was just freed), and a dead
worker's sockets count until the supervisor sees it exit and zeroes its slot
(at once, before restarting it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .shared import SharedLimits

__all__ = [
    "MAX_RESTART_DELAY",
    "RESTART_DELAY",
    "STABLE_AFTER",
    "Supervisor",
    "WorkerReady",
    "default_workers",
    "die_with_parent",
]

log = logging.getLogger("derper.supervisor")

#: Seconds between a worker's exit and its restart; doubled (up to
#: :data:`MAX_RESTART_DELAY`) while a worker keeps dying within
#: :data:`STABLE_AFTER` seconds of its start, so a crash loop does not spin.
RESTART_DELAY: Final = 0.2
MAX_RESTART_DELAY: Final = 10.0
STABLE_AFTER: Final = 10.0
#: Seconds a worker may take to report ready.
READY_TIMEOUT: Final = 30.0


def default_workers() -> int:
    """CPUs available to this process (``sched_getaffinity``), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def die_with_parent(parent_pid: int) -> None:
    """Make the kernel send this worker SIGTERM when the supervisor dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed supervisor leaves no worker behind; exit
    at once if it is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent_pid:
        raise SystemExit(0)


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """What a worker reported once ready."""

    index: int
    pid: int
    port: int
    stun_port: int | None
    http_port: int | None
    test_port: int | None


class Supervisor:
    """Runs ``count`` workers (see the module docstring).

    ``command`` is the worker command line (``[python, -m, derp, …,
    --worker-stdin]``); ``spec`` the JSON-able spec shared by all workers (key,
    socket directory, ports); ``announce`` is called once with the ready reports
    of all workers (the CLI prints its startup lines there). ``limits`` is the
    host-wide limits file the workers share, if any (a worker's slot is zeroed
    when it exits).
    """

    def __init__(
        self,
        count: int,
        command: Sequence[str],
        spec: dict[str, Any],
        announce: Callable[[list[WorkerReady]], None],
        *,
        grace: float = 15.0,
        limits: SharedLimits | None = None,
    ) -> None:
        self.count = count
        self.command = list(command)
        self.spec = dict(spec)
        self.announce = announce
        self.grace = grace
        self.limits = limits
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: dict[int, WorkerReady] = {}
        self.restarts = 0
        self._stopping = False
        self._signal: signal.Signals | None = None
        self._stop = asyncio.Event()

    async def _spawn(self, index: int) -> WorkerReady:
        spec = dict(self.spec, index=index, count=self.count, parent=os.getpid())
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.procs[index] = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
        async with asyncio.timeout(READY_TIMEOUT):
            line = await proc.stdout.readline()
        if not line:
            code = await proc.wait()
            raise RuntimeError(f"worker {index} exited with status {code} before it was ready")
        doc = json.loads(line)
        rd = WorkerReady(
            index,
            proc.pid,
            int(doc["port"]),
            doc.get("stun_port"),
            doc.get("http_port"),
            doc.get("test_port"),
        )
        self.ready[index] = rd
        return rd

    async def run(self) -> int:
        """Start every worker, supervise until a signal, stop them; the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            first = await self._spawn(0)
            # Everyone else binds the ports worker 0 picked (SO_REUSEPORT).
            self.spec["port"] = first.port
            self.spec["stun_port"] = first.stun_port if first.stun_port is not None else -1
            self.spec["http_port"] = first.http_port if first.http_port is not None else -1
            for i in range(1, self.count):
                if self._stopping:
                    break
                await self._spawn(i)
        except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
            print(f"derper: cannot start workers: {exc}", file=sys.stderr, flush=True)
            await self._terminate(signal.SIGTERM)
            return 1
        if not self._stopping:
            self.announce([self.ready[i] for i in sorted(self.ready)])
        watchers = [
            loop.create_task(self._watch(i), name=f"derper-watch w{i}") for i in range(self.count)
        ]
        await self._stop.wait()
        await self._terminate(self._signal or signal.SIGTERM)
        for t in watchers:
            t.cancel()
        for t in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        return 0

    async def _watch(self, index: int) -> None:
        """Restart worker ``index`` whenever it exits while we are not stopping."""
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY
        started = loop.time()
        while not self._stopping:
            proc = self.procs.get(index)
            if proc is None:
                return
            code = await proc.wait()
            if self.limits is not None:
                self.limits.reset(index)  # its sockets are gone with it
            if self._stopping:
                return
            if loop.time() - started >= STABLE_AFTER:
                delay = RESTART_DELAY
            log.warning("worker %d (pid %d) exited with status %s; restarting it in %.1f s",
                        index, proc.pid, code, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_RESTART_DELAY, delay * 2)
            started = loop.time()
            if self._stopping:
                return
            try:
                rd = await self._spawn(index)
            except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
                log.error("worker %d failed to restart: %s", index, exc)
                continue
            self.restarts += 1
            log.info("worker %d restarted (pid %d)", index, rd.pid)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._signal is None:
            self._signal = sig
        self._stopping = True
        self._stop.set()

    async def _terminate(self, sig: signal.Signals) -> None:
        """Forward ``sig`` to every worker and wait (SIGKILL after ``grace``)."""
        self._stopping = True
        procs = [p for p in self.procs.values() if p.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
        if not procs:
            return
        try:
            async with asyncio.timeout(self.grace):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
