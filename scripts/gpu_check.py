"""FLUX.1-dev-size check of every method on the hardware it runs on (driver of scripts/gpu_check.sh).

Random bf16 weights of FLUX.1-dev's shapes (hidden 3072, 24 heads, 19 double + 38 single blocks), 1024 px
(4096 image + 512 text tokens), euler/simple, cfg 1. Every case alone and combined, interleaved repeats
(A B C .. A B C ..), medians: model time (the executor's telemetry), FLOPs vs full, speedup, efficiency
(speedup / FLOPs reduction), per-step ms, peak memory (GPU: max allocated; CPU: peak RSS), weight bytes
the host's cast moved, host syncs per step caused by the pack (device reads and host-built tensors from
the pack's own code; on CUDA also every sync the run made, from torch.cuda.set_sync_debug_mode) and
kernels per step (CUDA: profiler; CPU: aten ops dispatched).

Sizes (environment): GPU_CHECK_TINY=1 a tiny model for a smoke test anywhere (seconds);
GPU_CHECK_PROXY=1 the CPU proxy (hidden 3072, 1 double + 2 single blocks, 4096 image tokens, bf16).
Other settings: STEPS, REPEATS, SIZE, CASES (space separated), OUT, GPU_CHECK_BUDGET_S, LOWVRAM_GB.
FAMILY=flux2 (with TINY or PROXY): Flux 2 instead, at the proxy Klein 4B's width (hidden 3072, 24 heads, SwiGLU
9216, 1 double + 2 single blocks, 128-channel latent at 1/16 of the image size: 4096 image tokens at 1024 px).
FAMILY=flux2_dev: the same at Flux 2 dev's width (hidden 6144, 48 heads, SwiGLU 18432, Mistral context 15360).
FAMILY=chroma: Chroma at its real width (hidden 3072, 24 heads, its 5120-wide 5-layer modulation network), 1 double
+ 2 single blocks. FAMILY=qwen_image: Qwen-Image at its real width (hidden 3072, 24 heads, MLP 12288, text encoder
width 3584), 3 of its 60 blocks. FAMILY=z_image: Z-Image at
its real width (hidden 3840, 30 heads, SwiGLU 10240, caption width 2560), 3 of its 30 layers and its 2 + 2 refiners.
FAMILY=sd3: SD3.5 Large's width (hidden 2432, 38 heads, MLP 9728, T5 4096 and pooled 2048), 3 of its 38 joint blocks.
FAMILY=pixart: PixArt-Σ's width (hidden 1152, 16 heads, MLP 4608, T5 4096), 3 of its 28 blocks (an EPS model: its
euler steps run on its discrete schedule).
Part `lowvram` (CUDA only) emulates a 16 GB card with ComfyUI's partial loading (--reserve-vram).
Part `memory` (CPU) runs every case in a fresh process of its own (2 steps, no warm-up), so that one
case's peak RSS does not carry the allocator's history of the cases before it.
Timing: every repeat runs the cases in a new random order (seeded), and the table gives the median and
the fastest repeat; on a shared CPU other jobs only ever slow a run down, so the fastest repeat is the
estimate least touched by them (`speedup (fastest)` compares fastest with fastest).
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import random
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from devtools import host  # noqa: E402  (standard library only)

PART = sys.argv[1] if len(sys.argv) > 1 else "main"
TINY = os.environ.get("GPU_CHECK_TINY") == "1"
PROXY = os.environ.get("GPU_CHECK_PROXY") == "1"

if PART == "memory":  # one fresh process per case; the parent only collects (CPU proxy / tiny sizes)
    import subprocess

    out_dir = Path(os.environ.get("OUT", ROOT / "out" / "gpu_check"))
    cases = os.environ.get("CASES", "unpatched off width:0.5 ramp:0.75-1.0 ramp:0.5-1.0 ramp:0.3-0.9 diffcr:0.5 "
                           "reuse:0.5 sdt:0.5 ddit:0-100%:2 ddit:0-60%:2;60-100%:1 width:0.75+reuse:0.7 "
                           "ddit:0-25%:2+ramp:0.5-1.0+reuse:0.5").split()
    peaks = {}
    for case in cases:
        env = dict(os.environ, CASES=f"{case}", REPEATS="1", STEPS=os.environ.get("MEMORY_STEPS", "2"), PROBES="0",
                   NO_WARMUP="1", OUT=str(out_dir / "memory_runs"))
        subprocess.run([sys.executable, __file__, "main"], env=env, check=True, stdout=subprocess.DEVNULL)
        row = json.loads((out_dir / "memory_runs" / "gpu_check_main.json").read_text())["rows"][0]
        peaks[case] = row["peak_gib"]
        print(f"[memory] {case}: peak RSS {peaks[case]:.2f} GiB", flush=True)
    base_peak = peaks.get("unpatched") or next(iter(peaks.values()))
    lines = ["| case | peak RSS GiB (own process) | vs unpatched |", "| --- | ---: | ---: |"]
    lines += [f"| {case} | {peak:.2f} | x{peak / base_peak:.3f} |" for case, peak in peaks.items()]
    (out_dir / "gpu_check_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0)

import torch  # noqa: E402

CUDA = torch.cuda.is_available() and not PROXY
host.prepare(cpu=not CUDA)
if PART == "lowvram" and CUDA:
    import comfy.cli_args

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    comfy.cli_args.args.reserve_vram = max(0.0, total - float(os.environ.get("LOWVRAM_GB", "16")))
host.load_pack()

import comfy.model_management  # noqa: E402

from comfyui_dynamic_dit.core import steps as step_tracking  # noqa: E402
from comfyui_dynamic_dit.devtools.bench import cases, report, workloads  # noqa: E402
from comfyui_dynamic_dit.demo import tiny_flux  # noqa: E402
from comfyui_dynamic_dit.demo import reference as reference_model  # noqa: E402
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings, plan_of  # noqa: E402
from comfyui_dynamic_dit.core.executor import RunContext  # noqa: E402
from comfyui_dynamic_dit.methods.width.settings import WidthSettings

if not CUDA:  # stand in for an accelerator: take the code path that never reads a sigma at call time
    step_tracking.FREE_READ_DEVICES = ()
OUT = Path(os.environ.get("OUT", ROOT / "out" / "gpu_check"))
OUT.mkdir(parents=True, exist_ok=True)
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "230"))  # no new repeat starts after this (s since start)
DEVICE = "cuda" if CUDA else "cpu"
PACK_DIRS = tuple(str(ROOT / folder) for folder in ("core", "families", "methods", "integration"))  # the runtime's code

if TINY:
    arch = dict(hidden_size=256, num_heads=4, depth=2, depth_single_blocks=4, context_dim=64, vec_dim=32)
    size, steps, text_tokens, repeats = 128, 3, 16, 1
elif PROXY:
    arch = dict(workloads.FLUX_DEV, depth=1, depth_single_blocks=2)
    size, steps, text_tokens, repeats = int(os.environ.get("SIZE", 1024)), int(os.environ.get("STEPS", 2)), 512, int(os.environ.get("REPEATS", 2))
else:
    arch = dict(workloads.FLUX_DEV)
    size, steps, text_tokens, repeats = int(os.environ.get("SIZE", 1024)), int(os.environ.get("STEPS", 28)), 512, int(os.environ.get("REPEATS", 3))
DEFAULT_CASES = ("unpatched off width:0.5 ramp:0.75-1.0 ramp:0.5-1.0 ramp:0.3-0.9 diffcr:0.5 reuse:0.5 sdt:0.5 "
                 "ddit:0-100%:2 ddit:0-60%:2;60-100%:1 width:0.75+reuse:0.7 ddit:0-25%:2+ramp:0.5-1.0+reuse:0.5")
FAMILY = os.environ.get("FAMILY", "flux")
# Other families (TINY or PROXY only): the devtools module that builds them, the proxy's sizes, the VAE's downscale
OTHER_FAMILIES = {
    "flux2": ("tiny_flux2", "TinyFlux2", dict(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=2, context_dim=7680, guidance=False), 16),
    "flux2_dev": ("tiny_flux2", "TinyFlux2", dict(hidden_size=6144, num_heads=48, depth=1, depth_single_blocks=2,
                                                  context_dim=15360, guidance=True), 16),
    "chroma": ("tiny_chroma", "TinyChroma", dict(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=2, context_dim=4096,
                                   modulation_hidden=5120, modulation_layers=5), 8),
    "qwen_image": ("tiny_qwen_image", "TinyQwenImage", dict(hidden_size=3072, num_heads=24, depth=3, context_dim=3584), 8),
    "z_image": ("tiny_z_image", "TinyZImage", dict(hidden_size=3840, num_heads=30, depth=3, refiner_depth=2, context_dim=2560), 8),
    "sd3": ("tiny_sd3", "TinySD3", dict(depth=38, blocks=3, mmdit_x_layers=(), context_dim=4096, pooled_dim=2048,
                                        position_grid=192), 8),
    "pixart": ("tiny_pixart", "TinyPixArt", dict(hidden_size=1152, num_heads=16, depth=3, caption_channels=4096), 8),
}
FAMILY_NAMES = {"flux": "", "flux2": "Flux 2, ", "flux2_dev": "Flux 2 dev, ", "chroma": "Chroma, ",
                "qwen_image": "Qwen-Image, ", "z_image": "Z-Image, ", "sd3": "SD3.5 Large, ",
                "pixart": "PixArt-Σ, "}
if FAMILY not in FAMILY_NAMES:
    sys.exit(f"FAMILY must be one of {', '.join(FAMILY_NAMES)}")
if FAMILY != "flux":
    if not (TINY or PROXY):
        sys.exit(f"FAMILY={FAMILY} runs with GPU_CHECK_TINY=1 or GPU_CHECK_PROXY=1 only")
    family_module, config_class, proxy_arch, vae_scale = OTHER_FAMILIES[FAMILY]
    arch = {} if TINY else proxy_arch
    if FAMILY == "pixart":
        size = max(size, 768)  # the host positions no latent below 48 px a side, nor its 2x grid (tiny_pixart.latent)
else:
    family_module, vae_scale = "tiny_flux", 8
if PART == "lowvram":
    DEFAULT_CASES = "unpatched off width:0.5 ramp:0.5-1.0"
    steps, repeats = (3 if TINY else int(os.environ.get("LOWVRAM_STEPS", 6))), 1
specs = (os.environ.get("CASES") if PART == "main" and os.environ.get("CASES") else DEFAULT_CASES).split()


# --- instruments --------------------------------------------------------------------------------------
class PackHostTraffic:
    """Counts device reads (.item/.tolist/.cpu/float()/bool()) and host-built tensors made by the pack's
    own code, from the sampler's first step callback to the end of the run (steady state)."""

    READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
    BUILDERS = ("tensor", "as_tensor")

    def __init__(self) -> None:
        self.active, self.count, self.sites = False, 0, collections.Counter()
        torch_dir = str(Path(torch.__file__).resolve().parent)

        def wrap(owner, name):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                if self.active:
                    frame = sys._getframe(1)
                    while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
                        frame = frame.f_back
                    if frame is not None and frame.f_code.co_filename.startswith(PACK_DIRS):
                        self.count += 1
                        self.sites[f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno} {name}"] += 1
                return original(*args, **kwargs)

            setattr(owner, name, counted)

        for name in self.READS:
            wrap(torch.Tensor, name)
        for name in self.BUILDERS:
            wrap(torch, name)
        callback, finish = RunContext.step_callback, RunContext.finish

        def step_callback(run, step, latent):
            callback(run, step, latent)
            self.active = True

        def finish_run(run):
            self.active = False
            return finish(run)

        RunContext.step_callback, RunContext.finish = step_callback, finish_run


