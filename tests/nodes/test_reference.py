"""Try it with no download: the shipped reference model as nodes (run as a library and under inference mode, as
a server runs prompts: tests/nodes/conftest.py)."""
import pytest
import torch

import nodes as comfy_nodes

from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS
from comfyui_dynamic_dit.demo import reference_node as reference
from support.nodes import combo_options, node_outputs

Loader = NODE_CLASS_MAPPINGS["DynamicReferenceModelLoader"]
ToImage = NODE_CLASS_MAPPINGS["DynamicReferenceLatentToImage"]


def _sample(photo_class: str, steps: int = 8) -> torch.Tensor:
    model, positive, negative, latent = node_outputs(Loader, photo_class, 1)
    (sampled,) = comfy_nodes.KSampler().sample(model, 7, steps, 2.0, "euler", "simple", positive, negative, latent)
    return node_outputs(ToImage, sampled, 1)[0]


def test_loader_gives_model_conditionings_and_an_empty_latent_of_the_trained_size():
    classes = combo_options(Loader.INPUT_TYPES()["required"]["photo_class"])
    assert "coffee" in classes and "hubble_deep_field" in classes and len(classes) == 15
    model, positive, negative, latent = node_outputs(Loader, "coffee", 3)
    other = node_outputs(Loader, "moon", 1)
    assert other[0] is model  # loaded once per process
    assert latent["samples"].shape == (3, 16, 32, 32) and not latent["samples"].any()
    assert not torch.equal(positive[0][0], other[1][0][0]) and torch.equal(negative[0][0], other[2][0][0])
    assert type(model.model).__name__ == "Flux"


def test_sampled_classes_look_like_their_photos():
    coffee, hubble = _sample("coffee"), _sample("hubble_deep_field")
    assert coffee.shape == hubble.shape == (1, 64, 64, 3)
    assert float(hubble.mean()) < 0.2 < 0.4 < float(coffee.mean())  # the deep field is dark, the coffee photo is not
    red, green, blue = coffee.mean(dim=(0, 1, 2)).tolist()
    assert red > green > blue  # warm brown coffee


def test_latent_to_image_enlarges_pixels_exactly():
    latent = {"samples": reference_model.photo_to_latent(torch.rand(2, 3, 8, 8))}
    (small,) = node_outputs(ToImage, latent, 1)
    (large,) = node_outputs(ToImage, latent, 3)
    assert large.shape == (2, 24, 24, 3) and torch.equal(large[:, ::3, ::3], small)


def test_bad_inputs_are_explained(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="expected the reference model's LATENT"):
        node_outputs(ToImage, {"samples": torch.zeros(1, 4, 8, 8)}, 1)
    with pytest.raises(ValueError, match="unknown class 'dragon'; the reference model knows: astronaut, brick"):
        node_outputs(Loader, "dragon", 1)
    monkeypatch.setattr(reference_model, "REFERENCE_PATH", tmp_path / "gone.safetensors")
    assert combo_options(Loader.INPUT_TYPES()["required"]["photo_class"]) == ["(reference model file missing)"]
    with pytest.raises(ValueError, match="The reference model file is missing: .*gone.safetensors"):
        reference.load_cached_reference()


def test_the_shipped_trained_file_is_listed_and_runs_as_trained_on_the_reference_model_only(flux_model):
    # try_it's third branch: the coarse-patch file the pack ships, offered by the file lists beside models/dynamic_dit/
    from comfyui_dynamic_dit.integration.patching import training_run_files

    Trained = NODE_CLASS_MAPPINGS["DynamicTrainedLoader"]
    name = "reference_coarse_patches_x2.safetensors"
    assert name in training_run_files() and name in combo_options(Trained.INPUT_TYPES()["required"]["file"])
    model, positive, negative, latent = node_outputs(Loader, "coffee", 1)
    (trained,) = node_outputs(Trained, model, name)
    comfy_nodes.KSampler().sample(trained, 42, 16, 2.0, "euler", "simple", positive, negative, latent)
    run = trained.model_options["transformer_options"]["dynamic_dit"].telemetry.latest()
    assert 2.1 < run.flops_reduction < 2.3 and len(run.steps()) == 16  # 12-82 %: steps 2-13 coarse, x2.21
    with pytest.raises(ValueError, match="trained for another base model"):
        node_outputs(Trained, flux_model, name)  # a Flux of other weights and shapes
