"""Small but real ComfyUI Flux models built programmatically, and the reference model the pack ships
(its file format, loader and writer; `demo/reference_node.py` loads it). Random tiny models, their
conditioning and sampling for tests, the demo and the benchmark are in `demo/tiny_flux.py`.

Stock checkpoints cannot be this small (ComfyUI's Flux detection assumes 128-channel heads), so a
model is built the way ComfyUI builds a loaded Flux.1 checkpoint: the host's model detection reads
the keys of a checkpoint of this size and fills the model parameters (so fields a newer ComfyUI
adds need no code here), the few size fields detection cannot know are set from `TinyFlux`, and
the host's own model class is built and wrapped in a ModelPatcher.
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
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher

from ..core.files import read_safetensors


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

    def size_fields(self) -> dict:
        """The model fields this config decides; the host's own model detection fills every other one."""
        return dict(
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

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of a Flux.1 checkpoint of this size: what the host's
        model detection reads (which keys exist, and the shapes of the embedders)."""
        h, p = self.hidden_size, 2

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {
            "img_in.weight": empty(h, self.in_channels * p * p),
            "txt_in.weight": empty(h, self.context_dim),
            "time_in.in_layer.weight": empty(h, 256),
            "vector_in.in_layer.weight": empty(h, self.vec_dim),
            "final_layer.linear.weight": empty(self.in_channels * p * p, h),
        }
        if self.guidance_embed:
            keys["guidance_in.in_layer.weight"] = empty(h, 256)
        for i in range(max(self.depth, 1)):  # detection recognises Flux by its first double block (depth comes from us)
            keys[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = empty(self.head_dim)
            keys[f"double_blocks.{i}.img_attn.qkv.weight"] = empty(3 * h, h)
        for i in range(self.depth_single_blocks):
            keys[f"single_blocks.{i}.norm.key_norm.scale"] = empty(self.head_dim)
            keys[f"single_blocks.{i}.linear2.weight"] = empty(h, h + int(h * self.mlp_ratio))
        return keys


def host_model_config(config: TinyFlux, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None,
                      scaled_fp8: torch.dtype | None = None):
    """The host's own model config (a `comfy.supported_models` instance) for a Flux.1 model of this size.

    Built the way ComfyUI builds a loaded checkpoint's: its model detection reads the checkpoint's keys
    and fills every model parameter it knows (including fields newer hosts add, such as Flux's
    `txt_ids_dims`); only the size fields a small model cannot be detected by are set from `config`
    (detection assumes Flux.1's 128-channel heads and RoPE split).
    """
    model_config = detected_model_config(config.checkpoint_skeleton(), config.size_fields(), "flux", "Flux.1")
    if scaled_fp8 is not None:
        model_config.scaled_fp8 = scaled_fp8  # what detection sets for a checkpoint with a 'scaled_fp8' marker
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    return model_config


def detected_model_config(skeleton: dict[str, torch.Tensor], sizes: dict, image_model: str | None, family: str):
    """The host's own model config for a checkpoint with these keys (shape-only tensors): its model detection fills
    every model parameter it knows, `sizes` the fields a small model cannot be detected by. `image_model`: the
    detection result the caller expects (None: any). The caller sets the inference dtype."""
    unet_config = comfy.model_detection.detect_unet_config(skeleton, "")
    if unet_config is None or (image_model is not None and unet_config.get("image_model") != image_model):
        raise RuntimeError(f"This ComfyUI does not detect a {family} checkpoint from its keys (got {unet_config}).")
    unet_config.update(sizes)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, skeleton)
    if model_config is None:
        raise RuntimeError(f"This ComfyUI has no model class for the {family} config {unet_config}.")
    return model_config


def detected_model_patcher(skeleton: dict[str, torch.Tensor], sizes: dict, image_model: str | None, family: str,
                           dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ModelPatcher around the host's model for a checkpoint with these keys (`detected_model_config`), with
    deterministic random weights, frozen as the host leaves a loaded model (the tiny models of devtools/)."""
    model_config = detected_model_config(skeleton, sizes, image_model, family)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    initialise(model.diffusion_model, seed)
    frozen_as_the_host_leaves_it(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=comfy.model_management.unet_offload_device())


def initialise(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights: scaled normal linears, unit norm scales, small modulation.

    Values are drawn on the module's own device (a CPU module gets the same weights as always), so
    a FLUX.1-dev-sized model can be filled on a GPU without a 48 GB round trip through the CPU.
    """
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    norms = norm_parameters(module)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in norms or name.rsplit(".", 1)[-1] in ("scale_weight", "scale_input"):  # norm and fp8 scales
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


def norm_parameters(module: torch.nn.Module) -> set[str]:
    """Names of the RMSNorm scale parameters (hosts name them `.scale` or `.weight`)."""
    return {
        f"{path}.{name}" if path else name
        for path, sub in module.named_modules()
        if type(sub).__name__.endswith("RMSNorm")
        for name, _ in sub.named_parameters(recurse=False)
    }


def checkpoint_state(diffusion_model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A diffusion model's weights under Flux.1 checkpoint key names (RMSNorm scales as `.scale`), the
    format the pack's files store so that any host version reads them."""
    state = diffusion_model.state_dict() if state is None else state
    norms = norm_parameters(diffusion_model)
    return {(k[: -len(".weight")] + ".scale" if k in norms and k.endswith(".weight") else k): v for k, v in state.items()}


def host_state(model_config: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint-format weights renamed the way this host's loader renames them for its model class."""
    return model_config.process_unet_state_dict(dict(state))


def build_model(
    config: TinyFlux = TinyFlux(),
    dtype: torch.dtype = torch.float32,
    state_dict: dict | None = None,
    device: torch.device | str | None = None,
    manual_cast_dtype: torch.dtype | None = None,
    scaled_fp8: torch.dtype | None = None,
):
    """A ModelPatcher around a real ComfyUI Flux model of the given size, built by the host's own
    model detection and model classes (see `host_model_config`).

    `dtype`: the weights' storage dtype (with `manual_cast_dtype` the compute dtype, e.g. fp8 storage
    computed in float32). `device`: where the weights are created and initialised (default: the CPU,
    then ComfyUI moves them to its load device when sampling); pass the GPU to build a large model in place.
    """
    model_config = host_model_config(config, dtype, manual_cast_dtype, scaled_fp8)
    load_device = comfy.model_management.get_torch_device()
    model = model_config.get_model({}, device=device)
    diffusion_model = model.diffusion_model
    if state_dict is None:
        initialise(diffusion_model, config.seed)
    else:  # checkpoint key names (or this host's own), as ComfyUI's loader takes them
        diffusion_model.load_state_dict(host_state(model_config, state_dict))
    if dtype.is_floating_point and dtype.itemsize >= 2:
        diffusion_model.to(dtype)
    frozen_as_the_host_leaves_it(diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device())


def frozen_as_the_host_leaves_it(diffusion_model: torch.nn.Module) -> None:
    """No parameter requires grad, as ComfyUI 0.12.1's loader creates them and as ComfyUI 0.3.75 leaves every
    layer a weight patch (a LoRA) was applied to and removed from. It matters for bits: for a non-contiguous input
    (Flux's attention output, sliced into text and image tokens) PyTorch's matmul folds the batch into one
    matrix product when the weight requires grad and otherwise runs a batched product, which rounds differently
    on some CPUs; a model loaded trainable would compute its first image one way and, after any LoRA, the
    other."""
    diffusion_model.requires_grad_(False)


# --- the reference model: a small Flux trained on real photographs --------------------------------
# Its "latent" is the photo itself under a fixed invertible transform, so images need no VAE:
#   RGB in [0, 1] -> [-1, 1] -> add a zero 4th channel -> 2x2 pixel-unshuffle (16 channels, half size)
#   = the model's internal space; ComfyUI's LATENT is that through the inverse of Flux's latent affine
#   (latent = x / 0.3611 + 0.1159), so KSampler's process_latent_in hands the model exactly x.
REFERENCE_FORMAT = "dynamic_dit.reference_flux"
REFERENCE_VERSION = "1"
REFERENCE_PATH = Path(__file__).resolve().parents[1] / "reference" / "flux_photo_reference.safetensors"
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
    from ..core.files import save_safetensors

    named = checkpoint_state(build_model(config).model.diffusion_model, dict(diffusion_model_state))  # host-independent names
    tensors = {_MODEL_PREFIX + k: v.detach().to(dtype).contiguous() for k, v in named.items()}
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
    save_safetensors(tensors, path, metadata)
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
    state = host_state(model.model.model_config, state)
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
