"""How methods plug into the one executor: canonical order, replacement, hooks, cleanup.

The methods here are test doubles that change the output in simple, visible ways; the real methods
come with their own issues and tests.
"""
import contextlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import apply_settings, plan_of
from comfyui_dynamic_dit.core.executor import ModelCall
from comfyui_dynamic_dit.methods import DynamicMethod, register
from comfyui_dynamic_dit.core.plan import MethodSettings


@dataclass(frozen=True)
class OutputScale(MethodSettings):
    method: ClassVar[str] = "test.output_scale"
    factor: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.factor != 1.0

    def validate(self, adapter) -> None:
        if not 0.0 < self.factor < 10.0:
            raise ValueError(f"factor must be in (0, 10), got {self.factor}")


@register
class OutputScaleMethod(DynamicMethod):
    settings_type = OutputScale
    order = 10

    def wrap_model_call(self, call, model_call, proceed):
        call.record.methods[self.name] = f"x{self.settings.factor}"
        return proceed(model_call) * self.settings.factor


@dataclass(frozen=True)
class ImageShift(MethodSettings):
    method: ClassVar[str] = "test.image_shift"
    shift: float = 0.0


@register
class ImageShiftMethod(DynamicMethod):
    settings_type = ImageShift
    order = 20

    def wrap_block(self, call, block, args, proceed):
        out = proceed(args)
        out["img"] = out["img"] + self.settings.shift
        call.record.note_block(block.label, "shift", self.settings.shift)
        return out


@dataclass(frozen=True)
class Probe(MethodSettings):
    method: ClassVar[str] = "test.probe"
    fail_at_call: int = -1


@register
class ProbeMethod(DynamicMethod):
    settings_type = Probe
    order = 30
    log: ClassVar[list] = []

    def wrap_model_call(self, call, model_call, proceed):
        self.log.append(("call", call.step.step, call.step.call_in_step, round(call.step.sigma, 4), [c.kind for c in call.chunks]))
        if call.record.index == self.settings.fail_at_call:
            raise RuntimeError("probe failure")
        return proceed(model_call)

    def wrap_block(self, call, block, args, proceed):
        if block.index == 0:
            self.log.append(("block", block.kind, args["img"].shape[1], call.layout.text_tokens))
        return proceed(args)

    def on_step(self, step, latent):
        self.log.append(("step", step, tuple(latent.shape)))

    def finish(self):
        self.log.append(("finish",))


@dataclass(frozen=True)
class HalfHeads(MethodSettings):
    method: ClassVar[str] = "test.half_heads"


@register
class HalfHeadsMethod(DynamicMethod):
    settings_type = HalfHeads
    order = 40
    cache_stats: ClassVar[list] = []

    def block_internals(self, call, block, args, internals):
        return internals.with_changes(heads=(0, 1))

    def finish(self):
        self.cache_stats.append([key for key in self.run.indices._entries if key[0] == "flux.width"])


SAMPLE = dict(steps=3, seed=21, cfg=2.0)


def test_chaining_order_does_not_matter(flux_model, conds):
    ab = apply_settings(apply_settings(flux_model, OutputScale(1.5)), ImageShift(0.01))
    ba = apply_settings(apply_settings(flux_model, ImageShift(0.01)), OutputScale(1.5))
    out_ab = tiny_flux.sample(ab, *conds, **SAMPLE)
    assert torch.equal(out_ab, tiny_flux.sample(ba, *conds, **SAMPLE))
    assert not torch.equal(out_ab, tiny_flux.sample(flux_model, *conds, **SAMPLE))


def test_same_method_twice_replaces_its_settings(flux_model, conds):
    twice = apply_settings(apply_settings(flux_model, OutputScale(3.0)), OutputScale(1.5))
    once = apply_settings(flux_model, OutputScale(1.5))
    assert list(plan_of(twice).settings) == ["test.output_scale"]
    assert torch.equal(tiny_flux.sample(twice, *conds, **SAMPLE), tiny_flux.sample(once, *conds, **SAMPLE))


def test_method_at_full_setting_is_bit_identical(flux_model, conds):
    off = apply_settings(flux_model, OutputScale(1.0))
    assert torch.equal(tiny_flux.sample(off, *conds, **SAMPLE), tiny_flux.sample(flux_model, *conds, **SAMPLE))
    assert plan_of(off).telemetry.latest().plan == "every method off"


