"""Token Router: per block and per step, only some image tokens run the MLP (SDT) or the whole block."""
from __future__ import annotations

from comfy_api.latest import io

from ...integration.node_schema import FAMILY_WORDS, SPEED_WORDS, FRACTION, PERCENT, hidden_when, model_to_speed_up, node_schema
from ...integration.patching import apply_settings, model_files
from ...integration.trained_files import TrainedFileKind, load_trained_file, register_trained_file
from .file import FORMAT, load_router_file
from .runtime import TokenRouterSettings
from .settings import parse_block_overrides


NO_FILE = "none"
SCORES = {"input change": "input_change", "update magnitude": "update", "router file": "router"}
AS_TRAINED = "as trained"
NODE_MODES = ["reuse", "diffcr", "sdt", AS_TRAINED]


class DynamicTokenRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicTokenRouter", "Dynamic Token Router", "dynamic_dit/methods",
            "Routes only part of the image tokens through each block, per sample and per step; text tokens always run. "
            "reuse: the other tokens get the update this block gave them last time (training-free). "
            "diffcr: the other tokens skip the whole block (best with a DiffCR router file). "
            "sdt: the other tokens skip only the MLP, attention sees every token (DyDiT). "
            "as trained: a router file from Train Dynamic DiT runs exactly as it was trained (its routers, its learned "
            "ratios for every block and step; the keep ratio, full-block and percent inputs are not used). "
            "Keep ratio 1 gives the unpatched model exactly.",
            [
                model_to_speed_up(),
                io.Combo.Input("mode", options=NODE_MODES, default="reuse",
                               tooltip="reuse: skipped tokens reuse last step's update; diffcr: skip the block; sdt: skip the MLP; as trained: a file."),
                hidden_when(io.Float.Input("keep_ratio_start", default=0.7, **FRACTION,
                                           tooltip="Share of image tokens each routed block computes at the noisiest routed step (lower = faster)."),
                            mode=[AS_TRAINED]),
                hidden_when(io.Float.Input("keep_ratio_end", default=0.7, **FRACTION,
                                           tooltip="Fraction at end_percent; linear in between. 1 and 1 = full compute."),
                            mode=[AS_TRAINED]),
                hidden_when(io.Int.Input("first_full_blocks", default=2, min=0, max=200,
                                         tooltip="The first N blocks (double blocks first, then single) always run every token."),
                            mode=[AS_TRAINED]),
                hidden_when(io.Int.Input("last_full_blocks", default=2, min=0, max=200,
                                         tooltip="The last N blocks always run every token."),
                            mode=[AS_TRAINED]),
                hidden_when(io.Combo.Input("score", options=list(SCORES), default="input change",
                                           tooltip="Which tokens run: those whose input moved most, those the block changed most, or a trained router's choice."),
                            mode=[AS_TRAINED]),
                io.Combo.Input("router_file", options=[NO_FILE, *model_files(FORMAT)], default=NO_FILE,
                               tooltip="A token-router file from models/dynamic_dit/ (trained routers and/or learned keep ratios)."),
                hidden_when(io.Boolean.Input("use_file_ratios", default=True,
                                             tooltip="Use the router file's learned keep ratios (per block and step) instead of the two above."),
                            mode=[AS_TRAINED]),
                hidden_when(io.Float.Input("start_percent", default=0.0, **PERCENT, tooltip="Routing starts at this sampling percent."),
                            mode=[AS_TRAINED]),
                hidden_when(io.Float.Input("end_percent", default=1.0, **PERCENT, tooltip="Routing ends after this sampling percent."),
                            mode=[AS_TRAINED]),
                io.String.Input("block_overrides", default="",
                                tooltip="Per-block keep ratios, e.g. 'single:10-30=0.5, double:0=1.0'; they win over the schedule."),
            ],
            [io.Model.Output()],
            search_aliases=["DiffCR", "SDT", "DyDiT", "token routing", "token pruning", "spatial dynamic tokens", *SPEED_WORDS, *FAMILY_WORDS],
        )

    @classmethod
    def execute(cls, model, mode, keep_ratio_start, keep_ratio_end, first_full_blocks, last_full_blocks, score,
                router_file, use_file_ratios, start_percent, end_percent, block_overrides) -> io.NodeOutput:
        if score not in SCORES:
            raise ValueError(f"Token Router: score must be one of {', '.join(SCORES)}, got {score!r}.")
        router = load_trained_file(model, router_file, FORMAT) if router_file and router_file != NO_FILE else None
        overrides = parse_block_overrides(block_overrides)
        if mode == AS_TRAINED:
            if router is None:
                raise ValueError("Token Router: mode 'as trained' needs a router file trained by Train Dynamic DiT.")
            return io.NodeOutput(apply_settings(model, TokenRouterSettings.as_trained(router, overrides)))
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
        return io.NodeOutput(apply_settings(model, settings))


register_trained_file(TrainedFileKind(
    part="tokens", format=FORMAT, label="Router file", load=load_router_file,
    as_trained=lambda model, router, header: apply_settings(model, TokenRouterSettings.as_trained(router)),
))

NODE_CLASS_MAPPINGS = {"DynamicTokenRouter": DynamicTokenRouter}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTokenRouter": "Dynamic Token Router"}
