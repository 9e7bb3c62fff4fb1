"""Qwen-Image and Qwen-Image Edit through their adapter: tiny real ComfyUI Qwen-Image models built by the host's model
detection, every method at its full setting bit-identical over whole runs, compute really removed at half settings
(FlopCounterMode), an edit's reference tokens kept whole, a Qwen-Image LoRA composing with the methods, training-free
coarse steps with every token where a native call would place it."""
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
    assert_full_settings_bit_identical,
    assert_lora_composes,
    assert_the_nodes_run_as_the_server_runs_them,
    block_lora,
    full_settings,
    router_half,
)

from comfyui_dynamic_dit.demo import tiny_qwen_image
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.families import BlockInternals, BlockRef, UnsupportedModelError
from comfyui_dynamic_dit.integration.patching import adapter_of
from comfyui_dynamic_dit.core.slicing import RunIndexCache

SAMPLE = dict(steps=4, cfg=2.5, seed=3)
REFERENCE = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(5))  # an edit's source image latent


@pytest.fixture(scope="module", params=["t2i", "edit", "edit 2511"])
def qwen(request):
    """Text-to-image; an edit (reference tokens in the image stream); Edit 2511, whose references are modulated at
    timestep 0 on hosts that know it (0.12.1: the blocks then split the stream where the references start)."""
    config = tiny_qwen_image.TinyQwenImage(edit_2511=request.param == "edit 2511")
    reference = REFERENCE if request.param.startswith("edit") else None
    return request.param, tiny_qwen_image.build_model(config), tiny_qwen_image.conditioning(config, reference=reference)


def sample(model, conds, **changes):
    return tiny_flux.sample(model, *conds, latent=tiny_qwen_image.latent(), **{**SAMPLE, **changes})


def test_the_adapter_reads_the_host_model(qwen):
    _, model, _ = qwen
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "Qwen-Image"
    assert (a.hidden_size, a.num_heads, a.head_dim, a.mlp_hidden, a.depth, a.patch_size, a.in_channels, a.context_dim) == (
        128, 2, 64, 512, 3, 2, 16, 64)
    assert adapter.patch_key(BlockRef("block", 2)) == ("double_block", 2)
    assert adapter.model_info().header()["architecture"] == "qwen_image"
    assert {"attn.to_q", "attn.add_v_proj", "attn.to_out.0", "img_mod.1", "txt_mlp.net.2"} <= set(adapter.linear_names(BlockRef("block", 0)))


def test_coarse_steps_run_training_free(qwen):
    _, model, _ = qwen
    grid = adapter_of(model).coarse_grid()
    assert not grid.trained_embedding and grid.sampling_refusal(model.model.model_sampling) is None  # timestep = sigma
    with pytest.raises(UnsupportedModelError, match="Qwen-Image has no post-input patch point"):
        grid.coarse_options({}, 2, post_input=lambda embedded: embedded)
    assert grid.refusal({"kwargs": {"control": {"input": []}}}, model.model.diffusion_model) is not None


@pytest.mark.parametrize("factor", [2, 4])
def test_coarse_tokens_sit_where_a_native_call_places_their_regions(qwen, factor):
    """Image tokens at the centres of their regions on the native grid's centred positions, the text where it starts
    after a native image, an edit's reference tokens where a native call puts them."""
    kind, model, conds = qwen
    arguments = _arguments(kind, conds)
    dm = model.model.diffusion_model
    assert_coarse_positions_centre_their_regions(
        model, lambda x: dm(x, arguments["timestep"], arguments["context"], ref_latents=arguments.get("ref_latents")),
        arguments["x"], arguments, text_tokens=arguments["context"].shape[1], factor=factor)


def _arguments(kind, conds):
    arguments = {"x": torch.randn(1, 16, 1, 16, 16), "timestep": torch.tensor([0.7]), "context": conds[0][0][0]}
    if kind.startswith("edit"):
        arguments["ref_latents"] = [REFERENCE]
    return arguments


def test_analytic_flops_match_flop_counter(qwen):
    kind, model, conds = qwen
    adapter, dm = adapter_of(model), model.model.diffusion_model
    arguments = _arguments(kind, conds)
    layout = adapter.call_layout(arguments)
    assert (layout.image_tokens, layout.reference_tokens) == ((64, 0) if kind == "t2i" else (64 + 16, 16))
    at_zero = getattr(dm, "default_ref_method", "index") == "index_timestep_zero"  # Edit 2511 on a host that knows it
    assert layout.references_at_time_zero == at_zero and layout.timesteps == (2 if at_zero else 1)
    assert_analytic_flops_match(model, arguments)


