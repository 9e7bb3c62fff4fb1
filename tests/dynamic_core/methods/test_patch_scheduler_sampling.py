"""The patch scheduler in real ComfyUI sampling runs of a tiny real Flux: identity when native, real
token and FLOP reduction when coarse, odd sizes, batches, cfg, Heun, Kontext references, inner methods."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from comfyui_dynamic_dit.dynamic_core.adapters import CallShape, adapter_for
from comfyui_dynamic_dit.dynamic_core.comfy_integration import tiny_flux
from comfyui_dynamic_dit.dynamic_core.comfy_integration.patching import apply_settings, plan_of
from comfyui_dynamic_dit.dynamic_core.flops import measure_flops
from comfyui_dynamic_dit.dynamic_core.methods import DynamicMethod, register
from comfyui_dynamic_dit.dynamic_core.methods.patch_scheduler import (
    PatchSchedulerSettings,
    choose_patch_factor,
    parse_schedule,
)
from comfyui_dynamic_dit.dynamic_core.plan import MethodSettings


@dataclass(frozen=True)
class PatchProbe(MethodSettings):
    """Records what the blocks receive and the latents of the step callbacks (a test double)."""

    method: ClassVar[str] = "test.patch_probe"


@register
class PatchProbeMethod(DynamicMethod):
    settings_type = PatchProbe
    order = 30
    tokens: ClassVar[list] = []  # (call index, block label, image tokens)
    latents: ClassVar[dict] = {}

    def wrap_block(self, call, block, args, proceed):
        img = args["img"].shape[1]
        self.tokens.append((call.record.index, block.label, img if "txt" in args else img - call.text_tokens))
        return proceed(args)

    def on_step(self, step, latent):
        self.latents[step] = latent.clone()

    @classmethod
    def reset(cls):
        cls.tokens.clear()
        cls.latents.clear()

    @classmethod
    def tokens_per_call(cls):
        """call index -> image tokens its first double block saw."""
        return {index: tokens for index, label, tokens in cls.tokens if label == "double.0"}


@dataclass(frozen=True)
class ThinMlp(MethodSettings):
    """Half of the image tokens skip the MLP of every block (a stand-in for the token router)."""

    method: ClassVar[str] = "test.thin_mlp"


@register
class ThinMlpMethod(DynamicMethod):
    settings_type = ThinMlp
    order = 20

    def block_internals(self, call, block, args, internals):
        img = args["img"]
        tokens = img.shape[1] if "txt" in args else img.shape[1] - call.text_tokens
        keep = torch.arange(tokens // 2, device=img.device).expand(img.shape[0], -1)
        return internals.with_changes(mlp_tokens=keep)


def manual(schedule, **changes):
    return PatchSchedulerSettings(mode="manual", schedule=parse_schedule(schedule), **changes)


def latest(model):
    return plan_of(model).telemetry.latest()


def decisions(model):
    return [call.methods.get("patch_scheduler") for call in latest(model).calls]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_native_patch_at_every_step_is_bit_identical(flux_model, conds, sampler):
    settings = dict(batch=2, steps=5, cfg=2.5, sampler=sampler, seed=13, height=26, width=30)
    reference = tiny_flux.sample(flux_model, *conds, **settings)
    never_coarse = apply_settings(flux_model, PatchSchedulerSettings(tau=1e-12, last_native_steps=0))
    assert plan_of(never_coarse).enabled_settings()  # the method runs and decides native at every step
    assert torch.equal(tiny_flux.sample(never_coarse, *conds, **settings), reference)
    reasons = decisions(never_coarse)
    assert all(r.startswith("native") for r in reasons)
    assert any(r.startswith("native (Δ³ p40: 2x ") for r in reasons)
    if sampler == "euler":
        all_native = apply_settings(flux_model, manual("0-100%:1"))
        assert not plan_of(all_native).enabled_settings()
        assert torch.equal(tiny_flux.sample(all_native, *conds, **settings), reference)


@pytest.mark.parametrize("factor, tokens", [(2, 64), (4, 16)])
def test_a_coarse_step_runs_on_a_fraction_of_the_image_tokens(flux_model, conds, factor, tokens):
    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(flux_model, manual(f"0-50%:{factor}")), PatchProbe())
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(model, *conds, steps=4, cfg=1.0, seed=3))
    assert torch.isfinite(out).all()
    assert list(PatchProbeMethod.tokens_per_call().values()) == [tokens, tokens, 256, 256]
    assert {t for i, label, t in PatchProbeMethod.tokens if i < 2} == {tokens}  # every block of a coarse call
    run = latest(model)
    assert run.executed_flops == pytest.approx(measured, rel=0.02)
    adapter = adapter_for(flux_model.model.diffusion_model, "Flux")
    coarse_call = adapter.full_flops(CallShape(batch=1, image_tokens=tokens, text_tokens=8, guidance=True))
    assert [c.executed.total for c in run.calls[:2]] == pytest.approx([coarse_call.total] * 2, rel=1e-9)
    assert run.calls[0].executed.total < (0.3 if factor == 2 else 0.1) * run.calls[0].full.total
    assert [s.methods["patch_scheduler"] for s in run.steps()] == [f"patch {factor}x (manual 0-50%)"] * 2 + ["native (no manual range)"] * 2


@pytest.mark.parametrize("height, width", [(33, 27), (18, 46), (5, 7)])
def test_odd_latent_sizes_are_padded_and_cropped(flux_model, conds, height, width):
    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(flux_model, manual("0-100%:4")), PatchProbe())
    out = tiny_flux.sample(model, *conds, steps=2, cfg=1.0, seed=5, height=height, width=width)
    assert out.shape == (1, 16, height, width) and torch.isfinite(out).all()
    coarse = -(-height // 8) * -(-width // 8)
    assert set(PatchProbeMethod.tokens_per_call().values()) == {coarse}


def test_batch_cfg_and_a_second_order_sampler(flux_model, conds):
    """Heun's second evaluation of step i runs at sigma_{i+1}, with the patch of step i+1."""
    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(flux_model, manual("0-50%:2")), PatchProbe())
    out = tiny_flux.sample(model, *conds, steps=4, cfg=2.0, batch=2, sampler="heun", seed=8)
    assert out.shape == (2, 16, 32, 32) and torch.isfinite(out).all()
    run = latest(model)
    assert [(c.step, c.batch, sorted(c.chunks)) for c in run.calls] == [
        (s, 4, ["cond", "uncond"]) for s in (0, 0, 1, 1, 2, 2, 3)
    ]
    coarse, native = "patch 2x (manual 0-50%)", "native (no manual range)"
    # calls at sigma_0, sigma_1 (step 0's second), sigma_1, sigma_2 (step 1's second), sigma_2, sigma_3, sigma_3
    assert decisions(model) == [coarse, coarse, coarse, native, native, native, native]
    assert list(PatchProbeMethod.tokens_per_call().values()) == [64, 64, 64, 256, 256, 256, 256]


