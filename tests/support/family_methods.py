"""The checks every model family's method tests make, in one place: every method at its full setting is the host's
run bit for bit, half settings really remove compute (telemetry against FlopCounterMode), a LoRA of the family
composes with the methods through ComfyUI's loader in either order and as the TD-LoRA bypass.

`sample` is the family test's sampler: a function of the model patcher alone, returning the sampled latent."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from comfyui_dynamic_dit.integration.patching import apply_settings, install_executor, plan_of
from comfyui_dynamic_dit.methods.td_lora.comfy_files import apply_td_lora, load_td_lora
from comfyui_dynamic_dit.methods.patch_scheduler.settings import PatchSchedulerSettings
from comfyui_dynamic_dit.methods.patch_scheduler.schedule import parse_schedule
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.methods.width.calibration import CalibrationSpec
from comfyui_dynamic_dit.methods.width.settings import WidthSettings
from support.nodes import node_outputs

Sample = Callable[[object], torch.Tensor]
SMALL = CalibrationSpec(latent_size=(8, 8), text_tokens=4)
ALL_BLOCKS = dict(first_full=0, last_full=0)
WIDTH_HALF = WidthSettings(noisy_width=0.5, clean_width=0.5, calibration=SMALL)


def full_settings(coarse: bool = True, width: bool = True) -> list:
    """Every method at the setting that must change nothing (the Patch Scheduler where the family has a grid, the width
    where it has width units)."""
    settings = [WidthSettings(noisy_width=1.0, clean_width=1.0, calibration=SMALL)] if width else []
    settings.append(TokenRouterSettings(mode="diffcr", score="update", keep_start=1.0, keep_end=1.0, **ALL_BLOCKS))
    if coarse:
        settings.append(PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-100%:1")))
    return settings


def router_half(mode: str) -> TokenRouterSettings:
    return TokenRouterSettings(mode=mode, score="update", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS)


COARSE_2X = PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-75%:2"))

# (name, settings, most of the blocks' full FLOPs they may leave) at half settings, for `assert_compute_removed`
HALF_SETTINGS = [
    ("width 0.5", WIDTH_HALF, 0.80),
    ("router diffcr 0.5", router_half("diffcr"), 0.85),
    ("router sdt 0.5", router_half("sdt"), 0.97),  # the MLP only
    ("router reuse 0.5", router_half("reuse"), 0.85),
]


def assert_full_settings_bit_identical(model, sample: Sample, settings: Iterable) -> None:
    expected = sample(model)
    full = install_executor(model)
    for one in settings:
        full = apply_settings(full, one)
    assert torch.equal(sample(full), expected)
    run = plan_of(full).telemetry.latest()
    assert run.calls and all(c.executed.total == pytest.approx(c.full.total) for c in run.calls)


def assert_analytic_flops_match(model, arguments: dict, rel: float = 0.02) -> None:
    """The adapter's analytic FLOPs of an unpatched call with these diffusion-model `arguments` are what
    FlopCounterMode counts, within `rel`."""
    from comfyui_dynamic_dit.integration.patching import adapter_of

    adapter = adapter_of(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.diffusion_model(**arguments, transformer_options={})
    assert adapter.full_flops(adapter.call_layout(arguments)).total == pytest.approx(counter.get_total_flops(), rel=rel)


def assert_compute_removed(model, sample: Sample, settings, most: float) -> float:
    """Sample with `settings`: the telemetry (with the width ranking's one-off run) within 3 % of FlopCounterMode,
    the blocks' FLOPs below `most` of full compute (the stem is left out: on a tiny model it can outweigh them)."""
    model = apply_settings(model, settings)
    with FlopCounterMode(display=False) as counter:
        out = sample(model)
    run = plan_of(model).telemetry.latest()
    assert torch.isfinite(out).all()
    executed = sum(c.executed.total for c in run.calls)
    assert executed + run.setup_flops == pytest.approx(counter.get_total_flops(), rel=0.03)  # telemetry counts what ran

    def blocks(flops):
        return flops.total - flops.embed - flops.final

    ratio = sum(blocks(c.executed) for c in run.calls) / sum(blocks(c.full) for c in run.calls)
    assert ratio < most, ratio
    return ratio


def block_lora(model, is_block_linear: Callable[[str], bool], rank: int = 4, seed: int = 0) -> dict:
    """A LoRA on the block linears `is_block_linear` picks by module path, in the diffusers-style key names ComfyUI reads."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in model.model.diffusion_model.named_modules():
        if is_block_linear(path) and getattr(module, "weight", None) is not None and module.weight.ndim == 2:
            out_features, in_features = module.weight.shape
            state[f"diffusion_model.{path}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
            state[f"diffusion_model.{path}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.2
    return state


def assert_lora_composes(model, sample: Sample, state: dict, lora_folder, float32_rounding, blocks: set[str],
                         name: str = "family_lora.safetensors", method=None) -> None:
    """The LoRA changes the image; a method on top of it (default: width) gives the same run in either order of the
    nodes; the TD-LoRA Loader's bypass equals ComfyUI's merged LoRA within float32 rounding, bound to every block in
    `blocks`."""
    import nodes as comfy_nodes
    from safetensors.torch import save_file

    save_file(state, str(lora_folder / name))

    def lora(m):
        return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(m, name, 0.8)[0]

    merged = sample(lora(model))
    assert (merged - sample(model)).abs().max() > 0.01  # the LoRA changes the image
    method = method or WidthSettings(noisy_width=0.5, clean_width=1.0, calibration=SMALL)
    lora_first = sample(apply_settings(lora(model), method))
    method_first = sample(lora(apply_settings(model, method)))
    assert torch.equal(lora_first, method_first) and not torch.equal(lora_first, merged)
    bypass = apply_td_lora(model, load_td_lora(model, state, {}, name), 0.8)  # the TD-LoRA Loader's path
    torch.testing.assert_close(sample(bypass), merged, **float32_rounding(merged))
    assert {b.label for b in plan_of(bypass).settings["td_lora"].bound.blocks} == blocks


def _copied(args: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def assert_flux_shaped_blocks_are_the_host_blocks(model, call: Callable[[dict], None], text_tokens: int) -> None:
    """Flux-shaped blocks (Flux 2, Chroma): a double and a single block run by the adapter at full internals give the
    host block's output bit for bit; with half the heads and MLP groups (SwiGLU: gate and up rows together) a
    finite, different one. `call(transformer_options)` runs the diffusion model once with those options."""
    from comfyui_dynamic_dit.families import BlockInternals, BlockRef, CallLayout
    from comfyui_dynamic_dit.integration.patching import adapter_of
    from comfyui_dynamic_dit.core.slicing import RunIndexCache

    adapter, dm = adapter_of(model), model.model.diffusion_model
    captured = {}

    def capture(kind):
        def patch(args, extra):  # the host's blocks add into their inputs: keep copies of what went in
            before = _copied(args)
            out = extra["original_block"](dict(args))
            captured[kind] = (before, {k: v.clone() for k, v in out.items()})  # (and later blocks into their outputs)
            return out
        return patch

    heads = adapter.arch.num_heads
    with torch.no_grad():
        call({"patches_replace": {"dit": {("double_block", 1): capture("double"), ("single_block", 0): capture("single")}}})
        for kind, index in (("double", 1), ("single", 0)):
            args, host = captured[kind]
            ref = BlockRef(kind, index)
            module = adapter.block_module(dm, ref)
            text = args["txt"].shape[1] if kind == "double" else text_tokens
            image = (args["img"].shape[1] if kind == "double" else args["img"].shape[1] - text)
            layout = CallLayout(batch=1, image_tokens=image, text_tokens=text)
            every = BlockInternals(heads=tuple(range(heads)), mlp_groups=(0, 1, 2, 3), mlp_group_count=4)
            full = adapter.run_block(module, ref, _copied(args), every, [], layout, RunIndexCache())
            assert full.keys() == host.keys() and all(torch.equal(full[k], host[k]) for k in host), kind
            half = adapter.run_block(module, ref, _copied(args), BlockInternals(heads=tuple(range(heads // 2)), mlp_groups=(0, 3),
                                     mlp_group_count=4), [], layout, RunIndexCache())
            assert torch.isfinite(half["img"]).all() and not torch.allclose(half["img"], full["img"])


WIDTH_AND_ROUTER = (("DynamicWidthPatcher", {"preset": "fast (trades more quality)"}), ("DynamicTokenRouter", {}))
PATCH_SCHEDULER = ("DynamicPatchScheduler", {"mode": "manual", "manual_schedule": "0-50%:2"})


def assert_the_nodes_run_as_the_server_runs_them(model, sample: Sample, chain=WIDTH_AND_ROUTER, refused: str | None = None) -> None:
    """Inside `torch.inference_mode()`, as ComfyUI runs a prompt: the method nodes of `chain` (node name, inputs) chain
    on the model and the Speed Report compares with the Telemetry baseline; with `refused`, the Patch Scheduler node
    refuses the family with an error matching it and leaves the model as it was."""
    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS as NODES
    from comfyui_dynamic_dit.devtools.demo import run_node
    from comfyui_dynamic_dit.families import UnsupportedModelError

    with torch.inference_mode():
        baseline = run_node(NODES["DynamicTelemetry"], model=model)
        chained = model
        for name, inputs in chain:
            chained = run_node(NODES[name], model=chained, **inputs)
        if refused is not None:
            before = dict(chained.model_options)
            with pytest.raises(UnsupportedModelError, match=refused):
                run_node(NODES[PATCH_SCHEDULER[0]], model=chained, **PATCH_SCHEDULER[1])
            assert chained.model_options == before
        base_latent, latent_out = {"samples": sample(baseline)}, {"samples": sample(chained)}
        report = node_outputs(NODES["DynamicSpeedReport"], chained, latent_out, baseline_model=baseline, baseline_latent=base_latent)
    assert "fewer FLOPs" in report["result"][1]


def _region_centres(ids: torch.Tensor, first: int, rows: int, cols: int, factor: int) -> torch.Tensor:
    """Native [.., image, ..] position ids with each factor x factor region of the image averaged into one token."""
    image = ids[:, first : first + rows * cols].float().reshape(ids.shape[0], rows, cols, ids.shape[-1])
    pooled = torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((ids[:, :first].float(), pooled, ids[:, first + rows * cols :].float()), dim=1)


def assert_coarse_positions_centre_their_regions(model, call: Callable[[torch.Tensor], None], latent: torch.Tensor,
                                                 arguments: dict, text_tokens: int, factor: int = 2) -> None:
    """A family whose host builds positions itself (`PositionedCoarseGrid`): with its stand-ins applied as the host
    applies object patches, a native call embeds the host's own positions, and a coarse call embeds exactly the native
    call's positions with each image region averaged into its coarse token (text and reference tokens as natively)."""
    from comfyui_dynamic_dit.integration.patch_points import with_patch_points
    from comfyui_dynamic_dit.integration.patching import adapter_of

    adapter = adapter_of(model)
    grid, dm = adapter.coarse_grid(), model.model.diffusion_model
    embedder = dm.pe_embedder
    seen = []
    hook = embedder.register_forward_hook(lambda module, inputs, out: seen.append((inputs[0], out)))
    points = with_patch_points(model, adapter)
    coarse = latent[..., ::factor, ::factor].clone()
    points.patch_model()
    try:
        with torch.no_grad():
            call(latent)
            with grid.coarse_call(factor, arguments, latent, coarse):
                call(coarse)
    finally:
        points.unpatch_model()
        hook.remove()
    (native_ids, native_pe), (raw_coarse_ids, coarse_pe) = seen
    own = type(embedder).forward
    torch.testing.assert_close(native_pe, own(embedder, native_ids), rtol=0, atol=0)  # natively the host's method
    rows, cols = (s // grid.native_patch for s in latent.shape[-2:])
    expected = _region_centres(native_ids, text_tokens, rows, cols, factor)
    torch.testing.assert_close(coarse_pe, own(embedder, expected))
    assert not torch.allclose(own(embedder, raw_coarse_ids.float()), coarse_pe)  # the host's own coarse ids differ
