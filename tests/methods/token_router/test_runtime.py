"""Token Router: SDT / DiffCR / Reuse routing of image tokens, per block, per sample, per step.

Block-level tests drive the real executor (`RunContext.block_call`) around real tiny Flux blocks;
oracles are the unpatched block with an attention mask that hides the left-out image tokens (DiffCR)
or with its MLP zeroed (SDT). Run-level tests sample through ComfyUI.
"""
import copy
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch

from comfyui_dynamic_dit.families import BlockRef, CallLayout
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings, effective_weight, plan_of
from comfyui_dynamic_dit.core.executor import RunContext
from comfyui_dynamic_dit.core.flops import measure_flops
from comfyui_dynamic_dit.methods import DynamicMethod, register
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings, keep_count
from comfyui_dynamic_dit.methods.token_router.settings import parse_block_overrides
from comfyui_dynamic_dit.methods.token_router.file import load_router_file, save_router_file
from comfyui_dynamic_dit.core.plan import DynamicPlan, MethodSettings

B, T, GRID = 2, 6, (4, 5)
N = GRID[0] * GRID[1]
ALL_BLOCKS = dict(first_full=0, last_full=0)


# --- helpers -----------------------------------------------------------------------------------------
def block_args(dm, kind: str, seed: int = 0) -> dict:
    return tiny_flux.block_arguments(dm, kind, B, T, GRID, seed)


