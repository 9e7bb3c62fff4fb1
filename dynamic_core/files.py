"""Reading the pack's safetensors files (routers, TD-LoRA, patch embeddings, the reference model,
benchmark conditioning) with one kind of error a person can act on."""
from __future__ import annotations

import json
import os

import torch


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file on the CPU.

    `what` names the file in messages (e.g. "Router file 'x.safetensors'"); the messages add the full
    path. A missing, truncated or corrupt file raises ValueError; the format checks are the caller's.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} was not found at {path}.")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header or data
        raise ValueError(
            f"{what} is not a readable safetensors file ({error}); {path} is {os.path.getsize(path)} bytes, "
            "maybe corrupt or truncated. Copy or export it again."
        ) from None
    return tensors, metadata


def header_problem(metadata: dict[str, str], expected_format: str, version: str, kind: str) -> str | None:
    """Why a file's metadata is not `expected_format` at `version` (`kind` names the file type), or None."""
    if metadata.get("format") != expected_format:
        return f"metadata 'format' is {metadata.get('format')!r}, expected {expected_format!r}; this is not a {kind} file."
    if metadata.get("version") != version:
        return f"format version {metadata.get('version')!r} is not supported (this pack reads version {version})."
    return None


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_format_cache: dict[str, tuple[tuple[float, int], str | None]] = {}


def file_format(path: str | os.PathLike) -> str | None:
    """The `format` of a safetensors file's header metadata, or None (no such entry, not a readable
    safetensors file). Reads only the header, and each file only again when its mtime or size changed,
    so listing a folder of large files for a node's file combo stays cheap."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (stat.st_mtime, stat.st_size)
    cached = _format_cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    found = None
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if 0 < size <= min(_MAX_HEADER_BYTES, stat.st_size - 8):
                metadata = json.loads(handle.read(size)).get("__metadata__") or {}
                found = metadata.get("format") if isinstance(metadata.get("format"), str) else None
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or JSON that is no header object
        found = None
    _format_cache[path] = (key, found)
    return found


def header_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file without reading its tensors ({} when unreadable: the
    file's own loader reports what is wrong)."""
    try:
        with open(os.fspath(path), "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= _MAX_HEADER_BYTES:
                return {}
            metadata = json.loads(handle.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
