"""Dynamic Width Patcher node: presets and modes, router files from models/dynamic_dit/, LoRAs honoured."""
import pytest
import torch
import torch.nn.functional as F

import comfy.model_management
import folder_paths
import nodes as comfy_nodes

from comfyui_dynamic_dit.core import slicing
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration.patching import adapter_of, plan_of
from comfyui_dynamic_dit.methods.width.settings import PRESETS
from comfyui_dynamic_dit.methods.width.file import RouterHeader, WidthRouter, save_width_router
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS
from support.nodes import combo_options, node_outputs

Width = NODE_CLASS_MAPPINGS["DynamicWidthPatcher"]
Telemetry = NODE_CLASS_MAPPINGS["DynamicTelemetry"]
FAST = dict(steps=3, seed=2, cfg=2.0, height=16, width=16)
WIDGETS = dict(
    preset="balanced", parts="heads and MLP", noisy_width=0.5, clean_width=1.0, target_flops=0.7,
    start_percent=0.0, end_percent=1.0, router="none (training-free)",
)


def patch(model, **changes):
    return node_outputs(Width, model, **{**WIDGETS, **changes})[0]


def settings_of(model):
    return plan_of(model).settings["width"]


def write_router(folder, model, name="router.safetensors", heads=(0, 1), groups=(2,)):
    header = RouterHeader.for_adapter(adapter_of(model))
    tensors = {}
    for key, shape in header.expected_shapes().items():
        kept = heads if ".heads." in key else groups
        tensors[key] = torch.zeros(shape) if key.endswith("weight") else torch.tensor([1.0 if u in kept else -1.0 for u in range(shape[0])])
    save_width_router(folder / name, WidthRouter(header, tensors))
    return name


def test_presets_and_modes(flux_model):
    before = dict(flux_model.model_options)
    for name, preset in PRESETS.items():
        settings = settings_of(patch(flux_model, preset=name, noisy_width=0.2))
        assert (settings.noisy_width, settings.clean_width, settings.target_flops) == (preset.noisy_width, preset.clean_width, None)
    custom = settings_of(patch(flux_model, preset="custom", noisy_width=0.4, clean_width=0.9, parts="MLP", start_percent=0.1, end_percent=0.8))
    assert (custom.noisy_width, custom.clean_width, custom.parts, custom.start_percent, custom.end_percent) == (0.4, 0.9, "mlp", 0.1, 0.8)
    target = settings_of(patch(flux_model, preset="target FLOPs", target_flops=0.6, parts="attention heads", mlp_groups=8))
    assert (target.target_flops, target.parts, target.mlp_groups) == (0.6, "heads", 8)
    assert flux_model.model_options == before and plan_of(flux_model) is None


def test_full_width_through_the_node_is_identical(flux_model, conds):
    model = patch(flux_model, preset="custom", noisy_width=1.0, clean_width=1.0)
    assert torch.equal(tiny_flux.sample(model, *conds, **FAST), tiny_flux.sample(flux_model, *conds, **FAST))


def test_applied_twice_replaces_and_chaining_order_does_not_matter(flux_model, conds):
    balanced = "balanced (trades quality)"  # as the node lists it
    twice = patch(patch(flux_model, preset="fast (trades more quality)"), preset=balanced)
    assert list(plan_of(twice).settings) == ["width"] and settings_of(twice).noisy_width == 0.75
    (telemetry_first,) = node_outputs(Telemetry, flux_model)
    a = patch(telemetry_first, preset=balanced)
    (b,) = node_outputs(Telemetry, patch(flux_model, preset="balanced"))  # the short name, as scripts pass it
    out = tiny_flux.sample(a, *conds, **FAST)
    assert torch.equal(out, tiny_flux.sample(b, *conds, **FAST))
    assert torch.equal(out, tiny_flux.sample(twice, *conds, **FAST))
    assert not torch.equal(out, tiny_flux.sample(flux_model, *conds, **FAST))
    assert plan_of(a).telemetry.latest().calls[0].methods["width"].startswith("heads 0.75, mlp 0.75")


def test_router_file_from_the_models_folder(flux_model, conds, model_folder):
    name = write_router(model_folder, flux_model)
    assert name in combo_options(Width.INPUT_TYPES()["required"]["router"])
    model = patch(flux_model, router=name, preset="fast")
    assert settings_of(model).router.name == name
    tiny_flux.sample(model, *conds, **FAST)
    call = plan_of(model).telemetry.latest().calls[0]
    assert call.methods["width"] == "heads 0.50, mlp 0.25"
    assert call.blocks["single.2"] == {"heads": 0.5, "mlp": 0.25}


def _bad_router(kind, folder, model, other_model):
    name = write_router(folder, other_model if kind == "another_model" else model, name=f"{kind}.safetensors")
    path = folder / name
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    if kind == "wrong_keys":
        tensors["double.0.attention.weight"] = tensors.pop("double.0.heads.weight")
        save_file(tensors, str(path), metadata=meta)
    elif kind == "wrong_shape":
        tensors["single.1.mlp.weight"] = torch.zeros(4, 128)
        save_file(tensors, str(path), metadata=meta)
    elif kind == "corrupt":
        path.write_bytes(path.read_bytes()[:200])
    return name


