"""The benchmark: case syntax, fidelity metrics, end-to-end runs on the reference model, a ComfyUI
checkpoint loaded through ComfyUI's loader, and FLUX.1-dev-shaped random weights (reduced on the CPU)."""
import argparse
import math
import re

import pytest
import torch
from PIL import Image

import comfy.supported_models
import comfy.utils
import folder_paths

from comfyui_dynamic_dit.devtools.bench import arguments, cases, cli, report, runner, workloads
from comfyui_dynamic_dit.core import fidelity
from comfyui_dynamic_dit.demo import conditioning_file
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration.patching import plan_of
from comfyui_dynamic_dit.demo.conditioning_node import DynamicBenchmarkConditioning
from support.nodes import node_outputs


# --- cases ---------------------------------------------------------------------------------------
def test_cases_take_several_settings_and_combinations():
    names = [c.name for c in cases.parse_cases("off,easycache:0.1,0.2,tome:0.5,lazycache")]
    assert names == ["every method off", "EasyCache 0.1 (copied input)", "EasyCache 0.2 (copied input)", "ToMe 0.5", "LazyCache 0.2"]
    combos = cases.parse_cases("tome:0.3+easycache:0.1,0.4")
    assert [c.name for c in combos] == ["ToMe 0.3 + EasyCache 0.1 (copied input)", "ToMe 0.3 + EasyCache 0.4 (copied input)"]
    assert combos[0].family == "ToMe+EasyCache"
    assert [c.name for c in cases.parse_cases(["easycache:0.1", "easycache:0.1"])] == ["EasyCache 0.1 (copied input)"]  # no duplicates


def test_all_expands_every_builder_at_its_sweep(monkeypatch):
    monkeypatch.setattr(cases, "COMBINATIONS", ["tome:0.5+easycache:0.2"])
    names = [c.name for c in cases.parse_cases("all")]
    assert names[0] == "every method off"
    assert {f"EasyCache {float(v):g} (copied input)" for v in cases.SWEEPS["easycache"]} <= set(names)
    assert {f"ToMe {float(v):g}" for v in cases.SWEEPS["tome"]} <= set(names)
    assert names[-1] == "ToMe 0.5 + EasyCache 0.2 (copied input)"
    expected = 1 + sum(len(cases.SWEEPS.get(name, (None,))) for name in cases.CASE_BUILDERS if name not in ("off", "trained")) + 1
    assert len(names) == expected  # every builder at every sweep setting, none lost to the case syntax


@pytest.mark.parametrize(
    "spec, message",
    [("warp:0.5", "unknown case 'warp'"), ("easycache:fast", "not a number"), ("tome:1.5", r"must be in \[0.0, 1.0\]"),
     ("tome:0.3+warp", "unknown case 'warp'"), ("0.3", "unknown case '0.3'")],
)
def test_bad_cases_are_refused_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        cases.parse_cases(spec)


def test_a_combination_composes_both_patches(flux_model):
    (case,) = cases.parse_cases("tome:0.3+easycache:0.1")
    patched = case.build(flux_model)
    options = patched.model_options["transformer_options"]
    assert "easycache" in options and "attn1_patch" in options.get("patches", {})
    assert plan_of(patched) is not None  # the executor is installed on top
    assert plan_of(flux_model) is None and "easycache" not in flux_model.model_options.get("transformer_options", {})


def test_easycache_gets_a_copy_of_the_input_from_a_wrapper_outside_its_own(flux_model):
    """ComfyUI's EasyCache adds into x in place, which corrupts fp32 flow sampling; bf16 users get a cast copy."""
    from comfy.patcher_extension import WrappersMP

    (case,) = cases.parse_cases("easycache:0.2")
    keys = list(case.build(flux_model).wrappers[WrappersMP.DIFFUSION_MODEL])
    assert keys.index(cases.COPY_INPUT_KEY) < keys.index("easycache")
    seen = []
    x = torch.zeros(1)
    cases._copy_input(lambda inner, *rest: seen.append(inner), x, 1)
    assert seen and seen[0] is not x and torch.equal(seen[0], x)