def test_auto_mode_keeps_the_first_and_last_steps_native(flux_model, conds):
    model = apply_settings(flux_model, PatchSchedulerSettings(tau=1e9, last_native_steps=2))
    tiny_flux.sample(model, *conds, steps=10, cfg=1.0, seed=2)
    reasons = [s.methods["patch_scheduler"] for s in latest(model).steps()]
    assert reasons[:3] == ["native (first 3 steps)"] * 3
    assert reasons[3] == "native (Δ³ needs the latents of the 4 steps before)"
    assert all(r.startswith("patch 4x (Δ³ p40 = ") for r in reasons[4:8])
    assert reasons[8:] == ["native (last 2 steps)"] * 2
    two = apply_settings(flux_model, PatchSchedulerSettings(tau=1e9, max_factor=2, last_native_steps=0))
    tiny_flux.sample(two, *conds, steps=6, cfg=1.0, seed=2)
    assert [s.methods["patch_scheduler"][:8] for s in latest(two).steps()][4:] == ["patch 2x"] * 2


def test_decisions_use_the_latents_recorded_at_step_boundaries(flux_model, conds):
    """Heun calls the model twice per step; Δ³ for step s comes from the callback latents x_{s-4..s-1}."""
    PatchProbeMethod.reset()
    settings = PatchSchedulerSettings(tau=0.02, last_native_steps=1)
    model = apply_settings(apply_settings(flux_model, settings), PatchProbe())
    tiny_flux.sample(model, *conds, steps=7, cfg=1.0, sampler="heun", seed=4)
    reasons = {s.step: s.methods["patch_scheduler"] for s in latest(model).steps()}
    latents = PatchProbeMethod.latents
    assert sorted(latents) == list(range(7))
    for step in (4, 5):
        history = [latents[i] for i in range(step - 4, step)]
        expected = choose_patch_factor(history, settings.candidate_factors(), 2, settings.tau, settings.epsilon)
        assert reasons[step] == expected.reason


