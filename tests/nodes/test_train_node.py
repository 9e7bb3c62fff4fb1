"""Train Dynamic DiT node: trains on the connected model, writes files the loader nodes list and accept."""
from __future__ import annotations

import pytest
import torch

import comfy.utils

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.methods.td_lora.comfy_files import file_choices
from comfyui_dynamic_dit.integration.patching import model_files
from comfyui_dynamic_dit.methods.width.file import ROUTER_FORMAT
from comfyui_dynamic_dit.methods.td_lora.node import DynamicTDLoRALoader
from comfyui_dynamic_dit.nodes.train import DynamicTrainer
from comfyui_dynamic_dit.methods.width.node import DynamicWidthPatcher
from support.nodes import node_outputs

WIDGETS = dict(parts="width + TD-LoRA", target_flops=0.7, steps=4, filename="trained/tiny", sampling_steps=4, cfg=2.0,
               sampler_name="euler", scheduler="simple", seeds=1, batch=2)


def sample(model, conds):
    positive, negative = conds
    return tiny_flux.sample(model, positive, negative, height=16, width=16, steps=4)


@pytest.fixture(scope="module")
def other_weights():
    """A model of the same shapes with other weights: trained files must refuse it."""
    return reference_model.build_model(tiny_flux.TinyFlux(seed=3))


def _umask() -> int:
    import os

    current = os.umask(0o022)
    os.umask(current)
    return current


def run(model, conds, **changes):
    positive, negative = conds
    return node_outputs(DynamicTrainer, model, positive, negative, {"samples": torch.zeros(1, 16, 16, 16)}, **{**WIDGETS, **changes})


def test_trains_writes_files_the_loaders_accept(flux_model, conds, model_folder, other_weights, monkeypatch):
    progress = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: progress.append((value, total)))
    out = run(flux_model, conds)
    patched, report = out["result"]
    # one file: the bundle of both parts, readable as the user's other files are; the finished run's checkpoint gone
    written = model_folder / "trained" / "tiny.safetensors"
    assert sorted(p.name for p in (model_folder / "trained").iterdir()) == ["tiny.safetensors"]
    assert written.stat().st_mode & 0o777 == 0o666 & ~_umask()  # safetensors alone writes 0600
    assert progress[-1] == (1 + 4, 1 + 4)  # one teacher run (one prompt, one seed), then 4 training steps
    assert "FLOPs" in report and "after Refresh, key R" in report
    # each loader lists the file and reads its part on this model; a node whose part it lacks does not list it
    assert "trained/tiny.safetensors" in model_files(ROUTER_FORMAT)
    assert "dynamic_dit/trained/tiny.safetensors" in file_choices()
    assert "trained/tiny.safetensors" not in model_files("dynamic_dit.token_router")
    widths = dict(preset="quality", parts="heads and MLP", noisy_width=0.5, clean_width=1.0, target_flops=0.7,
                  start_percent=0.0, end_percent=1.0)
    routed = node_outputs(DynamicWidthPatcher, flux_model, router="trained/tiny.safetensors", **widths)[0]
    both = node_outputs(DynamicTDLoRALoader, routed, "dynamic_dit/trained/tiny.safetensors", 1.0)[0]
    torch.testing.assert_close(sample(both, conds), sample(patched, conds))
    # one node applies every part of the file as trained: the model the Train node returned
    from comfyui_dynamic_dit.integration.patching import training_run_files
    from comfyui_dynamic_dit.nodes.trained import DynamicTrainedLoader

    assert "trained/tiny.safetensors" in training_run_files()
    (loaded,) = node_outputs(DynamicTrainedLoader, flux_model, "trained/tiny.safetensors")
    torch.testing.assert_close(sample(loaded, conds), sample(patched, conds))
    assert node_outputs(DynamicTrainedLoader, flux_model, "none")[0] is flux_model
    with pytest.raises(ValueError, match="trained for another base model"):
        node_outputs(DynamicTrainedLoader, other_weights, "trained/tiny.safetensors")
    # a model with the same shapes but other weights refuses them
    with pytest.raises(ValueError, match="trained for another base model"):
        node_outputs(DynamicWidthPatcher, other_weights, router="trained/tiny.safetensors", **widths)
    with pytest.raises(ValueError, match="trained for another base model"):
        node_outputs(DynamicTDLoRALoader, other_weights, "dynamic_dit/trained/tiny.safetensors", 1.0)