def test_out_of_range_settings_raise_and_nothing_is_patched(flux_model):
    before = dict(flux_model.model_options)
    with pytest.raises(ValueError, match=r"factor must be in \(0, 10\)"):
        apply_settings(flux_model, OutputScale(12.0))
    assert flux_model.model_options == before


def test_telemetry_records_what_methods_did(flux_model, conds):
    model = apply_settings(apply_settings(flux_model, OutputScale(1.5)), ImageShift(0.25))
    tiny_flux.sample(model, *conds, **SAMPLE)
    run = plan_of(model).telemetry.latest()
    assert all(call.methods == {"test.output_scale": "x1.5"} for call in run.calls)
    assert set(run.calls[0].blocks) == {"double.0", "double.1", "single.0", "single.1", "single.2", "single.3"}
    assert "double.0 shift=0.25" in run.block_table()


def test_hooks_see_steps_chunks_tokens_and_cleanup(flux_model, conds):
    ProbeMethod.log.clear()
    model = apply_settings(flux_model, Probe())
    tiny_flux.sample(model, *conds, steps=2, sampler="heun", seed=1, cfg=3.0, height=16, width=24)
    log = ProbeMethod.log
    calls = [e for e in log if e[0] == "call"]
    # heun: step 0 evaluates at sigma_0 and sigma_1; the second call is provisionally the step of its sigma
    assert [c[1:3] for c in calls] == [(0, 0), (1, 0), (1, 1)]
    assert all(sorted(c[4]) == ["cond", "uncond"] for c in calls)
    assert [e for e in log if e[0] == "step"] == [("step", 0, (1, 16, 16, 24)), ("step", 1, (1, 16, 16, 24))]
    blocks = [e for e in log if e[0] == "block"]
    assert blocks[0] == ("block", "double", 8 * 12, 8)  # image tokens, text tokens
    assert blocks[1] == ("block", "single", 8 + 8 * 12, 8)  # joint sequence in single blocks
    assert log[-1] == ("finish",)
    assert [s.calls for s in plan_of(model).telemetry.latest().steps()] == [2, 1]


def test_a_failing_run_is_cleaned_up_and_the_next_run_works(flux_model, conds):
    ProbeMethod.log.clear()
    failing = apply_settings(flux_model, Probe(fail_at_call=1))
    with pytest.raises(RuntimeError, match="probe failure"):
        tiny_flux.sample(failing, *conds, **SAMPLE)
    assert ProbeMethod.log[-1] == ("finish",)
    assert "dynamic_dit_run" not in failing.model_options["transformer_options"]
    healthy = apply_settings(failing, Probe())
    assert torch.equal(tiny_flux.sample(healthy, *conds, **SAMPLE), tiny_flux.sample(flux_model, *conds, **SAMPLE))


def test_block_internals_remove_compute_and_telemetry_counts_it(flux_model, conds):
    from comfyui_dynamic_dit.core.flops import measure_flops

    HalfHeadsMethod.cache_stats.clear()
    model = apply_settings(flux_model, HalfHeads())
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(model, *conds, **SAMPLE))
    run = plan_of(model).telemetry.latest()
    assert run.executed_flops == pytest.approx(measured, rel=0.02)
    assert run.executed_flops < 0.9 * run.full_flops
    assert not torch.equal(out, tiny_flux.sample(flux_model, *conds, **SAMPLE))
    # one decision, so one set of kept-unit selections for the whole run (built once, reused by every block)
    assert HalfHeadsMethod.cache_stats[0] == [("flux.width", (0, 1), None, 0)]


def test_what_a_call_holds_is_entered_around_the_hosts_run_of_it_only():
    """A coarse call's position stand-ins must see that call, not the calls a later method makes first (the width
    calibration): the context is entered when the call is invoked, and kept through changed arguments."""
    events = []

    @contextlib.contextmanager
    def holding():
        events.append("enter")
        yield
        events.append("exit")

    call = ModelCall({"x": 1}, lambda arguments: events.append(("host", arguments["x"])) or arguments["x"])
    held = call.while_running(holding)
    assert not events and call.holding == ()
    assert held.with_arguments(x=2).invoke() == 2 and events == ["enter", ("host", 2), "exit"]
