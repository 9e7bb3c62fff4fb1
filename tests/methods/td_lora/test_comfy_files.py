"""TD-LoRA on a real ComfyUI model: standard LoRA key styles, equality with ComfyUI's own LoRA loader,
gates per step, composition (ComfyUI LoRA loaders, width slicing), replacement, FLOPs, clear errors."""
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import nodes as comfy_nodes

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings, plan_of
from comfyui_dynamic_dit.methods.td_lora.comfy_files import apply_td_lora, load_td_lora
from comfyui_dynamic_dit.core.flops import measure_flops
from comfyui_dynamic_dit.methods import DynamicMethod, register
from comfyui_dynamic_dit.methods.td_lora import runtime as td_lora
from comfyui_dynamic_dit.methods.td_lora.binding import architecture_metadata, block_linear_shapes, linear_shapes
from comfyui_dynamic_dit.families import block_linear_index
from comfyui_dynamic_dit.methods.td_lora.experts import GateWeights
from comfyui_dynamic_dit.methods.td_lora.file import ExpertLayer, random_td_lora, td_lora_state_dict
from comfyui_dynamic_dit.core.plan import MethodSettings

SAMPLE = dict(steps=3, cfg=2.0, seed=7)


@dataclass(frozen=True)
class FixedWidth(MethodSettings):
    """Test stand-in for the Width Patcher: half the heads and half the MLP groups in every block."""

    method: ClassVar[str] = "test.td_lora.fixed_width"


@register
class FixedWidthMethod(DynamicMethod):
    settings_type = FixedWidth
    order = 30

    def block_internals(self, call, block, args, internals):
        return internals.with_changes(heads=(0, 2), mlp_groups=(1, 3), mlp_group_count=4)


def with_width(model):
    return apply_settings(model, FixedWidth())


# --- LoRA files in the key styles ComfyUI reads ----------------------------------------------------
PATHS = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.2",
    "double_blocks.1.img_mod.lin",
    "single_blocks.2.linear1",
    "single_blocks.3.linear2",
    "img_in",
    "final_layer.linear",
]


def diffusers_pieces(shapes):
    """diffusers/ai-toolkit names: q, k, v (and the single blocks' MLP input) are separate pieces of a fused layer."""
    d = 256
    return {
        **{f"transformer.transformer_blocks.0.attn.to_{p}": (d, d) for p in "qkv"},
        "transformer.transformer_blocks.1.ff_context.net.2": shapes["double_blocks.1.txt_mlp.2"],
        "transformer.transformer_blocks.1.norm1.linear": shapes["double_blocks.1.img_mod.lin"],
        **{f"transformer.single_transformer_blocks.2.attn.to_{p}": (d, d) for p in "qkv"},
        "transformer.single_transformer_blocks.2.proj_mlp": (1024, d),
        "transformer.single_transformer_blocks.3.proj_out": shapes["single_blocks.3.linear2"],
        "transformer.x_embedder": shapes["img_in"],
    }


