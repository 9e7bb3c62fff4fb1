"""TD-LoRA core: the gating network, the stacked bypass and its slicing, the file format and its checks.

Sampling runs (equality with ComfyUI's LoRA loader, composition, FLOPs) are in
tests/methods/td_lora/test_comfy_files.py; the node in tests/nodes/test_td_lora.py.
"""
import math

import pytest
import torch

from comfyui_dynamic_dit.core.slicing import AxisSelection

from comfyui_dynamic_dit.integration.patching import adapter_of
from comfyui_dynamic_dit.methods import REGISTRY
from comfyui_dynamic_dit.methods.td_lora import runtime as td_lora
from comfyui_dynamic_dit.core.low_rank import GatedBypass, expert_columns
from comfyui_dynamic_dit.methods.td_lora.runtime import per_sample_sigmas
from comfyui_dynamic_dit.methods.td_lora.binding import architecture_metadata, bind_layers, block_linear_shapes
from comfyui_dynamic_dit.methods.td_lora.experts import GateNetwork, LowRankLayer, sinusoidal_embedding
from comfyui_dynamic_dit.methods.td_lora.file import ExpertLayer, load_td_lora_file, parse_td_lora, random_td_lora, save_td_lora_file, td_lora_state_dict

QKV = "double_blocks.0.img_attn.qkv"


def block_shapes(model) -> dict:
    return block_linear_shapes(adapter_of(model), model.model.diffusion_model)


def one_layer(experts=3, rank=4, out_features=12, in_features=10, alpha=2.0, seed=0):
    layers, gate = random_td_lora({"layer": (out_features, in_features)}, experts, rank, seed=seed)
    expert = layers["layer"]
    layer = LowRankLayer.from_experts(expert.lora_A, expert.lora_B, alpha)
    return expert, layer, GateNetwork(gate) if gate is not None else None


def test_sinusoidal_embedding_follows_the_documented_formula():
    sigmas = torch.tensor([0.25, 1.0])
    got = sinusoidal_embedding(sigmas, 6, time_scale=1000.0, max_period=10000.0)
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(3)])
    t = torch.tensor([250.0, 1000.0])[:, None] * freqs[None]
    torch.testing.assert_close(got, torch.cat((torch.cos(t), torch.sin(t)), dim=1))
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(sigmas, 5)


def test_gates_sum_to_one_per_sample_and_change_with_sigma():
    _, _, gate = one_layer(experts=4)
    sigmas = torch.linspace(0.0, 1.0, 9)
    gates = gate(sigmas)
    assert gates.shape == (9, 4)
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(9), rtol=0, atol=1e-6)
    assert (gates >= 0).all()
    assert (gates[0] - gates[-1]).abs().max() > 0.05  # noisy and clean steps mix the experts differently
    for i, sigma in enumerate(sigmas):  # per sample: each row is the gate of its own sigma
        torch.testing.assert_close(gate(sigma[None])[0], gates[i])


