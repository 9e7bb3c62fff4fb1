"""Train Dynamic DiT: learn a width router and TD-LoRA compensation for the connected model by self-distillation."""
from __future__ import annotations

import os
import re
import shlex
import time

import torch

from ..integration.patching import MODEL_FOLDER, adapter_of
from ..integration.trained_files import apply_trained_files
from ..methods.width.settings import PART_LABELS
from ..training.student import StudentSpec
from ..training.trainer import TrainConfig
from ..training.trajectories import teacher_seeds
from ..integration.progress_text import PhaseText

PARTS = {"width + TD-LoRA": ("width", "td_lora"), "width": ("width",), "TD-LoRA": ("td_lora",),
         "coarse patches (DDiT)": ("coarse",), "token routers + TD-LoRA (DiffCR)": ("tokens", "td_lora"),
         "token routers (DiffCR)": ("tokens",), "MLP token routers + TD-LoRA (DyDiT SDT)": ("tokens", "td_lora"),
         "MLP token routers (DyDiT SDT)": ("tokens",)}
SDT_PARTS = ("MLP token routers + TD-LoRA (DyDiT SDT)", "MLP token routers (DyDiT SDT)")  # left-out tokens skip the MLP only
WIDTH_PARTS = PART_LABELS
_NAME = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def _conditioning_jobs(positive: list, negative: list) -> list[tuple[list, list]]:
    """One sampling job per positive conditioning entry (a batch of prompts trains on each), all with the negative."""
    if not positive:
        raise ValueError("Train Dynamic DiT: no positive conditioning; connect at least one prompt.")
    return [([entry], negative) for entry in positive]


