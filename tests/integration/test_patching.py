"""The executor on a real ComfyUI ModelPatcher: off means identical, no leaks, steps, FLOPs, composition."""
import copy

import pytest
import torch

from comfy_extras.nodes_easycache import EasyCacheNode

from comfyui_dynamic_dit.families import UnsupportedModelError
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import (
    BlockPatch,
    PLAN_KEY,
    install_executor,
    plan_of,
)
from comfyui_dynamic_dit.core.flops import measure_flops
from support.host_models import tiny_auraflow


def latest_run(model):
    return plan_of(model).telemetry.latest()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_every_method_off_is_bit_identical(flux_model, conds, sampler):
    settings = dict(batch=2, steps=4, cfg=2.5, sampler=sampler, seed=11)
    reference = tiny_flux.sample(flux_model, *conds, **settings)
    patched = install_executor(flux_model)
    assert torch.equal(tiny_flux.sample(patched, *conds, **settings), reference)
    run = latest_run(patched)
    assert run.finished and run.total_steps == 4
    # cfg > 1: cond and uncond run batched in one call of batch 4
    assert all(sorted(call.chunks) == ["cond", "uncond"] and call.batch == 4 for call in run.calls)


@pytest.mark.parametrize(
    "settings",
    [
        dict(denoise=0.5, steps=6),
        dict(steps=8, start_step=2, last_step=5),
        # lcm evaluates the model at every sigma, so the trailing zeros are real model calls at sigma 0
        dict(sampler="lcm", sigmas=torch.tensor([1.0, 0.7, 0.35, 0.0, 0.0])),
        dict(sampler="dpmpp_2s_ancestral", steps=4),
        dict(sampler="uni_pc", steps=5),
    ],
    ids=["denoise", "advanced_start_end", "zeros_in_schedule", "dpmpp_2s", "uni_pc"],
)
def test_sampler_edge_cases_stay_identical(flux_model, conds, settings):
    latent = torch.randn(1, 16, 24, 24, generator=torch.Generator().manual_seed(3))
    reference = tiny_flux.sample(flux_model, *conds, latent=latent, seed=5, **settings)
    patched = install_executor(flux_model)
    assert torch.equal(tiny_flux.sample(patched, *conds, latent=latent, seed=5, **settings), reference)


def test_calls_at_sigma_zero_are_steps_too(flux_model, conds):
    patched = install_executor(flux_model)
    out = tiny_flux.sample(patched, *conds, sampler="lcm", sigmas=torch.tensor([1.0, 0.5, 0.0, 0.0]), seed=1)
    assert torch.isfinite(out).all()
    steps = latest_run(patched).steps()
    assert [(s.step, s.calls) for s in steps] == [(0, 1), (1, 1), (2, 1)]
    assert steps[2].sigma == 0.0


def test_steps_of_a_second_order_sampler(flux_model, conds):
    patched = install_executor(flux_model)
    tiny_flux.sample(patched, *conds, steps=4, sampler="heun", seed=1)
    steps = latest_run(patched).steps()
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert [s.calls for s in steps] == [2, 2, 2, 1]  # no second evaluation into sigma 0


def test_steps_of_ksampler_advanced_and_denoise(flux_model, conds):
    patched = install_executor(flux_model)
    tiny_flux.sample(patched, *conds, steps=10, start_step=3, last_step=7, seed=1)
    run = latest_run(patched)
    assert run.total_steps == 4 and [s.step for s in run.steps()] == [0, 1, 2, 3]
    tiny_flux.sample(patched, *conds, steps=6, denoise=0.5, seed=1)
    run = latest_run(patched)
    assert run.total_steps == 6 and [s.step for s in run.steps()] == list(range(6))
    assert run.steps()[0].sigma < 0.9  # denoise < 1 starts part-way down the schedule


def test_input_model_is_never_mutated(flux_model):
    before_options = copy.deepcopy(flux_model.model_options)
    before_wrappers = copy.deepcopy(flux_model.wrappers)
    patched = install_executor(flux_model)
    again = install_executor(patched)
    assert flux_model.model_options == before_options
    assert flux_model.wrappers == before_wrappers
    assert plan_of(flux_model) is None
    assert plan_of(patched) is not plan_of(again)
    # installing twice does not stack wrappers or block patches
    for wrapper_type, by_key in again.wrappers.items():
        for key, wrappers in by_key.items():
            assert len(wrappers) == 1, (wrapper_type, key)
    patches = again.model_options["transformer_options"]["patches_replace"]["dit"]
    assert all(isinstance(p, BlockPatch) and p.foreign is None for p in patches.values())
    assert len(patches) == 6


def test_runs_in_a_row_and_latent_sizes_do_not_leak(flux_model, conds):
    patched = install_executor(flux_model)
    for height, width in [(32, 32), (24, 40), (32, 32)]:
        reference = tiny_flux.sample(flux_model, *conds, height=height, width=width, steps=3, seed=2)
        assert torch.equal(tiny_flux.sample(patched, *conds, height=height, width=width, steps=3, seed=2), reference)
    runs = plan_of(patched).telemetry.runs()
    assert [r.latent_shape[-2:] for r in runs] == [(32, 32), (24, 40), (32, 32)]
    assert [len(r.calls) for r in runs] == [3, 3, 3]
    assert runs[1].calls[0].image_tokens == 12 * 20
    assert PLAN_KEY in patched.model_options["transformer_options"]
    assert "dynamic_dit_run" not in patched.model_options["transformer_options"]


