"""LTX-Video 0.9 through its adapter: a tiny real ComfyUI LTX-Video built by the host's model detection, its blocks
reached through the host's own `patches_replace["dit"]`, width, token routing and TD-LoRA at their full settings
bit-identical over whole runs (euler and dpmpp_2m, cfg > 1), compute really removed at half settings (FlopCounterMode),
an LTX-Video LoRA composing with the methods, per-token timesteps and both hosts' RoPE tables gathered with the tokens
and cut to the kept heads; training-free coarse steps with each coarse token at the centre of its region (frames native,
image-to-video calls native); LTX-2 refused by name."""
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
    router_half,
)

from comfyui_dynamic_dit.demo import tiny_flux, tiny_ltxv
from comfyui_dynamic_dit.families import BlockInternals, BlockRef, UnsupportedModelError
from comfyui_dynamic_dit.families.ltxv.routing import gather_positions
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings
from comfyui_dynamic_dit.core.slicing import RunIndexCache

SAMPLE = dict(steps=4, cfg=3.0, seed=3)


@pytest.fixture(scope="module")
def ltxv():
    config = tiny_ltxv.TinyLTXV()
    return config, tiny_ltxv.build_model(config), tiny_ltxv.conditioning(config)


def sample(model, conds, **changes):
    return tiny_flux.sample(model, *conds, latent=tiny_ltxv.latent(), **{**SAMPLE, **changes})


def test_the_adapter_reads_the_host_model(ltxv):
    _, model, _ = ltxv
    adapter = adapter_of(model)
    a = adapter.arch
    assert adapter.display_name == "LTX-Video" and type(model.model).__name__ == "LTXV"
    assert (a.hidden_size, a.num_heads, a.head_dim, a.mlp_hidden, a.depth, a.in_channels, a.out_channels,
            a.caption_channels) == (128, 4, 32, 512, 3, 128, 128, 64)
    assert adapter.model_info().header()["architecture"] == "ltxv"
    assert adapter.width_units().head_count == 4 and not adapter.coarse_grid().trained_embedding


def test_analytic_flops_match_flop_counter(ltxv):
    _, model, conds = ltxv
    arguments = {"x": torch.randn(1, 128, 2, 4, 6, generator=torch.Generator().manual_seed(0)),
                 "timestep": torch.tensor([0.7]), "context": conds[0][0][0], "attention_mask": torch.ones(1, 8)}
    assert_analytic_flops_match(model, arguments)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_every_method_at_its_full_setting_is_bit_identical(ltxv, sampler):
    _, model, conds = ltxv
    assert_full_settings_bit_identical(model, lambda m: sample(m, conds, sampler=sampler), full_settings())


@pytest.mark.parametrize("name, settings, most", [*HALF_SETTINGS, ("patch 2x", COARSE_2X, 0.75)])
def test_half_settings_really_remove_compute(ltxv, name, settings, most):
    _, model, conds = ltxv
    assert_compute_removed(model, lambda m: sample(m, conds), settings, most)


@pytest.mark.parametrize("method", ["width", "router"])
def test_an_ltxv_lora_composes_with_the_methods(ltxv, lora_folder, float32_rounding, method):
    _, model, conds = ltxv
    state = block_lora(model, lambda path: path.startswith("transformer_blocks."))
    assert_lora_composes(model, lambda m: sample(m, conds), state, lora_folder, float32_rounding,
                         {"block.0", "block.1", "block.2"}, method=router_half("diffcr") if method == "router" else None)


def _image_to_video(model, conds, seed: int = 3):
    """Sampling as after LTXVImgToVideo: the first latent frame given (noise mask 0), the others generated; the host then
    calls the model with one timestep per token."""
    import comfy.sample

    latent = tiny_ltxv.latent()
    latent[:, :, :1] = torch.randn(1, 128, 1, 4, 6, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(1, 1, 2, 4, 6)
    mask[:, :, :1] = 0.0
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 4, 3.0, "euler", "simple", *conds, latent, noise_mask=mask,
                               disable_pbar=True, seed=seed)


