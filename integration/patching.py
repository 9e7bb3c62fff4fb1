"""The executor on a ComfyUI ModelPatcher: the one module that touches ComfyUI's model patcher.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
from comfy.patcher_extension import WrappersMP

from ..families import BlockRef, ModelAdapter, adapter_for
from ..core.executor import ModelCall, RunContext
from ..core.plan import DynamicPlan, MethodSettings
from ..core.steps import invert_decreasing
from ..core.telemetry import RECENT_FULL_COMPUTE
from .. import methods  # noqa: F401  (registers every method's runtime with the executor)
from .patch_points import with_patch_points

logger = logging.getLogger("dynamic_dit")

PLAN_KEY = "dynamic_dit"  # transformer_options: the DynamicPlan of the patched model
RUN_KEY = "dynamic_dit_run"  # transformer_options: the RunContext of the sampling run in progress
CALL_KEY = "dynamic_dit_call"  # transformer_options: the CallState of the model call in progress
SAMPLER_X_KEY = "dynamic_dit_sampler_x"  # transformer_options: the sampler's x of the model call in progress
WRAPPER_KEY = "dynamic_dit"
TELEMETRY_WRAPPER_KEY = "dynamic_dit.telemetry"


# --- plans on model patchers ---------------------------------------------------------------------
def diffusion_model_of(model_patcher: Any) -> torch.nn.Module:
    model = getattr(model_patcher, "model", None)
    diffusion_model = getattr(model, "diffusion_model", None)
    if diffusion_model is None:
        raise ValueError("Dynamic DiT nodes need a diffusion MODEL (from Load Diffusion Model or a checkpoint loader).")
    return diffusion_model


def adapter_of(model_patcher: Any) -> ModelAdapter:
    """The adapter for a patcher's model; raises UnsupportedModelError naming what is supported."""
    return adapter_for(diffusion_model_of(model_patcher), type(model_patcher.model).__name__)


def check_base_weights(model_patcher: Any, metadata: Mapping[str, str], name: str) -> None:
    """A trained file fits only the base weights it was trained on: refuse it (ValueError) when its
    header's `base_fingerprint` names other weights, also when every shape matches (another fine-tune)."""
    from ..core.fingerprint import check_fingerprint

    check_fingerprint(metadata, diffusion_model_of(model_patcher), adapter_of(model_patcher).model_info(), name)


def sigma_to_percent(model_sampling: Any) -> Callable[[float], float]:
    """Sigma -> the model's sampling percent (0 = pure noise), the inverse of its own `percent_to_sigma`: what
    the methods' percent windows and a token-router file's ratio regions are over, at inference and in training."""
    return lambda sigma: invert_decreasing(model_sampling.percent_to_sigma, sigma)


def plan_of(model_patcher: Any) -> DynamicPlan | None:
    return model_patcher.model_options.get("transformer_options", {}).get(PLAN_KEY)


def apply_settings(model_patcher: Any, settings: MethodSettings) -> Any:
    """A clone of `model_patcher` whose plan holds `settings` (replacing earlier ones of that method).

    Everything that can fail (model family, settings) is checked before cloning, so a bad input
    raises and the caller's model stays exactly as it was.
    """
    adapter = adapter_of(model_patcher)
    settings.validate(adapter)
    plan = (plan_of(model_patcher) or DynamicPlan()).with_settings(settings)
    return _patched_clone(model_patcher, adapter, plan)


def node_output(output: Any) -> Any:
    """The first output of a ComfyUI node call (a v3 NodeOutput or a legacy tuple)."""
    return getattr(output, "result", output)[0]


def install_executor(model_patcher: Any) -> Any:
    """A clone with the executor (and telemetry) installed and the current plan, or an empty one."""
    adapter = adapter_of(model_patcher)
    plan = plan_of(model_patcher)
    plan = DynamicPlan(plan.settings) if plan is not None else DynamicPlan()
    return _patched_clone(model_patcher, adapter, plan)


