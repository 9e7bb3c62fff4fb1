"""The host's patch points, for families whose ComfyUI code lacks them: a `patches_replace["dit"]` point on each block
(Z-Image's `layers`), and the DIFFUSION_MODEL wrapper point around the diffusion model's forward (SD3's MMDiT).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Iterator

from comfy.patcher_extension import WrapperExecutor, WrappersMP, get_all_wrappers

from ..families.coarse import PositionedCoarseGrid, PositionRewrite, running_coarse

if TYPE_CHECKING:
    import torch

    from ..families.base import BlockRef, ModelAdapter


_CALL_OPTIONS: ContextVar[dict | None] = ContextVar("dynamic_dit_call_options", default=None)


class EmulatedPatchPoint:
    """A block's `forward` that calls a replace patch of the call's transformer_options, as a host's loop would."""

    def __init__(self, adapter: "ModelAdapter", block: "BlockRef", module: "torch.nn.Module") -> None:
        self.adapter, self.block, self.key = adapter, block, adapter.patch_key(block)
        self.forward = type(module).forward.__get__(module)  # the block's own forward, bound to it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self.adapter.block_arguments(self.block, args, kwargs)
        options = arguments.get("transformer_options")
        if options is None:  # the host hands the block no options: the running model call's
            options = arguments["transformer_options"] = _CALL_OPTIONS.get() or {}
        patch = options.get("patches_replace", {}).get("dit", {}).get(self.key)
        if patch is None:
            return self.forward(*args, **kwargs)
        out = patch(arguments, {"original_block": lambda a: self.adapter.run_original(self.forward, self.block, a)})
        return self.adapter.block_result(self.block, out)

    def __deepcopy__(self, memo: dict) -> "EmulatedPatchPoint":
        return self  # ComfyUI copies model options and patches; the stand-in holds the model's own module


class EmulatedWrapperPoint:
    """A diffusion model's `forward` that runs the call's DIFFUSION_MODEL wrappers around the class's own forward."""

    def __init__(self, diffusion_model: "torch.nn.Module") -> None:
        self.model = diffusion_model
        self.forward = type(diffusion_model).forward.__get__(diffusion_model)
        self.signature = inspect.signature(self.forward)

    def _options(self, args: tuple, kwargs: dict) -> dict:
        bound = self.signature.bind(*args, **kwargs).arguments
        return bound.get("transformer_options") or bound.get("kwargs", {}).get("transformer_options") or {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wrappers = get_all_wrappers(WrappersMP.DIFFUSION_MODEL, self._options(args, kwargs))
        return WrapperExecutor.new_class_executor(self._class_forward, self.model, wrappers).execute(*args, **kwargs)

    def _class_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The class's forward, with the options the wrappers finally hand it held for the blocks' stand-ins."""
        token = _CALL_OPTIONS.set(self._options(args, kwargs))
        try:
            return self.forward(*args, **kwargs)
        finally:
            _CALL_OPTIONS.reset(token)

    def __deepcopy__(self, memo: dict) -> "EmulatedWrapperPoint":
        return self


class EmulatedPositionPoint:
    """A host method that reads token positions: the method itself, except during a coarse call, where the grid's
    rewrite runs it on the positions of the regions' centres."""

    def __init__(self, owner: Any, name: str, rewrite: PositionRewrite) -> None:
        self.own = getattr(type(owner), name).__get__(owner)  # the class's method, bound to the module
        self.rewrite = rewrite

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = running_coarse()
        if call is None:
            return self.own(*args, **kwargs)
        return self.rewrite(self.own, call, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "EmulatedPositionPoint":
        return self


def position_points(adapter: "ModelAdapter", diffusion_model: "torch.nn.Module") -> dict[str, EmulatedPositionPoint]:
    """The stand-ins of the family's coarse grid, by object-patch key."""
    grid = adapter.coarse_grid()
    if not isinstance(grid, PositionedCoarseGrid):
        return {}
    points = {}
    for path, rewrite in grid.position_points().items():
        owner_path, _, name = path.rpartition(".")
        owner = diffusion_model
        for part in owner_path.split(".") if owner_path else ():  # a submodule, or a plain object (LTX's patchifier)
            owner = getattr(owner, part)
        points[f"diffusion_model.{path}"] = EmulatedPositionPoint(owner, name, rewrite)
    return points


def emulated_blocks(adapter: "ModelAdapter") -> list["BlockRef"]:
    return [block for block in adapter.blocks if adapter.block_kind(block).emulated]


def with_patch_points(model_patcher: Any, adapter: "ModelAdapter") -> Any:
    """A clone of `model_patcher` with the patch points the family's host lacks as object patches (applied and removed
    by the host with the model's loading); for a family whose host has them all, a plain clone."""
    blocks = emulated_blocks(adapter)
    wrappers = adapter.emulated_model_wrappers
    patched = model_patcher.clone()
    diffusion_model = model_patcher.model.diffusion_model
    if wrappers and not isinstance(patched.object_patches.get("diffusion_model.forward"), EmulatedWrapperPoint):
        patched.add_object_patch("diffusion_model.forward", EmulatedWrapperPoint(diffusion_model))
    for key, point in position_points(adapter, diffusion_model).items():
        if not isinstance(patched.object_patches.get(key), EmulatedPositionPoint):
            patched.add_object_patch(key, point)
    for block in blocks:
        path = f"diffusion_model.{adapter.block_kind(block).module_list}.{block.index}.forward"
        if not isinstance(patched.object_patches.get(path), EmulatedPatchPoint):
            patched.add_object_patch(path, EmulatedPatchPoint(adapter, block, adapter.block_module(diffusion_model, block)))
    return patched


@contextlib.contextmanager
def emulated_patch_points(diffusion_model: "torch.nn.Module", adapter: "ModelAdapter") -> Iterator[None]:
    """The blocks' patch points (and the wrapper point that holds a call's options for them) on the modules themselves
    while the context lasts, for code that calls the diffusion model directly; a module that has one already (a loaded
    model patcher's) keeps it. Nests."""
    set_here = []
    stand_ins = [(adapter.block_module(diffusion_model, block), lambda m, b=block: EmulatedPatchPoint(adapter, b, m),
                  EmulatedPatchPoint) for block in emulated_blocks(adapter)]
    if adapter.emulated_model_wrappers and stand_ins:
        stand_ins.append((diffusion_model, EmulatedWrapperPoint, EmulatedWrapperPoint))
    for module, make, kind in stand_ins:
        if isinstance(module.__dict__.get("forward"), kind):
            continue
        set_here.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
        module.forward = make(module)
    try:
        yield
    finally:
        for module, had_own, previous in reversed(set_here):
            if had_own:
                module.forward = previous
            else:
                del module.forward
