"""SD3 / SD3.5 through their adapter: a tiny real ComfyUI MMDiT built by the host's model detection (SD3.5 Medium's
layout: MMDiT-X blocks with a second image self-attention, RMS q/k norms, a pre-only last context branch), model calls
reached through the DIFFUSION_MODEL wrapper point the pack emulates, every method at its full setting bit-identical
over whole runs, compute really removed at half settings (FlopCounterMode), an SD3 LoRA composing with the methods,
training-free coarse steps with the absolute position embeddings interpolated at their regions' centres."""
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

from comfyui_dynamic_dit.demo import tiny_sd3
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.families import BlockInternals, BlockRef, UnsupportedModelError
from comfyui_dynamic_dit.families.sd3.coarse import SD3CoarseGrid
from comfyui_dynamic_dit.integration.patch_points import EmulatedWrapperPoint, with_patch_points
from comfyui_dynamic_dit.integration.patching import adapter_of, install_executor
from comfyui_dynamic_dit.core.slicing import RunIndexCache

SAMPLE = dict(steps=4, cfg=3.0, seed=3)


@pytest.fixture(scope="module", params=["3.5 medium", "3.5 large"])
def sd3(request):
    config = tiny_sd3.TinySD3(mmdit_x_layers=(0, 1) if request.param == "3.5 medium" else ())
    return config, tiny_sd3.build_model(config), tiny_sd3.conditioning(config)


def sample(model, conds, **changes):
    return tiny_flux.sample(model, *conds, latent=tiny_sd3.latent(), **{**SAMPLE, **changes})


def _arguments(conds):
    return {"x": torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), "timesteps": torch.tensor([700.0]),
            "context": conds[0][0][0], "y": conds[0][0][1]["pooled_output"]}


def test_the_adapter_reads_the_host_model(sd3):
    config, model, _ = sd3
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "SD3 / SD3.5" and adapter.emulated_model_wrappers
    assert (a.hidden_size, a.num_heads, a.head_dim, a.mlp_hidden, a.depth, a.second_attention) == (
        192, 3, 64, 768, 3, config.mmdit_x_layers)
    last, first = adapter.linear_names(BlockRef("joint", 2)), adapter.linear_names(BlockRef("joint", 0))
    assert "context_block.attn.qkv" in last and "context_block.attn.proj" not in last  # the pre-only context branch
    assert ("x_block.attn2.qkv" in first) == bool(config.mmdit_x_layers)


def test_coarse_steps_run_training_free(sd3):
    _, model, conds = sd3
    grid, dm = adapter_of(model).coarse_grid(), model.model.diffusion_model
    assert not grid.trained_embedding and grid.sampling_refusal(model.model.model_sampling) is None  # 1000 * sigma
    with pytest.raises(UnsupportedModelError, match="SD3 has no post-input patch point"):
        grid.coarse_options({}, 2, post_input=lambda embedded: embedded)
    arguments = _arguments(conds)
    assert grid.refusal(arguments, dm) is None and grid.refusal({**arguments, "control": {}}, dm) is not None
    wide = {**arguments, "x": torch.zeros(1, 16, 2 * dm.pos_embed_max_size + 2, 8)}  # a padded grid beyond the table
    assert grid.factor_refusal(arguments, 4) is None and "larger than the position table" in grid.factor_refusal(wide, 2)


