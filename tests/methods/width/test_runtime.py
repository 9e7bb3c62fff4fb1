"""Dynamic width (DyDiT TDW): off means identical, FLOPs really drop, decisions, routers, calibration."""
import math
from dataclasses import replace

import pytest
import torch

import comfy.model_management

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings, install_executor, plan_of
from comfyui_dynamic_dit.core.flops import ZERO, measure_flops
from comfyui_dynamic_dit.methods.width import calibration as width_calibration
from comfyui_dynamic_dit.methods.width.runtime import DynamicWidth
from comfyui_dynamic_dit.methods.width.calibration import RANKINGS, CalibrationSpec
from comfyui_dynamic_dit.methods.width.settings import WidthSettings, kept_count, ramp
from comfyui_dynamic_dit.methods.width.file import RouterHeader, WidthRouter, load_width_router, save_width_router
from comfyui_dynamic_dit.core.slicing import unit_indices

SMALL = CalibrationSpec(latent_size=(16, 16), text_tokens=4)
FAST = dict(steps=3, seed=5, cfg=2.0, height=16, width=16)
HEADS = GROUPS = 4  # the tiny model: 4 heads, MLP split into one group per head


def sample(model, conds, **settings):
    return tiny_flux.sample(model, *conds, **{**FAST, **settings})


def latest(model):
    return plan_of(model).telemetry.latest()


def router_for(model, head_bias, group_bias, weight_scale=0.0, seed=0, groups=None) -> WidthRouter:
    """A router whose logits are `bias(label)` plus `weight_scale` times random weights on the features."""
    header = RouterHeader.for_adapter(adapter_of(model), groups)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in header.expected_shapes().items():
        label, part, kind = key.rsplit(".", 2)
        if kind == "weight":
            tensors[key] = torch.randn(shape, generator=g) * weight_scale
        else:
            tensors[key] = torch.tensor((head_bias if part == "heads" else group_bias)(label), dtype=torch.float32)
    return WidthRouter(header, tensors, "test router")


def block_number(label: str) -> int:
    kind, index = label.split(".")
    return int(index) + (0 if kind == "double" else 2)


# --- off means identical --------------------------------------------------------------------------
FULL_CASES = {
    "full_width": lambda m: WidthSettings(noisy_width=1.0, clean_width=1.0),
    "rounds_to_every_unit": lambda m: WidthSettings(noisy_width=0.9, clean_width=0.95, calibration=SMALL),
    "outside_the_window": lambda m: WidthSettings(noisy_width=0.3, start_percent=0.9, end_percent=1.0, calibration=SMALL),
    "router_keeps_everything": lambda m: WidthSettings(router=router_for(m, lambda _: [1.0] * HEADS, lambda _: [2.0] * GROUPS)),
}


@pytest.mark.parametrize(
    "case,sampler", [(case, "euler") for case in FULL_CASES] + [("router_keeps_everything", "heun")]
)
def test_full_width_is_bit_identical(flux_model, conds, case, sampler):
    settings = FULL_CASES[case](flux_model)
    reference = sample(flux_model, conds, sampler=sampler, batch=2, cfg=2.5)
    patched = apply_settings(flux_model, settings)
    assert torch.equal(sample(patched, conds, sampler=sampler, batch=2, cfg=2.5), reference)
    run = latest(patched)
    if settings.enabled:  # the method ran, decided full width everywhere, and said so
        assert all(call.methods["width"].startswith("full width") for call in run.calls)
        executed = sum(call.executed.total - call.executed.extra for call in run.calls)  # the routers' own work aside
        assert executed == pytest.approx(run.full_flops, rel=1e-12)
    else:
        assert run.plan == "every method off"


