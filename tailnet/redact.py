"""Keep secrets out of the ``websockets`` library's debug logs.

At DEBUG level ``websockets`` logs every handshake header (``< Cookie: …``,
``> Coder-Session-Token: …``), the request line with its query string
(``?resume_token=…``) and a preview of every frame (text messages in full, the
first and last bytes of binary ones). :class:`RedactSecrets` is a
:class:`logging.Filter` that rewrites those records before any handler sees
them:

* the value of a credential header (``Authorization``, ``Cookie``,
  ``Set-Cookie``, ``Proxy-Authorization``, and any name containing ``token``,
  ``secret``, ``password`` or ``key`` other than ``Sec-WebSocket-Key``) becomes
  ``[redacted]``;
* in any argument that is a request target (``/…?…``), every query value but
  ``version`` becomes ``[redacted]``;
* data frames (text, binary, continuation) are shown as their opcode and
  length only; control frames (ping, pong, close) as they are.

:func:`install` attaches it to the loggers the library uses by default
(``websockets.client``, ``websockets.server``, ``websockets``) and to any
logger given; :data:`WS_PROTOCOL_LOG` is the logger our own server-side
WebSockets pass to the library. A filter on a logger applies to records
created through that logger, which is how ``websockets`` logs.
"""

from __future__ import annotations

import logging
from typing import Final

from websockets.frames import Frame, Opcode

__all__ = ["RedactSecrets", "install", "redact_target", "WS_PROTOCOL_LOG", "REDACTED"]

REDACTED: Final = "[redacted]"
#: The logger our server WebSockets hand to ``websockets`` (filtered).
WS_PROTOCOL_LOG: Final = logging.getLogger("tailnet.websocket.protocol")

_HEADER_MSGS: Final = frozenset({"< %s: %s", "> %s: %s"})
_SECRET_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie"}
)
_SAFE_QUERY: Final = frozenset({"version"})
_DATA_OPCODES: Final = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


def _secret_header(name: str) -> bool:
    n = name.strip().lower()
    if n in _SECRET_HEADERS:
        return True
    if n.startswith("sec-websocket-"):
        return False
    return any(word in n for word in ("token", "secret", "password", "key"))


def redact_target(target: str) -> str:
    """``/path?a=1&version=2.3`` → ``/path?a=[redacted]&version=2.3``."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        parts.append(item if not eq or name in _SAFE_QUERY else f"{name}={REDACTED}")
    return path + "?" + "&".join(parts)


def _frame_summary(frame: Frame) -> object:
    if frame.opcode in _DATA_OPCODES:
        return f"{frame.opcode.name} [{len(frame.data)} bytes]"
    return frame


class RedactSecrets(logging.Filter):
    """Rewrites ``websockets`` debug records (see module docstring); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or not args:
            return True
        if record.msg in _HEADER_MSGS and len(args) == 2:
            if _secret_header(str(args[0])):
                record.args = (args[0], REDACTED)
            return True
        record.args = tuple(_redact_arg(a) for a in args)
        return True


def _redact_arg(arg: object) -> object:
    if isinstance(arg, Frame):
        return _frame_summary(arg)
    if isinstance(arg, str) and arg.startswith("/") and "?" in arg:  # a request target
        return redact_target(arg)
    return arg


_FILTER: Final = RedactSecrets()


def install(*loggers: logging.Logger) -> None:
    """Attach the filter to the library's default loggers, :data:`WS_PROTOCOL_LOG`
    and ``loggers`` (idempotent)."""
    targets = [
        logging.getLogger("websockets"),
        logging.getLogger("websockets.client"),
        logging.getLogger("websockets.server"),
        WS_PROTOCOL_LOG,
        *loggers,
    ]
    for lg in targets:
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)


install()
