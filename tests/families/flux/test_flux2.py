"""Flux 2 (dev and Klein) through the Flux adapter: tiny real ComfyUI Flux 2 models built by the host's model
detection, every method at its full setting bit-identical over whole runs, compute really removed at half
settings (FlopCounterMode), SwiGLU units kept in pairs, a Flux 2 LoRA composing with the methods."""
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
    assert_flux_shaped_blocks_are_the_host_blocks,
    assert_full_settings_bit_identical,
    assert_lora_composes,
    assert_the_nodes_run_as_the_server_runs_them,
    block_lora,
    full_settings,
)

from comfyui_dynamic_dit.demo import tiny_flux2
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.families import BlockRef, UnsupportedModelError
from comfyui_dynamic_dit.integration.patching import adapter_of

SAMPLE = dict(steps=4, cfg=2.0, seed=3)


@pytest.fixture(scope="module", params=["dev", "klein"])
def flux2(request):
    config = tiny_flux2.TinyFlux2(guidance=request.param == "dev")
    return config, tiny_flux2.build_model(config), tiny_flux2.conditioning(config)


def sample(model, conds, **changes):
    return tiny_flux.sample(model, *conds, latent=tiny_flux2.latent(), **{**SAMPLE, **changes})


def test_the_adapter_reads_the_host_model(flux2):
    config, model, _ = flux2
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "Flux 2" and a.shared_modulation and a.gated_mlp
    assert (a.hidden_size, a.num_heads, a.mlp_hidden, a.patch_size, a.guidance_embed) == (128, 2, 384, 1, config.guidance)
    assert adapter.model_info().header("patch_size")["architecture"] == "flux2"  # files for Flux.1 are refused here
    linears = adapter.linear_names(BlockRef("double", 0))
    assert "img_mlp.0" in linears and not any("mod" in name for name in linears)
    grid = adapter.coarse_grid()
    assert not grid.trained_embedding and grid.native_patch == 1 and grid.noisy_channels == 128
    assert grid.sampling_refusal(model.model.model_sampling) is None  # timestep = sigma, as on Flux.1
    with pytest.raises(UnsupportedModelError, match="Flux 2 modulates its final layer"):
        grid.coarse_options({}, 2, post_input=lambda embedded: embedded)  # no seam for a trained embedding


def test_coarse_tokens_sit_at_the_centres_of_their_regions(flux2):
    _, model, _ = flux2
    dm, grid = model.model.diffusion_model, adapter_of(model).coarse_grid()
    _, ids = dm.process_img(torch.zeros(1, 128, 4, 4), transformer_options=grid.coarse_options({}, 2))
    centres = 2 * torch.arange(4.0) + 0.5  # a 8x8 latent at 2x: coarse token i covers native tokens 2i, 2i+1
    torch.testing.assert_close(ids[0, :, 1], centres.repeat_interleave(4))
    torch.testing.assert_close(ids[0, :, 2], centres.repeat(4))


def test_analytic_flops_match_flop_counter(flux2):
    config, model, conds = flux2
    arguments = {"x": torch.randn(1, 128, 16, 16), "timestep": torch.tensor([0.7]), "context": conds[0][0][0],
                 "guidance": torch.tensor([4.0]) if config.guidance else None}
    assert_analytic_flops_match(model, arguments)


def test_a_block_at_full_internals_is_the_host_block_bit_for_bit_and_units_go_in_pairs(flux2):
    _, model, conds = flux2
    x = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_flux_shaped_blocks_are_the_host_blocks(model, lambda options: model.model.diffusion_model(
        x, torch.tensor([0.7]), conds[0][0][0], guidance=torch.tensor([4.0]), transformer_options=options), text_tokens=4)


@pytest.mark.parametrize("sampler, scheduler", [("euler", "simple"), ("dpmpp_2m", "sgm_uniform")])
def test_every_method_at_its_full_setting_is_bit_identical(flux2, sampler, scheduler):
    _, model, conds = flux2
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, sampler=sampler, scheduler=scheduler), full_settings())


@pytest.mark.parametrize("name, settings, most", [
    *HALF_SETTINGS,
    # 3 of 4 steps at 2x: 64 of 256 image tokens, beside the 512 text tokens Flux 2 pads every prompt to
    ("patch 2x", COARSE_2X, 0.80),
])
def test_half_settings_really_remove_compute(flux2, name, settings, most):
    _, model, conds = flux2
    assert_compute_removed(model, lambda m: sample(m, conds), settings, most)


def test_a_flux2_lora_composes_with_the_methods_in_either_order(flux2, lora_folder, float32_rounding):
    _, model, conds = flux2
    state = block_lora(model, lambda path: path.startswith(("double_blocks.", "single_blocks.")))
    assert_lora_composes(model, lambda m: sample(m, conds), state, lora_folder, float32_rounding,
                         {"double.0", "double.1", "single.0", "single.1"})


def test_flux1_files_and_flux2_models_do_not_mix(flux_model, flux2):
    _, model, _ = flux2
    flux1, flux2_info = adapter_of(flux_model).model_info(), adapter_of(model).model_info()
    assert flux1.family == "flux" and flux2_info.family == "flux2"


def test_a_trained_coarse_file_is_refused_on_flux2_by_name(flux2, flux_model, model_folder):
    """The Patch Scheduler node with a trained embedding on Flux 2: a clear error naming the family, the model untouched."""
    from support.nodes import write_flux_embedding

    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS as NODES
    from comfyui_dynamic_dit.devtools.demo import run_node

    _, model, _ = flux2
    name = write_flux_embedding(model_folder, flux_model)
    before = dict(model.model_options)
    with pytest.raises(UnsupportedModelError, match="runs Flux 2 models training-free only"):
        run_node(NODES["DynamicPatchScheduler"], model=model, mode="manual", manual_schedule="0-50%:2", embedding=name)
    assert model.model_options == before


def test_the_nodes_accept_a_flux2_model_inside_inference_mode(flux2):
    """As the server runs a prompt: inside `torch.inference_mode()`, the method nodes chain on the model and the report
    compares with the baseline."""
    _, model, conds = flux2
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), chain=(PATCH_SCHEDULER, *WIDTH_AND_ROUTER))