def _patched_clone(model_patcher: Any, adapter: ModelAdapter, plan: DynamicPlan) -> Any:
    patched = with_patch_points(model_patcher, adapter)
    for wrapper_type, key, wrapper in (
        (WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper),
        (WrappersMP.APPLY_MODEL, WRAPPER_KEY, _sampler_input_wrapper),
        (WrappersMP.DIFFUSION_MODEL, TELEMETRY_WRAPPER_KEY, _telemetry_wrapper),
        (WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _model_wrapper),
    ):
        patched.remove_wrappers_with_key(wrapper_type, key)
        patched.add_wrapper_with_key(wrapper_type, key, wrapper)
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    dit_patches = transformer_options.setdefault("patches_replace", {}).setdefault("dit", {})
    for block in adapter.blocks:
        key = adapter.patch_key(block)
        existing = dit_patches.get(key)
        if not isinstance(existing, BlockPatch):
            dit_patches[key] = BlockPatch(block, existing)
    transformer_options[PLAN_KEY] = plan
    return patched


# --- the patch points ----------------------------------------------------------------------------
_SIGNATURES: dict[Any, inspect.Signature] = {}


def _bind(fn: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind a wrapped call's arguments by name, so wrappers survive host signature changes."""
    key = getattr(fn, "__func__", fn)
    signature = _SIGNATURES.get(key)
    if signature is None:
        signature = _SIGNATURES[key] = inspect.signature(fn)
    return signature.bind(*args, **kwargs)


def bind_model_call(executor: Any, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """A diffusion-model call seen by a DIFFUSION_MODEL wrapper, bound by the names of the model's public `forward`:
    the names callers and adapters use. The host's `forward` hands its parameters on in its own order to `_forward`,
    whose names may differ (Qwen-Image's `timesteps`), so replaying a recorded call through `forward` works too."""
    model = executor.class_obj
    forward = getattr(type(model), "forward", None)  # the class's own (the instance may hold an emulated wrapper point)
    return _bind(forward.__get__(model) if callable(forward) else executor.original, args, kwargs)


def _transformer_options(bound: inspect.BoundArguments) -> dict | None:
    options = bound.arguments.get("transformer_options")
    if options is None:
        options = bound.arguments.get("kwargs", {}).get("transformer_options")
    return options if isinstance(options, dict) else None


def _set_transformer_options(bound: inspect.BoundArguments, options: dict) -> None:
    if "transformer_options" in bound.signature.parameters:
        bound.arguments["transformer_options"] = options
    else:
        bound.arguments.setdefault("kwargs", {})["transformer_options"] = options


def _outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    guider = executor.class_obj
    original_options = guider.model_options
    plan = original_options.get("transformer_options", {}).get(PLAN_KEY)
    if not isinstance(plan, DynamicPlan):
        return executor(*args, **kwargs)
    bound = _bind(executor.original, args, kwargs)
    base_model = guider.model_patcher.model
    sigmas = bound.arguments["sigmas"]
    model_sampling = base_model.model_sampling
    run = RunContext(
        plan,
        adapter_for(base_model.diffusion_model, type(base_model).__name__),
        sigmas.tolist(),
        latent_shape=tuple(bound.arguments["noise"].shape),
        model_name=f"{type(base_model).__name__} ({_count_params(base_model.diffusion_model)})",
        device=guider.model_patcher.load_device,
        sigma_to_percent=sigma_to_percent(model_sampling),
        percent_to_sigma=model_sampling.percent_to_sigma,
        weight_source=effective_weight,
        progress_listener=_progress_publisher(),
        model_sampling=model_sampling,
        weights_key=guider.model_patcher.patches_uuid,
    )
    run.record.full_compute = not plan.enabled_settings()
    user_callback = bound.arguments.get("callback")

    def step_callback(step: int, denoised: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        run.step_callback(step, x)
        if user_callback is not None:
            user_callback(step, denoised, x, total_steps)

    bound.arguments["callback"] = step_callback
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    transformer_options = guider.model_options["transformer_options"]
    transformer_options[RUN_KEY] = run
    _order_model_wrappers(transformer_options)
    try:
        return executor(*bound.args, **bound.kwargs)
    finally:
        record = run.finish()
        if record.calls:
            plan.telemetry.add(record)
            if record.full_compute:
                RECENT_FULL_COMPUTE.add(record)
            baseline = plan.telemetry.latest_comparable(record) or RECENT_FULL_COMPUTE.latest_comparable(record)
            logger.info("Dynamic DiT: %s", record.summary(baseline))
        guider.model_options = original_options


PROGRESS_EVENT = "dynamic_dit.progress"


def _progress_publisher() -> Callable[[dict], None] | None:
    """Send per-step progress to the browser of the client that queued the prompt, inside a server.

    `server` is only in sys.modules when ComfyUI runs as a server; as a library there is no one to tell.
    """
    prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if prompt_server is None:
        return None

    def publish(progress: dict) -> None:
        try:  # with the sampling node's id: the browser shows a run on the reports wired to that node only
            prompt_server.send_sync(PROGRESS_EVENT, {**progress, "node": getattr(prompt_server, "last_node_id", None)},
                                    prompt_server.client_id)
        except Exception:  # a live view must never break sampling
            logger.debug("Dynamic DiT: could not send progress", exc_info=True)

    return publish


def _order_model_wrappers(transformer_options: dict) -> None:
    """Telemetry outermost (it must see every call, even ones a cache answers), model-level work innermost."""
    wrappers = transformer_options.get("wrappers", {}).get(WrappersMP.DIFFUSION_MODEL)
    if not wrappers:
        return
    ordered = {TELEMETRY_WRAPPER_KEY: wrappers.pop(TELEMETRY_WRAPPER_KEY, [])}
    ours = wrappers.pop(WRAPPER_KEY, [])
    ordered.update(wrappers)
    ordered[WRAPPER_KEY] = ours
    wrappers.clear()
    wrappers.update({k: v for k, v in ordered.items() if v})


def _sampler_input_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """`BaseModel.apply_model` gets the sampler's x; the diffusion model gets it scaled by the model
    sampling and cast to the model's dtype (bf16 rounding would swamp the patch scheduler's Δ³)."""
    bound = _bind(executor.original, args, kwargs)
    options = _transformer_options(bound)
    if options is None or not isinstance(options.get(RUN_KEY), RunContext):
        return executor(*args, **kwargs)
    _set_transformer_options(bound, {**options, SAMPLER_X_KEY: bound.arguments["x"]})
    return executor(*bound.args, **bound.kwargs)


def _telemetry_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    bound = bind_model_call(executor, args, kwargs)
    options = _transformer_options(bound)
    run = options.get(RUN_KEY) if options is not None else None
    if not isinstance(run, RunContext):
        return executor(*args, **kwargs)
    sigmas = options.get("sigmas")
    sigma = sigmas if isinstance(sigmas, torch.Tensor) else float("nan")  # read by the step tracker when it must
    call = run.begin_call(
        sigma,
        options.get("cond_or_uncond"),
        options.get("uuids"),
        run.adapter.call_layout(bound.arguments),
        executor.class_obj,
    )
    call.sampler_x = options.get(SAMPLER_X_KEY)
    _set_transformer_options(bound, {**options, CALL_KEY: call})
    return run.timed(call, lambda: executor(*bound.args, **bound.kwargs))


def _model_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    bound = bind_model_call(executor, args, kwargs)
    options = _transformer_options(bound)
    call = options.get(CALL_KEY) if options is not None else None
    if call is None:
        return executor(*args, **kwargs)

    def invoke(arguments: dict[str, Any]) -> torch.Tensor:
        bound.arguments.clear()
        bound.arguments.update(arguments)
        return executor(*bound.args, **bound.kwargs)

    return call.run.model_call(call, ModelCall(dict(bound.arguments), invoke))


class BlockPatch:
    """The `patches_replace["dit"]` entry of one block; wraps a patch another node installed before."""

    def __init__(self, block: BlockRef, foreign: Callable | None = None):
        self.block = block
        self.foreign = foreign

    def __call__(self, args: dict, extra: dict) -> dict:
        original_block = extra["original_block"]
        options = args.get("transformer_options") or {}
        call = options.get(CALL_KEY)
        if call is None:
            return self.foreign(args, extra) if self.foreign is not None else original_block(args)
        return call.run.block_call(call, self.block, args, original_block, self.foreign)

    # ComfyUI moves and collects patch objects; forward that to the patch we wrap.
    def to(self, device: Any) -> "BlockPatch":
        if self.foreign is not None and hasattr(self.foreign, "to"):
            return BlockPatch(self.block, self.foreign.to(device))
        return self

    def models(self) -> list:
        return self.foreign.models() if self.foreign is not None and hasattr(self.foreign, "models") else []

    def __deepcopy__(self, memo: dict) -> "BlockPatch":
        return self


# --- weights -------------------------------------------------------------------------------------
def effective_weight(layer: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a ComfyUI Linear applies to input `like`.

    Goes through `comfy.ops.cast_bias_weight`, so LoRA patches applied at load time or on the fly
    (low-VRAM weight functions), fp8 storage, quantised tensors and offloaded weights are all
    honoured; scaled-fp8 layers multiply the cast weight by their `scale_weight` in their forward,
    so that scale is applied here too.
    """
    if not getattr(layer, "comfy_cast_weights", False) and not getattr(layer, "weight_function", None) and not getattr(
        layer, "bias_function", None
    ):
        if layer.weight.device == like.device and layer.weight.dtype == like.dtype:
            return layer.weight, layer.bias
    weight, bias = comfy.ops.cast_bias_weight(layer, like)[:2]
    scale = getattr(layer, "scale_weight", None)
    if isinstance(scale, torch.Tensor):
        weight = weight * scale.to(device=weight.device, dtype=weight.dtype)
    return weight, bias


def _count_params(module: torch.nn.Module) -> str:
    count = sum(p.numel() for p in module.parameters())
    return f"{count / 1e9:.2f}B params" if count >= 1e9 else f"{count / 1e6:.1f}M params"



# --- files and previews --------------------------------------------------------------------------
MODEL_FOLDER = "dynamic_dit"
# The trained files the pack ships for its reference model (try_it's coarse patches): listed beside the user's own,
# so the nodes' file lists offer them without a copy into models/.
SHIPPED_FILE_FOLDER = Path(__file__).resolve().parents[1] / "reference" / MODEL_FOLDER


def register_model_folder() -> None:
    """Register `models/dynamic_dit/` (routers, ratios, coarse-patch embeddings, TD-LoRA files), then the pack's
    shipped files."""
    import os

    import folder_paths

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))
    paths = [*paths, *(folder for folder in (default, str(SHIPPED_FILE_FOLDER)) if folder not in paths)]
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(extensions) | {".safetensors"})


def _model_folder_files(keep: Callable[[str], bool]) -> list[str]:
    """The names in `models/dynamic_dit/` whose full path `keep` accepts."""
    import folder_paths

    return [name for name in folder_paths.get_filename_list(MODEL_FOLDER)
            if keep(folder_paths.get_full_path(MODEL_FOLDER, name) or "")]


def model_files(file_format: str) -> list[str]:
    """The files in `models/dynamic_dit/` that read as `file_format` (their own format, or a part of a
    training-run bundle), for a node's file combo: the folder holds every method's files, and each input
    offers only the ones it can read."""
    from ..core.files import file_formats

    return _model_folder_files(lambda path: file_format in file_formats(path))


def training_run_files() -> list[str]:
    """The files in `models/dynamic_dit/` that hold a whole training run (the Train node's bundles)."""
    from ..core.files import BUNDLE_FORMAT, file_format

    return _model_folder_files(lambda path: file_format(path) == BUNDLE_FORMAT)


def model_file_path(name: str, what: str = "") -> str:
    """The full path of a file of `models/dynamic_dit/`, or ValueError naming the file (as `what`, e.g. "Width router")
    and the folder."""
    import folder_paths

    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER)) or f"models/{MODEL_FOLDER}"
        raise ValueError(f"{what + ' ' if what else ''}'{name}' was not found in the dynamic_dit model folder ({folders}); "
                         "refresh the node's file list.")
    return path