def test_image_to_video_runs_every_method_with_a_timestep_per_token(ltxv):
    _, model, conds = ltxv
    sample_i2v = lambda m: _image_to_video(m, conds)  # noqa: E731
    assert_full_settings_bit_identical(model, sample_i2v, full_settings())
    for name, settings, most in HALF_SETTINGS:
        assert_compute_removed(model, sample_i2v, settings, most)
    seen = {}

    def capture(args, extra):
        seen.setdefault("vec", args["vec"].shape)
        return extra["original_block"](args)

    captured = model.clone()
    captured.set_model_patch_replace(capture, "dit", "double_block", 0)
    sample_i2v(captured)
    assert seen["vec"][1] == 2 * 4 * 6  # one modulation row per token: the per-token paths ran
    # coarse steps refuse such calls (the timesteps are laid out per native token): every call runs native
    assert torch.equal(sample_i2v(apply_settings(model, COARSE_2X)), sample_i2v(model))


def test_a_coarse_call_places_each_token_at_the_centre_of_its_region(ltxv, monkeypatch):
    _, model, conds = ltxv
    grid = adapter_of(model).coarse_grid()
    seen = []
    own = type(grid).centred_coordinates

    def recording(self, host, call, latents, *args, **kwargs):
        tokens, coordinates = own(self, host, call, latents, *args, **kwargs)
        seen.append((call.factor, tuple(latents.shape), coordinates))
        return tokens, coordinates

    monkeypatch.setattr(type(grid), "centred_coordinates", recording)
    sample(apply_settings(model, COARSE_2X), conds)
    assert seen and all(factor == 2 and shape[-2:] == (2, 3) for factor, shape, _ in seen)
    start = seen[0][2] if seen[0][2].ndim == 3 else seen[0][2][..., 0]  # 0.12.1: (start, end) per token
    assert sorted(set(start[0, 1].tolist())) == [0.5, 2.5] and sorted(set(start[0, 2].tolist())) == [0.5, 2.5, 4.5]
    assert sorted(set(start[0, 0].tolist())) == [0.0, 1.0]  # frames stay native


def test_kept_tokens_take_their_own_positions_and_timesteps(ltxv):
    # 0.3.75's one table (B, 1, N, D/2, 2, 2); 0.12.1's (cos, sin, split) of (B, N, D) or split (B, H, N, d)
    index = torch.tensor([[0, 2, 5]])
    table = torch.arange(2 * 6 * 4 * 4, dtype=torch.float32).reshape(2, 1, 6, 4, 2, 2)[:1]
    assert torch.equal(gather_positions(table, index), table[:, :, [0, 2, 5]])
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    gathered = gather_positions((cos, sin, False), index)
    assert torch.equal(gathered[0], cos[:, [0, 2, 5]]) and torch.equal(gathered[1], sin[:, [0, 2, 5]]) and gathered[2] is False
    split = torch.randn(1, 4, 6, 3)
    assert torch.equal(gather_positions((split, split, True), index)[0], split[:, :, [0, 2, 5]])
    # and cut to kept heads (0, 2) of 4 (head_dim 4 here: 2 RoPE pairs a head)
    from comfyui_dynamic_dit.families.ltxv.blocks import LTXVWidthSelections
    from comfyui_dynamic_dit.families.ltxv.adapter import LTXVArchitecture

    arch = LTXVArchitecture(hidden_size=16, num_heads=4, head_dim=4, mlp_hidden=64, depth=1, in_channels=8, out_channels=8,
                            caption_channels=8)
    width = LTXVWidthSelections(arch, (0, 2), None, 1, None)
    pairs = torch.randn(1, 1, 6, 8, 2, 2)
    assert torch.equal(width.kept_head_positions(pairs), pairs[:, :, :, [0, 1, 4, 5]])
    cos = torch.randn(1, 6, 16)
    assert torch.equal(width.kept_head_positions((cos, cos, False))[0], cos[..., [0, 1, 2, 3, 8, 9, 10, 11]])
    split = torch.randn(1, 4, 6, 2)
    assert torch.equal(width.kept_head_positions((split, split, True))[1], split[:, [0, 2]])
    routing = adapter_of(ltxv[1]).token_routing()
    args = {"img": torch.randn(1, 6, 128), "vec": torch.randn(1, 6, 768), "pe": table, "txt": torch.randn(1, 8, 128)}
    reduced = routing.select(BlockRef("block", 0), args, index, None)
    assert torch.equal(reduced["vec"], args["vec"][:, [0, 2, 5]]) and torch.equal(reduced["img"], args["img"][:, [0, 2, 5]])


