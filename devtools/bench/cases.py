"""Benchmark cases: what each `--cases` entry does to the model (the pack's methods and ComfyUI's own
accelerators), parsed from the command line."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

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
    from ...integration.patching import install_executor

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

        from ...integration.patching import node_output

        if lazy:  # LazyCache computes x + diff out of place
            return _off(node_output(LazyCacheNode.execute(model, threshold, 0.15, 0.95, False)))
        copying = model.clone()
        copying.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, COPY_INPUT_KEY, _copy_input)  # outside EasyCache's wrapper
        return _off(node_output(EasyCacheNode.execute(copying, threshold, 0.15, 0.95, False)))

    return build


def _trained(arg: str | None) -> Case:
    """`trained:<stem>`: the run `python -m devtools.train` wrote (<stem>.safetensors, or the part files
    <stem>.width / .td_lora / .patch_embedding / .token_router .safetensors), applied as trained (`apply_trained_files`)."""
    if not arg:
        raise ValueError("trained: give the output stem of a training run, e.g. trained:reference/trained/flux_photo_reference_t50")
    from ...integration.trained_files import parts_of, run_files

    paths = run_files(arg)
    if not paths:
        raise ValueError(f"trained: no file of the run '{arg}' exists (<stem>.safetensors, or <stem>.width.safetensors, "
                         ".td_lora, .patch_embedding, .token_router)")

    def build(model):
        from ...integration.patching import install_executor
        from ...integration.trained_files import apply_trained_files

        return apply_trained_files(install_executor(model), paths)

    from ...core.files import header_metadata

    names = {"width": "width router", "td_lora": "TD-LoRA", "coarse": "coarse patches", "tokens": "token routers"}

    def name(path: Path, part: str) -> str:  # SDT routers (tokens skip the MLP only) say so
        return "SDT token routers" if part == "tokens" and header_metadata(path).get("token_mode") == "sdt" else names[part]

    return Case(f"trained {Path(arg).name} ({' + '.join(name(p, part) for p in paths for part in parts_of(p))})", build,
                family="trained")


def _tome(ratio: float) -> Callable[[Any], Any]:
    def build(model):
        from comfy_extras.nodes_tomesd import TomePatchModel

        from ...integration.patching import node_output

        return _off(node_output(TomePatchModel.execute(model, ratio)))

    return build


def _td_lora(arg: str | None) -> Case:
    """A random TD-LoRA on every block linear: K experts (default 3) of rank r (default 16), e.g. 'tdlora:4/32'."""
    experts_text, _, rank_text = (arg or "3").partition("/")
    experts, rank = int(experts_text), int(rank_text or 16)

    def build(model):
        from ...methods.td_lora.binding import architecture_metadata, block_linear_shapes
        from ...methods.td_lora.file import parse_td_lora, random_td_lora, td_lora_state_dict
        from ...integration.patching import adapter_of
        from ...methods.td_lora.comfy_files import apply_td_lora

        adapter = adapter_of(model)
        layers, gate = random_td_lora(block_linear_shapes(adapter, model.model.diffusion_model), experts, rank)
        tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter), gate)
        return apply_td_lora(model, parse_td_lora(tensors, metadata, f"random-K{experts}-r{rank}"), 1.0)

    # A random TD-LoRA changes the model on purpose: the case measures the bypass's cost, and its PSNR
    # only says how far the random experts moved the images.
    return Case(f"TD-LoRA K={experts} rank {rank} (random experts: cost only)", build, family="TD-LoRA")


def _token_router(mode: str, keep: float) -> Callable[[Any], Any]:
    def build(model):
        from ...methods.token_router.runtime import TokenRouterSettings
        from ...integration.patching import apply_settings

        return apply_settings(
            model, TokenRouterSettings(mode=mode, keep_start=keep, keep_end=keep, first_full=0, last_full=0, score="update")
        )

    return build


def _width(fraction: float) -> Callable[[Any], Any]:
    """Constant width (heads and MLP) over the whole schedule, training-free ranking."""

    def build(model):
        from ...methods.width.settings import WidthSettings
        from ...integration.patching import apply_settings

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
        from ...methods.width.settings import WidthSettings
        from ...integration.patching import apply_settings

        return apply_settings(model, WidthSettings(noisy_width=noisy, clean_width=clean))

    return Case(f"width ramp {noisy:g}-{clean:g}", build, family="width ramp")


def _router_node(arg: str | None) -> Case:
    """`router:<mode>:<keep>`: the Token Router node's own defaults (first/last 2 blocks full, input-change score)."""
    mode, _, keep_text = (arg or "reuse:0.5").partition(":")
    keep = _number(keep_text or None, 0.5, "Token Router keep ratio", 0.0, 1.0)

    def build(model):
        from ...methods.token_router.runtime import TokenRouterSettings
        from ...integration.patching import apply_settings

        return apply_settings(model, TokenRouterSettings(mode=mode, keep_start=keep, keep_end=keep))

    return Case(f"router {mode} keep {keep:g} (node defaults)", build, family=f"router {mode}")


def _token_router_case(mode: str) -> Callable[[str | None], Case]:
    def case(arg: str | None) -> Case:
        keep = _number(arg, 0.5, f"Token Router {mode} keep ratio", 0.0, 1.0)
        return Case(f"{mode} keep {keep:g}", _token_router(mode, keep), family=mode)

    return case


def _patch_scheduler(**settings: Any) -> Callable[[Any], Any]:
    def build(model):
        from ...methods.patch_scheduler.settings import PatchSchedulerSettings
        from ...integration.patching import apply_settings

        return apply_settings(model, PatchSchedulerSettings(**settings))

    return build


def _ddit_manual(arg: str | None) -> Case:
    """`ddit:0-40%:4;40-70%:2` (ranges separated by ';', since ',' separates cases)."""
    from ...methods.patch_scheduler.schedule import parse_schedule

    schedule = parse_schedule(arg or "0-40%:4;40-70%:2;70-100%:1")
    return Case(f"DDiT manual {', '.join(r.describe() for r in schedule)}", _patch_scheduler(mode="manual", schedule=schedule),
                family="DDiT manual")


def _ddit_auto(arg: str | None) -> Case:
    """`ddit-auto:<tau>` or `ddit-auto:<tau>/<max patch factor>` (relative tau), the node's other defaults."""
    from ...methods.patch_scheduler.settings import PatchSchedulerSettings

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
