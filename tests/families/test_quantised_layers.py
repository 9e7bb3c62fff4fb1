"""Width on fp8 and scaled-fp8 weights (ComfyUI's `comfy.ops`): the host's own op runs on the kept part.

Full width is the unpatched model bit for bit; a reduced block equals the same reduced block of a
float32 model holding the dequantised weights (what the host's op computes with).
"""
import pytest
import torch

import comfy.ops

from comfyui_dynamic_dit.families import BlockInternals, BlockRef, CallLayout
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings
from comfyui_dynamic_dit.methods.width.settings import WidthSettings
from comfyui_dynamic_dit.core.slicing import RunIndexCache

CONFIG = tiny_flux.TinyFlux(depth=1, depth_single_blocks=2, seed=11)
FP8 = torch.float8_e4m3fn
HAS_SCALED_FP8 = hasattr(comfy.ops, "scaled_fp8_ops")


def quantised_model(scaled: bool):
    """fp8 weights computed in float32 (ComfyUI's manual cast); `scaled`: per-layer scale_weight, as in
    `fp8_scaled` checkpoints. Returns the model and a float32 model with the dequantised weights."""
    dense = reference_model.build_model(CONFIG)
    model = reference_model.build_model(CONFIG, dtype=FP8, manual_cast_dtype=torch.float32, scaled_fp8=FP8 if scaled else None)
    reference = reference_model.build_model(CONFIG)
    source, target, dequantised = dense.model.diffusion_model, model.model.diffusion_model, reference.model.diffusion_model
    with torch.no_grad():
        for name, param in target.named_parameters():
            path, _, leaf = name.rpartition(".")
            if leaf in ("scale_weight", "scale_input"):
                continue
            original = source.get_parameter(name).float()
            layer = target.get_submodule(path)
            scale = torch.tensor(1.0)
            if scaled and leaf == "weight" and isinstance(getattr(layer, "scale_weight", None), torch.Tensor):
                scale = original.abs().max() / 448.0
                layer.scale_weight.copy_(scale)
            param.copy_((original / scale).to(param.dtype))
            dequantised.get_parameter(name).copy_(param.float() * scale)
    return model, reference


KINDS = ["fp8", pytest.param("scaled_fp8", marks=pytest.mark.skipif(not HAS_SCALED_FP8, reason="this ComfyUI loads scaled fp8 as mixed-precision ops"))]


@pytest.mark.parametrize("kind", KINDS)
def test_full_width_is_the_unpatched_quantised_model(kind, conds):
    model, _ = quantised_model(kind == "scaled_fp8")
    unpatched = tiny_flux.sample(model, *conds, steps=3, cfg=2.0, seed=2)
    full = apply_settings(model, WidthSettings(noisy_width=1.0, clean_width=1.0))
    assert torch.equal(tiny_flux.sample(full, *conds, steps=3, cfg=2.0, seed=2), unpatched)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kind_index", [("double", 0), ("single", 1)])
def test_reduced_width_is_the_dense_result_on_the_dequantised_kept_weights(kind, kind_index):
    model, reference = quantised_model(kind == "scaled_fp8")
    block_kind, index = kind_index
    adapter, ref = adapter_of(model), BlockRef(block_kind, index)
    args = tiny_flux.block_arguments(model.model.diffusion_model, block_kind, 2, 5, (4, 4), seed=4)
    internals = BlockInternals(heads=(0, 3), mlp_groups=(1, 2), mlp_group_count=4)

    def run(patcher):
        module = adapter.block_module(patcher.model.diffusion_model, ref)
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        with torch.no_grad():
            return adapter.run_block(module, ref, fresh, internals, [], CallLayout(batch=2, image_tokens=16, text_tokens=5), RunIndexCache())

    got, expected = run(model), run(reference)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_fp8_matmul_layers_keep_the_hosts_fp8_path_on_the_kept_rows(monkeypatch):
    """Under `--fast fp8_matrix_mult` ComfyUI's fp8 layers (`comfy.ops.fp8_ops`) call `fp8_linear`; a
    reduced layer must take that same path, handed only the kept rows (not a dequantised copy)."""
    model, _ = quantised_model(False)
    diffusion_model = model.model.diffusion_model
    for layer in diffusion_model.modules():
        if isinstance(layer, comfy.ops.manual_cast.Linear):
            layer.__class__ = comfy.ops.fp8_ops.Linear
            layer.scale_weight = layer.scale_input = None
    seen = []

    def recording_fp8_linear(layer, x):  # records, then lets the layer fall back (no fp8 matmul on this CPU)
        seen.append((tuple(layer.weight.shape), layer.weight.dtype))
        return None

    monkeypatch.setattr(comfy.ops, "fp8_linear", recording_fp8_linear)
    adapter, ref = adapter_of(model), BlockRef("single", 1)
    args = tiny_flux.block_arguments(diffusion_model, "single", 2, 5, (4, 4), seed=4)
    internals = BlockInternals(heads=(0, 3), mlp_groups=(1, 2), mlp_group_count=4)
    module = adapter.block_module(diffusion_model, ref)
    with torch.no_grad():
        adapter.run_block(module, ref, args, internals, [], CallLayout(batch=2, image_tokens=16, text_tokens=5), RunIndexCache())
    full_rows = module.linear1.weight.shape[0]
    assert seen and all(dtype == FP8 for _, dtype in seen)  # the host's fp8 path, on fp8 weights
    assert any(shape[0] < full_rows for shape, _ in seen if shape[1] == module.linear1.weight.shape[1])  # kept rows only
    assert any(shape[1] < module.linear2.weight.shape[1] for shape, _ in seen if shape[0] == module.linear2.weight.shape[0])
