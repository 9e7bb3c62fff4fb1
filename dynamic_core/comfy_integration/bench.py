"""Speed and fidelity of dynamic settings side by side with ComfyUI's own accelerators, in one process.

    python -m dynamic_core.comfy_integration.bench                       # the reference model, every case
    python -m dynamic_core.comfy_integration.bench --cases off,easycache:0.1,0.2,tome:0.5 --repeats 5
    python -m dynamic_core.comfy_integration.bench --model flux1-dev.safetensors --positive cat.safetensors \\
        --vae ae.safetensors                                              # your own checkpoint
    python -m dynamic_core.comfy_integration.bench --full-size-random    # FLUX.1-dev size, timing only

Models: the committed reference model (a small Flux trained on photographs; fidelity is meaningful),
`--model PATH` (a real checkpoint through ComfyUI's own loader, with conditioning files written by
the "Save Conditioning for Benchmark" node), `--full-size-random` (FLUX.1-dev-sized random bf16
weights on a GPU, 1024 px, 28 steps; a reduced size on the CPU) or `--random` (a tiny random Flux).

Cases (`--cases`, comma separated): `off`, `easycache:0.1`, `tome:0.5`, ... A bare value repeats the
case before it with another setting (`easycache:0.05,0.1,0.2`); `+` combines methods on one model
(`width:0.5+diffcr:0.7`; settings of a combination multiply out); `all` is every case at its sweep
settings plus the registered combinations.

Every case samples the same jobs (conditioning x seed) with the same sampler; runs of all cases
interleave (repeat 1 of every case, then repeat 2, ...) so machine noise spreads evenly. Per case:
FLOPs executed vs the unpatched model (executor telemetry), model time (median over repeats of the
summed diffusion-model call times, synchronised on CUDA) and its speedup against the full-compute
baseline of the same process, PSNR and SSIM of the final images against full compute, and the wall
time of the sampling calls. The unpatched model (no executor at all) runs too, for the overhead of
"every method off". Output: a markdown section (stdout, `--markdown FILE` appends it), a Pareto plot
PNG (speedup vs PSNR) and a contact sheet of the final images.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import host


# --- cases ---------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    build: Callable[[Any], Any]  # model patcher -> patched model carrying the executor
    family: str = ""  # groups settings of one method (plot colour, EasyCache comparison); default: first word of name
    note: str = ""  # why a case may have no effect on a model, shown when it turns out to have none

    def __post_init__(self) -> None:
        if not self.family:
            self.family = self.name.split()[0] if self.name else "case"


def _off(model):
    from .patching import install_executor

    return install_executor(model)


def _number(arg: str | None, default: float, what: str, low: float, high: float) -> float:
    if arg is None or arg == "":
        return default
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"{what}: '{arg}' is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {value}")
    return value


COPY_INPUT_KEY = "dynamic_dit.bench.copy_input"


def _copy_input(executor, x, *args, **kwargs):
    """Hands the model a copy of its input x. ComfyUI's EasyCache adds its cached difference into x in place
    (`x += diff`); on a float32 model that x is the sampler's own tensor, which flow models later use for the
    denoised output, so every skipped step corrupts the image (8.8 dB where bf16 users get ~22 dB). bf16 and
    fp16 users never see this: their x is cast to a new tensor first. The benchmark compares with EasyCache
    as those users get it."""
    return executor(x.clone(), *args, **kwargs)


def _easycache(threshold: float, lazy: bool = False) -> Callable[[Any], Any]:
    def build(model):
        from comfy.patcher_extension import WrappersMP
        from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

        from .patching import node_output

        if lazy:  # LazyCache computes x + diff out of place
            return _off(node_output(LazyCacheNode.execute(model, threshold, 0.15, 0.95, False)))
        copying = model.clone()
        copying.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, COPY_INPUT_KEY, _copy_input)  # outside EasyCache's wrapper
        return _off(node_output(EasyCacheNode.execute(copying, threshold, 0.15, 0.95, False)))

    return build


def _trained(arg: str | None) -> Case:
    """`trained:<stem>`: the files `python -m dynamic_core.train` wrote (<stem>.width / .td_lora.safetensors)."""
    if not arg:
        raise ValueError("trained: give the output stem of a training run, e.g. trained:reference/trained/flux_photo_reference_t50")
    stem = Path(arg)
    width, lora = Path(f"{stem}.width.safetensors"), Path(f"{stem}.td_lora.safetensors")
    if not width.is_file() and not lora.is_file():
        raise ValueError(f"trained: neither {width} nor {lora} exists")

    def build(model):
        from ..fingerprint import check_fingerprint
        from ..files import header_metadata
        from ..methods.td_lora import load_td_lora_file
        from ..methods.width import WidthSettings, load_width_router
        from .patching import apply_settings, diffusion_model_of, install_executor
        from .td_lora_files import apply_td_lora

        patched = install_executor(model)
        if width.is_file():
            check_fingerprint(header_metadata(width), diffusion_model_of(model), width.name)
            patched = apply_settings(patched, WidthSettings(router=load_width_router(width)))
        if lora.is_file():
            check_fingerprint(header_metadata(lora), diffusion_model_of(model), lora.name)
            patched = apply_td_lora(patched, load_td_lora_file(lora), 1.0)
        return patched

    parts = [p for p, f in (("width router", width), ("TD-LoRA", lora)) if f.is_file()]
    return Case(f"trained {stem.name} ({' + '.join(parts)})", build, family="trained")


def _tome(ratio: float) -> Callable[[Any], Any]:
    def build(model):
        from comfy_extras.nodes_tomesd import TomePatchModel

        from .patching import node_output

        return _off(node_output(TomePatchModel.execute(model, ratio)))

    return build


def _td_lora(arg: str | None) -> Case:
    """A random TD-LoRA on every block linear: K experts (default 3) of rank r (default 16), e.g. 'tdlora:4/32'."""
    experts_text, _, rank_text = (arg or "3").partition("/")
    experts, rank = int(experts_text), int(rank_text or 16)

    def build(model):
        from ..methods.td_lora import architecture_metadata, block_linear_shapes, parse_td_lora, random_td_lora, td_lora_state_dict
        from .patching import adapter_of
        from .td_lora_files import apply_td_lora

        adapter = adapter_of(model)
        layers, gate = random_td_lora(block_linear_shapes(adapter, model.model.diffusion_model), experts, rank)
        tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter), gate)
        return apply_td_lora(model, parse_td_lora(tensors, metadata, f"random-K{experts}-r{rank}"), 1.0)

    # A random TD-LoRA changes the model on purpose: the case measures the bypass's cost, and its PSNR
    # only says how far the random experts moved the images.
    return Case(f"TD-LoRA K={experts} rank {rank} (random experts: cost only)", build, family="TD-LoRA")


def _token_router(mode: str, keep: float) -> Callable[[Any], Any]:
    def build(model):
        from ..methods.token_router import TokenRouterSettings
        from .patching import apply_settings

        return apply_settings(
            model, TokenRouterSettings(mode=mode, keep_start=keep, keep_end=keep, first_full=0, last_full=0, score="update")
        )

    return build


def _width(fraction: float) -> Callable[[Any], Any]:
    """Constant width (heads and MLP) over the whole schedule, training-free ranking."""

    def build(model):
        from ..methods.width import WidthSettings
        from .patching import apply_settings

        return apply_settings(model, WidthSettings(noisy_width=fraction, clean_width=fraction))

    return build


def _width_ramp(arg: str | None) -> Case:
    """`ramp:<noisy>-<clean>`: the Width Patcher's linear ramp over the run (its presets: 0.75-1.0, 0.5-1.0, 0.3-0.9)."""
    text = arg or "0.5-1.0"
    try:
        noisy, clean = (float(v) for v in text.split("-"))
    except ValueError:
        raise ValueError(f"ramp: expected <noisy>-<clean> widths such as 0.5-1.0, got '{text}'") from None

    def build(model):
        from ..methods.width import WidthSettings
        from .patching import apply_settings

        return apply_settings(model, WidthSettings(noisy_width=noisy, clean_width=clean))

    return Case(f"width ramp {noisy:g}-{clean:g}", build, family="width ramp")


