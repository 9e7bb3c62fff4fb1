"""The committed reference model: small, documented, loads through the validating loader, and its
samples have the statistics of photographs (checked against real crops, with an untrained model of
the same shape as a control that must fail the same check)."""
import json

import pytest
import torch
from safetensors import safe_open

from comfyui_dynamic_dit.demo import reference as reference_model, tiny_flux
from comfyui_dynamic_dit.devtools import reference_training


@pytest.fixture(scope="module")
def reference():
    return reference_model.load_reference()


def test_weights_are_committed_small_fp16_and_say_how_they_were_made():
    path = reference_model.REFERENCE_PATH
    assert path.stat().st_size <= 20 * 1024 * 1024
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.startswith("diffusion_model.")}
    assert dtypes == {"F16"}
    assert metadata["command"].startswith("python -m dynamic_core.comfy_integration.reference_model")
    training = json.loads(metadata["training"])
    assert training["seed"] == 0 and training["image_size"] == int(metadata["image_size"])
    assert float(metadata["final_eval_loss"]) < 1.0  # an untrained model starts near E|noise - x0|^2, about 1.3
    assert set(json.loads(metadata["classes"])) == set(reference_training.PHOTOS)


def test_transform_is_invertible():
    images = torch.rand(2, 3, 16, 24)
    latent = reference_model.photo_to_latent(images)
    assert latent.shape == (2, 16, 8, 12)
    assert torch.allclose(reference_model.latent_to_photo(latent), images, atol=1e-6)
    with pytest.raises(ValueError, match="even H and W"):
        reference_model.photo_to_latent(torch.rand(1, 3, 15, 16))