# --- compute really removed -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "parts,fields",
    [("mlp", ("mlp",)), ("heads", ("qkv", "attention", "proj")), ("both", ("mlp", "qkv", "attention", "proj"))],
)
def test_half_width_halves_those_flops(flux_model, conds, parts, fields):
    model = apply_settings(flux_model, WidthSettings(noisy_width=0.5, clean_width=0.5, parts=parts, calibration=SMALL))
    sample(model, conds)  # calibrates once; the ranking is cached for these weights
    baseline = install_executor(flux_model)
    with torch.no_grad():
        full_measured, _ = measure_flops(lambda: sample(baseline, conds))
        measured, _ = measure_flops(lambda: sample(model, conds))
    run = latest(model)
    assert not any("calibrated" in call.methods["width"] for call in run.calls)
    full = sum((call.full for call in run.calls), ZERO)
    executed = sum((call.executed for call in run.calls), ZERO)
    assert executed.total == pytest.approx(measured, rel=0.01)
    assert full.total == pytest.approx(full_measured, rel=0.01)
    for name in ("embed", "modulation", "qkv", "attention", "proj", "mlp", "final"):
        expected = 0.5 * getattr(full, name) if name in fields else getattr(full, name)
        assert getattr(executed, name) == pytest.approx(expected, rel=0.02), name
    # what FlopCounterMode saw disappear is half of those parts of the full model
    assert full_measured - measured == pytest.approx(0.5 * sum(getattr(full, n) for n in fields), rel=0.02)
    expected_text = {"mlp": "mlp 0.50", "heads": "heads 0.50", "both": "heads 0.50, mlp 0.50"}[parts]
    assert all(call.methods["width"] == expected_text for call in run.calls)


def test_calibration_work_is_counted(flux_model, conds, monkeypatch):
    RANKINGS.clear()
    model = apply_settings(flux_model, WidthSettings(noisy_width=0.5, clean_width=0.5, calibration=SMALL))
    with torch.no_grad():
        measured, _ = measure_flops(lambda: sample(model, conds))
    run = latest(model)
    assert "calibrated 4 points" in run.calls[0].methods["width"]
    # the calibration is one-off setup, counted apart from the steps (not in step 0) and measured with them
    (setup,) = run.setup
    assert setup.name == "width calibration" and setup.flops > 0 and setup.call_index == run.calls[0].index
    assert run.executed_flops + run.setup_flops == pytest.approx(measured, rel=0.02)
    assert run.steps()[0].executed == pytest.approx(run.steps()[1].executed, rel=0.01)  # step 0 carries no calibration


# --- decisions ------------------------------------------------------------------------------------
def test_telemetry_reports_width_per_block_and_step(flux_model, conds):
    model = apply_settings(flux_model, WidthSettings(noisy_width=0.5, clean_width=1.0, parts="both", calibration=SMALL))
    sample(model, conds, steps=4, cfg=1.0)
    run = latest(model)
    # simple scheduler: the steps sit at 0, 25, 50 and 75% of the noise range
    fractions = [kept_count(ramp(0.5, 1.0, WidthSettings(), p), 4) / 4 for p in (0.0, 0.25, 0.5, 0.75)]
    assert fractions == [0.5, 0.75, 0.75, 1.0]
    texts = [step.methods["width"].split(";")[0] for step in run.steps()]
    assert texts == ["heads 0.50, mlp 0.50", "heads 0.75, mlp 0.75", "heads 0.75, mlp 0.75", "full width"]
    assert run.calls[1].blocks == {label: {"heads": 0.75, "mlp": 0.75} for label in run.calls[1].blocks}
    assert len(run.calls[1].blocks) == 6 and not run.calls[3].blocks
    assert "double.0 heads=0.5 mlp=0.5" in run.block_table()


def test_one_decision_per_sigma_shared_by_calls(flux_model, conds, monkeypatch):
    decided = []
    original = DynamicWidth._decide

    def spy(self, call, model_call, sigma, percent):
        decided.append((call.index if hasattr(call, "index") else call.record.index, sigma))
        return original(self, call, model_call, sigma, percent)

    monkeypatch.setattr(DynamicWidth, "_decide", spy)
    model = apply_settings(flux_model, WidthSettings(noisy_width=0.5, calibration=SMALL))
    sample(model, conds, sampler="heun", steps=3)
    run = latest(model)
    sigmas = [call.sigma for call in run.calls]
    assert len(sigmas) == 5  # heun: two evaluations per step, none into sigma 0
    # every sigma of the schedule is decided once, all in the first call; the other calls reuse them
    assert sorted(s for _, s in decided) == sorted(set(sigmas)) and {call for call, _ in decided} == {0}


def test_kept_units_are_selected_once_per_decision(flux_model, conds, monkeypatch):
    seen = []
    original_finish = DynamicWidth.finish

    def finish(self):
        seen.append([key for key in self.run.indices._entries if key[0] == "flux.width"])
        original_finish(self)

    monkeypatch.setattr(DynamicWidth, "finish", finish)
    model = apply_settings(flux_model, WidthSettings(noisy_width=0.5, clean_width=0.5, calibration=replace(SMALL, percents=(0.0,))))
    sample(model, conds, sampler="heun", steps=3)
    # one calibration point and a constant width: the same kept units per block in all five calls,
    # so one selection per distinct (heads, groups) pair, shared by every call that uses it
    keys = seen[0]
    assert 1 <= len(keys) <= len(adapter_of(flux_model).blocks) and len(set(keys)) == len(keys)


