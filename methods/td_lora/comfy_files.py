"""TD-LoRA in ComfyUI: file lookup, standard LoRA key styles read as K = 1, applying to a model.

The reasoning and the equations: docs/methods/td_lora.md.
"""
from __future__ import annotations

import os
import uuid
from types import MappingProxyType
from typing import Any, Mapping

import torch

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter
import folder_paths

from .binding import bind_layers
from ...families import block_linear_index
from .experts import LowRankLayer, TDLoRA
from .settings import TDLoRASettings
from .file import is_td_lora, parse_td_lora
from ...core.files import file_formats, read_safetensors
from ...integration.patching import MODEL_FOLDER, adapter_of, apply_settings, diffusion_model_of, plan_of

FOLDERS = (MODEL_FOLDER, "loras")
MODEL_PREFIX = "diffusion_model."
_ADAPTER_NAMES = {"loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "oft": "OFT", "boft": "BOFT"}
_SAFETENSORS = (".safetensors", ".sft")


# --- files ---------------------------------------------------------------------------------------
def file_choices() -> list[str]:
    """TD-LoRA files of models/dynamic_dit/ and every LoRA of the loras folder, as 'folder/name'."""
    choices = []
    for folder in FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except KeyError:  # folder not registered in this host
            continue
        for name in names:
            if folder == MODEL_FOLDER:
                path = folder_paths.get_full_path(folder, name)
                # models/dynamic_dit/ also holds other methods' files; a damaged file stays listed so its error shows
                formats = file_formats(path) if path is not None else ()
                if path is None or (formats and "td_lora" not in formats):
                    continue
            choices.append(f"{folder}/{name}")
    return choices


def path_of(choice: str) -> str:
    folder, _, name = choice.partition("/")
    if folder not in FOLDERS or not name:
        raise ValueError(f"TD-LoRA file '{choice}': expected 'dynamic_dit/<file>' or 'loras/<file>'.")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"TD-LoRA file '{name}' is not in the '{folder}' model folder(s) {folder_paths.get_folder_paths(folder)}.")
    return path


def read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata; ValueError naming the file when it cannot be read."""
    if path.lower().endswith(_SAFETENSORS):
        return read_safetensors(path, f"TD-LoRA file {os.path.basename(path)}", part="td_lora")
    try:
        return comfy.utils.load_torch_file(path, safe_load=True), {}
    except Exception as error:
        raise ValueError(f"{path}: could not read this LoRA file ({error}); it may be truncated or not a LoRA.") from error


def load_td_lora(model_patcher: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> TDLoRA:
    """A TD-LoRA file, or a standard LoRA (any key style ComfyUI reads) as K = 1, for this model."""
    if is_td_lora(metadata):
        return parse_td_lora(tensors, metadata, source)
    return read_standard_lora(model_patcher, tensors, source)


# --- standard LoRAs ------------------------------------------------------------------------------
class _ReadTracker(dict):
    """A state dict that remembers which keys ComfyUI's LoRA reader took a value from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _split_key(key: Any) -> tuple[str, tuple[int, int, int] | None, Any]:
    """ComfyUI patch keys: 'model key' or (model key, (dim, start, length)[, function])."""
    if isinstance(key, str):
        return key, None, None
    return key[0], key[1], key[2] if len(key) > 2 else None


def _layer_prefix(key: str, key_map: Mapping[str, Any]) -> str | None:
    """The part of a file key that names a layer of the model (cut at dots, or before diffusers' '_lora.')."""
    candidates = [key[:i] for i, char in enumerate(key) if char == "."] + [key.split("_lora.", 1)[0]]
    return next((c for c in sorted(candidates, key=len, reverse=True) if c in key_map), None)


def _file_name_of(key: Any, key_map: Mapping[str, Any], file_keys: Any) -> str:
    """The name a LoRA file used for a model key (for error messages)."""
    weight_key = key[: -len(".bias")] + ".weight" if isinstance(key, str) and key.endswith(".bias") else key  # diff_b
    for prefix, target in key_map.items():
        if target in (key, weight_key) and any(k.startswith(prefix + ".") or k.startswith(prefix + "_lora.") for k in file_keys):
            return prefix
    return _split_key(key)[0]