def cloned(args: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def host_block(module, kind):
    """The `original_block` ComfyUI hands to a block patch."""

    def original_block(args):
        if kind == "double":
            img, txt = module(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                              attn_mask=args.get("attn_mask"), transformer_options={})
            return {"img": img, "txt": txt}
        return {"img": module(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"), transformer_options={})}

    return original_block


def image_part(kind, tensor):
    return tensor if kind == "double" else tensor[:, T:]


class Harness:
    """One sampling run's executor around real blocks of the tiny Flux model, two steps (percent 0 and 0.5)."""

    def __init__(self, flux_model, settings, sigmas=(1.0, 0.5, 0.0)):
        self.adapter = adapter_of(flux_model)
        settings.validate(self.adapter)
        self.dm = flux_model.model.diffusion_model
        self.run = RunContext(DynamicPlan({settings.method: settings}), self.adapter, list(sigmas),
                              latent_shape=(B, 16, 8, 10), model_name="tiny", device="cpu",
                              sigma_to_percent=lambda s: 1.0 - s, weight_source=effective_weight)
        self.selected = []
        routing = self.adapter.token_routing()
        original = routing.select

        def spy(block, args, index, layout):
            self.selected.append(index.clone())
            return original(block, args, index, layout)

        routing.select = spy

    def call(self, sigma, kinds=(0,), uuids=None, batch=B):
        shape = CallLayout(batch=batch, image_tokens=N, text_tokens=T)
        return self.run.begin_call(sigma, list(kinds), uuids, shape, self.dm)

    def block(self, call, kind, index, args):
        ref = BlockRef(kind, index)
        module = self.adapter.block_module(self.dm, ref)
        with torch.no_grad():
            return self.run.block_call(call, ref, cloned(args), host_block(module, kind))


def random_router_file(path, adapter, router, ratios=None, seed=0, ratio_bounds=None):
    g = torch.Generator().manual_seed(seed)
    d = adapter.arch.hidden_size
    routers = {}
    for block in adapter.blocks:
        if router == "diffcr":
            routers[block.label] = {"weight": torch.randn(1, d, generator=g) * 0.2, "bias": torch.zeros(1)}
        else:
            r = d // 16
            routers[block.label] = {"fc1.weight": torch.randn(r, d, generator=g) / math.sqrt(d), "fc1.bias": torch.zeros(r),
                                    "fc2.weight": torch.randn(1, r, generator=g), "fc2.bias": torch.zeros(1)}
    save_router_file(path, adapter, router, routers, ratios=ratios, ratio_bounds=ratio_bounds)
    return load_router_file(path)


def router_scores(router_file, label, x):
    p = router_file.routers[label]
    if router_file.router == "diffcr":
        return torch.sigmoid(x @ p["weight"].T + p["bias"]).squeeze(-1)
    return (torch.nn.functional.gelu(x @ p["fc1.weight"].T + p["fc1.bias"]) @ p["fc2.weight"].T + p["fc2.bias"]).squeeze(-1)


def top_k(scores, k):
    return torch.topk(scores, k, dim=1).indices.sort(dim=1).values


def keys_mask(index, base=None):
    """An additive (B, 1, L, L) mask (ComfyUI's CPU attention adds masks) that lets every query see only
    the text and the kept image tokens, on top of `base`."""
    allowed = torch.zeros(index.shape[0], T + N, dtype=torch.bool)
    allowed[:, :T] = True
    allowed[torch.arange(index.shape[0])[:, None], T + index] = True
    base = torch.zeros(1, 1, T + N, T + N) if base is None else base
    return base.expand(index.shape[0], 1, T + N, T + N).masked_fill(~allowed[:, None, None, :], float("-inf"))


def kept_rows(tensor, index):
    return tensor[torch.arange(index.shape[0])[:, None], index]


def left_out(index):
    selected = torch.zeros(index.shape[0], N, dtype=torch.bool)
    selected[torch.arange(index.shape[0])[:, None], index] = True
    return ~selected


# --- settings ------------------------------------------------------------------------------------------
def test_parse_block_overrides():
    parsed = parse_block_overrides("single:10-30=0.5, double:0=1.0; single=0.7\nsingle:*=0.25")
    assert [(o.kind, o.first, o.last, o.ratio) for o in parsed] == [
        ("single", 10, 30, 0.5), ("double", 0, 0, 1.0), ("single", 0, None, 0.7), ("single", 0, None, 0.25)]
    assert parse_block_overrides("  ") == ()


@pytest.mark.parametrize(
    "text,message",
    [
        ("single:10-30", r"cannot read the block override 'single:10-30'"),
        ("single:a=0.5", r"cannot read the block override 'single:a=0.5'"),
        ("double:0=x", r"'double:0=x': 'x' is not a number"),
        ("single:3=1.5", r"'single:3=1.5': the keep ratio must be in \(0, 1\]"),
        ("single:3=0", r"must be in \(0, 1\], got 0"),
        ("single:5-2=0.5", r"'single:5-2=0.5': the range 5-2 runs backwards"),
    ],
)
def test_bad_block_overrides_name_the_bad_part(text, message):
    with pytest.raises(ValueError, match=message):
        parse_block_overrides("double:1=0.5, " + text)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(mode="fast"), "mode must be one of sdt, diffcr, reuse"),
        (dict(score="magic"), "score must be one of"),
        (dict(keep_start=0.0), r"keep_start must be in \(0, 1\]"),
        (dict(keep_end=1.2), r"keep_end must be in \(0, 1\]"),
        (dict(first_full=-1), "first_full must be 0 or more"),
        (dict(start_percent=0.8, end_percent=0.2), "start_percent <= end_percent"),
        (dict(overrides=parse_block_overrides("single:2-9=0.5")), r"'single:2-9=0.5': single blocks are numbered 0-3"),
        (dict(overrides=parse_block_overrides("triple:0=0.5")), r"no 'triple' blocks \(it has double, single\)"),
        (dict(score="router"), "needs a router file"),
    ],
)
def test_bad_settings_raise_before_patching(flux_model, changes, message):
    before = dict(flux_model.model_options)
    with pytest.raises(ValueError, match=message):
        apply_settings(flux_model, replace(TokenRouterSettings(), **changes))
    assert flux_model.model_options == before


def test_keep_count():
    assert keep_count(0.5, 13) == 7 and keep_count(0.5, 16) == 8 and keep_count(0.3, 10) == 3
    assert keep_count(0.01, 7) == 1 and keep_count(1.0, 7) == 7 and keep_count(0.99, 16) == 16


