"""Headless Chromium driven over the DevTools protocol (websocket-client; no npm, no CDN).

One page target: evaluate JavaScript, collect console messages and uncaught exceptions, take
screenshots. The browser runs with a fresh profile in a temp folder and no network besides the
page it is pointed at.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .comfy_server import free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    def __init__(self, binary: str, width: int = 1920, height: int = 1080, startup_timeout: float = 60.0):
        self.profile = tempfile.mkdtemp(prefix="dynamic-dit-chromium-")
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--window-size={width},{height}",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.console: list[dict] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._reply_ready = threading.Condition(self._lock)
        try:
            self._connect(startup_timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float) -> None:
        import websocket  # websocket-client

        deadline = time.time() + timeout
        page = None
        while page is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"Chromium exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as response:
                    page = next((t for t in json.loads(response.read()) if t["type"] == "page"), None)
            except OSError:
                pass
            if page is None:
                if time.time() > deadline:
                    raise TimeoutError("Chromium's DevTools endpoint did not come up")
                time.sleep(0.2)
        self._socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=None, suppress_origin=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send("Runtime.enable")
        self.send("Log.enable")
        self.send("Page.enable")

    def _read(self) -> None:
        while True:
            try:
                message = json.loads(self._socket.recv())
            except Exception:  # socket closed
                return
            with self._lock:
                if "id" in message:
                    self._replies[message["id"]] = message
                    self._reply_ready.notify_all()
                elif message.get("method") == "Runtime.consoleAPICalled":
                    params = message["params"]
                    text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                    self.console.append({"level": params.get("type"), "text": text, "source": "console"})
                elif message.get("method") == "Runtime.exceptionThrown":
                    details = message["params"]["exceptionDetails"]
                    text = details.get("exception", {}).get("description") or details.get("text", "")
                    self.console.append({"level": "error", "text": text, "source": "exception", "url": details.get("url", "")})
                elif message.get("method") == "Log.entryAdded":
                    entry = message["params"]["entry"]
                    self.console.append({"level": entry.get("level"), "text": entry.get("text", ""), "source": entry.get("source"),
                                         "url": entry.get("url", "")})

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        with self._lock:
            self._next_id += 1
            message_id = self._next_id
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params or {}}))
        deadline = time.time() + timeout
        with self._lock:
            while message_id not in self._replies:
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"no reply to {method} within {timeout:.0f} s")
                self._reply_ready.wait(left)
            reply = self._replies.pop(message_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """The value of a JavaScript expression (promises are awaited); JavaScript errors raise."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True, "timeout": int(timeout * 1000)},
            timeout=timeout + 5,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.2) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"still falsy after {timeout:.0f} s: {expression}")
            time.sleep(interval)

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        """A PNG of the page (or of `clip`: x, y, width, height, scale in CSS pixels)."""
        params = {"format": "png", **({"clip": clip} if clip else {})}
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        socket_ = getattr(self, "_socket", None)
        if socket_ is not None:
            try:
                socket_.close()
            except Exception:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
