"""The patch scheduler in real ComfyUI sampling runs of a tiny real Flux: identity when native, real
token and FLOP reduction when coarse, odd sizes, batches, cfg, Heun, Kontext references, inner methods."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from comfyui_dynamic_dit.families import CallLayout, adapter_for
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration.patching import apply_settings, install_executor, plan_of
from comfyui_dynamic_dit.core.flops import measure_flops
from comfyui_dynamic_dit.methods import DynamicMethod, register
from comfyui_dynamic_dit.methods.patch_scheduler.schedule import parse_schedule
from comfyui_dynamic_dit.methods.patch_scheduler.settings import PatchSchedulerSettings
from comfyui_dynamic_dit.methods.patch_scheduler.statistics import choose_patch_factor, relative_roughness, roughness
from comfyui_dynamic_dit.core.plan import MethodSettings


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
    inputs: ClassVar[list] = []  # per call: (the call's sampler_x, dtype of the image stream in the blocks)

    def wrap_block(self, call, block, args, proceed):
        img = args["img"].shape[1]
        self.tokens.append((call.record.index, block.label, img if "txt" in args else img - call.layout.text_tokens))
        if block.label == "double.0":
            self.inputs.append((call.sampler_x, args["img"].dtype))
        return proceed(args)

    def on_step(self, step, latent):
        self.latents[step] = latent.clone()

    @classmethod
    def reset(cls):
        cls.tokens.clear()
        cls.latents.clear()
        cls.inputs.clear()

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
        tokens = img.shape[1] if "txt" in args else img.shape[1] - call.layout.text_tokens
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
    coarse_call = adapter.full_flops(CallLayout(batch=1, image_tokens=tokens, text_tokens=8, guidance=True))
    assert [c.executed.total for c in run.calls[:2]] == pytest.approx([coarse_call.total] * 2, rel=1e-9)
    assert run.calls[0].executed.total < (0.3 if factor == 2 else 0.1) * run.calls[0].full.total
    assert [s.methods["patch_scheduler"] for s in run.steps()] == [f"patch {factor}x (manual 0-50%)"] * 2 + ["native (no manual range)"] * 2


def test_a_step_range_runs_the_steps_it_names(flux_model, conds):
    PatchProbeMethod.reset()
    model = apply_settings(apply_settings(flux_model, manual("steps 1-2:2")), PatchProbe())
    with torch.no_grad():
        tiny_flux.sample(model, *conds, steps=4, cfg=1.0, seed=3)
    assert list(PatchProbeMethod.tokens_per_call().values()) == [256, 64, 64, 256]
    native, coarse = "native (no manual range)", "patch 2x (manual steps 1-2)"
    assert [s.methods["patch_scheduler"] for s in latest(model).steps()] == [native, coarse, coarse, native]


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
    model = apply_settings(flux_model, PatchSchedulerSettings(tau=1e9, max_factor=4, last_native_steps=2))
    tiny_flux.sample(model, *conds, steps=10, cfg=1.0, seed=2)
    reasons = [s.methods["patch_scheduler"] for s in latest(model).steps()]
    assert reasons[:3] == ["native (first 3 steps)"] * 3
    assert reasons[3].startswith("patch 4x (Δ³ p40 = 1.00 × step 3's < τ 1e+09)")  # step 3 is its own yardstick
    assert reasons[4:7] == ["native (Δ³ window holds coarse step 3)"] * 3
    assert reasons[7].startswith("patch 4x (Δ³ p40 = ")
    assert reasons[8:] == ["native (last 2 steps)"] * 2
    two = apply_settings(flux_model, PatchSchedulerSettings(tau=1e9, max_factor=2, last_native_steps=0))
    tiny_flux.sample(two, *conds, steps=8, cfg=1.0, seed=2)
    assert [s.methods["patch_scheduler"][:8] for s in latest(two).steps()][3:] == ["patch 2x", *["native ("] * 3, "patch 2x"]


def test_step_s_decides_from_its_own_input_and_the_three_latents_before(flux_model, conds):
    """No lag: step s's Δ³ is x_s - 3 x_{s-1} + 3 x_{s-2} - x_{s-3}, x_s being the input of its own model call
    (for Euler the latent its callback reports afterwards), measured against step 3's value."""
    PatchProbeMethod.reset()
    settings = PatchSchedulerSettings(tau=1.5, max_factor=4, last_native_steps=1)
    model = apply_settings(apply_settings(flux_model, settings), PatchProbe())
    tiny_flux.sample(model, *conds, steps=9, cfg=2.0, seed=4)
    reasons = {s.step: s.methods["patch_scheduler"] for s in latest(model).steps()}
    latents = PatchProbeMethod.latents
    factors, patch = settings.candidate_factors(), 2
    yardstick = roughness([latents[i] for i in range(4)], factors, patch, settings.epsilon)
    for step in (3, 7):
        values = roughness([latents[i] for i in range(step - 3, step + 1)], factors, patch, settings.epsilon)
        relative = dict(zip(factors, relative_roughness(values, yardstick).tolist()))
        assert reasons[step] == choose_patch_factor(relative, settings.tau, settings.epsilon, 3).reason
    assert reasons[3].startswith("patch 4x")  # the first step auto mode can make coarse
    assert [reasons[step] for step in (4, 5, 6)] == ["native (Δ³ window holds coarse step 3)"] * 3


