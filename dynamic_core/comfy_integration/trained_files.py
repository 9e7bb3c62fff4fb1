"""A training run's files applied to a model the way each was trained: one rule for the Train node's
returned model, the benchmark's `trained:` case and anything else that loads a run by its stem."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..files import header_metadata
from ..training.export import SUFFIXES
from .patching import apply_settings, check_base_weights


def run_files(stem: str | Path) -> list[Path]:
    """The files of the run `stem` (`<stem>.width.safetensors`, ...) that exist, in the trainer's part order."""
    return [path for path in (Path(f"{stem}{suffix}") for suffix in SUFFIXES.values()) if path.is_file()]


def part_of(path: Path) -> str:
    """The trained part a file holds, from its suffix ("width", "td_lora", "coarse", "tokens")."""
    for part, suffix in SUFFIXES.items():
        if path.name.endswith(suffix):
            return part
    raise ValueError(f"'{path.name}' is not a training run's file (suffixes {', '.join(SUFFIXES.values())}).")


def apply_trained_files(model_patcher: Any, paths: Iterable[str | Path]) -> Any:
    """A clone of `model_patcher` with every file applied as trained: width router (its thinned parts), TD-LoRA at
    strength 1, coarse patches on the schedule they were trained for, token routers as trained (DiffCR). Each file
    is checked against the model's base weights first; any problem raises and the model stays as it was."""
    from ..methods.patch_embedding_file import load_patch_embedding_file
    from ..methods.patch_scheduler import PatchSchedulerSettings
    from ..methods.td_lora_file import load_td_lora_file
    from ..methods.token_router import TokenRouterSettings
    from ..methods.token_router_file import load_router_file
    from ..methods.width import WidthSettings
    from ..methods.width_file import load_width_router
    from .td_lora_files import apply_td_lora

    paths = [Path(p) for p in paths]
    parts = [part_of(path) for path in paths]
    headers = [header_metadata(path) for path in paths]
    for path, header in zip(paths, headers):
        check_base_weights(model_patcher, header, path.name)
    patched = model_patcher
    for path, part, header in zip(paths, parts, headers):
        if part == "width":
            patched = apply_settings(patched, WidthSettings(router=load_width_router(path), parts=header.get("width_parts", "both")))
        elif part == "td_lora":
            patched = apply_td_lora(patched, load_td_lora_file(path), 1.0)
        elif part == "coarse":
            embedding = load_patch_embedding_file(path)
            patched = apply_settings(patched, PatchSchedulerSettings(mode="manual", schedule=embedding.trained_schedule(),
                                                                     embedding=embedding))
        else:
            patched = apply_settings(patched, TokenRouterSettings.as_trained(load_router_file(path, name=path.name)))
    return patched


__all__ = ["apply_trained_files", "part_of", "run_files"]