def output_stem(filename: str) -> str:
    """models/dynamic_dit/<filename> (no suffix); refuses names that would leave the folder."""
    import folder_paths

    name = filename.strip()
    for suffix in (".safetensors", ".width", ".td_lora", ".patch_embedding", ".token_router"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    if not name or not _NAME.match(name) or ".." in name.split("/") or name.startswith("/"):
        raise ValueError(f"Train Dynamic DiT: filename '{filename}' must be a relative name of letters, digits, '_', '-', '.', '/'.")
    folders = folder_paths.get_folder_paths(MODEL_FOLDER)
    if not folders:
        raise ValueError("Train Dynamic DiT: ComfyUI has no models/dynamic_dit folder registered.")
    return os.path.join(folders[0], name)


class DynamicTrainer:
    DESCRIPTION = (
        "Self-distillation, no dataset: samples the model at full compute for the given prompts (its own sampler "
        "and schedule), then trains the chosen parts until the model at the target FLOPs matches those samples. "
        "'width + TD-LoRA': a per-step width router (which heads and MLP channels each block keeps) and TD-LoRA "
        "experts as compensation. 'token routers (DiffCR)': a token router per block and keep ratios per block and "
        "timestep region (with TD-LoRA if chosen). 'coarse patches (DDiT)': the coarse-patch embedding and a block "
        "LoRA for the coarse steps of coarse_schedule (the FLOPs follow that schedule; target_flops is not used). "
        "Writes one file, models/dynamic_dit/<filename>.safetensors, holding every trained part: the Width Patcher, "
        "TD-LoRA Loader, Patch Scheduler and Token Router each list it and read their part (the last two in mode "
        "'as trained'). Returns the model with the file applied as trained. On a CPU only small models train in "
        "reasonable time; see the README."
    )
    CATEGORY = "dynamic_dit/train"
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train faster parts for (its own weights stay frozen)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompts to distil on (every entry of a batch is its own prompt)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt of the teacher's sampling runs."}),
                "latent": ("LATENT", {"tooltip": "An empty latent of the size to train at (its batch size is ignored)."}),
                "parts": (list(PARTS), {"tooltip": "What to train (the README lists the recipes); every part is saved to models/dynamic_dit/.", "default": "width + TD-LoRA"}),
                "target_flops": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 1.0, "step": 0.01,
                                           "tooltip": "FLOPs of the trained model over full compute, averaged over the steps."}),
                "steps": ("INT", {"default": 300, "min": 1, "max": 100000, "tooltip": "Training steps."}),
                "filename": ("STRING", {"tooltip": "Where to save, under models/dynamic_dit/ (e.g. trained/my_model).", "default": "trained/my_model"}),
                "sampling_steps": ("INT", {"default": 20, "min": 2, "max": 200,
                                           "tooltip": "Steps of the teacher's sampling runs (use what you sample with)."}),
                "cfg": ("FLOAT", {"tooltip": "CFG of the teacher's sampling runs (use what you sample with).", "default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampler of the teacher's sampling runs (use what you sample with).", "default": "euler"}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Scheduler of the teacher's sampling runs (use what you sample with).", "default": "simple"}),
                "seeds": ("INT", {"default": 2, "min": 1, "max": 64,
                                  "tooltip": "Teacher runs per prompt (noise seeds 1000, 1001, ...: away from the seeds you sample with)."}),
            },
            "optional": {
                "width_parts": (list(WIDTH_PARTS), {"tooltip": "width: what the router thins: attention heads, MLP channels, or both.", "default": "heads and MLP"}),
                "batch": ("INT", {"tooltip": "Recorded model calls per training step.", "default": 8, "min": 1, "max": 256}),
                "learning_rate": ("FLOAT", {"tooltip": "The Adam learning rate of the trained parts.", "default": 2e-3, "min": 1e-6, "max": 1.0, "step": 1e-4}),
                "experts": ("INT", {"tooltip": "TD-LoRA: low-rank experts mixed by a timestep gate.", "default": 2, "min": 1, "max": 16}),
                "rank": ("INT", {"tooltip": "TD-LoRA: the rank of each expert.", "default": 4, "min": 1, "max": 256}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue <filename>.ckpt (and its on-policy rounds' checkpoints) if it exists."}),
                "on_policy_rounds": ("INT", {"default": 0, "min": 0, "max": 10, "tooltip": "After training: rounds of sampling with the trained parts on and training where they lead."}),
                "on_policy_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                            "tooltip": "Training steps of each on-policy round; 0 = half the steps above."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute each block in backward: "
                                                       "less memory (large models on one GPU) for about one more forward per step."}),
                "keep_checkpoints": ("BOOLEAN", {"default": False, "tooltip": "Keep <filename>.ckpt after a finished run, "
                                                 "to continue training it later with resume."}),
                "coarse_schedule": ("STRING", {"default": "0-70%:2", "tooltip": "coarse patches: the steps that run coarse, "
                                               "as the Patch Scheduler's manual schedule with one factor (2 or 4)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},  # where the phase text goes
        }

    def train(self, model, positive, negative, latent, parts, target_flops, steps, filename, sampling_steps, cfg,
              sampler_name, scheduler, seeds, width_parts="heads and MLP", batch=8, learning_rate=2e-3, experts=2, rank=4,
              resume=False, coarse_schedule="0-70%:2", gradient_checkpointing=False, on_policy_rounds=0,
              keep_checkpoints=False, on_policy_steps=0, unique_id=None):
        import comfy.utils

        from ..integration import training_host
        from ..training import export, trainer

        # every input is checked before any sampling or training starts
        if parts not in PARTS or width_parts not in WIDTH_PARTS:
            raise ValueError(f"Train Dynamic DiT: parts must be one of {', '.join(PARTS)}; width parts one of {', '.join(WIDTH_PARTS)}.")
        spec = StudentSpec(parts=PARTS[parts], width_parts=WIDTH_PARTS[width_parts], experts=experts, rank=rank,
                           coarse_schedule=coarse_schedule, token_mode="sdt" if parts in SDT_PARTS else "diffcr")
        spec.validate()
        config = TrainConfig(target=target_flops, steps=steps, batch=batch, lr=learning_rate,
                             gradient_checkpointing=bool(gradient_checkpointing))
        config.validate()
        adapter_of(model)  # unsupported families are refused here
        jobs = _conditioning_jobs(positive, negative)
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise ValueError("Train Dynamic DiT: latent must be an image LATENT (B, C, H, W), e.g. from Empty Latent Image.")
        stem = output_stem(filename)

        if not 0 <= int(on_policy_rounds) <= 10:
            raise ValueError(f"Train Dynamic DiT: on_policy_rounds must be 0 to 10, got {on_policy_rounds}.")
        if int(on_policy_steps) < 0:
            raise ValueError(f"Train Dynamic DiT: on_policy_steps must be 0 (half the steps) or more, got {on_policy_steps}.")
        runs, round_steps = len(jobs) * seeds, training_host.round_steps_for(steps, int(on_policy_steps))
        seed_list = teacher_seeds(seeds)
        total = runs + steps + int(on_policy_rounds) * (runs + round_steps)
        started = time.perf_counter()
        bar = comfy.utils.ProgressBar(total)
        text = PhaseText(unique_id, total)

        def teacher(done: int, phase: str = "recording the teacher", base: int = 0) -> None:
            bar.update_absolute(base + done, total)
            text.show(f"{phase}: sampling run {done}/{runs}", base + done, force=done == runs)

        def training(step: int, entry: dict, phase: str = "training", count: int = steps, base: int = runs) -> None:
            bar.update_absolute(base + step, total)
            text.show(f"{phase}: step {step}/{count}, distillation loss {entry['distill']:.4f}", base + step, force=step == count)

        with training_host.model_left_as_found(model):  # the artist's model computes as before afterwards
            bank = training_host.record_trajectories(
                model, jobs, torch.zeros_like(samples[:1]), steps=sampling_steps, cfg=cfg, sampler=sampler_name,
                scheduler=scheduler, seeds=seed_list, progress=lambda done, _: teacher(done))
            student = training_host.build_student(model, bank, spec)
            checkpoint = stem + ".ckpt"
            if not resume:
                training_host.remove_checkpoints(checkpoint)  # a fresh run; its checkpoints let a later run resume it
            result = trainer.train(student, bank, config, checkpoint=checkpoint,
                                   callback=lambda step, _, entry: training(step, entry))
            for index in range(int(on_policy_rounds)):
                base = runs + steps + index * (runs + round_steps)
                bank, result = training_host.on_policy_round(
                    model, student, bank, jobs, torch.zeros_like(samples[:1]), round_index=index, round_steps=round_steps,
                    config=config, steps=sampling_steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler, seeds=seed_list,
                    progress=lambda done, _, base=base, k=index: teacher(done, f"on-policy round {k + 1}/{on_policy_rounds}", base),
                    callback=lambda step, _, entry, base=base, k=index: training(
                        step, entry, f"on-policy round {k + 1}/{on_policy_rounds}, training", round_steps, base + runs),
                    checkpoint=training_host.round_checkpoint(checkpoint, index))
            command = "Train Dynamic DiT " + shlex.join(f"{k}={v}" for k, v in dict(
                parts=parts, width_parts=width_parts, target_flops=target_flops, steps=steps, sampling_steps=sampling_steps,
                cfg=cfg, sampler=sampler_name, scheduler=scheduler, seeds=seeds, batch=batch, lr=learning_rate,
                experts=experts, rank=rank, prompts=len(jobs), on_policy_rounds=on_policy_rounds, on_policy_steps=round_steps,
                **({"coarse_schedule": coarse_schedule} if "coarse" in spec.parts else {})).items())
            metadata = export.training_metadata(student, target=target_flops,
                                                steps=steps + int(on_policy_rounds) * round_steps,
                                                command=command,
                                                base_model=type(model.model).__name__,
                                                extra={"final_flops_ratio": f"{result.final_ratio:.4f}",
                                                       "eval_distill_loss": f"{result.eval_loss:.5f}"})
            text.show("saving the file", force=True)
            path = export.save_bundle(student, stem, metadata)
            if not keep_checkpoints:  # a finished run needs them no more (an interrupted one keeps them to resume)
                training_host.remove_checkpoints(checkpoint)
        patched = apply_trained_files(model, [path])
        goal = f"coarse schedule {coarse_schedule}" if "coarse" in spec.parts else f"target {target_flops:g}"
        rounds_text = f" and {on_policy_rounds} on-policy round(s) of {round_steps}" if on_policy_rounds else ""
        report = (f"FLOPs {result.final_ratio:.3f} of full ({goal}), distillation loss {result.eval_loss:.4f} "
                  f"after {steps} steps{rounds_text} in {time.perf_counter() - started:.0f} s; wrote {path.name} (other nodes "
                  "list it after Refresh, key R)")
        text.show(f"done: {report}", force=True)
        return {"ui": {"text": [report]}, "result": (patched, report)}


NODE_CLASS_MAPPINGS = {"DynamicTrainer": DynamicTrainer}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTrainer": "Train Dynamic DiT"}