def _router_node(arg: str | None) -> Case:
    """`router:<mode>:<keep>`: the Token Router node's own defaults (first/last 2 blocks full, input-change score)."""
    mode, _, keep_text = (arg or "reuse:0.5").partition(":")
    keep = _number(keep_text or None, 0.5, "Token Router keep ratio", 0.0, 1.0)

    def build(model):
        from ..methods.token_router import TokenRouterSettings
        from .patching import apply_settings

        return apply_settings(model, TokenRouterSettings(mode=mode, keep_start=keep, keep_end=keep))

    return Case(f"router {mode} keep {keep:g} (node defaults)", build, family=f"router {mode}")


def _token_router_case(mode: str) -> Callable[[str | None], Case]:
    def case(arg: str | None) -> Case:
        keep = _number(arg, 0.5, f"Token Router {mode} keep ratio", 0.0, 1.0)
        return Case(f"{mode} keep {keep:g}", _token_router(mode, keep), family=mode)

    return case


def _patch_scheduler(**settings: Any) -> Callable[[Any], Any]:
    def build(model):
        from ..methods.patch_scheduler import PatchSchedulerSettings
        from .patching import apply_settings

        return apply_settings(model, PatchSchedulerSettings(**settings))

    return build


def _ddit_manual(arg: str | None) -> Case:
    """`ddit:0-40%:4;40-70%:2` (ranges separated by ';', since ',' separates cases)."""
    from ..methods.patch_scheduler import parse_schedule

    schedule = parse_schedule(arg or "0-40%:4;40-70%:2;70-100%:1")
    return Case(f"DDiT manual {', '.join(r.describe() for r in schedule)}", _patch_scheduler(mode="manual", schedule=schedule),
                family="DDiT manual")