def test_a_block_at_full_internals_is_the_host_block_bit_for_bit(ltxv):
    _, model, conds = ltxv
    adapter, diffusion_model = adapter_of(model), model.model.diffusion_model
    seen = {}

    def capture(args, extra):
        seen["args"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        return extra["original_block"](args)

    captured = model.clone()
    captured.set_model_patch_replace(capture, "dit", "double_block", 1)
    sample(captured, conds, steps=1)
    block = BlockRef("block", 1)
    module = adapter.block_module(diffusion_model, block)
    args = seen["args"]
    expected = module(args["img"].clone(), context=args["txt"], attention_mask=args["attention_mask"],
                      timestep=args["vec"], pe=args["pe"])
    ours = adapter.run_block(module, block, {**args, "img": args["img"].clone()}, BlockInternals(), [],
                             adapter.call_layout({"x": torch.zeros(2, 128, 2, 4, 6), "timestep": torch.zeros(2),
                                                  "context": args["txt"]}), RunIndexCache())
    assert torch.equal(ours["img"], expected)
    # half the heads: the kept heads' q and k channels (normed in full), their v and their RoPE channels
    heads = (1, 3)
    kept = adapter.run_block(module, block, {**args, "img": args["img"].clone()}, BlockInternals(heads=heads), [],
                             adapter.call_layout({"x": torch.zeros(2, 128, 2, 4, 6), "timestep": torch.zeros(2),
                                                  "context": args["txt"]}), RunIndexCache())
    # the reference: the host's whole block with the left-out heads' output columns zeroed (q and k normed in full)
    hand = module.attn1
    saved = hand.to_out[0].weight.detach().clone()
    with torch.no_grad():
        for h in set(range(4)) - set(heads):
            hand.to_out[0].weight[:, h * 32:(h + 1) * 32] = 0
        masked = module(args["img"].clone(), context=args["txt"], attention_mask=args["attention_mask"],
                        timestep=args["vec"], pe=args["pe"])
        hand.to_out[0].weight.copy_(saved)
    torch.testing.assert_close(kept["img"], masked, rtol=1e-5, atol=1e-5)


def test_the_nodes_accept_an_ltxv_model_inside_inference_mode(ltxv):
    _, model, conds = ltxv
    assert_the_nodes_run_as_the_server_runs_them(model, lambda m: sample(m, conds), chain=(PATCH_SCHEDULER, *WIDTH_AND_ROUTER))


def test_ltx_2_is_refused_by_name():
    """LTX-2 (`LTXAV`, video and audio streams; ComfyUI 0.12 and newer) is the same module tree: refused, not patched."""
    import comfy.model_detection

    from comfyui_dynamic_dit.demo.reference import detected_model_config
    from comfyui_dynamic_dit.families import adapter_for

    config = tiny_ltxv.TinyLTXV()
    skeleton = {**config.checkpoint_skeleton(), "audio_adaln_single.linear.weight": torch.empty(768, 128, device="meta")}
    if (comfy.model_detection.detect_unet_config(skeleton, "") or {}).get("image_model") != "ltxav":
        pytest.skip("this ComfyUI has no LTX-2 (0.12 and newer do)")
    sizes = {"num_attention_heads": 4, "attention_head_dim": 32, "caption_channels": 64, "cross_attention_dim": 128}
    model = detected_model_config(skeleton, sizes, "ltxav", "LTX-2").get_model({})
    with pytest.raises(UnsupportedModelError, match=r"LTX-2's video and audio streams"):
        adapter_for(model.diffusion_model, type(model).__name__)