def lora_state(pieces, down, up, alpha=None, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, (out_features, in_features) in pieces.items():
        sd[f"{prefix}{down}"] = torch.randn(rank, in_features, generator=g) / math.sqrt(in_features)
        sd[f"{prefix}{up}"] = torch.randn(out_features, rank, generator=g) * 0.05
        if alpha is not None:
            sd[f"{prefix}.alpha"] = torch.tensor(alpha)
    return sd


def standard_lora(model, style: str, seed: int = 0) -> dict:
    shapes = linear_shapes(model.model.diffusion_model)
    if style == "kohya":
        sd = lora_state({f"lora_unet_{p.replace('.', '_')}": shapes[p] for p in PATHS}, ".lora_down.weight", ".lora_up.weight", 2.0, seed=seed)
        sd["lora_unet_double_blocks_0_img_attn_proj.diff_b"] = torch.randn(256, generator=torch.Generator().manual_seed(seed)) * 0.05
        return sd
    if style == "generic":
        return lora_state({f"diffusion_model.{p}": shapes[p] for p in PATHS}, ".lora_A.weight", ".lora_B.weight", 8.0, seed=seed)
    return lora_state(diffusers_pieces(shapes), ".lora_A.weight", ".lora_B.weight", seed=seed)


def comfy_lora(model, folder, name, state, strength):
    """ComfyUI's own LoraLoaderModelOnly on `state` written as `name`."""
    from safetensors.torch import save_file

    save_file(state, str(folder / name))
    return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def td(model, state, strength=1.0, metadata=None, source="test.safetensors"):
    return apply_td_lora(model, load_td_lora(model, state, metadata or {}, source), strength)


def run_of(model):
    return plan_of(model).telemetry.latest()


@pytest.fixture(scope="module")
def base_output(flux_model, conds):
    return tiny_flux.sample(flux_model, *conds, **SAMPLE)


# --- K = 1: the same output as ComfyUI's LoRA loader ----------------------------------------------
@pytest.mark.parametrize("style", ["kohya", "generic", "diffusers"])
def test_standard_lora_equals_comfy_lora_loader(flux_model, conds, lora_folder, base_output, float32_rounding, style):
    state = standard_lora(flux_model, style)
    expected = tiny_flux.sample(comfy_lora(flux_model, lora_folder, f"{style}.safetensors", state, 0.8), *conds, **SAMPLE)
    model = td(flux_model, state, 0.8)
    got = tiny_flux.sample(model, *conds, **SAMPLE)
    torch.testing.assert_close(got, expected, **float32_rounding(expected))
    assert (got - base_output).abs().max() > 0.05  # the LoRA really changes the image
    bound = plan_of(model).settings["td_lora"].bound
    assert {b.label for b in bound.blocks} == {"double.0", "double.1", "single.2", "single.3"}  # bypassed, not merged
    assert run_of(model).calls[0].executed.extra > 0


def test_k1_td_lora_file_equals_comfy_lora_loader(flux_model, conds, lora_folder, float32_rounding):
    """The same weights as a TD-LoRA file (K = 1, img_in outside the blocks merged) and as a kohya LoRA."""
    state = standard_lora(flux_model, "kohya")
    del state["lora_unet_double_blocks_0_img_attn_proj.diff_b"]
    layers = {
        path: ExpertLayer(
            state[f"lora_unet_{path.replace('.', '_')}.lora_down.weight"][None],
            state[f"lora_unet_{path.replace('.', '_')}.lora_up.weight"][None],
            2.0,
        )
        for path in PATHS
    }
    tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter_of(flux_model)))
    expected = tiny_flux.sample(comfy_lora(flux_model, lora_folder, "same.safetensors", state, 1.3), *conds, **SAMPLE)
    got = tiny_flux.sample(td(flux_model, tensors, 1.3, metadata), *conds, **SAMPLE)
    torch.testing.assert_close(got, expected, **float32_rounding(expected))


def constant_gate(weights: list[float], hidden: int = 8, embed: int = 16) -> GateWeights:
    """A gate that ignores sigma: softmax(log w) = w."""
    return GateWeights(torch.zeros(hidden, embed), torch.zeros(hidden), torch.zeros(len(weights), hidden), torch.tensor(weights).log())


@pytest.mark.parametrize("width", [False, True], ids=["full_width", "half_width"])
def test_k3_mixture_equals_the_merged_mixture_under_width_slicing(flux_model, conds, lora_folder, float32_rounding, width):
    """With sigma-independent gates g, a K = 3 TD-LoRA equals one plain LoRA of rank 3r with up = [g_k B_k].

    Under width slicing both are sliced (the bypass's B rows and A columns, the merged weight's rows
    and columns), so the sliced bypass must equal slicing the full bypass output.
    """
    gates = [0.5, 0.3, 0.2]
    shapes = block_linear_shapes(adapter_of(flux_model), flux_model.model.diffusion_model)
    layers, _ = random_td_lora(shapes, experts=3, rank=4, seed=3, scale=0.03)
    tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter_of(flux_model)), constant_gate(gates))
    merged = {}
    for path, layer in layers.items():
        prefix = f"diffusion_model.{path}"
        merged[f"{prefix}.lora_A.weight"] = layer.lora_A.reshape(12, -1)
        merged[f"{prefix}.lora_B.weight"] = torch.cat([g * layer.lora_B[k] for k, g in enumerate(gates)], dim=1)
        merged[f"{prefix}.alpha"] = torch.tensor(3 * layer.alpha)  # alpha / r of each expert = alpha' / (3 r)
    wrap = with_width if width else (lambda m: m)
    reference = wrap(comfy_lora(flux_model, lora_folder, "merged.safetensors", merged, 0.9))
    model = wrap(td(flux_model, tensors, 0.9, metadata))
    got = tiny_flux.sample(model, *conds, **SAMPLE)
    expected = tiny_flux.sample(reference, *conds, **SAMPLE)
    torch.testing.assert_close(got, expected, **float32_rounding(expected))
    run = run_of(model)
    assert run.calls[0].methods["td_lora"] == "K=3 x0.9 gates 0.50/0.30/0.20"
    if width:
        assert run.executed_flops < 0.8 * run.full_flops
        assert not torch.allclose(got, tiny_flux.sample(td(flux_model, tensors, 0.9, metadata), *conds, **SAMPLE), atol=1e-3)
        width_first = td(with_width(flux_model), tensors, 0.9, metadata)  # chaining order does not matter
        assert torch.equal(tiny_flux.sample(width_first, *conds, **SAMPLE), got)


