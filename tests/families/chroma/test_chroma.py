"""Chroma through its adapter: a tiny real ComfyUI Chroma built by the host's model detection, every method at its full
setting bit-identical over whole runs, compute really removed at half settings (FlopCounterMode), a Chroma LoRA
composing with the methods, training-free coarse steps at the centres of their regions, Chroma Radiance refused by name."""
from __future__ import annotations

import pytest
import torch

from support.family_methods import (
    COARSE_2X,
    HALF_SETTINGS,
    PATCH_SCHEDULER,
    WIDTH_AND_ROUTER,
    assert_analytic_flops_match,
    assert_coarse_positions_centre_their_regions,
    assert_compute_removed,
    assert_flux_shaped_blocks_are_the_host_blocks,
    assert_full_settings_bit_identical,
    assert_lora_composes,
    assert_the_nodes_run_as_the_server_runs_them,
    block_lora,
    full_settings,
)

from comfyui_dynamic_dit.demo import tiny_chroma
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.families import BlockRef, UnsupportedModelError, adapter_for
from comfyui_dynamic_dit.integration.patching import adapter_of

SAMPLE = dict(steps=4, cfg=3.0, seed=3)  # Chroma is not guidance-distilled: real CFG


@pytest.fixture(scope="module")
def chroma():
    config = tiny_chroma.TinyChroma()
    return config, tiny_chroma.build_model(config), tiny_chroma.conditioning(config)


def sample(model, conds, **changes):
    return tiny_flux.sample(model, *conds, latent=tiny_chroma.latent(), **{**SAMPLE, **changes})


def test_the_adapter_reads_the_host_model(chroma):
    _, model, _ = chroma
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "Chroma" and a.shared_modulation and not a.gated_mlp
    assert (a.hidden_size, a.num_heads, a.mlp_hidden, a.patch_size, a.latent_channels, a.vec_dim) == (128, 2, 512, 2, 16, None)
    assert adapter.model_info().header()["architecture"] == "chroma"  # files for Flux.1 are refused here
    linears = adapter.linear_names(BlockRef("double", 0))
    assert "img_attn.qkv" in linears and not any("mod" in name for name in linears)


def test_chroma_radiance_and_trained_coarse_files_are_refused_by_name(chroma):
    _, model, _ = chroma
    grid = adapter_of(model).coarse_grid()
    assert not grid.trained_embedding and grid.sampling_refusal(model.model.model_sampling) is None  # timestep = sigma
    with pytest.raises(UnsupportedModelError, match="Chroma has no post-input patch point"):
        grid.coarse_options({}, 2, post_input=lambda embedded: embedded)
    radiance = type("ChromaRadiance", (torch.nn.Module,), {"__module__": "comfy.ldm.chroma_radiance.model"})()
    with pytest.raises(UnsupportedModelError, match="Chroma Radiance"):
        adapter_for(radiance, "ChromaRadiance")


def test_coarse_tokens_sit_at_the_centres_of_their_regions(chroma):
    _, model, conds = chroma
    context = conds[0][0][0]
    assert_coarse_positions_centre_their_regions(
        model, lambda x: model.model.diffusion_model(x, torch.tensor([0.5]), context, torch.tensor([0.0])),
        torch.randn(1, 16, 16, 16), {"context": context}, text_tokens=context.shape[1])


def test_analytic_flops_match_flop_counter(chroma):
    """With the modulation network's 344 rows per call, whatever the depth (the host fixes them)."""
    _, model, conds = chroma
    arguments = {"x": torch.randn(1, 16, 16, 16), "timestep": torch.tensor([0.7]), "context": conds[0][0][0],
                 "guidance": torch.tensor([0.0])}
    assert_analytic_flops_match(model, arguments)


def test_a_block_at_full_internals_is_the_host_block_bit_for_bit(chroma):
    _, model, conds = chroma
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_flux_shaped_blocks_are_the_host_blocks(model, lambda options: model.model.diffusion_model(
        x, torch.tensor([0.7]), conds[0][0][0], torch.tensor([0.0]), transformer_options=options), text_tokens=8)


def test_timestep_features_come_from_the_modulation_network(chroma):
    _, model, _ = chroma
    dm, units = model.model.diffusion_model, adapter_of(model).width_units()
    with torch.no_grad():
        early, late = (units.timestep_features(dm, torch.tensor([t]), torch.float32) for t in (0.9, 0.1))
    assert early.shape == (1, 128) and not torch.allclose(early, late)


@pytest.mark.parametrize("sampler, scheduler", [("euler", "simple"), ("dpmpp_2m", "beta")])
def test_every_method_at_its_full_setting_is_bit_identical(chroma, sampler, scheduler):
    _, model, conds = chroma
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, sampler=sampler, scheduler=scheduler),
                                       full_settings())


@pytest.mark.parametrize("name, settings, most", [*HALF_SETTINGS, ("patch 2x", COARSE_2X, 0.75)])
def test_half_settings_really_remove_compute(chroma, name, settings, most):
    _, model, conds = chroma
    assert_compute_removed(model, lambda m: sample(m, conds), settings, most)


def test_a_chroma_lora_composes_with_the_methods_in_either_order(chroma, lora_folder, float32_rounding):
    _, model, conds = chroma
    state = block_lora(model, lambda path: path.startswith(("double_blocks.", "single_blocks.")))
    assert_lora_composes(model, lambda m: sample(m, conds), state, lora_folder, float32_rounding,
                         {"double.0", "double.1", "single.0", "single.1"})


def test_flux1_files_and_chroma_models_do_not_mix(flux_model, chroma):
    assert adapter_of(flux_model).model_info().family == "flux" and adapter_of(chroma[1]).model_info().family == "chroma"


def test_the_nodes_accept_a_chroma_model_inside_inference_mode(chroma):
    """As the server runs a prompt: inside `torch.inference_mode()`, the method nodes chain on the model and the report
    compares with the baseline."""
    _, model, conds = chroma
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), chain=(PATCH_SCHEDULER, *WIDTH_AND_ROUTER))