def test_at_least_one_head_and_group_per_block(flux_model, conds):
    model = apply_settings(flux_model, WidthSettings(noisy_width=0.01, clean_width=0.01, calibration=SMALL))
    out = sample(model, conds)
    assert torch.isfinite(out).all()
    call = latest(model).calls[0]
    assert call.methods["width"].startswith("heads 0.25, mlp 0.25")
    assert all(metrics == {"heads": 0.25, "mlp": 0.25} for metrics in call.blocks.values())


def test_target_flops_turns_into_a_ramp(flux_model, conds):
    model = apply_settings(flux_model, WidthSettings(target_flops=0.7, calibration=SMALL))
    sample(model, conds, steps=6)  # calibrates
    sample(model, conds, steps=6)
    run = latest(model)
    assert "target FLOPs 0.70: ramp" in run.calls[0].methods["width"]
    ratio = run.executed_flops / run.full_flops
    assert 0.6 < ratio <= 0.7
    widths = [float(step.methods["width"].split(",")[0].split()[1]) if "heads" in step.methods["width"] else 1.0 for step in run.steps()]
    assert widths == sorted(widths) and widths[0] < 1.0  # thinnest at the noisy end

    unreachable = apply_settings(flux_model, WidthSettings(target_flops=0.05, calibration=SMALL))
    sample(unreachable, conds, steps=6)
    run = latest(unreachable)
    assert "out of reach" in run.calls[0].methods["width"]
    assert all(call.methods["width"].startswith("heads 0.25, mlp 0.25") for call in run.calls)


# --- determinism ----------------------------------------------------------------------------------
def test_same_inputs_give_the_same_image_whatever_ran_before(flux_model, other_flux_model, conds):
    settings = WidthSettings(noisy_width=0.4, calibration=SMALL)
    baseline = sample(flux_model, conds, seed=3)
    RANKINGS.clear()
    first = sample(apply_settings(flux_model, settings), conds, seed=3)
    # other prompts, sizes, seeds and another model in between
    other_conds = tiny_flux.conditioning(tiny_flux.TinyFlux(), seed=9)
    sample(apply_settings(flux_model, settings), other_conds, seed=8, height=24, width=16)
    sample(apply_settings(other_flux_model, settings), conds, seed=3)
    again = sample(apply_settings(flux_model, settings), conds, seed=3)
    RANKINGS.clear()
    recalibrated = sample(apply_settings(flux_model, settings), conds, seed=3)
    assert torch.equal(first, again) and torch.equal(first, recalibrated)
    assert not torch.equal(first, baseline)
    assert torch.equal(sample(flux_model, conds, seed=3), baseline)  # calibration left the model alone


def test_calibration_is_cached_per_weights(flux_model, conds, monkeypatch):
    calls = []
    original = width_calibration.calibrate
    monkeypatch.setattr(width_calibration, "calibrate", lambda *a, **k: calls.append(1) or original(*a, **k))
    RANKINGS.clear()
    settings = WidthSettings(noisy_width=0.5, calibration=SMALL)
    sample(apply_settings(flux_model, settings), conds)
    sample(apply_settings(flux_model.clone(), settings), conds, seed=9)
    assert len(calls) == 1
    patched_weights = flux_model.clone()
    patched_weights.add_patches({"diffusion_model.double_blocks.0.img_attn.proj.weight": ("diff", (torch.zeros(256, 256),))})
    sample(apply_settings(patched_weights, settings), conds)
    assert len(calls) == 2  # another set of weight patches: calibrated again
    sample(apply_settings(flux_model, replace(settings, mlp_groups=8)), conds)
    assert len(calls) == 3  # another grouping


# --- the training-free ranking --------------------------------------------------------------------
def _captured_ranking(monkeypatch):
    captured = []
    original = width_calibration.calibrate

    def capture(*args, **kwargs):
        ranking = original(*args, **kwargs)
        captured.append(ranking)
        return ranking

    monkeypatch.setattr(width_calibration, "calibrate", capture)
    return captured


