"""A per-step speed chart of a run, drawn with Pillow (which ComfyUI already ships)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .telemetry import RunRecord

BACKGROUND = (24, 26, 31)
GRID = (58, 62, 70)
TEXT = (225, 228, 232)
MUTED = (150, 156, 166)
RUN_COLOR = (86, 182, 255)
FULL_COLOR = (120, 124, 132)
FLOPS_COLOR = (255, 170, 60)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def render_chart(run: RunRecord, baseline: RunRecord | None = None, width: int = 960, height: int = 540) -> Image.Image:
    """Two panels over the sampling steps: FLOPs executed (% of full) and model time per step."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title, small = _font(18), _font(13)
    draw.text((16, 10), "Dynamic DiT - per-step speed", fill=TEXT, font=title)
    draw.text((16, 34), run.summary(baseline), fill=MUTED, font=small)

    steps = run.steps()
    base_steps = baseline.steps() if baseline is not None else None
    if not steps:
        draw.text((16, 70), "no model calls recorded", fill=TEXT, font=small)
        return image

    left, right = 70, width - 20
    panels = ((64, (height - 64) // 2 + 32), ((height - 64) // 2 + 64, height - 36))
    slot = (right - left) / len(steps)

    # Panel 1: FLOPs executed as a share of the unpatched model's FLOPs.
    top, bottom = panels[0]
    _axes(draw, left, right, top, bottom, 1.0, "FLOPs vs full", lambda v: f"{v:.0%}", small)
    for i, step in enumerate(steps):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y = bottom - (bottom - top) * min(step.flops_ratio, 1.0)
        draw.rectangle((x0, y, x1, bottom), fill=FLOPS_COLOR)

    # Panel 2: model time per step, this run next to the full-compute run when there is one.
    top, bottom = panels[1]
    times = [s.seconds * 1e3 for s in steps]
    base_times = [s.seconds * 1e3 for s in base_steps] if base_steps is not None else []
    peak = max(times + base_times + [1e-6])
    _axes(draw, left, right, top, bottom, peak, "model ms per step", lambda v: f"{v:.0f}", small)
    bars = 2 if base_steps is not None else 1
    for i, ms in enumerate(times):
        width_each = slot * 0.7 / bars
        x0 = left + i * slot + slot * 0.15
        if base_steps is not None:
            y = bottom - (bottom - top) * base_times[i] / peak
            draw.rectangle((x0, y, x0 + width_each - 1, bottom), fill=FULL_COLOR)
            x0 += width_each
        y = bottom - (bottom - top) * ms / peak
        draw.rectangle((x0, y, x0 + width_each - 1, bottom), fill=RUN_COLOR)
    label_every = max(1, len(steps) // 20)
    for i, step in enumerate(steps):
        if i % label_every == 0:
            draw.text((left + i * slot + slot * 0.3, bottom + 4), str(step.step if step.step is not None else i), fill=MUTED, font=small)
    legend = [(RUN_COLOR, "dynamic")] + ([(FULL_COLOR, "full compute")] if base_steps is not None else [])
    x = right - 220
    for color, name in legend:
        draw.rectangle((x, top - 14, x + 10, top - 4), fill=color)
        draw.text((x + 14, top - 17), name, fill=TEXT, font=small)
        x += 110
    return image


def _axes(draw: ImageDraw.ImageDraw, left: float, right: float, top: float, bottom: float, peak: float, label: str, fmt, font) -> None:
    draw.text((left, top - 18), label, fill=TEXT, font=font)
    for fraction in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * fraction
        draw.line((left, y, right, y), fill=GRID)
        draw.text((8, y - 7), fmt(peak * fraction), fill=MUTED, font=font)