@pytest.mark.parametrize("changes, message", [
    (dict(target_flops=1.5), r"target FLOPs ratio must be in \(0, 1\]"),
    (dict(filename="../outside"), "must be a relative name"),
    (dict(parts="everything"), "parts must be one of"),
    (dict(parts="coarse patches (DDiT)", coarse_schedule="0-50%:2, 50-90%:4"), "exactly one coarse factor"),
])
def test_bad_inputs_fail_before_any_work(flux_model, conds, model_folder, changes, message, monkeypatch):
    from comfyui_dynamic_dit.integration import training_host

    monkeypatch.setattr(training_host, "record_trajectories", lambda *a, **k: pytest.fail("sampled before checking inputs"))
    with pytest.raises(ValueError, match=message):
        run(flux_model, conds, **changes)


def test_no_conditioning_is_refused(flux_model, conds, model_folder):
    with pytest.raises(ValueError, match="no positive conditioning"):
        run(flux_model, ([], conds[1]))


def test_trains_coarse_patches_for_the_patch_scheduler(flux_model, conds, model_folder, other_weights):
    """parts 'coarse patches (DDiT)': a patch embedding file the Patch Scheduler lists and runs 'as trained',
    sampling what the node's returned model samples; the schedule comes from the file."""
    from comfyui_dynamic_dit.methods.patch_scheduler.file import FORMAT
    from comfyui_dynamic_dit.methods.patch_scheduler.node import DynamicPatchScheduler

    patched, report = run(flux_model, conds, parts="coarse patches (DDiT)", coarse_schedule="0-60%:2")["result"]
    assert "coarse schedule 0-60%:2" in report
    assert "trained/tiny.safetensors" in model_files(FORMAT)
    settings = dict(tau=5.0, percentile=0.4, max_patch_factor=2, last_native_steps=2, manual_schedule="",
                    embedding="trained/tiny.safetensors", start_percent=0.0, end_percent=1.0)
    scheduled = node_outputs(DynamicPatchScheduler, flux_model, mode="as trained", **settings)[0]
    image = sample(scheduled, conds)
    torch.testing.assert_close(image, sample(patched, conds))
    assert (image - sample(flux_model, conds)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="trained for another base model"):
        node_outputs(DynamicPatchScheduler, other_weights, mode="as trained", **settings)
    with pytest.raises(ValueError, match="'as trained' follows the schedule a trained embedding file was made for"):
        node_outputs(DynamicPatchScheduler, flux_model, mode="as trained", **{**settings, "embedding": "none"})


@pytest.mark.parametrize("parts", ["token routers + TD-LoRA (DiffCR)", "MLP token routers + TD-LoRA (DyDiT SDT)"])
def test_trains_token_routers_for_the_token_router(flux_model, conds, model_folder, other_weights, parts):
    """parts 'token routers + TD-LoRA' (DiffCR, or SDT's MLP-only routing): a token-router file the Token Router
    lists and runs 'as trained' (with the TD-LoRA file in the TD-LoRA Loader), sampling what the node's returned
    model samples."""
    from comfyui_dynamic_dit.methods.token_router.file import FORMAT, load_router_file
    from comfyui_dynamic_dit.methods.token_router.node import DynamicTokenRouter

    patched, report = run(flux_model, conds, parts=parts, steps=6)["result"]
    router = load_router_file(model_folder / "trained" / "tiny.safetensors")
    assert router.router == ("dydit" if "SDT" in parts else "diffcr")
    assert "target 0.7" in report and "wrote tiny.safetensors" in report
    assert "trained/tiny.safetensors" in model_files(FORMAT)
    widgets = dict(keep_ratio_start=0.7, keep_ratio_end=0.7, first_full_blocks=2, last_full_blocks=2, score="input change",
                   router_file="trained/tiny.safetensors", use_file_ratios=True, start_percent=0.0,
                   end_percent=1.0, block_overrides="")
    routed = node_outputs(DynamicTokenRouter, flux_model, mode="as trained", **widgets)[0]
    routed = node_outputs(DynamicTDLoRALoader, routed, "dynamic_dit/trained/tiny.safetensors", 1.0)[0]
    torch.testing.assert_close(sample(routed, conds), sample(patched, conds))
    with pytest.raises(ValueError, match="trained for another base model"):
        node_outputs(DynamicTokenRouter, other_weights, mode="as trained", **widgets)
    with pytest.raises(ValueError, match="mode 'as trained' needs a router file"):
        node_outputs(DynamicTokenRouter, flux_model, mode="as trained", **{**widgets, "router_file": "none"})


