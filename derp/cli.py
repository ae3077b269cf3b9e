"""``derper``: run a DERP relay server from the command line.

Flags follow Tailscale's ``cmd/derper`` where they apply, in either syntax:
Go's (``-dev``, ``-a :443``, ``-a=:443``, ``-hostname=derp.example.com``,
``-stun=false``) or GNU's (``--dev``, ``--hostname derp.example.com``,
``--no-stun``); :func:`go_style_args` rewrites the Go forms before parsing::

    derper [-a ADDR] [-c KEYFILE] [-dev] [-hostname NAME] [-mesh-psk-file FILE]
           [-http-port N] [-stats-interval SECONDS] [-v] [-log-level LEVEL] [-version]

Every flag derper has is accepted. Those that need what this relay does not have
(ACME certificates, a local tailscaled, a secrets service) stop it with a one-line
error naming the flag; those that only tune derper internals it does not share
(``-tcp-keepalive-time``, ``-tcp-user-timeout``, ``-bootstrap-dns-names``, ``-home``,
``-socket``, ``-ace``) are accepted and reported as ignored.

* ``-a/--addr`` listen address, ``host:port``, ``:port`` (all interfaces) or
  ``[v6]:port``; default ``:443``, or ``127.0.0.1:3340`` with ``--dev``. Port 0
  picks a free port; the startup line shows the real one.
* ``-c/--config`` derper's JSON key file ``{"PrivateKey": "privkey:<hex>"}``,
  created on first start and reused afterwards so the server key is stable.
  Default ``/var/lib/derper/derper.key`` as root, else
  ``$XDG_CONFIG_HOME/derper/derper.key`` (``~/.config/derper/derper.key``).
  ``--dev`` without ``-c`` uses a fresh random key.
* ``--hostname`` the name clients use for this server; with ``--certmode manual``
  the certificate is ``<certdir>/<hostname>.crt``/``.key``; default ``localhost``. Set it to the public DNS name in production.
* ``--http-port`` (TLS only; default 80, ``-1`` off): a plain-HTTP listener beside
  TLS (:mod:`derp.port80`): ``/generate_204``, ``/debug/``, everything else
  redirected to https. The default port is best effort (a warning if it cannot be
  bound); an explicit one must bind.
* ``-derp=false``: STUN only, no DERP listener (as derper).
* ``--version``: print the version and exit.
* ``--workers N`` (default: the CPUs available to the process): N > 1 runs a
  supervisor and N worker processes that all listen on the same TCP/UDP ports
  (SO_REUSEPORT) and relay to each other over Unix sockets
  (:mod:`derp.workers`); ``--workers 1`` is one process, exactly as before.
  ``--max-connections`` and the accept limits are exact host totals (the
  workers share one small counter file, :mod:`derp.workers.shared`).
  ``-derp=false`` (STUN only) always runs one process.
* TLS (``--certmode manual``), accept/receive limits, the write timeout,
  ``/debug/`` access and the SIGTERM Restarting notice: see
  :mod:`derp.prodflags`. Without ``--certmode`` the server speaks plain HTTP
  and warns unless ``--dev``.

Output: one startup line on stdout, ``derper: listening on http://HOST:PORT/derp
server key nodekey:<hex>``; logs on stderr (per-connection lines at DEBUG, stats
every ``--stats-interval`` seconds at INFO). SIGINT/SIGTERM close the listener
and every client, then exit 0; on SIGTERM every client first gets a Restarting
frame (``--restart-reconnect-in``/``--restart-try-for``; try-for 0 disables). A bad key file or an address in use prints one
``derper: ...`` line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import prodflags
from .admission import Admission, VerifyClientURL
from .keys import PrivateKey, load_or_create_server_key
from .mesh import MeshPeer, parse_mesh_with
from .port80 import Port80Server
from .server import DerpServer, ServerConfig
from .stunserver import DEFAULT_STUN_PORT, StunServer
from .workers.node import LINK_HOLD, WorkerNode, WorkerSpec
from .workers.supervisor import (
    Supervisor,
    WorkerReady,
    default_workers,
    die_with_parent,
)
from .workers.shared import SharedLimits

__all__ = [
    "DEFAULT_ADDR",
    "DEV_ADDR",
    "build_parser",
    "default_key_path",
    "go_style_args",
    "main",
    "parse_addr",
    "version",
]

log = logging.getLogger("derper")

DEFAULT_ADDR = ":443"
DEV_ADDR = "127.0.0.1:3340"
DEFAULT_HOSTNAME = "localhost"


#: derper flags this relay cannot honour: flag → why (a set value stops startup)
_UNSUPPORTED: dict[str, str] = {
    "verify_clients": "needs a local tailscaled; use -verify-client-url",
    "secrets_url": "secrets services are not supported; use -mesh-psk-file",
    "secrets_path_prefix": "secrets services are not supported; use -mesh-psk-file",
    "secrets_cache_dir": "secrets services are not supported; use -mesh-psk-file",
    "acme_eab_kid": "ACME is not supported; use -certmode manual",
    "acme_eab_key": "ACME is not supported; use -certmode manual",
    "acme_email": "ACME is not supported; use -certmode manual",
    "acme_ip_certs": "ACME is not supported; use -certmode manual",
}
#: derper flags accepted but without effect here
_IGNORED: tuple[str, ...] = (
    "tcp_keepalive_time",
    "tcp_user_timeout",
    "bootstrap_dns_names",
    "unpublished_bootstrap_dns_names",
    "home",
    "socket",
    "ace",
)
#: single-letter flags (Go's ``-a=:443`` means ``-a :443``)
_SHORT = frozenset("acv")


def go_style_args(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Rewrite Go ``flag`` syntax into what ``parser`` (argparse) understands.

    ``-name`` → ``--name``; ``-name=value`` → ``--name=value``; ``-a=:443`` →
    ``-a :443``; a boolean given a value (``-dev=true``, ``--stun=false``) becomes
    the flag or its ``--no-`` form (or nothing, for a false ``store_true``).
    Negative numbers (``-stun-port -1``) and everything after ``--`` pass through.
    """
    booleans: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.nargs == 0:
            for opt in action.option_strings:
                booleans[opt] = action
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            out.append(arg)
            out.extend(it)
            break
        if not arg.startswith("-") or arg == "-" or _is_number(arg):
            out.append(arg)
            continue
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, sep, value = body.partition("=")
        if len(name) == 1 and name in _SHORT:
            flag = "-" + name
        else:
            flag = "--" + name
        if flag in booleans and sep:
            truth = value.strip().lower()
            if truth in ("1", "t", "true", "yes", "on"):
                out.append(flag)
            elif truth in ("0", "f", "false", "no", "off"):
                no = "--no-" + name
                if no in booleans:
                    out.append(no)
            else:
                out.append(arg)  # argparse reports the bad value
            continue
        if sep:
            out.extend([flag, value] if len(flag) == 2 else [f"{flag}={value}"])
        else:
            out.append(flag)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def version() -> str:
    """``derper (tailnet-core) <version>``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        v = dist_version("tailnet-core")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        v = "unknown"
    return f"derper (tailnet-core) {v}"


class _CliError(Exception):
    """A user-facing startup failure: print ``derper: <message>`` and exit 1."""


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``host:port`` / ``:port`` / ``[v6]:port`` into ``(host, port)``.

    An empty host means every interface. Raises ``ValueError`` on bad input.
    """
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise ValueError(f"address {addr!r} needs a port, like :443 or 127.0.0.1:3340")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 address {addr!r} must be written as [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in address {addr!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535 in address {addr!r} (0 = any free port)")
    return host, port


def _stun_port(text: str) -> int:
    """``--stun-port``: 1..65535, 0 (any free port) or -1 (STUN off)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not -1 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"port {port} out of range: use 1-65535 (0 = any free port, -1 disables STUN)"
        )
    return port


def default_key_path() -> Path:
    """Where the server key lives when ``-c`` is not given (derper's default as root)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/derper/derper.key")
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "derper" / "derper.key"


def build_parser() -> argparse.ArgumentParser:
    """The ``derper`` argument parser."""
    p = argparse.ArgumentParser(
        prog="derper", description="DERP relay server (Tailscale DERP protocol v2)."
    )
    p.add_argument(
        "-a",
        "--addr",
        default=None,
        help=f"listen address (default {DEFAULT_ADDR}; {DEV_ADDR} with --dev; port 0 = any free)",
    )
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"JSON key file, created if missing (default: {default_key_path()})",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="with TLS: plain-HTTP port for /generate_204, /debug/ and redirects to https "
        "(default 80, best effort; -1 off)",
    )
    p.add_argument(
        "--derp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the DERP server (-derp=false: STUN only; default on)",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument(
        "--dev",
        action="store_true",
        help=f"development mode: plain HTTP on {DEV_ADDR}, random key unless -c is given",
    )
    p.add_argument(
        "--hostname",
        default=DEFAULT_HOSTNAME,
        help="public name of this server; names the TLS certificate files (default %(default)s)",
    )
    p.add_argument(
        "--mesh-psk-file",
        default=None,
        help="file holding the 64-hex-digit mesh pre-shared key (enables mesh privileges)",
    )
    p.add_argument(
        "--mesh-with",
        default="",
        help="comma-separated mesh peers of this region: host, host:port, host/dialhost "
        "or a URL; may include this node (needs --mesh-psk-file)",
    )
    p.add_argument(
        "--stun-port",
        type=_stun_port,
        default=None,
        help=f"UDP port of the STUN responder, 1-65535 (default {DEFAULT_STUN_PORT}; "
        "0 = any free port; -1 disables)",
    )
    p.add_argument(
        "--stun",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the STUN responder (--no-stun disables; default on)",
    )
    p.add_argument(
        "--verify-client-url",
        default="",
        help="admission controller: POST {NodePublic, Source} and admit on {\"Allow\": true}",
    )
    p.add_argument(
        "--verify-client-url-fail-open",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="admit clients when the admission URL is unreachable (default on, like derper)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=60.0,
        help="seconds between stats log lines at INFO; 0 disables (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes sharing the ports (default: the CPUs available, "
        f"{default_workers()} here; 1 = one process, no supervisor)",
    )
    p.add_argument(
        "--worker-link-hold",
        type=float,
        default=LINK_HOLD * 1000,
        metavar="MS",
        help="with --workers: longest time a busy link between workers holds packets "
        "to send many in one write (0: write every loop iteration; default %(default)g ms; "
        "an idle link never holds)",
    )
    p.add_argument("--worker-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-test-ports", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g = p.add_argument_group("derper flags without an equivalent here")
    for name, why in _UNSUPPORTED.items():
        flag = "--" + name.replace("_", "-")
        if name in ("verify_clients", "acme_ip_certs"):
            g.add_argument(flag, action="store_true", help=f"not supported: {why}")
        else:
            g.add_argument(flag, default=None, help=f"not supported: {why}")
    for name in _IGNORED:
        flag = "--" + name.replace("_", "-")
        if name == "ace":
            g.add_argument(flag, action="store_true", help="accepted, ignored")
        else:
            g.add_argument(flag, default=None, help="accepted, ignored")
    p.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        type=str.upper,
        help="log level (default INFO; DEBUG with -v)",
    )
    prodflags.add_arguments(p)  # TLS, limits, metrics access, restart (derp.prodflags)
    return p


def _load_key(args: argparse.Namespace) -> PrivateKey:
    if args.config is None and args.dev:
        return PrivateKey.generate()
    path = Path(args.config) if args.config is not None else default_key_path()
    try:
        return load_or_create_server_key(path)
    except ValueError as exc:
        raise _CliError(str(exc)) from None
    except OSError as exc:
        raise _CliError(f"{path}: cannot read or create key file: {exc.strerror or exc}") from None


def _load_mesh_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise _CliError(f"{path}: cannot read mesh key: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise _CliError(f"{path}: mesh key must be 64 hex digits")
    return key


def _mesh_and_admission(
    args: argparse.Namespace, mesh_key: bytes | None
) -> tuple[tuple[MeshPeer, ...], Admission | None]:
    """``--mesh-with`` peers and the ``--verify-client-url`` hook (derp.mesh, derp.admission).

    Bare mesh entries use https when this server serves TLS (like derper), else http.
    """
    tls = bool(getattr(args, "certmode", None))
    try:
        peers = tuple(parse_mesh_with(args.mesh_with, "https" if tls else "http"))
    except ValueError as exc:
        raise _CliError(f"--mesh-with: {exc}") from None
    if peers and mesh_key is None:
        raise _CliError("--mesh-with needs --mesh-psk-file")
    admission: Admission | None = None
    if args.verify_client_url:
        try:
            admission = VerifyClientURL(
                args.verify_client_url, fail_open=args.verify_client_url_fail_open
            )
        except ValueError as exc:
            raise _CliError(f"--verify-client-url: {exc}") from None
    return peers, admission


def _format_stats(stats: Any) -> str:
    snap = stats.snapshot() if hasattr(stats, "snapshot") else stats
    if isinstance(snap, dict):
        items = []
        for k, v in snap.items():
            if isinstance(v, dict):
                v = {kk: vv for kk, vv in v.items() if vv}
                if not v:
                    continue
            items.append(f"{k}={v}")
        return " ".join(items)
    return str(snap)


async def _log_stats(server: DerpServer, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        log.info("stats: %s", _format_stats(server.stats))


async def _serve(
    *,
    key: PrivateKey,
    host: str,
    port: int,
    hostname: str,
    mesh_key: bytes | None,
    stats_interval: float,
    mesh_with: tuple[MeshPeer, ...] = (),
    admission: Admission | None = None,
    stun_port: int | None = -1,
    prod: prodflags.ServerOptions | None = None,
    http_port: int | None = None,
    derp: bool = True,
    worker: dict[str, Any] | None = None,
) -> int:
    """Run one relay process: the whole relay, or (``worker``) one worker of
    ``derper --workers N`` (spec from the supervisor, see derp.workers.supervisor)."""
    prod = prod or prodflags.ServerOptions()
    config = dict(prod.config)
    host_limits: SharedLimits | None = None
    if worker is not None and worker.get("limits"):
        # Host totals shared with the sibling workers; our slot starts at 0.
        # (Left open until the process exits: the supervisor zeroes the slot then.)
        host_limits = SharedLimits.open(str(worker["limits"]), int(worker["index"]))
    server = DerpServer(
        ServerConfig(
            private_key=key,
            mesh_key=mesh_key,
            hostname=hostname,
            mesh_with=mesh_with,
            admission=admission,
            reuse_port=worker is not None,
            host_limits=host_limits,
            **config,
        )
    )
    reuse = worker is not None
    shown = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
    try:
        await server.start(host=host, port=port, listen=derp)
    except OSError as exc:
        raise _CliError(f"cannot listen on {shown} (TCP, -a): {exc.strerror or exc}") from None
    port80: Port80Server | None = None
    if derp and prod.scheme == "https" and (http_port is None or http_port >= 0):
        port80 = Port80Server(hostname=hostname, tls_port=server.port, debug=server.debug_response)
        p80 = 80 if http_port is None else http_port
        try:
            await port80.start(host, p80, reuse_port=reuse)
        except OSError as exc:
            port80 = None
            if http_port is None:
                log.warning("plain-HTTP listener disabled: cannot listen on TCP port 80 "
                            "(-http-port): %s", exc.strerror or exc)
            else:
                await server.stop()
                raise _CliError(
                    f"cannot listen on TCP port {p80} (-http-port): {exc.strerror or exc}"
                ) from None
    stun: StunServer | None = None
    if stun_port is None or stun_port >= 0:
        stun = StunServer(stats=server.metrics.stun)
        try:
            await stun.start(
                host, DEFAULT_STUN_PORT if stun_port is None else stun_port, reuse_port=reuse
            )
        except OSError as exc:
            if stun_port is None:  # the default port is best effort (tests, second relay)
                log.warning("STUN disabled: cannot listen on UDP %d: %s", DEFAULT_STUN_PORT, exc)
                stun = None
            else:
                if port80 is not None:
                    await port80.stop()
                await server.stop()
                raise _CliError(
                    f"cannot listen on UDP port {stun_port} (STUN, -stun-port): "
                    f"{exc.strerror or exc}"
                ) from None

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        got.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)

    node: WorkerNode | None = None
    if worker is not None:
        node = WorkerNode(
            server,
            WorkerSpec(
                int(worker["index"]),
                int(worker["count"]),
                str(worker["sock_dir"]),
                hold=float(worker.get("link_hold", LINK_HOLD)),
            ),
        )
        await node.start()
        await asyncio.wait_for(node.wait_linked(), 30.0)
        test_port = await server.listen_extra(host or "127.0.0.1") if worker.get("test_port") else None
        ready = {
            "port": server.port,
            "stun_port": stun.port if stun is not None else None,
            "http_port": port80.port if port80 is not None else None,
            "test_port": test_port,
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
    shown_host = host or "0.0.0.0"
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    for note in prod.notes if worker is None else ():
        print(f"derper: {note}", flush=True)
    if worker is not None:
        pass
    elif derp:
        print(
            f"derper: listening on {prod.scheme}://{shown_host}:{server.port}/derp "
            f"server key {server.public_key}",
            flush=True,
        )
    else:
        print(f"derper: STUN only (-derp=false) on UDP port {stun.port if stun else '?'}",
              flush=True)
    if port80 is not None and worker is None:
        print(f"derper: plain HTTP on port {port80.port} (/generate_204, /debug/, redirects)",
              flush=True)
    stats_task = (
        loop.create_task(_log_stats(server, stats_interval), name="derper-stats")
        if stats_interval > 0
        else None
    )
    try:
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        if stats_task is not None:
            stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats_task
        if stun is not None:
            await stun.stop()
        if port80 is not None:
            await port80.stop()
        # SIGTERM (a managed restart) tells clients when to come back (Restarting frame).
        restarting = prod.restart_on_sigterm and signal.SIGTERM in got
        await server.stop(restarting=restarting)
        if node is not None:
            await node.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


def _check_derper_only_flags(args: argparse.Namespace) -> None:
    for name, why in _UNSUPPORTED.items():
        if getattr(args, name, None):
            raise _CliError(f"-{name.replace('_', '-')}: {why}")
    for name in _IGNORED:
        if getattr(args, name, None):
            log.warning("-%s is accepted for derper compatibility but has no effect here",
                        name.replace("_", "-"))


def _supervise(
    args: argparse.Namespace,
    workers: int,
    key: PrivateKey,
    host: str,
    port: int,
    prod: prodflags.ServerOptions,
) -> int:
    """``--workers N`` (N > 1): run the supervisor (derp.workers.supervisor)."""
    import tempfile

    argv = [a for a in (sys.argv[1:] if args._argv is None else args._argv)]
    command = [sys.executable, "-m", "derp", *argv, "--worker-stdin"]
    if args.worker_test_ports:
        command.append("--worker-test-ports")
    shown_host = host or "0.0.0.0"
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"

    def announce(ready: list[WorkerReady]) -> None:
        for note in prod.notes:
            print(f"derper: {note}", flush=True)
        print(
            f"derper: listening on {prod.scheme}://{shown_host}:{ready[0].port}/derp "
            f"server key {key.public}",
            flush=True,
        )
        if ready[0].http_port is not None:
            print(f"derper: plain HTTP on port {ready[0].http_port} "
                  "(/generate_204, /debug/, redirects)", flush=True)
        pids = " ".join(str(r.pid) for r in ready)
        print(f"derper: {len(ready)} workers (pids {pids})", flush=True)
        if args.worker_test_ports:
            for r in ready:
                print(f"derper: worker {r.index} test port {r.test_port}", flush=True)

    with tempfile.TemporaryDirectory(prefix="derper-workers-") as sock_dir:
        cfg = prod.config
        limits: SharedLimits | None = None
        if cfg.get("max_connections", 0) or math.isfinite(cfg.get("accept_limit", math.inf)):
            # --max-connections / accept limits as host totals (derp.workers.shared)
            limits = SharedLimits.create(
                os.path.join(sock_dir, "limits"),
                workers,
                max_connections=int(cfg.get("max_connections", 0)),
                accept_limit=float(cfg.get("accept_limit", math.inf)),
                accept_burst=int(cfg.get("accept_burst", 2**31 - 1)),
            )
        spec: dict[str, Any] = {
            "key": key.raw.hex(),
            "sock_dir": sock_dir,
            "limits": os.path.join(sock_dir, "limits") if limits is not None else None,
            "port": port,
            "stun_port": args.stun_port if args.stun else -1,
            "http_port": args.http_port,
            "test_port": bool(args.worker_test_ports),
        }
        sup = Supervisor(workers, command, spec, announce, limits=limits)
        try:
            return asyncio.run(sup.run())
        except KeyboardInterrupt:  # pragma: no cover - SIGINT before the handlers
            return 0
        finally:
            if limits is not None:
                limits.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``derper`` / ``python -m derp``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(go_style_args(sys.argv[1:] if argv is None else list(argv), parser))
    args._argv = None if argv is None else list(argv)
    if args.version:
        print(version())
        return 0
    level = args.log_level or ("DEBUG" if args.verbose else "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    addr = args.addr if args.addr is not None else (DEV_ADDR if args.dev else DEFAULT_ADDR)
    try:
        _check_derper_only_flags(args)
        try:
            host, port = parse_addr(addr)
        except ValueError as exc:
            raise _CliError(f"-a/--addr: {exc}") from None
        if args.http_port is not None and not -1 <= args.http_port <= 65535:
            raise _CliError(f"-http-port {args.http_port}: must be a port number or -1 (off)")
        if not args.derp and not args.stun:
            raise _CliError("-derp=false and -stun=false: nothing to serve")
        workers = default_workers() if args.workers is None else args.workers
        if workers < 1:
            raise _CliError(f"--workers {workers}: must be >= 1")
        if not 0 <= args.worker_link_hold <= 100:
            raise _CliError(f"--worker-link-hold {args.worker_link_hold:g}: must be 0..100 ms")
        worker: dict[str, Any] | None = None
        if args.worker_stdin:  # one worker of a supervisor (derp.workers.supervisor)
            worker = json.loads(sys.stdin.readline())
            worker["link_hold"] = args.worker_link_hold / 1000
            die_with_parent(int(worker["parent"]))
            key = PrivateKey(bytes.fromhex(worker.pop("key")))
            port = int(worker["port"])
            if worker.get("stun_port") is not None:
                args.stun_port = int(worker["stun_port"])
            if worker.get("http_port") is not None:
                args.http_port = int(worker["http_port"])
            logging.getLogger().handlers[0].setFormatter(
                logging.Formatter(
                    f"w{worker['index']} %(asctime)s %(levelname)s %(name)s: %(message)s"
                )
            )
        else:
            key = _load_key(args)
        mesh_key = _load_mesh_key(args.mesh_psk_file)
        mesh_with, admission = _mesh_and_admission(args, mesh_key)
        try:
            prod = prodflags.server_options(args, key.public, args.hostname)
        except ValueError as exc:
            raise _CliError(str(exc)) from None
        if not args.dev and prod.scheme == "http":
            log.warning(
                "serving plain HTTP on %s: use --certmode manual for TLS "
                "(or put a TLS terminator in front, or --dev for local testing)",
                addr,
            )
        if worker is None and workers > 1 and args.derp:
            return _supervise(args, workers, key, host, port, prod)
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(
                _serve(
                    key=key,
                    host=host,
                    port=port,
                    hostname=args.hostname,
                    mesh_key=mesh_key,
                    stats_interval=args.stats_interval,
                    mesh_with=mesh_with,
                    admission=admission,
                    stun_port=args.stun_port if args.stun else -1,  # None: 3478, best effort
                    prod=prod,
                    http_port=args.http_port,
                    derp=args.derp,
                    worker=worker,
                )
            )
    except _CliError as exc:
        print(f"derper: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT before the handlers were installed
        return 0
