"""Router files: written by `save_router_file`, read back exactly, every defect reported precisely."""
import pytest
import torch
from safetensors.torch import save_file

from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.methods.token_router.file import (
    load_router_file,
    model_description,
    save_router_file,
)

D = 256  # hidden size of the tiny Flux fixture


def diffcr_routers(labels=("double.0", "single.3")):
    return {label: {"weight": torch.full((1, D), 0.01), "bias": torch.tensor([0.5])} for label in labels}


def test_round_trip(flux_model, tmp_path):
    adapter = adapter_of(flux_model)
    g = torch.Generator().manual_seed(0)
    dydit = {"single.1": {"fc1.weight": torch.randn(16, D, generator=g), "fc1.bias": torch.randn(16, generator=g),
                          "fc2.weight": torch.randn(1, 16, generator=g), "fc2.bias": torch.randn(1, generator=g)}}
    ratios = torch.rand(3, 6, generator=g) * 0.9 + 0.1
    bounds = torch.tensor([0.0, 0.2, 0.7, 1.0])
    save_router_file(tmp_path / "y.safetensors", adapter, "dydit", dydit, ratios=ratios, ratio_bounds=bounds)
    loaded = load_router_file(tmp_path / "y.safetensors")
    assert loaded.router == "dydit" and loaded.name == "y.safetensors"
    assert dict(loaded.model) == model_description(adapter) == {
        "architecture": "flux", "hidden_size": "256", "num_heads": "4", "depth_double": "2", "depth_single": "4"}
    assert set(loaded.routers) == {"single.1"}
    for name, tensor in dydit["single.1"].items():
        assert torch.equal(loaded.routers["single.1"][name], tensor)
    assert torch.equal(loaded.ratios, ratios) and torch.equal(loaded.ratio_bounds, bounds)
    assert torch.equal(loaded.region_ratios(0.1), ratios[0]) and torch.equal(loaded.region_ratios(0.2), ratios[1])
    assert torch.equal(loaded.region_ratios(1.0), ratios[2])
    loaded.check_model(adapter)
    assert "dydit routers for 1 blocks, ratios in 3 regions" in loaded.describe()


def write(path, tensors, **metadata):
    base = {"format": "dynamic_dit.token_router", "version": "1", "router": "diffcr", "architecture": "flux",
            "hidden_size": str(D), "num_heads": "4", "depth_double": "2", "depth_single": "4"}
    save_file(tensors, str(path), metadata={k: v for k, v in {**base, **metadata}.items() if v is not None})
    return path


def flat(routers):
    return {f"routers.{label}.{name}": t for label, params in routers.items() for name, t in params.items()}


CASES = [
    (dict(format="something.else"), r"metadata 'format' is 'something.else', expected 'dynamic_dit.token_router'"),
    (dict(format=None), r"metadata 'format' is None"),
    (dict(version="2"), r"format version '2' is not supported \(this pack reads version 1\)"),
    (dict(router="moe"), r"metadata 'router' is 'moe', expected one of dydit, diffcr, none"),
    (dict(hidden_size=None), r"metadata has no 'hidden_size'"),
    (dict(hidden_size="wide"), r"'hidden_size' and 'depth_\*' must be integers"),
]


