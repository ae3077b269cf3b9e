"""Reusable check: a workload leaves no cyclic garbage of ours behind.

CPython frees acyclic garbage at once by reference counting; only objects in
reference cycles wait for the cyclic collector, which ``tailnet serve`` runs
rarely (``tailnet.tuning``), so every cycle a connection or stream leaves behind
is memory that stays. The check runs a workload with the collector disabled,
then performs one collection with ``gc.DEBUG_SAVEALL`` (everything the
collector would have freed lands in ``gc.garbage`` instead) and keeps the
objects that belong to us::

    from .cycles import CycleCheck          # tests/tailnet/…  (or ..cycles below it)

    with CycleCheck() as check:
        ...connect and disconnect many peers, wait until the server saw them end...
    check.assert_clean()

"Ours" (:func:`is_ours`): instances of classes defined in ``tailnet``/``derp``;
frames, coroutines, generators and functions whose code lives there; every
asyncio task/future and exception (a cycle through them is what a stream
typically leaves); ``grpc``/``websockets`` objects except grpc.aio's own
per-call method lookup (a closure cycle of about six objects that grpc.aio
creates for every incoming call, whatever the servicer does; see
:data:`GRPC_PER_CALL_LOOKUP`). Clients in the same process count too: use
clients that leave no cycles (grpc.aio's client calls do not), or run them in a
subprocess.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import types
from typing import Any

import derp
import tailnet

__all__ = ["CycleCheck", "GRPC_PER_CALL_LOOKUP", "is_ours", "describe", "run_workload"]

_OUR_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep for m in (tailnet, derp)
)
_OUR_MODULES = ("tailnet", "derp")
#: Type names (qualname substrings) of grpc.aio's per-call handler lookup cycle:
#: ``_find_method_handler``'s closure scope and the ``_HandlerCallDetails`` it holds.
GRPC_PER_CALL_LOOKUP = ("_find_method_handler", "_HandlerCallDetails")


def _code_of(obj: object) -> types.CodeType | None:
    for attr in ("f_code", "cr_code", "ag_code", "gi_code", "__code__"):
        code = getattr(obj, attr, None)
        if isinstance(code, types.CodeType):
            return code
    return None


def is_ours(obj: object) -> bool:
    """True if ``obj`` in cyclic garbage points at our code (see module docstring)."""
    t = type(obj)
    mod = getattr(t, "__module__", "") or ""
    if mod.split(".", 1)[0] in _OUR_MODULES:
        return True
    if isinstance(obj, (types.FrameType, types.CoroutineType, types.GeneratorType,
                        types.AsyncGeneratorType, types.FunctionType)):
        code = _code_of(obj)
        return code is not None and code.co_filename.startswith(_OUR_DIRS)
    if isinstance(obj, (asyncio.Future, BaseException)):
        return True
    if mod.startswith(("grpc", "websockets")):
        return not any(name in t.__qualname__ for name in GRPC_PER_CALL_LOOKUP)
    return False


def describe(obj: object) -> str:
    """A short label: the type, plus where for code objects and tasks."""
    t = type(obj)
    label = f"{t.__module__}.{t.__qualname__}"
    code = _code_of(obj)
    if code is not None:
        label += f" {os.path.basename(code.co_filename)}:{code.co_name}"
    elif isinstance(obj, asyncio.Task):
        coro: Any = obj.get_coro()
        c = _code_of(coro)
        if c is not None:
            label += f" {c.co_name}"
    return label


class CycleCheck:
    """Context manager: cyclic GC off inside; afterwards :attr:`ours` lists our garbage.

    On entry: one full collection (a clean slate), then the collector is
    disabled. On exit: one collection with ``DEBUG_SAVEALL``; ``gc.garbage`` is
    emptied again and the previous GC state restored. :attr:`total` counts all
    cyclic garbage found (ours or not), :attr:`ours` keeps ours (the objects
    themselves: drop the check object when done).
    """

    def __init__(self) -> None:
        self.total = 0
        self.ours: list[object] = []
        self._was_enabled = True
        self._debug = 0

    def __enter__(self) -> CycleCheck:
        self._was_enabled = gc.isenabled()
        self._debug = gc.get_debug()
        gc.collect()
        gc.garbage.clear()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.set_debug(self._debug | gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            garbage = list(gc.garbage)
            gc.garbage.clear()
        finally:
            gc.set_debug(self._debug)
            if self._was_enabled:
                gc.enable()
        self.total = len(garbage)
        self.ours = [o for o in garbage if is_ours(o)]
        del garbage

    def summary(self, limit: int = 25) -> str:
        counts = collections.Counter(describe(o) for o in self.ours)
        lines = [f"{n:6d}  {what}" for what, n in counts.most_common(limit)]
        return f"{len(self.ours)} cyclic objects of ours (of {self.total}):\n" + "\n".join(lines)

    def assert_clean(self) -> None:
        """Fail, listing the types, if the workload left cyclic garbage of ours."""
        if self.ours:
            msg = self.summary()
            self.ours.clear()
            raise AssertionError(msg)


async def run_workload(*argv: str, timeout: float = 60.0) -> str:
    """Run a client workload in its own process (``argv[0]`` is the program, e.g.
    ``sys.executable``); returns its stdout, raises with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"workload {argv[1:]} timed out after {timeout} s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"workload {argv[1:]} failed ({proc.returncode}):\n{text[-4000:]}")
    return text
