"""A per-step speed chart of a run, drawn with Pillow (which ComfyUI already ships).

It draws from the same plain data the live view on the node gets (`RunRecord.progress`), so the
image and the node show the same thing: model ms per step next to the full-compute baseline, the
FLOPs of every step as a share of the full model's, the one-off setup apart from the steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

from .telemetry import RunRecord

BACKGROUND = (24, 26, 31)
GRID = (58, 62, 70)
AXIS = (120, 126, 136)
TEXT = (225, 228, 232)
MUTED = (160, 166, 176)
RUN_COLOR = (86, 182, 255)
BASELINE_COLOR = (128, 132, 140)
FLOPS_COLOR = (255, 170, 60)
SETUP_COLOR = (199, 120, 221)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(peak: float, count: int = 4) -> list[float]:
    """Round axis ticks from 0 to at least `peak`: steps of 1, 2 or 5 times a power of ten."""
    if not math.isfinite(peak) or peak <= 0:
        return [0.0, 1.0]
    raw = peak / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(math.ceil(peak / step - 1e-9)) + 1)]


def _format_ms(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def render_chart(run: RunRecord, baseline: RunRecord | None = None, width: int = 960, height: int = 540) -> Image.Image:
    """The chart of `run` against `baseline` (None: no baseline bars) as an RGB image."""
    data = run.progress(baseline=baseline)
    return render_progress(data, width, height)


@dataclass
class _Columns:
    """Where a chart's columns stand: one per setup work (apart, left of the steps), then one per step."""

    left: float
    right: float
    setup: int
    count: int

    def __post_init__(self) -> None:
        self.gap = 0.6 if self.setup else 0.0
        self.slot = (self.right - self.left) / (self.count + self.gap)

    def x(self, i: int) -> float:
        return self.left + (i + (self.gap if i >= self.setup else 0.0)) * self.slot


