"""PixArt-Σ through its adapter: a tiny real ComfyUI PixArt-Σ built by the host's model detection, its blocks and its
model calls reached through patch points the pack emulates with the host's object patches (the host hands its blocks
no options), every method at its full setting bit-identical over whole runs (an EPS model, cfg > 1), compute really
removed at half settings (FlopCounterMode), a PixArt LoRA composing with the methods, training-free coarse steps
with the noise arithmetic and the native grid's embeddings at the regions' centres, PixArt-α refused by name."""
from __future__ import annotations

import pytest
import torch

from support.family_methods import (
    COARSE_2X,
    HALF_SETTINGS,
    PATCH_SCHEDULER,
    WIDTH_AND_ROUTER,
    assert_analytic_flops_match,
    assert_compute_removed,
    assert_full_settings_bit_identical,
    assert_lora_composes,
    assert_the_nodes_run_as_the_server_runs_them,
    block_lora,
    full_settings,
)

from comfyui_dynamic_dit.demo import tiny_pixart
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.families import BlockInternals, BlockRef, UnsupportedModelError, adapter_for
from comfyui_dynamic_dit.integration.patch_points import (
    EmulatedPatchPoint,
    EmulatedWrapperPoint,
    with_patch_points,
)
from comfyui_dynamic_dit.integration.patching import adapter_of, install_executor, plan_of
from comfyui_dynamic_dit.demo.reference import detected_model_patcher
from comfyui_dynamic_dit.core.slicing import RunIndexCache

SAMPLE = dict(steps=4, cfg=4.5, seed=3, scheduler="normal")


@pytest.fixture(scope="module")
def pixart():
    config = tiny_pixart.TinyPixArt()
    return config, tiny_pixart.build_model(config), tiny_pixart.conditioning(config)


def sample(model, conds, **changes):
    return tiny_flux.sample(model, *conds, latent=tiny_pixart.latent(), **{**SAMPLE, **changes})


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


def test_pixart_alpha_and_trained_coarse_files_are_refused_by_name(pixart):
    _, model, _ = pixart
    grid = adapter_of(model).coarse_grid()
    assert grid.prediction == "noise" and not grid.trained_embedding
    assert grid.sampling_refusal(model.model.model_sampling) is None  # EPS
    with pytest.raises(UnsupportedModelError, match="PixArt has no post-input patch point"):
        grid.coarse_options({}, 2, post_input=lambda embedded: embedded)
    config = tiny_pixart.TinyPixArt()
    skeleton = {**config.checkpoint_skeleton(), "ar_embedder.mlp.0.weight": torch.empty(128, 256, device="meta")}
    alpha = detected_model_patcher(skeleton, {"hidden_size": 128, "num_heads": 2, "caption_channels": 64}, "pixart_alpha",
                                   "PixArt-α")
    with pytest.raises(UnsupportedModelError, match="PixArt-α"):
        adapter_for(alpha.model.diffusion_model, type(alpha.model).__name__)


def test_a_coarse_step_gives_the_native_noise_where_the_clean_image_is_flat(pixart):
    """The noise arithmetic with the host's own model sampling: x_s = x0 + sigma n with a constant x0; a coarse model
    that predicts the pooled noise exactly (an oracle) gives back exactly the native noise n."""
    from comfyui_dynamic_dit.methods.patch_scheduler.coarse_path import NoiseStep

    _, model, _ = pixart
    grid, sampling = adapter_of(model).coarse_grid(), model.model.model_sampling
    generator = torch.Generator().manual_seed(4)
    noise, x0 = torch.randn(2, 4, 32, 64, generator=generator), torch.full((2, 4, 32, 64), 0.3)
    sigma = sampling.sigma(torch.tensor([700.0, 400.0]))
    x_in = sampling.calculate_input(sigma, x0 + sigma.view(-1, 1, 1, 1) * noise)
    step = NoiseStep(grid, {"timesteps": sampling.timestep(sigma).float()}, sampling)
    low = torch.nn.functional.avg_pool2d(x_in, 2)
    z, time = step.coarse(low, 2)
    sigma_coarse = sigma / 2
    torch.testing.assert_close(sampling.sigma(time["timesteps"]), sigma_coarse, rtol=0.01, atol=0)  # the nearest step
    oracle = (step.low - 0.3) / sigma_coarse.view(-1, 1, 1, 1)  # the noise in D x_s at sigma / 2
    torch.testing.assert_close(z, sampling.calculate_input(sigma_coarse, step.low))
    torch.testing.assert_close(step.native(x_in, z, oracle, 2), noise, rtol=1e-4, atol=1e-4)


def test_coarse_tokens_take_the_native_embeddings_at_their_regions_centres(pixart):
    """What the first block receives in a coarse call, minus the host's patch embedding, is the native grid's sin-cos
    embedding at each coarse token's centre: by the host's own function on a grid twice as fine, token 4i + 1.
    Outside a coarse call the patch embedding is the host's."""
    import inspect

    _, model, conds = pixart
    adapter, dm = adapter_of(model), model.model.diffusion_model
    grid, points = adapter.coarse_grid(), with_patch_points(model, adapter)
    native, coarse = torch.randn(1, 4, 64, 128), torch.randn(1, 4, 32, 64)
    seen = []

    def first_block(args, extra):
        seen.append(args["img"].clone())
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("pixart_block", 0): first_block}}}
    points.patch_model()
    try:
        with torch.no_grad():
            assert torch.equal(dm.x_embedder(native), type(dm.x_embedder).forward(dm.x_embedder, native))
            with grid.coarse_call(2, {}, native, coarse):
                dm(coarse, torch.tensor([500.0]), conds[0][0][0], transformer_options=options)
            embedded = type(dm.x_embedder).forward(dm.x_embedder, coarse)
    finally:
        points.unpatch_model()
    # the native 64 x 128 latent: c_res 96, pe_interpolation round(1.5) = 2, base size 128 // 2 = 64; 32 x 64 tokens
    host = inspect.getmodule(type(dm)).get_2d_sincos_pos_embed_torch
    fine = host(128, h=64, w=128, pe_interpolation=2, base_size=64).reshape(64, 128, 128)
    torch.testing.assert_close((seen[0] - embedded)[0], fine[1::4, 1::4].reshape(-1, 128), rtol=0, atol=1e-5)
    assert grid.factor_refusal({"x": native}, 2) is None and "below the smallest" in grid.factor_refusal({"x": native}, 4)


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
    from comfyui_dynamic_dit.families.pixart.blocks import ReducedPixArtBlock

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
                                       full_settings())


@pytest.mark.parametrize("name, settings, most", [*HALF_SETTINGS, ("patch 2x", COARSE_2X, 0.75)])
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
    compares with the baseline."""
    _, model, conds = pixart
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), chain=(PATCH_SCHEDULER, *WIDTH_AND_ROUTER))
