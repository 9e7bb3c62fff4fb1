"""On-policy rounds (DAgger) on the tiny Flux: sampling runs follow the student where it changes the calls, record
the states it visits with the full model's output as the target, and training continues on all rows."""
from __future__ import annotations

import pytest
import torch
from support.training import LATENT, SAMPLING, student_for

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration import training_host
from comfyui_dynamic_dit.training.trainer import TrainConfig, schedule_ratio, train

SCHEDULE = "0-70%:2"


@pytest.fixture(scope="module")
def jobs(tiny_config):
    return [tiny_flux.conditioning(tiny_config, seed=s) for s in range(2)]


def test_a_rollout_follows_the_student_on_its_steps_only(flux_model, bank, jobs):
    student = student_for(flux_model, bank, parts=("coarse",), coarse_schedule=SCHEDULE)
    follow = training_host.student_follower(student, bank)
    coarse = student.changed_timesteps(bank)
    assert coarse == bank.timesteps[:6]
    with torch.inference_mode():  # as ComfyUI runs a node: the student's output carries no autograd graph into the sampler
        out = follow({**{k: v[:1] for k, v in bank.restricted(coarse).fixed(1).items()}})
    assert out is not None and not out.requires_grad
    followed = training_host.record_trajectories(flux_model, jobs[:1], LATENT, seeds=[0], follow=follow, **SAMPLING)
    plain = training_host.record_trajectories(flux_model, jobs[:1], LATENT, seeds=[0], **SAMPLING)
    latent = bank.latent_argument

    def rows_at(trajectories, step):
        group = next(iter(trajectories.groups.values()))
        at = [i for i, t in enumerate(group[bank.timestep_argument]) if abs(float(t) - bank.timesteps[step]) < 1e-6]
        return torch.stack([group[latent][i] for i in at]), torch.stack([group["target"][i] for i in at])

    first_x, _ = rows_at(followed, 0)
    assert torch.equal(first_x, rows_at(plain, 0)[0])  # the same noise ...
    x, target = rows_at(followed, 3)
    assert (x - rows_at(plain, 3)[0]).abs().max() > 1e-4  # ... then the states the coarse student leads to
    with torch.no_grad():  # and the rows' targets are the full model's output at those states
        full = flux_model.model.diffusion_model(**{k: v[:1] for k, v in _arguments(followed, 3).items()})
    torch.testing.assert_close(full, target[:1], rtol=0, atol=1e-5)


def _arguments(trajectories, step):
    group = next(iter(trajectories.groups.values()))
    timestep = trajectories.timesteps[step]
    at = [i for i, t in enumerate(group[trajectories.timestep_argument]) if abs(float(t) - timestep) < 1e-6]
    return {name: torch.stack([tensors[i] for i in at]) for name, tensors in group.items() if name not in ("sigmas", "target")}


def test_rounds_add_rows_and_train_at_the_target(flux_model, bank, jobs):
    student = student_for(flux_model, bank, parts=("tokens", "td_lora"), ratio_regions=2)
    config = TrainConfig(target=0.6, steps=12, batch=4, checkpoint_every=1000)
    train(student, bank, config, progress_bar=False)
    before = schedule_ratio(student, bank)
    steps_done = []
    merged = bank
    for index in range(2):
        merged, result = training_host.on_policy_round(
            flux_model, student, merged, jobs, LATENT, round_index=index, round_steps=3, config=config, steps=SAMPLING["steps"],
            cfg=SAMPLING["cfg"], sampler=SAMPLING["sampler"], scheduler=SAMPLING["scheduler"], seeds=[0],
            callback=lambda step, total, entry: steps_done.append((step, entry["target"])))
    assert merged.rows == 3 * bank.rows and merged.timesteps == bank.timesteps
    assert result.steps == 3 and [s for s, _ in steps_done] == [1, 2, 3, 1, 2, 3]
    assert all(target == pytest.approx(0.6) for _, target in steps_done)  # at the target from the first round step
    assert 0.6 < schedule_ratio(student, bank) < before  # the rounds kept training towards the target


def test_a_run_stopped_between_rounds_resumes_to_the_same_weights(flux_model, bank, jobs, tmp_path):
    """Main run + two rounds with checkpoints; a run stopped after the first round, resumed by a new process (a new
    student), samples the finished round's rollouts again and ends bit-identical to the uninterrupted run."""
    config = TrainConfig(target=0.6, steps=6, batch=4, checkpoint_every=1000)
    rollout = dict(round_steps=3, config=config, steps=SAMPLING["steps"], cfg=SAMPLING["cfg"], sampler=SAMPLING["sampler"],
                   scheduler=SAMPLING["scheduler"], seeds=[0])

    def run(folder, rounds):
        checkpoint, trained = folder / "run.ckpt", []  # trained: (stage, step) of every step this run trained
        student = student_for(flux_model, bank, parts=("tokens", "td_lora"), ratio_regions=2)
        train(student, bank, config, checkpoint=checkpoint, progress_bar=False, callback=lambda s, *_: trained.append((0, s)))
        rows = bank
        for index in range(rounds):
            rows, _ = training_host.on_policy_round(flux_model, student, rows, jobs, LATENT, round_index=index,
                                                    checkpoint=training_host.round_checkpoint(checkpoint, index),
                                                    callback=lambda s, *_, i=index: trained.append((i + 1, s)), **rollout)
        return student, trained

    (tmp_path / "whole").mkdir()
    whole, _ = run(tmp_path / "whole", 2)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    run(stopped, 1)
    assert sorted(p.name for p in stopped.iterdir()) == ["run.ckpt", "run.round1.ckpt"]
    resumed, trained = run(stopped, 2)
    assert trained == [(2, 1), (2, 2), (2, 3)]  # only the second round trained; the rest came from the checkpoints
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    training_host.remove_checkpoints(stopped / "run.ckpt")  # a fresh run starts from nothing
    assert not list(stopped.iterdir())


def test_teacher_and_rollout_seeds_never_meet_each_other_or_the_seeds_people_sample_with():
    """Judging a trained file on noise it was trained on would flatter it: the teacher's runs and every round's
    rollouts use seeds apart from each other and from 0..999 (the benchmark's and a fresh KSampler's)."""
    from comfyui_dynamic_dit.training.trajectories import rollout_seeds, teacher_seeds

    teacher = teacher_seeds(64)
    assert teacher[:3] == [1000, 1001, 1002] and len(set(teacher)) == 64
    used = [set(teacher)] + [set(rollout_seeds(teacher, k)) for k in range(10)]  # the node allows 10 rounds
    assert all(min(seeds) >= 1000 for seeds in used)
    assert sum(len(seeds) for seeds in used) == len(set().union(*used))
    assert teacher_seeds(3, first=7) == [7, 8, 9]