def test_keep_ratios_schedule_first_last_overrides_window(flux_model):
    blocks = adapter_of(flux_model).blocks  # double.0, double.1, single.0 .. single.3
    settings = TokenRouterSettings(keep_start=0.8, keep_end=0.4, first_full=1, last_full=1, start_percent=0.2,
                                   end_percent=0.6, overrides=parse_block_overrides("single:1=0.3, single:2-3=0.9"))
    ratio = lambda pos, p: settings.block_ratio(blocks, pos, p, None)  # noqa: E731
    assert ratio(1, 0.2) == pytest.approx(0.8) and ratio(1, 0.4) == pytest.approx(0.6) and ratio(1, 0.6) == pytest.approx(0.4)
    assert ratio(1, 0.1) == 1.0 and ratio(1, 0.7) == 1.0  # outside the window
    assert ratio(0, 0.4) == 1.0  # first block full
    assert ratio(3, 0.4) == 0.3  # override
    assert ratio(5, 0.4) == 0.9  # override beats "last block full"
    assert ratio(2, 0.4) == pytest.approx(0.6)
    assert [settings.lowest_ratio(blocks, i) for i in range(6)] == pytest.approx([1.0, 0.4, 0.4, 0.3, 0.9, 0.9])
    assert not TokenRouterSettings(keep_start=1.0, keep_end=1.0).enabled
    assert TokenRouterSettings(keep_start=1.0, keep_end=1.0, overrides=parse_block_overrides("single:0=0.5")).enabled


def test_learned_ratios_from_the_file(flux_model, tmp_path):
    adapter = adapter_of(flux_model)
    ratios = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.5, 1.0], [1.0, 1.0, 0.25, 0.25, 0.75, 1.0]])
    router = random_router_file(tmp_path / "r.safetensors", adapter, "diffcr", ratios=ratios)
    settings = TokenRouterSettings(router=router, **ALL_BLOCKS)
    assert settings.uses_file_ratios and settings.describe() == "token router (reuse, ratios of r.safetensors, input change)"
    blocks = adapter.blocks
    at = lambda pos, p: settings.block_ratio(blocks, pos, p, router.region_ratios(p))  # noqa: E731
    assert at(2, 0.1) == 0.5 and at(2, 0.5) == 0.25 and at(2, 1.0) == 0.25 and at(0, 0.9) == 1.0
    assert [settings.lowest_ratio(blocks, i) for i in range(6)] == [1.0, 0.5, 0.25, 0.25, 0.5, 1.0]
    assert not replace(settings, file_ratios=False, keep_start=1.0, keep_end=1.0).enabled
    assert not TokenRouterSettings(router=load_ratios_only(tmp_path, adapter, torch.ones(1, 6))).enabled


def load_ratios_only(tmp_path, adapter, ratios):
    save_router_file(tmp_path / "ratios.safetensors", adapter, "none", ratios=ratios)
    return load_router_file(tmp_path / "ratios.safetensors")


# --- DiffCR / Reuse / SDT at block level ------------------------------------------------------------------
@pytest.mark.parametrize("kind,index", [("double", 1), ("single", 2)])
@pytest.mark.parametrize("variant", ["plain", "shared_pe_and_mask"])
def test_diffcr_block_equals_the_block_with_left_out_tokens_masked(flux_model, tmp_path, kind, index, variant):
    """Kept tokens attend only to text + kept tokens, their update is scaled by the DiffCR score; others pass through."""
    h = Harness(flux_model, TokenRouterSettings(mode="diffcr", keep_start=0.5, keep_end=0.5, score="router", **ALL_BLOCKS,
                                                router=random_router_file(tmp_path / "d.safetensors", adapter_of(flux_model), "diffcr")))
    router = h.run.plan.settings["token_router"].router
    args = block_args(h.dm, kind, seed=index)
    base_mask = None
    if variant == "shared_pe_and_mask":
        args["pe"] = args["pe"][:1]  # RoPE shared by the batch
        base_mask = torch.randn(1, 1, T + N, T + N, generator=torch.Generator().manual_seed(9))
        args["attn_mask"] = base_mask
    x = image_part(kind, args["img"])
    k = keep_count(0.5, N)
    scores = router_scores(router, f"{kind}.{index}", x)
    expected_index = top_k(scores, k)
    got = h.block(h.call(1.0), kind, index, args)
    assert torch.equal(h.selected[-1], expected_index)
    oracle_args = {**cloned(args), "attn_mask": keys_mask(expected_index, base_mask)}
    module = h.adapter.block_module(h.dm, BlockRef(kind, index))
    with torch.no_grad():
        oracle = host_block(module, kind)(oracle_args)
    gate = kept_rows(scores, expected_index)[..., None]
    kept_in = kept_rows(x, expected_index)
    expected_kept = kept_in + gate * (kept_rows(image_part(kind, oracle["img"]), expected_index) - kept_in)
    torch.testing.assert_close(kept_rows(image_part(kind, got["img"]), expected_index), expected_kept, rtol=1e-5, atol=1e-5)
    assert torch.equal(image_part(kind, got["img"])[left_out(expected_index)], x[left_out(expected_index)])
    text = got["txt"] if kind == "double" else got["img"][:, :T]
    oracle_text = oracle["txt"] if kind == "double" else oracle["img"][:, :T]
    torch.testing.assert_close(text, oracle_text, rtol=1e-5, atol=1e-5)
    assert h.selected[-1].shape == (B, k)


