"""A training run's files applied to a model the way each was trained: one rule for the Train node's
returned model, the benchmark's `trained:` case and anything else that loads a run by its stem. A run is
one bundle file (`<stem>.safetensors`, what the trainer writes) or one file per part."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..core.files import BUNDLE_FORMAT, file_format, file_formats, header_metadata
from ..methods.patch_scheduler.file import FORMAT as PATCH_EMBEDDING_FORMAT
from ..methods.td_lora.file import FORMAT as TD_LORA_FORMAT
from ..methods.token_router.file import FORMAT as TOKEN_ROUTER_FORMAT
from ..methods.width.file import ROUTER_FORMAT as WIDTH_FORMAT
from ..training.export import SUFFIXES
from .patching import apply_settings, check_base_weights

PART_FORMATS = {"width": WIDTH_FORMAT, "td_lora": TD_LORA_FORMAT, "coarse": PATCH_EMBEDDING_FORMAT,
                "tokens": TOKEN_ROUTER_FORMAT}  # each part's file format (what its loader reads)


def run_files(stem: str | Path) -> list[Path]:
    """The run `stem`'s bundle (`<stem>.safetensors`), or else its part files (`<stem>.width.safetensors`, ...)
    that exist, in the trainer's part order."""
    bundle = Path(f"{stem}.safetensors")
    if bundle.is_file() and file_format(bundle) == BUNDLE_FORMAT:
        return [bundle]
    return [path for path in (Path(f"{stem}{suffix}") for suffix in SUFFIXES.values()) if path.is_file()]


def parts_of(path: Path) -> list[str]:
    """The trained parts a file holds ("width", "td_lora", "coarse", "tokens"): a bundle's, or a part file's."""
    if file_format(path) == BUNDLE_FORMAT:
        formats = file_formats(path)
        return [part for part, form in PART_FORMATS.items() if form in formats]
    for part, suffix in SUFFIXES.items():
        if path.name.endswith(suffix):
            return [part]
    raise ValueError(f"'{path.name}' is not a training run's file (a bundle, or suffixes {', '.join(SUFFIXES.values())}).")


def apply_trained_files(model_patcher: Any, paths: Iterable[str | Path]) -> Any:
    """A clone of `model_patcher` with every file applied as trained: width router (its thinned parts), TD-LoRA at
    strength 1, coarse patches on the schedule they were trained for, token routers as trained (DiffCR). Each file
    is checked against the model's base weights first; any problem raises and the model stays as it was."""
    from ..methods.patch_scheduler.file import load_patch_embedding_file
    from ..methods.patch_scheduler.runtime import PatchSchedulerSettings
    from ..methods.td_lora.file import load_td_lora_file
    from ..methods.token_router.runtime import TokenRouterSettings
    from ..methods.token_router.file import load_router_file
    from ..methods.width.settings import WidthSettings
    from ..methods.width.file import load_width_router
    from ..methods.td_lora.comfy_files import apply_td_lora

    paths = [Path(p) for p in paths]
    headers = [header_metadata(path) for path in paths]
    for path, header in zip(paths, headers):
        check_base_weights(model_patcher, header, path.name)
    patched = model_patcher
    for path, part, header in ((path, part, header) for path, header in zip(paths, headers) for part in parts_of(path)):
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


__all__ = ["PART_FORMATS", "apply_trained_files", "parts_of", "run_files"]