def test_stacked_bypass_is_the_gated_sum_of_experts_per_sample():
    expert, layer, gate = one_layer(experts=3, rank=4, alpha=2.0)
    strength = 0.7
    sigmas = torch.tensor([0.9, 0.2])
    gates = gate(sigmas)
    assert not torch.allclose(gates[0], gates[1])
    x = torch.randn(2, 5, 10)
    down, up = layer.cast(strength, x)
    got = GatedBypass(down, up, expert_columns(gates, layer.rank))(x, None, None)
    expected = torch.zeros(2, 5, 12)
    for b in range(2):
        for k in range(3):
            delta = expert.lora_B[k] @ expert.lora_A[k] * (2.0 / 4)
            expected[b] += strength * gates[b, k] * (x[b] @ delta.T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    vec = x[:, 0]  # modulation layers get (B, in)
    torch.testing.assert_close(GatedBypass(down, up, expert_columns(gates, layer.rank))(vec, None, None), expected[:, 0], rtol=1e-5, atol=1e-6)


def test_expert_matrices_round_trip():
    expert, layer, _ = one_layer(experts=3, rank=2)
    lora_a, lora_b = layer.expert_matrices()
    assert torch.equal(lora_a, expert.lora_A) and torch.equal(lora_b, expert.lora_B)


def test_sliced_bypass_equals_slicing_the_full_bypass():
    _, layer, gate = one_layer(experts=3, rank=4, out_features=16, in_features=12)
    x = torch.randn(2, 7, 12)
    gates = expert_columns(gate(torch.tensor([0.8, 0.3])), layer.rank)
    bypass = GatedBypass(*layer.cast(1.0, x), gates)
    rows = AxisSelection([(0, 1), (3, 5), (9, 10), (15, 16)])
    cols = AxisSelection([(1, 3), (5, 6), (11, 12)])
    row_index, col_index = rows.index("cpu"), cols.index("cpu")
    masked = torch.zeros_like(x)
    masked[..., col_index] = x[..., col_index]  # what the full layer sees when the other inputs are dropped
    full = bypass(masked, None, None)
    torch.testing.assert_close(bypass(x[..., col_index], rows, cols), full[..., row_index], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bypass(x, rows, None), bypass(x, None, None)[..., row_index], rtol=1e-5, atol=1e-6)
    assert bypass.flops(14, 4, 5) == 2 * 14 * 12 * (4 + 5)


def test_gates_of_another_batch_are_refused():
    _, layer, gate = one_layer()
    x = torch.randn(3, 4, 10)
    bypass = GatedBypass(*layer.cast(1.0, x), expert_columns(gate(torch.tensor([0.5, 0.4])), layer.rank))
    with pytest.raises(RuntimeError, match="batch of 3"):
        bypass(x, None, None)


def test_per_sample_sigmas_tile_over_cond_and_uncond_chunks():
    options = {"transformer_options": {"sigmas": torch.tensor([0.9, 0.4])}}
    assert per_sample_sigmas(options, 4, 0.1).tolist() == pytest.approx([0.9, 0.4, 0.9, 0.4])
    assert per_sample_sigmas({}, 3, 0.25).tolist() == [0.25] * 3


# --- file format -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k3_file(flux_model, tmp_path_factory):
    layers, gate = random_td_lora(block_shapes(flux_model), experts=3, rank=4, seed=1)
    path = tmp_path_factory.mktemp("td") / "k3.safetensors"
    save_td_lora_file(path, layers, architecture_metadata(adapter_of(flux_model)), gate, metadata={"name": "test"})
    return path, layers, gate


def test_file_round_trip(k3_file, flux_model):
    path, layers, gate = k3_file
    lora = load_td_lora_file(path)
    assert lora.experts == 3 and lora.gating == "shared" and set(lora.layers) == set(layers)
    assert lora.architecture["architecture"] == "flux" and lora.architecture["hidden_size"] == "256"
    assert lora.architecture["name"] == "test"
    lora_a, lora_b = lora.layers[QKV].expert_matrices()
    assert torch.equal(lora_a, layers[QKV].lora_A) and torch.equal(lora_b, layers[QKV].lora_B)
    assert torch.equal(lora.gate.weights.weight2, gate.weight2)
    bound = bind_layers(lora, adapter_of(flux_model), flux_model.model.diffusion_model)
    assert sum(len(v) for v in bound.blocks.values()) == len(layers) and not bound.outside


def test_per_layer_gates_round_trip(flux_model, tmp_path):
    shapes = {QKV: block_shapes(flux_model)[QKV], "single_blocks.1.linear2": block_shapes(flux_model)["single_blocks.1.linear2"]}
    layers, shared = random_td_lora(shapes, experts=2, rank=3, per_layer_gates=True, seed=2)
    assert shared is None
    save_td_lora_file(tmp_path / "per_layer.safetensors", layers, architecture_metadata(adapter_of(flux_model)))
    lora = load_td_lora_file(tmp_path / "per_layer.safetensors")
    assert lora.gating == "per_layer" and lora.gate is None
    sigmas = torch.tensor([0.3])
    for path in shapes:
        assert torch.equal(lora.layers[path].gate.weights.weight1, layers[path].gate.weight1)
    assert not torch.allclose(lora.layers[QKV].gate(sigmas), lora.layers["single_blocks.1.linear2"].gate(sigmas))


def test_a_plain_k1_file_needs_no_gate(flux_model, tmp_path):
    layers, gate = random_td_lora({QKV: block_shapes(flux_model)[QKV]}, experts=1, rank=8)
    assert gate is None
    tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter_of(flux_model)))
    assert metadata["gating"] == "none" and not any("gate" in k for k in tensors)


def _state(flux_model, experts=3):
    shapes = block_shapes(flux_model)
    layers, gate = random_td_lora({QKV: shapes[QKV], "single_blocks.0.linear1": shapes["single_blocks.0.linear1"]}, experts, 4)
    tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter_of(flux_model)), gate)
    return dict(tensors), dict(metadata)


def _drop(key):
    return lambda t, m: t.pop(key)


def _set(key, value):
    return lambda t, m: t.__setitem__(key, value)


def _meta(key, value):
    return lambda t, m: m.__setitem__(key, value)