def test_composes_with_an_inner_token_method(flux_model, conds):
    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(apply_settings(flux_model, ThinMlp()), manual("0-100%:2")), PatchProbe())
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(model, *conds, steps=2, cfg=1.0, seed=6))
    assert torch.isfinite(out).all()
    run = latest(model)
    assert run.executed_flops == pytest.approx(measured, rel=0.02)
    assert set(PatchProbeMethod.tokens_per_call().values()) == {64}
    coarse_only = apply_settings(flux_model, manual("0-100%:2"))
    tiny_flux.sample(coarse_only, *conds, steps=2, cfg=1.0, seed=6)
    assert run.executed_flops < 0.9 * latest(coarse_only).executed_flops  # the thinning also happened


def test_a_coarse_step_can_also_be_thinned_by_the_token_router(flux_model, conds):
    """The router (inside the coarse call) routes the coarse tokens; when the grid changes between
    steps it runs that block in full once, as it does whenever the token count changes."""
    from comfyui_dynamic_dit.dynamic_core.methods.token_router import TokenRouterSettings

    router = TokenRouterSettings(mode="diffcr", keep_start=0.5, keep_end=0.5, first_full=0, last_full=0, score="update")
    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(apply_settings(flux_model, router), manual("0-50%:2")), PatchProbe())
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(model, *conds, steps=4, cfg=1.0, seed=6))
    assert torch.isfinite(out).all()
    assert latest(model).executed_flops == pytest.approx(measured, rel=0.02)
    # coarse: full (no history), routed 64 -> 32; native: full again (token count changed), routed 256 -> 128
    assert list(PatchProbeMethod.tokens_per_call().values()) == [64, 32, 256, 128]


def test_composes_with_the_width_patcher(flux_model, conds):
    from comfyui_dynamic_dit.dynamic_core.methods.width import WidthSettings

    width = WidthSettings(noisy_width=0.5, clean_width=0.5)
    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(apply_settings(flux_model, manual("0-50%:2")), width), PatchProbe())
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(model, *conds, steps=2, cfg=1.0, seed=6))
    assert torch.isfinite(out).all()
    run = latest(model)
    assert run.executed_flops + run.setup_flops == pytest.approx(measured, rel=0.02)  # setup: the width calibration
    assert list(PatchProbeMethod.tokens_per_call().values()) == [64, 256]
    coarse_only = apply_settings(flux_model, manual("0-50%:2"))
    tiny_flux.sample(coarse_only, *conds, steps=2, cfg=1.0, seed=6)
    coarse_step = [c for c in run.calls if c.methods["patch_scheduler"].startswith("patch")]
    thinned, plain = coarse_step[0].executed, latest(coarse_only).calls[0].executed
    assert thinned.qkv == pytest.approx(plain.qkv / 2) and thinned.mlp == pytest.approx(plain.mlp / 2)