# --- fidelity ------------------------------------------------------------------------------------
def test_psnr_is_infinite_for_identical_images_and_exact_otherwise():
    image = torch.rand(2, 3, 16, 16)
    assert fidelity.psnr(image, image.clone()) == math.inf
    assert fidelity.psnr(image, image + 0.1) == pytest.approx(20.0, abs=1e-6)  # MSE 0.01 -> 20 dB


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 40, 48, generator=generator).cumsum(-1) / 24  # smooth-ish, values beyond 1 are fine
    b = (a + 0.05 * torch.randn(a.shape, generator=generator)).clamp(0, 2)
    expected = structural_similarity(a[0].permute(1, 2, 0).numpy(), b[0].permute(1, 2, 0).numpy(), channel_axis=2,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert fidelity.ssim(a, b) == pytest.approx(expected, abs=1e-6)
    assert fidelity.ssim(a, a) == pytest.approx(1.0)
    assert fidelity.ssim(a, b) < 0.99


# --- end to end ----------------------------------------------------------------------------------
def _args(**overrides) -> argparse.Namespace:
    args = arguments._parse([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_reference_model_benchmark_end_to_end():
    workload = workloads.reference_workload(_args(size=32, steps=6, classes="astronaut", seeds=[0]))
    chosen = cases.parse_cases("off,easycache:1.0,lazycache:1.0,tome:0.5")
    outcome = runner.run_cases(workload, chosen, repeats=2, log=lambda line: None, warm_up=False)
    by_name = {r.case: r for r in outcome.results}
    baseline, off = outcome.baseline, by_name["every method off"]
    assert baseline.psnr == math.inf and baseline.ssim == pytest.approx(1.0)  # full compute against itself (repeat 2 vs 1)
    assert off.flops_ratio == 1.0 and off.psnr == math.inf and off.identical
    assert outcome.unpatched.identical and outcome.unpatched.psnr == math.inf and outcome.unpatched.flops_ratio is None
    cache = by_name["EasyCache 1 (copied input)"]
    assert cache.flops_ratio < 0.9 and math.isfinite(cache.psnr) and not cache.identical  # it skipped steps, measurably
    lazy = by_name["LazyCache 1"]  # skips whole model calls outside the executor: counted against the baseline
    assert lazy.flops_ratio < 0.9 and not lazy.identical
    tome = by_name["ToMe 0.5"]
    assert tome.identical and tome.flops_ratio == 1.0  # no effect on Flux, and the table says so
    assert all(len(r.seconds) == 2 and len(r.wall) == 2 for r in outcome.results)
    assert outcome.unpatched.images.shape == (1, 3, 32, 32)

    section = report.markdown(outcome, plot="benchmarks/x.png", images="benchmarks/x_images.png")
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "| " + " | ".join(report.COLUMNS) + " |"
    assert all(row.count("|") == len(report.COLUMNS) + 1 for row in rows)
    cells = {row.split(" | ")[0][2:]: row.strip("| ").split(" | ") for row in rows[1:]}
    assert cells["full compute (every method off)"][6] == "inf"
    assert cells["every method off"][1] == "100.0%" and cells["every method off"][2] == "x1.00"
    assert re.search(r"\| EasyCache 1 \(copied input\) \| \d+\.\d% \| x\d+\.\d\d \|", section)
    assert "**ToMe 0.5**: no effect on this model" in section and "attn1" in section
    assert re.search(r"Every method off vs the unpatched model: sampling wall time [+-]\d+\.\d% \(median\), [+-]\d+\.\d% \(fastest of 2; target .*bit-identical", section)
    assert "**every method off** is the same configuration as full compute" in section


def test_cli_writes_markdown_plot_and_images(tmp_path, capsys):
    markdown = tmp_path / "BENCHMARKS.md"
    argv = ["--random", "--hidden", "64", "--heads", "2", "--size", "32", "--steps", "2", "--repeats", "1",
            "--cases", "off", "--markdown", str(markdown), "--title", "tiny check"]
    assert cli.run(arguments._parse(argv)) == 0
    text = markdown.read_text()
    assert text.startswith(report.BENCHMARKS_HEADER) and text.count("## tiny check") == 1
    assert "Random weights: PSNR/SSIM only show whether outputs change" in text
    plot = tmp_path / re.search(r"!\[speedup vs PSNR\]\((benchmarks/[^)]+\.png)\)", text).group(1)
    sheet = tmp_path / re.search(r"\]\((benchmarks/[^)]+_images\.png)\)", text).group(1)
    with Image.open(plot) as image:
        assert image.size == (960, 640)
    with Image.open(sheet) as image:
        assert image.size[1] == 3 * 160  # full compute, every method off, unpatched
    assert "| every method off | 100.0% | x1.00 |" in capsys.readouterr().out
    report.append_markdown(markdown, "## second run\n")
    assert markdown.read_text().count("## ") == 2 and markdown.read_text().startswith(report.BENCHMARKS_HEADER)


def test_tiny_wan_benchmark_end_to_end(tmp_path, capsys):
    """`--tiny-wan` (BENCHMARKS.md's tiny-Wan rows) at its smallest: a random Wan 2.1 T2V video through the
    command line, every method's case on it, the section with fastest-repeat columns."""
    markdown = tmp_path / "BENCHMARKS.md"
    argv = ["--tiny-wan", "--hidden", "64", "--heads", "4", "--blocks", "2", "--size", "64", "--frames", "5",
            "--steps", "4", "--repeats", "2", "--text-tokens", "4", "--markdown", str(markdown),
            "--cases", "off,width:0.5,ramp:0.75-1.0,diffcr:0.5,reuse:0.7,ddit:0-75%:2"]
    assert cli.run(arguments._parse(argv)) == 0
    text = markdown.read_text()
    assert "## Tiny Wan 2.1 T2V, random weights, 5 frames of 64 px" in text
    assert "a 5-frame video (2 latent frames of 8x8 latent pixels, 64x64 px: 32 video tokens), 4 steps euler" in text
    rows = {row.split(" | ")[0][2:]: row.strip("| ").split(" | ") for row in text.splitlines() if row.startswith("| ")}
    assert list(rows)[0] == "setting" and rows["setting"][-2:] == ["model time (fastest)", "speedup (fastest)"]
    assert rows["every method off"][1] == "100.0%" and rows["every method off"][6] == "inf"  # identical to full compute
    for case in ("width 0.5", "width ramp 0.75-1", "diffcr keep 0.5", "reuse keep 0.7", "DDiT manual 0-75%:2x"):
        assert float(rows[case][1].rstrip("%")) < 100.0, (case, rows[case])  # every method removed compute on Wan
        assert rows[case][6] != "inf" and re.fullmatch(r"\d+\.\d ms", rows[case][10]) and rows[case][11].startswith("x")
    assert rows["unpatched model (no executor)"][10] == "-"
    with Image.open(tmp_path / re.search(r"\]\((benchmarks/[^)]+_images\.png)\)", text).group(1)) as sheet:
        assert sheet.size == (260 + 2 * 160, 8 * 160)  # the two latent frames side by side; 6 cases, full, unpatched
    assert "every method off" in capsys.readouterr().out


def test_tiny_wan_frames_are_checked():
    with pytest.raises(SystemExit):
        arguments._parse(["--tiny-wan", "--frames", "8"])


# --- a real checkpoint through ComfyUI's loader --------------------------------------------------
SMALLEST_LOADABLE_FLUX = dict(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=0, context_dim=32, vec_dim=16,
                              guidance_embed=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Flux checkpoint in the official layout (unprefixed keys, bf16), as ComfyUI's loader reads flux1-*.safetensors.

    ComfyUI detects Flux by its first double block and fixes 24 heads of 128, so the smallest loadable
    Flux still has 340M parameters: its shapes come from a model on the meta device and its values
    from a shifted pool of random numbers, which costs memory bandwidth instead of 340M normal draws.
    """
    config = tiny_flux.TinyFlux(**SMALLEST_LOADABLE_FLUX)
    meta_model = reference_model.host_model_config(config).get_model({}, device="meta").diffusion_model
    norms = reference_model.norm_parameters(meta_model)
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    state = {}
    for offset, (key, meta) in enumerate(meta_model.state_dict().items()):
        values = pool.roll(offset * 7919).repeat(meta.numel() // pool.numel() + 1)[: meta.numel()].view(meta.shape)
        scale = 1.0 / meta.shape[1] ** 0.5 if meta.ndim == 2 else 0.02
        state[key] = (values * scale).to(torch.bfloat16) if key not in norms else torch.ones(meta.shape, dtype=torch.bfloat16)
    state = reference_model.checkpoint_state(meta_model, state)  # the official key names
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-flux.safetensors"
    comfy.utils.save_torch_file(state, str(path))
    return path, config


def test_model_path_loads_through_comfyui_and_benchmarks(checkpoint, tmp_path, capsys):
    path, config = checkpoint
    positive, negative = tiny_flux.conditioning(config, text_tokens=4)
    conditioning_file.save_conditioning(tmp_path / "cat.safetensors", positive, guidance=3.5)
    conditioning_file.save_conditioning(tmp_path / "negative.safetensors", negative)
    args = _args(model=path, positive=[tmp_path / "cat.safetensors"], negative=tmp_path / "negative.safetensors",
                 dtype="float32", size=32, steps=2, cfg=2.0, cases="off")
    workload = workloads.checkpoint_workload(args)
    diffusion_model = workload.model.model.diffusion_model
    assert type(workload.model.model).__name__ == "Flux" and diffusion_model.hidden_size == 3072
    assert len(diffusion_model.double_blocks) == 1 and len(diffusion_model.single_blocks) == 0
    assert workload.jobs[0].label == "cat seed 0" and workload.jobs[0].positive[0][1]["guidance"] == 3.5
    assert torch.equal(workload.jobs[0].negative[0][0], negative[0][0]) and workload.sample["cfg"] == 2.0
    workload.sample.update(steps=1, cfg=1.0)  # one model call per run is enough to prove the loaded model samples
    outcome = runner.run_cases(workload, cases.parse_cases("off"), repeats=1, log=lambda line: None, warm_up=False)
    assert outcome.results[1].flops_ratio == 1.0 and outcome.baseline.psnr == math.inf
    assert "latent-to-RGB preview" in report.markdown(outcome)


def test_model_path_refuses_conditioning_of_another_model(checkpoint, tmp_path):
    path, _ = checkpoint
    positive, _ = tiny_flux.conditioning(tiny_flux.TinyFlux(context_dim=48), text_tokens=4)
    conditioning_file.save_conditioning(tmp_path / "other.safetensors", positive)
    with pytest.raises(ValueError, match="width 48, this model expects 32"):
        workloads.checkpoint_workload(_args(model=path, positive=[tmp_path / "other.safetensors"], dtype="float32"))
    with pytest.raises(ValueError, match="needs --positive"):
        workloads.checkpoint_workload(_args(model=path, dtype="float32"))


def test_full_size_random_on_the_cpu_is_reduced_and_says_so(capsys):
    args = _args(full_size_random=True, device="cpu", double=0, single=1, size=32, steps=1, repeats=1, cases="off",
                 text_tokens=4, out=None)
    workload = workloads.random_workload(args, full_size=True)
    assert workload.model.model.diffusion_model.hidden_size == 3072
    assert "REDUCED from 19 + 38 blocks, 1024 px, 28 steps because this runs on the CPU" in workload.settings
    assert workload.title.endswith("(reduced)")
    outcome = runner.run_cases(workload, cases.parse_cases("off"), repeats=1, log=lambda line: None, warm_up=False)
    assert outcome.results[1].flops_ratio == 1.0


# --- conditioning files --------------------------------------------------------------------------
def test_conditioning_file_round_trip_and_errors(tmp_path, conds, tiny_config):
    positive, _ = conds
    path = conditioning_file.save_conditioning(tmp_path / "p.safetensors", positive)
    loaded = conditioning_file.load_conditioning(path, tiny_config.context_dim, tiny_config.vec_dim)
    assert torch.equal(loaded[0][0], positive[0][0]) and torch.equal(loaded[0][1]["pooled_output"], positive[0][1]["pooled_output"])
    assert loaded[0][1]["guidance"] == positive[0][1]["guidance"]
    with pytest.raises(ValueError, match="pooled output has width 32, this model expects 768"):
        conditioning_file.load_conditioning(path, tiny_config.context_dim, 768)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        conditioning_file.load_conditioning(truncated)
    other = tmp_path / "weights.safetensors"
    comfy.utils.save_torch_file({"context": torch.zeros(1, 2, 3)}, str(other))
    with pytest.raises(ValueError, match="Save Conditioning for Dynamic DiT Benchmark"):
        conditioning_file.load_conditioning(other)
    with pytest.raises(ValueError, match="not found"):
        conditioning_file.load_conditioning(tmp_path / "missing.safetensors")


def test_save_conditioning_node_writes_into_the_output_folder(tmp_path, conds, tiny_config):
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        first = node_outputs(DynamicBenchmarkConditioning, conds[0], "bench/prompt")["ui"]["text"][0]
        second = node_outputs(DynamicBenchmarkConditioning, conds[0], "bench/prompt")["ui"]["text"][0]
    finally:
        folder_paths.set_output_directory(previous)
    assert first != second and first.startswith(str(tmp_path / "bench"))
    assert torch.equal(conditioning_file.load_conditioning(second, tiny_config.context_dim)[0][0], conds[0][0][0])


def test_image_labels_are_drawable_and_fit_the_label_column():
    from comfyui_dynamic_dit.devtools.bench.report import _drawable

    text = _drawable("DDiT auto τ 5 up to 2x + width ramp 0.9-1 + router reuse keep 0.7 (node defaults)", 34)
    assert "τ" not in text and "tau 5" in text
    assert all(len(line) <= 34 for line in text.splitlines()) and len(text.splitlines()) > 1
