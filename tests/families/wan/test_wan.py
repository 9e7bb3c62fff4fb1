"""Wan 2.1 / 2.2 through the adapter: tiny real ComfyUI Wan models (host detection, 9-frame videos =
3 latent frames), every method off or at its full setting bit-identical over whole runs, the compute
really removed at half settings (FlopCounterMode), RoPE and modulation gathered with the tokens, LoRA."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import comfy.sample

from support.family_methods import (
    ALL_BLOCKS,
    COARSE_2X,
    WIDTH_HALF,
    assert_compute_removed,
    assert_full_settings_bit_identical,
    assert_lora_composes,
    block_lora,
    full_settings,
    router_half,
)

from comfyui_dynamic_dit.demo import tiny_wan
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.families import BlockInternals, BlockRef, CallLayout, UnsupportedModelError
from comfyui_dynamic_dit.families.wan.routing import per_token_modulation
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings, install_executor
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.core.slicing import RunIndexCache
from support.nodes import node_outputs

SAMPLE = dict(steps=4, cfg=3.0, seed=3)


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def wan(request):
    config = tiny_wan.TinyWan(variant=request.param)
    return config, tiny_wan.build_model(config), tiny_wan.conditioning(config), tiny_wan.latent(config, video_frames=9)


def sample(model, conds, latent, **changes):
    return tiny_flux.sample(model, *conds, latent=latent, **{**SAMPLE, **changes})


def test_the_adapter_reads_the_host_model(wan):
    config, model, _, _ = wan
    adapter = adapter_of(model)
    a = adapter.arch
    assert (a.hidden_size, a.num_heads, a.ffn_dim, a.depth, a.patch_size) == (128, 4, 256, 3, (1, 2, 2))
    assert a.image_embedding == (config.variant == "i2v") and a.in_channels == config.in_channels
    assert adapter.patch_key(BlockRef("block", 2)) == ("double_block", 2)
    assert adapter.model_info().header("patch_size") == {
        "architecture": "wan", "hidden_size": "128", "num_heads": "4", "depth_block": "3", "patch_size": "1,2,2"}
    linears = adapter.linear_layers(adapter.block_module(model.model.diffusion_model, BlockRef("block", 0)), BlockRef("block", 0))
    assert ("cross_attn.k_img" in linears) == (config.variant == "i2v") and "self_attn.q" in linears and "ffn.2" in linears


def test_wan_relatives_are_refused_by_name():
    model = tiny_wan.build_model(tiny_wan.TinyWan())
    with pytest.raises(UnsupportedModelError, match=r"Wan 2.1 VACE"):
        type(adapter_of(model))(model.model.diffusion_model, "WAN21_Vace")


def test_analytic_flops_match_flop_counter(wan):
    _, model, conds, latent = wan
    adapter, dm = adapter_of(model), model.model.diffusion_model
    context = conds[0][0][0]
    clip = conds[0][0][1].get("clip_vision_output")
    arguments = {"x": torch.randn(1, dm.patch_embedding.weight.shape[1], *latent.shape[2:]), "timestep": torch.tensor([500.0]),
                 "context": context, "clip_fea": clip.penultimate_hidden_states if clip is not None else None}
    layout = adapter.call_layout(arguments)
    assert (layout.image_tokens, layout.frames) == (3 * 8 * 8, 3)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dm(**arguments, transformer_options={})
    assert adapter.full_flops(layout).total == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_a_block_at_full_internals_is_the_host_block_bit_for_bit(wan):
    _, model, conds, latent = wan
    adapter, dm = adapter_of(model), model.model.diffusion_model
    captured = {}

    def capture(args, extra):  # (the host's block wrapper binds its loop's block late: call it here)
        captured["args"], captured["host"] = dict(args), extra["original_block"](dict(args))["img"]
        return {"img": captured["host"]}

    x = torch.randn(1, dm.patch_embedding.weight.shape[1], *latent.shape[2:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dm(x, torch.tensor([700.0]), conds[0][0][0], transformer_options={"patches_replace": {"dit": {("double_block", 1): capture}}})
        args, ref = captured["args"], BlockRef("block", 1)
        module = adapter.block_module(dm, ref)
        host = captured["host"]
        every = BlockInternals(heads=tuple(range(4)), mlp_groups=tuple(range(4)), mlp_group_count=4)
        layout = CallLayout(batch=1, image_tokens=args["img"].shape[1], text_tokens=args["txt"].shape[1])
        full = adapter.run_block(module, ref, dict(args), every, [], layout, RunIndexCache())["img"]
        half = adapter.run_block(module, ref, dict(args), BlockInternals(heads=(0, 2), mlp_groups=(1,), mlp_group_count=4),
                                 [], layout, RunIndexCache())["img"]
    assert torch.equal(full, host)
    assert not torch.allclose(half, host) and torch.isfinite(half).all()


@pytest.mark.parametrize("sampler, scheduler", [("euler", "simple"), ("uni_pc", "simple"), ("dpmpp_2m", "sgm_uniform")])
def test_every_method_at_its_full_setting_is_bit_identical(wan, sampler, scheduler):
    _, model, conds, latent = wan
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, latent, sampler=sampler, scheduler=scheduler),
                                       full_settings())


@pytest.mark.parametrize("name, settings, most", [
    ("width 0.5", WIDTH_HALF, 0.80),
    ("router diffcr 0.5", router_half("diffcr"), 0.85),
    ("router sdt 0.5", router_half("sdt"), 0.95),
    ("patch 2x", COARSE_2X, 0.60),
])
def test_half_settings_really_remove_compute(wan, name, settings, most):
    _, model, conds, latent = wan
    assert_compute_removed(model, lambda m: sample(m, conds, latent), settings, most)


def test_tokens_keep_their_rope_rows_and_frame_modulation():
    vec = torch.arange(3.0)[None, :, None, None].expand(2, 3, 6, 4)  # (B, F, 6, D): frame f's modulation is f
    per_token = per_token_modulation(vec, 3 * 5)
    assert per_token[0, :, 0, 0].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    uneven = per_token_modulation(vec, 14)  # the host's repeat_e: rounds up, then cuts
    assert uneven.shape[1] == 14 and uneven[0, :, 0, 0].tolist() == [0] * 5 + [1] * 5 + [2] * 4


def test_per_frame_timesteps_of_wan_2_2_5b_route_tokens(monkeypatch):
    """Wan 2.2 TI2V 5B gets one timestep per latent frame from an image-conditioned latent (denoise mask):
    the modulation is per frame, and routed tokens keep their frame's."""
    config = tiny_wan.TinyWan(variant="ti2v_5b")
    model = tiny_wan.build_model(config)
    conds, latent = tiny_wan.conditioning(config), tiny_wan.latent(config, video_frames=9)
    mask = torch.ones(1, 1, *latent.shape[2:])
    mask[:, :, 0] = 0.0  # the first frame is the given image
    noise = comfy.sample.prepare_noise(latent, 1)
    kwargs = dict(positive=conds[0], negative=conds[1], latent_image=latent, noise_mask=mask, disable_pbar=True, seed=1)
    routed = apply_settings(model, TokenRouterSettings(mode="diffcr", score="update", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
    expected = comfy.sample.sample(install_executor(model), noise, 3, 3.0, "euler", "simple", **kwargs)
    got = comfy.sample.sample(routed, noise, 3, 3.0, "euler", "simple", **kwargs)
    assert torch.isfinite(got).all() and not torch.equal(got, expected)
    assert torch.equal(got[:, :, 0], expected[:, :, 0])  # the image frame is kept as given


def test_coarse_tokens_sit_at_the_centres_of_their_regions():
    model = tiny_wan.build_model(tiny_wan.TinyWan())
    dm, grid = model.model.diffusion_model, adapter_of(model).coarse_grid()
    options = grid.coarse_options({}, 2)
    coarse = dm.rope_encode(3, 8, 8, transformer_options=options)  # a 16x16 latent at 2x: 4x4 tokens per frame
    ids = torch.zeros(3, 4, 4, 3)
    ids[..., 0] = torch.arange(3.0)[:, None, None]
    ids[..., 1] = (2 * torch.arange(4.0) + 0.5)[None, :, None]  # tokens 2i, 2i+1: centre 2i + 0.5
    ids[..., 2] = (2 * torch.arange(4.0) + 0.5)[None, None, :]
    torch.testing.assert_close(coarse, dm.rope_embedder(ids.reshape(1, -1, 3)).movedim(1, 2))
    assert grid.sampling_refusal(model.model.model_sampling) is None


def test_a_wan_lora_composes_with_the_methods(wan, lora_folder, float32_rounding):
    """On Wan's self-attention, cross-attention and FFN linears."""
    _, model, conds, latent = wan
    state = block_lora(model, lambda path: path.startswith("blocks.") and path.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "0", "2"))
    assert_lora_composes(model, lambda m: sample(m, conds, latent), state, lora_folder, float32_rounding,
                         {"block.0", "block.1", "block.2"})


def test_the_nodes_accept_a_wan_model(wan):
    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS as NODES
    from comfyui_dynamic_dit.devtools.demo import run_node

    _, model, conds, latent = wan
    baseline = run_node(NODES["DynamicTelemetry"], model=model)
    chained = model
    for name, inputs in (("DynamicPatchScheduler", {"mode": "manual", "manual_schedule": "0-50%:2"}),
                         ("DynamicWidthPatcher", {"preset": "fast (trades more quality)"}),
                         ("DynamicTokenRouter", {})):
        chained = run_node(NODES[name], model=chained, **inputs)
    base_latent, latent_out = {"samples": sample(baseline, conds, latent)}, {"samples": sample(chained, conds, latent)}
    report = node_outputs(NODES["DynamicSpeedReport"], chained, latent_out, baseline_model=baseline, baseline_latent=base_latent)
    assert "fewer FLOPs" in report["result"][1]
