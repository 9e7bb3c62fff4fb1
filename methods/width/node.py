"""Dynamic Width Patcher: fewer attention heads and MLP channels at noisy steps (DyDiT TDW)."""
from __future__ import annotations

from comfy_api.latest import io

from ...integration.node_schema import FAMILY_WORDS, SPEED_WORDS, FRACTION, PERCENT, model_to_speed_up, node_schema, shown_when
from ...integration.patching import apply_settings, model_files
from ...integration.trained_files import TrainedFileKind, load_trained_file, register_trained_file
from .file import ROUTER_FORMAT, WidthRouter, load_width_router
from .settings import PART_LABELS, PRESET_LABELS, PRESETS, WidthSettings


NO_ROUTER = "none (training-free)"
CUSTOM = "custom"
TARGET = "target FLOPs"
PRESET_CHOICES = [*PRESET_LABELS.values(), CUSTOM, TARGET]
_PRESET_BY_LABEL = {label: name for name, label in PRESET_LABELS.items()}
PART_CHOICES = PART_LABELS


def _preset_help() -> str:
    return "; ".join(f"{PRESET_LABELS[name]}: {p.noisy_width:.2f} -> {p.clean_width:.2f}" for name, p in PRESETS.items())


def width_settings(
    preset: str,
    parts: str,
    noisy_width: float,
    clean_width: float,
    target_flops: float,
    start_percent: float,
    end_percent: float,
    router: WidthRouter | None = None,
    mlp_groups: int = 0,
) -> WidthSettings:
    """The node's widgets as settings (a loaded router file replaces the schedule)."""
    if parts not in PART_CHOICES:
        raise ValueError(f"Dynamic Width Patcher: parts must be one of {', '.join(PART_CHOICES)}, got '{parts}'.")
    common = dict(start_percent=start_percent, end_percent=end_percent, parts=PART_CHOICES[parts], mlp_groups=mlp_groups)
    if router is not None:
        return WidthSettings(router=router, **common)
    preset = _PRESET_BY_LABEL.get(preset, preset)  # the node lists labels; scripts may pass the short names
    if preset in PRESETS:
        chosen = PRESETS[preset]
        return WidthSettings(noisy_width=chosen.noisy_width, clean_width=chosen.clean_width, **common)
    if preset == CUSTOM:
        return WidthSettings(noisy_width=noisy_width, clean_width=clean_width, **common)
    if preset == TARGET:
        return WidthSettings(target_flops=target_flops, **common)
    raise ValueError(f"Dynamic Width Patcher: preset must be one of {', '.join(PRESET_CHOICES)}, got '{preset}'.")


class DynamicWidthPatcher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicWidthPatcher", "Dynamic Width Patcher", "dynamic_dit/methods",
            "Timestep-wise dynamic width (DyDiT): at noisy steps every block runs with fewer attention heads and "
            "MLP channels, rising to full width as the image settles. The dropped heads and channels are really "
            "skipped (sliced weights), LoRAs and fp8/low-VRAM loading keep working. Without a router file the "
            "heads and channel groups are ranked by a short one-off calibration (cached per model and LoRA set); "
            "with a trained router file from models/dynamic_dit/ the router decides per step. Full width gives "
            f"exactly the unpatched image. Presets, as the width kept at the noisiest step -> at the end: {_preset_help()}.",
            [
                model_to_speed_up(),
                io.Combo.Input("preset", options=PRESET_CHOICES, default="quality",
                               tooltip="How narrow noisy steps run: quality keeps the image closest, fast trades detail for speed; custom and target below."),
                io.Combo.Input("parts", options=list(PART_CHOICES), default="heads and MLP",
                               tooltip="What to thin: attention heads, MLP channels, or both."),
                shown_when(io.Float.Input("noisy_width", default=0.5, **FRACTION,
                                          tooltip="Fraction of heads / MLP channels kept at start_percent (the noisy end)."),
                           preset=[CUSTOM]),
                shown_when(io.Float.Input("clean_width", default=1.0, **FRACTION,
                                          tooltip="Fraction kept at end_percent; 1.0 = full width for the final detail."),
                           preset=[CUSTOM]),
                shown_when(io.Float.Input("target_flops", default=0.7, **FRACTION,
                                          tooltip="Average FLOPs of the run's steps, as a fraction of the full model's."),
                           preset=[TARGET]),
                io.Float.Input("start_percent", default=0.0, **PERCENT,
                               tooltip="Where the width schedule starts (0 = pure noise); before it: full width."),
                io.Float.Input("end_percent", default=1.0, **PERCENT,
                               tooltip="Where the width schedule ends (1 = fully denoised); after it: full width."),
                io.Combo.Input("router", options=[NO_ROUTER, *model_files(ROUTER_FORMAT)], default=NO_ROUTER,
                               tooltip="A trained width router from models/dynamic_dit/ (it replaces the preset), or none for the training-free ranking."),
                io.Int.Input("mlp_groups", default=0, min=0, max=65536, optional=True,
                             tooltip="MLP channels dropped together as one group; 0 = a default that divides the model's MLP."),
            ],
            [io.Model.Output()],
            search_aliases=["DyDiT", "TDW", "dynamic width", "timestep-wise dynamic width", "heads", *SPEED_WORDS, *FAMILY_WORDS],
        )

    @classmethod
    def execute(cls, model, preset, parts, noisy_width, clean_width, target_flops, start_percent, end_percent, router,
                mlp_groups=0) -> io.NodeOutput:
        loaded = load_trained_file(model, router, ROUTER_FORMAT) if router != NO_ROUTER else None
        settings = width_settings(
            preset, parts, noisy_width, clean_width, target_flops, start_percent, end_percent, loaded, mlp_groups
        )
        return io.NodeOutput(apply_settings(model, settings))


register_trained_file(TrainedFileKind(
    part="width", format=ROUTER_FORMAT, label="Width router", load=load_width_router,
    as_trained=lambda model, router, header: apply_settings(model, WidthSettings(router=router, parts=header.get("width_parts", "both"))),
))

NODE_CLASS_MAPPINGS = {"DynamicWidthPatcher": DynamicWidthPatcher}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicWidthPatcher": "Dynamic Width Patcher"}
