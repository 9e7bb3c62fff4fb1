"""Small but real ComfyUI Flux models, built programmatically, for tests, the demo and the benchmark.

Stock checkpoints cannot be this small (ComfyUI's Flux detection fixes 24 heads x 128), so the model
is built from a unet_config through `comfy.supported_models.Flux`, exactly the class ComfyUI uses
for a loaded Flux.1 checkpoint, and wrapped in a ModelPatcher.
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.supported_models

from ..files import read_safetensors


@dataclass(frozen=True)
class TinyFlux:
    hidden_size: int = 256
    num_heads: int = 4
    depth: int = 2
    depth_single_blocks: int = 4
    context_dim: int = 64
    vec_dim: int = 32
    in_channels: int = 16
    mlp_ratio: float = 4.0
    guidance_embed: bool = True
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def axes_dim(self) -> list[int]:
        """RoPE split like Flux.1 (16/56/56 of 128): about 1/8 for the index axis, the rest for y and x."""
        first = max(2, (self.head_dim // 8) // 2 * 2)
        rest = self.head_dim - first
        y = rest // 2 // 2 * 2
        return [first, y, rest - y]

    def unet_config(self) -> dict:
        config = dict(
            image_model="flux",
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            vec_in_dim=self.vec_dim,
            context_in_dim=self.context_dim,
            hidden_size=self.hidden_size,
            mlp_ratio=self.mlp_ratio,
            num_heads=self.num_heads,
            depth=self.depth,
            depth_single_blocks=self.depth_single_blocks,
            axes_dim=self.axes_dim(),
            theta=10000,
            patch_size=2,
            qkv_bias=True,
            guidance_embed=self.guidance_embed,
        )
        # Newer ComfyUI (0.4+) declares which text-id dims get RoPE positions; Flux.1 checkpoints get none.
        if "txt_ids_dims" in _flux_param_names():
            config["txt_ids_dims"] = []
        return config


def _flux_param_names() -> set[str]:
    import dataclasses

    import comfy.ldm.flux.model

    return {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}


def initialise(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights: scaled normal linears, unit norm scales, small modulation.

    Values are drawn on the module's own device (a CPU module gets the same weights as always), so
    a FLUX.1-dev-sized model can be filled on a GPU without a 48 GB round trip through the CPU.
    """
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("scale"):  # RMSNorm / QK-norm
                value = torch.ones(param.shape, device=device)
            elif param.ndim == 2:
                std = 1.0 / math.sqrt(param.shape[1])
                if "mod" in name or "adaLN" in name:
                    std *= 0.25
                value = torch.randn(param.shape, generator=generator, device=device) * std
            else:
                value = torch.randn(param.shape, generator=generator, device=device) * 0.02
            param.copy_(value.to(param.dtype))
            del value


def build_model(
    config: TinyFlux = TinyFlux(),
    dtype: torch.dtype = torch.float32,
    state_dict: dict | None = None,
    device: torch.device | str | None = None,
):
    """A ModelPatcher around a real ComfyUI Flux model of the given size.

    `device`: where the weights are created and initialised (default: the CPU, then ComfyUI moves
    them to its load device when sampling); pass the GPU to build a large model in place.
    """
    model_config = comfy.supported_models.Flux(config.unet_config())
    model_config.set_inference_dtype(dtype, None)
    load_device = comfy.model_management.get_torch_device()
    model = model_config.get_model({}, device=device)
    if state_dict is None:
        initialise(model.diffusion_model, config.seed)
    else:
        model.diffusion_model.load_state_dict(state_dict)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device())


def conditioning(config: TinyFlux = TinyFlux(), text_tokens: int = 8, seed: int = 0, guidance: float = 3.5):
    """Positive and negative conditioning in ComfyUI's format, with random text embeddings."""
    generator = torch.Generator().manual_seed(seed)

    def one(extra: dict) -> list:
        context = torch.randn(1, text_tokens, config.context_dim, generator=generator)
        pooled = torch.randn(1, config.vec_dim, generator=generator)
        return [[context, {"pooled_output": pooled, **extra}]]

    return one({"guidance": guidance}), one({"guidance": guidance})


