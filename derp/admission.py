"""Client admission control for the DERP server (spec §3.10).

Where it runs (``derp.server.conn``)::

    ClientInfo opened ──► mesh peer? ── yes ──► admitted (mesh peers skip admission)
                              │ no
                              ▼
        AdmissionGate.start(key, ip) — a task; the connection stops reading meanwhile
                              │
              allowed ────────┴──────── denied / hook error
                 │                              │
      ServerInfo, registration            connection closed (nothing was relayed),
                                          ``stats.admission_rejected`` += 1

The await never blocks the event loop or other connections: each check is its
own task, and its result comes back through a callback on the loop thread.

Hooks implement :class:`Admission` (``async def admit(key, source_ip) -> bool``):

* :class:`VerifyClientURL` — derper's ``--verify-client-url``: POST
  ``{"NodePublic":"nodekey:<hex>","Source":"<ip>"}`` (5 s timeout). Only status
  200 with a body of at most 4 KiB holding ``{"Allow": true}`` admits. A network
  failure (connect error, timeout, broken HTTP) admits only with ``fail_open``
  (default true, like derper); a non-200 status or a bad body always rejects.
  HTTP/1.1 is spoken with h11 over an asyncio connection (TLS for https).
* :class:`KnownKeysAdmission` — admits keys a callable says are known; the
  embedded stack wires it to the coordinator's current peer set.
* :class:`AllOf` — every hook must admit (derper: ``--verify-clients`` and
  ``--verify-client-url`` both apply when both are set).

A hook that raises rejects the client (fail closed) and logs the error.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import h11

from .keys import PublicKey

__all__ = [
    "Admission",
    "AdmissionGate",
    "AllOf",
    "KnownKeysAdmission",
    "VerifyClientURL",
    "MAX_RESPONSE_BODY",
    "admission_request_body",
    "decide_response",
]

log = logging.getLogger("derp.admission")

#: Largest admission response body accepted (derper reads at most 4 KiB).
MAX_RESPONSE_BODY: Final = 4 << 10


class Admission(Protocol):
    """An admission check: may ``key``, connecting from ``source_ip``, use the relay?"""

    async def admit(self, key: PublicKey, source_ip: str) -> bool: ...


# --------------------------------------------------------------------------- pure parts


def admission_request_body(key: PublicKey, source_ip: str) -> bytes:
    """The JSON POSTed to the admission URL (``tailcfg.DERPAdmitClientRequest``)."""
    doc = {"NodePublic": f"nodekey:{key.raw.hex()}", "Source": source_ip}
    return json.dumps(doc, separators=(",", ":")).encode()


def decide_response(status: int, body: bytes) -> tuple[bool, str]:
    """Decide from an admission response: ``(allowed, reason for the log)``.

    Only 200 with a JSON object whose ``Allow`` (case-insensitive, like Go's
    ``encoding/json``) is ``true`` admits; the body must be ≤ 4 KiB.
    """
    if status != 200:
        return False, f"admission controller answered HTTP {status}"
    if len(body) > MAX_RESPONSE_BODY:
        return False, f"admission response body over {MAX_RESPONSE_BODY} bytes"
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False, "admission response is not JSON"
    if not isinstance(doc, dict):
        return False, "admission response is not a JSON object"
    allow: object = False
    for k, v in doc.items():
        if k.lower() == "allow":
            allow = v
    if allow is True:
        return True, "allowed by admission controller"
    return False, "not allowed by admission controller"


# --------------------------------------------------------------------------- hooks


class _NetworkError(Exception):
    """The admission URL could not be reached or spoke broken HTTP."""


class VerifyClientURL:
    """derper's ``--verify-client-url`` check (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = True,
        timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"admission URL {url!r} must be http:// or https:// with a host")
        self.url = url
        self.fail_open = fail_open
        self.timeout = timeout
        self._host = u.hostname
        self._port = u.port or (443 if u.scheme == "https" else 80)
        self._host_header = u.netloc.rsplit("@", 1)[-1]
        self._target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._ssl: ssl.SSLContext | None = None
        if u.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()

    async def admit(self, key: PublicKey, source_ip: str) -> bool:
        body = admission_request_body(key, source_ip)
        try:
            async with asyncio.timeout(self.timeout):
                status, resp = await self._post(body)
        except (OSError, TimeoutError, _NetworkError, h11.ProtocolError) as exc:
            if self.fail_open:
                log.warning(
                    "admission controller %s unreachable (%s); allowing %s (fail-open)",
                    self.url,
                    exc or type(exc).__name__,
                    key.short(),
                )
                return True
            log.info(
                "admission controller %s unreachable (%s); rejecting %s",
                self.url,
                exc or type(exc).__name__,
                key.short(),
            )
            return False
        allowed, reason = decide_response(status, resp)
        if not allowed:
            log.info("admission: %s rejected: %s", key.short(), reason)
        return allowed

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._host if self._ssl is not None else None,
        )
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [
                ("Host", self._host_header),
                ("User-Agent", "tailnet-core-derper"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
            out = conn.send(h11.Request(method="POST", target=self._target, headers=headers))
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out += conn.send(h11.EndOfMessage()) or b""
            writer.write(out)
            await writer.drain()
            status = 0
            chunks: list[bytes] = []
            size = 0
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)  # b"" = EOF
                    continue
                if isinstance(ev, h11.InformationalResponse):
                    continue
                if isinstance(ev, h11.Response):
                    status = ev.status_code
                    if status != 200:
                        return status, b""  # the body does not matter
                elif isinstance(ev, h11.Data):
                    size += len(ev.data)
                    if size > MAX_RESPONSE_BODY:
                        return status, b"".join(chunks) + bytes(ev.data)  # oversize: rejected
                    chunks.append(bytes(ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    return status, b"".join(chunks)
                elif isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                    raise _NetworkError("connection closed before the response ended")
        finally:
            writer.close()


class KnownKeysAdmission:
    """Admit only keys ``is_known(key)`` accepts (sync or async callable).

    For the embedded stack: pass a function that looks the node key up in the
    coordinator's current peer set (``tailnet.stack`` wires
    :class:`tailnet.admission.KnownNodeKeys` in here).
    """

    def __init__(self, is_known: Callable[[PublicKey], bool | Awaitable[bool]]) -> None:
        self._is_known = is_known

    async def admit(self, key: PublicKey, source_ip: str) -> bool:
        result = self._is_known(key)
        if inspect.isawaitable(result):
            result = await result
        if not result:
            log.info("admission: %s rejected: unknown to the coordinator", key.short())
        return bool(result)


class AllOf:
    """Admit only if every hook admits (checked in order; stops at the first no)."""

    def __init__(self, *hooks: Admission) -> None:
        self.hooks = hooks

    async def admit(self, key: PublicKey, source_ip: str) -> bool:
        for hook in self.hooks:
            if not await hook.admit(key, source_ip):
                return False
        return True


# --------------------------------------------------------------------------- server side


class AdmissionGate:
    """Runs admission checks as tasks for the server (event loop thread only).

    :meth:`start` returns at once; ``done(allowed, reason)`` is called later on
    the loop thread (never if :meth:`close` cancelled the check first).
    """

    def __init__(self, hook: Admission) -> None:
        self.hook = hook
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Checks still running."""
        return len(self._tasks)

    def start(self, key: bytes, source_ip: str, done: Callable[[bool, str], None]) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run(key, source_ip, done), name=f"derp-admit {key.hex()[:8]}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: bytes, source_ip: str, done: Callable[[bool, str], None]) -> None:
        try:
            allowed = bool(await self.hook.admit(PublicKey(key), source_ip))
            reason = "admitted" if allowed else "rejected by admission control"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken hook fails closed, never crashes the server
            log.warning("admission hook failed for %s: %r; rejecting", key.hex()[:8], exc)
            allowed, reason = False, "admission check failed"
        done(allowed, reason)

    async def close(self) -> None:
        """Cancel every running check and wait for them to finish."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
