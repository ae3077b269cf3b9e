"""The DRPC method table (Go's ``drpcmux``): method path → handler.

One :class:`Mux` is what a server connection serves. Coder's client endpoints
serve the Tailnet service; its agent endpoint (``/me/rpc``) serves the Agent
service and the Tailnet service on one mux. An embedding control plane
registers more methods (its own Agent service, say) with :meth:`Mux.register`
or a whole protobuf service with :meth:`Mux.register_service`.

Handlers are transport-independent coroutines (the DRPC adapter in
:mod:`tailnet.rpc.server` runs them; nothing here does I/O):

* **unary**: ``async def h(call, request) -> response``;
* **server streaming**: ``async def h(call, request) -> None``, sending with
  ``await call.send(msg)``;
* **client streaming / bidi**: ``async def h(call) -> response | None``,
  receiving with ``await call.recv()`` (``None`` at the end of the requests).

How a call ends on the wire (as a Go ``drpcserver`` + ``drpcmux`` ends it,
coder-transport.md §3.9): a unary (or client-streaming) success sends its
Message, then CloseSend; a streaming handler's return sends CloseSend, or
Close for methods registered with ``end_with_close=True`` (Coder's three
streaming Tailnet handlers ``defer stream.Close()``, so they end with Close and
their errors surface as Close too). A handler error sends an Error packet
with :attr:`RpcError.code` (0 for anything but :data:`UNIMPLEMENTED`).
A path that is not registered gets Go's ``protocol error: unknown rpc: "<path>"``
with code 0.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

__all__ = [
    "UNIMPLEMENTED",
    "MethodKind",
    "RpcError",
    "ServerCall",
    "Method",
    "Mux",
]

#: The DRPC error code Go clients recognise as "not implemented" (``drpcerr``).
UNIMPLEMENTED = 12


class MethodKind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server streaming"
    CLIENT_STREAM = "client streaming"
    BIDI = "bidirectional streaming"

    @property
    def client_streams(self) -> bool:
        return self in (MethodKind.CLIENT_STREAM, MethodKind.BIDI)

    @property
    def server_streams(self) -> bool:
        return self in (MethodKind.SERVER_STREAM, MethodKind.BIDI)

    @classmethod
    def of(cls, client_streaming: bool, server_streaming: bool) -> MethodKind:
        if client_streaming:
            return cls.BIDI if server_streaming else cls.CLIENT_STREAM
        return cls.SERVER_STREAM if server_streaming else cls.UNARY


class RpcError(Exception):
    """Ends a call with a DRPC Error packet: ``code`` (uint64) and ``message``.

    Go clients see only the code (:data:`UNIMPLEMENTED` = 12 is the one they act
    on) and the text. ``message`` is shown to the caller: never put secrets in it.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ServerCall(Protocol):
    """What a handler sees of its call (implemented by the transport adapter)."""

    @property
    def method(self) -> str: ...

    @property
    def metadata(self) -> Mapping[str, str]:
        """InvokeMetadata the client sent (usually empty)."""
        ...

    @property
    def context(self) -> Any:
        """Whatever the endpoint attached to the connection (e.g. the caller's identity)."""
        ...

    async def send(self, msg: Message) -> None:
        """Send one response message; waits while the peer's window is exhausted.

        Raises ``ConnectionError`` once the call is over (peer gone or cancelled).
        """
        ...

    async def recv(self) -> Message | None:
        """The next request message, or ``None`` once the client sent CloseSend."""
        ...

    def send_nowait(self, msg: Message) -> bool:
        """Queue one response without waiting. True if it went out at once; False
        if it waits for the peer's window (or the pipe is full): then
        ``await drain()`` before sending more. Raises like :meth:`send`."""
        ...

    async def drain(self) -> None:
        """Return once a send would not wait (``ConnectionError`` if the call ends)."""
        ...

    @property
    def ready(self) -> bool:
        """:meth:`recv` would return without waiting (a message, CloseSend, or the end)."""
        ...

    def listen(self, on_input: Callable[[], None] | None) -> None:
        """Call ``on_input()`` whenever :attr:`ready` may have become true (a message
        or CloseSend arrived, or the call ended); ``None`` stops. Lets a handler
        read on demand instead of keeping a task waiting in :meth:`recv`. The
        handler must call ``listen(None)`` before it returns (the callback usually
        refers to the call: a reference cycle otherwise)."""
        ...

    @property
    def ended(self) -> bool:
        """The call is over (ended by either side); nothing more can be sent."""
        ...

    def hold(self) -> None:
        """Streaming calls only: keep the call open after the handler returns, until
        :meth:`finish` (or the peer ends it: the :meth:`listen` callback hears that,
        with :attr:`ended` true). Lets a long-lived stream live without a task."""
        ...

    def finish(self, exc: BaseException | None = None) -> None:
        """End a held call as its handler's return (``exc`` None) or raising ``exc``
        would have; also drops the listener. No-op once ended."""
        ...


Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Method:
    """One registered method."""

    path: str
    kind: MethodKind
    request_type: type[Message]
    handler: Handler
    end_with_close: bool = False


class Mux:
    """Method path → :class:`Method`; see the module docstring for the handler shapes."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(
        self,
        path: str,
        kind: MethodKind,
        request_type: type[Message],
        handler: Handler,
        *,
        end_with_close: bool = False,
    ) -> None:
        """Register ``handler`` for ``path`` (``/package.Service/Method``); replaces any."""
        if not path.startswith("/") or path.count("/") != 2:
            raise ValueError(f"method path must look like /pkg.Service/Method, got {path!r}")
        self._methods[path] = Method(path, kind, request_type, handler, end_with_close)

    def register_service(
        self,
        service: ServiceDescriptor,
        impl: object,
        *,
        end_with_close: bool = False,
        unimplemented: bool = True,
    ) -> list[str]:
        """Register every method of a protobuf ``service`` implemented by ``impl``.

        ``impl`` has one coroutine method per RPC, named as in the ``.proto``
        (``GetManifest``…), with the handler shape of its kind. Methods ``impl``
        lacks answer :data:`UNIMPLEMENTED` "Unimplemented" (like Go's generated
        ``Unimplemented`` server) when ``unimplemented`` is true, else are left
        out. Returns the registered paths.
        """
        paths: list[str] = []
        for m in service.methods:
            path = f"/{service.full_name}/{m.name}"
            kind = MethodKind.of(m.client_streaming, m.server_streaming)
            request_type = GetMessageClass(m.input_type)
            handler = getattr(impl, m.name, None)
            if handler is None:
                if not unimplemented:
                    continue
                handler = _unimplemented
            self.register(path, kind, request_type, handler, end_with_close=end_with_close)
            paths.append(path)
        return paths

    def unregister(self, path: str) -> None:
        self._methods.pop(path, None)

    def lookup(self, path: str) -> Method | None:
        return self._methods.get(path)

    def __contains__(self, path: object) -> bool:
        return path in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def copy(self) -> Mux:
        out = Mux()
        out._methods = dict(self._methods)
        return out


async def _unimplemented(*_args: object) -> None:
    raise RpcError(UNIMPLEMENTED, "Unimplemented")
