"""A per-step speed chart of a run, drawn with Pillow (which ComfyUI already ships).

It draws from the same plain data the live view on the node gets (`RunRecord.progress`), so the
image and the node show the same thing: model ms per step next to the full-compute baseline, the
FLOPs of every step as a share of the full model's, the one-off setup apart from the steps.
"""
from __future__ import annotations

import math
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
    time_panel = (top, split - 30)
    flops_panel = (split + 8, height - bottom_margin)

    # Columns: one per setup work (apart, left of the steps), then one per step.
    columns = len(setup) + max(len(steps), len(base_steps), int(data.get("total_steps") or 0))
    gap = 0.6 if setup else 0.0
    slot = (right - left) / (columns + gap)

    def column_x(i: int) -> float:
        return left + (i + (gap if i >= len(setup) else 0.0)) * slot

    # Legend, above the time panel.
    legend = [(RUN_COLOR, "this run")] + ([(BASELINE_COLOR, "full compute")] if baseline else [])
    legend += [(SETUP_COLOR, "one-off setup")] if setup else []
    legend += [(FLOPS_COLOR, "FLOPs vs full")]
    x = left
    for color, name in legend:
        draw.rectangle((x, legend_y + 2, x + 11, legend_y + 13), fill=color)
        draw.text((x + 16, legend_y), name, fill=TEXT, font=small)
        x += 24 + draw.textlength(name, font=small)

    # Time panel: grouped bars per step; the setup bar is clipped at the axis top and labelled.
    step_ms = [s["ms"] for s in steps] + [s["ms"] for s in base_steps]
    ticks = nice_ticks(max(step_ms + [1e-3]) * 1.05)
    peak = ticks[-1]
    _axes(draw, left, right, *time_panel, ticks, peak, _format_ms, "model ms per step", small)
    panel_top, panel_bottom = time_panel

    def bar(x0: float, x1: float, value: float, color: tuple) -> None:
        clipped = min(value, peak)
        y0 = panel_bottom - (panel_bottom - panel_top) * clipped / peak
        draw.rectangle((x0, y0, max(x0, x1 - 1), panel_bottom), fill=color)
        if value > peak:  # a break mark and the real value
            draw.line((x0, panel_top + 8, x1, panel_top + 2), fill=BACKGROUND, width=3)
            label = _format_ms(value) + " ms"
            draw.text((x0, panel_top - 15), label, fill=TEXT, font=small)

    for i, work in enumerate(setup):
        x0 = column_x(i) + slot * 0.15
        bar(x0, x0 + slot * 0.7, work["seconds"] * 1e3, SETUP_COLOR)
        draw.text((x0, panel_bottom + 3), "setup", fill=SETUP_COLOR, font=small)
    per_column = 2 if baseline else 1
    for i in range(columns - len(setup)):
        x0 = column_x(len(setup) + i) + slot * 0.12
        each = slot * 0.76 / per_column
        if baseline and i < len(base_steps):
            bar(x0, x0 + each, base_steps[i]["ms"], BASELINE_COLOR)
        if baseline:
            x0 += each
        if i < len(steps):
            bar(x0, x0 + each, steps[i]["ms"], RUN_COLOR)

    # FLOPs panel: share of the full model per step, 100% = full compute.
    _axes(draw, left, right, *flops_panel, [0.0, 0.5, 1.0], 1.0, lambda v: f"{v:.0%}", "FLOPs vs full model", small)
    f_top, f_bottom = flops_panel
    for i, step in enumerate(steps):
        x0 = column_x(len(setup) + i) + slot * 0.2
        ratio = min(step["flops_ratio"], 1.0)
        draw.rectangle((x0, f_bottom - (f_bottom - f_top) * ratio, max(x0, x0 + slot * 0.6 - 1), f_bottom), fill=FLOPS_COLOR)
    label_every = max(1, math.ceil((columns - len(setup)) / 16))
    for i in range(columns - len(setup)):
        if i % label_every == 0:
            label = str(i)
            x = column_x(len(setup) + i) + slot / 2 - draw.textlength(label, font=small) / 2
            draw.text((x, f_bottom + 3), label, fill=MUTED, font=small)
    draw.text((right - draw.textlength("sampling step", font=small), f_bottom + 17), "sampling step", fill=MUTED, font=small)
    return image


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
