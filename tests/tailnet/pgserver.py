"""A throw-away PostgreSQL server for tests (and ``bench/ha_bench.py``).

``PgServer.start()`` runs ``initdb`` into a temporary directory and starts
``postgres`` listening on 127.0.0.1 with an ephemeral port and a Unix socket in
that directory. PostgreSQL refuses to run as root, so when ``euid == 0`` both
programs run as the ``postgres`` system user (the directory is chowned to it).
The server is our direct child and gets ``PR_SET_PDEATHSIG`` (Linux), so it
cannot outlive a killed test run. :meth:`stop` / :meth:`start` again restart it
on the same port and data directory (used by the "PostgreSQL restart" tests).
Tests run with ``fsync``, ``synchronous_commit`` and ``full_page_writes`` off
(speed); ``PgServer(bindir, durable=True)`` keeps PostgreSQL's durability
defaults (benchmarks).

Fixtures: :func:`pg_server` (session-wide, shared by every module that imports
it, started lazily once per process) and :func:`pg_dsn` (a fresh database per
test, so tests never see each other's rows or notifications). Tests SKIP with a
clear message only when the PostgreSQL binaries are missing.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

__all__ = [
    "PgServer",
    "find_pg_bin",
    "shared_server",
    "create_database",
    "drop_database",
    "pg_server",
    "pg_dsn",
]

_PG_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def find_pg_bin() -> Path | None:
    """Directory holding ``initdb`` and ``postgres``, or ``None``."""
    for d in _PG_DIRS:
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    found = shutil.which("initdb")
    if found:
        real = Path(found).resolve().parent
        if (real / "postgres").exists():
            return real
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demote(uid: int | None, gid: int | None) -> Callable[[], None]:
    def run() -> None:
        with contextlib.suppress(Exception):  # Linux only: die with the test process
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        os.setsid()
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    return run


class PgServer:
    """One PostgreSQL cluster in a temporary directory (see module docstring)."""

    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        self.bindir = bindir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="tailnet-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._uid: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
        self.sockdir.mkdir()
        if self._uid is not None and self._gid is not None:
            for p in (self.root, self.sockdir):
                os.chown(p, self._uid, self._gid)
        self._initdb()

    @property
    def user(self) -> str:
        return "postgres"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str]) -> None:
        subprocess.run(
            args,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_demote(self._uid, self._gid),
            timeout=120,
        )

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.datadir),
                "-k",
                str(self.sockdir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                *(() if self.durable else (
                    "-c", "fsync=off", "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                )),
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=32MB",
            ],
            stdout=log,
            stderr=log,
            preexec_fn=_demote(self._uid, self._gid),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.proc.returncode}: "
                    + (self.root / "postgres.log").read_text()[-2000:]
                )
            try:
                self._run([str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1",
                           "-p", str(self.port), "-U", self.user])
                return
            except subprocess.CalledProcessError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("postgres did not become ready")
            time.sleep(0.05)  # polling a readiness condition, bounded by the deadline

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT); SIGKILL if it takes longer than ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


_shared: PgServer | None = None


def shared_server() -> PgServer:
    """The process-wide server, started on first use and removed at exit.

    Skips the calling test if the PostgreSQL binaries are not installed.
    """
    global _shared
    if _shared is None:
        bindir = find_pg_bin()
        if bindir is None:
            pytest.skip(
                "PostgreSQL binaries (initdb/postgres) not found; install postgresql "
                "(e.g. apt-get install -y postgresql-15) to run the HA coordinator tests"
            )
        srv = PgServer(bindir)
        srv.start()
        atexit.register(srv.destroy)
        _shared = srv
    else:
        _shared.start()  # a previous test may have left it stopped
    return _shared


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    yield shared_server()


async def create_database(server: PgServer) -> str:
    """Create a fresh, empty database on ``server``; return its DSN."""
    import asyncpg  # type: ignore[import-untyped]

    name = "t_" + uuid.uuid4().hex[:16]
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.dsn(name)


async def drop_database(server: PgServer, dsn: str) -> None:
    import asyncpg

    server.start()
    name = dsn.rsplit("/", 1)[-1]
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def pg_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """DSN of a fresh, empty database on the shared server (dropped afterwards)."""
    dsn = await create_database(pg_server)
    yield dsn
    await drop_database(pg_server, dsn)
