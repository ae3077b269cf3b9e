"""``tailnet`` command line: ``serve``, ``demo``, ``token create|list|revoke``.

``tailnet serve`` runs :class:`~tailnet.stack.TailnetStack` on uvloop until
SIGINT/SIGTERM (clean shutdown within :data:`SHUTDOWN_GRACE` seconds, even
with PostgreSQL unreachable — pending database writes are then dropped and
counted in a warning — exit 0). It prints, on stdout::

    tailnet-core is running
      API:         http://127.0.0.1:3000
      DERP relay:  http://127.0.0.1:3000/derp  (region 999)
      gRPC:        127.0.0.1:3001
      STUN:        udp port 3478
      data dir:    /home/me/.local/state/tailnet-core
      admin token: <token>
      (created on first start; keep it secret)
      dashboard:   http://127.0.0.1:3000/dashboard  (log in with the admin token)
      metrics:     http://127.0.0.1:3000/metrics
      try:         curl -H 'Coder-Session-Token: <admin token>' http://127.0.0.1:3000/api/v2/debug/health

The admin token is printed only when this start created it (``tokens.json``
keeps only hashes); otherwise the line reads ``admin token: created at first
start (tailnet token create --admin mints another)``. With ``--stun-addr off``
/ ``--grpc-addr off`` those lines read ``off``.

A startup failure prints one line on stderr naming what failed (the address
and port, the file, the PostgreSQL URL without its password) and exits 1.

The serve process tunes CPython's cyclic GC before serving
(:func:`tailnet.tuning.tune_gc`: ``gc.freeze()`` of the startup heap and
thresholds ``--gc-thresholds``, default 50000,50,1000) and glibc's malloc
(:func:`tailnet.tuning.tune_malloc`: large blocks always mapped on their own, so
freed ones go back to the system); ``--no-gc-tuning`` keeps the interpreter's
and the C library's defaults. The library never touches the GC or the
allocator of an embedding host.

``tailnet demo`` starts an in-memory stack on ephemeral ports (or uses
``--grpc-target`` + tokens of a running one) and runs :func:`tailnet.demo.run_demo`.

``tailnet token create --agent [UUID] | --user [UUID] | --admin`` mints a token
into the data dir's ``tokens.json`` (its hash; the token is printed once);
``tailnet token list`` prints every token's id, kind, principal, name and
creation time; ``tailnet token revoke ID`` removes one. A running server with
the same data dir accepts new tokens at once, and stops accepting a revoked
one on the next request, closing its open connections within a second.

Exit codes: 0 ok, 1 runtime/config error, 2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tailnet.config import ConfigError, StackConfig, add_arguments, default_data_dir, load_config
from tailnet.stack import TOKENS_FILE, StartupError, TailnetStack
from tailnet.tuning import DEFAULT_GC_THRESHOLDS, parse_thresholds, tune_gc, tune_malloc

__all__ = ["main", "build_parser"]

log = logging.getLogger("tailnet.cli")

#: seconds ``tailnet serve`` gives a graceful shutdown (SIGINT/SIGTERM), all included
SHUTDOWN_GRACE = 5.0
_T = TypeVar("_T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailnet",
        description="tailnet-core: Coder-compatible tailnet coordinator with an embedded DERP relay.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the coordinator, HTTP API, embedded DERP relay and STUN in one process",
        description="Run the whole stack in one uvloop process. Options come from flags, "
        "then TAILNET_* environment variables, then the TOML file of --config, then defaults. "
        "Stop with SIGINT/SIGTERM.",
    )
    add_arguments(serve)
    serve.add_argument(
        "--gc-thresholds", metavar="G0,G1,G2",
        default=",".join(str(x) for x in DEFAULT_GC_THRESHOLDS),
        help="cyclic GC thresholds of the server process (default %(default)s; see "
        "tailnet.tuning)",
    )
    serve.add_argument(
        "--no-gc-tuning", dest="gc_tuning", action="store_false",
        help="keep CPython's default GC settings (no gc.freeze(), default thresholds) "
        "and glibc's default malloc settings",
    )
    demo = sub.add_parser(
        "demo",
        help="show an agent and a client talking through DERP, sealed end to end",
        description="Without --grpc-target/--access-url: start an in-memory stack on "
        "ephemeral ports, mint a user and an agent, coordinate them (over gRPC and over "
        "Coder's WebSocket/yamux/DRPC transport, see --transport) and exchange NaCl-sealed "
        "packets through the DERP relay, printing round-trip times. With --grpc-target or "
        "--access-url, use a running stack (pass --agent-id, --agent-token and --client-token).",
    )
    demo.add_argument("--packets", type=int, default=5, help="packets to exchange (default 5)")
    demo.add_argument("--timeout", type=float, default=10.0, help="per-step timeout in seconds")
    demo.add_argument("--transport", choices=("grpc", "drpc", "both"), default="both",
                      help="coordinator transport of the embedded demo (default both)")
    demo.add_argument("--grpc-target", help="host:port of a running stack's gRPC coordinator")
    demo.add_argument("--access-url",
                      help="http(s) URL of a running stack (Coder's transport)")
    demo.add_argument("--agent-id", help="agent UUID (with --grpc-target)")
    demo.add_argument("--agent-token", help="agent token (with --grpc-target)")
    demo.add_argument("--client-token", help="user token with access to the agent")
    token = sub.add_parser("token", help="manage tokens in the data dir")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = tsub.add_parser(
        "create",
        help="mint a token (agent or user) into <data-dir>/tokens.json",
        description="Mint a token. A running 'tailnet serve' with the same data dir accepts it "
        "at once. Prints the token (and IDs) on stdout.",
    )
    kind = create.add_mutually_exclusive_group(required=True)
    kind.add_argument("--agent", nargs="?", const="", metavar="UUID",
                      help="mint an agent token (new agent ID unless given)")
    kind.add_argument("--user", nargs="?", const="", metavar="UUID",
                      help="mint a user token (new user ID unless given)")
    kind.add_argument("--admin", action="store_true",
                      help="mint another admin (control plane) token")
    create.add_argument("--owner", metavar="UUID",
                        help="owner (user ID) of the agent's workspace (default: the admin)")
    create.add_argument("--name", default="", help="display name")
    create.add_argument("--data-dir", help="data directory (default: as 'serve')")
    lst = tsub.add_parser(
        "list",
        help="list the tokens in <data-dir>/tokens.json",
        description="One line per token: ID, KIND, PRINCIPAL (agent/user ID), NAME, CREATED. "
        "Tokens themselves are not stored, so they cannot be shown.",
    )
    lst.add_argument("--data-dir", help="data directory (default: as 'serve')")
    revoke = tsub.add_parser(
        "revoke",
        help="revoke a token by its ID",
        description="Remove the token from <data-dir>/tokens.json. A running server stops "
        "accepting it on the next request and closes its connections within a second.",
    )
    revoke.add_argument("id", metavar="ID", help="token ID (first column of 'token list', "
                        "or the part of the token before the first '-')")
    revoke.add_argument("--data-dir", help="data directory (default: as 'serve')")
    return parser


def _run(coro_fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_fn())


def _print_banner(stack: TailnetStack, config: StackConfig, new_admin: str | None) -> None:
    lines = [
        "tailnet-core is running",
        f"  API:         {stack.access_url}",
        f"  DERP relay:  {stack.derp_url}  (region {config.derp_region_id})",
        f"  gRPC:        {stack.grpc_target or 'off'}",
        f"  STUN:        {'udp port %d' % stack.stun_port if stack.stun_port is not None else 'off'}",
        f"  data dir:    {config.data_dir if config.data_dir is not None else '(in memory)'}",
    ]
    if new_admin is not None:
        lines.append(f"  admin token: {new_admin}")
        lines.append("  (shown once: only its hash is stored; keep it secret)")
    elif config.data_dir is not None:
        lines.append(
            "  admin token: created at first start (tailnet token create --admin mints another)"
        )
    lines.append(f"  dashboard:   {stack.access_url}/dashboard  (log in with the admin token)")
    lines.append(f"  metrics:     {stack.access_url}/metrics")
    lines.append(
        f"  try:         curl -H 'Coder-Session-Token: <admin token>' {stack.access_url}/api/v2/debug/health"
    )
    print("\n".join(lines), flush=True)


async def _serve(config: StackConfig) -> int:
    stack = TailnetStack(config)
    try:
        await stack.start()
    except StartupError as exc:
        print(f"tailnet: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    _print_banner(stack, config, stack.new_admin_token)
    try:
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await stack.stop(SHUTDOWN_GRACE)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    print("tailnet-core stopped", flush=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # asyncpg logs its pool's reconnect attempts during a database outage with a
    # full traceback: keep those to one line each (the exception's repr).
    for handler in logging.getLogger().handlers:
        handler.addFilter(_one_line)
    if args.gc_tuning:
        tune_gc(parse_thresholds(args.gc_thresholds))
        tune_malloc()
    return _run(lambda: _serve(config))


def _one_line(record: logging.LogRecord) -> bool:
    """Handler filter: an ``asyncpg`` record's exception folded into its message."""
    if record.name.startswith("asyncpg") and record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
    return True


