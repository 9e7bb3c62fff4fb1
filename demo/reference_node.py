"""Try the pack with no download: the small Flux the pack ships, trained on photographs (reference/),
loaded with its class conditionings, and its LATENT turned into an image (no VAE: the latent is the
photo under an invertible transform)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from comfy_api.latest import io

from ..integration.node_schema import node_schema
from . import reference as reference_model


CLASS_TOOLTIP = "The photo class to sample; the model was trained on crops of one photograph per class."
_loaded: dict[str, Any] = {}  # "key": (path, mtime, size), "reference": the ReferenceModel


def reference_classes(path: os.PathLike | str | None = None) -> list[str]:
    """The photo classes in the reference model's header (only the header is read), [] if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path or reference_model.REFERENCE_PATH), framework="pt", device="cpu") as handle:
            return list(json.loads((handle.metadata() or {})["classes"]))
    except Exception:  # a missing or damaged file: the loader says what is wrong when it runs
        return []


def load_cached_reference() -> reference_model.ReferenceModel:
    """The reference model, loaded once per process (again when the file changes)."""
    path = reference_model.REFERENCE_PATH
    try:
        stat = os.stat(path)
    except OSError:
        raise ValueError(
            f"The reference model file is missing: {path}. It ships with the pack (reference/); reinstall the pack "
            "or restore the file with git."
        ) from None
    key = (str(path), stat.st_mtime, stat.st_size)
    if _loaded.get("key") != key:
        _loaded["reference"] = reference_model.load_reference(path)
        _loaded["key"] = key
    return _loaded["reference"]


class DynamicReferenceModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        classes = reference_classes() or ["(reference model file missing)"]
        return node_schema(
            "DynamicReferenceModelLoader", "Load Reference Model (Dynamic DiT)", "dynamic_dit/reference",
            "Loads the small Flux model that ships with Dynamic DiT (9M parameters, trained on photographs, 64x64 px), "
            "so the pack can be tried without downloading FLUX weights. Gives the MODEL, the positive conditioning of "
            "the chosen photo class, the negative (unconditional) conditioning and an empty LATENT of the trained size. "
            "Decode its LATENT with 'Reference Latent to Image (Dynamic DiT)' (no VAE needed).",
            [
                io.Combo.Input("photo_class", options=classes, default="coffee" if "coffee" in classes else classes[0],
                               tooltip=CLASS_TOOLTIP),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per sampling run."),
            ],
            [
                io.Model.Output(display_name="model",
                                tooltip="A ComfyUI Flux model (the real Flux class at a small size): chain Dynamic DiT nodes on it."),
                io.Conditioning.Output(display_name="positive", tooltip="The chosen photo class."),
                io.Conditioning.Output(display_name="negative", tooltip="The unconditional conditioning, for cfg > 1."),
                io.Latent.Output(display_name="latent",
                                 tooltip="An empty latent of the trained size (64x64 px), for KSampler's latent_image."),
            ],
            search_aliases=["try it", "demo", "reference model", "no download", "tiny flux"],
        )

    @classmethod
    def execute(cls, photo_class: str, batch_size: int) -> io.NodeOutput:
        reference = load_cached_reference()
        positive = reference.conditioning(photo_class)  # ValueError naming the known classes
        side = reference.image_size // 2  # the latent is the photo 2x2-pixel-unshuffled
        channels = reference.model.model.latent_format.latent_channels
        latent = {"samples": torch.zeros(int(batch_size), channels, side, side)}
        return io.NodeOutput(reference.model, positive, reference.null_conditioning(), latent)


class DynamicReferenceLatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicReferenceLatentToImage", "Reference Latent to Image (Dynamic DiT)", "dynamic_dit/reference",
            "Turns a LATENT sampled with the reference model ('Load Reference Model (Dynamic DiT)') into an IMAGE: its "
            "latent is the photo itself under an invertible transform, so no VAE is involved.",
            [
                io.Latent.Input("latent", tooltip="A LATENT sampled with the reference model."),
                io.Int.Input("pixel_scale", default=4, min=1, max=16,
                             tooltip="Enlarge each pixel to a square of this size, so the 64 px images are easy to see; 1 = the model's pixels."),
            ],
            [io.Image.Output()],
            search_aliases=["decode", "reference decode"],
        )

    @classmethod
    def execute(cls, latent: dict, pixel_scale: int) -> io.NodeOutput:
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != 16:
            raise ValueError(
                f"Reference Latent to Image: expected the reference model's LATENT (batch, 16, height, width), got "
                f"{tuple(samples.shape)}. Decode other models' latents with VAE Decode."
            )
        photo = reference_model.latent_to_photo(samples.float().cpu())
        if pixel_scale > 1:
            photo = torch.nn.functional.interpolate(photo, scale_factor=int(pixel_scale), mode="nearest")
        return io.NodeOutput(photo.permute(0, 2, 3, 1).contiguous())


NODE_CLASS_MAPPINGS = {
    "DynamicReferenceModelLoader": DynamicReferenceModelLoader,
    "DynamicReferenceLatentToImage": DynamicReferenceLatentToImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DynamicReferenceModelLoader": "Load Reference Model (Dynamic DiT)",
    "DynamicReferenceLatentToImage": "Reference Latent to Image (Dynamic DiT)",
}