def test_reuse_gives_left_out_tokens_their_last_update(flux_model):
    h = Harness(flux_model, TokenRouterSettings(mode="reuse", keep_start=0.25, keep_end=0.25, score="input_change", **ALL_BLOCKS))
    kind, index = "single", 1
    first, second = block_args(h.dm, kind, seed=1), block_args(h.dm, kind, seed=1)
    second["img"] = second["img"] + 0.3 * torch.randn(second["img"].shape, generator=torch.Generator().manual_seed(5))
    call = h.call(1.0)
    out_first = h.block(call, kind, index, first)  # no history yet: the whole block
    module = h.adapter.block_module(h.dm, BlockRef(kind, index))
    with torch.no_grad():
        assert torch.equal(out_first["img"], host_block(module, kind)(cloned(first))["img"])
    assert call.record.blocks["single.1"] == {"tokens": N, "of": N}
    assert call.record.methods["token_router"] == "1 block full: no history yet"
    call = h.call(0.5)
    out = h.block(call, kind, index, second)
    chosen = h.selected[-1]
    assert chosen.shape == (B, keep_count(0.25, N))
    update_first = image_part(kind, out_first["img"]) - image_part(kind, first["img"])
    x = image_part(kind, second["img"])
    out_img = image_part(kind, out["img"])
    mask = left_out(chosen)
    torch.testing.assert_close(out_img[mask], (x + update_first)[mask], rtol=0, atol=1e-6)
    with torch.no_grad():
        oracle = host_block(module, kind)({**cloned(second), "attn_mask": keys_mask(chosen)})
    torch.testing.assert_close(kept_rows(out_img, chosen), kept_rows(image_part(kind, oracle["img"]), chosen), rtol=1e-5, atol=1e-5)
    assert call.record.blocks["single.1"] == {"tokens": 5, "of": N}
    assert call.record.methods["token_router"] == "reuse keep 0.25 (1 block)"


def test_input_change_picks_the_tokens_whose_input_moved(flux_model):
    h = Harness(flux_model, TokenRouterSettings(mode="diffcr", keep_start=0.2, keep_end=0.2, score="input_change", **ALL_BLOCKS))
    args = block_args(h.dm, "double", seed=2)
    h.block(h.call(1.0), "double", 0, args)
    moved = torch.tensor([[1, 4, 7, 12], [0, 2, 3, 19]])
    changed = cloned(args)
    changed["img"][torch.arange(B)[:, None], moved] *= 1.5
    h.block(h.call(0.5), "double", 0, changed)
    assert torch.equal(h.selected[-1], moved)