def _boosting_patches(arch) -> dict:
    """Weight patches that make head 2 of double.0 dominant and silence head 1; single.1: head 3 up, group 0 off."""
    d, hd = arch.hidden_size, arch.head_dim
    head = lambda h: unit_indices((h,), hd, torch.device("cpu"))  # noqa: E731
    patches = {}
    for stream in ("img", "txt"):
        key = f"diffusion_model.double_blocks.0.{stream}_attn.proj.weight"
        patches[key] = (head, [(2, 20.0), (1, 0.0)], None)
    patches["diffusion_model.single_blocks.1.linear2.weight"] = (head, [(3, 20.0)], d + unit_indices((0,), arch.mlp_hidden // 4, torch.device("cpu")))
    return patches


def _diff_patches(model, spec: dict) -> dict:
    state = model.model.state_dict()
    out = {}
    for key, (head, scales, zero_cols) in spec.items():
        weight = state[key].clone()
        target = weight.clone()
        for h, scale in scales:
            target[:, head(h)] *= scale
        if zero_cols is not None:
            target[:, zero_cols] = 0
        out[key] = ("diff", (target - weight,))
    return out


@pytest.mark.parametrize("lowvram", [False, True], ids=["loaded", "lowvram"])
def test_ranking_follows_the_patched_weights(tiny_config, conds, monkeypatch, request, lowvram):
    base = reference_model.build_model(tiny_config)
    arch = adapter_of(base).arch
    patched = base.clone()
    patched.add_patches(_diff_patches(base, _boosting_patches(arch)))
    captured = _captured_ranking(monkeypatch)
    if lowvram:  # the patches are applied on the fly by weight functions
        request.getfixturevalue("lowvram_loading")
    try:
        sample(apply_settings(base, WidthSettings(noisy_width=0.5, calibration=SMALL)), conds)
        sample(apply_settings(patched, WidthSettings(noisy_width=0.5, calibration=SMALL)), conds)
        if lowvram:
            proj = base.model.diffusion_model.double_blocks[0].img_attn.proj
            assert proj.comfy_cast_weights and proj.weight_function  # the patch is not merged into the weight
    finally:
        comfy.model_management.unload_all_models()
    plain, boosted = captured
    d0, s1 = 0, 2 + 1  # block rows: double.0, single.1
    for point in range(len(boosted.percents)):
        assert boosted.heads[point][d0][0] == 2 and boosted.heads[point][d0][-1] == 1
        assert boosted.heads[point][s1][0] == 3 and boosted.groups[point][s1][-1] == 0
    assert plain.heads != boosted.heads


# --- routers --------------------------------------------------------------------------------------
def kept_heads(label):
    i = block_number(label)
    return (i % 4, (i + 1) % 4)


def kept_groups(label):
    return ((block_number(label) + 2) % 4,)


def fixed_router(model):
    return router_for(
        model,
        lambda label: [1.0 if h in kept_heads(label) else -1.0 for h in range(HEADS)],
        lambda label: [1.0 if g in kept_groups(label) else -0.5 for g in range(GROUPS)],
    )


def masked_state_dict(model, arch):
    """The model's weights with every unit the fixed router drops cut off from the block outputs."""
    state = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    d, hd, size = arch.hidden_size, arch.head_dim, arch.mlp_hidden // GROUPS
    cpu = torch.device("cpu")
    for kind, depth in (("double", arch.depth_double), ("single", arch.depth_single)):
        for i in range(depth):
            label = f"{kind}.{i}"
            heads = unit_indices(tuple(h for h in range(HEADS) if h not in kept_heads(label)), hd, cpu)
            groups = unit_indices(tuple(g for g in range(GROUPS) if g not in kept_groups(label)), size, cpu)
            if kind == "double":
                for stream in ("img", "txt"):
                    state[f"double_blocks.{i}.{stream}_attn.proj.weight"][:, heads] = 0
                    state[f"double_blocks.{i}.{stream}_mlp.2.weight"][:, groups] = 0
            else:
                state[f"single_blocks.{i}.linear2.weight"][:, heads] = 0
                state[f"single_blocks.{i}.linear2.weight"][:, d + groups] = 0
    return state


def test_router_keeps_where_the_logit_is_positive(flux_model, conds, tiny_config):
    adapter = adapter_of(flux_model)
    model = apply_settings(flux_model, WidthSettings(router=fixed_router(flux_model)))
    out = sample(model, conds)
    oracle_model = reference_model.build_model(tiny_config, state_dict=masked_state_dict(flux_model, adapter.arch))
    torch.testing.assert_close(out, sample(oracle_model, conds), rtol=1e-4, atol=1e-4)
    call = latest(model).calls[0]
    assert call.blocks["double.1"] == {"heads": 0.5, "mlp": 0.25}
    assert call.methods["width"] == "heads 0.50, mlp 0.25"
    assert call.executed.extra > 0  # the routers' own matmuls


def test_router_decisions_depend_on_the_timestep_only(flux_model, conds):
    router = router_for(flux_model, lambda _: [0.0] * HEADS, lambda _: [0.0] * GROUPS, weight_scale=0.5, seed=3)
    model = apply_settings(flux_model, WidthSettings(router=router))
    sample(model, conds, steps=5)
    first = latest(model)
    other_conds = tiny_flux.conditioning(tiny_flux.TinyFlux(), seed=11, guidance=1.5)
    sample(model, other_conds, steps=5, seed=8)
    second = latest(model)
    per_step = lambda run: [(c.methods["width"], c.blocks) for c in run.calls]  # noqa: E731
    assert per_step(first) == per_step(second)
    assert len({str(blocks) for _, blocks in per_step(first)}) > 1  # the decision changes with the timestep


def test_router_parts_and_window(flux_model, conds):
    router = fixed_router(flux_model)
    heads_only = apply_settings(flux_model, WidthSettings(router=router, parts="heads"))
    sample(heads_only, conds)
    assert latest(heads_only).calls[0].blocks["double.1"] == {"heads": 0.5}
    windowed = apply_settings(flux_model, WidthSettings(router=router, start_percent=0.5))
    sample(windowed, conds)
    texts = [c.methods["width"] for c in latest(windowed).calls]
    assert texts[0].startswith("full width") and texts[-1] == "heads 0.50, mlp 0.25"


# --- router files ---------------------------------------------------------------------------------
def test_router_file_round_trip(flux_model, tmp_path):
    router = router_for(flux_model, lambda _: [0.5, -1, 2, 0], lambda _: [1, 1, -1, 0], weight_scale=0.1)
    path = tmp_path / "router.safetensors"
    save_width_router(path, router)
    loaded = load_width_router(path)
    assert loaded.header == router.header
    assert torch.equal(loaded.head_weight, router.head_weight) and torch.equal(loaded.group_bias, router.group_bias)
    loaded.check(adapter_of(flux_model))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "dynamic_dit.width_router" and meta["version"] == "1"
    assert (meta["architecture"], meta["depth_double"], meta["depth_single"], meta["features"]) == ("flux", "2", "4", "time_in")


def _write(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _broken(kind, model, tmp_path):
    router = fixed_router(model)
    tensors, meta = router.tensors(), router.header.metadata()
    path = tmp_path / f"{kind}.safetensors"
    if kind == "missing_key":
        del tensors["single.3.mlp.bias"]
    elif kind == "unexpected_key":
        tensors["single.9.heads.bias"] = torch.zeros(4)
    elif kind == "wrong_shape":
        tensors["double.1.heads.weight"] = torch.zeros(4, 255)
    elif kind == "integer_dtype":
        tensors["double.0.mlp.bias"] = torch.zeros(4, dtype=torch.int64)
    elif kind == "nan":
        tensors["double.0.mlp.bias"] = torch.tensor([0.0, math.nan, 1.0, 1.0])
    elif kind == "not_a_router":
        meta["format"] = "dynamic_dit.td_lora"
    elif kind == "no_metadata":
        meta = {}
    elif kind == "newer_version":
        meta["version"] = "2"
    elif kind == "bad_number":
        meta["num_heads"] = "four"
    elif kind == "groups_do_not_divide":
        meta["mlp_groups"] = "3"
    elif kind in ("corrupt", "truncated"):
        _write(path, tensors, meta)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\x00garbage" + data[8:])
        return path
    return _write(path, tensors, meta)


BROKEN = {
    "missing_key": "1 tensor\\(s\\) missing, e.g. single.3.mlp.bias",
    "unexpected_key": "unexpected tensor\\(s\\) single.9.heads.bias",
    "wrong_shape": "'double.1.heads.weight' has shape \\(4, 255\\), expected \\(4, 256\\)",
    "integer_dtype": "'double.0.mlp.bias' has dtype torch.int64",
    "nan": "'double.0.mlp.bias' contains NaN",
    "not_a_router": "not a Dynamic DiT width router: its metadata 'format' is 'dynamic_dit.td_lora'",
    "no_metadata": "not a Dynamic DiT width router: it has no 'format' metadata",
    "newer_version": "format version 2; this pack reads version 1. Update",
    "bad_number": "'num_heads' must be an integer, found 'four'",
    "groups_do_not_divide": "3 MLP groups do not divide the 1024",
    "corrupt": "is not a readable safetensors file",
    "truncated": "is not a readable safetensors file",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_router_files_are_refused_clearly(flux_model, tmp_path, kind):
    with pytest.raises(ValueError, match=BROKEN[kind]):
        load_width_router(_broken(kind, flux_model, tmp_path))


def test_router_for_another_model_is_refused(flux_model, other_flux_model):
    before = dict(flux_model.model_options)
    router = router_for(other_flux_model, lambda _: [1.0] * 3, lambda _: [1.0] * 3)
    with pytest.raises(ValueError, match="made for flux with hidden size 192, 3 heads.*this model is flux with hidden size 256, 4 heads"):
        apply_settings(flux_model, WidthSettings(router=router))
    assert flux_model.model_options == before


# --- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings,message",
    [
        (WidthSettings(noisy_width=0.0), r"noisy_width must be in \(0, 1\]"),
        (WidthSettings(clean_width=1.5), r"clean_width must be in \(0, 1\]"),
        (WidthSettings(start_percent=0.6, end_percent=0.4), "start_percent < end_percent"),
        (WidthSettings(end_percent=1.2), "end_percent <= 1"),
        (WidthSettings(target_flops=0.0), r"target_flops must be in \(0, 1\]"),
        (WidthSettings(parts="attention"), "parts must be one of both, heads, mlp"),
        (WidthSettings(mlp_groups=3), "3 MLP groups must divide the model's 1024 MLP hidden units"),
        (WidthSettings(mlp_groups=-1), "mlp_groups must be >= 0"),
        (WidthSettings(calibration=CalibrationSpec(percents=(0.5, 0.2))), "calibration percents must increase"),
    ],
)
def test_bad_settings_raise_and_nothing_is_patched(flux_model, settings, message):
    before = dict(flux_model.model_options)
    with pytest.raises(ValueError, match=message):
        apply_settings(flux_model, settings)
    assert flux_model.model_options == before


def test_router_and_target_do_not_mix(flux_model):
    with pytest.raises(ValueError, match="either a router or a target FLOPs ratio"):
        apply_settings(flux_model, WidthSettings(router=fixed_router(flux_model), target_flops=0.5))


def test_schedule_helpers():
    settings = WidthSettings(start_percent=0.2, end_percent=0.6)
    assert ramp(0.5, 1.0, settings, 0.1) == 1.0 and ramp(0.5, 1.0, settings, 0.7) == 1.0
    assert ramp(0.5, 1.0, settings, 0.2) == 0.5 and ramp(0.5, 1.0, settings, 0.4) == pytest.approx(0.75)
    assert [kept_count(f, 24) for f in (0.0, 0.01, 0.5, 0.51, 0.99, 1.0)] == [1, 1, 12, 12, 24, 24]
    assert not WidthSettings(noisy_width=1.0).enabled and not WidthSettings(target_flops=1.0).enabled
    assert WidthSettings(noisy_width=1.0, clean_width=0.8).enabled
    assert WidthSettings().describe() == "width heads+MLP 0.50->1.00"
    assert WidthSettings(target_flops=0.6, parts="mlp", start_percent=0.1).describe() == "width MLP target FLOPs 0.60 in 10%-100%"


def test_benchmark_case(flux_model):
    from comfyui_dynamic_dit.devtools.bench.cases import parse_cases

    (case,) = parse_cases("width:0.4")
    assert case.name == "width 0.4"
    settings = plan_of(case.build(flux_model)).settings["width"]
    assert (settings.noisy_width, settings.clean_width, settings.parts, settings.start_percent, settings.end_percent) == (0.4, 0.4, "both", 0.0, 1.0)


def test_the_default_group_count_divides_the_mlp():
    """One group per head where that divides the MLP (Flux: 24 of 12288); else the nearest divisor (Z-Image: 30 heads,
    10240 units -> 32); a tie goes to the larger count."""
    from comfyui_dynamic_dit.methods.width.settings import default_group_count

    assert default_group_count(24, 12288) == 24 and default_group_count(30, 10240) == 32
    assert default_group_count(3, 8) == 4 and 10240 % default_group_count(30, 10240) == 0