@pytest.mark.parametrize("text_mask", [False, True])
def test_a_block_at_full_internals_is_the_host_block_bit_for_bit(qwen, text_mask):
    """With a text attention mask too (padded prompts): the host hands it to its blocks from its own scope (0.12.1
    masks the padding out), the adapter from the call's arguments, turned additive as the host turns it."""
    kind, model, conds = qwen
    adapter, dm = adapter_of(model), model.model.diffusion_model
    captured = {}

    def capture(args, extra):
        captured["args"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        captured["host"] = extra["original_block"](dict(args))
        return captured["host"]

    arguments = _arguments(kind, conds)
    if text_mask:
        arguments["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        dm(**arguments, transformer_options={"patches_replace": {"dit": {("double_block", 1): capture}}})
        args, ref, host = captured["args"], BlockRef("block", 1), captured["host"]
        module, layout = adapter.block_module(dm, ref), adapter.call_layout(arguments)
        every = BlockInternals(heads=(0, 1), mlp_groups=(0, 1, 2, 3), mlp_group_count=4)
        full = adapter.run_block(module, ref, dict(args), every, [], layout, RunIndexCache())
        half = adapter.run_block(module, ref, dict(args), BlockInternals(heads=(1,), mlp_groups=(0, 3), mlp_group_count=4),
                                 [], layout, RunIndexCache())
    assert all(torch.equal(full[k], host[k]) for k in ("img", "txt"))
    assert torch.isfinite(half["img"]).all() and not torch.allclose(half["img"], host["img"])


@pytest.mark.parametrize("sampler, scheduler", [("euler", "simple"), ("res_multistep", "simple")])
def test_every_method_at_its_full_setting_is_bit_identical(qwen, sampler, scheduler):
    _, model, conds = qwen
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, sampler=sampler, scheduler=scheduler),
                                       full_settings())


@pytest.mark.parametrize("name, settings, most", [*HALF_SETTINGS, ("patch 2x", COARSE_2X, 0.75)])
def test_half_settings_really_remove_compute(qwen, name, settings, most):
    kind, model, conds = qwen
    ratio = assert_compute_removed(model, lambda m: sample(m, conds), settings, most)
    assert ratio < 1.0


def test_an_edit_routes_the_generated_tokens_and_keeps_every_reference_token():
    """The router sees the 64 generated tokens only; a subset of them runs the block with every one of the 16 reference
    tokens, each with its own RoPE rows; the merge writes the kept tokens back and the references as the block left them."""
    model = tiny_qwen_image.build_model(tiny_qwen_image.TinyQwenImage())
    adapter = adapter_of(model)
    routing, block = adapter.token_routing(), BlockRef("block", 0)
    layout = adapter.call_layout({"x": torch.zeros(1, 16, 1, 16, 16), "timestep": torch.tensor([0.5]),
                                  "context": torch.zeros(1, 8, 64), "ref_latents": [REFERENCE]})
    args = {"img": torch.randn(1, 80, 128), "txt": torch.randn(1, 8, 128), "pe": torch.randn(1, 1, 88, 32, 2, 2)}
    assert routing.image_tokens(block, args, layout).shape[1] == 64 and layout.routable_tokens == 64
    index = torch.tensor([[0, 5, 63]])
    reduced = routing.select(block, args, index, layout)
    assert reduced["img"].shape[1] == 3 + 16 and torch.equal(reduced["img"][:, 3:], args["img"][:, 64:])
    assert torch.equal(reduced["pe"][:, :, 8:11], args["pe"][:, :, [8, 13, 71]])  # text first: token i at row 8 + i
    assert torch.equal(reduced["pe"][:, :, 11:], args["pe"][:, :, 72:])
    out = {"img": torch.randn(1, 19, 128), "txt": args["txt"]}
    before = args["img"].clone()
    merged = routing.merge(block, args, out, index, layout)["img"]
    assert torch.equal(merged[:, [0, 5, 63]], out["img"][:, :3]) and torch.equal(merged[:, 64:], out["img"][:, 3:])
    assert torch.equal(merged[:, 1:5], before[:, 1:5])


@pytest.mark.parametrize("mode", ["diffcr", "sdt"])
def test_a_routed_edit_counts_the_reference_tokens_as_full_work(mode):
    """Telemetry of a routed edit within 3 % of FlopCounterMode: the references' full blocks are counted, not routed."""
    config = tiny_qwen_image.TinyQwenImage()
    model = tiny_qwen_image.build_model(config)
    conds = tiny_qwen_image.conditioning(config, reference=REFERENCE)
    assert_compute_removed(model, lambda m: sample(m, conds), router_half(mode), 0.97)


def test_a_qwen_image_lora_composes_with_the_methods_in_either_order(qwen, lora_folder, float32_rounding):
    _, model, conds = qwen
    state = block_lora(model, lambda path: path.startswith("transformer_blocks.") and "norm" not in path)
    assert_lora_composes(model, lambda m: sample(m, conds), state, lora_folder, float32_rounding, {"block.0", "block.1", "block.2"})


def test_the_nodes_accept_a_qwen_image_model_inside_inference_mode(qwen):
    """As the server runs a prompt: inside `torch.inference_mode()`, the method nodes chain on the model and the report
    compares with the baseline."""
    _, model, conds = qwen
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), chain=(PATCH_SCHEDULER, *WIDTH_AND_ROUTER))
