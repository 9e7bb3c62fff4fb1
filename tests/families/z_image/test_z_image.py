"""Z-Image through its adapter: a tiny real ComfyUI Z-Image (NextDiT with Z-Image's modulation) built by the host's
model detection, its blocks reached through patch points the pack emulates with the host's object patches, every method
at its full setting bit-identical over whole runs, compute really removed at half settings (FlopCounterMode), training-
free coarse steps at the centres of their regions, a Z-Image LoRA composing with the methods."""
from __future__ import annotations

import pytest
import torch

from support.family_methods import (
    COARSE_2X,
    PATCH_SCHEDULER,
    WIDTH_AND_ROUTER,
    WIDTH_HALF,
    assert_analytic_flops_match,
    assert_compute_removed,
    assert_full_settings_bit_identical,
    assert_lora_composes,
    assert_the_nodes_run_as_the_server_runs_them,
    block_lora,
    full_settings,
    router_half,
)

from comfyui_dynamic_dit.demo import tiny_z_image
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.families import BlockInternals, BlockRef, UnsupportedModelError
from comfyui_dynamic_dit.integration.patch_points import EmulatedPatchPoint, with_patch_points
from comfyui_dynamic_dit.integration.patching import adapter_of, install_executor
from comfyui_dynamic_dit.core.slicing import RunIndexCache

SAMPLE = dict(steps=4, cfg=2.0, seed=3)


@pytest.fixture(scope="module")
def z_image():
    config = tiny_z_image.TinyZImage()
    return config, tiny_z_image.build_model(config), tiny_z_image.conditioning(config)


def sample(model, conds, **changes):
    return tiny_flux.sample(model, *conds, latent=tiny_z_image.latent(), **{**SAMPLE, **changes})


def _arguments(conds):
    return {"x": torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), "timesteps": torch.tensor([0.7]),
            "context": conds[0][0][0], "num_tokens": 8}


def test_the_adapter_reads_the_host_model(z_image):
    _, model, conds = z_image
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "Z-Image" and adapter.timestep_argument == "timesteps"
    assert (a.hidden_size, a.num_heads, a.head_dim, a.depth, a.refiner_depth, a.patch_size, a.pad_multiple) == (256, 4, 64, 3, 1, 2, 32)
    layout = adapter.call_layout(_arguments(conds))  # 8 caption tokens padded to 32; 64 image tokens padded to 64
    assert (layout.text_tokens, layout.image_tokens, layout.reference_tokens) == (32, 64, 0)
    odd = adapter.call_layout({**_arguments(conds), "x": torch.zeros(1, 16, 10, 12)})  # 30 image tokens + 2 padding
    assert (odd.image_tokens, odd.reference_tokens, odd.routable_tokens) == (32, 2, 30)
    assert not adapter.coarse_grid().trained_embedding


def test_lumina_2_is_refused_by_name():
    from support.host_models import detected_model

    lumina2 = detected_model({"cap_embedder.1.weight": (128, 64), "layers.0.attention.qkv.weight": (256, 128)},
                             n_heads=4, n_kv_heads=2, axes_dims=[8, 12, 12], multiple_of=32)
    with pytest.raises(UnsupportedModelError, match="Lumina 2"):
        adapter_of(lumina2)


def test_analytic_flops_match_flop_counter(z_image):
    """Refiners, padded caption and image included (the caption embedding is counted over the padded caption)."""
    _, model, conds = z_image
    arguments = _arguments(conds)
    assert_analytic_flops_match(model, arguments, rel=0.01)


