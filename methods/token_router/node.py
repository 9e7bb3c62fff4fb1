"""Token Router: per block and per step, only some image tokens run the MLP (SDT) or the whole block."""
from __future__ import annotations

from ...integration.patching import apply_settings, model_files
from ...integration.trained_files import TrainedFileKind, load_trained_file, register_trained_file
from .file import FORMAT, load_router_file
from .runtime import TokenRouterSettings
from .settings import parse_block_overrides

NO_FILE = "none"
SCORES = {"input change": "input_change", "update magnitude": "update", "router file": "router"}
AS_TRAINED = "as trained"
NODE_MODES = ["reuse", "diffcr", "sdt", AS_TRAINED]


class DynamicTokenRouter:
    DESCRIPTION = (
        "Routes only part of the image tokens through each block, per sample and per step; text tokens always run. "
        "reuse: the other tokens get the update this block gave them last time (training-free). "
        "diffcr: the other tokens skip the whole block (best with a DiffCR router file). "
        "sdt: the other tokens skip only the MLP, attention sees every token (DyDiT). "
        "as trained: a router file from Train Dynamic DiT runs exactly as it was trained (its routers, its learned "
        "ratios for every block and step; the keep ratio, full-block and percent inputs are not used). "
        "Keep ratio 1 gives the unpatched model exactly."
    )
    CATEGORY = "dynamic_dit/methods"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        ratio = {"min": 0.01, "max": 1.0, "step": 0.01}
        percent = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to make faster (from Load Diffusion Model, a LoRA loader or another node of this pack)."}),
                "mode": (NODE_MODES, {
                    "default": "reuse",
                    "tooltip": "reuse: skipped tokens reuse last step's update; diffcr: skip the block; sdt: skip the MLP; as trained: a file.",
                }),
                "keep_ratio_start": ("FLOAT", {
                    "default": 0.7, **ratio,
                    "tooltip": "Share of image tokens each routed block computes at the noisiest routed step (lower = faster).",
                }),
                "keep_ratio_end": ("FLOAT", {
                    "default": 0.7, **ratio,
                    "tooltip": "Fraction at end_percent; linear in between. 1 and 1 = full compute.",
                }),
                "first_full_blocks": ("INT", {
                    "default": 2, "min": 0, "max": 200,
                    "tooltip": "The first N blocks (double blocks first, then single) always run every token.",
                }),
                "last_full_blocks": ("INT", {
                    "default": 2, "min": 0, "max": 200,
                    "tooltip": "The last N blocks always run every token.",
                }),
                "score": (list(SCORES), {
                    "default": "input change",
                    "tooltip": "Which tokens run: those whose input moved most, those the block changed most, or a trained router's choice.",
                }),
                "router_file": ([NO_FILE, *model_files(FORMAT)], {
                    "default": NO_FILE,
                    "tooltip": "A token-router file from models/dynamic_dit/ (trained routers and/or learned keep ratios).",
                }),
                "use_file_ratios": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Use the router file's learned keep ratios (per block and step) instead of the two above.",
                }),
                "start_percent": ("FLOAT", {"default": 0.0, **percent, "tooltip": "Routing starts at this sampling percent."}),
                "end_percent": ("FLOAT", {"default": 1.0, **percent, "tooltip": "Routing ends after this sampling percent."}),
                "block_overrides": ("STRING", {
                    "default": "",
                    "tooltip": "Per-block keep ratios, e.g. 'single:10-30=0.5, double:0=1.0'; they win over the schedule.",
                }),
            }
        }

    def patch(self, model, mode, keep_ratio_start, keep_ratio_end, first_full_blocks, last_full_blocks, score,
              router_file, use_file_ratios, start_percent, end_percent, block_overrides):
        if score not in SCORES:
            raise ValueError(f"Token Router: score must be one of {', '.join(SCORES)}, got {score!r}.")
        router = load_trained_file(model, router_file, FORMAT) if router_file and router_file != NO_FILE else None
        overrides = parse_block_overrides(block_overrides)
        if mode == AS_TRAINED:
            if router is None:
                raise ValueError("Token Router: mode 'as trained' needs a router file trained by Train Dynamic DiT.")
            return (apply_settings(model, TokenRouterSettings.as_trained(router, overrides)),)
        settings = TokenRouterSettings(
            mode=mode,
            keep_start=float(keep_ratio_start),
            keep_end=float(keep_ratio_end),
            first_full=int(first_full_blocks),
            last_full=int(last_full_blocks),
            overrides=overrides,
            score=SCORES[score],
            router=router,
            router_name=router.name if router is not None else "",
            file_ratios=bool(use_file_ratios),
            start_percent=float(start_percent),
            end_percent=float(end_percent),
        )
        return (apply_settings(model, settings),)


register_trained_file(TrainedFileKind(
    part="tokens", format=FORMAT, label="Router file", load=load_router_file,
    as_trained=lambda model, router, header: apply_settings(model, TokenRouterSettings.as_trained(router)),
))

NODE_CLASS_MAPPINGS = {"DynamicTokenRouter": DynamicTokenRouter}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTokenRouter": "Token Router"}