def _cmd_demo(args: argparse.Namespace) -> int:
    from tailnet.demo import run_demo, run_embedded_demo

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.grpc_target or args.access_url:
        missing = [n for n in ("agent_id", "agent_token", "client_token") if not getattr(args, n)]
        if missing:
            raise ConfigError("with --grpc-target/--access-url also pass " + ", ".join(
                "--" + m.replace("_", "-") for m in missing))
        agent_id = uuid.UUID(args.agent_id)
        _run(lambda: run_demo(
            grpc_target=args.grpc_target, access_url=args.access_url, agent_id=agent_id,
            agent_token=args.agent_token, client_token=args.client_token,
            packets=args.packets, timeout=args.timeout,
        ))
    else:
        transports = ("grpc", "drpc") if args.transport == "both" else (args.transport,)
        _run(lambda: run_embedded_demo(
            packets=args.packets, timeout=args.timeout, transports=transports))
    print("demo OK: coordinated, exchanged sealed packets through DERP, tampering detected")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else None
    if data_dir is None:
        data_dir = load_config(None).data_dir or default_data_dir()
    stack = TailnetStack(StackConfig(data_dir=data_dir))
    if args.token_command == "list":
        if not (data_dir / TOKENS_FILE).exists():
            raise ConfigError(f"no tokens in {data_dir} (no {TOKENS_FILE})")
        stack.prepare_data_dir(create_admin=False)
        rows = [("ID", "KIND", "PRINCIPAL", "NAME", "CREATED")]
        for t in stack.list_tokens():
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.created_at))
            rows.append((t.id, t.kind, str(t.principal_id), t.name, created))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return 0
    if args.token_command == "revoke":
        stack.prepare_data_dir(create_admin=False)
        if not stack.revoke_token(args.id):
            raise ConfigError(f"no token with ID {args.id!r} in {data_dir / TOKENS_FILE}")
        print(f"revoked {args.id}")
        return 0
    stack.prepare_data_dir(create_admin=False)
    if args.admin:
        tok = stack.create_admin(name=args.name or "admin")
        print(f"id={tok.split('-', 1)[0]}")
        print(f"token={tok}")
    elif args.agent is not None:
        agent_id = uuid.UUID(args.agent) if args.agent else None
        owner = uuid.UUID(args.owner) if args.owner else None
        creds = stack.create_agent(owner, agent_id=agent_id, name=args.name or "main")
        print(f"id={creds.token_id}")
        print(f"agent_id={creds.agent_id}")
        print(f"workspace_id={creds.workspace_id}")
        print(f"owner_id={creds.owner_id}")
        print(f"token={creds.token}")
    else:
        user_id = uuid.UUID(args.user) if args.user else None
        uid, tok = stack.create_user(user_id, name=args.name or "user")
        print(f"id={tok.split('-', 1)[0]}")
        print(f"user_id={uid}")
        print(f"token={tok}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tailnet`` / ``python -m tailnet``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "demo":
            return _cmd_demo(args)
        return _cmd_token(args)
    except (ConfigError, ValueError) as exc:
        print(f"tailnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # demo failures etc.: one line, no traceback
        print(f"tailnet: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