TRAFFIC = PackHostTraffic()
MOVED = {"bytes": 0}
_cast_to = comfy.model_management.cast_to


def _counting_cast_to(weight, *args, **kwargs):
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        MOVED["bytes"] += weight.numel() * weight.element_size()
    return _cast_to(weight, *args, **kwargs)


comfy.model_management.cast_to = _counting_cast_to


class PeakRss:
    """Peak resident memory of this process while a run lasts (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self._process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


# --- model and cases ----------------------------------------------------------------------------------
t0 = time.perf_counter()
if FAMILY != "flux":
    family = importlib.import_module(f"comfyui_dynamic_dit.demo.{family_module}")
    config = getattr(family, config_class)(**arch)
    model = family.build_model(config, dtype=torch.bfloat16)
else:
    family = tiny_flux
    config = tiny_flux.TinyFlux(**arch)
    model = reference_model.build_model(config, dtype=torch.bfloat16, device=DEVICE if CUDA else None)
if PART == "lowvram" and CUDA:
    model.model.diffusion_model.to("cpu")  # let ComfyUI load what fits and stream the rest (partial load)
    model.model.device = torch.device("cpu")
    torch.cuda.empty_cache()
params = sum(p.numel() for p in model.model.diffusion_model.parameters())
print(f"[{PART}] built {params / 1e9:.2f}B params bf16 on {DEVICE} in {time.perf_counter() - t0:.1f}s", flush=True)
positive, negative = family.conditioning(config, text_tokens=text_tokens)
latent_size = size // vae_scale  # Flux 2: one token per latent pixel of a 16x VAE
sample_kw = dict(height=latent_size, width=latent_size, steps=steps, sampler="euler", scheduler="simple", cfg=1.0)
if FAMILY != "flux":  # the family's own latent layout (Qwen-Image: one frame of Wan 2.1's)
    sample_kw["latent"] = family.latent(latent_size, latent_size)


def case_of(text: str) -> cases.Case:
    """One case in the benchmark's --cases syntax, or 'ramp:<noisy>-<clean>' (the Width Patcher's ramps)."""
    if text.startswith("ramp:"):
        noisy, clean = (float(v) for v in text[5:].split("-"))
        return cases.Case(f"ramp {noisy}-{clean}", lambda m: apply_settings(m, WidthSettings(noisy_width=noisy, clean_width=clean)),
                          family="width")
    return cases.parse_cases(text)[0]


def build(spec: str):
    if spec == "unpatched":
        return model
    return cases.combine([case_of(p) for p in spec.split("+")]).build(model)


models = {s: build(s) for s in specs}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run_once(spec: str, n_steps: int | None = None) -> dict:
    m = models[spec]
    TRAFFIC.count, MOVED["bytes"] = 0, 0
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PeakRss() as rss, torch.inference_mode():
        tiny_flux.sample(m, positive, negative, seed=0, **{**sample_kw, "steps": n_steps or sample_kw["steps"]})
        sync()
    result = dict(wall=time.perf_counter() - start, rss=rss.peak, pack_syncs=TRAFFIC.count, moved=MOVED["bytes"])
    if CUDA:
        result["peak"] = torch.cuda.max_memory_allocated()
    plan = plan_of(m)
    if plan is not None:
        record = plan.telemetry.latest()
        result.update(model_s=record.model_seconds, executed=record.executed_flops, full=record.full_flops,
                      steps_ms=[round(s.seconds * 1e3, 2) for s in record.steps()], calls=len(record.calls),
                      methods=[s.methods for s in record.steps()][:3])
    return result


# --- A: warm-up, interleaved repeats ---------------------------------------------------------------------
for s in specs if os.environ.get("NO_WARMUP") != "1" else ():
    r = run_once(s, n_steps=1)
    print(f"[{PART}] warm-up {s}: {r['wall']:.2f}s", flush=True)
results: dict[str, list[dict]] = {s: [] for s in specs}
failed: dict[str, str] = {}
for rep in range(repeats):
    if rep and time.perf_counter() - T_START > BUDGET:
        print(f"[{PART}] time budget reached after {rep} repeats", flush=True)
        break
    order = list(specs)
    if rep:  # repeat 1 in the given order, later ones shuffled: drifting load spreads over every case
        random.Random(rep).shuffle(order)
    for s in order:
        if s in failed:
            continue
        try:
            results[s].append(run_once(s))
        except Exception as error:  # e.g. out of memory: keep the other cases
            failed[s] = f"{type(error).__name__}: {error}"[:300]
            traceback.print_exc()
            if CUDA:
                torch.cuda.empty_cache()
    print(f"[{PART}] repeat {rep + 1}: " + ", ".join(
        f"{s} {results[s][-1].get('model_s', results[s][-1]['wall']):.2f}s" for s in specs if results[s]), flush=True)

# --- B: all host syncs (CUDA) and kernels per case, 2 steps each -----------------------------------------
probes: dict[str, dict] = {}
if PART == "main" and os.environ.get("PROBES", "1") == "1":
    for s in specs:
        if s in failed or (time.perf_counter() - T_START > BUDGET + 90 and not TINY):
            continue
        entry: dict = {}
        try:
            if CUDA:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        run_once(s, n_steps=2)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                entry["all_syncs"] = sum(1 for w in caught if "synchroniz" in str(w.message))
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run_once(s, n_steps=2)
                entry["kernels"] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
            else:
                from torch.utils._python_dispatch import TorchDispatchMode

                class CountOps(TorchDispatchMode):
                    count = 0

                    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                        CountOps.count += 1
                        return func(*args, **(kwargs or {}))

                with CountOps():
                    run_once(s, n_steps=2)
                entry["kernels"] = CountOps.count
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"[:200]
        probes[s] = entry
        print(f"[{PART}] probe {s}: {entry}", flush=True)


# --- report ----------------------------------------------------------------------------------------------
def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def fmt(value, spec):
    return "-" if value is None or value != value else format(value, spec)


gib = 2**30
base = "off" if results.get("off") else specs[0]
base_full = results[base][0].get("full") if results[base] else None
base_model = med([r.get("model_s", r["wall"]) for r in results[base]])
base_fastest = min([r.get("model_s", r["wall"]) for r in results[base]], default=float("nan"))
unpatched_rss = med([r["rss"] for r in results.get("unpatched", [])])
unpatched_peak = med([r.get("peak") for r in results.get("unpatched", [])])
device_name = torch.cuda.get_device_name(0) if CUDA else f"CPU {report.machine()}"
block_counts = " + ".join(f"{count} {kind}" if kind != "block" else str(count) for kind, count in adapter_of(model).model_info().depths)
memory = "peak GPU GiB" if CUDA else "peak RSS GiB"
head = (f"| case | FLOPs vs full | FLOPs reduction | model time (median) | speedup | efficiency | model time (fastest) | "
        f"speedup (fastest) | efficiency (fastest) | median step ms | {memory} | "
        "memory vs unpatched | weight GiB cast per step | pack syncs per step | kernels per step | wall (median) |")
lines = [f"### {PART}: {'TINY ' if TINY else 'CPU proxy ' if PROXY else ''}{FAMILY_NAMES[FAMILY]}hidden {config.hidden_size}, "
         f"{block_counts} blocks, {size}px ({(size // 16) ** 2} image + "
         f"{text_tokens} text tokens), {steps} steps, bf16, {device_name}, torch {torch.__version__}", "", head,
         "|" + " --- |" * (head.count("|") - 1)]
rows = []
for s in specs:
    rs = results[s]
    if not rs:
        continue
    model_s = med([r.get("model_s", r["wall"]) for r in rs])
    flops = rs[0]["executed"] / base_full if "executed" in rs[0] and base_full else float("nan")
    reduction = 1 / flops if flops == flops and flops > 0 else float("nan")
    speedup = base_model / model_s
    fastest = min(r.get("model_s", r["wall"]) for r in rs)
    speedup_fastest = base_fastest / fastest
    peak = med([r.get("peak") if CUDA else r["rss"] for r in rs])
    versus = peak / (unpatched_peak if CUDA else unpatched_rss)
    run_steps = steps
    probe = probes.get(s, {})
    row = dict(case=s, flops=flops, reduction=reduction, model_s=model_s, speedup=speedup,
               efficiency=speedup / reduction if reduction == reduction else None, model_fastest_s=fastest,
               speedup_fastest=speedup_fastest,
               efficiency_fastest=speedup_fastest / reduction if reduction == reduction else None, steps_ms=rs[-1].get("steps_ms"),
               peak_gib=peak / gib, memory_vs_unpatched=versus, moved_gib_per_step=med([r["moved"] for r in rs]) / gib / run_steps,
               pack_syncs_per_step=med([r["pack_syncs"] for r in rs]) / max(run_steps - 1, 1), probes=probe,
               wall=med([r["wall"] for r in rs]), methods=rs[-1].get("methods"))
    rows.append(row)
    lines.append(
        f"| {s} | {fmt(flops, '.1%')} | x{fmt(reduction, '.2f')} | {model_s:.2f} s | x{speedup:.2f} | {fmt(row['efficiency'], '.2f')} | "
        f"{fastest:.2f} s | x{speedup_fastest:.2f} | {fmt(row['efficiency_fastest'], '.2f')} | "
        f"{fmt(med(row['steps_ms'] or []), '.0f')} | {row['peak_gib']:.2f} | x{versus:.3f} | {row['moved_gib_per_step']:.3f} | "
        f"{row['pack_syncs_per_step']:.0f} | {fmt(probe.get('kernels', float('nan')) / 2, '.0f')} | {row['wall']:.2f} s |")
for s, why in failed.items():
    lines.append(f"| {s} | FAILED: {why} |")
if results.get("unpatched") and results.get("off"):
    u, o = med([r["wall"] for r in results["unpatched"]]), med([r["wall"] for r in results["off"]])
    lines.append(f"\nEvery method off vs unpatched (sampling wall time): {o / u - 1:+.2%} (median).")
if CUDA:
    lines.append("\nAll host syncs per 2-step run (torch.cuda.set_sync_debug_mode, host included): " + "; ".join(
        f"{s} {p.get('all_syncs', '-')}" for s, p in probes.items()))
if TRAFFIC.sites:
    lines.append("\nPack sync sites: " + ", ".join(f"{k} x{v}" for k, v in TRAFFIC.sites.most_common(8)))
lines.append("\nPer-step model ms (last repeat): " + "; ".join(
    f"{r['case']}: " + " ".join(f"{v:.0f}" for v in r["steps_ms"]) for r in rows if r["steps_ms"]))
text = "\n".join(lines)
print(text, flush=True)
(OUT / f"gpu_check_{PART}.md").write_text(text + "\n")
(OUT / f"gpu_check_{PART}.json").write_text(json.dumps(dict(part=PART, tiny=TINY, proxy=PROXY, device=device_name,
                                                             params=params, size=size, steps=steps, rows=rows), indent=1, default=str))
print(f"[{PART}] done in {time.perf_counter() - T_START:.0f}s", flush=True)
