"""PixArt-Σ through its adapter: a tiny real ComfyUI PixArt-Σ built by the host's model detection, its blocks and its
model calls reached through patch points the pack emulates with the host's object patches (the host hands its blocks
no options), every method at its full setting bit-identical over whole runs (an EPS model, cfg > 1), compute really
removed at half settings (FlopCounterMode), a PixArt LoRA composing with the methods, the Patch Scheduler and
PixArt-α refused by name."""
from __future__ import annotations

import pytest
import torch

from support.family_methods import (
    HALF_SETTINGS,
    assert_analytic_flops_match,
    assert_compute_removed,
    assert_full_settings_bit_identical,
    assert_lora_composes,
    assert_the_nodes_run_as_the_server_runs_them,
    block_lora,
    full_settings,
)

from comfyui_dynamic_dit.devtools import tiny_pixart
from comfyui_dynamic_dit.dynamic_core.adapters import BlockInternals, BlockRef, UnsupportedModelError, adapter_for
from comfyui_dynamic_dit.dynamic_core.comfy_integration.patch_points import (
    EmulatedPatchPoint,
    EmulatedWrapperPoint,
    with_patch_points,
)
from comfyui_dynamic_dit.dynamic_core.comfy_integration.patching import adapter_of, apply_settings, install_executor, plan_of
from comfyui_dynamic_dit.dynamic_core.comfy_integration.reference import detected_model_patcher
from comfyui_dynamic_dit.dynamic_core.methods.patch_scheduler import PatchSchedulerSettings, parse_schedule
from comfyui_dynamic_dit.dynamic_core.slicing import RunIndexCache

SAMPLE = dict(steps=4, cfg=4.5, seed=3, scheduler="normal")


@pytest.fixture(scope="module")
def pixart():
    config = tiny_pixart.TinyPixArt()
    return config, tiny_pixart.build_model(config), tiny_pixart.conditioning(config)


def sample(model, conds, **changes):
    return tiny_pixart.sample(model, *conds, latent=tiny_pixart.latent(), **{**SAMPLE, **changes})


def _arguments(conds):
    return {"x": torch.randn(1, 4, 32, 64, generator=torch.Generator().manual_seed(0)), "timesteps": torch.tensor([700.0]),
            "context": conds[0][0][0]}


def test_the_adapter_reads_the_host_model(pixart):
    _, model, _ = pixart
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "PixArt-Σ" and adapter.emulated_model_wrappers and adapter.block_kinds[0].emulated
    assert (a.hidden_size, a.num_heads, a.head_dim, a.mlp_hidden, a.depth, a.patch_size, a.in_channels, a.out_channels,
            a.caption_channels) == (128, 2, 64, 512, 3, 2, 4, 8, 64)
    assert set(adapter.linear_names(BlockRef("block", 0))) >= {"attn.qkv", "cross_attn.kv_linear", "mlp.fc2"}
    assert adapter.model_info().header()["architecture"] == "pixart"


