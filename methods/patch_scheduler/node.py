"""Dynamic Patch Scheduler (DDiT): coarse patches at steps where the latent changes slowly."""
from __future__ import annotations

from comfy_api.latest import io

from ...integration.node_schema import FAMILY_WORDS, SPEED_WORDS, PERCENT, model_to_speed_up, node_schema, shown_when
from ...integration.patching import apply_settings, model_files
from ...integration.trained_files import TrainedFileKind, load_trained_file, register_trained_file
from .file import FORMAT, load_patch_embedding_file
from .settings import MODES, PatchSchedulerSettings
from .schedule import parse_schedule


NO_EMBEDDING = "none"
AS_TRAINED = "as trained"  # manual, on the schedule the embedding file was trained for (its `coarse_schedule`)
NODE_MODES = (*MODES, AS_TRAINED)
DEFAULT_SCHEDULE = "0-40%:4, 40-70%:2, 70-100%:1"


def _embedding_files() -> list[str]:
    return [NO_EMBEDDING, *model_files(FORMAT)]


DEFAULTS = PatchSchedulerSettings()


class DynamicPatchScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicPatchScheduler", "Dynamic Patch Scheduler", "dynamic_dit/methods",
            "Runs some sampling steps on a coarser patch grid (DDiT): a 2x patch step works on a quarter of the image "
            "tokens, a 4x step on a sixteenth, and its prediction is brought back to full resolution. 'auto' decides "
            "per step how unevenly the latent is changing (third difference of this step's latent and the three before) "
            "compared with the start of the run, against tau; 'manual' follows a schedule. Without an embedding file the "
            "model's own weights are used (no training); a trained file from models/dynamic_dit/ improves coarse steps. "
            "In auto mode the first three and the last steps stay native, and a coarse step is followed by at least "
            "three native ones.",
            [
                model_to_speed_up(),
                io.Combo.Input("mode", options=list(NODE_MODES), default="auto",
                               tooltip="auto: measures each step and coarsens smooth ones; manual: the schedule below; as trained: the file's own."),
                shown_when(io.Float.Input("tau", default=DEFAULTS.tau, min=0.0, max=100.0, step=0.1, round=False,
                                          tooltip="Higher = more steps run coarse (faster, less detail); the Speed Report's table shows each step's value."),
                           mode=["auto"]),
                shown_when(io.Float.Input("percentile", default=DEFAULTS.epsilon, min=0.0, max=1.0, step=0.05,
                                          tooltip="The percentile of the per-patch change that is measured (DDiT: 0.4); lower = the calmest parts."),
                           mode=["auto"]),
                shown_when(io.Int.Input("max_patch_factor", default=DEFAULTS.max_factor, min=2, max=4, step=2,
                                        tooltip="The coarsest patch: 2x = 4 times fewer image tokens, 4x = 16 times fewer (more detail lost)."),
                           mode=["auto"]),
                shown_when(io.Int.Input("last_native_steps", default=DEFAULTS.last_native_steps, min=0, max=1000,
                                        tooltip="The last steps always run at the native patch, where fine detail forms."),
                           mode=["auto"]),
                shown_when(io.String.Input("manual_schedule", default=DEFAULT_SCHEDULE, multiline=False,
                                           tooltip="Ranges and their patch factor, e.g. '0-40%:4, 40-70%:2', or by step number, 'steps 0-1:2'; others run native."),
                           mode=["manual"]),
                io.Combo.Input("embedding", options=_embedding_files(), default=NO_EMBEDDING,
                               tooltip="A trained coarse-patch file from models/dynamic_dit/, or none: coarse patches from the model's own weights."),
                io.Float.Input("start_percent", default=0.0, **PERCENT,
                               tooltip="Coarse steps only from this point of the denoising (0 = pure noise), like other nodes' start percent."),
                io.Float.Input("end_percent", default=1.0, **PERCENT,
                               tooltip="Coarse steps only up to this point of the denoising (1 = clean)."),
            ],
            [io.Model.Output()],
            search_aliases=["DDiT", "dynamic patch", "coarse patches", "patch size", *SPEED_WORDS, *FAMILY_WORDS],
        )

    @classmethod
    def execute(cls, model, mode, tau, percentile, max_patch_factor, last_native_steps, manual_schedule, embedding,
                start_percent, end_percent) -> io.NodeOutput:
        loaded = load_trained_file(model, embedding, FORMAT) if embedding != NO_EMBEDDING else None
        schedule = parse_schedule(manual_schedule) if mode == "manual" else ()
        if mode == AS_TRAINED:
            if loaded is None:
                raise ValueError("Patch scheduler mode 'as trained' follows the schedule a trained embedding file was made "
                                 "for; choose such a file (from Train Dynamic DiT or `python -m devtools.train --parts "
                                 "coarse`), or use 'manual' with a schedule.")
            mode, schedule = "manual", loaded.trained_schedule()
        settings = PatchSchedulerSettings(
            mode=mode,
            tau=float(tau),
            epsilon=float(percentile),
            max_factor=int(max_patch_factor),
            last_native_steps=int(last_native_steps),
            schedule=schedule,
            embedding=loaded,
            start_percent=float(start_percent),
            end_percent=float(end_percent),
        )
        return io.NodeOutput(apply_settings(model, settings))


register_trained_file(TrainedFileKind(
    part="coarse", format=FORMAT, label="Patch embedding", load=load_patch_embedding_file,
    as_trained=lambda model, embedding, header: apply_settings(model, PatchSchedulerSettings(
        mode="manual", schedule=embedding.trained_schedule(), embedding=embedding)),
))

NODE_CLASS_MAPPINGS = {"DynamicPatchScheduler": DynamicPatchScheduler}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicPatchScheduler": "Dynamic Patch Scheduler"}