def test_coarse_tokens_take_the_native_embeddings_at_their_regions_centres(sd3):
    """2x: the mean of the 2x2 native embeddings a token covers; 4x: the mean of the 4x4 region's central 2x2 (its
    centre). Outside a coarse call the stand-in is the host's own method."""
    _, model, _ = sd3
    adapter = adapter_of(model)
    grid, dm = adapter.coarse_grid(), model.model.diffusion_model
    points = with_patch_points(model, adapter)
    points.patch_model()
    try:
        with torch.no_grad():
            native = dm.cropped_pos_embed((16, 16))
            coarse = {}
            for f in (2, 4):
                with grid.coarse_call(f, {}, torch.zeros(1, 16, 16, 16), torch.zeros(1, 16, 16 // f, 16 // f)):
                    coarse[f] = dm.cropped_pos_embed((16 // f, 16 // f))
    finally:
        points.unpatch_model()
    assert torch.equal(native, type(dm).cropped_pos_embed(dm, (16, 16)))
    table = native.reshape(8, 8, -1)
    torch.testing.assert_close(coarse[2].reshape(4, 4, -1), table.reshape(4, 2, 4, 2, -1).mean(dim=(1, 3)))
    centres = table.reshape(2, 4, 2, 4, -1)[:, 1:3, :, 1:3].mean(dim=(1, 3))
    torch.testing.assert_close(coarse[4].reshape(2, 2, -1), centres)


def test_a_coarse_run_embeds_its_tokens_through_the_interpolation(sd3, monkeypatch):
    _, model, conds = sd3
    seen = []
    original = SD3CoarseGrid.interpolated_positions

    def counted(self, own, call, hw, device=None):
        seen.append((call.factor, tuple(int(s) for s in hw)))
        return original(self, own, call, hw, device)

    monkeypatch.setattr(SD3CoarseGrid, "interpolated_positions", counted)
    assert_compute_removed(model, lambda m: sample(m, conds), COARSE_2X, 0.75)
    assert seen and all(entry == (2, (8, 8)) for entry in seen)  # tiny_sd3's 16x16 latent at 2x


def test_analytic_flops_match_flop_counter(sd3):
    _, model, conds = sd3
    arguments = _arguments(conds)
    assert_analytic_flops_match(model, arguments)


def test_model_calls_reach_the_executor_through_the_emulated_wrapper_point(sd3):
    """SD3's forward runs no DIFFUSION_MODEL wrappers of its own: the executor's clone adds the point as an object patch
    (the input model keeps none), and the telemetry sees every call of a run."""
    _, model, conds = sd3
    patched = install_executor(model)
    assert isinstance(patched.object_patches["diffusion_model.forward"], EmulatedWrapperPoint) and not model.object_patches
    from comfyui_dynamic_dit.integration.patching import plan_of

    sample(patched, conds)
    assert len(plan_of(patched).telemetry.latest().calls) == SAMPLE["steps"]


def test_a_block_at_full_internals_is_the_host_block_bit_for_bit(sd3):
    _, model, conds = sd3
    adapter, dm = adapter_of(model), model.model.diffusion_model
    for index in (0, 2):  # an MMDiT-X block (in 3.5 Medium) and the last block with its pre-only context branch
        captured = {}

        def capture(args, extra):
            captured["args"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            captured["host"] = extra["original_block"](dict(args))
            return captured["host"]

        with torch.no_grad():
            dm(**_arguments(conds), transformer_options={"patches_replace": {"dit": {("double_block", index): capture}}})
            args, ref, host = captured["args"], BlockRef("joint", index), captured["host"]
            module, layout = adapter.block_module(dm, ref), adapter.call_layout(_arguments(conds))
            every = BlockInternals(heads=(0, 1, 2), mlp_groups=(0, 1, 2), mlp_group_count=3)
            full = adapter.run_block(module, ref, dict(args), every, [], layout, RunIndexCache())
            half = adapter.run_block(module, ref, dict(args), BlockInternals(heads=(1,), mlp_groups=(0, 2), mlp_group_count=3),
                                     [], layout, RunIndexCache())
        assert torch.equal(full["img"], host["img"]) and (host["txt"] is None) == (index == 2)
        assert host["txt"] is None or torch.equal(full["txt"], host["txt"])
        assert torch.isfinite(half["img"]).all() and not torch.allclose(half["img"], host["img"])


@pytest.mark.parametrize("sampler, scheduler", [("euler", "simple"), ("dpmpp_2m", "sgm_uniform")])
def test_every_method_at_its_full_setting_is_bit_identical(sd3, sampler, scheduler):
    _, model, conds = sd3
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, sampler=sampler, scheduler=scheduler),
                                       full_settings())


@pytest.mark.parametrize("name, settings, most", [*HALF_SETTINGS, ("patch 2x", COARSE_2X, 0.75)])
def test_half_settings_really_remove_compute(sd3, name, settings, most):
    _, model, conds = sd3
    assert_compute_removed(model, lambda m: sample(m, conds), settings, most)


def test_an_sd3_lora_composes_with_the_methods_in_either_order(sd3, lora_folder, float32_rounding):
    _, model, conds = sd3
    state = block_lora(model, lambda path: path.startswith("joint_blocks.") and ".ln_" not in path)
    assert_lora_composes(model, lambda m: sample(m, conds), state, lora_folder, float32_rounding, {"joint.0", "joint.1", "joint.2"})


def test_the_nodes_accept_an_sd3_model_inside_inference_mode(sd3):
    """As the server runs a prompt: inside `torch.inference_mode()`, the method nodes chain on the model and the report
    compares with the baseline."""
    _, model, conds = sd3
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), chain=(PATCH_SCHEDULER, *WIDTH_AND_ROUTER))
