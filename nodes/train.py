"""Train Dynamic DiT: learn the chosen methods' parts for the connected model by self-distillation (experimental)."""
from __future__ import annotations

import time

from comfy_api.latest import io

from ..core.method import PARTS as PART_TYPES
from ..integration.node_schema import hidden_unique_id, hidden_when, node_schema, shown_when
from ..integration.trained_files import apply_trained_files
from .training_request import CUSTOM, PARTS, RECIPE_INPUTS, RECIPES, WIDTH_PARTS, TrainingRequest, still_falling, with_recipe


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


def _part_fields() -> dict[str, list[str]]:
    """For each training setting a part reads, the recipes (labels of PARTS) with such a part: the Train node shows the
    setting for those only."""
    fields: dict[str, list[str]] = {}
    for label, parts in PARTS.items():
        for name in parts:
            for field in (*PART_TYPES[name].spec_fields, *(("target_flops",) if PART_TYPES[name].learns_compute else ())):
                fields.setdefault(field, []).append(label)
    return {field: list(dict.fromkeys(labels)) for field, labels in fields.items()}


def _when_read(node_input: io.Input) -> io.Input:
    """An input shown while the chosen parts read it and no recipe decides it."""
    readers = _part_fields().get(node_input.id)
    if readers:
        node_input = shown_when(node_input, parts=readers)
    if node_input.id in RECIPE_INPUTS:
        node_input = hidden_when(node_input, recipe=list(RECIPES))
    return node_input


class DynamicTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        same = "of the teacher's sampling runs (use what you sample with)."
        return node_schema(
            "DynamicTrainer", "Train Dynamic DiT", "dynamic_dit/train", DESCRIPTION,
            [
                io.Model.Input("model", tooltip="The model to train faster parts for (its own weights stay frozen)."),
                io.Conditioning.Input("positive", tooltip="The prompts to distil on (every entry of a batch is its own prompt)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of the teacher's sampling runs."),
                io.Latent.Input("latent", tooltip="An empty latent of the size to train at (its batch size is ignored)."),
                _when_read(io.Combo.Input("parts", options=list(PARTS), default="width + TD-LoRA",
                               tooltip="What to train (the README lists the recipes); every part is saved to models/dynamic_dit/.")),
                _when_read(io.Float.Input("target_flops", default=0.5, min=0.05, max=1.0, step=0.01,
                                          tooltip="FLOPs of the trained model over full compute, averaged over the steps.")),
                _when_read(io.Int.Input("steps", default=300, min=1, max=100000, tooltip="Training steps.")),
                io.String.Input("filename", default="trained/my_model",
                                tooltip="Where to save, under models/dynamic_dit/ (e.g. trained/my_model)."),
                io.Int.Input("sampling_steps", default=20, min=2, max=200, tooltip=f"Steps {same}"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip=f"CFG {same}"),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip=f"Sampler {same}"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple", tooltip=f"Scheduler {same}"),
                _when_read(io.Int.Input("seeds", default=2, min=1, max=64,
                             tooltip="Teacher runs per prompt (noise seeds 1000, 1001, ...: away from the seeds you sample with).")),
                _when_read(io.Combo.Input("width_parts", options=list(WIDTH_PARTS), default="heads and MLP", optional=True,
                                          tooltip="What the width router thins: attention heads, MLP channels, or both.")),
                io.Int.Input("batch", default=8, min=1, max=256, optional=True, tooltip="Recorded model calls per training step."),
                io.Float.Input("learning_rate", default=2e-3, min=1e-6, max=1.0, step=1e-4, optional=True,
                               tooltip="The Adam learning rate of the trained parts."),
                _when_read(io.Int.Input("experts", default=2, min=1, max=16, optional=True,
                                        tooltip="TD-LoRA: low-rank experts mixed by a timestep gate.")),
                _when_read(io.Int.Input("rank", default=4, min=1, max=256, optional=True,
                                        tooltip="The rank of each TD-LoRA expert, or of the coarse steps' block LoRA.")),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue <filename>.ckpt (and its on-policy rounds' checkpoints) if it exists."),
                _when_read(io.Int.Input("on_policy_rounds", default=0, min=0, max=10, optional=True,
                             tooltip="After training: rounds of sampling with the trained parts on and training where they lead.")),
                _when_read(io.Int.Input("on_policy_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="Training steps of each on-policy round; 0 = half the steps above.")),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute each block in backward: less memory (large models on one GPU) for about one more forward per step."),
                io.Boolean.Input("keep_checkpoints", default=False, optional=True,
                                 tooltip="Keep <filename>.ckpt after a finished run, to continue training it later with resume."),
                _when_read(io.String.Input("coarse_schedule", default="0-70%:2", optional=True,
                                           tooltip="The steps that run coarse, as the Patch Scheduler's manual schedule with one factor (2 or 4).")),
                io.Combo.Input("recipe", options=[CUSTOM, *RECIPES], default=CUSTOM, optional=True,
                               tooltip="A recipe measured on the reference model sets the parts and every knob; custom: the inputs above."),
            ],
            [io.Model.Output(display_name="model"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],  # where the phase text goes
            output_node=True, experimental=True,
            search_aliases=["train", "distill", "self-distillation", "router training", "DiffCR training", "DDiT training"],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, parts, target_flops, steps, filename, sampling_steps, cfg,
                sampler_name, scheduler, seeds, width_parts="heads and MLP", batch=8, learning_rate=2e-3, experts=2, rank=4,
                resume=False, on_policy_rounds=0, on_policy_steps=0, gradient_checkpointing=False, keep_checkpoints=False,
                coarse_schedule="0-70%:2", recipe=CUSTOM) -> io.NodeOutput:
        chosen = with_recipe(recipe, dict(parts=parts, width_parts=width_parts, target_flops=target_flops, steps=steps,
                                          seeds=seeds, experts=experts, rank=rank, on_policy_rounds=on_policy_rounds,
                                          on_policy_steps=on_policy_steps, coarse_schedule=coarse_schedule))
        # every input is checked before any sampling or training starts
        request = TrainingRequest.checked(
            model, positive, negative, latent, filename=filename, batch=batch, learning_rate=learning_rate,
            gradient_checkpointing=gradient_checkpointing,
            sampling=dict(steps=sampling_steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler), **chosen)
        started = time.perf_counter()
        result, path, round_steps = request.run(bool(resume), bool(keep_checkpoints), hidden_unique_id(cls))
        patched = apply_trained_files(model, [path])
        goal = f"target {chosen['target_flops']:g}" if request.learns_compute else f"coarse schedule {chosen['coarse_schedule']}"
        rounds = request.on_policy_rounds
        rounds_text = f" and {rounds} on-policy round(s) of {round_steps}" if rounds else ""
        report = (f"FLOPs {result.final_ratio:.3f} of full ({goal}), distillation loss {result.eval_loss:.4f} "
                  f"after {request.config.steps} steps{rounds_text} in {time.perf_counter() - started:.0f} s; wrote {path.name} (other nodes "
                  "list it after Refresh, key R)")
        fall = still_falling(request.final_losses)
        if fall is not None:
            report += (f". Not done learning: the loss still fell {fall:.0%} over the last fifth of the steps, so more steps "
                       "should bring the file closer to full compute (the recipes train 300-900)")
        request.text.show(f"done: {report}", force=True)
        return io.NodeOutput(patched, report, ui={"text": [report]})


NODE_CLASS_MAPPINGS = {"DynamicTrainer": DynamicTrainer}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTrainer": "Train Dynamic DiT"}