def read_standard_lora(model_patcher: Any, tensors: Mapping[str, torch.Tensor], source: str) -> TDLoRA:
    adapter = adapter_of(model_patcher)
    base_model = model_patcher.model
    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    converted = _ReadTracker(comfy.lora_convert.convert_lora(dict(tensors)))
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    _check_every_key_read(converted, key_map, source, adapter.display_name)
    if not patches:
        raise ValueError(f"{source}: no LoRA weights found (the file is empty).")

    index = block_linear_index(adapter, diffusion_model_of(model_patcher))
    weights = base_model.state_dict()
    pieces: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    host_patches: dict[Any, Any] = {}
    for key, patch in patches.items():
        model_key, offset, function = _split_key(key)
        name = _file_name_of(key, key_map, converted)
        target = weights[model_key]
        if offset is not None:
            target = target.narrow(*offset)
        if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
            up, down, alpha = _low_rank_weights(patch, target, source, name, model_key, adapter.display_name)
            path = model_key[len(MODEL_PREFIX):-len(".weight")] if model_key.endswith(".weight") else None
            if path in index and function is None and (offset is None or offset[0] == 0):
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                pieces.setdefault(path, []).append((offset[1] if offset else 0, up, down, scale))
                continue
        elif isinstance(patch, comfy.weight_adapter.WeightAdapterBase):
            kind = _ADAPTER_NAMES.get(getattr(patch, "name", ""), type(patch).__name__)
            raise _unsupported(source, name, model_key, kind)
        elif isinstance(patch, tuple) and len(patch) == 2 and patch[0] in ("diff", "set"):
            value = patch[1][0]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{source}: '{name}' ({patch[0]}) has shape {tuple(value.shape)}, but '{model_key}' is {tuple(target.shape)}."
                )
        else:
            raise _unsupported(source, name, model_key, repr(type(patch).__name__))
        host_patches[key] = patch
    layers = {path: _merge_pieces(found, index[path][2].weight.shape[0]) for path, found in pieces.items()}
    return TDLoRA(source, 1, MappingProxyType(layers), host_patches=MappingProxyType(host_patches))


def _check_every_key_read(converted: "_ReadTracker", key_map: Mapping[str, Any], source: str, family: str) -> None:
    """Every key of the file was read by ComfyUI's LoRA loader, or ValueError naming the first that was not."""
    unread = sorted(set(converted) - converted.read)
    if not unread:
        return
    incomplete = [key for key in unread if _layer_prefix(key, key_map) is not None]
    if incomplete:
        raise ValueError(
            f"{source}: '{incomplete[0]}' was not used: layer '{_layer_prefix(incomplete[0], key_map)}' exists in this "
            f"model, but its LoRA weights are incomplete or of a kind ComfyUI does not read (a down without an up matrix?)."
        )
    raise ValueError(
        f"{source}: {len(unread)} key(s) match no layer of this {family} model, e.g. '{unread[0]}'"
        + (f", '{unread[1]}'" if len(unread) > 1 else "")
        + ". Is this LoRA for another model (or a text-encoder LoRA)? The model stays unchanged."
    )


