"""Exceptions raised by the tailnet coordinator core and its authorization policies.

Hierarchy::

    TailnetError
    ├── CoordinatorClosed    the coordinator was closed; no new connections
    ├── RequestError         a CoordinateRequest failed validation (ValueError subclass)
    │   └── LimitExceeded    ... because it would exceed a per-peer resource limit
    └── AuthorizationError   a policy refused a CoordinateRequest

Transport mapping (done in exactly one place per adapter):

* ``RequestError``: end only that peer's stream; ``str(err)`` is Coder's text
  (e.g. ``"update_self node is required"``) and may be sent to the peer as
  ``CoordinateResponse.error``; the status is ``INVALID_ARGUMENT``, or
  ``RESOURCE_EXHAUSTED`` for a ``LimitExceeded``.
* ``AuthorizationError``: end only that peer's stream (as LOST); the peer is sent
  ``"authorization: " + str(err)``.
* ``CoordinatorClosed``: refuse the call (e.g. gRPC ``UNAVAILABLE``).

The texts of these three errors are safe to send to the peer: they never embed
exception text from lower layers (a wrapped cause is kept in ``__cause__`` for logs).
"""

from __future__ import annotations

__all__ = [
    "AuthorizationError",
    "CoordinatorClosed",
    "LimitExceeded",
    "RequestError",
    "TailnetError",
]


class TailnetError(Exception):
    """Base class of every tailnet coordinator error."""


class CoordinatorClosed(TailnetError):
    """The coordinator is closed (Coder's ``ErrClosed``)."""

    def __init__(self, message: str = "coordinator is closed") -> None:
        super().__init__(message)


class RequestError(TailnetError, ValueError):
    """A malformed ``CoordinateRequest``; the message is the text sent to the peer."""


class LimitExceeded(RequestError):
    """A request would exceed a resource limit (e.g. ``max_tunnels_per_peer``).

    The message names the limit; nothing of the request was applied.
    """


class AuthorizationError(TailnetError):
    """A policy refused a request; ``str()`` is the detail.

    Transports send ``"authorization: <detail>"`` (see :attr:`wire_message`).
    """

    @property
    def wire_message(self) -> str:
        """The text a transport puts in ``CoordinateResponse.error``."""
        return f"authorization: {self}"