def _ddit_auto(arg: str | None) -> Case:
    """`ddit-auto:<tau>` or `ddit-auto:<tau>/<max patch factor>` (relative tau), the node's other defaults."""
    from ..methods.patch_scheduler import PatchSchedulerSettings

    defaults = PatchSchedulerSettings()
    tau_text, _, factor_text = (arg or "").partition("/")
    tau = _number(tau_text or None, defaults.tau, "DDiT auto tau", 0.0, 1e6)
    factor = int(_number(factor_text or None, defaults.max_factor, "DDiT auto max patch factor", 2, 4))
    if factor not in (2, 4):
        raise ValueError(f"DDiT auto max patch factor must be 2 or 4, not {factor_text}")
    return Case(f"DDiT auto τ {tau:g} up to {factor}x", _patch_scheduler(mode="auto", tau=tau, max_factor=factor),
                family="DDiT auto")


TOME_NOTE = (
    "ComfyUI's TomePatchModel merges tokens through the UNet `attn1` patch points, which Flux's blocks never call"
)

# name -> builder(setting string or None) -> Case; methods add theirs as they land
CASE_BUILDERS: dict[str, Callable[[str | None], Case]] = {
    "off": lambda arg: Case("every method off", _off, family="off"),
    "easycache": lambda arg: Case(
        f"EasyCache {_number(arg, 0.2, 'EasyCache reuse threshold', 0.0, 3.0):g} (copied input)",
        _easycache(_number(arg, 0.2, "EasyCache reuse threshold", 0.0, 3.0)),
        family="EasyCache",
    ),
    "lazycache": lambda arg: Case(
        f"LazyCache {_number(arg, 0.2, 'LazyCache reuse threshold', 0.0, 3.0):g}",
        _easycache(_number(arg, 0.2, "LazyCache reuse threshold", 0.0, 3.0), lazy=True),
        family="LazyCache",
    ),
    "tome": lambda arg: Case(
        f"ToMe {_number(arg, 0.3, 'ToMe ratio', 0.0, 1.0):g}",
        _tome(_number(arg, 0.3, "ToMe ratio", 0.0, 1.0)),
        family="ToMe",
        note=TOME_NOTE,
    ),
    "width": lambda arg: Case(f"width {_number(arg, 0.5, 'width', 0.05, 1.0):g}",
                              _width(_number(arg, 0.5, "width", 0.05, 1.0)), family="width"),
    "diffcr": _token_router_case("diffcr"),
    "sdt": _token_router_case("sdt"),
    "reuse": _token_router_case("reuse"),
    "ddit": _ddit_manual,
    "ddit-auto": _ddit_auto,
    "tdlora": _td_lora,
    "ramp": _width_ramp,
    "router": _router_node,
    "trained": _trained,
}

# name -> the settings `--cases all` runs (a builder without an entry runs once at its default)
SWEEPS: dict[str, tuple[str, ...]] = {
    "easycache": ("0.05", "0.1", "0.2", "0.4"),
    "lazycache": ("0.1", "0.2", "0.4"),
    "tome": ("0.3", "0.5", "0.7"),
    "width": ("0.75", "0.5", "0.35"),
    "diffcr": ("0.7", "0.5", "0.3"),
    "sdt": ("0.5",),
    "reuse": ("0.7", "0.5", "0.3"),
    "ddit": ("0-40%:4;40-70%:2;70-100%:1", "0-60%:2;60-100%:1"),
    "ddit-auto": ("2", "5", "5/4"),
    "tdlora": ("1", "3"),
}

# useful combinations `--cases all` adds, in the --cases syntax (e.g. "width:0.5+diffcr:0.7")
COMBINATIONS: list[str] = ["width:0.75+reuse:0.7", "ddit:0-60%:2;60-100%:1+width:0.75", "easycache:0.1+width:0.75"]


def combine(parts: Sequence[Case]) -> Case:
    """One case applying several cases' builders in turn (each composes on the clone the previous made)."""
    if len(parts) == 1:
        return parts[0]

    def build(model):
        for part in parts:
            model = part.build(model)
        return model

    return Case(" + ".join(p.name for p in parts), build, family="+".join(p.family for p in parts),
                note="; ".join(p.note for p in parts if p.note))


def _all_cases_spec() -> list[str]:
    specs = ["off"]
    for name in CASE_BUILDERS:
        if name in ("off", "trained"):  # trained needs the path of a training run
            continue
        settings = SWEEPS.get(name)
        specs.extend([f"{name}:{setting}" for setting in settings] if settings else [name])  # settings may hold ':'
    return specs + list(COMBINATIONS)


