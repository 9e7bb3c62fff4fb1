"""The patch scheduler's settings, the coarse-grid positions against ComfyUI's own `process_img`, and
the algebra of a coarse call (its statistics: test_patch_statistics.py, manual schedules: test_patch_schedule.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_dynamic_dit.families import adapter_for
from comfyui_dynamic_dit.core.executor import ModelCall, RunContext
from comfyui_dynamic_dit.methods.patch_scheduler.file import derived_layers, resize_matrix
from comfyui_dynamic_dit.methods.patch_scheduler.schedule import parse_schedule
from comfyui_dynamic_dit.methods.patch_scheduler.settings import PatchSchedulerSettings
from comfyui_dynamic_dit.core.plan import DynamicPlan


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- settings -----------------------------------------------------------------------------------------
def test_settings_that_ask_for_no_coarse_step_are_off():
    assert not PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-100%:1")).enabled
    assert not PatchSchedulerSettings(max_factor=1).enabled
    assert not PatchSchedulerSettings(tau=0.0).enabled
    assert not PatchSchedulerSettings(start_percent=0.5, end_percent=0.5).enabled
    assert PatchSchedulerSettings().enabled
    assert PatchSchedulerSettings(max_factor=2).candidate_factors() == (2,)


@pytest.mark.parametrize(
    "settings, message",
    [
        (PatchSchedulerSettings(mode="fast"), "mode must be one of auto, manual"),
        (PatchSchedulerSettings(tau=-1.0), "tau must be a finite number >= 0"),
        (PatchSchedulerSettings(epsilon=1.5), "percentile must be between 0 and 1"),
        (PatchSchedulerSettings(max_factor=3), "max patch factor must be 1, 2 or 4"),
        (PatchSchedulerSettings(last_native_steps=-1), "cannot be negative"),
        (PatchSchedulerSettings(start_percent=0.8, end_percent=0.2), "0 <= start <= end <= 1"),
        (PatchSchedulerSettings(mode="manual"), "manual mode needs a schedule"),
    ],
)
def test_settings_validation(flux_model, settings, message):
    adapter = adapter_for(flux_model.model.diffusion_model, "Flux")
    with pytest.raises(ValueError, match=message):
        settings.validate(adapter)


# --- positions: checked against ComfyUI's Flux.process_img ----------------------------------------
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("user_rope", [None, {"scale_x": 1.5, "shift_x": 0.25, "scale_y": 0.5, "shift_y": -1.0, "shift_t": 2.0}])
def test_coarse_tokens_sit_at_the_centre_of_the_native_tokens_they_cover(flux_model, factor, user_rope):
    model = flux_model.model.diffusion_model
    grid = adapter_for(model, "Flux").coarse_grid()
    options = {"rope_options": dict(user_rope)} if user_rope else {}
    before = {k: dict(v) for k, v in options.items()}
    native = model.process_img(torch.zeros(1, 16, 32, 24), transformer_options=options)[1]  # (1, 16*12, 3)
    coarse_options = grid.coarse_options(options, factor)
    coarse = model.process_img(torch.zeros(1, 16, 32 // factor, 24 // factor), transformer_options=coarse_options)[1]
    assert options == before  # the caller's options (and their rope_options) are left alone
    rows, cols = 16 // factor, 12 // factor
    centres = native.reshape(16, 12, 3).reshape(rows, factor, cols, factor, 3).mean(dim=(1, 3)).reshape(1, -1, 3)
    assert coarse.shape == (1, rows * cols, 3)
    assert torch.allclose(coarse, centres, atol=1e-5)


def test_calls_tied_to_the_native_grid_are_refused(flux_model):
    model = flux_model.model.diffusion_model
    grid = adapter_for(model, "Flux").coarse_grid()
    ref = [torch.zeros(1, 16, 8, 8)]
    assert grid.refusal({"control": {"input": [None]}}, model).startswith("ControlNet")
    assert grid.refusal({"kwargs": {"attention_mask": torch.ones(1, 4)}}, model).startswith("the attention mask")
    assert grid.refusal({"ref_latents": ref, "kwargs": {"ref_latents_method": "uxo"}}, model).startswith("'uxo'")
    assert grid.refusal({"ref_latents": ref, "kwargs": {}}, model) is None
    assert grid.refusal({"control": None, "kwargs": {}}, model) is None
    assert grid.sampling_refusal(flux_model.model.model_sampling) is None

    class ScaledTimestep(torch.nn.Module):  # e.g. a sampling that feeds the model t = 1000 sigma
        def timestep(self, sigma):
            return sigma * 1000

    assert "not Flux's timestep = sigma" in grid.sampling_refusal(ScaledTimestep())


# --- the algebra of a training-free coarse call -------------------------------------------------------
def run_one_call(flux_model, settings, arguments, proceed, sigma):
    model = flux_model.model.diffusion_model
    adapter = adapter_for(model, "Flux")
    settings.validate(adapter)
    run = RunContext(DynamicPlan({settings.method: settings}), adapter, [sigma, 0.0],
                     latent_shape=tuple(arguments["x"].shape), model_name="tiny", device="cpu")
    call = run.begin_call(sigma, [0], None, adapter.call_layout(arguments), model)
    return run.model_call(call, ModelCall(arguments, proceed)), call


@pytest.mark.parametrize("factor", [2, 4])
def test_an_ideal_coarse_denoiser_gives_the_exact_native_velocity(flux_model, factor):
    """The coarse latent must be a proper flow sample of the downsampled clean latent at the shifted
    time, and the residual path must carry the full-resolution noise: with a coarse model that
    answers the exact coarse velocity, the native velocity comes out exact."""
    t = 0.7
    x0 = torch.randn(2, 16, 1, 1, generator=gen(1)).expand(2, 16, 20, 28)  # no detail finer than a patch
    noise = torch.randn(2, 16, 20, 28, generator=gen(2))
    x = (1 - t) * x0 + t * noise
    seen = {}

    def coarse_model(arguments):
        z, t_coarse = arguments["x"], arguments["timestep"]
        seen.update(z=z, t=t_coarse, options=arguments["transformer_options"])
        x0_coarse = x0[:, :, : z.shape[-2], : z.shape[-1]]  # D x0 of a constant image
        return (z - x0_coarse) / t_coarse.reshape(-1, 1, 1, 1)

    settings = PatchSchedulerSettings(mode="manual", schedule=parse_schedule(f"0-100%:{factor}"))
    arguments = {"x": x, "timestep": torch.full((2,), t), "context": torch.zeros(2, 8, 64), "y": None, "guidance": None,
                 "ref_latents": None, "control": None, "transformer_options": {"rope_options": {"scale_x": 2.0}}, "kwargs": {}}
    velocity, call = run_one_call(flux_model, settings, arguments, coarse_model, t)
    assert torch.allclose(velocity, noise - x0, atol=1e-5)
    assert call.record.methods["patch_scheduler"] == f"patch {factor}x (manual 0-100%)"

    scale = 1 - t + t / factor
    t_coarse = (t / factor) / scale
    assert torch.allclose(seen["t"], torch.full((2,), t_coarse))
    size = 2 * factor
    rows, cols = math.ceil(20 / size), math.ceil(28 / size)
    assert seen["z"].shape == (2, 16, rows * 2, cols * 2)
    # the coarse noise is white with unit variance once divided by the shifted time: a proper flow sample
    padded = F.pad(noise, (0, cols * size - 28, 0, rows * size - 20), mode="replicate")
    coarse_noise = F.avg_pool2d(padded, factor) * factor
    assert torch.allclose(seen["z"], (1 - t_coarse) * x0[:, :, : rows * 2, : cols * 2] + t_coarse * coarse_noise, atol=1e-5)
    assert seen["options"]["rope_options"] == {"scale_x": 2.0 * factor, "shift_x": (factor - 1), "scale_y": float(factor),
                                               "shift_y": (factor - 1) / 2}
    assert arguments["transformer_options"] == {"rope_options": {"scale_x": 2.0}}


def test_pure_noise_stays_unit_noise_on_the_coarse_grid(flux_model):
    noise = torch.randn(1, 16, 64, 64, generator=gen(4))
    seen = {}

    def coarse_model(arguments):
        seen["z"], seen["t"] = arguments["x"], arguments["timestep"]
        return torch.zeros_like(arguments["x"])

    settings = PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-100%:4"))
    arguments = {"x": noise, "timestep": torch.ones(1), "context": torch.zeros(1, 8, 64), "y": None, "guidance": None,
                 "ref_latents": None, "control": None, "transformer_options": {}, "kwargs": {}}
    run_one_call(flux_model, settings, arguments, coarse_model, 1.0)
    assert seen["t"].item() == pytest.approx(1.0)
    assert seen["z"].std().item() == pytest.approx(1.0, rel=0.05)
    assert seen["z"].mean().abs().item() < 0.05


# --- coarse layers derived from the native ones ---------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 4])
def test_resize_pairs_are_exact_inverses(factor):
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(resize_matrix(2, factor, "area") @ resize_matrix(2, factor, "nearest"), eye)
    assert torch.allclose(resize_matrix(2, factor, "pinv_bilinear") @ resize_matrix(2, factor, "bilinear"), eye)
    # area downsampling keeps white noise white at std 1/f; the PI-resize colours and amplifies it
    area, pinv = resize_matrix(2, factor, "area"), resize_matrix(2, factor, "pinv_bilinear")
    assert torch.allclose(area @ area.T, eye / factor**2)
    assert (pinv @ pinv.T).diagonal().min() > 1.2 / factor**2


@pytest.mark.parametrize("resize", ["area", "pinv_bilinear"])
def test_derived_embedding_is_the_native_embedding_of_the_resized_patch(flux_model, resize):
    model = flux_model.model.diffusion_model
    factor, patch = 2, 2
    layers = derived_layers(model.img_in.weight, model.img_in.bias, model.final_layer.linear.weight,
                            model.final_layer.linear.bias, patch, factor, resize)
    coarse_patch = torch.randn(3, 16, 4, 4, generator=gen(8))
    down = {"area": lambda x: F.avg_pool2d(x, 2),
            "pinv_bilinear": lambda x: (resize_matrix(2, 2, "pinv_bilinear").float() @ x.reshape(3, 16, 16, 1)).reshape(3, 16, 2, 2)}
    expected = model.img_in(down[resize](coarse_patch).reshape(3, -1))
    assert torch.allclose(F.linear(coarse_patch.reshape(3, -1), layers.embed_weight, layers.embed_bias), expected, atol=1e-5)
    hidden = torch.randn(3, 256, generator=gen(9))
    native_out = model.final_layer.linear(hidden).reshape(3, 16, 2, 2)
    up = {"area": lambda y: F.interpolate(y, scale_factor=2, mode="nearest"),
          "pinv_bilinear": lambda y: (resize_matrix(2, 2, "bilinear").float() @ y.reshape(3, 16, 4, 1)).reshape(3, 16, 4, 4)}
    deembedded = F.linear(hidden, layers.deembed_weight, layers.deembed_bias).reshape(3, 16, 4, 4)
    assert torch.allclose(deembedded, up[resize](native_out), atol=1e-5)