def test_the_decision_is_made_once_per_step(flux_model, conds, monkeypatch):
    """Heun (two evaluations a step) with cond and uncond in separate calls (ComfyUI batches them only
    when memory allows): one Δ³ evaluation per step, and every call of a step runs at its patch size."""
    import comfy.model_management

    from comfyui_dynamic_dit.methods.patch_scheduler import runtime as patch_scheduler

    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: (1, 1) if torch_free_too else 1)
    evaluated = []
    original = patch_scheduler.roughness
    monkeypatch.setattr(patch_scheduler, "roughness", lambda *a, **k: evaluated.append(1) or original(*a, **k))
    PatchProbeMethod.reset()
    settings = PatchSchedulerSettings(tau=1e9, max_factor=4, last_native_steps=1)
    model = apply_settings(apply_settings(flux_model, settings), PatchProbe())
    tiny_flux.sample(model, *conds, steps=9, cfg=2.0, sampler="heun", seed=3)
    run = latest(model)
    assert all(len(c.chunks) == 1 for c in run.calls) and len(run.calls) == 2 * (2 * 9 - 1)  # heun: 17 evaluations
    assert len(evaluated) == 2  # steps 3 and 7 (0-2 first native, 4-6 hold coarse step 3 in their window, 8 last)
    by_sigma = {}
    for call in run.calls:
        by_sigma.setdefault(call.sigma, set()).add(call.methods["patch_scheduler"])
    assert all(len(reasons) == 1 for reasons in by_sigma.values())  # every call at a sigma: one decision
    tokens = PatchProbeMethod.tokens_per_call()
    # sigma_3 and sigma_7: the second evaluation of the step before and the first of the step, cond and uncond
    assert [tokens[c.index] for c in run.calls if c.methods["patch_scheduler"].startswith("patch 4x")] == [16] * 8


def count_host_reads(fn):
    """Calls of the tensor methods that read a value back to the host, while `fn` runs."""
    names = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
    counts = dict.fromkeys(names, 0)
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return method

    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return sum(counts.values())


@pytest.mark.parametrize("settings, coarse_steps", [(PatchSchedulerSettings(tau=1e9, last_native_steps=0), 2),
                                                    (manual("0-100%:2"), 8)], ids=["auto", "manual"])
def test_one_host_read_per_step_and_none_per_block(flux_model, conds, settings, coarse_steps):
    kwargs = dict(steps=8, cfg=2.0, seed=5)
    off = count_host_reads(lambda: tiny_flux.sample(install_executor(flux_model), *conds, **kwargs))
    model = apply_settings(flux_model, settings)
    with_scheduler = count_host_reads(lambda: tiny_flux.sample(model, *conds, **kwargs))
    assert sum(s.methods["patch_scheduler"].startswith("patch") for s in latest(model).steps()) == coarse_steps
    # auto: steps 3 and 7 decide from Δ³ (4-6 hold step 3 in their window); manual: every step checks the flow
    # time. One read inside the blocks would add 6 blocks x 8 steps.
    assert 0 < with_scheduler - off <= kwargs["steps"]


def test_the_newest_latent_is_the_samplers_x_at_full_precision(tiny_config, conds):
    """A bf16 model gets its input cast to bf16; Δ³ uses the sampler's float32 x, not that (bf16 rounding,
    2^-9 of the latent, would swamp a statistic of a few thousandths)."""
    PatchProbeMethod.reset()
    model = apply_settings(reference_model.build_model(tiny_config, dtype=torch.bfloat16), PatchProbe())
    tiny_flux.sample(model, *conds, steps=2, cfg=1.0, seed=1)
    assert [x.dtype for x, _ in PatchProbeMethod.inputs] == [torch.float32] * 2
    assert [dtype for _, dtype in PatchProbeMethod.inputs] == [torch.bfloat16] * 2
    for step, (sampler_x, _) in enumerate(PatchProbeMethod.inputs):
        assert torch.equal(sampler_x, PatchProbeMethod.latents[step])


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
    from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings

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
    from comfyui_dynamic_dit.methods.width.settings import WidthSettings

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
    from comfyui_dynamic_dit.integration.patching import adapter_of
    from comfyui_dynamic_dit.methods.td_lora.comfy_files import apply_td_lora
    from comfyui_dynamic_dit.methods.td_lora.binding import architecture_metadata, block_linear_shapes
    from comfyui_dynamic_dit.methods.td_lora.file import parse_td_lora, random_td_lora, td_lora_state_dict

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


@pytest.fixture(scope="module")
def reference():
    return reference_model.load_reference()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_the_defaults_go_coarse_on_the_reference_model(reference, sampler):
    """Issue item 7: at its old defaults (absolute τ 0.001) auto mode never went coarse on this model.
    Measured in BENCHMARKS.md: steps 3, 7 and 11 of 16 at 2x, x1.16 fewer FLOPs, 27-28 dB under both samplers."""
    model = apply_settings(reference.model, PatchSchedulerSettings())
    tiny_flux.sample(model, reference.conditioning("cat"), reference.null_conditioning(), height=32, width=32, steps=16,
                     cfg=2.0, sampler=sampler, seed=0)
    run = latest(model)
    coarse = [s.step for s in run.steps() if s.methods["patch_scheduler"].startswith("patch")]
    assert coarse[:1] == [3] and len(coarse) >= 3
    assert run.full_flops / run.executed_flops > 1.15