def parse_cases(spec: str | Sequence[str]) -> list[Case]:
    """Cases from the --cases syntax (see the module docstring); raises ValueError naming what is wrong."""
    text = spec if isinstance(spec, str) else ",".join(spec)
    items: list[list[tuple[str, list[str | None]]]] = []  # combinations of (method, settings)
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    while tokens:
        token = tokens.pop(0)
        if token == "all":
            tokens[:0] = [t.strip() for t in ",".join(_all_cases_spec()).split(",") if t.strip()]
            continue
        head = token.split("+")[0].partition(":")[0].strip()
        if head in CASE_BUILDERS:
            members = []
            for part in token.split("+"):
                name, has_setting, setting = (x.strip() for x in part.partition(":"))
                if name not in CASE_BUILDERS:
                    raise ValueError(f"unknown case '{name}' in '{token}'; known: {', '.join(CASE_BUILDERS)}")
                members.append((name, [setting if has_setting else None]))
            items.append(members)
        elif items and ":" not in token and "+" not in token:
            items[-1][-1][1].append(token)  # another setting of the previous case (its last method)
        else:
            raise ValueError(f"unknown case '{head}'; known: {', '.join(CASE_BUILDERS)}, all")
    cases: list[Case] = []
    seen: set[str] = set()
    for members in items:
        for choice in itertools.product(*[[(name, s) for s in settings] for name, settings in members]):
            case = combine([CASE_BUILDERS[name](setting) for name, setting in choice])
            if case.name not in seen:
                seen.add(case.name)
                cases.append(case)
    return cases


# --- fidelity ------------------------------------------------------------------------------------
def psnr(reference, other, peak: float = 1.0) -> float:
    """PSNR in dB of images in [0, peak] (infinite when identical), pooled over the whole batch."""
    mse = float(((reference.double() - other.double()) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak**2 / mse)


def ssim(reference, other, peak: float = 1.0) -> float:
    """Mean SSIM of (B, C, H, W) images (Gaussian window sigma 1.5, 11 px; Wang et al. 2004 constants).

    Matches scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`:
    statistics per channel with reflected borders, averaged over the interior.
    """
    import torch
    import torch.nn.functional as F

    x, y = reference.double(), other.double()
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two (B, C, H, W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    radius, sigma = 5, 1.5
    if min(x.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"SSIM needs images of at least {2 * radius + 1} px, got {tuple(x.shape[-2:])}")
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.device)
    channels = x.shape[1]

    def blur(t):
        t = F.pad(t, (radius, radius, radius, radius), mode="reflect")
        t = F.conv2d(t, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(t, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s[..., radius:-radius, radius:-radius].mean())


def latent_preview(latent_format) -> Callable:
    """ComfyUI's own linear latent -> RGB preview of a latent format (no VAE): approximate images."""
    import torch

    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)  # (C, 3)
    bias = getattr(latent_format, "latent_rgb_factors_bias", None)
    bias = torch.tensor(bias, dtype=torch.float32) if bias is not None else torch.zeros(3)

    def to_image(latent):
        x = latent_format.process_in(latent.float())
        rgb = torch.einsum("bchw,cr->brhw", x, factors) + bias.view(1, 3, 1, 1)
        return ((rgb + 1) / 2).clamp(0, 1)

    return to_image


# --- conditioning files (for --model) ------------------------------------------------------------
CONDITIONING_FORMAT = "dynamic_dit.conditioning"
CONDITIONING_VERSION = "1"


def save_conditioning(path: str | Path, conditioning: list, guidance: float | None = None) -> Path:
    """Write the first entry of a ComfyUI CONDITIONING (text embedding, pooled output, guidance) to safetensors."""
    from safetensors.torch import save_file

    if not conditioning or len(conditioning[0]) != 2:
        raise ValueError("expected a ComfyUI CONDITIONING (a list of [embedding, options]) with at least one entry")
    context, options = conditioning[0]
    tensors = {"context": context.detach().float().cpu().contiguous()}
    if options.get("pooled_output") is not None:
        tensors["pooled_output"] = options["pooled_output"].detach().float().cpu().contiguous()
    guidance = options.get("guidance") if guidance is None else guidance
    metadata = {"format": CONDITIONING_FORMAT, "version": CONDITIONING_VERSION}
    if guidance is not None:
        metadata["guidance"] = repr(float(guidance))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def save_conditioning_to_output(conditioning: list, filename_prefix: str) -> Path:
    """save_conditioning into ComfyUI's output folder, numbered like its image saves."""
    import folder_paths

    output = folder_paths.get_output_directory()
    folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, output)
    return save_conditioning(Path(folder) / f"{name}_{counter:05}_.safetensors", conditioning)