# --- K > 1: gates per step ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k3_state(flux_model):
    layers, gate = random_td_lora(block_linear_shapes(adapter_of(flux_model), flux_model.model.diffusion_model), experts=3, rank=4, seed=5)
    return td_lora_state_dict(layers, architecture_metadata(adapter_of(flux_model)), gate)


def test_gates_change_with_sigma_and_show_per_step(flux_model, conds, k3_state, monkeypatch):
    gate_calls = []
    original = td_lora.GateNetwork.__call__
    monkeypatch.setattr(td_lora.GateNetwork, "__call__", lambda self, sigmas: gate_calls.append(sigmas) or original(self, sigmas))
    model = td(flux_model, *k3_state[:1], metadata=k3_state[1])
    tiny_flux.sample(model, *conds, steps=4, cfg=2.0, seed=1)
    run = run_of(model)
    assert len(gate_calls) == len(run.calls) == 4  # once per model call, not per block or layer
    assert all(s.shape == (2,) and s[0] == s[1] for s in gate_calls)  # per sample: cond and uncond rows
    shown = []
    for step in run.steps():
        text = step.methods["td_lora"]
        assert text.startswith("K=3 x1 gates ")
        values = [float(v) for v in text.rsplit(" ", 1)[1].split("/")]
        assert sum(values) == pytest.approx(1.0, abs=0.02)
        shown.append(values)
    assert len({tuple(v) for v in shown}) == 4  # a different mix at every step
    assert "td_lora: K=3" in run.table()


def test_flops_of_the_bypass_are_counted_and_measured(flux_model, conds, k3_state):
    model = td(flux_model, k3_state[0], metadata=k3_state[1])
    with torch.no_grad():
        measured, _ = measure_flops(lambda: tiny_flux.sample(model, *conds, steps=2, cfg=2.0, seed=1))
    run = run_of(model)
    assert run.executed_flops == pytest.approx(measured, rel=0.02)
    call = run.calls[0]
    b, n, t, r = call.batch, call.image_tokens, 8, 12
    dm = flux_model.model.diffusion_model
    adapter = adapter_of(flux_model)
    shapes = linear_shapes(dm)
    expected = 0.0
    for path, (block, name, _) in block_linear_index(adapter, dm).items():
        out_features, in_features = shapes[path]
        tokens = b if name.endswith(".lin") else b * (n if name.startswith("img") else t if name.startswith("txt") else n + t)
        expected += 2 * tokens * r * (in_features + out_features)
    expected += 2 * b * (64 * 32 + 32 * 3)  # the gate MLP, once per call
    assert call.executed.extra == pytest.approx(expected, rel=1e-9)
    assert call.executed.total == pytest.approx(call.full.total + expected, rel=1e-9)


# --- off means identical -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["k3", "kohya_with_outside_layers"])
def test_strength_zero_is_bit_identical(flux_model, conds, base_output, k3_state, kind):
    if kind == "k3":
        model = td(flux_model, k3_state[0], 0.0, k3_state[1])
    else:
        model = td(flux_model, standard_lora(flux_model, "kohya"), 0.0)
    assert torch.equal(tiny_flux.sample(model, *conds, **SAMPLE), base_output)
    assert model.patches == flux_model.patches
    assert run_of(model).plan == "every method off"


def test_strength_zero_stays_bit_identical_when_the_machines_free_memory_drops(flux_model, conds, base_output, k3_state,
                                                                              monkeypatch):
    """Issue item 5: on a busy machine the available RAM fell below ComfyUI's cond/uncond batching line
    (1.4 GB here) after `base_output` was sampled; the later run then made two separate model calls, which
    round differently, and this comparison failed. The suite pins ComfyUI's free-memory reading (conftest)."""
    import psutil

    machine = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: machine._replace(available=2**30))
    model = td(flux_model, k3_state[0], 0.0, k3_state[1])
    assert torch.equal(tiny_flux.sample(model, *conds, **SAMPLE), base_output)
    assert all(call.chunks == ("uncond", "cond") or call.chunks == ("cond", "uncond") for call in run_of(model).calls)


def test_strength_out_of_range_is_refused(flux_model, k3_state):
    options = dict(flux_model.model_options)
    for strength in (10.5, math.nan):
        with pytest.raises(ValueError, match="strength must be between -10 and 10"):
            td(flux_model, k3_state[0], strength, k3_state[1])
    assert flux_model.model_options == options