@pytest.mark.parametrize("metadata,message", CASES)
def test_bad_metadata(tmp_path, metadata, message):
    path = write(tmp_path / "bad.safetensors", flat(diffcr_routers()), **metadata)
    with pytest.raises(ValueError, match=message):
        load_router_file(path)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.update({"routers.double.0.scale": torch.ones(1)}), r"unexpected tensor 'routers.double.0.scale'"),
        (lambda t: t.update({"routers.single.9.weight": torch.ones(1, D), "routers.single.9.bias": torch.ones(1)}),
         r"names block 'single.9', which the model does not have \(double.0-double.1, single.0-single.3\)"),
        (lambda t: t.pop("routers.single.3.bias"), r"block 'single.3' lacks routers.single.3.bias"),
        (lambda t: t.update({"routers.double.0.weight": torch.ones(1, D + 1)}),
         r"'routers.double.0.weight' has shape \(1, 257\), expected \(1, 256\)"),
        (lambda t: t.update({"routers.double.0.bias": torch.ones(1, dtype=torch.int32)}),
         r"'routers.double.0.bias' has dtype torch.int32, expected a floating-point dtype"),
        (lambda t: t.update({"routers.double.0.bias": torch.tensor([float("nan")])}), r"'routers.double.0.bias' contains NaN"),
        (lambda t: t.update({"ratios": torch.ones(2, 6)}), r"'ratios' and 'ratio_bounds' must come together"),
        (lambda t: t.update({"ratios": torch.ones(2, 5), "ratio_bounds": torch.tensor([0.0, 0.5, 1.0])}),
         r"'ratios' has shape \(2, 5\), expected \(regions, 6\)"),
        (lambda t: t.update({"ratios": torch.full((2, 6), 1.5), "ratio_bounds": torch.tensor([0.0, 0.5, 1.0])}),
         r"'ratios' must lie in \(0, 1\]; found values from 1.5 to 1.5"),
        (lambda t: t.update({"ratios": torch.ones(2, 6), "ratio_bounds": torch.tensor([0.0, 1.0])}),
         r"'ratio_bounds' has shape \(2,\), expected \(3,\)"),
        (lambda t: t.update({"ratios": torch.ones(2, 6), "ratio_bounds": torch.tensor([0.0, 0.7, 0.6])}),
         r"'ratio_bounds' must go from 0 to 1, strictly increasing"),
        (lambda t: t.clear(), r"holds neither routers nor ratios"),
    ],
    ids=["unknown_key", "block_out_of_range", "missing_param", "wrong_shape", "int_dtype", "nan", "ratios_alone",
         "ratios_shape", "ratios_range", "bounds_shape", "bounds_order", "empty"],
)
def test_bad_tensors(tmp_path, change, message):
    tensors = flat(diffcr_routers())
    change(tensors)
    path = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(ValueError, match=message):
        load_router_file(path)


def test_dydit_router_shapes(tmp_path):
    routers = {"double.1": {"fc1.weight": torch.ones(16, D), "fc1.bias": torch.ones(16), "fc2.weight": torch.ones(1, 8),
                            "fc2.bias": torch.ones(1)}}
    path = write(tmp_path / "y.safetensors", flat(routers), router="dydit")
    with pytest.raises(ValueError, match=r"'routers.double.1.fc2.weight' has shape \(1, 8\), expected \(1, 16\)"):
        load_router_file(path)
    # a DiffCR key in a DyDiT file
    path = write(tmp_path / "z.safetensors", flat(diffcr_routers()), router="dydit")
    with pytest.raises(ValueError, match=r"unexpected tensor 'routers.double.0.bias' for a 'dydit' router file"):
        load_router_file(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_files(flux_model, tmp_path, damage):
    path = tmp_path / "r.safetensors"
    save_router_file(path, adapter_of(flux_model), "diffcr", diffcr_routers())
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00\x13garbage" * 50)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) - 300])
    else:
        path.unlink()
    message = "was not found" if damage == "missing" else "is not a readable safetensors file"
    with pytest.raises(ValueError, match=message):
        load_router_file(path)


def test_a_file_for_another_model_is_refused_before_patching(flux_model, other_flux_model, tmp_path):
    save_router_file(tmp_path / "other.safetensors", adapter_of(other_flux_model), "diffcr",
                     {"double.0": {"weight": torch.ones(1, 192), "bias": torch.zeros(1)}})
    router = load_router_file(tmp_path / "other.safetensors")
    before = dict(flux_model.model_options)
    with pytest.raises(ValueError, match=r"made for another model: hidden_size is 192 in the file, 256 in this model"):
        apply_settings(flux_model, TokenRouterSettings(score="router", router=router))
    assert flux_model.model_options == before


def test_a_ratios_only_file_cannot_score(flux_model, tmp_path):
    save_router_file(tmp_path / "ratios.safetensors", adapter_of(flux_model), "none", ratios=torch.full((2, 6), 0.5))
    router = load_router_file(tmp_path / "ratios.safetensors")
    assert router.routers == {} and router.ratios.shape == (2, 6)
    with pytest.raises(ValueError, match="holds only ratios, no routers to score with"):
        apply_settings(flux_model, TokenRouterSettings(score="router", router=router))
    model = apply_settings(flux_model, TokenRouterSettings(score="update", router=router))  # ratios with a training-free score
    assert model is not flux_model
