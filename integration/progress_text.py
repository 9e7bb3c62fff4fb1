"""Text on a running node (ComfyUI's `PromptServer.send_progress_text`, 0.3.75 and 0.12.1): the phase a long node is
in, how far, and about how long is left. Silent outside a server (the trainer logs its own progress to the console)."""
from __future__ import annotations

import time
from typing import Any


class PhaseText:
    """Sends `<phase>: <done>/<count>[, detail], about <t> left` for a node, at most every `interval` seconds."""

    def __init__(self, node_id: str | None, total_units: int, interval: float = 0.5):
        self.node_id, self.total, self.interval = node_id, max(int(total_units), 1), interval
        self.started, self.last_sent = time.perf_counter(), 0.0

    def _server(self) -> Any:
        if self.node_id is None:
            return None
        try:
            from server import PromptServer
        except ImportError:
            return None
        return getattr(PromptServer, "instance", None)

    def left(self, units_done: int) -> str:
        elapsed = time.perf_counter() - self.started
        if units_done <= 0 or elapsed <= 0:
            return ""
        seconds = elapsed / units_done * (self.total - units_done)
        return f", about {seconds / 60:.0f} min left" if seconds >= 90 else f", about {seconds:.0f} s left"

    def show(self, text: str, units_done: int | None = None, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_sent < self.interval:
            return
        self.last_sent = now
        if units_done is not None:
            text += self.left(units_done)
        server = self._server()
        if server is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, self.node_id)