def test_update_score_ages_tokens_so_none_starves(flux_model):
    h = Harness(flux_model, TokenRouterSettings(mode="diffcr", keep_start=0.25, keep_end=0.25, score="update", **ALL_BLOCKS),
                sigmas=[1.0 - i / 40 for i in range(40)] + [0.0])
    args = block_args(h.dm, "double", seed=3)
    seen = torch.zeros(B, N, dtype=torch.bool)
    h.block(h.call(1.0), "double", 0, args)
    for i in range(1, 16):
        h.block(h.call(1.0 - i / 40), "double", 0, args)
        seen[torch.arange(B)[:, None], h.selected[-1]] = True
    assert seen.all()


def test_sdt_skips_only_the_mlp_of_left_out_tokens(flux_model, tmp_path):
    adapter = adapter_of(flux_model)
    router = random_router_file(tmp_path / "dydit.safetensors", adapter, "dydit")
    h = Harness(flux_model, TokenRouterSettings(mode="sdt", keep_start=0.5, keep_end=0.5, score="router", router=router, **ALL_BLOCKS))
    args = block_args(h.dm, "double", seed=4)
    chosen = top_k(router_scores(router, "double.0", args["img"]), keep_count(0.5, N))
    call = h.call(1.0)
    got = h.block(call, "double", 0, args)
    module = adapter.block_module(h.dm, BlockRef("double", 0))
    no_mlp = copy.deepcopy(module)
    with torch.no_grad():
        no_mlp.img_mlp[2].weight.zero_()
        no_mlp.img_mlp[2].bias.zero_()
        full = host_block(module, "double")(cloned(args))
        skipped = host_block(no_mlp, "double")(cloned(args))
    mask = left_out(chosen)
    torch.testing.assert_close(got["img"][~mask], full["img"][~mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["img"][mask], skipped["img"][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["txt"], full["txt"], rtol=1e-5, atol=1e-5)
    assert h.selected == []  # SDT never gathers tokens out of the block
    assert call.block_work[BlockRef("double", 0)].mlp_image_tokens == keep_count(0.5, N)


def test_cond_and_uncond_are_routed_independently(flux_model):
    """A batched cond+uncond call routes exactly like two separate calls: history is kept per chunk."""
    settings = TokenRouterSettings(mode="reuse", keep_start=0.5, keep_end=0.5, score="update", **ALL_BLOCKS)
    args = [block_args(flux_model.model.diffusion_model, "single", seed=s) for s in (10, 11)]
    later = [{**a, "img": a["img"] * 1.1 + 0.05} for a in args]
    batched = Harness(flux_model, settings)
    joined = [{k: (torch.cat((a[k], b[k])) if k in ("img", "vec", "pe") else a[k]) for k in a} for a, b in ((args[0], args[1]), (later[0], later[1]))]
    uuids = ["c", "u"]
    batched.block(batched.call(1.0, (0, 1), uuids, batch=2 * B), "single", 0, joined[0])
    out_batched = batched.block(batched.call(0.5, (0, 1), uuids, batch=2 * B), "single", 0, joined[1])
    separate = Harness(flux_model, settings)
    outs = []
    for step, sigma in enumerate((1.0, 0.5)):
        for chunk, kind in enumerate((0, 1)):
            outs.append(separate.block(separate.call(sigma, (kind,), [uuids[chunk]]), "single", 0, (args, later)[step][chunk]))
    torch.testing.assert_close(out_batched["img"], torch.cat((outs[2]["img"], outs[3]["img"])), rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.selected[-1], torch.cat(separate.selected[-2:]))


@pytest.mark.parametrize("kind", ["double", "single"])
def test_diffcr_flops_halve_for_image_tokens_and_attention_shrinks(flux_model, tmp_path, kind):
    adapter = adapter_of(flux_model)
    router = random_router_file(tmp_path / "d.safetensors", adapter, "diffcr")
    args = block_args(flux_model.model.diffusion_model, kind, seed=7)
    a = adapter.arch
    d, m, heads, hd = a.hidden_size, a.mlp_hidden, a.num_heads, a.head_dim
    per_image_token = 2 * d * (3 * d + d + 2 * m) if kind == "double" else 2 * (d * (3 * d + m) + (d + m) * d)
    k = keep_count(0.5, N)
    attention = lambda length: 4 * B * heads * length * length * hd  # noqa: E731

    def measured(settings):
        h = Harness(flux_model, settings)
        call = h.call(1.0)
        flops, _ = measure_flops(lambda: h.block(call, kind, 0, args))
        assert call.record.executed.total == pytest.approx(flops, rel=1e-6)  # telemetry agrees with FlopCounterMode
        return flops, call

    full, _ = measured(TokenRouterSettings(mode="diffcr", keep_start=1.0, keep_end=1.0))
    reduced, call = measured(TokenRouterSettings(mode="diffcr", score="router", router=router, keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
    router_cost = 2 * B * N * d
    saved = per_image_token * B * (N - k) + attention(T + N) - attention(T + k)
    assert reduced == pytest.approx(full - saved + router_cost, rel=1e-6)
    work = call.block_work[BlockRef(kind, 0)]
    assert (work.image_tokens, work.text_tokens) == (k, T)
    breakdown = adapter.block_flops(BlockRef(kind, 0), work)
    full_breakdown = adapter.block_flops(BlockRef(kind, 0), replace(work, image_tokens=N))
    assert breakdown.attention / full_breakdown.attention == pytest.approx(((T + k) / (T + N)) ** 2)
    assert reduced < 0.65 * full


def test_sdt_flops_drop_only_in_the_mlp(flux_model, tmp_path):
    adapter = adapter_of(flux_model)
    router = random_router_file(tmp_path / "y.safetensors", adapter, "dydit")
    d, m = adapter.arch.hidden_size, adapter.arch.mlp_hidden
    for kind in ("double", "single"):
        args = block_args(flux_model.model.diffusion_model, kind, seed=8)
        h = Harness(flux_model, TokenRouterSettings(mode="sdt", score="router", router=router, keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
        call = h.call(1.0)
        reduced, _ = measure_flops(lambda: h.block(call, kind, 0, args))
        module = adapter.block_module(h.dm, BlockRef(kind, 0))
        full, _ = measure_flops(lambda: host_block(module, kind)(cloned(args)))
        r = d // 16
        router_cost = 2 * B * N * r * (d + 1)
        mlp_saved = 2 * 2 * d * m * B * (N - keep_count(0.5, N))
        assert reduced == pytest.approx(full - mlp_saved + router_cost, rel=1e-6)
        breakdown = call.record.executed
        assert breakdown.attention == pytest.approx(4 * B * adapter.arch.num_heads * (T + N) ** 2 * adapter.arch.head_dim)


# --- whole sampling runs -------------------------------------------------------------------------------
SAMPLE = dict(steps=3, seed=21, cfg=2.0, height=16, width=20)


@pytest.mark.parametrize(
    "mode,score",
    [("sdt", "update"), ("diffcr", "input_change"), ("reuse", "input_change"), ("reuse", "update"), ("diffcr", "router"), ("sdt", "router")],
)
def test_keep_ratio_one_is_bit_identical(flux_model, conds, tmp_path, mode, score):
    router = random_router_file(tmp_path / "r.safetensors", adapter_of(flux_model), "diffcr") if score == "router" else None
    reference = tiny_flux.sample(flux_model, *conds, **SAMPLE)
    full = TokenRouterSettings(mode=mode, score=score, router=router, keep_start=1.0, keep_end=1.0)
    assert not full.enabled
    assert torch.equal(tiny_flux.sample(apply_settings(flux_model, full), *conds, **SAMPLE), reference)
    # enabled, but k = ceil(0.99 * 80) = 80 = N: every block runs in full, history and all
    almost = replace(full, keep_start=0.99, keep_end=0.99, **ALL_BLOCKS)
    model = apply_settings(flux_model, almost)
    assert torch.equal(tiny_flux.sample(model, *conds, **SAMPLE), reference)
    run = plan_of(model).telemetry.latest()
    assert run.executed_flops >= run.full_flops and run.calls[-1].blocks["single.3"] == {"tokens": 80, "of": 80}


def test_every_block_kept_full_is_bit_identical(flux_model, conds):
    reference = tiny_flux.sample(flux_model, *conds, **SAMPLE)
    model = apply_settings(flux_model, TokenRouterSettings(mode="diffcr", keep_start=0.3, keep_end=0.3, first_full=3, last_full=3))
    assert torch.equal(tiny_flux.sample(model, *conds, **SAMPLE), reference)
    window = apply_settings(flux_model, TokenRouterSettings(mode="diffcr", keep_start=0.3, start_percent=0.95, end_percent=0.99))
    assert torch.equal(tiny_flux.sample(window, *conds, **SAMPLE), reference)


@pytest.mark.parametrize("mode,score", [("diffcr", "update"), ("reuse", "input_change"), ("sdt", "update")])
def test_half_the_tokens_telemetry_matches_flop_counter(flux_model, conds, mode, score):
    model = apply_settings(flux_model, TokenRouterSettings(mode=mode, score=score, keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(model, *conds, **SAMPLE))
    run = plan_of(model).telemetry.latest()
    assert torch.isfinite(out).all()
    assert run.executed_flops == pytest.approx(measured, rel=0.02)
    first, later = run.calls[0], run.calls[1:]
    assert first.methods["token_router"] == "6 blocks full: no history yet"
    assert all(c.methods["token_router"] == f"{mode} keep 0.50 (6 blocks)" for c in later)
    assert all(c.blocks[b.label] == {"tokens": 40, "of": 80} for c in later for b in adapter_of(flux_model).blocks)
    ratio = sum(c.executed.total for c in later) / sum(c.full.total for c in later)
    assert ratio < (0.62 if mode != "sdt" else 0.85)
    assert not torch.equal(out, tiny_flux.sample(flux_model, *conds, **SAMPLE))


def test_samples_of_one_batch_get_their_own_tokens_with_cfg(flux_model, conds, monkeypatch):
    selected = []
    routing_type = type(adapter_of(flux_model).token_routing())
    original = routing_type.select

    def spy(self, block, args, index, layout):
        selected.append(index.clone())
        return original(self, block, args, index, layout)

    monkeypatch.setattr(routing_type, "select", spy)
    latent = torch.randn(2, 16, 16, 20, generator=torch.Generator().manual_seed(1))
    model = apply_settings(flux_model, TokenRouterSettings(mode="diffcr", score="update", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
    out = tiny_flux.sample(model, *conds, steps=3, seed=2, cfg=3.0, latent=latent)
    assert torch.isfinite(out).all()
    run = plan_of(model).telemetry.latest()
    assert all(sorted(c.chunks) == ["cond", "uncond"] and c.batch == 4 for c in run.calls)
    assert selected and all(index.shape == (4, 40) for index in selected)
    # two samples, and cond vs uncond of one sample, each pick their own tokens
    assert any(not torch.equal(index[0], index[1]) for index in selected)
    assert any(not torch.equal(index[0], index[2]) for index in selected)


@pytest.mark.parametrize("mode", ["sdt", "diffcr", "reuse"])
@pytest.mark.parametrize("batch,height,width", [(1, 2, 26), (3, 6, 10), (3, 3, 9)], ids=["13_tokens_b1", "15_tokens_b3", "10_tokens_odd_latent_b3"])
def test_odd_and_prime_token_counts(flux_model, conds, mode, batch, height, width):
    model = apply_settings(flux_model, TokenRouterSettings(mode=mode, score="update", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
    out = tiny_flux.sample(model, *conds, steps=3, seed=3, cfg=2.0, batch=batch, height=height, width=width)
    assert out.shape == (batch, 16, height, width) and torch.isfinite(out).all()
    tokens = math.ceil(height / 2) * math.ceil(width / 2)
    run = plan_of(model).telemetry.latest()
    assert run.calls[-1].blocks["single.2"] == {"tokens": math.ceil(tokens / 2), "of": tokens}


@dataclass(frozen=True)
class CoarseOnOddSteps(MethodSettings):
    """Test double for the patch scheduler: odd steps run the model on the top half of the latent only."""

    method: ClassVar[str] = "test.coarse_odd_steps"


@register
class CoarseOnOddStepsMethod(DynamicMethod):
    settings_type = CoarseOnOddSteps
    order = 10

    def wrap_model_call(self, call, model_call, proceed):
        x = model_call.arguments["x"]
        if call.step.step % 2 == 0:
            return proceed(model_call)
        top = proceed(model_call.with_arguments(x=x[:, :, : x.shape[2] // 2]))
        return torch.cat((top, x[:, :, x.shape[2] // 2:] * 0), dim=2)


@pytest.mark.parametrize("mode", ["diffcr", "reuse", "sdt"])
def test_token_count_changes_reset_the_history(flux_model, conds, mode):
    model = apply_settings(flux_model, TokenRouterSettings(mode=mode, score="input_change", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
    model = apply_settings(model, CoarseOnOddSteps())
    out = tiny_flux.sample(model, *conds, steps=4, seed=3, cfg=1.0, height=16, width=16)
    assert torch.isfinite(out).all()
    run = plan_of(model).telemetry.latest()
    notes = [c.methods["token_router"] for c in run.calls]
    assert notes == ["6 blocks full: no history yet"] * 4  # every step changed the token count: no routing on stale state
    model = apply_settings(flux_model, TokenRouterSettings(mode=mode, score="input_change", keep_start=0.5, keep_end=0.5, **ALL_BLOCKS))
    tiny_flux.sample(model, *conds, steps=4, seed=3, cfg=1.0, height=16, width=16)
    assert [c.methods["token_router"] for c in plan_of(model).telemetry.latest().calls][1:] == [f"{mode} keep 0.50 (6 blocks)"] * 3


def test_heun_and_a_router_file_with_learned_ratios(flux_model, conds, tmp_path):
    adapter = adapter_of(flux_model)
    ratios = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.5, 1.0], [1.0, 0.25, 0.25, 0.25, 0.25, 1.0]])
    router = random_router_file(tmp_path / "r.safetensors", adapter, "diffcr", ratios=ratios, ratio_bounds=torch.tensor([0, 0.4, 1]))
    model = apply_settings(flux_model, TokenRouterSettings(mode="diffcr", score="router", router=router, **ALL_BLOCKS))
    out = tiny_flux.sample(model, *conds, steps=4, seed=1, cfg=2.0, sampler="heun", height=16, width=16)
    assert torch.isfinite(out).all()
    run = plan_of(model).telemetry.latest()
    firsts = [c for c in run.calls if c.sigma > 0.95]  # sigma percent 0 (Flux shift: 4 steps are at 0, 0.25, 0.5, 0.75)
    lasts = [c for c in run.calls if c.sigma < 0.8]  # sigma percent 0.5 and 0.75: the second region
    assert firsts and all(c.blocks["single.0"] == {"tokens": 32, "of": 64} and "double.0" not in c.blocks for c in firsts)
    assert lasts and all(c.blocks["single.0"] == {"tokens": 16, "of": 64} for c in lasts)


def test_blocks_without_a_router_in_the_file_run_in_full(flux_model, conds, tmp_path):
    g = torch.Generator().manual_seed(4)
    routers = {label: {"fc1.weight": torch.randn(8, 256, generator=g), "fc1.bias": torch.zeros(8),
                       "fc2.weight": torch.randn(1, 8, generator=g), "fc2.bias": torch.zeros(1)} for label in ("double.1", "single.2")}
    save_router_file(tmp_path / "part.safetensors", adapter_of(flux_model), "dydit", routers)
    settings = TokenRouterSettings(mode="diffcr", score="router", router=load_router_file(tmp_path / "part.safetensors"),
                                   keep_start=0.5, keep_end=0.5, **ALL_BLOCKS)
    model = apply_settings(flux_model, settings)
    tiny_flux.sample(model, *conds, **SAMPLE)
    calls = plan_of(model).telemetry.latest().calls
    assert all(c.blocks == {"double.1": {"tokens": 40, "of": 80}, "single.2": {"tokens": 40, "of": 80}} for c in calls)
    assert all(c.methods["token_router"] == "diffcr keep 0.50 (2 blocks)" for c in calls)