def photo_statistics(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: correlation of horizontally and vertically neighbouring pixels, the share of the
    signal's energy in its Laplacian (fine detail: ~20 for white noise, small for photos), and the
    standard deviation (a blank image is not a photo either)."""
    grey = images.mean(1)
    centred = grey - grey.mean((-2, -1), keepdim=True)

    def correlation(a, b):
        a, b = a - a.mean((-2, -1), keepdim=True), b - b.mean((-2, -1), keepdim=True)
        return (a * b).mean((-2, -1)) / (a.std((-2, -1)) * b.std((-2, -1)) + 1e-8)

    neighbours = (correlation(grey[..., :, 1:], grey[..., :, :-1]) + correlation(grey[..., 1:, :], grey[..., :-1, :])) / 2
    laplacian = 4 * grey[..., 1:-1, 1:-1] - grey[..., :-2, 1:-1] - grey[..., 2:, 1:-1] - grey[..., 1:-1, :-2] - grey[..., 1:-1, 2:]
    detail = laplacian.pow(2).mean((-2, -1)) / (centred.pow(2).mean((-2, -1)) + 1e-8)
    return {"neighbours": neighbours, "detail": detail, "std": grey.std((-2, -1))}


def _samples(model_patcher, reference, classes, per_class=2, steps=8):
    """`per_class` images of every class (one batch per class, each image its own noise), class by class."""
    size = reference.image_size
    images = []
    for name in classes:
        latent = tiny_flux.sample(model_patcher, reference.conditioning(name), reference.null_conditioning(),
                                  height=size // 2, width=size // 2, steps=steps, cfg=2.0, seed=0, batch=per_class)
        images.append(reference_model.latent_to_photo(latent))
    return torch.cat(images)


def looks_like_photos(stats: dict[str, torch.Tensor], real: dict[str, torch.Tensor], classes: int) -> bool:
    """Every image as smooth as the real crops of its own class and with no more fine detail (with a
    margin), and not blank. `stats` and `real` hold the images class by class, in the same order."""

    def per_class(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(classes, -1)

    smooth = per_class(stats["neighbours"]) >= 0.8 * per_class(real["neighbours"]).min(1, keepdim=True).values
    fine = per_class(stats["detail"]) <= 1.5 * per_class(real["detail"]).max(1, keepdim=True).values
    not_blank = per_class(stats["std"]) >= 0.5 * per_class(real["std"]).min(1, keepdim=True).values
    return bool((smooth & fine & not_blank).all())


def test_samples_have_photo_statistics_and_an_untrained_model_does_not(reference):
    classes = ["astronaut", "coffee", "moon", "grass"]
    generator = torch.Generator().manual_seed(0)
    photos = reference_training.load_photos(reference.image_size, reference_training.TrainConfig().scales)
    labels = torch.tensor([reference.class_index(name) for name in classes]).repeat_interleave(8)
    real = photo_statistics(reference_training.random_crops(photos, labels, reference.image_size, generator))
    noise = photo_statistics(torch.rand(32, 3, reference.image_size, reference.image_size, generator=generator))
    assert looks_like_photos(real, real, 4) and not looks_like_photos(noise, real, 4)  # the check separates the two

    with torch.no_grad():
        trained = photo_statistics(_samples(reference.model, reference, classes))
        untrained_model = reference_model.build_model(reference.config)  # same shape, random weights
        untrained = photo_statistics(_samples(untrained_model, reference, classes))
    assert looks_like_photos(trained, real, 4), trained
    assert not looks_like_photos(untrained, real, 4), untrained


def test_class_conditioning_steers_colour(reference):
    """Grey photos (moon) come out grey, colourful ones (coffee, astronaut) do not."""

    def saturation(images):
        return (images.max(1).values - images.min(1).values).mean((-2, -1))

    with torch.no_grad():
        grey = saturation(_samples(reference.model, reference, ["moon"], steps=8))
        colour = saturation(_samples(reference.model, reference, ["coffee", "astronaut"], steps=8))
    assert grey.max() < 0.05 and colour.min() > 2 * grey.max(), (grey, colour)


# --- the loader refuses bad files with a precise message -----------------------------------------
@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    config = tiny_flux.TinyFlux(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, guidance_embed=False)
    model = reference_model.build_model(config)
    contexts, pooled = reference_training.class_conditioning(2, config, 4, 0)
    state = model.model.diffusion_model.state_dict()
    path = reference_model.save_reference(tmp_path_factory.mktemp("ref") / "ref.safetensors", state, config, ("a", "b"),
                                    contexts, pooled, 32, {"command": "test"})
    return path, config, state, contexts, pooled


def test_small_reference_round_trip(small_reference):
    path, config, state, contexts, pooled = small_reference
    loaded = reference_model.load_reference(path)
    assert loaded.config == config and loaded.classes == ("a", "b") and loaded.image_size == 32
    for key, value in loaded.model.model.diffusion_model.state_dict().items():
        assert torch.equal(value, state[key].half().float()), key
    assert torch.equal(loaded.conditioning("b")[0][0], contexts[1:2])
    assert torch.equal(loaded.null_conditioning()[0][1]["pooled_output"], torch.zeros(1, config.vec_dim))
    with pytest.raises(ValueError, match="unknown class 'c'; the reference model knows: a, b"):
        loaded.conditioning("c")


def _rewrite(path, target, change):
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    change(tensors, metadata)
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, m: m.update(format="something else"), "expected 'dynamic_dit.reference_flux'"),
        (lambda t, m: m.update(version="9"), "version '9' is not supported"),
        (lambda t, m: m.update(config="{not json"), "bad metadata"),
        (lambda t, m: t.pop("diffusion_model.final_layer.linear.weight"), r"missing \['final_layer.linear.weight'\]"),
        (lambda t, m: t.update({"diffusion_model.img_in.weight": torch.zeros(64, 32)}), r"'img_in.weight' has shape \(64, 32\), expected \(64, 64\)"),
        (lambda t, m: t.update({"conditioning.pooled": torch.zeros(2, 32)}), r"'conditioning.pooled' has shape \(2, 32\), expected \(3, 32\)"),
        (lambda t, m: t.pop("conditioning.context"), "missing tensor 'conditioning.context'"),
        (lambda t, m: t.update({"diffusion_model.img_in.bias": torch.zeros(64, dtype=torch.int32)}), "expected a floating point dtype"),
    ],
)
def test_bad_reference_files_are_refused(small_reference, tmp_path, change, message):
    path = _rewrite(small_reference[0], tmp_path / "bad.safetensors", change)
    with pytest.raises(ValueError, match=message):
        reference_model.load_reference(path)


def test_truncated_reference_file_is_refused(small_reference, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(small_reference[0].read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        reference_model.load_reference(truncated)
    with pytest.raises(ValueError, match="not found"):
        reference_model.load_reference(tmp_path / "missing.safetensors")
