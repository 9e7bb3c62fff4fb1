"""Trained files, one way for every node: each method registers its file kind (format, loader, how a file runs as
trained); a node loads a file by its choice in models/dynamic_dit/ through `load_trained_file`, which checks it
against the model's base weights first. A training run's files apply the way each was trained through
`apply_trained_files`: one rule for the Train node's returned model, the Load Trained node and the benchmark's
`trained:` case. A run is one bundle file (`<stem>.safetensors`, what the trainer writes) or one file per part."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..core.files import BUNDLE_FORMAT, file_format, file_formats, header_metadata
from ..training.export import suffixes
from .patching import check_base_weights, model_file_path


@dataclass(frozen=True)
class TrainedFileKind:
    """A method's trained file, as the nodes load and apply it."""

    part: str  # the trainer's part that writes it
    format: str  # its header's format
    label: str  # how messages name it ("Width router")
    load: Callable[[Path, str], Any]  # (path, name in messages) -> the loaded file, validated
    as_trained: Callable[[Any, Any, Mapping[str, str]], Any]  # (model, loaded, header) -> the model running it as trained


FILE_KINDS: dict[str, TrainedFileKind] = {}  # by format


def register_trained_file(kind: TrainedFileKind) -> None:
    FILE_KINDS[kind.format] = kind


def load_trained_file(model_patcher: Any, choice: str, file_format: str) -> Any:
    """The file `choice` of models/dynamic_dit/, loaded by its method's loader after its header is checked against
    the model's base weights (a trained file fits the weights it was trained on; shapes alone cannot tell)."""
    kind = FILE_KINDS[file_format]
    path = Path(model_file_path(choice, kind.label))
    check_base_weights(model_patcher, header_metadata(path), f"{kind.label} '{choice}'")
    return kind.load(path, choice)


def run_files(stem: str | Path) -> list[Path]:
    """The run `stem`'s bundle (`<stem>.safetensors`), or else its part files (`<stem>.width.safetensors`, ...)
    that exist, in the parts' order."""
    bundle = Path(f"{stem}.safetensors")
    if bundle.is_file() and file_format(bundle) == BUNDLE_FORMAT:
        return [bundle]
    return [path for path in (Path(f"{stem}{suffix}") for suffix in suffixes().values()) if path.is_file()]


def _kinds_in_part_order() -> list[TrainedFileKind]:
    order = list(suffixes())
    return sorted(FILE_KINDS.values(), key=lambda kind: order.index(kind.part))


def parts_of(path: Path) -> list[str]:
    """The trained parts a file holds ("width", "td_lora", "coarse", "tokens"): a bundle's, or a part file's."""
    if file_format(path) == BUNDLE_FORMAT:
        formats = file_formats(path)
        return [kind.part for kind in _kinds_in_part_order() if kind.format in formats]
    for part, suffix in suffixes().items():
        if path.name.endswith(suffix):
            return [part]
    raise ValueError(f"'{path.name}' is not a training run's file (a bundle, or suffixes {', '.join(suffixes().values())}).")


def apply_trained_files(model_patcher: Any, paths: Iterable[str | Path]) -> Any:
    """A clone of `model_patcher` with every file applied as trained (a width router on its thinned parts, TD-LoRA at
    strength 1, coarse patches on the schedule they were trained for, token routers as trained). Each file is
    checked against the model's base weights first; any problem raises and the model stays as it was."""
    paths = [Path(p) for p in paths]
    headers = [header_metadata(path) for path in paths]
    for path, header in zip(paths, headers):
        check_base_weights(model_patcher, header, path.name)
    by_part = {kind.part: kind for kind in FILE_KINDS.values()}
    patched = model_patcher
    for path, header in zip(paths, headers):
        for part in parts_of(path):
            kind = by_part[part]
            patched = kind.as_trained(patched, kind.load(path, path.name), header)
    return patched


__all__ = ["FILE_KINDS", "TrainedFileKind", "apply_trained_files", "load_trained_file", "parts_of", "register_trained_file",
           "run_files"]