def test_the_emulated_patch_points_are_the_blocks_until_a_patch_asks(z_image):
    """Object patches on the layers' forward, applied and removed by the host with the model: without a replace patch
    the model computes what it did without them; with one, the patch gets the block's arguments and its forward."""
    _, model, conds = z_image
    adapter, dm = adapter_of(model), model.model.diffusion_model
    points = with_patch_points(model, adapter)
    assert all(isinstance(points.object_patches[f"diffusion_model.layers.{i}.forward"], EmulatedPatchPoint) for i in range(3))
    assert not model.object_patches  # the input model is left as it was
    arguments = _arguments(conds)
    with torch.no_grad():
        expected = dm(**arguments, transformer_options={})
        captured = {}

        def capture(args, extra):
            captured["args"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            captured["host"] = extra["original_block"](dict(args))
            return captured["host"]

        points.patch_model()
        try:
            assert torch.equal(dm(**arguments, transformer_options={}), expected)
            patched = dm(**arguments, transformer_options={"patches_replace": {"dit": {("z_image_layer", 1): capture}}})
        finally:
            points.unpatch_model()
        assert torch.equal(patched, expected) and set(captured["args"]) >= {"img", "pe", "vec", "transformer_options"}
        assert torch.equal(dm(**arguments, transformer_options={}), expected)
        args, ref = captured["args"], BlockRef("layer", 1)
        module, layout = adapter.block_module(dm, ref), adapter.call_layout(arguments)
        every = BlockInternals(heads=(0, 1, 2, 3), mlp_groups=(0, 1, 2, 3), mlp_group_count=4)
        full = adapter.run_block(module, ref, dict(args), every, [], layout, RunIndexCache())
        half = adapter.run_block(module, ref, dict(args), BlockInternals(heads=(1, 3), mlp_groups=(0, 3), mlp_group_count=4),
                                 [], layout, RunIndexCache())
    assert torch.equal(full["img"], captured["host"]["img"])
    assert torch.isfinite(half["img"]).all() and not torch.allclose(half["img"], full["img"])


@pytest.mark.parametrize("sampler, scheduler", [("euler", "simple"), ("res_multistep", "simple")])
def test_every_method_at_its_full_setting_is_bit_identical(z_image, sampler, scheduler):
    _, model, conds = z_image
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, sampler=sampler, scheduler=scheduler), full_settings())


@pytest.mark.parametrize("name, settings, most", [
    ("width 0.5", WIDTH_HALF, 0.80),
    ("router diffcr 0.5", router_half("diffcr"), 0.90),  # 32 caption tokens stay beside 64 image tokens
    ("router sdt 0.5", router_half("sdt"), 0.97),
    ("router reuse 0.5", router_half("reuse"), 0.90),
    ("patch 2x", COARSE_2X, 0.75),
])
def test_half_settings_really_remove_compute(z_image, name, settings, most):
    _, model, conds = z_image
    assert_compute_removed(model, lambda m: sample(m, conds), settings, most)


def test_coarse_tokens_sit_at_the_centres_of_their_regions(z_image):
    _, model, conds = z_image
    dm, grid = model.model.diffusion_model, adapter_of(model).coarse_grid()
    assert grid.sampling_refusal(model.model.model_sampling) is None  # timesteps = sigma
    seen = []
    hook = dm.rope_embedder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            dm(torch.zeros(1, 16, 8, 8), torch.tensor([0.5]), conds[0][0][0], 8, transformer_options=grid.coarse_options({}, 2))
    finally:
        hook.remove()
    ids = torch.cat([i[0] for i in seen])  # the hosts embed [caption, image, padding] in one call or in several
    image = ids[ids[:, 0] == ids[:, 0].max()]  # the image tokens' first axis is the caption length + 1
    assert image.shape[0] == 16  # 4x4 coarse tokens of an 8x8 latent at 2x
    centres = 2 * torch.arange(4.0) + 0.5
    torch.testing.assert_close(image[:, 1], centres.repeat_interleave(4))
    torch.testing.assert_close(image[:, 2], centres.repeat(4))


def test_a_z_image_lora_composes_with_the_methods_in_either_order(z_image, lora_folder, float32_rounding):
    _, model, conds = z_image
    state = block_lora(model, lambda path: path.startswith("layers.") and "norm" not in path)
    assert_lora_composes(model, lambda m: sample(m, conds), state, lora_folder, float32_rounding, {"layer.0", "layer.1", "layer.2"})


def test_the_nodes_accept_a_z_image_model_inside_inference_mode(z_image):
    """As the server runs a prompt: inside `torch.inference_mode()`, the method nodes chain on the model and the report
    compares with the baseline."""
    _, model, conds = z_image
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), chain=(PATCH_SCHEDULER, *WIDTH_AND_ROUTER))
    assert install_executor(model).object_patches and not model.object_patches


@pytest.mark.parametrize("mode", ["diffcr", "sdt", "reuse"])
def test_padding_tokens_run_every_block_in_full(z_image, mode):
    """A 10x12 latent: 30 image tokens and 2 padding tokens; the router routes the 30, the padding runs in full, and
    the telemetry still matches FlopCounterMode."""
    _, model, conds = z_image
    odd = torch.zeros(1, 16, 10, 12)
    assert_compute_removed(model, lambda m: tiny_flux.sample(m, *conds, latent=odd, **SAMPLE), router_half(mode), 0.97)