def sample(
    model,
    positive,
    negative,
    *,
    height: int = 32,
    width: int = 32,
    batch: int = 1,
    steps: int = 4,
    cfg: float = 2.0,
    sampler: str = "euler",
    scheduler: str = "simple",
    seed: int = 0,
    denoise: float = 1.0,
    start_step: int | None = None,
    last_step: int | None = None,
    latent: torch.Tensor | None = None,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ComfyUI sampling run (as KSampler / KSamplerAdvanced do it) on a latent of the given size."""
    channels = model.model.latent_format.latent_channels
    if latent is None:
        latent = torch.zeros(batch, channels, height, width)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        positive,
        negative,
        latent,
        denoise=denoise,
        start_step=start_step,
        last_step=last_step,
        sigmas=sigmas,
        disable_pbar=True,
        seed=seed,
    )


def block_arguments(
    diffusion_model, kind: str, batch: int, text_tokens: int, grid: tuple[int, int], seed: int = 0
) -> dict:
    """Random but realistic `patches_replace["dit"]` arguments for one Flux block: streams, vec, RoPE of a
    `grid` of image tokens after `text_tokens` text tokens ("double": img and txt, "single": the joint img)."""
    generator = torch.Generator().manual_seed(seed)
    d = diffusion_model.hidden_size
    image_tokens = grid[0] * grid[1]
    img_ids = torch.zeros(grid[0], grid[1], 3)
    img_ids[..., 1] = torch.arange(grid[0])[:, None]
    img_ids[..., 2] = torch.arange(grid[1])[None, :]
    ids = torch.cat((torch.zeros(batch, text_tokens, 3), img_ids.reshape(1, image_tokens, 3).expand(batch, -1, -1)), dim=1)
    args = {
        "vec": torch.randn(batch, d, generator=generator),
        "pe": diffusion_model.pe_embedder(ids),
        "attn_mask": None,
        "transformer_options": {},
    }
    if kind == "double":
        args["img"] = torch.randn(batch, image_tokens, d, generator=generator)
        args["txt"] = torch.randn(batch, text_tokens, d, generator=generator)
    else:
        args["img"] = torch.randn(batch, text_tokens + image_tokens, d, generator=generator)
    return args


def describe(config: TinyFlux) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(config).items())


# --- the reference model: a small Flux trained on real photographs --------------------------------
# Its "latent" is the photo itself under a fixed invertible transform, so images need no VAE:
#   RGB in [0, 1] -> [-1, 1] -> add a zero 4th channel -> 2x2 pixel-unshuffle (16 channels, half size)
#   = the model's internal space; ComfyUI's LATENT is that through the inverse of Flux's latent affine
#   (latent = x / 0.3611 + 0.1159), so KSampler's process_latent_in hands the model exactly x.
REFERENCE_FORMAT = "dynamic_dit.reference_flux"
REFERENCE_VERSION = "1"
REFERENCE_PATH = Path(__file__).resolve().parents[2] / "reference" / "flux_photo_reference.safetensors"
REFERENCE_TRANSFORM = "rgb[-1,1]+zero channel -> pixel_unshuffle(2) -> inverse Flux latent affine"
_CONDITIONING_KEYS = ("conditioning.context", "conditioning.pooled")
_MODEL_PREFIX = "diffusion_model."
_FLUX_LATENT = comfy.latent_formats.Flux()


def photo_to_model_space(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 16, H/2, W/2): what the reference model denoises."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % 2 or images.shape[-2] % 2:
        raise ValueError(f"expected RGB images (B, 3, H, W) with even H and W, got {tuple(images.shape)}")
    signed = images * 2 - 1
    padded = torch.cat([signed, torch.zeros_like(signed[:, :1])], dim=1)
    return torch.nn.functional.pixel_unshuffle(padded, 2)


def model_space_to_photo(x: torch.Tensor) -> torch.Tensor:
    """Inverse of photo_to_model_space (the zero channel is dropped), clamped to [0, 1]."""
    rgb = torch.nn.functional.pixel_shuffle(x.float(), 2)[:, :3]
    return ((rgb + 1) / 2).clamp(0, 1)


def photo_to_latent(images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> a LATENT as ComfyUI's samplers take it for the reference model."""
    return _FLUX_LATENT.process_out(photo_to_model_space(images))


def latent_to_photo(latent: torch.Tensor) -> torch.Tensor:
    """A sampled LATENT of the reference model -> RGB (B, 3, H, W) in [0, 1]."""
    return model_space_to_photo(_FLUX_LATENT.process_in(latent))


@dataclass
class ReferenceModel:
    """The loaded reference model: a ModelPatcher plus the class conditionings it was trained with."""

    model: Any  # comfy.model_patcher.ModelPatcher
    config: TinyFlux
    classes: tuple[str, ...]
    image_size: int  # pixels, square, as trained
    contexts: torch.Tensor  # (classes + 1, text tokens, context_dim); the last row is the null conditioning
    pooled: torch.Tensor  # (classes + 1, vec_dim)
    metadata: Mapping[str, str]

    def class_index(self, name_or_index: str | int) -> int:
        if isinstance(name_or_index, int):
            if not 0 <= name_or_index < len(self.classes):
                raise ValueError(f"class index {name_or_index} out of range 0..{len(self.classes) - 1}")
            return name_or_index
        if name_or_index not in self.classes:
            raise ValueError(f"unknown class '{name_or_index}'; the reference model knows: {', '.join(self.classes)}")
        return self.classes.index(name_or_index)

    def conditioning(self, name_or_index: str | int) -> list:
        """ComfyUI conditioning for one photo class."""
        return self._conditioning(self.class_index(name_or_index))

    def null_conditioning(self) -> list:
        """The unconditional (dropped-label) conditioning, for the negative of CFG."""
        return self._conditioning(len(self.classes))

    def _conditioning(self, row: int) -> list:
        return [[self.contexts[row : row + 1].clone(), {"pooled_output": self.pooled[row : row + 1].clone()}]]


def save_reference(
    path: str | Path,
    diffusion_model_state: Mapping[str, torch.Tensor],
    config: TinyFlux,
    classes: tuple[str, ...] | list[str],
    contexts: torch.Tensor,
    pooled: torch.Tensor,
    image_size: int,
    extra_metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a reference model (weights in `dtype`, conditioning tables in fp32) with its metadata."""
    from safetensors.torch import save_file

    tensors = {_MODEL_PREFIX + k: v.detach().to(dtype).contiguous() for k, v in diffusion_model_state.items()}
    tensors["conditioning.context"] = contexts.detach().float().contiguous()
    tensors["conditioning.pooled"] = pooled.detach().float().contiguous()
    metadata = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "architecture": "flux",
        "hidden_size": str(config.hidden_size),
        "num_heads": str(config.num_heads),
        "depth_double": str(config.depth),
        "depth_single": str(config.depth_single_blocks),
        "config": json.dumps(asdict(config)),
        "classes": json.dumps(list(classes)),
        "image_size": str(image_size),
        "transform": REFERENCE_TRANSFORM,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra_metadata or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_reference(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Load the reference model (default: the one committed in reference/), validating everything."""
    path = Path(path) if path is not None else REFERENCE_PATH
    tensors, metadata = read_safetensors(path, f"Reference model file '{path.name}'")
    if metadata.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"{path}: format is {metadata.get('format')!r}, expected {REFERENCE_FORMAT!r} (a Dynamic DiT reference model)")
    if metadata.get("version") != REFERENCE_VERSION:
        raise ValueError(f"{path}: version {metadata.get('version')!r} is not supported (this pack reads version {REFERENCE_VERSION})")
    try:
        raw_config = json.loads(metadata["config"])
        known = {f.name for f in fields(TinyFlux)}
        unknown = sorted(set(raw_config) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        config = TinyFlux(**raw_config)
        classes = tuple(json.loads(metadata["classes"]))
        image_size = int(metadata["image_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad metadata ({error}); expected 'config' (JSON), 'classes' (JSON list), 'image_size'") from error

    state = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
    strays = sorted(k for k in tensors if not k.startswith(_MODEL_PREFIX) and k not in _CONDITIONING_KEYS)
    if strays:
        raise ValueError(f"{path}: unexpected tensors {strays[:5]}")
    for key in _CONDITIONING_KEYS:
        if key not in tensors:
            raise ValueError(f"{path}: missing tensor '{key}'")
    contexts, pooled = tensors["conditioning.context"].float(), tensors["conditioning.pooled"].float()
    rows = len(classes) + 1
    if contexts.ndim != 3 or contexts.shape[0] != rows or contexts.shape[2] != config.context_dim:
        raise ValueError(f"{path}: 'conditioning.context' has shape {tuple(contexts.shape)}, expected ({rows}, tokens, {config.context_dim})")
    if tuple(pooled.shape) != (rows, config.vec_dim):
        raise ValueError(f"{path}: 'conditioning.pooled' has shape {tuple(pooled.shape)}, expected ({rows}, {config.vec_dim})")

    model = build_model(config, dtype=dtype)
    # the host's own key conversion for Flux checkpoints (newer ComfyUI names RMSNorm scales '.weight')
    state = model.model.model_config.process_unet_state_dict(state)
    expected = model.model.diffusion_model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: '{key}' has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        if not value.dtype.is_floating_point:
            raise ValueError(f"{path}: '{key}' has dtype {value.dtype}, expected a floating point dtype")
    model.model.diffusion_model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return ReferenceModel(model, config, classes, image_size, contexts, pooled, metadata)
