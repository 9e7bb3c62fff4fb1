"""The seam for running a model call on a coarser patch grid (DDiT's dynamic patch sizes).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping

import torch

from .base import UnsupportedModelError

if TYPE_CHECKING:
    from .base import BlockRef
    from .capabilities import CallLayout, ModelInfo

# A patch run on the embedded image tokens right after the host's input embedding: it receives and
# returns the host's dict (for Flux `{"img", "txt", "img_ids", "txt_ids"}`).
PostInputPatch = Callable[[dict], dict]


def centred_rope_options(transformer_options: Mapping[str, Any], factor: int, post_input: PostInputPatch | None = None) -> dict:
    """transformer_options whose `rope_options` place coarse token i at the centre of the native tokens
    f*i .. f*i+f-1, i.e. position f*i + (f-1)/2 (scale f, shift (f-1)/2 along y and x), on top of a scale
    s and shift h a user set already: scale s*f, shift h + s*(f-1)/2. Hosts whose RoPE positions read
    `rope_options` as `shift + i * scale` (ComfyUI's Flux and Wan) share it. The caller's dicts are not changed."""
    rope = dict(transformer_options.get("rope_options") or {})
    for axis in ("y", "x"):
        scale = float(rope.get(f"scale_{axis}", 1.0))
        shift = float(rope.get(f"shift_{axis}", 0.0))
        rope[f"scale_{axis}"] = scale * factor
        rope[f"shift_{axis}"] = shift + scale * (factor - 1) / 2
    options = {**transformer_options, "rope_options": rope}
    if post_input is not None:
        patches = dict(transformer_options.get("patches") or {})
        patches["post_input"] = [post_input, *patches.get("post_input", [])]
        options["patches"] = patches
    return options


@dataclass(frozen=True)
class CoarseCall:
    """A model call running on a coarse grid, as the position stand-ins of a `PositionedCoarseGrid` see it."""

    factor: int
    native_size: tuple[int, int]  # (H, W) of the native latent
    coarse_size: tuple[int, int]  # (H, W) of the coarse latent the host embeds
    text_tokens: int  # text tokens before the image tokens in a joint position list


_RUNNING_COARSE_CALL: ContextVar[CoarseCall | None] = ContextVar("dynamic_dit_coarse_call", default=None)


@contextlib.contextmanager
def running_coarse_call(call: CoarseCall) -> Iterator[None]:
    token = _RUNNING_COARSE_CALL.set(call)
    try:
        yield
    finally:
        _RUNNING_COARSE_CALL.reset(token)


def running_coarse() -> CoarseCall | None:
    """The coarse call running now (in this thread), or None: what a position stand-in reads."""
    return _RUNNING_COARSE_CALL.get()


# A host method's stand-in: rewrite(own, call, *args, **kwargs) runs the host's own bound method `own` on the
# positions of the coarse call `call` instead of the ones it was given.
PositionRewrite = Callable[..., Any]


def _timestep_at_half(model_sampling: Any) -> float | None:
    """The timestep the host's model sampling passes for sigma 0.5 (read once per run, on the host)."""
    try:
        return float(model_sampling.timestep(torch.tensor([0.5])).reshape(-1)[0])
    except Exception:  # a model sampling whose tables live on another device: read once there
        buffer = next(iter(model_sampling.buffers()), None)
        if buffer is None:
            return None
        return float(model_sampling.timestep(torch.tensor([0.5], device=buffer.device)).reshape(-1)[0])


class CoarseGrid(ABC):
    native_patch: int  # the model's own patch size, in latent pixels
    noisy_channels: int  # leading channels of the latent argument that carry the noisy sample
    # Whether a trained coarse-patch embedding can run (it needs the host's post-input patch and the
    # final layer); False: training-free coarse steps only.
    trained_embedding: bool = True
    # What the model predicts: "velocity" (flow matching, CONST: x = (1 - t) x0 + t n, the output n - x0) or "noise"
    # (EPS on a discrete schedule: the sampler's x = x0 + sigma n, the output n); the coarse call's arithmetic follows
    prediction: str = "velocity"
    family_label: str = "this family"  # how messages name the family
    time_argument: str = "timestep"  # the model argument that carries the call's timestep
    timestep_scale: float = 1.0  # the host's model sampling passes timestep = timestep_scale * sigma

    def __init__(self, arch: Any, blocks: tuple["BlockRef", ...], info: "ModelInfo", native_patch: int | None = None,
                 noisy_channels: int | None = None) -> None:
        """The family's architecture, blocks and model info; the model's own patch and the latent's noisy channels
        (by default the architecture's `patch_size` and `in_channels`)."""
        self.arch, self._last_block, self._info = arch, blocks[-1], info
        self.native_patch = int(arch.patch_size if native_patch is None else native_patch)
        self.noisy_channels = int(arch.in_channels if noisy_channels is None else noisy_channels)

    def file_fields(self) -> dict[str, str]:
        """What a coarse-patch embedding file must state about the model it was trained for."""
        return self._info.header("patch_size", "in_channels")

    @abstractmethod
    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        """Why this call has to stay on the native grid (inputs laid out per native token), or None.
        Looks at the arguments' structure only: nothing is read back from the device."""

    def factor_refusal(self, arguments: Mapping[str, Any], factor: int) -> str | None:
        """Why this call cannot run `factor` times coarser (the coarse grid's own size), or None."""
        return None

    def sampling_refusal(self, model_sampling: Any) -> str | None:
        """Why no call of a run with this host model sampling may go coarse (once per run), or None: the coarse
        time shift assumes flow matching (CONST: the model's input is the sampler's x) with the model's timestep at
        `timestep_scale` * sigma."""
        if model_sampling is None:
            return None
        timestep = _timestep_at_half(model_sampling)
        scale = self.timestep_scale
        if timestep is None or abs(timestep - 0.5 * scale) <= 1e-4 * scale:
            return None
        expected = "timestep = sigma" if scale == 1 else f"{scale:g} * sigma"
        return f"the model sampling passes timestep {timestep:.4g} for sigma 0.5, not {self.family_label}'s {expected}"

    def flow_time(self, arguments: Mapping[str, Any]) -> torch.Tensor:
        """Per batch row t of the call, with the latent argument x = (1 - t) x0 + t noise."""
        return arguments[self.time_argument].float() / self.timestep_scale

    def with_flow_time(self, arguments: Mapping[str, Any], t: torch.Tensor) -> dict[str, Any]:
        """Argument changes that make the call evaluate the model at flow time `t` instead."""
        timestep = arguments[self.time_argument]
        return {self.time_argument: (t * self.timestep_scale).to(timestep.dtype)}

    def coarse_call(self, factor: int, arguments: Mapping[str, Any], native: torch.Tensor,
                    coarse: torch.Tensor) -> ContextManager[None]:
        """What must hold while the model runs the coarse latent `coarse` in place of `native`: nothing where the
        call's options place the tokens (`coarse_options`)."""
        return contextlib.nullcontext()

    @abstractmethod
    def coarse_options(self, transformer_options: Mapping[str, Any], factor: int,
                       post_input: PostInputPatch | None = None) -> dict:
        """A new transformer_options dict for a call on a grid `factor` times coarser: token i of the
        coarse grid gets the position of the centre of the native tokens it covers, on top of any
        position scaling already set. `post_input` is added to the host's post-input patches."""

    @abstractmethod
    def patchify(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """(B, C, H, W) with H, W multiples of `size` -> (B, tokens, C * size * size), host order."""

    @abstractmethod
    def unpatchify(self, tokens: torch.Tensor, rows: int, cols: int, size: int) -> torch.Tensor:
        """The inverse of `patchify`: (B, rows * cols, C * size * size) -> (B, C, rows * size, cols * size)."""

    @abstractmethod
    def replace_image_tokens(self, embedded: dict, tokens: torch.Tensor) -> dict:
        """Inside a post-input patch: the host's dict with the first image tokens replaced by `tokens`."""

    @property
    def last_block(self) -> "BlockRef":
        return self._last_block

    @abstractmethod
    def image_hidden(self, block: "BlockRef", block_out: Mapping[str, Any], layout: "CallLayout", count: int) -> torch.Tensor:
        """The first `count` image tokens of a block's output (B, count, D)."""

    @abstractmethod
    def final_conditioning(self, block_args: Mapping[str, Any]) -> Any:
        """What the final layer is modulated by, read from the last block's arguments (Flux: `vec`)."""

    @abstractmethod
    def final_layer(self, diffusion_model: torch.nn.Module, hidden: torch.Tensor, conditioning: Any,
                    linear: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The host's own final layer (norm and modulation) on `hidden`, with its last linear replaced."""

    def native_linears(self, diffusion_model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The model's own patch-embedding linear and the final layer's last linear (a trainer derives the
        coarse layers it starts from from them)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its patch embedding and final linear")

    @abstractmethod
    def final_modulation_flops(self, batch: int) -> float:
        """FLOPs of the final layer's modulation for a batch (work `final_layer` does besides `linear`)."""


class TrainingFreeCoarseGrid(CoarseGrid):
    """A grid whose family has no seam a trained coarse embedding could use (no post-input patch, or a final
    layer modulated by something its blocks never see): training-free coarse steps only. The trained-embedding
    part of the seam says why, by the family's name, instead of running."""

    trained_embedding = False
    no_trained_reason: str = "this family runs coarse steps training-free only, without a trained embedding"

    def _no_trained(self) -> UnsupportedModelError:
        return UnsupportedModelError(self.no_trained_reason)

    def coarse_options(self, transformer_options: Mapping[str, Any], factor: int,
                       post_input: PostInputPatch | None = None) -> dict:
        if post_input is not None:
            raise self._no_trained()
        return centred_rope_options(transformer_options, factor)

    def patchify(self, x: torch.Tensor, size: int) -> torch.Tensor:
        raise self._no_trained()

    def unpatchify(self, tokens: torch.Tensor, rows: int, cols: int, size: int) -> torch.Tensor:
        raise self._no_trained()

    def replace_image_tokens(self, embedded: dict, tokens: torch.Tensor) -> dict:
        raise self._no_trained()

    def image_hidden(self, block: "BlockRef", block_out: Mapping[str, Any], layout: "CallLayout", count: int) -> torch.Tensor:
        raise self._no_trained()

    def final_conditioning(self, block_args: Mapping[str, Any]) -> Any:
        raise self._no_trained()

    def final_layer(self, diffusion_model: torch.nn.Module, hidden: torch.Tensor, conditioning: Any,
                    linear: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        raise self._no_trained()

    def native_linears(self, diffusion_model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        raise self._no_trained()

    def final_modulation_flops(self, batch: int) -> float:
        return 0.0


class PositionedCoarseGrid(TrainingFreeCoarseGrid):
    """Training-free coarse steps on a host that places tokens without `rope_options`: its methods that read the
    positions are stand-ins (`position_points`) that rewrite them while a coarse call runs."""

    def coarse_options(self, transformer_options: Mapping[str, Any], factor: int,
                       post_input: PostInputPatch | None = None) -> dict:
        if post_input is not None:
            raise self._no_trained()
        return dict(transformer_options)

    @abstractmethod
    def position_points(self) -> Mapping[str, PositionRewrite]:
        """The host methods that read token positions, by attribute path under the diffusion model (a module's
        `forward` or the model's own method), and how each is run during a coarse call."""

    def text_tokens(self, arguments: Mapping[str, Any]) -> int:
        """Text tokens before the image tokens in the host's joint positions (none by default)."""
        return 0

    def coarse_call(self, factor: int, arguments: Mapping[str, Any], native: torch.Tensor,
                    coarse: torch.Tensor) -> ContextManager[None]:
        return running_coarse_call(CoarseCall(factor, tuple(native.shape[-2:]), tuple(coarse.shape[-2:]),
                                              self.text_tokens(arguments)))