def test_the_patch_scheduler_and_pixart_alpha_are_refused_by_name(pixart):
    _, model, _ = pixart
    assert adapter_of(model).coarse_grid() is None  # an EPS model; positions from a module function
    before = dict(model.model_options)
    with pytest.raises(UnsupportedModelError, match="patch scheduler does not support PixArt-Σ"):
        apply_settings(model, PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-50%:2")))
    assert model.model_options == before
    config = tiny_pixart.TinyPixArt()
    skeleton = {**config.checkpoint_skeleton(), "ar_embedder.mlp.0.weight": torch.empty(128, 256, device="meta")}
    alpha = detected_model_patcher(skeleton, {"hidden_size": 128, "num_heads": 2, "caption_channels": 64}, "pixart_alpha",
                                   "PixArt-α")
    with pytest.raises(UnsupportedModelError, match="PixArt-α"):
        adapter_for(alpha.model.diffusion_model, type(alpha.model).__name__)


def test_analytic_flops_match_flop_counter(pixart):
    _, model, conds = pixart
    assert_analytic_flops_match(model, _arguments(conds))


def test_blocks_and_calls_are_reached_through_the_emulated_points_only_when_a_patch_asks(pixart):
    """Object patches on the model's forward and the blocks' forward, applied and removed by the host with the model:
    without a replace patch the model computes what it did without them; with one (in the call's options, which the
    host never hands its blocks), the patch gets the block's arguments and its forward."""
    _, model, conds = pixart
    adapter, dm = adapter_of(model), model.model.diffusion_model
    points = with_patch_points(model, adapter)
    assert isinstance(points.object_patches["diffusion_model.forward"], EmulatedWrapperPoint)
    assert all(isinstance(points.object_patches[f"diffusion_model.blocks.{i}.forward"], EmulatedPatchPoint) for i in range(3))
    assert not model.object_patches  # the input model is left as it was
    captured = {}

    def capture(args, extra):
        captured["args"] = dict(args)
        return extra["original_block"](args)

    with torch.no_grad():
        expected = dm(**_arguments(conds))
        points.patch_model()
        try:
            plain = dm(**_arguments(conds), transformer_options={})
            patched = dm(**_arguments(conds), transformer_options={"patches_replace": {"dit": {("pixart_block", 1): capture}}})
        finally:
            points.unpatch_model()
    assert torch.equal(plain, expected) and torch.equal(patched, expected)
    assert set(captured["args"]) >= {"img", "txt", "vec", "hw", "transformer_options"}


def test_a_block_at_full_internals_is_the_host_block_bit_for_bit(pixart):
    _, model, conds = pixart
    adapter, dm = adapter_of(model), model.model.diffusion_model
    points = with_patch_points(model, adapter)
    captured = {}

    def capture(args, extra):
        captured["args"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        captured["host"] = extra["original_block"](dict(args))
        return captured["host"]

    points.patch_model()
    try:
        with torch.no_grad():
            dm(**_arguments(conds), transformer_options={"patches_replace": {"dit": {("pixart_block", 2): capture}}})
            args, ref = captured["args"], BlockRef("block", 2)
            module, layout = adapter.block_module(dm, ref), adapter.call_layout(_arguments(conds))
            every = BlockInternals(heads=(0, 1), mlp_groups=(0, 1, 2, 3), mlp_group_count=4)
            full = adapter.run_block(module, ref, dict(args), every, [], layout, RunIndexCache())
            half = adapter.run_block(module, ref, dict(args), BlockInternals(heads=(1,), mlp_groups=(0, 3), mlp_group_count=4),
                                     [], layout, RunIndexCache())
    finally:
        points.unpatch_model()
    assert torch.equal(full["img"], captured["host"]["img"])
    assert torch.isfinite(half["img"]).all() and not torch.allclose(half["img"], full["img"])


def test_a_thinned_self_attention_is_the_host_attention_of_the_kept_heads(pixart):
    """The kept-heads attention computes what the host's attention computes with the other heads' output-projection
    columns zeroed (the heads' contributions are independent)."""
    _, model, _ = pixart
    from comfyui_dynamic_dit.dynamic_core.adapters.pixart.blocks import ReducedPixArtBlock

    adapter, dm = adapter_of(model), model.model.diffusion_model
    module = dm.blocks[0]
    x = torch.randn(2, 512, 128, generator=torch.Generator().manual_seed(1))
    view = ReducedPixArtBlock(adapter.arch, module, BlockInternals(heads=(1,), mlp_group_count=4), [], RunIndexCache(),
                              x.device, x.shape[0]).view()
    with torch.no_grad():
        thinned = view.attn(x)
        proj = module.attn.proj
        masked = proj.weight.clone()
        masked[:, :64] = 0
        attention_out = {}
        handle = proj.register_forward_hook(lambda m, inputs, out: attention_out.setdefault("in", inputs[0]))
        module.attn(x)
        handle.remove()
        expected = torch.nn.functional.linear(attention_out["in"], masked, proj.bias)
    torch.testing.assert_close(thinned, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler, scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_every_method_at_its_full_setting_is_bit_identical(pixart, sampler, scheduler):
    _, model, conds = pixart
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, sampler=sampler, scheduler=scheduler),
                                       full_settings(coarse=False))


@pytest.mark.parametrize("name, settings, most", HALF_SETTINGS)
def test_half_settings_really_remove_compute(pixart, name, settings, most):
    _, model, conds = pixart
    assert_compute_removed(model, lambda m: sample(m, conds), settings, most)


def test_model_calls_reach_the_executor_through_the_emulated_wrapper_point(pixart):
    _, model, conds = pixart
    patched = install_executor(model)
    assert isinstance(patched.object_patches["diffusion_model.forward"], EmulatedWrapperPoint) and not model.object_patches
    sample(patched, conds)
    assert len(plan_of(patched).telemetry.latest().calls) == SAMPLE["steps"]


def test_a_pixart_lora_composes_with_the_methods_in_either_order(pixart, lora_folder, float32_rounding):
    _, model, conds = pixart
    state = block_lora(model, lambda path: path.startswith("blocks."))
    assert_lora_composes(model, lambda m: sample(m, conds), state, lora_folder, float32_rounding, {"block.0", "block.1", "block.2"})


def test_the_nodes_accept_a_pixart_model_inside_inference_mode(pixart):
    """As the server runs a prompt: inside `torch.inference_mode()`, the method nodes chain on the model and the report
    compares with the baseline; the Patch Scheduler node refuses PixArt and leaves the model as it was."""
    _, model, conds = pixart
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), refused="PixArt-Σ")
