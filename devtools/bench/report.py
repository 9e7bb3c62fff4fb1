"""The benchmark's outputs: the markdown section, the Pareto plot, the contact sheet."""
from __future__ import annotations

import datetime
import math
import os
import platform
import textwrap
from pathlib import Path

from .runner import Report

# --- reports -------------------------------------------------------------------------------------
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu}"
    return f"{device}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def comfyui_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "unknown"


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear y at x over (x, y) points; NaN outside their range."""
    points = sorted(points)
    if not points or x < points[0][0] * 0.97 or x > points[-1][0] * 1.03:
        return math.nan
    if len(points) == 1 or x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else ("-" if math.isnan(value) else f"{value:.2f} dB")


COLUMNS = ("setting", "FLOPs vs full", "FLOPs reduction", "model time (median)", "speedup",
           "speedup / FLOPs reduction", "PSNR", "SSIM", "PSNR vs EasyCache at equal speedup", "sampling wall time",
           "model time (fastest)", "speedup (fastest)")


def markdown(report: Report, plot: str | None = None, images: str | None = None) -> str:
    """The run's BENCHMARKS.md section: machine, date, settings, the table, the overhead line, notes."""
    workload = report.workload
    easycache = [(report.speedup(r), r.psnr) for r in report.results if r.family == "EasyCache" and math.isfinite(r.psnr)]
    lines = [
        f"## {workload.title}",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {machine()} · ComfyUI {comfyui_version()}",
        "",
        f"{workload.settings}; median and fastest of {report.repeats} interleaved repeats ({report.seconds:.0f} s in all).",
        f"Fidelity: {workload.fidelity}." + ("" if workload.meaningful_fidelity else " Random weights: PSNR/SSIM only show whether outputs change, not quality."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * (len(COLUMNS) - 1),
    ]
    notes = []
    for r in [report.unpatched, *report.results]:
        if r.flops_ratio is None:
            flops = reduction = model_time = speedup = efficiency = fastest = fastest_speedup = "-"
        else:
            speed = report.speedup(r)
            flops, reduction = f"{r.flops_ratio:.1%}", f"x{r.flops_reduction:.2f}"
            model_time, speedup = f"{r.median_seconds * 1e3:.1f} ms", f"x{speed:.2f}"
            fastest, fastest_speedup = f"{r.fastest_seconds * 1e3:.1f} ms", f"x{report.fastest_speedup(r):.2f}"
            efficiency = f"{speed / r.flops_reduction:.2f}" if math.isfinite(r.flops_reduction) else "-"
        versus = "-"
        if r.family not in ("EasyCache", "full", "unpatched") and r.flops_ratio is not None and easycache:
            reference = _interpolate(easycache, report.speedup(r))
            if math.isfinite(reference):
                versus = "inf" if math.isinf(r.psnr) else f"{r.psnr - reference:+.2f} dB"
        ssim_text = "-" if math.isnan(r.ssim) else f"{r.ssim:.4f}"
        lines.append(f"| {r.case} | {flops} | {reduction} | {model_time} | {speedup} | {efficiency} | {_db(r.psnr)} "
                     f"| {ssim_text} | {versus} | {r.median_wall * 1e3:.1f} ms | {fastest} | {fastest_speedup} |")
        if r.family == "off" and r.flops_ratio is not None:
            notes.append(f"- **{r.case}** is the same configuration as full compute: its speedup of x{report.speedup(r):.2f} "
                         "is this machine's run-to-run noise, the yardstick for every other speedup in the table.")
        if r.identical and r.family not in ("full", "unpatched", "off"):
            notes.append(f"- **{r.case}**: no effect on this model (final latents bit-identical to full compute"
                         f"{', FLOPs unchanged' if r.flops_ratio == 1.0 else ''})" + (f": {r.note}." if r.note else "."))
    overhead, fastest = report.off_overhead, report.fastest_off_overhead
    lines += [
        "",
        f"Every method off vs the unpatched model: sampling wall time {overhead:+.1%} (median), {fastest:+.1%} "
        f"(fastest of {report.repeats}; target ≤ +2 %: {'met' if fastest <= 0.02 else 'not met'}); final latents "
        f"{'bit-identical' if report.unpatched.identical else 'DIFFERENT (a bug: off must mean identical)'}.",
    ]
    if notes:
        lines += ["", *notes]
    if plot:
        lines += ["", f"![speedup vs PSNR]({plot})"]
    if images:
        lines += ["", f"Final images, one row per setting: [{Path(images).name}]({images})"]
    return "\n".join(lines) + "\n"


BENCHMARKS_HEADER = """# Benchmarks

Written by `python -m devtools.bench ... --markdown BENCHMARKS.md` (one section
per run, newest last). Columns:

- **FLOPs vs full / FLOPs reduction**: matmul FLOPs the model executed (executor telemetry, analytic,
  within 2 % of `FlopCounterMode`) over what full compute executed for the same jobs (a cache that
  skips whole model calls counts as skipping them).
- **model time (median)**: summed diffusion-model call times of one run, median over interleaved
  repeats; **speedup** against the full-compute baseline of the same process run.
- **speedup / FLOPs reduction**: how much of the FLOPs saving turns into time (target ≥ 0.85 on a GPU
  at full size).
- **PSNR / SSIM**: of the final images against full compute (same seeds and conditioning). PSNR is
  pooled over the jobs, `inf` = identical.
- **PSNR vs EasyCache at equal speedup**: this setting's PSNR minus EasyCache's, interpolated at the
  same speedup (target ≥ 0 at 2x).
- **sampling wall time**: the whole sampling call; the unpatched model's row gives the overhead of the
  executor with every method off (target ≤ 2 %).
- **model time (fastest) / speedup (fastest)**: the same from the fastest repeat of each setting; on a
  shared machine other jobs only ever add time, so these are the steadier numbers there.
"""


def append_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else BENCHMARKS_HEADER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n\n" + section)


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def pareto_plot(report: Report, path: Path, width: int = 960, height: int = 640) -> Path:
    """Speedup (x) vs PSNR (y) of every case, one colour per method, the Pareto front as a line."""
    from PIL import Image, ImageDraw, ImageFont

    points = [(report.speedup(r), r.psnr, r) for r in report.results if r.flops_ratio is not None]
    finite = [p for _, p, _ in points if math.isfinite(p)]
    top = (max(finite) + 5) if finite else 60.0
    bottom = max(0.0, min(finite) - 3) if finite else 0.0
    top = max(top, bottom + 10)
    xs = [s for s, _, _ in points if math.isfinite(s)]
    x_low, x_high = min([1.0, *xs]) * 0.9, max([1.0, *xs]) * 1.1
    left, right, upper, lower = 80, width - 220, 50, height - 60
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def to_px(speed: float, value: float) -> tuple[float, float]:
        value = top if math.isinf(value) else value
        x = left + (speed - x_low) / (x_high - x_low) * (right - left)
        y = lower - (value - bottom) / (top - bottom) * (lower - upper)
        return x, y

    draw.rectangle([left, upper, right, lower], outline="black")
    for i in range(6):
        speed = x_low + (x_high - x_low) * i / 5
        value = bottom + (top - bottom) * i / 5
        x, _ = to_px(speed, bottom)
        _, y = to_px(x_low, value)
        draw.line([x, lower, x, lower + 5], fill="black")
        draw.text((x, lower + 8), f"x{speed:.2f}", fill="black", font=small, anchor="mt")
        draw.line([left - 5, y, left, y], fill="black")
        infinite_row = i == 5 and any(math.isinf(v) for _, v, _ in points)
        draw.text((left - 8, y), "inf" if infinite_row else f"{value:.0f}", fill="black", font=small, anchor="rm")
    draw.text(((left + right) / 2, height - 22), "model-time speedup vs full compute", fill="black", font=font, anchor="mm")
    draw.text((18, (upper + lower) / 2), "PSNR dB", fill="black", font=font, anchor="lm")
    draw.text((left, 18), f"{report.workload.title}: speed vs fidelity (identical output = inf, at the top)", fill="black", font=font)
    front, best = [], -math.inf
    for speed, value, _ in sorted(points, key=lambda p: -p[0]):
        if value > best:
            best = value
            front.append(to_px(speed, value))
    if len(front) > 1:
        draw.line(sorted(front), fill=(180, 180, 180), width=2)
    families = list(dict.fromkeys(r.family for _, _, r in points))
    for speed, value, result in points:
        colour = _PALETTE[families.index(result.family) % len(_PALETTE)]
        x, y = to_px(speed, value)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour, outline="black")
        label = "full" if result.family == "full" else result.case
        if label.startswith(result.family + " "):
            label = label[len(result.family) + 1:]  # the legend names the method
        draw.text((x + 7, y - 7), _drawable(label), fill=colour, font=small)
    for i, family in enumerate(families):
        colour = _PALETTE[i % len(_PALETTE)]
        y = upper + 10 + i * 20
        draw.ellipse([right + 20, y - 5, right + 30, y + 5], fill=colour, outline="black")
        draw.text((right + 38, y), family, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


# PIL's default font has no Greek letters: spelled out in the images (the markdown keeps the symbols).
_SPELLED = {"τ": "tau", "Δ": "delta ", "→": "->"}


def _drawable(text: str, width: int | None = None) -> str:
    """Text PIL's default font can draw, wrapped at `width` characters per line when given."""
    for symbol, spelled in _SPELLED.items():
        text = text.replace(symbol, spelled)
    return "\n".join(textwrap.wrap(text, width)) if width else text


def contact_sheet(report: Report, path: Path, tile: int = 160, max_jobs: int = 6) -> Path:
    """The final images, one row per setting (labelled), one column per job."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in [*report.results, report.unpatched] if r.images is not None]
    jobs = min(max_jobs, len(report.workload.jobs))
    label_width = 260
    height, width = rows[0].images.shape[-2:] if rows else (1, 1)
    tile_width = max(1, round(tile * width / height))  # a video's frames side by side keep their aspect
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (label_width + jobs * tile_width, len(rows) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, result in enumerate(rows):
        psnr_text = _db(result.psnr)
        draw.text((8, row * tile + tile / 2), f"{_drawable(result.case, 34)}\n{psnr_text}", fill="black", font=font, anchor="lm")
        for column in range(jobs):
            array = (result.images[column].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            picture = Image.fromarray(array)
            resample = Image.Resampling.NEAREST if picture.width < tile_width else Image.Resampling.LANCZOS
            sheet.paste(picture.resize((tile_width, tile), resample), (label_width + column * tile_width, row * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path