def test_on_policy_rounds_run_after_training_with_the_progress_bar(flux_model, conds, model_folder, monkeypatch):
    progress = []  # what the node reports; the host may send fewer updates on (ComfyUI 0.12 throttles them by time)
    update = comfy.utils.ProgressBar.update_absolute
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", lambda bar, value, total=None, preview=None: (
        progress.append((value, total if total is not None else bar.total)), update(bar, value, total, preview)))
    patched, report = run(flux_model, conds, parts="coarse patches (DDiT)", coarse_schedule="0-60%:2", on_policy_rounds=2)["result"]
    # one teacher run + 4 steps, then per round one rollout + 2 steps
    assert progress[-1] == (1 + 4 + 2 * (1 + 2),) * 2 and sorted(set(v for v, _ in progress)) == list(range(1, 12))
    assert "after 4 steps and 2 on-policy round(s) of 2" in report
    from comfyui_dynamic_dit.core.files import header_metadata

    header = header_metadata(model_folder / "trained" / "tiny.safetensors")
    assert header["train_steps"] == "8" and "on_policy_rounds=2" in header["command"]
    progress.clear()
    run(flux_model, conds, steps=2, on_policy_rounds=1, on_policy_steps=3, keep_checkpoints=True)  # kept for a resume
    assert progress[-1][0] == 1 + 2 + (1 + 3)  # the round trained the 3 steps asked for, not half of 2
    assert "on_policy_steps=3" in header_metadata(model_folder / "trained" / "tiny.safetensors")["command"]
    assert {"tiny.ckpt", "tiny.round1.ckpt"} <= {p.name for p in (model_folder / "trained").iterdir()}
    with pytest.raises(ValueError, match="on_policy_rounds must be 0 to 10"):
        run(flux_model, conds, on_policy_rounds=11)


def test_teacher_and_rollout_seeds_stay_away_from_the_seeds_people_sample_with(flux_model, conds, model_folder, monkeypatch):
    """The node's teacher runs use noise seeds 1000, 1001, ... (the CLI's too) and round k's rollouts 1000 k more,
    so an image sampled at seed 0, 1, ... judges the trained model on noise it never saw."""
    from comfyui_dynamic_dit.integration import training_host

    seen = []
    record = training_host.record_trajectories
    monkeypatch.setattr(training_host, "record_trajectories", lambda *a, **k: seen.append(k["seeds"]) or record(*a, **k))
    run(flux_model, conds, seeds=2, steps=2, on_policy_rounds=1)
    assert seen == [[1000, 1001], [2000, 2001]]


def test_training_leaves_the_model_computing_as_before(conds, model_folder):
    """Issue 22: training froze the connected model for good. ComfyUI 0.3.75 loads models trainable, and PyTorch's
    matmul picks another kernel for a frozen weight (non-contiguous inputs: Flux's attention output), so the images
    after training differed in the last digits from the images before (on some CPUs). Same kernels, same bits."""
    from support.op_trace import first_difference, tracing_model_calls

    model = reference_model.build_model(tiny_flux.TinyFlux(depth=1, depth_single_blocks=1))
    model.model.diffusion_model.requires_grad_(True)  # as ComfyUI 0.3.75's loader leaves a model
    model.model.diffusion_model.img_in.weight.requires_grad_(False)  # and a layer a LoRA was on
    flags = [p.requires_grad for p in model.model.diffusion_model.parameters()]

    def sampled():
        traced_model, ops = tracing_model_calls(model)
        return sample(traced_model, conds), ops

    before, ops_before = sampled()
    run(model, conds, steps=2)
    assert [p.requires_grad for p in model.model.diffusion_model.parameters()] == flags
    after, ops_after = sampled()
    assert ops_after == ops_before, first_difference(ops_before, ops_after)
    assert torch.equal(after, before)