FILE_ERRORS = [
    ("missing_lora_B", _drop(f"{QKV}.lora_B"), f"missing key '{QKV}.lora_B'"),
    ("missing_alpha", _drop(f"{QKV}.alpha"), f"missing key '{QKV}.alpha'"),
    ("missing_gate", _drop("gate.2.bias"), "missing key 'gate.2.bias'"),
    ("orphan_lora_B", _drop(f"{QKV}.lora_A"), f"has no matching '{QKV}.lora_A'"),
    ("wrong_K", _set(f"{QKV}.lora_A", torch.zeros(2, 4, 256)), rf"'{QKV}.lora_A' has shape \(2, 4, 256\), expected \(3, 4, \*\)"),
    ("wrong_rank", _set(f"{QKV}.lora_B", torch.zeros(3, 768, 5)), rf"'{QKV}.lora_B' has shape \(3, 768, 5\)"),
    ("gate_experts", _set("gate.2.weight", torch.zeros(2, 32)), r"'gate.2.weight' has shape \(2, 32\), expected \(3, 32\)"),
    ("nan", _set(f"{QKV}.lora_B", torch.full((3, 768, 4), math.nan)), f"'{QKV}.lora_B' contains NaN"),
    ("integer", _set(f"{QKV}.lora_A", torch.zeros(3, 4, 256, dtype=torch.int32)), f"'{QKV}.lora_A' must be a floating-point"),
    ("unknown_key", _set("double_blocks.0.img_attn.qkv.lora_magnitude", torch.zeros(3)), "unexpected key 'double_blocks.0.img_attn.qkv.lora_magnitude'"),
    ("format", _meta("format", "router"), "metadata 'format' is 'router'"),
    ("newer", _meta("version", "2"), "version 2 is newer"),
    ("experts", _meta("experts", "three"), "metadata 'experts' must be an integer"),
    ("gating", _meta("gating", "none"), "K=3 needs 'shared'"),
    ("time_scale", _meta("gate_time_scale", "-1"), "'gate_time_scale' must be a positive number"),
    ("no_architecture", lambda t, m: m.pop("architecture"), "no 'architecture'"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in FILE_ERRORS], ids=[c[0] for c in FILE_ERRORS])
def test_file_errors_name_the_key(flux_model, change, message):
    tensors, metadata = _state(flux_model)
    change(tensors, metadata)
    with pytest.raises(ValueError, match=message):
        parse_td_lora(tensors, metadata, "broken.safetensors")


MODEL_ERRORS = [
    ("other_width", _meta("hidden_size", "3072"), "made for another model: metadata 'hidden_size' is '3072'"),
    ("other_family", _meta("architecture", "wan"), "metadata 'architecture' is 'wan'"),
    ("other_depth", _meta("depth_single", "38"), "metadata 'depth_single' is '38'"),
    ("no_such_block", lambda t, m: t.update({k.replace("double_blocks.0.", "double_blocks.7."): t.pop(k) for k in list(t) if k.startswith(QKV)}),
     "'double_blocks.7.img_attn.qkv' names no linear layer"),
    ("shape", lambda t, m: t.update({f"{QKV}.lora_A": torch.zeros(3, 4, 300)}),
     f"'{QKV}' adapts a 300 -> 768 layer, but this model's '{QKV}' is 256 -> 768"),
    ("k3_outside_blocks", lambda t, m: t.update({"img_in.lora_A": torch.zeros(3, 4, 64), "img_in.lora_B": torch.zeros(3, 256, 4), "img_in.alpha": torch.tensor(4.0)}),
     "'img_in' is outside the transformer blocks and has K=3"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in MODEL_ERRORS], ids=[c[0] for c in MODEL_ERRORS])
def test_files_for_another_model_are_refused_by_key(flux_model, change, message):
    tensors, metadata = _state(flux_model)
    change(tensors, metadata)
    lora = parse_td_lora(tensors, metadata, "other.safetensors")
    with pytest.raises(ValueError, match=message):
        bind_layers(lora, adapter_of(flux_model), flux_model.model.diffusion_model)


def test_k1_layers_outside_the_blocks_are_merged_instead(flux_model):
    tensors, metadata = _state(flux_model, experts=1)
    tensors |= {"img_in.lora_A": torch.zeros(1, 4, 64), "img_in.lora_B": torch.zeros(1, 256, 4), "img_in.alpha": torch.tensor(4.0)}
    bound = bind_layers(parse_td_lora(tensors, metadata, "k1"), adapter_of(flux_model), flux_model.model.diffusion_model)
    assert list(bound.outside) == ["img_in"]


def test_truncated_file_is_a_clear_error(k3_file, tmp_path):
    data = k3_file[0].read_bytes()
    for cut in (len(data) // 2, 40):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}.safetensors is not a readable safetensors file .*truncated"):
            load_td_lora_file(broken)


def test_saving_validates_what_a_trainer_writes(flux_model, tmp_path):
    layers, gate = random_td_lora({QKV: block_shapes(flux_model)[QKV]}, experts=3, rank=4)
    bad = {QKV: ExpertLayer(layers[QKV].lora_A, layers[QKV].lora_B[:2], 4.0)}
    with pytest.raises(ValueError, match=rf"'{QKV}.lora_B' has shape \(2, 768, 4\)"):
        save_td_lora_file(tmp_path / "bad.safetensors", bad, architecture_metadata(adapter_of(flux_model)), gate)
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match="K=3 experts need a gate"):
        save_td_lora_file(tmp_path / "bad.safetensors", layers, architecture_metadata(adapter_of(flux_model)))


def test_the_method_is_registered_inside_the_width_method():
    assert REGISTRY[td_lora.TDLoRASettings.method] is td_lora.TDLoRAMethod
    assert td_lora.TDLoRAMethod.order == 40  # after width (30): its extras follow the kept heads / groups
