"""Trained coarse-patch embedding files: strict validation, and the trained path checked against the
host's own forward through layers whose effect is known exactly."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from comfyui_dynamic_dit.families import adapter_for
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import CALL_KEY, apply_settings, plan_of
from comfyui_dynamic_dit.core.executor import ModelCall, RunContext
from comfyui_dynamic_dit.core.flops import measure_flops
from comfyui_dynamic_dit.methods.patch_scheduler.file import (
    CoarseLayers,
    derived_layers,
    load_patch_embedding_file,
    save_patch_embedding_file,
)
from comfyui_dynamic_dit.methods.patch_scheduler.settings import PatchSchedulerSettings
from comfyui_dynamic_dit.methods.patch_scheduler.schedule import parse_schedule


def grid_of(model_patcher):
    return adapter_for(model_patcher.model.diffusion_model, "Flux").coarse_grid()


def native_layers(model_patcher, factor, resize="area"):
    dm = model_patcher.model.diffusion_model
    return derived_layers(dm.img_in.weight, dm.img_in.bias, dm.final_layer.linear.weight, dm.final_layer.linear.bias,
                          dm.patch_size, factor, resize)


@pytest.fixture
def embedding_path(tmp_path, flux_model):
    path = tmp_path / "coarse.safetensors"
    save_patch_embedding_file(path, grid_of(flux_model).file_fields(), {2: native_layers(flux_model, 2), 4: native_layers(flux_model, 4)})
    return path


def test_round_trip(embedding_path, flux_model):
    loaded = load_patch_embedding_file(embedding_path)
    assert loaded.factors == (2, 4)
    assert loaded.model == grid_of(flux_model).file_fields()
    assert torch.equal(loaded.layers[4].deembed_weight, native_layers(flux_model, 4).deembed_weight)
    assert loaded.describe() == "coarse.safetensors (2x, 4x)"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t, m: (t, {**m, "format": "dynamic_dit.token_router"}), "this is not a patch embedding file"),
        (lambda t, m: (t, {**m, "version": "7"}), "format version '7' is not supported"),
        (lambda t, m: (t, {**m, "factors": "2,3"}), "each factor must be one of \\(2, 4\\)"),
        (lambda t, m: (t, {k: v for k, v in m.items() if k != "hidden_size"}), "metadata has no 'hidden_size'"),
        (lambda t, m: ({k: v for k, v in t.items() if k != "factor2.patch_id"}, m), "missing tensor 'factor2.patch_id'"),
        (lambda t, m: ({**t, "factor4.embed.weight": t["factor4.embed.weight"].T.contiguous()}, m),
         "'factor4.embed.weight' has shape \\(1024, 256\\), expected \\(256, 1024\\)"),
        (lambda t, m: ({**t, "factor2.embed.bias": t["factor2.embed.bias"].long()}, m), "dtype torch.int64"),
        (lambda t, m: ({**t, "factor2.patch_id": torch.full((256,), float("nan"))}, m), "NaN or infinite"),
        (lambda t, m: (t, {**m, "version": "1"}), "format version '1' is not supported \\(this pack reads version 2\\)"),
        (lambda t, m: ({**t, "factor2.lora.double.0.img_mlp.0.down": torch.zeros(4, 256)}, m), "needs both .down and .up"),
        (lambda t, m: ({**t, "factor2.lora.single.1.linear2.down": torch.zeros(4, 256),
                        "factor2.lora.single.1.linear2.up": torch.zeros(256, 3)}, m), "are not \\(r, in\\) and \\(out, r\\)"),
        (lambda t, m: ({**t, "factor8.embed.bias": torch.zeros(256)}, m), "unexpected tensor 'factor8.embed.bias'"),
    ],
    ids=["format", "version", "factors", "metadata", "missing", "shape", "dtype", "nan", "version1", "lora_half", "lora_rank", "extra"],
)
def test_bad_files_are_explained(embedding_path, corrupt, message):
    from safetensors import safe_open

    with safe_open(str(embedding_path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors, metadata = corrupt(load_file(str(embedding_path)), metadata)
    save_file(tensors, str(embedding_path), metadata=metadata)
    with pytest.raises(ValueError, match=f"Patch embedding 'coarse.safetensors': .*{message}"):
        load_patch_embedding_file(embedding_path)


def test_truncated_and_missing_files_are_explained(embedding_path, tmp_path):
    data = embedding_path.read_bytes()
    embedding_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Patch embedding 'coarse.safetensors' is not a readable safetensors file .*truncated"):
        load_patch_embedding_file(embedding_path)
    with pytest.raises(ValueError, match="was not found"):
        load_patch_embedding_file(tmp_path / "nothing.safetensors")


def test_a_file_for_another_model_is_refused(tmp_path, flux_model, other_flux_model):
    path = tmp_path / "other.safetensors"
    save_patch_embedding_file(path, grid_of(other_flux_model).file_fields(), {2: native_layers(other_flux_model, 2)})
    settings = PatchSchedulerSettings(embedding=load_patch_embedding_file(path))
    before = dict(flux_model.model_options)
    with pytest.raises(ValueError, match="was made for another model: hidden_size is 192 in the file, 256 in this model"):
        apply_settings(flux_model, settings)
    assert flux_model.model_options == before


def test_a_schedule_needing_factors_the_file_lacks_is_refused(tmp_path, flux_model):
    path = tmp_path / "two.safetensors"
    save_patch_embedding_file(path, grid_of(flux_model).file_fields(), {2: native_layers(flux_model, 2)})
    embedding = load_patch_embedding_file(path)
    with pytest.raises(ValueError, match="asks for 4x patches, but the embedding 'two.safetensors' holds only 2x"):
        apply_settings(flux_model, PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-50%:4"), embedding=embedding))
    with pytest.raises(ValueError, match="all above the max patch factor 1"):
        PatchSchedulerSettings(max_factor=1, embedding=embedding).validate(adapter_for(flux_model.model.diffusion_model, "Flux"))
    assert PatchSchedulerSettings(embedding=embedding).candidate_factors() == (2,)


# --- the trained path, one call through the real executor and block patches --------------------------
def trained_call(flux_model, embedding, factor, x, t):
    dm = flux_model.model.diffusion_model
    settings = PatchSchedulerSettings(mode="manual", schedule=parse_schedule(f"0-100%:{factor}"), embedding=embedding)
    patched = apply_settings(flux_model, settings)
    adapter = adapter_for(dm, "Flux")
    run = RunContext(plan_of(patched), adapter, [t, 0.0], latent_shape=tuple(x.shape), model_name="tiny", device="cpu")
    generator = torch.Generator().manual_seed(3)
    arguments = {"x": x, "timestep": torch.full((x.shape[0],), t), "context": torch.randn(x.shape[0], 8, 64, generator=generator),
                 "y": torch.randn(x.shape[0], 32, generator=generator), "guidance": torch.full((x.shape[0],), 3.5),
                 "ref_latents": None, "control": None, "kwargs": {}}
    call = run.begin_call(t, [0], None, adapter.call_layout(arguments), dm)
    arguments["transformer_options"] = {**patched.model_options["transformer_options"], CALL_KEY: call}

    def invoke(a):
        return dm._forward(a["x"], a["timestep"], a["context"], a["y"], a["guidance"], a["ref_latents"], a["control"],
                           a["transformer_options"], **a["kwargs"])

    with torch.no_grad():
        measured, out = measure_flops(lambda: run.model_call(call, ModelCall(arguments, invoke)))
    return out, call, arguments, measured


def expected_trained_call(dm, flux_model, x, t, factor, arguments):
    """What area-derived layers compute: the host's forward on the area-downsampled latent brought to the coarse
    noise level (D x / c at flow time t'), its velocity upsampled bilinearly plus (the area-derived de-embedding)
    each output pixel repeated f x f, combined with the input latent as v = (x - U D x / c) / t + (t' / t) (...)."""
    size = 2 * factor
    height, width = x.shape[-2:]
    down = F.avg_pool2d(F.pad(x, (0, -width % size, 0, -height % size), mode="replicate"), factor)
    scale = 1 - t + t / factor
    t_coarse = (t / factor) / scale
    host = dm._forward(down / scale, torch.full_like(arguments["timestep"], t_coarse), arguments["context"], arguments["y"],
                       arguments["guidance"], transformer_options=grid_of(flux_model).coarse_options({}, factor))
    # the host's own last linear upsampled bilinearly, plus the file's de-embedding (area-derived: nearest)
    coarse = (F.interpolate(host, scale_factor=factor, mode="bilinear", align_corners=False)
              + F.interpolate(host, scale_factor=factor, mode="nearest"))[..., :height, :width]
    smooth = F.interpolate(down, scale_factor=factor, mode="bilinear", align_corners=False)[..., :height, :width]
    return (x - smooth / scale) / t + (t_coarse / t) * coarse


@pytest.mark.parametrize("factor", [2, 4])
def test_trained_path_matches_the_host_on_the_downsampled_latent(flux_model, embedding_path, factor):
    """Area-derived layers make the trained path compute exactly `expected_trained_call`."""
    dm = flux_model.model.diffusion_model
    x = torch.randn(2, 16, 21, 30, generator=torch.Generator().manual_seed(2))
    t = 0.8
    out, call, arguments, measured = trained_call(flux_model, load_patch_embedding_file(embedding_path), factor, x, t)

    with torch.no_grad():
        expected = expected_trained_call(dm, flux_model, x, t, factor, arguments)
    assert out.shape == x.shape
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert call.record.methods["patch_scheduler"] == f"patch {factor}x (manual 0-100%)"
    assert call.record.executed.extra > 0
    assert call.record.executed.total == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("factor", [2, 4])
def test_area_embedding_and_zero_deembedding_are_the_training_free_path(tmp_path, flux_model, factor):
    """A trainer starts from the scheduler's training-free coarse call: exactly that, with such a file."""
    layers = native_layers(flux_model, factor)
    zero = CoarseLayers(layers.embed_weight, layers.embed_bias, layers.patch_id,
                        torch.zeros_like(layers.deembed_weight), torch.zeros_like(layers.deembed_bias))
    save_patch_embedding_file(tmp_path / "zero.safetensors", grid_of(flux_model).file_fields(), {factor: zero})
    x = torch.randn(2, 16, 21, 30, generator=torch.Generator().manual_seed(4))
    trained, *_ = trained_call(flux_model, load_patch_embedding_file(tmp_path / "zero.safetensors"), factor, x, 0.6)
    free, call, *_ = trained_call(flux_model, None, factor, x, 0.6)
    assert call.record.methods["patch_scheduler"] == f"patch {factor}x (manual 0-100%)"
    torch.testing.assert_close(trained, free, rtol=1e-4, atol=1e-4)


def test_the_patch_size_identifier_is_added_to_every_coarse_token(tmp_path, flux_model):
    layers = native_layers(flux_model, 2)
    marker = torch.randn(256, generator=torch.Generator().manual_seed(5))
    as_identifier = CoarseLayers(layers.embed_weight, layers.embed_bias, marker, layers.deembed_weight, layers.deembed_bias)
    as_bias = CoarseLayers(layers.embed_weight, layers.embed_bias + marker, torch.zeros(256), layers.deembed_weight, layers.deembed_bias)
    fields = grid_of(flux_model).file_fields()
    outputs = []
    for name, variant in (("id", as_identifier), ("bias", as_bias), ("plain", layers)):
        save_patch_embedding_file(tmp_path / f"{name}.safetensors", fields, {2: variant})
        x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
        outputs.append(trained_call(flux_model, load_patch_embedding_file(tmp_path / f"{name}.safetensors"), 2, x, 0.9)[0])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-3)


def test_trained_file_in_a_sampling_run(flux_model, conds, embedding_path):
    settings = PatchSchedulerSettings(mode="manual", schedule=parse_schedule("0-50%:4, 50-75%:2"),
                                      embedding=load_patch_embedding_file(embedding_path))
    model = apply_settings(flux_model, settings)
    with torch.no_grad():
        measured, out = measure_flops(lambda: tiny_flux.sample(model, *conds, steps=4, cfg=2.0, batch=2, height=22, width=26, seed=3))
    assert out.shape == (2, 16, 22, 26) and torch.isfinite(out).all()
    run = plan_of(model).telemetry.latest()
    assert run.executed_flops == pytest.approx(measured, rel=0.02)
    assert [s.methods["patch_scheduler"][:8] for s in run.steps()] == ["patch 4x", "patch 4x", "patch 2x", "native ("]
    assert "with coarse.safetensors" in run.plan


# --- version 2: block LoRA on coarse calls only ------------------------------------------------------
def block_lora(flux_model, rank=3, seed=9):
    """A LoRA on two linears of the first double block (down (r, in), up (out, r))."""
    generator = torch.Generator().manual_seed(seed)
    block = flux_model.model.diffusion_model.double_blocks[0]
    lora = {}
    for name in ("img_attn.qkv", "img_mlp.2"):
        out_features, in_features = block.get_submodule(name).weight.shape
        lora[name] = (torch.randn(rank, in_features, generator=generator) * 0.05, torch.randn(out_features, rank, generator=generator) * 0.05)
    return {"double.0": lora}


def test_block_lora_round_trips_and_unknown_linears_are_refused(tmp_path, flux_model):
    lora = block_lora(flux_model)
    path = tmp_path / "lora.safetensors"
    save_patch_embedding_file(path, grid_of(flux_model).file_fields(), {2: native_layers(flux_model, 2)}, {2: lora})
    loaded = load_patch_embedding_file(path)
    for name, (down, up) in lora["double.0"].items():
        assert torch.equal(loaded.lora[2]["double.0"][name][0], down) and torch.equal(loaded.lora[2]["double.0"][name][1], up)
    bad = tmp_path / "bad.safetensors"
    save_patch_embedding_file(bad, grid_of(flux_model).file_fields(), {2: native_layers(flux_model, 2)},
                              {2: {"double.0": {"img_attn.nothing": lora["double.0"]["img_mlp.2"]}, "single.99": {}}})
    with pytest.raises(ValueError, match="block LoRA for block single.99|has no linear img_attn.nothing"):
        apply_settings(flux_model, PatchSchedulerSettings(embedding=load_patch_embedding_file(bad)))


def test_block_lora_acts_as_merged_weights_on_coarse_calls(tmp_path, flux_model):
    """The file's block LoRA on a coarse call equals the host's forward with (up @ down) merged into those weights."""
    dm = flux_model.model.diffusion_model
    lora = block_lora(flux_model)
    path = tmp_path / "lora.safetensors"
    save_patch_embedding_file(path, grid_of(flux_model).file_fields(), {2: native_layers(flux_model, 2)}, {2: lora})
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    t = 0.7
    out, call, arguments, measured = trained_call(flux_model, load_patch_embedding_file(path), 2, x, t)
    assert call.record.executed.total == pytest.approx(measured, rel=0.02)  # the bypass FLOPs are counted

    block = dm.double_blocks[0]
    saved = {name: block.get_submodule(name).weight.detach().clone() for name in lora["double.0"]}
    try:
        with torch.no_grad():
            for name, (a, b) in lora["double.0"].items():
                block.get_submodule(name).weight.add_(b @ a)
            expected = expected_trained_call(dm, flux_model, x, t, 2, arguments)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                block.get_submodule(name).weight.copy_(weight)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    save_patch_embedding_file(tmp_path / "plain.safetensors", grid_of(flux_model).file_fields(), {2: native_layers(flux_model, 2)})
    plain, *_ = trained_call(flux_model, load_patch_embedding_file(tmp_path / "plain.safetensors"), 2, x, t)
    assert not torch.allclose(out, plain, atol=1e-3)  # the LoRA did act


def test_block_lora_leaves_native_steps_alone(tmp_path, flux_model, conds):
    """No coarse step in the run (4 steps at 0/25/50/75 %, coarse only from 90 %): the LoRA never acts and the
    run is bit-identical to the unpatched model's."""
    path = tmp_path / "with.safetensors"
    save_patch_embedding_file(path, grid_of(flux_model).file_fields(), {2: native_layers(flux_model, 2)}, {2: block_lora(flux_model)})
    settings = PatchSchedulerSettings(mode="manual", schedule=parse_schedule("90-100%:2"), embedding=load_patch_embedding_file(path))
    with torch.no_grad():
        patched = tiny_flux.sample(apply_settings(flux_model, settings), *conds, steps=4, cfg=2.0, height=16, width=16, seed=3)
        plain = tiny_flux.sample(flux_model, *conds, steps=4, cfg=2.0, height=16, width=16, seed=3)
    assert torch.equal(patched, plain)


def test_trained_schedule_comes_from_the_header(tmp_path, flux_model):
    fields = grid_of(flux_model).file_fields()
    save_patch_embedding_file(tmp_path / "trained.safetensors", fields, {2: native_layers(flux_model, 2)},
                              metadata={"coarse_schedule": "0-60%:2"})
    assert load_patch_embedding_file(tmp_path / "trained.safetensors").trained_schedule() == parse_schedule("0-60%:2")
    save_patch_embedding_file(tmp_path / "plain.safetensors", fields, {2: native_layers(flux_model, 2)})
    with pytest.raises(ValueError, match="'plain.safetensors' does not say which steps it was trained for"):
        load_patch_embedding_file(tmp_path / "plain.safetensors").trained_schedule()
