"""Reduced Flux blocks: the host's block forward on sliced weights / token subsets.

Oracles are masked copies of the real block (dropped heads' projection columns or dropped MLP
units zeroed): the reduced block must give the same numbers while the FLOPs really drop.
"""
import copy

import pytest
import torch

from comfyui_dynamic_dit.families import BlockInternals, BlockRef, BlockWork, CallLayout
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import adapter_of, effective_weight
from comfyui_dynamic_dit.core.flops import measure_flops
from comfyui_dynamic_dit.core.slicing import RunIndexCache, unit_indices

B, T, GRID = 2, 6, (4, 5)
N = GRID[0] * GRID[1]


def block_args(dm, kind: str, seed: int = 0) -> dict:
    return tiny_flux.block_arguments(dm, kind, B, T, GRID, seed)


def block_under_test(flux_model, kind: str, index: int, seed: int = 0):
    """The adapter, the real block module, its ref and realistic patch arguments."""
    adapter = adapter_of(flux_model)
    dm = flux_model.model.diffusion_model
    ref = BlockRef(kind, index)
    return adapter, adapter.block_module(dm, ref), ref, block_args(dm, kind, seed)


def layout(text_tokens):
    """A call layout with `text_tokens` text tokens (what a reduced single block needs to know)."""
    return CallLayout(batch=B, image_tokens=N, text_tokens=text_tokens)


def run_original(module, kind, args):
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    if kind == "double":
        img, txt = module(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"], attn_mask=None, transformer_options={})
        return {"img": img, "txt": txt}
    return {"img": module(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=None, transformer_options={})}


def run_reduced(adapter, module, ref, args, internals, cache=None, flop_log=None):
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return adapter.run_block(module, ref, args, internals, flop_log if flop_log is not None else [], layout(T), cache or RunIndexCache())



def masked(module, kind, arch, heads=None, groups=None, group_count=None, drop_mlp=False):
    """A copy of the block where dropped heads / MLP units contribute nothing."""
    copy_ = copy.deepcopy(module)
    d, hd = arch.hidden_size, arch.head_dim
    with torch.no_grad():
        if heads is not None:
            dropped = unit_indices(tuple(h for h in range(arch.num_heads) if h not in heads), hd, torch.device("cpu"))
            if kind == "double":
                copy_.img_attn.proj.weight[:, dropped] = 0
                copy_.txt_attn.proj.weight[:, dropped] = 0
            else:
                copy_.linear2.weight[:, dropped] = 0
        if groups is not None or drop_mlp:
            size = arch.mlp_hidden // (group_count or 1)
            kept = groups if groups is not None else ()
            dropped = unit_indices(tuple(g for g in range(group_count or 1) if g not in kept), size, torch.device("cpu"))
            if kind == "double":
                for mlp in (copy_.img_mlp, copy_.txt_mlp) if not drop_mlp else (copy_.img_mlp,):
                    mlp[2].weight[:, dropped] = 0
                    if drop_mlp:
                        mlp[2].bias.zero_()
            else:
                copy_.linear2.weight[:, d + dropped] = 0
    return copy_


CASES = [
    ("heads", dict(heads=(0, 2))),
    ("mlp_groups", dict(mlp_groups=(1, 2), mlp_group_count=4)),
    ("both", dict(heads=(1, 2, 3), mlp_groups=(0,), mlp_group_count=4)),
]


@pytest.mark.parametrize("kind,index", [("double", 1), ("single", 2)])
@pytest.mark.parametrize("name,changes", CASES, ids=[c[0] for c in CASES])
def test_reduced_width_equals_masked_block(flux_model, kind, index, name, changes):
    adapter, module, ref, args = block_under_test(flux_model, kind, index)
    internals = BlockInternals(**changes)
    oracle = masked(module, kind, adapter.arch, internals.heads, internals.mlp_groups, internals.mlp_group_count)
    with torch.no_grad():
        expected = run_original(oracle, kind, args)
        got = run_reduced(adapter, module, ref, args, internals)
        full = run_original(module, kind, args)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[key], full[key], atol=1e-4)