def render_progress(data: dict, width: int = 960, height: int = 540) -> Image.Image:
    """Draw `RunRecord.progress` data: a time panel (bars per step, baseline next to them, setup apart)
    above a FLOPs panel (share of the full model per step)."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title, small = _font(18), _font(13)
    draw.text((16, 10), "Dynamic DiT - per-step speed", fill=TEXT, font=title)
    y = 34
    for line in _wrap(draw, data.get("summary") or "", small, width - 32)[:3]:
        draw.text((16, y), line, fill=MUTED, font=small)
        y += 16
    steps = data.get("steps") or []
    if not steps:
        draw.text((16, y + 20), "no sampling steps recorded", fill=TEXT, font=small)
        return image

    baseline = data.get("baseline") or None
    base_steps = baseline["steps"] if baseline else []
    setup = data.get("setup") or []
    left, right, bottom_margin = 62, width - 16, 34
    legend_y = y + 8
    top = legend_y + 40
    split = top + (height - bottom_margin - top) * 0.58
    columns = _Columns(left, right, len(setup), len(setup) + max(len(steps), len(base_steps), int(data.get("total_steps") or 0)))
    _legend(draw, left, legend_y, bool(baseline), bool(setup), small)
    _time_panel(draw, columns, (top, split - 30), setup, steps, base_steps if baseline else None, small)
    _flops_panel(draw, columns, (split + 8, height - bottom_margin), steps, small)
    return image


def _legend(draw: ImageDraw.ImageDraw, left: float, y: float, baseline: bool, setup: bool, font) -> None:
    """The legend, above the time panel."""
    legend = [(RUN_COLOR, "this run")] + ([(BASELINE_COLOR, "full compute")] if baseline else [])
    legend += [(SETUP_COLOR, "one-off setup")] if setup else []
    legend += [(FLOPS_COLOR, "FLOPs vs full")]
    x = left
    for color, name in legend:
        draw.rectangle((x, y + 2, x + 11, y + 13), fill=color)
        draw.text((x + 16, y), name, fill=TEXT, font=font)
        x += 24 + draw.textlength(name, font=font)


def _time_panel(draw: ImageDraw.ImageDraw, columns: _Columns, panel: tuple[float, float], setup: list, steps: list,
                base_steps: list | None, font) -> None:
    """Grouped bars per step (the baseline's next to the run's); a setup bar is clipped at the axis top and labelled."""
    step_ms = [s["ms"] for s in steps] + [s["ms"] for s in base_steps or []]
    ticks = nice_ticks(max(step_ms + [1e-3]) * 1.05)
    peak = ticks[-1]
    _axes(draw, columns.left, columns.right, *panel, ticks, peak, _format_ms, "model ms per step", font)
    panel_top, panel_bottom = panel
    slot = columns.slot

    def bar(x0: float, x1: float, value: float, color: tuple) -> None:
        clipped = min(value, peak)
        y0 = panel_bottom - (panel_bottom - panel_top) * clipped / peak
        draw.rectangle((x0, y0, max(x0, x1 - 1), panel_bottom), fill=color)
        if value > peak:  # a break mark and the real value
            draw.line((x0, panel_top + 8, x1, panel_top + 2), fill=BACKGROUND, width=3)
            label = _format_ms(value) + " ms"
            draw.text((x0, panel_top - 15), label, fill=TEXT, font=font)

    for i, work in enumerate(setup):
        x0 = columns.x(i) + slot * 0.15
        bar(x0, x0 + slot * 0.7, work["seconds"] * 1e3, SETUP_COLOR)
        draw.text((x0, panel_bottom + 3), "setup", fill=SETUP_COLOR, font=font)
    per_column = 2 if base_steps is not None else 1
    for i in range(columns.count - columns.setup):
        x0 = columns.x(columns.setup + i) + slot * 0.12
        each = slot * 0.76 / per_column
        if base_steps is not None and i < len(base_steps):
            bar(x0, x0 + each, base_steps[i]["ms"], BASELINE_COLOR)
        if base_steps is not None:
            x0 += each
        if i < len(steps):
            bar(x0, x0 + each, steps[i]["ms"], RUN_COLOR)


def _flops_panel(draw: ImageDraw.ImageDraw, columns: _Columns, panel: tuple[float, float], steps: list, font) -> None:
    """The share of the full model per step, 100% = full compute, and the step numbers under it."""
    _axes(draw, columns.left, columns.right, *panel, [0.0, 0.5, 1.0], 1.0, lambda v: f"{v:.0%}", "FLOPs vs full model", font)
    f_top, f_bottom = panel
    slot, steps_shown = columns.slot, columns.count - columns.setup
    for i, step in enumerate(steps):
        x0 = columns.x(columns.setup + i) + slot * 0.2
        ratio = min(step["flops_ratio"], 1.0)
        draw.rectangle((x0, f_bottom - (f_bottom - f_top) * ratio, max(x0, x0 + slot * 0.6 - 1), f_bottom), fill=FLOPS_COLOR)
    label_every = max(1, math.ceil(steps_shown / 16))
    for i in range(steps_shown):
        if i % label_every == 0:
            label = str(i)
            x = columns.x(columns.setup + i) + slot / 2 - draw.textlength(label, font=font) / 2
            draw.text((x, f_bottom + 3), label, fill=MUTED, font=font)
    right = columns.right
    draw.text((right - draw.textlength("sampling step", font=font), f_bottom + 17), "sampling step", fill=MUTED, font=font)


def _axes(
    draw: ImageDraw.ImageDraw, left: float, right: float, top: float, bottom: float, ticks: list[float], peak: float,
    fmt: Callable[[float], str], label: str, font,
) -> None:
    draw.text((left, top - 18), label, fill=MUTED, font=font)
    for value in ticks:
        y = bottom - (bottom - top) * value / peak
        draw.line((left, y, right, y), fill=GRID if value else AXIS)
        text = fmt(value)
        draw.text((left - 6 - draw.textlength(text, font=font), y - 7), text, fill=MUTED, font=font)
    draw.line((left, top, left, bottom), fill=AXIS)
