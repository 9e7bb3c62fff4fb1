"""A real ComfyUI server (the host the tests use) with this pack in its custom_nodes, as a subprocess.

Isolated per instance: its own temp base folder (models, input, output, temp, user), an in-memory
database, a free port, --cpu. Nothing is shared with another test run or another ComfyUI.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

PACK_FOLDER = "ComfyUI-DynamicDiT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_path: Path, pack_root: Path, base: Path, python: str = sys.executable,
                 user_settings: dict | None = None, startup_timeout: float = 180.0):
        self.comfyui_path = Path(comfyui_path)
        self.base = Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        custom_nodes = self.base / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        (custom_nodes / PACK_FOLDER).symlink_to(pack_root, target_is_directory=True)
        if user_settings:  # the frontend's settings of the default user
            settings = self.base / "user" / "default" / "comfy.settings.json"
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps(user_settings))
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=self.comfyui_path, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
        )
        try:
            self._wait_until_up(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"POST {path} -> {error.code}: {error.read().decode(errors='replace')}") from None

    def queue(self, prompt: dict, client_id: str) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout: float = 120.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 120.0) -> tuple[dict, "EventListener", float]:
        """Queue `prompt` with a websocket client listening and wait for it: its history entry, the listener (closed,
        with every message of the run) and the seconds from queueing to the finished history."""
        listener = EventListener(self)
        try:
            started = time.perf_counter()
            history = self.wait_for_history(self.queue(prompt, listener.client_id), timeout=timeout)
            seconds = time.perf_counter() - started
            time.sleep(0.2)  # the last websocket messages
        finally:
            listener.close()
        return history, listener, seconds

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


TEXT_EVENT = 3  # ComfyUI's BinaryEventTypes.TEXT: a node's progress text


class EventListener:
    """The server's websocket messages for one client id, collected on a background thread."""

    def __init__(self, server: ComfyServer):
        import websocket  # websocket-client

        self.client_id = f"test-{uuid.uuid4().hex[:8]}"
        self.messages: list[dict] = []
        self.texts: list[tuple[str, str]] = []  # (node id, text) of the nodes' progress texts
        self._socket = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=30
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import websocket

        while True:
            try:
                frame = self._socket.recv()
            except (websocket.WebSocketException, OSError):
                return
            if isinstance(frame, str) and frame:  # "" comes with the close
                self.messages.append(json.loads(frame))
            elif isinstance(frame, bytes) and int.from_bytes(frame[:4], "big") == TEXT_EVENT:
                size = int.from_bytes(frame[4:8], "big")  # binary: event type, node id length, node id, text
                self.texts.append((frame[8:8 + size].decode(), frame[8 + size:].decode()))
            # other binary frames are image previews

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind]

    def close(self) -> None:
        self._socket.close()
        self._thread.join(timeout=5)
