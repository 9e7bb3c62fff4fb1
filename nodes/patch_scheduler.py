"""Dynamic Patch Scheduler (DDiT): coarse patches at steps where the latent changes slowly."""
from __future__ import annotations

from ..dynamic_core.comfy_integration.patching import MODEL_FOLDER, apply_settings, model_files
from ..dynamic_core.methods.patch_embedding_file import FORMAT, load_patch_embedding_file
from ..dynamic_core.methods.patch_scheduler import MODES, PatchSchedulerSettings, parse_schedule

NO_EMBEDDING = "none"
DEFAULT_SCHEDULE = "0-40%:4, 40-70%:2, 70-100%:1"


def _embedding_files() -> list[str]:
    return [NO_EMBEDDING, *model_files(FORMAT)]


def _load_embedding(name: str):
    import folder_paths

    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is None:
        raise ValueError(f"Patch embedding '{name}' is not in models/{MODEL_FOLDER}/; pick a file from the list or 'none'.")
    return load_patch_embedding_file(path, name)


class DynamicPatchScheduler:
    DESCRIPTION = (
        "Runs some sampling steps on a coarser patch grid (DDiT): a 2x patch step works on a quarter of the image "
        "tokens, a 4x step on a sixteenth, and its prediction is brought back to full resolution. 'auto' decides "
        "per step from how smoothly the latent has been changing (third difference of the last four step latents "
        "against tau); 'manual' follows a schedule. Without an embedding file the model's own weights are used "
        "(no training); a trained file from models/dynamic_dit/ improves coarse steps. The first three and the last "
        "steps stay native in auto mode."
    )
    CATEGORY = "dynamic_dit"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "mode": (list(MODES), {"default": "auto", "tooltip": "auto: DDiT's rule decides every step. manual: follow the schedule below."}),
                "tau": ("FLOAT", {
                    "default": 0.001, "min": 0.0, "max": 10.0, "step": 0.0001, "round": False,
                    "tooltip": "auto: a step runs coarse when the Δ³ statistic of the latent is below tau. Higher = more coarse "
                               "steps (faster, less detail). The statistic shrinks with more steps; the per-step values are in "
                               "the Dynamic Speed Report's table.",
                }),
                "percentile": ("FLOAT", {
                    "default": 0.4, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "auto: which percentile over the patches of the per-patch Δ³ spread is compared with tau (DDiT: 0.4).",
                }),
                "max_patch_factor": ("INT", {
                    "default": 4, "min": 2, "max": 4, "step": 2,
                    "tooltip": "auto: the coarsest patch allowed, as a multiple of the model's patch (4x = 16 times fewer image tokens).",
                }),
                "last_native_steps": ("INT", {
                    "default": 2, "min": 0, "max": 1000,
                    "tooltip": "auto: the last steps always run at the native patch, where fine detail forms.",
                }),
                "manual_schedule": ("STRING", {
                    "default": DEFAULT_SCHEDULE, "multiline": False,
                    "tooltip": "manual: ranges of the run's steps and their patch factor (1 = native, 2 or 4), e.g. "
                               "'0-40%:4, 40-70%:2, 70-100%:1'. Steps outside every range run native.",
                }),
                "embedding": (_embedding_files(), {
                    "default": NO_EMBEDDING,
                    "tooltip": "A trained coarse-patch embedding from models/dynamic_dit/, or 'none' to derive coarse patches "
                               "from the model's own weights without training.",
                }),
                "start_percent": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Coarse steps only from this point of the denoising (0 = pure noise), like other nodes' start percent.",
                }),
                "end_percent": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Coarse steps only up to this point of the denoising (1 = clean).",
                }),
            }
        }

    def patch(self, model, mode, tau, percentile, max_patch_factor, last_native_steps, manual_schedule, embedding,
              start_percent, end_percent):
        settings = PatchSchedulerSettings(
            mode=mode,
            tau=float(tau),
            epsilon=float(percentile),
            max_factor=int(max_patch_factor),
            last_native_steps=int(last_native_steps),
            schedule=parse_schedule(manual_schedule) if mode == "manual" else (),
            embedding=_load_embedding(embedding) if embedding != NO_EMBEDDING else None,
            start_percent=float(start_percent),
            end_percent=float(end_percent),
        )
        return (apply_settings(model, settings),)


NODE_CLASS_MAPPINGS = {"DynamicPatchScheduler": DynamicPatchScheduler}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicPatchScheduler": "Dynamic Patch Scheduler"}