@pytest.mark.parametrize(
    "kind,message",
    [
        ("wrong_keys", "missing, e.g. double.0.heads.weight"),
        ("wrong_shape", r"'single.1.mlp.weight' has shape \(4, 128\), expected \(4, 256\)"),
        ("another_model", "was made for flux with hidden size 192, 3 heads"),
        ("corrupt", "is not a readable safetensors file"),
    ],
)
def test_bad_router_file_leaves_the_model_unpatched(flux_model, other_flux_model, model_folder, kind, message):
    name = _bad_router(kind, model_folder, flux_model, other_flux_model)
    before = dict(flux_model.model_options)
    with pytest.raises(ValueError, match=message):
        patch(flux_model, router=name)
    assert flux_model.model_options == before and plan_of(flux_model) is None


def test_missing_router_file_and_bad_widgets(flux_model, model_folder):
    with pytest.raises(ValueError, match="'gone.safetensors' was not found in the dynamic_dit model folder"):
        patch(flux_model, router="gone.safetensors")
    with pytest.raises(ValueError, match="preset must be one of"):
        patch(flux_model, preset="turbo")
    with pytest.raises(ValueError, match="start_percent < end_percent"):
        patch(flux_model, start_percent=0.7, end_percent=0.3)


# --- LoRA applied before the node ---------------------------------------------------------------------
LORA_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.2", "single_blocks.0.linear1", "single_blocks.0.linear2")


def write_lora(folder, model, rank=4, seed=0):
    """A LoRA in the generic '<module>.lora_up/lora_down.weight' format, alpha = rank (scale 1)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dm = model.model.diffusion_model
    tensors = {}
    for name in LORA_LAYERS:
        out_features, in_features = dm.get_submodule(name).weight.shape
        tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * 0.2
        tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=g) * 0.2
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(folder / "test_lora.safetensors"))
    return tensors


@pytest.mark.parametrize("lowvram", [False, True], ids=["loaded", "lowvram"])
def test_lora_before_the_node_is_honoured(tiny_config, conds, tmp_path, model_folder, monkeypatch, request, lowvram):
    base = reference_model.build_model(tiny_config)  # its own weights: the LoRA is merged into them while loaded
    dm = base.model.diffusion_model
    original = {name: dm.get_submodule(name).weight.detach().clone() for name in LORA_LAYERS}
    loras = tmp_path / "loras"
    loras.mkdir()
    lora = write_lora(loras, base)
    merged = {n: original[n] + lora[f"diffusion_model.{n}.lora_up.weight"] @ lora[f"diffusion_model.{n}.lora_down.weight"] for n in LORA_LAYERS}
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    (with_lora,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base, "test_lora.safetensors", 1.0)
    model = patch(with_lora, router=write_router(model_folder, base, heads=(1, 3), groups=(0, 2)))

    layers = {dm.get_submodule(name): name for name in LORA_LAYERS}
    seen = {}
    call = slicing.ReducedLinear.__call__

    def spy(self, x):
        out = call(self, x)
        name = layers.get(self.layer)
        if name is not None and name not in seen:
            seen[name] = (x.clone(), out.clone(), self.rows, self.cols, list(getattr(self.layer, "weight_function", [])),
                          torch.equal(self.layer.weight, original[name]))
        return out

    monkeypatch.setattr(slicing.ReducedLinear, "__call__", spy)
    if lowvram:  # ComfyUI applies the LoRA on the fly through weight functions
        request.getfixturevalue("lowvram_loading")
    try:
        out = tiny_flux.sample(model, *conds, **FAST)
    finally:
        comfy.model_management.unload_all_models()
    assert set(seen) == set(LORA_LAYERS)
    for name, (x, got, rows, cols, weight_functions, weight_unmerged) in seen.items():
        assert rows is not None or cols is not None, name  # the layer really ran sliced
        assert weight_unmerged == lowvram and bool(weight_functions) == lowvram, name
        bias = dm.get_submodule(name).bias
        for weight, should_match in ((merged[name], True), (original[name], False)):
            w = weight if rows is None else rows.take(weight, 0)
            w = w if cols is None else cols.take(w, 1)
            expected = F.linear(x, w, bias if rows is None else rows.take(bias, 0))
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5) == should_match, name

    # and the whole run equals the same node on a model whose weights have the LoRA merged in
    state = {k: v.clone() for k, v in dm.state_dict().items()}
    state.update({f"{n}.weight": merged[n] for n in LORA_LAYERS})
    merged_model = patch(reference_model.build_model(tiny_config, state_dict=state), router="router.safetensors")
    torch.testing.assert_close(out, tiny_flux.sample(merged_model, *conds, **FAST), rtol=1e-4, atol=1e-4)
