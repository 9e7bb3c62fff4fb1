"""Writing a trained student as files today's loaders read: one file per part, with shared metadata.

Each part writes its method's own file format (the width router, TD-LoRA, patch embedding or token-router file,
`methods/<name>/file.py`), which its node reads; each loader validates its own format strictly (no foreign
tensors), so the parts cannot share one file. Every file of a run carries the same training metadata (base
architecture, base weight fingerprint, parts, target, steps, command; the model part from `ModelInfo.header`), and
the file names share a stem: `<name><suffix>`, one suffix per part. `save_bundle` puts them into one file,
`<name>.safetensors` (the bundle format of `core/files.py`, which every loader reads its part from): what the Train
node and the CLI write.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from ..core.files import read_safetensors, write_bundle
from ..core.method import PARTS
from .student import DynamicStudent


def suffixes() -> dict[str, str]:
    """Each registered part's file suffix, by part name, in the parts' canonical order."""
    return {name: part.file_suffix for name, part in sorted(PARTS.items(), key=lambda item: item[1].order)}


def training_metadata(student: DynamicStudent, *, target: float, steps: int, command: str, base_model: str,
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata every file of one training run carries (all strings, as safetensors requires)."""
    spec = student.spec
    return {
        **student.adapter.model_info().header(weights=student.diffusion_model),  # with the base-weight fingerprint
        "base_model": base_model,
        "trainer": "dynamic_dit.train",
        "trained_parts": ",".join(spec.parts),
        "width_parts": spec.width_parts,
        "target_flops": f"{target:g}",
        "train_steps": str(steps),
        "command": command,
        "spec": json.dumps({k: getattr(spec, k) for k in ("experts", "rank", "mlp_groups", "gate_hidden", "gate_embed")}),
        **{k: v for part in student.parts.values() for k, v in part.metadata().items() if k != "width_parts"},
        **{k: str(v) for k, v in (extra or {}).items()},
    }


def save_student(student: DynamicStudent, stem: str | os.PathLike, metadata: Mapping[str, str]) -> list[Path]:
    """Write one file per trained part next to `stem` (a path without the suffix); returns the paths, in the parts'
    canonical order."""
    stem = Path(stem)
    for suffix in (".safetensors", *suffixes().values()):
        if stem.name.endswith(suffix):
            stem = stem.with_name(stem.name[: -len(suffix)])
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for part in student.parts.values():
        path = stem.with_name(stem.name + part.file_suffix)
        part.save(student, path, dict(metadata))
        written.append(path)
    return written


def bundle_part_files(paths: Iterable[str | os.PathLike], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """One bundle file from a run's part files (each already in its own format), with the run's shared `metadata`."""
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = {}
    for written in map(Path, paths):
        tensors, part_metadata = read_safetensors(written, written.name)
        parts[part_metadata["format"]] = (tensors, part_metadata)
    write_bundle(path, parts, dict(metadata))
    return path


def save_bundle(student: DynamicStudent, path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """One file with every trained part (each written by its own format's writer first, then bundled)."""
    with tempfile.TemporaryDirectory() as folder:
        return bundle_part_files(save_student(student, Path(folder) / "run", metadata), path, metadata)


__all__ = ["bundle_part_files", "save_bundle", "save_student", "suffixes", "training_metadata"]
