"""Reading the pack's safetensors files (routers, TD-LoRA, patch embeddings, the reference model,
benchmark conditioning) with one kind of error a person can act on, and the one-file bundle of a
training run.

Bundle (`format` = "dynamic_dit.bundle", `version` = "1"): the files of one training run in one
safetensors file. Each part keeps its own format: its tensors under `<part format>/<key>`, its header
metadata in the JSON object `parts` = {part format: {its metadata}}. The top-level metadata carries what
all parts share (base model, base-weight fingerprint, the command, ...). A loader asks for its format
(`read_safetensors(..., part=FORMAT)`) and gets exactly the part file it would have read; each node's
file list shows a bundle wherever it holds that node's part."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


BUNDLE_FORMAT, BUNDLE_VERSION = "dynamic_dit.bundle", "1"


def read_safetensors(path: str | os.PathLike, what: str,
                     part: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file on the CPU.

    `what` names the file in messages (e.g. "Router file 'x.safetensors'"); the messages add the full
    path. A missing, truncated or corrupt file raises ValueError; the format checks are the caller's.
    With `part` (a format), a bundle gives that part's tensors and metadata (ValueError when it has none);
    any other file is returned whole.
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
    if part is not None and metadata.get("format") == BUNDLE_FORMAT:
        return bundle_part(tensors, metadata, part, what)
    return tensors, metadata


def _bundle_parts(metadata: dict[str, str]) -> dict[str, dict[str, str]]:
    try:
        parts = json.loads(metadata.get("parts", "{}"))
    except ValueError:
        return {}
    return {str(k): dict(v) for k, v in parts.items() if isinstance(v, dict)} if isinstance(parts, dict) else {}


def bundle_part(tensors: dict[str, torch.Tensor], metadata: dict[str, str], part: str,
                what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The part `part` (a format) of a bundle's tensors and metadata, as its own file would hold them."""
    if metadata.get("version") != BUNDLE_VERSION:
        raise ValueError(f"{what}: bundle version {metadata.get('version')!r} is not supported (this pack reads {BUNDLE_VERSION}).")
    parts = _bundle_parts(metadata)
    if part not in parts:
        raise ValueError(f"{what} is a training-run bundle without a '{part}' part (it holds {', '.join(parts) or 'none'}); "
                         "pick it in the node that reads one of those.")
    prefix = part + "/"
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}, \
        {str(k): str(v) for k, v in parts[part].items()}


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for the server's other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, then the permissions any other file of the user gets (0644 under umask 022):
    safetensors creates its files 0600, which other tools and users on a shared machine could not read."""
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata=metadata)
    if os.name == "posix":
        os.chmod(path, 0o666 & ~_umask())


def write_bundle(path: str | os.PathLike, parts: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
                 metadata: dict[str, str]) -> None:
    """Write parts {format: (tensors, metadata)} into one bundle file with the shared `metadata`."""
    tensors = {f"{part}/{key}": value.contiguous() for part, (part_tensors, _) in parts.items()
               for key, value in part_tensors.items()}
    header = {**metadata, "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
              "parts": json.dumps({part: part_metadata for part, (_, part_metadata) in parts.items()})}
    save_safetensors(tensors, path, header)


def header_problem(metadata: dict[str, str], expected_format: str, version: str, kind: str) -> str | None:
    """Why a file's metadata is not `expected_format` at `version` (`kind` names the file type), or None."""
    if metadata.get("format") != expected_format:
        return f"metadata 'format' is {metadata.get('format')!r}, expected {expected_format!r}; this is not a {kind} file."
    if metadata.get("version") != version:
        return f"format version {metadata.get('version')!r} is not supported (this pack reads version {version})."
    return None


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_format_cache: dict[str, tuple[tuple[float, int], tuple[str | None, tuple[str, ...]]]] = {}


def _formats(path: str | os.PathLike) -> tuple[str | None, tuple[str, ...]]:
    """A file's header `format` and the formats it can be read as (a bundle: its parts). Reads only the
    header, and each file only again when its mtime or size changed, so listing a folder of large files
    for a node's file combo stays cheap."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return None, ()
    key = (stat.st_mtime, stat.st_size)
    cached = _format_cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    found: tuple[str | None, tuple[str, ...]] = (None, ())
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if 0 < size <= min(_MAX_HEADER_BYTES, stat.st_size - 8):
                metadata = json.loads(handle.read(size)).get("__metadata__") or {}
                top = metadata.get("format") if isinstance(metadata.get("format"), str) else None
                readable = tuple(_bundle_parts(metadata)) if top == BUNDLE_FORMAT else ((top,) if top else ())
                found = (top, readable)
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or JSON that is no header object
        found = (None, ())
    _format_cache[path] = (key, found)
    return found


def file_format(path: str | os.PathLike) -> str | None:
    """The `format` of a safetensors file's header metadata, or None (no such entry, not a readable
    safetensors file)."""
    return _formats(path)[0]


def file_formats(path: str | os.PathLike) -> tuple[str, ...]:
    """The formats a file can be read as: its own, or a bundle's parts; () when unreadable or unmarked."""
    return _formats(path)[1]


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
