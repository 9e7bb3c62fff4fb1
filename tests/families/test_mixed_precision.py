"""Checkpoints ComfyUI 0.12.1 loads as mixed-precision ops (`*_fp8mixed` / `*_fp8_scaled` files: per-layer fp8 weights
with a `comfy_quant` marker and a weight scale, held as the host's QuantizedTensor, inputs quantised on the fly): the
methods run on the host's own quantised layers. Built as the host loads such a file: its detection reads the markers
(`detect_layer_quantization`) and picks `mixed_precision_ops`, and the model loads the quantised state dict."""
from __future__ import annotations

import json

import pytest
import torch

import comfy.model_patcher
import comfy.utils

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration.patching import apply_settings
from comfyui_dynamic_dit.demo.reference import frozen_as_the_host_leaves_it
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.methods.width.calibration import CalibrationSpec
from comfyui_dynamic_dit.methods.width.settings import WidthSettings

pytestmark = pytest.mark.skipif(not hasattr(comfy.utils, "detect_layer_quantization"),
                                reason="this ComfyUI has no mixed-precision checkpoints (0.12 and newer do)")

CONFIG = tiny_flux.TinyFlux(depth=1, depth_single_blocks=2, seed=11)
SAMPLE = dict(steps=3, cfg=2.0, seed=2)


def _patcher(state_dict: dict, quantised: bool):
    model_config = reference_model.host_model_config(CONFIG)
    if quantised:  # as comfy.sd loads such a file: the quantisation markers, then a compute (manual cast) dtype
        model_config.quant_config = comfy.utils.detect_layer_quantization(state_dict, "")
        model_config.set_inference_dtype(torch.float32, torch.float32)
    model = model_config.get_model(state_dict, "")
    model.load_model_weights(dict(state_dict), "")
    frozen_as_the_host_leaves_it(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


@pytest.fixture(scope="module")
def mixed():
    """A tiny Flux whose block linears are stored as an fp8mixed checkpoint stores them, and a float32 model holding
    the same weights dequantised."""
    dense = reference_model.build_model(CONFIG).model.diffusion_model.state_dict()
    quantised, dequantised = {}, {}
    for name, tensor in dense.items():
        quantised[name] = dequantised[name] = tensor
        if name.endswith(".weight") and tensor.ndim == 2 and "blocks." in name:
            scale = tensor.abs().max().float() / 448.0
            stored = (tensor.float() / scale).to(torch.float8_e4m3fn)
            prefix = name[: -len("weight")]
            quantised.update({name: stored, f"{prefix}weight_scale": scale.reshape(()),
                              f"{prefix}comfy_quant": torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)})
            dequantised[name] = stored.float() * scale
    model = _patcher(quantised, True)
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert type(qkv.weight).__name__ == "QuantizedTensor"  # the host's own mixed-precision layer
    return model, _patcher(dequantised, False), tiny_flux.conditioning(CONFIG)


def test_every_method_at_its_full_setting_is_the_unpatched_mixed_precision_model(mixed):
    model, _, conds = mixed
    expected = tiny_flux.sample(model, *conds, **SAMPLE)
    full = apply_settings(model, WidthSettings(noisy_width=1.0, clean_width=1.0))
    full = apply_settings(full, TokenRouterSettings(mode="diffcr", score="update", keep_start=1.0, keep_end=1.0, first_full=0, last_full=0))
    assert torch.equal(tiny_flux.sample(full, *conds, **SAMPLE), expected)


@pytest.mark.parametrize("settings", [
    WidthSettings(noisy_width=0.5, clean_width=0.5, calibration=CalibrationSpec(latent_size=(8, 8), text_tokens=4)),
    TokenRouterSettings(mode="diffcr", score="update", keep_start=0.5, keep_end=0.5, first_full=0, last_full=0),
], ids=["width 0.5", "router 0.5"])
def test_reduced_runs_add_no_error_beyond_the_quantisation(mixed, settings):
    """The reduced mixed-precision run is as close to the same reduced run on the dequantised weights as the full runs
    are to each other: slicing the host's quantised layers costs nothing beyond fp8's own rounding (of the inputs)."""
    model, dequantised, conds = mixed

    def gap(a, b):
        return float((a - b).norm() / b.norm())

    full_gap = gap(tiny_flux.sample(model, *conds, **SAMPLE), tiny_flux.sample(dequantised, *conds, **SAMPLE))
    reduced = tiny_flux.sample(apply_settings(model, settings), *conds, **SAMPLE)
    assert torch.isfinite(reduced).all()
    reduced_gap = gap(reduced, tiny_flux.sample(apply_settings(dequantised, settings), *conds, **SAMPLE))
    assert reduced_gap < 2 * full_gap + 1e-5  # (on this CPU both gaps are float32 rounding: ~3e-7)
