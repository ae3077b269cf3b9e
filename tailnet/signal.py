"""A version counter that coroutines can wait on (one event loop).

Sources whose watchers only need "something changed since version N" (the DERP
map source, the in-memory workspace provider) bump a :class:`VersionSignal`;
watchers call :meth:`VersionSignal.wait_changed` with the last version they
acted on, so bursts of changes coalesce into one wake-up and nothing is missed.
"""

from __future__ import annotations

import asyncio

__all__ = ["VersionSignal"]


class VersionSignal:
    """Monotonic version plus waiters. Not thread-safe: use one event loop."""

    __slots__ = ("_waiters", "version")

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._waiters: set[asyncio.Future[None]] = set()

    def bump(self) -> int:
        """Increment the version and wake every waiter; returns the new version."""
        self.version += 1
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        return self.version

    def add_waiter(self, fut: asyncio.Future[None]) -> None:
        """Resolve ``fut`` at the next :meth:`bump` (for callers that wait on
        several things with one future; pair with :meth:`remove_waiter`)."""
        self._waiters.add(fut)

    def remove_waiter(self, fut: asyncio.Future[None]) -> None:
        self._waiters.discard(fut)

    async def wait_changed(self, last_version: int) -> int:
        """Return the current version as soon as it differs from ``last_version``."""
        while self.version == last_version:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)
        return self.version
