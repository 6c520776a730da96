"""Headless Chromium driven over the DevTools protocol (a WebSocket, through aiohttp, which MLflow depends on): what
tests/test_dashboard.py and benchmarks/dashboard.py use to load the live dashboard as a browser does and to read its
console messages, exceptions and requests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np


class NoChromium(RuntimeError):
    pass


class Page:
    """One tab of a headless Chromium: commands, and every console message, exception and request it saw."""

    def __init__(self, ws):
        self.ws, self.ids, self.pending = ws, itertools.count(1), {}
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                self.pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                self.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                          for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                self.errors.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])

    async def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.pending[i] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": i, "method": method, "params": params})
        reply = await asyncio.wait_for(self.pending[i], 60)
        assert "error" not in reply, reply
        return reply["result"]

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> np.ndarray:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB")).astype(int)


class Chromium:
    def __init__(self, tmp: Path):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise NoChromium("chromium is not installed (apt-get install chromium)")
        profile = tmp / "profile"
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a profile used before: its port is stale
        flags = ["--headless", "--disable-gpu", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                 "--window-size=1400,1000", "--no-first-run", "--disable-background-networking"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
        self.proc = subprocess.Popen([binary, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (profile / "DevToolsActivePort").exists() or not (profile / "DevToolsActivePort").read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        self.port = int((profile / "DevToolsActivePort").read_text().split()[0])

    async def page(self, session) -> Page:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        page = Page(await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0))
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.send(f"{domain}.enable")
        return page

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def in_browser(tmp: Path, scenario):
    """Runs ``scenario(page)`` in a fresh headless Chromium; returns its result and the page's errors and requests."""
    browser = Chromium(tmp)

    async def main():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            page = await browser.page(session)
            try:
                return await scenario(page), page
            finally:
                await page.ws.close()
    try:
        return asyncio.run(main())
    finally:
        browser.close()