def load_conditioning(path: str | Path, context_dim: int | None = None, vec_dim: int | None = None) -> list:
    """A ComfyUI CONDITIONING from a file of save_conditioning, checked against the model's input sizes."""
    from ..files import read_safetensors

    path = Path(path)
    tensors, metadata = read_safetensors(path, f"Conditioning file '{path.name}'")
    if metadata.get("format") != CONDITIONING_FORMAT or metadata.get("version") != CONDITIONING_VERSION:
        raise ValueError(f"{path}: not a conditioning file of version {CONDITIONING_VERSION} "
                         f"(format {metadata.get('format')!r}, version {metadata.get('version')!r}); "
                         "write one with the 'Save Conditioning for Benchmark' node")
    context = tensors.get("context")
    if context is None or context.ndim != 3:
        raise ValueError(f"{path}: 'context' must be a (1, tokens, dim) tensor, found {None if context is None else tuple(context.shape)}")
    if context_dim is not None and context.shape[-1] != context_dim:
        raise ValueError(f"{path}: the text embedding has width {context.shape[-1]}, this model expects {context_dim} "
                         "(conditioning from another model's text encoder?)")
    options: dict[str, Any] = {}
    pooled = tensors.get("pooled_output")
    if vec_dim is not None:
        if pooled is None:
            raise ValueError(f"{path}: this model needs a pooled output of width {vec_dim}, the file has none")
        if pooled.shape[-1] != vec_dim:
            raise ValueError(f"{path}: the pooled output has width {pooled.shape[-1]}, this model expects {vec_dim}")
    if pooled is not None:
        options["pooled_output"] = pooled
    if "guidance" in metadata:
        options["guidance"] = float(metadata["guidance"])
    return [[context, options]]


# --- workloads -----------------------------------------------------------------------------------
@dataclass
class Job:
    label: str
    positive: list
    negative: list
    seed: int


@dataclass
class Workload:
    """What every case samples: the unpatched model, the jobs, the sampler settings, how to get images."""

    model: Any
    jobs: list[Job]
    sample: dict  # keyword arguments of tiny_flux.sample: height, width (latent), steps, sampler, scheduler, cfg
    to_image: Callable  # final latent -> (B, 3, H, W) RGB in [0, 1]
    title: str
    settings: str  # one line: model, size, steps, sampler, cfg, jobs
    fidelity: str  # how the compared images are made
    meaningful_fidelity: bool = True


@dataclass
class Result:
    case: str
    family: str
    flops_ratio: float | None = None  # executed / full (None: no executor, the unpatched model)
    seconds: list[float] = field(default_factory=list)  # model time per repeat (telemetry)
    wall: list[float] = field(default_factory=list)  # wall time of the sampling calls per repeat
    psnr: float = math.inf
    ssim: float = 1.0
    identical: bool = True  # every final latent bit-identical to full compute
    note: str = ""
    images: Any = None  # final images of the first repeat, (jobs, 3, H, W)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def flops_reduction(self) -> float:
        if self.flops_ratio is None:
            return math.nan
        return 1 / self.flops_ratio if self.flops_ratio > 0 else math.inf


@dataclass
class Report:
    workload: Workload
    unpatched: Result
    results: list[Result]  # the full-compute baseline first
    repeats: int
    seconds: float

    @property
    def baseline(self) -> Result:
        return self.results[0]

    def speedup(self, result: Result) -> float:
        return self.baseline.median_seconds / result.median_seconds if result.median_seconds > 0 else math.inf

    @property
    def off_overhead(self) -> float:
        """Wall time of the sampling call with every method off, relative to the unpatched model (0.01 = 1 %)."""
        return self.baseline.median_wall / self.unpatched.median_wall - 1

    @property
    def fastest_off_overhead(self) -> float:
        """The same from the fastest repeat of each: on a shared machine noise only ever adds time, so the
        minimum is the steadier estimate of a small overhead."""
        return min(self.baseline.wall) / min(self.unpatched.wall) - 1


def run_cases(workload: Workload, cases: list[Case], repeats: int, log: Callable[[str], None] = print,
              warm_up: bool = True) -> Report:
    """Sample every case `repeats` times (interleaved) and measure speed and fidelity against full compute."""
    import torch

    from .patching import plan_of
    from .tiny_flux import sample as sample_model

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    baseline = Case("full compute (every method off)", _off, family="full")
    unpatched = Case("unpatched model (no executor)", lambda model: model, family="unpatched")
    entries = [baseline, unpatched, *cases]  # the baseline first: the others compare against its latents
    models = {case.name: case.build(workload.model) for case in entries}
    results = {case.name: Result(case.name, case.family, note=case.note) for case in entries}
    started = time.perf_counter()
    with torch.no_grad():
        for case in entries if warm_up else ():  # allocations, kernels, lazy loads: not measured
            job = workload.jobs[0]
            sample_model(models[case.name], job.positive, job.negative, seed=job.seed, **{**workload.sample, "steps": 1})
        reference_latents: list = []
        baseline_flops = 0.0
        for repeat in range(repeats):
            for case in entries:
                model, result = models[case.name], results[case.name]
                plan = plan_of(model)
                wall = seconds = executed = full = 0.0
                latents = []
                for job in workload.jobs:
                    begin = time.perf_counter()
                    latent = sample_model(model, job.positive, job.negative, seed=job.seed, **workload.sample)
                    wall += time.perf_counter() - begin
                    latents.append(latent)
                    if plan is not None:
                        run = plan.telemetry.latest()
                        seconds, executed, full = seconds + run.model_seconds, executed + run.executed_flops, full + run.full_flops
                result.wall.append(wall)
                if plan is not None:
                    result.seconds.append(seconds)
                    # Against the baseline's FLOPs, not the run's own "full" count: a foreign cache that skips
                    # a whole model call outside the executor (LazyCache) leaves no record of it at all.
                    result.flops_ratio = executed / baseline_flops if baseline_flops > 0 else 1.0
                if case is baseline and repeat == 0:
                    reference_latents = latents
                    baseline_flops = full
                compare = repeat == 0 and case is not baseline or case is baseline and repeat == min(1, repeats - 1)
                if compare:  # the baseline against its own first repeat: run-to-run determinism
                    _fidelity(workload, result, reference_latents, latents)
            log(f"repeat {repeat + 1}/{repeats}: " + ", ".join(
                f"{r.case} {r.seconds[-1] if r.seconds else r.wall[-1]:.3f}s" for r in results.values()))
    ordered = [results[case.name] for case in entries]
    return Report(workload, ordered[1], [ordered[0], *ordered[2:]], repeats, time.perf_counter() - started)


