"""Benchmark conditioning files: a prompt's conditioning (text embedding, pooled output, guidance) as
safetensors, written by the "Save Conditioning for Dynamic DiT Benchmark" node and read by the command-line
benchmark (`python -m devtools.bench --model ... --positive FILE`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

CONDITIONING_FORMAT = "dynamic_dit.conditioning"
CONDITIONING_VERSION = "1"


def save_conditioning(path: str | Path, conditioning: list, guidance: float | None = None) -> Path:
    """Write the first entry of a ComfyUI CONDITIONING (text embedding, pooled output, guidance) to safetensors."""
    from ..core.files import save_safetensors

    if not conditioning or len(conditioning[0]) != 2:
        raise ValueError("expected a ComfyUI CONDITIONING (a list of [embedding, options]) with at least one entry")
    context, options = conditioning[0]
    tensors = {"context": context.detach().float().cpu().contiguous()}
    if options.get("pooled_output") is not None:
        tensors["pooled_output"] = options["pooled_output"].detach().float().cpu().contiguous()
    guidance = options.get("guidance") if guidance is None else guidance
    metadata = {"format": CONDITIONING_FORMAT, "version": CONDITIONING_VERSION}
    if guidance is not None:
        metadata["guidance"] = repr(float(guidance))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata)
    return path


def save_conditioning_to_output(conditioning: list, filename_prefix: str) -> Path:
    """save_conditioning into ComfyUI's output folder, numbered like its image saves."""
    import folder_paths

    output = folder_paths.get_output_directory()
    folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, output)
    return save_conditioning(Path(folder) / f"{name}_{counter:05}_.safetensors", conditioning)


def load_conditioning(path: str | Path, context_dim: int | None = None, vec_dim: int | None = None) -> list:
    """A ComfyUI CONDITIONING from a file of save_conditioning, checked against the model's input sizes."""
    from ..core.files import read_safetensors

    path = Path(path)
    tensors, metadata = read_safetensors(path, f"Conditioning file '{path.name}'")
    if metadata.get("format") != CONDITIONING_FORMAT or metadata.get("version") != CONDITIONING_VERSION:
        raise ValueError(f"{path}: not a conditioning file of version {CONDITIONING_VERSION} "
                         f"(format {metadata.get('format')!r}, version {metadata.get('version')!r}); "
                         "write one with the 'Save Conditioning for Dynamic DiT Benchmark' node")
    context = tensors.get("context")
    if context is None or context.ndim != 3:
        raise ValueError(f"{path}: 'context' must be a (1, tokens, dim) tensor, found {None if context is None else tuple(context.shape)}")
    if context_dim is not None and context.shape[-1] != context_dim:
        raise ValueError(f"{path}: the text embedding has width {context.shape[-1]}, this model expects {context_dim} "
                         "(conditioning from another model's text encoder?)")
    options: dict[str, Any] = {}
    pooled = tensors.get("pooled_output")
    if vec_dim is not None:
        if pooled is None:
            raise ValueError(f"{path}: this model needs a pooled output of width {vec_dim}, the file has none")
        if pooled.shape[-1] != vec_dim:
            raise ValueError(f"{path}: the pooled output has width {pooled.shape[-1]}, this model expects {vec_dim}")
    if pooled is not None:
        options["pooled_output"] = pooled
    if "guidance" in metadata:
        options["guidance"] = float(metadata["guidance"])
    return [[context, options]]