@pytest.mark.parametrize("kind,index", [("double", 0), ("single", 3)])
def test_all_heads_and_groups_kept_is_the_full_block(flux_model, kind, index):
    adapter, module, ref, args = block_under_test(flux_model, kind, index)
    internals = BlockInternals(heads=tuple(range(4)), mlp_groups=tuple(range(4)), mlp_group_count=4)
    with torch.no_grad():
        got, full = run_reduced(adapter, module, ref, args, internals), run_original(module, kind, args)
    for key in full:
        torch.testing.assert_close(got[key], full[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,index", [("double", 0), ("single", 1)])
def test_mlp_token_subset_skips_the_mlp_for_the_others(flux_model, kind, index):
    adapter, module, ref, args = block_under_test(flux_model, kind, index, seed=3)
    tokens = torch.stack([torch.tensor([0, 3, 7, 8, 19]), torch.tensor([1, 2, 5, 11, 12])])  # per sample
    with torch.no_grad():
        got = run_reduced(adapter, module, ref, args, BlockInternals(mlp_tokens=tokens))
        full = run_original(module, kind, args)
        no_mlp = run_original(masked(module, kind, adapter.arch, group_count=1, drop_mlp=True), kind, args)
    offset = 0 if kind == "double" else T
    selected = torch.zeros(B, N, dtype=torch.bool)
    selected[torch.arange(B)[:, None], tokens] = True
    image = got["img"][:, offset:]
    torch.testing.assert_close(image[selected], full["img"][:, offset:][selected], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image[~selected], no_mlp["img"][:, offset:][~selected], rtol=1e-5, atol=1e-5)
    text = got["txt"] if kind == "double" else got["img"][:, :T]
    full_text = full["txt"] if kind == "double" else full["img"][:, :T]
    torch.testing.assert_close(text, full_text, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize(
    "internals,part,ratio",
    [
        (BlockInternals(heads=(0, 1)), ("qkv", "attention", "proj"), 0.5),
        (BlockInternals(mlp_groups=(0, 3), mlp_group_count=4), ("mlp",), 0.5),
    ],
    ids=["heads_half", "mlp_half"],
)
def test_flops_really_drop(flux_model, kind, internals, part, ratio):
    adapter, module, ref, args = block_under_test(flux_model, kind, 0)
    with torch.no_grad():
        full_measured, _ = measure_flops(lambda: run_original(module, kind, args))
        reduced_measured, _ = measure_flops(lambda: run_reduced(adapter, module, ref, args, internals))
    full_work = BlockWork(batch=B, image_tokens=N, text_tokens=T)
    full = adapter.block_flops(ref, full_work)
    reduced = adapter.block_flops(ref, adapter.reduced_work(ref, full_work, internals))
    assert full.total == pytest.approx(full_measured, rel=0.01)
    assert reduced.total == pytest.approx(reduced_measured, rel=0.01)
    for name in part:
        assert getattr(reduced, name) == pytest.approx(ratio * getattr(full, name), rel=0.02)
    assert full_measured - reduced_measured == pytest.approx(sum((1 - ratio) * getattr(full, n) for n in part), rel=0.02)


def test_mlp_token_subset_flops(flux_model):
    for kind in ("double", "single"):
        adapter, module, ref, args = block_under_test(flux_model, kind, 0)
        internals = BlockInternals(mlp_tokens=torch.arange(10).expand(B, -1))
        with torch.no_grad():
            measured, _ = measure_flops(lambda: run_reduced(adapter, module, ref, args, internals))
        work = adapter.reduced_work(ref, BlockWork(batch=B, image_tokens=N, text_tokens=T), internals)
        assert work.mlp_image_tokens == 10
        assert adapter.block_flops(ref, work).total == pytest.approx(measured, rel=0.01)


class LowRank:
    """A LoRA-like extra: x @ A^T @ B^T, sliced like the layer it is added to."""

    def __init__(self, out_features, in_features, rank=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(rank, in_features, generator=g) * 0.1
        self.B = torch.randn(out_features, rank, generator=g) * 0.1

    def __call__(self, x, rows, cols):
        A = self.A if cols is None else cols.take(self.A, 1)
        B = self.B if rows is None else rows.take(self.B, 0)
        return x @ A.T @ B.T

    def flops(self, tokens, in_features, out_features):
        return 2.0 * tokens * self.A.shape[0] * (in_features + out_features)


@pytest.mark.parametrize("kind,index", [("double", 1), ("single", 0)])
def test_linear_extras_follow_the_slicing(flux_model, kind, index):
    adapter, module, ref, args = block_under_test(flux_model, kind, index, seed=5)
    layers = adapter.linear_layers(module, ref)
    extras = {name: LowRank(*layer.weight.shape, seed=i) for i, (name, layer) in enumerate(layers.items())}
    merged = copy.deepcopy(module)
    with torch.no_grad():
        for name, layer in adapter.linear_layers(merged, ref).items():
            layer.weight += extras[name].B @ extras[name].A
    tokens = torch.stack([torch.tensor([0, 4, 9]), torch.tensor([2, 3, 18])])
    for internals in (
        BlockInternals(extras=extras),
        BlockInternals(heads=(1, 3), mlp_groups=(2,), mlp_group_count=4, extras=extras),
        BlockInternals(heads=(0, 1, 2), mlp_tokens=tokens, extras=extras),
    ):
        oracle_internals = internals.with_changes(extras={})
        log = []
        with torch.no_grad():
            got = run_reduced(adapter, module, ref, args, internals, flop_log=log)
            expected = (
                run_original(merged, kind, args)
                if oracle_internals.is_full
                else run_reduced(adapter, merged, ref, args, oracle_internals)
            )
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)
        assert log and sum(log) > 0


def test_reduced_weights_are_views_or_one_gather_and_never_kept(flux_model, monkeypatch):
    """Kept units in one run are a view of the stored weight (no copy); scattered units are one
    index_select per call whose index tensor is made once per decision; nothing outlives the call,
    and an in-place weight change is seen at once."""
    import comfyui_dynamic_dit.core.slicing as slicing

    adapter, module, ref, args = block_under_test(flux_model, "double", 0)
    module = copy.deepcopy(module)
    taken = []
    original_take = slicing.AxisSelection.take

    def spy(self, tensor, dim):
        out = original_take(self, tensor, dim)
        taken.append((self.contiguous, out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(slicing.AxisSelection, "take", spy)
    cache = RunIndexCache()
    prefix = BlockInternals(heads=(0, 1), mlp_groups=(0, 1), mlp_group_count=4)
    with torch.no_grad():
        first = run_reduced(adapter, module, ref, args, prefix, cache)
        contiguous = [shares for is_run, shares in taken if is_run]
        assert contiguous and all(contiguous)  # head/MLP-group prefixes: views of the stored weights
        taken.clear()
        scattered = BlockInternals(heads=(0, 2), mlp_groups=(1, 3), mlp_group_count=4)
        run_reduced(adapter, module, ref, args, scattered, cache)
        assert taken and not any(shares for _, shares in taken)  # one gathered copy per call
        made = dict(cache._entries)
        run_reduced(adapter, module, ref, args, scattered, cache)
        assert cache._entries.keys() == made.keys()
        assert all(cache._entries[k] is made[k] for k in made)  # the decision's selections are reused
        module.img_attn.qkv.weight.mul_(2.0)  # an in-place weight change (e.g. a hook keyframe)
        third = run_reduced(adapter, module, ref, args, prefix, cache)
        assert not torch.allclose(first["img"], third["img"])


# --- the width seam: per-unit contributions, calibration inputs, timestep features ---------------
# Oracles are masked copies of the real block: with every output column but one unit's zeroed, the
# block's residual update is exactly that unit's gated share.
UNIT_GROUPS = 8
NOTHING = torch.tensor([], dtype=torch.long)


def joint(out: dict) -> torch.Tensor:
    return torch.cat((out["txt"], out["img"]), dim=1) if "txt" in out else out["img"]


def keep_only(layer, cols):
    """Only input columns `cols` reach the output (no bias either)."""
    with torch.no_grad():
        kept = layer.weight[:, cols].clone()
        layer.weight.zero_()
        layer.weight[:, cols] = kept
        layer.bias.zero_()


def head_share_oracle(module, kind, arch, args, head):
    """Mean over all tokens of ||the residual update of a block where only `head` reaches the output||."""
    oracle = copy.deepcopy(module)
    cols = unit_indices((head,), arch.head_dim, torch.device("cpu"))
    if kind == "double":
        for stream in ("img", "txt"):
            keep_only(getattr(oracle, f"{stream}_attn").proj, cols)
            keep_only(getattr(oracle, f"{stream}_mlp")[2], NOTHING)
    else:
        keep_only(oracle.linear2, cols)
    return (joint(run_original(oracle, kind, args)) - joint(args)).norm(dim=-1).mean()


def group_share_oracle(module, kind, arch, args, group):
    size = arch.mlp_hidden // UNIT_GROUPS
    cols = unit_indices((group,), size, torch.device("cpu"))
    if kind == "single":
        oracle = copy.deepcopy(module)
        keep_only(oracle.linear2, arch.hidden_size + cols)
        return (joint(run_original(oracle, kind, args)) - joint(args)).norm(dim=-1).mean()
    # double: the MLP sees the stream after attention, so compare with the block whose MLP adds nothing
    only, none = copy.deepcopy(module), copy.deepcopy(module)
    for stream in ("img", "txt"):
        keep_only(getattr(only, f"{stream}_mlp")[2], cols)
        keep_only(getattr(none, f"{stream}_mlp")[2], NOTHING)
    return (joint(run_original(only, kind, args)) - joint(run_original(none, kind, args))).norm(dim=-1).mean()


@pytest.mark.parametrize("kind,index", [("double", 1), ("single", 2)])
def test_measured_units_are_each_units_share_of_the_output(flux_model, kind, index):
    adapter, module, block, args = block_under_test(flux_model, kind, index, seed=index)
    with torch.no_grad():
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}  # blocks add in place
        out, heads, groups = adapter.width_units().measure_units(module, block, fresh, UNIT_GROUPS, effective_weight)
        expected_out = joint(run_original(module, kind, args))
        got_out = joint(out)
        expected_heads = torch.stack([head_share_oracle(module, kind, adapter.arch, args, h) for h in range(adapter.arch.num_heads)])
        expected_groups = torch.stack([group_share_oracle(module, kind, adapter.arch, args, g) for g in range(UNIT_GROUPS)])
    assert torch.equal(got_out, expected_out)  # measuring does not change the block's output
    assert heads.shape == (adapter.arch.num_heads,) and groups.shape == (UNIT_GROUPS,)
    torch.testing.assert_close(heads, expected_heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(groups, expected_groups, rtol=1e-4, atol=1e-6)
    assert heads.std() > 0 and groups.std() > 0


def test_neutral_arguments_run_the_model(flux_model, tiny_config):
    adapter = adapter_of(flux_model)
    dm = flux_model.model.diffusion_model
    latent = torch.randn(1, adapter.arch.out_channels, 8, 8)
    arguments = adapter.width_units().neutral_arguments(latent, torch.tensor([0.5]), text_tokens=3, guidance=3.5)
    assert arguments["context"].shape == (1, 3, tiny_config.context_dim) and not arguments["context"].any()
    assert arguments["y"].shape == (1, tiny_config.vec_dim) and not arguments["y"].any()
    assert arguments["guidance"].tolist() == [3.5]
    assert adapter.call_layout(arguments).image_tokens == 16
    with torch.no_grad():
        out = dm(**arguments, transformer_options={})
    assert out.shape == latent.shape and torch.isfinite(out).all()


def test_timestep_features_are_the_models_own_time_embedding(flux_model):
    adapter = adapter_of(flux_model)
    dm = flux_model.model.diffusion_model
    from comfy.ldm.flux.layers import timestep_embedding

    t = torch.tensor([0.3])
    with torch.no_grad():
        features = adapter.width_units().timestep_features(dm, t, torch.float32)
        expected = dm.time_in(timestep_embedding(t, 256))
    assert features.shape == (1, adapter.arch.hidden_size)
    assert torch.equal(features, expected)
    with torch.no_grad():
        assert not torch.allclose(features, adapter.width_units().timestep_features(dm, torch.tensor([0.9]), torch.float32))