def _low_rank_weights(patch: Any, target: torch.Tensor, source: str, name: str, model_key: str,
                      family: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(up, down, alpha) of a plain LoRA weight patch that fits `target`, or ValueError saying what it is instead."""
    up, down, alpha, mid, dora_scale, reshape = patch.weights
    unsupported = (
        "LoCon/Tucker (lora_mid)" if mid is not None else
        "DoRA (dora_scale)" if dora_scale is not None else
        "a reshaping LoRA (reshape_weight)" if reshape is not None else None
    )
    if unsupported:
        raise _unsupported(source, name, model_key, unsupported)
    expected = (target.shape[0], down.shape[0]), (up.shape[-1], target[0].numel())
    if up.ndim != 2 or down.ndim != 2 or (tuple(up.shape), tuple(down.shape)) != expected:
        raise ValueError(  # the cause first: a LoRA of another model (or size) has this family's key names
            f"{source} is for another model, or another size of {family}: its '{name}' does not fit "
            f"this model's '{model_key}' {tuple(target.shape)}: up {tuple(up.shape)} and down {tuple(down.shape)}, "
            f"expected up (out={expected[0][0]}, rank) and down (rank, in={expected[1][1]}). The model stays "
            "unchanged."
        )
    return up, down, alpha


def _unsupported(source: str, name: str, model_key: str, kind: str) -> ValueError:
    return ValueError(
        f"{source}: '{name}' (layer '{model_key}') is {kind}; the TD-LoRA Loader applies plain low-rank LoRAs "
        f"(lora_up/lora_down or lora_A/lora_B). Load this file with ComfyUI's 'LoraLoaderModelOnly': it composes "
        f"with the Dynamic DiT nodes."
    )


def _merge_pieces(pieces: list[tuple[int, torch.Tensor, torch.Tensor, float]], out_features: int) -> LowRankLayer:
    """LoRA pieces on row ranges of one layer (diffusers' q, k, v on a fused qkv) as one bypass of summed rank."""
    dtype = pieces[0][1].dtype
    for _, up, down, _ in pieces:
        dtype = torch.promote_types(dtype, torch.promote_types(up.dtype, down.dtype))
    rank = sum(down.shape[0] for _, _, down, _ in pieces)
    up_all = torch.zeros(out_features, rank, dtype=dtype)
    scale = torch.empty(rank, dtype=torch.float32)
    column = 0
    for start, up, down, piece_scale in pieces:
        r = down.shape[0]
        up_all[start : start + up.shape[0], column : column + r] = up.to(dtype)
        scale[column : column + r] = piece_scale
        column += r
    down_all = torch.cat([down.to(dtype) for _, _, down, _ in pieces], dim=0)
    return LowRankLayer(down_all.contiguous(), up_all, scale, experts=1)


# --- applying ------------------------------------------------------------------------------------
def _as_weight_patch(layer: LowRankLayer) -> Any:
    """A K = 1 layer outside the blocks as ComfyUI's own LoRA weight patch (merged once, exact)."""
    up = layer.up.float() * layer.column_scale[None, :]
    return comfy.weight_adapter.LoRAAdapter(set(), (up, layer.down.float(), None, None, None, None))


def apply_td_lora(model_patcher: Any, lora: TDLoRA, strength: float) -> Any:
    """A clone of `model_patcher` with `lora` applied at `strength`, replacing an earlier TD-LoRA.

    Everything is checked before cloning; a bad file or strength raises and the model stays as it was.
    """
    adapter = adapter_of(model_patcher)
    bound = bind_layers(lora, adapter, diffusion_model_of(model_patcher))
    weight_patches: dict[Any, Any] = {}
    if strength != 0.0:
        weight_patches.update(lora.host_patches)
        for path, layer in bound.outside.items():
            weight_patches[f"{MODEL_PREFIX}{path}.weight"] = _as_weight_patch(layer)
    settings = TDLoRASettings(lora, bound, float(strength), MappingProxyType(weight_patches))
    plan = plan_of(model_patcher)
    previous = plan.settings.get(TDLoRASettings.method) if plan is not None else None
    patched = apply_settings(model_patcher, settings)
    if isinstance(previous, TDLoRASettings) and previous.weight_patches:
        _remove_weight_patches(patched, previous.weight_patches)
    if weight_patches:
        patched.add_patches(weight_patches, strength)
    return patched


def _remove_weight_patches(model_patcher: Any, patches: Mapping[Any, Any]) -> None:
    """Drop the weight patches an earlier TD-LoRA Loader added (the clone owns its patch lists)."""
    ours = {id(value) for value in patches.values()}
    with model_patcher.use_ejected():
        for key, entries in list(model_patcher.patches.items()):
            kept = [entry for entry in entries if id(entry[1]) not in ours]
            if len(kept) == len(entries):
                continue
            if kept:
                model_patcher.patches[key] = kept
            else:
                del model_patcher.patches[key]
        model_patcher.patches_uuid = uuid.uuid4()
