"""A tiny headless-Chromium driver over the Chrome DevTools Protocol (tests only).

Starts Debian's ``chromium`` headless with a fresh profile and
``--remote-debugging-port=0``, reads the port from ``DevToolsActivePort`` and
talks CDP over one WebSocket (``websockets``), with one page target attached in
flat-session mode. Every wait is bounded. :func:`find_chromium` says why a
browser cannot be had (the tests skip with that reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

__all__ = ["Browser", "BrowserError", "find_chromium"]

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "about:blank",
]


class BrowserError(Exception):
    pass


def find_chromium() -> tuple[str | None, str]:
    """``(path, "")`` or ``(None, reason it cannot be had)``."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path, ""
    return None, "no chromium binary on PATH (apt-get install chromium; .ci/run installs it)"


class Browser:
    """One headless browser with one page. ``async with Browser.launch() as b: ...``"""

    def __init__(self, proc: asyncio.subprocess.Process, ws: ClientConnection, profile: str) -> None:
        self._proc = proc
        self._ws = ws
        self._profile = profile
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())
        self.session = ""
        self.console: list[str] = []
        #: every URL the page requested (Network domain)
        self.requests: list[str] = []

    @classmethod
    async def launch(cls, *, timeout: float = 20.0) -> Browser:
        path, why = find_chromium()
        if path is None:
            raise BrowserError(why)
        profile = tempfile.mkdtemp(prefix="tn-chromium-")
        proc = await asyncio.create_subprocess_exec(
            path, f"--user-data-dir={profile}", *_FLAGS,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = Path(profile) / "DevToolsActivePort"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if proc.returncode is not None:
                        raise BrowserError(f"chromium exited with {proc.returncode}")
                    if port_file.exists():
                        lines = port_file.read_text().split("\n")
                        if len(lines) >= 2 and lines[1]:
                            break
                    await asyncio.sleep(0.05)  # polling a file the browser writes
                url = f"ws://127.0.0.1:{int(lines[0])}{lines[1]}"
                ws = await websockets.connect(url, max_size=64 << 20, compression=None)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        b = cls(proc, ws, profile)
        try:
            target = await b.call("Target.createTarget", url="about:blank")
            att = await b.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
            b.session = att["sessionId"]
            await b.page("Page.enable")
            await b.page("Runtime.enable")
            await b.page("Network.enable")
        except BaseException:
            await b.close()
            raise
        return b

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(Exception):
            await self._ws.close()
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                fut = self._pending.pop(msg.get("id", -1), None)
                if fut is not None:
                    if not fut.done():
                        if "error" in msg:
                            fut.set_exception(BrowserError(str(msg["error"])))
                        else:
                            fut.set_result(msg.get("result", {}))
                    continue
                if msg.get("method") == "Network.requestWillBeSent":
                    self.requests.append(msg["params"]["request"]["url"])
                elif msg.get("method") == "Runtime.consoleAPICalled":
                    args = msg["params"].get("args", [])
                    self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
                elif msg.get("method") == "Runtime.exceptionThrown":
                    self.console.append("exception: " + json.dumps(msg["params"])[:500])
                self._events.put_nowait(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BrowserError("browser connection closed"))

    async def call(self, method: str, *, session: str | None = None, timeout: float = 15.0, **params: Any) -> Any:
        mid = next(self._ids)
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        await self._ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout)

    async def page(self, method: str, **params: Any) -> Any:
        return await self.call(method, session=self.session, **params)

    async def goto(self, url: str, *, timeout: float = 15.0) -> None:
        """Navigate and wait until the document is complete."""
        await self.page("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout=timeout)

    async def eval(self, expression: str) -> Any:
        res = await self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise BrowserError(json.dumps(res["exceptionDetails"])[:1000])
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Poll a JS expression until it is truthy; return its value (bounded by ``timeout``)."""
        last: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        last = await self.eval(expression)
                    except BrowserError as exc:  # navigation in progress
                        last = str(exc)
                    else:
                        if last:
                            return last
                    await asyncio.sleep(interval)  # DOM polling: the page updates on its own
        except TimeoutError:
            raise BrowserError(
                f"timed out after {timeout}s waiting for {expression!r} (last: {last!r}); "
                f"console: {self.console[-5:]}"
            ) from None

    async def cookies(self) -> list[dict[str, Any]]:
        res = await self.page("Network.getCookies")
        return list(res.get("cookies", []))


def chromium_available() -> bool:
    return find_chromium()[0] is not None and os.name == "posix"
