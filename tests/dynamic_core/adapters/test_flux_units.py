"""The adapter's width seam: per-unit contributions, neutral calibration inputs, timestep features.

Oracles are masked copies of the real block (as test oracles only): with every output column but one
unit's zeroed, the block's residual update is exactly that unit's gated share.
"""
import copy

import pytest
import torch

from comfyui_dynamic_dit.dynamic_core.adapters import BlockRef
from comfyui_dynamic_dit.dynamic_core.comfy_integration.patching import adapter_of, effective_weight
from comfyui_dynamic_dit.dynamic_core.slicing import unit_indices

B, T, GRID = 2, 5, (3, 4)
N = GRID[0] * GRID[1]
GROUPS = 8


def block_args(dm, kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = dm.hidden_size
    img_ids = torch.zeros(GRID[0], GRID[1], 3)
    img_ids[..., 1] = torch.arange(GRID[0])[:, None]
    img_ids[..., 2] = torch.arange(GRID[1])[None, :]
    ids = torch.cat((torch.zeros(B, T, 3), img_ids.reshape(1, N, 3).expand(B, -1, -1)), dim=1)
    args = {"vec": torch.randn(B, d, generator=g), "pe": dm.pe_embedder(ids), "attn_mask": None, "transformer_options": {}}
    if kind == "double":
        return args | {"img": torch.randn(B, N, d, generator=g), "txt": torch.randn(B, T, d, generator=g)}
    return args | {"img": torch.randn(B, T + N, d, generator=g)}


def run_block(module, kind, args):
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    if kind == "double":
        img, txt = module(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"], attn_mask=None, transformer_options={})
        return torch.cat((txt, img), dim=1)
    return module(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=None, transformer_options={})


def keep_only(layer, cols, keep_bias=False):
    with torch.no_grad():
        kept = layer.weight[:, cols].clone()
        layer.weight.zero_()
        layer.weight[:, cols] = kept
        if not keep_bias and layer.bias is not None:
            layer.bias.zero_()


def head_share_oracle(module, kind, arch, args, head):
    """Mean over all tokens of ||the residual update of a block where only `head` reaches the output||."""
    oracle = copy.deepcopy(module)
    cols = unit_indices((head,), arch.head_dim, torch.device("cpu"))
    if kind == "double":
        for stream in ("img", "txt"):
            keep_only(getattr(oracle, f"{stream}_attn").proj, cols)
            keep_only(getattr(oracle, f"{stream}_mlp")[2], torch.tensor([], dtype=torch.long))
    else:
        keep_only(oracle.linear2, cols)
    before = args["img"] if kind == "single" else torch.cat((args["txt"], args["img"]), dim=1)
    return (run_block(oracle, kind, args) - before).norm(dim=-1).mean()


def group_share_oracle(module, kind, arch, args, group):
    size = arch.mlp_hidden // GROUPS
    cols = unit_indices((group,), size, torch.device("cpu"))
    if kind == "single":
        oracle = copy.deepcopy(module)
        keep_only(oracle.linear2, arch.hidden_size + cols)
        return (run_block(oracle, kind, args) - args["img"]).norm(dim=-1).mean()
    # double: the MLP sees the stream after attention, so compare with the block whose MLP adds nothing
    only, none = copy.deepcopy(module), copy.deepcopy(module)
    for stream in ("img", "txt"):
        keep_only(getattr(only, f"{stream}_mlp")[2], cols)
        keep_only(getattr(none, f"{stream}_mlp")[2], torch.tensor([], dtype=torch.long))
    return (run_block(only, kind, args) - run_block(none, kind, args)).norm(dim=-1).mean()


@pytest.mark.parametrize("kind,index", [("double", 1), ("single", 2)])
def test_measured_units_are_each_units_share_of_the_output(flux_model, kind, index):
    adapter = adapter_of(flux_model)
    dm = flux_model.model.diffusion_model
    block = BlockRef(kind, index)
    module = adapter.block_module(dm, block)
    args = block_args(dm, kind, seed=index)
    with torch.no_grad():
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}  # blocks add in place
        out, heads, groups = adapter.measure_units(module, block, fresh, GROUPS, effective_weight)
        expected_out = run_block(module, kind, args)
        got_out = out["img"] if kind == "single" else torch.cat((out["txt"], out["img"]), dim=1)
        expected_heads = torch.stack([head_share_oracle(module, kind, adapter.arch, args, h) for h in range(adapter.arch.num_heads)])
        expected_groups = torch.stack([group_share_oracle(module, kind, adapter.arch, args, g) for g in range(GROUPS)])
    assert torch.equal(got_out, expected_out)  # measuring does not change the block's output
    assert heads.shape == (adapter.arch.num_heads,) and groups.shape == (GROUPS,)
    torch.testing.assert_close(heads, expected_heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(groups, expected_groups, rtol=1e-4, atol=1e-6)
    assert heads.std() > 0 and groups.std() > 0


def test_neutral_arguments_run_the_model(flux_model, tiny_config):
    adapter = adapter_of(flux_model)
    dm = flux_model.model.diffusion_model
    latent = torch.randn(1, adapter.output_channels, 8, 8)
    arguments = adapter.neutral_arguments(latent, torch.tensor([0.5]), text_tokens=3, guidance=3.5)
    assert arguments["context"].shape == (1, 3, tiny_config.context_dim) and not arguments["context"].any()
    assert arguments["y"].shape == (1, tiny_config.vec_dim) and not arguments["y"].any()
    assert arguments["guidance"].tolist() == [3.5]
    assert adapter.call_shape(arguments).image_tokens == 16
    with torch.no_grad():
        out = dm(**arguments, transformer_options={})
    assert out.shape == latent.shape and torch.isfinite(out).all()


def test_timestep_features_are_the_models_own_time_embedding(flux_model):
    adapter = adapter_of(flux_model)
    dm = flux_model.model.diffusion_model
    from comfy.ldm.flux.layers import timestep_embedding

    t = torch.tensor([0.3])
    with torch.no_grad():
        features = adapter.timestep_features(dm, t, torch.float32)
        expected = dm.time_in(timestep_embedding(t, 256))
    assert features.shape == (1, adapter.arch.hidden_size)
    assert torch.equal(features, expected)
    with torch.no_grad():
        assert not torch.allclose(features, adapter.timestep_features(dm, torch.tensor([0.9]), torch.float32))