def test_the_node_says_which_phase_it_is_in_and_how_long_is_left(flux_model, conds, model_folder, monkeypatch):
    """Inside a server the node shows its phase as text (ComfyUI's progress text): the teacher's runs, the training
    steps with the distillation loss, each on-policy round, saving, the result; each with the time left."""
    import sys
    import types

    texts = []
    fake_server = types.ModuleType("server")
    fake_server.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(
        send_progress_text=lambda text, node_id, sid=None: texts.append((node_id, text)))})
    monkeypatch.setitem(sys.modules, "server", fake_server)
    run(flux_model, conds, steps=2, on_policy_rounds=1, hidden={"unique_id": "7"})
    assert {node for node, _ in texts} == {"7"}
    phases = [text.split(":")[0] for _, text in texts]
    order = ["recording the teacher", "training", "on-policy round 1/1", "on-policy round 1/1, training", "saving the file", "done"]
    assert [p for p in dict.fromkeys(phases)] == order, phases
    assert "step 2/2, distillation loss " in next(t for _, t in texts if t.startswith("training: step 2/2"))
    assert "about" in next(t for _, t in texts if t.startswith("recording the teacher"))  # the time left


def test_a_measured_recipe_sets_the_parts_and_every_knob(flux_model, conds, model_folder, monkeypatch):
    """The node's recipes are the README's best measured runs: choosing one trains with its parts, target, steps,
    teacher runs, rank and on-policy rounds (and their steps) whatever the inputs above say; custom keeps the inputs."""
    from comfyui_dynamic_dit.nodes import training_request
    from comfyui_dynamic_dit.training.student import StudentSpec

    asked = []

    def run_instead(self, resume, keep_checkpoints, node_id):
        asked.append(self)
        raise RuntimeError("stop before sampling")

    monkeypatch.setattr(training_request.TrainingRequest, "run", run_instead)
    for recipe, settings in training_request.RECIPES.items():
        with pytest.raises(RuntimeError, match="stop before sampling"):
            run(flux_model, conds, recipe=recipe)  # WIDGETS: width + TD-LoRA, 4 steps, 1 seed
        request = asked[-1]
        assert request.spec.parts == training_request.PARTS[settings["parts"]]
        assert request.config.steps == settings["steps"] and request.seeds == settings["seeds"]
        assert request.on_policy_rounds == settings["on_policy_rounds"]
        assert request.spec.rank == settings["rank"] and request.spec.coarse_schedule == settings.get("coarse_schedule", "0-70%:2")
        if "target_flops" in settings:
            assert request.config.target == settings["target_flops"]
        StudentSpec(**{field: getattr(request.spec, field) for field in ("parts", "rank", "coarse_schedule")}).validate()
    with pytest.raises(RuntimeError, match="stop before sampling"):
        run(flux_model, conds)
    assert asked[-1].config.steps == 4 and asked[-1].spec.parts == ("width", "td_lora")  # custom: the inputs
    with pytest.raises(ValueError, match="recipe must be one of"):
        run(flux_model, conds, recipe="the fastest")


def test_the_result_says_when_training_stopped_while_still_learning():
    from comfyui_dynamic_dit.nodes.training_request import still_falling

    falling = [1.0 / (1 + 0.1 * step) for step in range(100)]
    assert 0.19 < still_falling(falling) < 0.21  # the last 20 steps' mean against the 20 before
    assert still_falling([0.5 + 0.01 * (step % 3) for step in range(100)]) is None  # flat, noisy
    assert still_falling([0.5 + 0.001 * step for step in range(100)]) is None  # rising
    assert still_falling(falling[:9]) is None  # too few steps to say


def test_a_short_run_reports_it_was_not_done_learning(flux_model, conds, model_folder):
    # 20 steps of width + TD-LoRA from their start: the loss falls throughout
    report = run(flux_model, conds, steps=20)["result"][1]
    assert "Not done learning: the loss still fell" in report and "over the last fifth of the steps" in report, report