# --- composition -------------------------------------------------------------------------------------
def test_composes_with_comfy_lora_loader_in_either_order(flux_model, conds, lora_folder, k3_state):
    plain = standard_lora(flux_model, "generic", seed=9)
    first = comfy_lora(td(flux_model, k3_state[0], 0.7, k3_state[1]), lora_folder, "plain.safetensors", plain, 0.6)
    second = td(comfy_lora(flux_model, lora_folder, "plain.safetensors", plain, 0.6), k3_state[0], 0.7, k3_state[1])
    out = tiny_flux.sample(first, *conds, **SAMPLE)
    assert torch.equal(out, tiny_flux.sample(second, *conds, **SAMPLE))
    only_td = tiny_flux.sample(td(flux_model, k3_state[0], 0.7, k3_state[1]), *conds, **SAMPLE)
    assert not torch.allclose(out, only_td, atol=1e-3)


def test_applying_again_replaces_the_earlier_td_lora(flux_model, conds, k3_state):
    kohya = standard_lora(flux_model, "kohya", seed=4)  # with layers outside the blocks, merged as weight patches
    replaced = td(td(flux_model, kohya, 1.0), k3_state[0], 0.5, k3_state[1])
    direct = td(flux_model, k3_state[0], 0.5, k3_state[1])
    assert replaced.patches == direct.patches == flux_model.patches
    assert torch.equal(tiny_flux.sample(replaced, *conds, **SAMPLE), tiny_flux.sample(direct, *conds, **SAMPLE))
    back = td(td(flux_model, k3_state[0], 0.5, k3_state[1]), kohya, 1.0)
    assert set(back.patches) == {"diffusion_model.img_in.weight", "diffusion_model.final_layer.linear.weight",
                                 "diffusion_model.double_blocks.0.img_attn.proj.bias"}


# --- bad files: clear errors, the model stays unpatched ---------------------------------------------------
def _loha(model):
    g = torch.Generator().manual_seed(0)
    return {f"lora_unet_double_blocks_0_img_attn_qkv.hada_{w}": torch.randn(*s, generator=g) for w, s in
            (("w1_a", (768, 4)), ("w1_b", (4, 256)), ("w2_a", (768, 4)), ("w2_b", (4, 256)))}


def _with(style, **changes):
    def make(model):
        state = standard_lora(model, style)
        for key, value in changes.items():
            if value is None:
                state.pop(key)
            else:
                state[key] = value
        return state
    return make


QKV_K = "lora_unet_double_blocks_0_img_attn_qkv"
STANDARD_ERRORS = [
    ("sdxl_keys", lambda m: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
                             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
     "2 key\\(s\\) match no layer of this Flux.1 model, e.g. 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight'"),
    ("text_encoder_keys", _with("kohya", **{"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}),
     "1 key\\(s\\) match no layer .* 'lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight'"),
    ("missing_up", _with("kohya", **{f"{QKV_K}.lora_up.weight": None}),
     f"'{QKV_K}.lora_down.weight' was not used: layer '{QKV_K}' exists in this model, but its LoRA weights are incomplete"),
    ("shape", _with("kohya", **{f"{QKV_K}.lora_up.weight": torch.zeros(700, 4)}),
     f"^bad.safetensors is for another model, or another size of Flux.1: its '{QKV_K}' does not fit this model's "
     "'diffusion_model.double_blocks.0.img_attn.qkv.weight' \\(768, 256\\)"),
    ("outside_shape", _with("kohya", **{"lora_unet_img_in.lora_down.weight": torch.zeros(4, 60)}), "'lora_unet_img_in' does not fit"),
    ("bias_shape", _with("kohya", **{"lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.zeros(255)}),
     "'lora_unet_double_blocks_0_img_attn_proj' \\(diff\\) has shape \\(255,\\)"),
    ("loha", _loha, f"'{QKV_K}' \\(layer 'diffusion_model.double_blocks.0.img_attn.qkv.weight'\\) is LoHa"),
    ("dora", _with("kohya", **{f"{QKV_K}.dora_scale": torch.ones(768, 1)}), f"'{QKV_K}' .* is DoRA"),
    ("locon_mid", _with("kohya", **{f"{QKV_K}.lora_mid.weight": torch.ones(4, 4, 1, 1)}), f"'{QKV_K}' .* is LoCon"),
]


@pytest.mark.parametrize("make,message", [e[1:] for e in STANDARD_ERRORS], ids=[e[0] for e in STANDARD_ERRORS])
def test_bad_standard_loras_name_the_key_and_leave_the_model_alone(flux_model, make, message):
    options, patches = dict(flux_model.model_options), {k: list(v) for k, v in flux_model.patches.items()}
    with pytest.raises(ValueError, match=message):
        td(flux_model, make(flux_model), 1.0, source="bad.safetensors")
    assert flux_model.model_options == options and flux_model.patches == patches
