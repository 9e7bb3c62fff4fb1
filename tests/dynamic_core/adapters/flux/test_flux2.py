"""Flux 2 (dev and Klein) through the Flux adapter: tiny real ComfyUI Flux 2 models built by the host's model
detection, every method at its full setting bit-identical over whole runs, compute really removed at half
settings (FlopCounterMode), SwiGLU units kept in pairs, a Flux 2 LoRA composing with the methods."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nodes as comfy_nodes

from comfyui_dynamic_dit.devtools import tiny_flux2
from comfyui_dynamic_dit.dynamic_core.adapters import BlockInternals, BlockRef, CallLayout, UnsupportedModelError
from comfyui_dynamic_dit.dynamic_core.comfy_integration.patching import adapter_of, apply_settings, install_executor, plan_of
from comfyui_dynamic_dit.dynamic_core.comfy_integration.td_lora_files import apply_td_lora, load_td_lora
from comfyui_dynamic_dit.dynamic_core.methods.patch_scheduler import PatchSchedulerSettings, parse_schedule
from comfyui_dynamic_dit.dynamic_core.methods.token_router import TokenRouterSettings
from comfyui_dynamic_dit.dynamic_core.methods.width import CalibrationSpec, WidthSettings
from comfyui_dynamic_dit.dynamic_core.slicing import RunIndexCache

SAMPLE = dict(steps=4, cfg=2.0, seed=3)
SMALL = CalibrationSpec(latent_size=(8, 8), text_tokens=4)
ALL_BLOCKS = dict(first_full=0, last_full=0)


@pytest.fixture(scope="module", params=["dev", "klein"])
def flux2(request):
    config = tiny_flux2.TinyFlux2(guidance=request.param == "dev")
    return config, tiny_flux2.build_model(config), tiny_flux2.conditioning(config)


def sample(model, conds, **changes):
    return tiny_flux2.sample(model, *conds, latent=tiny_flux2.latent(), **{**SAMPLE, **changes})


def test_the_adapter_reads_the_host_model(flux2):
    config, model, _ = flux2
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "Flux 2" and a.shared_modulation and a.gated_mlp
    assert (a.hidden_size, a.num_heads, a.mlp_hidden, a.patch_size, a.guidance_embed) == (128, 2, 384, 1, config.guidance)
    assert adapter.model_info().header("patch_size")["architecture"] == "flux2"  # files for Flux.1 are refused here
    linears = adapter.linear_names(BlockRef("double", 0))
    assert "img_mlp.0" in linears and not any("mod" in name for name in linears)
    assert adapter.coarse_grid() is None  # not reached yet: the Patch Scheduler refuses Flux 2 by name
    with pytest.raises(UnsupportedModelError, match="patch scheduler does not support Flux 2"):
        apply_settings(model, PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-50%:2")))


def test_analytic_flops_match_flop_counter(flux2):
    config, model, conds = flux2
    adapter, dm = adapter_of(model), model.model.diffusion_model
    arguments = {"x": torch.randn(1, 128, 16, 16), "timestep": torch.tensor([0.7]), "context": conds[0][0][0],
                 "guidance": torch.tensor([4.0]) if config.guidance else None}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dm(**arguments, transformer_options={})
    assert adapter.full_flops(adapter.call_layout(arguments)).total == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_a_block_at_full_internals_is_the_host_block_bit_for_bit_and_units_go_in_pairs(flux2):
    _, model, conds = flux2
    adapter, dm = adapter_of(model), model.model.diffusion_model
    captured = {}

    def capture(kind):
        def patch(args, extra):  # the host's blocks add into their inputs: keep copies of what went in
            before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            out = extra["original_block"](dict(args))
            captured[kind] = (before, {k: v.clone() for k, v in out.items()})  # (and later blocks into their outputs)
            return out
        return patch

    patches = {("double_block", 1): capture("double"), ("single_block", 0): capture("single")}
    with torch.no_grad():
        dm(torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7]), conds[0][0][0],
           guidance=torch.tensor([4.0]), transformer_options={"patches_replace": {"dit": patches}})
        for kind, index in (("double", 1), ("single", 0)):
            args, host = captured[kind]
            ref = BlockRef(kind, index)
            module = adapter.block_module(dm, ref)
            text = args["txt"].shape[1] if kind == "double" else 4
            layout = CallLayout(batch=1, image_tokens=64, text_tokens=text)
            every = BlockInternals(heads=(0, 1), mlp_groups=(0, 1, 2, 3), mlp_group_count=4)
            full = adapter.run_block(module, ref, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                                     every, [], layout, RunIndexCache())
            assert full.keys() == host.keys() and all(torch.equal(full[k], host[k]) for k in host), kind
            # half the MLP groups: SwiGLU's gate and up rows of a unit go together (a narrowed model, not a broken one)
            flops: list[float] = []
            half = adapter.run_block(module, ref, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                                     BlockInternals(heads=(1,), mlp_groups=(0, 3), mlp_group_count=4), flops, layout,
                                     RunIndexCache())
            assert torch.isfinite(half["img"]).all() and not torch.allclose(half["img"], full["img"])


@pytest.mark.parametrize("sampler, scheduler", [("euler", "simple"), ("dpmpp_2m", "sgm_uniform")])
def test_every_method_at_its_full_setting_is_bit_identical(flux2, sampler, scheduler):
    _, model, conds = flux2
    expected = sample(model, conds, sampler=sampler, scheduler=scheduler)
    full = install_executor(model)
    for settings in (
        WidthSettings(noisy_width=1.0, clean_width=1.0, calibration=SMALL),
        TokenRouterSettings(mode="diffcr", score="update", keep_start=1.0, keep_end=1.0, **ALL_BLOCKS),
    ):
        full = apply_settings(full, settings)
    got = sample(full, conds, sampler=sampler, scheduler=scheduler)
    assert torch.equal(got, expected)
    run = plan_of(full).telemetry.latest()
    assert run.calls and all(c.executed.total == pytest.approx(c.full.total) for c in run.calls)


@pytest.mark.parametrize("name, settings, most", [
    ("width 0.5", WidthSettings(noisy_width=0.5, clean_width=0.5, calibration=SMALL), 0.80),
    ("router diffcr 0.5", TokenRouterSettings(mode="diffcr", score="update", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS), 0.85),
    ("router sdt 0.5", TokenRouterSettings(mode="sdt", score="update", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS), 0.97),  # MLP only
    ("router reuse 0.5", TokenRouterSettings(mode="reuse", score="update", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS), 0.85),
])
def test_half_settings_really_remove_compute(flux2, name, settings, most):
    _, model, conds = flux2
    model = apply_settings(model, settings)
    with FlopCounterMode(display=False) as counter:
        out = sample(model, conds)
    run = plan_of(model).telemetry.latest()
    assert torch.isfinite(out).all()
    executed = sum(c.executed.total for c in run.calls)
    assert executed + run.setup_flops == pytest.approx(counter.get_total_flops(), rel=0.03)  # telemetry counts what ran

    def blocks(flops):
        return flops.total - flops.embed - flops.final

    ratio = sum(blocks(c.executed) for c in run.calls) / sum(blocks(c.full) for c in run.calls)
    assert ratio < most, (name, ratio)


def flux2_lora(model, rank=4, seed=0) -> dict:
    """A LoRA on every block linear of the Flux 2 model, in the diffusers-style key names ComfyUI reads."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in model.model.diffusion_model.named_modules():
        if path.startswith(("double_blocks.", "single_blocks.")) and isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            state[f"diffusion_model.{path}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
            state[f"diffusion_model.{path}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.2
    return state


def test_a_flux2_lora_composes_with_the_methods_in_either_order(flux2, lora_folder, float32_rounding):
    from safetensors.torch import save_file

    _, model, conds = flux2
    state = flux2_lora(model)
    save_file(state, str(lora_folder / "flux2.safetensors"))

    def lora(m):
        return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(m, "flux2.safetensors", 0.8)[0]

    merged = sample(lora(model), conds)
    assert (merged - sample(model, conds)).abs().max() > 0.01  # the LoRA changes the image
    width = WidthSettings(noisy_width=0.5, clean_width=1.0, calibration=SMALL)
    lora_first = sample(apply_settings(lora(model), width), conds)
    method_first = sample(lora(apply_settings(model, width)), conds)
    assert torch.equal(lora_first, method_first) and not torch.equal(lora_first, merged)
    bypass = apply_td_lora(model, load_td_lora(model, state, {}, "flux2.safetensors"), 0.8)  # the TD-LoRA Loader's path
    torch.testing.assert_close(sample(bypass, conds), merged, **float32_rounding(merged))
    assert {b.label for b in plan_of(bypass).settings["td_lora"].bound.blocks} == {"double.0", "double.1", "single.0", "single.1"}


def test_flux1_files_and_flux2_models_do_not_mix(flux_model, flux2):
    _, model, _ = flux2
    flux1, flux2_info = adapter_of(flux_model).model_info(), adapter_of(model).model_info()
    assert flux1.family == "flux" and flux2_info.family == "flux2"


def test_the_nodes_accept_a_flux2_model_inside_inference_mode(flux2):
    """As the server runs a prompt: the method nodes chain on Flux 2 and the report compares with the baseline; the
    Patch Scheduler refuses it by name and leaves the model alone."""
    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS as NODES
    from comfyui_dynamic_dit.devtools.demo import run_node

    _, model, conds = flux2
    with torch.inference_mode():
        baseline = run_node(NODES["DynamicTelemetry"], model=model)
        chained = model
        for name, inputs in (("DynamicWidthPatcher", {"preset": "fast (trades more quality)"}), ("DynamicTokenRouter", {})):
            chained = run_node(NODES[name], model=chained, **inputs)
        with pytest.raises(UnsupportedModelError, match="Flux 2"):
            run_node(NODES["DynamicPatchScheduler"], model=chained, mode="manual", manual_schedule="0-50%:2")
        base_latent, latent_out = {"samples": sample(baseline, conds)}, {"samples": sample(chained, conds)}
        report = NODES["DynamicSpeedReport"]().report(chained, latent_out, baseline_model=baseline, baseline_latent=base_latent)
    assert "fewer FLOPs" in report["result"][1]