def _fidelity(workload: Workload, result: Result, reference_latents: list, latents: list) -> None:
    import torch

    result.identical = all(torch.equal(a, b) for a, b in zip(reference_latents, latents))
    reference = torch.cat([workload.to_image(latent) for latent in reference_latents])
    images = torch.cat([workload.to_image(latent) for latent in latents])
    result.psnr = psnr(reference, images)
    result.ssim = ssim(reference, images) if min(images.shape[-2:]) >= 11 else math.nan
    result.images = images


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
           "speedup / FLOPs reduction", "PSNR", "SSIM", "PSNR vs EasyCache at equal speedup", "sampling wall time")


def markdown(report: Report, plot: str | None = None, images: str | None = None) -> str:
    """The run's BENCHMARKS.md section: machine, date, settings, the table, the overhead line, notes."""
    workload = report.workload
    easycache = [(report.speedup(r), r.psnr) for r in report.results if r.family == "EasyCache" and math.isfinite(r.psnr)]
    lines = [
        f"## {workload.title}",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {machine()} · ComfyUI {comfyui_version()}",
        "",
        f"{workload.settings}; median of {report.repeats} interleaved repeats ({report.seconds:.0f} s in all).",
        f"Fidelity: {workload.fidelity}." + ("" if workload.meaningful_fidelity else " Random weights: PSNR/SSIM only show whether outputs change, not quality."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * (len(COLUMNS) - 1),
    ]
    notes = []
    for r in [report.unpatched, *report.results]:
        if r.flops_ratio is None:
            flops = reduction = model_time = speedup = efficiency = "-"
        else:
            speed = report.speedup(r)
            flops, reduction = f"{r.flops_ratio:.1%}", f"x{r.flops_reduction:.2f}"
            model_time, speedup = f"{r.median_seconds * 1e3:.1f} ms", f"x{speed:.2f}"
            efficiency = f"{speed / r.flops_reduction:.2f}" if math.isfinite(r.flops_reduction) else "-"
        versus = "-"
        if r.family not in ("EasyCache", "full", "unpatched") and r.flops_ratio is not None and easycache:
            reference = _interpolate(easycache, report.speedup(r))
            if math.isfinite(reference):
                versus = "inf" if math.isinf(r.psnr) else f"{r.psnr - reference:+.2f} dB"
        ssim_text = "-" if math.isnan(r.ssim) else f"{r.ssim:.4f}"
        lines.append(f"| {r.case} | {flops} | {reduction} | {model_time} | {speedup} | {efficiency} | {_db(r.psnr)} "
                     f"| {ssim_text} | {versus} | {r.median_wall * 1e3:.1f} ms |")
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

Written by `python -m dynamic_core.comfy_integration.bench ... --markdown BENCHMARKS.md` (one section
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
        draw.text((x + 7, y - 7), label, fill=colour, font=small)
    for i, family in enumerate(families):
        colour = _PALETTE[i % len(_PALETTE)]
        y = upper + 10 + i * 20
        draw.ellipse([right + 20, y - 5, right + 30, y + 5], fill=colour, outline="black")
        draw.text((right + 38, y), family, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def contact_sheet(report: Report, path: Path, tile: int = 160, max_jobs: int = 6) -> Path:
    """The final images, one row per setting (labelled), one column per job."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in [*report.results, report.unpatched] if r.images is not None]
    jobs = min(max_jobs, len(report.workload.jobs))
    label_width = 260
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (label_width + jobs * tile, len(rows) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, result in enumerate(rows):
        psnr_text = _db(result.psnr)
        draw.text((8, row * tile + tile / 2), f"{result.case}\n{psnr_text}", fill="black", font=font, anchor="lm")
        for column in range(jobs):
            array = (result.images[column].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            picture = Image.fromarray(array)
            resample = Image.Resampling.NEAREST if picture.width < tile else Image.Resampling.LANCZOS
            sheet.paste(picture.resize((tile, tile), resample), (label_width + column * tile, row * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


# --- model sources -------------------------------------------------------------------------------
FLUX_DEV = dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, context_dim=4096, vec_dim=768)


def _jobs(positives: list[tuple[str, list]], negative: list, seeds: Sequence[int]) -> list[Job]:
    return [Job(f"{label} seed {seed}", positive, negative, seed) for label, positive in positives for seed in seeds]


def reference_workload(args: argparse.Namespace) -> Workload:
    from . import tiny_flux

    reference = tiny_flux.load_reference(args.reference)
    size = args.size or reference.image_size
    classes = args.classes.split(",") if args.classes else list(reference.classes)[:4]
    positives = [(name, reference.conditioning(name)) for name in classes]
    steps = args.steps or 16
    cfg = 2.0 if args.cfg is None else args.cfg
    sample = dict(height=size // 2, width=size // 2, steps=steps, sampler=args.sampler, scheduler=args.scheduler, cfg=cfg)
    config = reference.config
    return Workload(
        reference.model, _jobs(positives, reference.null_conditioning(), args.seeds), sample, tiny_flux.latent_to_photo,
        args.title or f"Reference model, {size} px",
        f"Reference model ({Path(args.reference or tiny_flux.REFERENCE_PATH).name}: Flux, hidden {config.hidden_size}, "
        f"{config.num_heads} heads, {config.depth} double + {config.depth_single_blocks} single blocks, trained on photos at "
        f"{reference.image_size} px); {size}x{size} px ({(size // 4) ** 2} image tokens), {steps} steps {args.sampler} "
        f"{args.scheduler}, cfg {cfg:g}; classes {', '.join(classes)}; seeds {', '.join(map(str, args.seeds))}",
        "exact pixels of the reference model's final latents (its fixed invertible transform, no VAE)",
    )


def random_workload(args: argparse.Namespace, full_size: bool) -> Workload:
    import torch

    from . import tiny_flux

    on_gpu = args.device == "cuda"
    if full_size:
        double = args.double if args.double is not None else (19 if on_gpu else 1)
        single = args.single if args.single is not None else (38 if on_gpu else 2)
        config = tiny_flux.TinyFlux(**{**FLUX_DEV, "depth": double, "depth_single_blocks": single})
        dtype = torch.bfloat16 if on_gpu else torch.float32
        size, steps = args.size or (1024 if on_gpu else 128), args.steps or (28 if on_gpu else 4)
        text_tokens = args.text_tokens or (512 if on_gpu else 32)
        reduced = (double, single, size, steps) != (19, 38, 1024, 28)
        title = args.title or ("FLUX.1-dev size, random weights" + (" (reduced)" if reduced else ""))
        what = (f"FLUX.1-dev-shaped random weights (hidden 3072, 24 heads, {double} double + {single} single blocks, "
                f"{str(dtype).replace('torch.', '')}, {text_tokens} text tokens)")
        if reduced:
            what += (f"; REDUCED from 19 + 38 blocks, 1024 px, 28 steps"
                     + ("" if on_gpu else " because this runs on the CPU (FLUX.1-dev size needs a GPU)"))
    else:
        config = tiny_flux.TinyFlux(hidden_size=args.hidden, num_heads=args.heads, depth=args.double or 2,
                                    depth_single_blocks=args.single if args.single is not None else 4)
        dtype, size, steps, text_tokens = torch.float32, args.size or 512, args.steps or 6, args.text_tokens or 8
        title = args.title or f"Random tiny Flux, {size} px"
        what = (f"random tiny Flux (hidden {config.hidden_size}, {config.num_heads} heads, {config.depth} double + "
                f"{config.depth_single_blocks} single blocks)")
    print(f"building {what} ...", flush=True)
    model = tiny_flux.build_model(config, dtype=dtype, device=args.device if full_size and on_gpu else None)
    positive, negative = tiny_flux.conditioning(config, text_tokens=text_tokens)
    cfg = 1.0 if args.cfg is None else args.cfg
    sample = dict(height=size // 8, width=size // 8, steps=steps, sampler=args.sampler, scheduler=args.scheduler, cfg=cfg)
    return Workload(
        model, _jobs([("random conditioning", positive)], negative, args.seeds), sample,
        latent_preview(model.model.latent_format), title,
        f"{what}; {size}x{size} px ({(size // 16) ** 2} image tokens), {steps} steps {args.sampler} {args.scheduler}, "
        f"cfg {cfg:g}, batch 1; seeds {', '.join(map(str, args.seeds))}",
        "ComfyUI's linear latent-to-RGB preview of the final latents", meaningful_fidelity=False,
    )


def checkpoint_workload(args: argparse.Namespace) -> Workload:
    import torch

    import comfy.sd
    import comfy.utils

    from .patching import adapter_of

    if not args.positive:
        raise ValueError("--model needs --positive FILE (a conditioning file from the 'Save Conditioning for Benchmark' node)")
    options = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    print(f"loading {args.model} through ComfyUI's loader ...", flush=True)
    model = comfy.sd.load_diffusion_model(str(args.model), model_options=options)
    adapter = adapter_of(model)  # refuses anything that is not Flux.1, with the reason
    arch = adapter.arch
    positives = [(Path(p).stem, load_conditioning(p, arch.context_dim, arch.vec_dim)) for p in args.positive]
    cfg = 1.0 if args.cfg is None else args.cfg
    if args.negative:
        negative = load_conditioning(args.negative, arch.context_dim, arch.vec_dim)
    elif cfg != 1.0:
        raise ValueError("cfg > 1 needs --negative FILE")
    else:
        negative = positives[0][1]  # unused at cfg 1
    if args.guidance is not None:
        for _, conditioning in [*positives, ("negative", negative)]:
            conditioning[0][1]["guidance"] = args.guidance
    size, steps = args.size or 1024, args.steps or 28
    if args.vae:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(args.vae)))

        def to_image(latent):
            return vae.decode(latent).movedim(-1, 1).float().clamp(0, 1)

        fidelity = f"images decoded with {Path(args.vae).name}"
    else:
        to_image = latent_preview(model.model.latent_format)
        fidelity = "ComfyUI's linear latent-to-RGB preview of the final latents (approximate: pass --vae for decoded images)"
    sample = dict(height=size // 8, width=size // 8, steps=steps, sampler=args.sampler, scheduler=args.scheduler, cfg=cfg)
    return Workload(
        model, _jobs(positives, negative, args.seeds), sample, to_image, args.title or f"{Path(args.model).name}, {size} px",
        f"{Path(args.model).name} (hidden {arch.hidden_size}, {arch.depth_double} double + {arch.depth_single} single blocks, "
        f"{str(model.model.get_dtype()).replace('torch.', '')}); {size}x{size} px, {steps} steps {args.sampler} {args.scheduler}, "
        f"cfg {cfg:g}; prompts {', '.join(label for label, _ in positives)}; seeds {', '.join(map(str, args.seeds))}",
        fidelity,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "bench"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--reference", type=Path, default=None, help="a reference model file (default: the committed one)")
    source.add_argument("--model", type=Path, help="a Flux.1 checkpoint, loaded through ComfyUI's own loader")
    source.add_argument("--full-size-random", action="store_true", help="FLUX.1-dev-sized random bf16 weights (timing only)")
    source.add_argument("--random", action="store_true", help="a tiny random Flux (--hidden, --heads, --double, --single)")
    parser.add_argument("--cases", default="all", help="comma separated, see above (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma separated seeds; every case samples every seed")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple")
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--classes", default=None, help="reference model: comma separated photo classes (default: the first four)")
    parser.add_argument("--positive", nargs="+", type=Path, help="--model: conditioning files, one job per file and seed")
    parser.add_argument("--negative", type=Path, help="--model: the negative conditioning file (cfg > 1)")
    parser.add_argument("--guidance", type=float, default=None, help="--model: Flux guidance (default: from the file)")
    parser.add_argument("--vae", type=Path, help="--model: decode final latents with this VAE for PSNR/SSIM")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="--model: weight dtype")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--double", type=int, default=None, help="double blocks (--random, --full-size-random)")
    parser.add_argument("--single", type=int, default=None, help="single blocks (--random, --full-size-random)")
    parser.add_argument("--text-tokens", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--title", default=None)
    parser.add_argument("--markdown", type=Path, help="append the section to this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the plot and images (default: benchmarks/ next to --markdown, else out/bench)")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma separated integers, got '{args.seeds}'")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.size is not None and args.size % 16:
        parser.error(f"--size must be a multiple of 16, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    host.prepare(cpu=args.device == "cpu")
    host.load_pack()
    from comfyui_dynamic_dit.dynamic_core.comfy_integration import bench as pack_bench

    return pack_bench.run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cases = parse_cases(args.cases)
        if args.model:
            workload = checkpoint_workload(args)
        elif args.full_size_random or args.random:
            workload = random_workload(args, full_size=args.full_size_random)
        else:
            workload = reference_workload(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{workload.title}: {workload.settings}\ncases: {', '.join(c.name for c in cases)}", flush=True)
    report = run_cases(workload, cases, args.repeats)
    out = args.out or (args.markdown.parent / "benchmarks" if args.markdown else Path("out/bench"))
    stem = f"{_slug(workload.title)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    plot = pareto_plot(report, out / f"{stem}.png")
    sheet = contact_sheet(report, out / f"{stem}_images.png")
    base = args.markdown.parent if args.markdown else Path.cwd()
    section = markdown(report, plot=os.path.relpath(plot, base), images=os.path.relpath(sheet, base))
    print(section)
    if args.markdown:
        append_markdown(args.markdown, section)
        print(f"appended to {args.markdown}")
    print(f"plot: {plot}\nimages: {sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