def test_composes_with_td_lora(flux_model, conds):
    from comfyui_dynamic_dit.dynamic_core.comfy_integration.patching import adapter_of
    from comfyui_dynamic_dit.dynamic_core.comfy_integration.td_lora_files import apply_td_lora
    from comfyui_dynamic_dit.dynamic_core.methods.td_lora import (
        architecture_metadata, block_linear_shapes, parse_td_lora, random_td_lora, td_lora_state_dict,
    )

    adapter = adapter_of(flux_model)
    layers, gate = random_td_lora(block_linear_shapes(adapter, flux_model.model.diffusion_model), 2, 4)
    lora = parse_td_lora(*td_lora_state_dict(layers, architecture_metadata(adapter), gate), "random")
    coarse = apply_settings(flux_model, manual("0-100%:2"))
    both = apply_settings(apply_td_lora(flux_model, lora, 1.0), manual("0-100%:2"))
    PatchProbeMethod.reset()
    probed = apply_settings(both, PatchProbe())
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(probed, *conds, steps=2, cfg=1.0, seed=6))
    assert torch.isfinite(out).all()
    assert latest(probed).executed_flops == pytest.approx(measured, rel=0.02)
    assert set(PatchProbeMethod.tokens_per_call().values()) == {64}
    assert not torch.equal(out, tiny_flux.sample(coarse, *conds, steps=2, cfg=1.0, seed=6))


def test_reference_latents_stay_native_next_to_a_coarse_image(flux_model, tiny_config):
    def conditioning(method=None):
        positive, negative = tiny_flux.conditioning(tiny_config)
        reference = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
        positive[0][1]["reference_latents"] = [reference]
        if method is not None:
            positive[0][1]["reference_latents_method"] = method
        return positive, negative

    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(flux_model, manual("0-100%:2")), PatchProbe())
    out = tiny_flux.sample(model, *conditioning(), steps=2, cfg=1.0, seed=7)
    assert torch.isfinite(out).all()
    assert set(PatchProbeMethod.tokens_per_call().values()) == {64 + 64}  # coarse image + native reference
    assert set(decisions(model)) == {"patch 2x (manual 0-100%)"}

    PatchProbeMethod.reset()
    tiny_flux.sample(model, *conditioning("uxo"), steps=2, cfg=1.0, seed=7)
    assert set(PatchProbeMethod.tokens_per_call().values()) == {256 + 64}
    assert set(decisions(model)) == {"native ('uxo' reference latents are placed after the native grid; planned 2x)"}


def test_start_and_end_percent_limit_the_coarse_steps(flux_model, conds):
    model = apply_settings(flux_model, manual("0-100%:2", start_percent=0.0, end_percent=0.3))
    tiny_flux.sample(model, *conds, steps=6, cfg=1.0, seed=1)
    steps = latest(model).steps()
    coarse = [s.step for s in steps if s.methods["patch_scheduler"].startswith("patch 2x")]
    assert coarse and coarse == list(range(len(coarse))) and len(coarse) < 6
    assert all(s.methods["patch_scheduler"] == "native (outside 0%-30%)" for s in steps[len(coarse):])


def test_the_caller_and_the_input_model_are_left_alone(flux_model, conds):
    before = dict(flux_model.model_options["transformer_options"])
    model = apply_settings(flux_model, manual("0-100%:2"))
    tiny_flux.sample(model, *conds, steps=2, cfg=1.0, seed=1)
    assert flux_model.model_options["transformer_options"] == before
    assert "rope_options" not in model.model_options["transformer_options"]
    again = apply_settings(model, manual("0-100%:4"))
    assert list(plan_of(again).settings) == ["patch_scheduler"]
    assert plan_of(again).settings["patch_scheduler"].schedule[0].factor == 4