def test_two_models_patched_at_once(flux_model, other_flux_model, conds):
    first, second = install_executor(flux_model), install_executor(other_flux_model)
    expected = [
        tiny_flux.sample(flux_model, *conds, steps=3, seed=4),
        tiny_flux.sample(other_flux_model, *conds, steps=3, seed=4),
    ]
    got = [
        tiny_flux.sample(first, *conds, steps=3, seed=4),
        tiny_flux.sample(second, *conds, steps=3, seed=4),
        tiny_flux.sample(first, *conds, steps=3, seed=4),
    ]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[0])
    assert torch.equal(got[1], expected[1])
    assert len(plan_of(first).telemetry.runs()) == 2 and len(plan_of(second).telemetry.runs()) == 1
    assert latest_run(first).calls[0].full.total != latest_run(second).calls[0].full.total


def test_telemetry_flops_match_flop_counter_over_a_whole_run(flux_model, conds):
    patched = install_executor(flux_model)
    with torch.no_grad():
        measured, _ = measure_flops(lambda: tiny_flux.sample(patched, *conds, batch=2, steps=3, height=30, width=34, seed=8))
    run = latest_run(patched)
    assert run.full_flops == pytest.approx(measured, rel=0.02)
    assert run.executed_flops == run.full_flops
    assert all(call.seconds > 0 for call in run.calls)


def test_composes_with_easycache_in_either_order(flux_model, conds):
    def easycache(model):
        return EasyCacheNode.execute(model, 0.4, 0.0, 1.0, False).result[0]

    reference = tiny_flux.sample(easycache(flux_model), *conds, steps=8, seed=6)
    inner = install_executor(easycache(flux_model))
    outer = easycache(install_executor(flux_model))
    assert torch.equal(tiny_flux.sample(inner, *conds, steps=8, seed=6), reference)
    assert torch.equal(tiny_flux.sample(outer, *conds, steps=8, seed=6), reference)
    for model in (inner, outer):
        # the telemetry sees every step, including the ones EasyCache answered from its cache
        steps = latest_run(model).steps()
        assert len(steps) == 8
        skipped = [s for s in steps if not s.ran_model]
        assert skipped and all(s.executed == 0 for s in skipped)
        assert all(s.executed == s.full for s in steps if s.ran_model)


def test_keeps_a_block_patch_installed_by_another_node(flux_model, conds):
    def foreign_patch(args, extra):
        out = extra["original_block"](args)
        out["img"] = out["img"] * 0.5
        return out

    other = flux_model.clone()
    other.set_model_patch_replace(foreign_patch, "dit", "double_block", 1)
    reference = tiny_flux.sample(other, *conds, steps=3, seed=9)
    assert not torch.equal(reference, tiny_flux.sample(flux_model, *conds, steps=3, seed=9))
    patched = install_executor(other)
    assert torch.equal(tiny_flux.sample(patched, *conds, steps=3, seed=9), reference)
    assert patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 1)].foreign is foreign_patch


def test_unsupported_model_raises_and_leaves_the_input_alone():
    aura = tiny_auraflow()
    before = copy.deepcopy(aura.model_options)
    with pytest.raises(UnsupportedModelError, match="AuraFlow"):
        install_executor(aura)
    assert aura.model_options == before and not aura.wrappers


def test_live_progress_is_published_inside_a_server(flux_model, conds, monkeypatch):
    import sys
    import types

    sent = []

    class FakePromptServer:
        client_id = "browser-1"

        def send_sync(self, event, data, sid=None):
            sent.append((event, data, sid))

    fake_server = types.ModuleType("server")
    fake_server.PromptServer = type("PromptServer", (), {"instance": FakePromptServer()})
    monkeypatch.setitem(sys.modules, "server", fake_server)
    patched = install_executor(flux_model)
    tiny_flux.sample(patched, *conds, steps=3, sampler="heun", seed=2)
    assert [e for e, _, _ in sent] == ["dynamic_dit.progress"] * 4 and {s for _, _, s in sent} == {"browser-1"}
    # at callback i the steps before i are settled (heun's second evaluation included)
    assert [[s["calls"] for s in d["steps"]] for _, d, _ in sent] == [[], [2], [2, 2], [2, 2, 1]]
    final = sent[-1][1]
    assert final["done"] and final["summary"].startswith("full compute, model time ") and final["total_steps"] == 3
    assert [d["summary"].split(" - ")[1].split(",")[:2] for _, d, _ in sent[1:3]] == [["step 1/3", " 2 model calls"],
                                                                                  ["step 2/3", " 4 model calls"]]


def test_no_progress_events_outside_a_server(flux_model, conds, monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "server", raising=False)
    patched = install_executor(flux_model)
    tiny_flux.sample(patched, *conds, steps=2, seed=2)  # nothing to send to, nothing breaks
    assert latest_run(patched).finished
