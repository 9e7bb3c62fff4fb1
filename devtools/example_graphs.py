"""The example workflows of example_workflows/, as node descriptions laid out in columns.

Each starts with a note that says what it shows and what it needs. `try_it` runs on the reference
model the pack ships (no download, under a minute on a CPU); the others need FLUX.1-dev weights.
"""
from __future__ import annotations

from typing import Callable

from .workflows import Node, layout, note

FLUX_FILES = (
    "Needs FLUX.1-dev: `flux1-dev.safetensors` in `models/diffusion_models/`, `clip_l.safetensors` and "
    "`t5xxl_fp16.safetensors` in `models/text_encoders/`, `ae.safetensors` in `models/vae/` (about 34 GB together). "
    "No download at hand? Start with the **try_it** workflow: it runs on the small model the pack ships."
)
REPORT_HELP = (
    "**Dynamic Speed Report** draws a bar per sampling step (model ms, the full-compute run in grey next to it, "
    "one-off setup such as the width calibration apart) and the FLOPs of every step, live while sampling; "
    "**Preview as Text** shows its per-step table."
)


def _flux_inputs() -> dict[str, Node]:
    """Loaders, prompt, guidance and latent of a standard Flux.1-dev text-to-image graph."""
    return {
        "unet": Node("unet", "UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        "clip": Node("clip", "DualCLIPLoader",
                     {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux", "device": "default"}),
        "vae": Node("vae", "VAELoader", {"vae_name": "ae.safetensors"}),
        "prompt": Node("prompt", "CLIPTextEncode", {"text": "a photograph of a red fox in fresh snow, morning light, 85mm"},
                       {"clip": ("clip", 0)}),
        "guidance": Node("guidance", "FluxGuidance", {"guidance": 3.5}, {"conditioning": ("prompt", 0)}),
        "negative": Node("negative", "ConditioningZeroOut", links={"conditioning": ("prompt", 0)}),
        "latent": Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
    }


def _sampler(key: str, model: str, title: str) -> Node:
    return Node(
        key, "KSampler",
        {"seed": 42, "steps": 28, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
        {"model": (model, 0), "positive": ("guidance", 0), "negative": ("negative", 0), "latent_image": ("latent", 0)},
        title=title,
    )


def _flux_comparison(text: str, method_nodes: list[Node], dynamic_key: str, slug: str, method_title: str) -> list[Node]:
    """Full compute (through Dynamic Telemetry) next to a dynamic chain on the same seed, the report
    comparing them, its table as text, both images saved."""
    inputs = _flux_inputs()
    telemetry = Node("telemetry", "DynamicTelemetry", links={"model": ("unet", 0)}, title="Dynamic Telemetry (full compute)")
    return layout([
        [note("note", text), inputs["unet"], inputs["clip"], inputs["vae"]],
        [inputs["prompt"], inputs["guidance"], inputs["negative"], inputs["latent"]],
        [telemetry, *method_nodes],
        [_sampler("baseline", "telemetry", "KSampler (full compute)"), _sampler("sampler", dynamic_key, f"KSampler ({method_title})")],
        [Node("report", "DynamicSpeedReport", links={
            "model": (dynamic_key, 0), "latent": ("sampler", 0), "baseline_model": ("telemetry", 0), "baseline_latent": ("baseline", 0),
        }), Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        [Node("decode_full", "VAEDecode", links={"samples": ("baseline", 0), "vae": ("vae", 0)}),
         Node("save_full", "SaveImage", {"filename_prefix": "dynamic_dit_full"}, {"images": ("decode_full", 0)}, title="Full compute"),
         Node("decode", "VAEDecode", links={"samples": ("report", 0), "vae": ("vae", 0)}),
         Node("save", "SaveImage", {"filename_prefix": f"dynamic_dit_{slug}"}, {"images": ("decode", 0)}, title=method_title)],
    ])


def try_it_workflow() -> list[Node]:
    """The reference model through a full-compute baseline and the dynamic chain at the nodes' defaults."""
    sampling = {"seed": 42, "steps": 16, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    text = (
        "## Try Dynamic DiT, no download\n\n"
        "**Load Reference Model** gives the small Flux model the pack ships (9M parameters, trained on photographs, "
        "64 px; pick a photo class). The same seed is sampled twice: through **Dynamic Telemetry** (full compute, "
        "the baseline) and through the dynamic chain **Patch Scheduler → Width Patcher → Token Router** at their "
        "defaults. Press *Queue*: on a CPU it takes well under a minute.\n\n"
        f"{REPORT_HELP} The two images are side by side at the right: at these defaults the dynamic one differs visibly on a "
        "model this small, and the speedup is not what a 12B FLUX gets. The point is to see the nodes work; "
        "BENCHMARKS.md has measured speed and fidelity for each setting."
    )
    dynamic_chain = [
        Node("ddit", "DynamicPatchScheduler", links={"model": ("reference", 0)}),
        Node("width", "DynamicWidthPatcher", links={"model": ("ddit", 0)}),
        Node("router", "DynamicTokenRouter", links={"model": ("width", 0)}),
    ]
    conditioning = {"positive": ("reference", 1), "negative": ("reference", 2), "latent_image": ("reference", 3)}
    return layout([
        [note("note", text, size=(420, 380)),
         Node("reference", "DynamicReferenceModelLoader", {"photo_class": "coffee", "batch_size": 1})],
        [Node("telemetry", "DynamicTelemetry", links={"model": ("reference", 0)}, title="Dynamic Telemetry (full compute)"),
         *dynamic_chain],
        [Node("baseline", "KSampler", sampling, {"model": ("telemetry", 0), **conditioning}, title="KSampler (full compute)"),
         Node("sampler", "KSampler", sampling, {"model": ("router", 0), **conditioning}, title="KSampler (dynamic)")],
        [Node("report", "DynamicSpeedReport", links={
            "model": ("router", 0), "latent": ("sampler", 0), "baseline_model": ("telemetry", 0), "baseline_latent": ("baseline", 0),
        }), Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        # the two images side by side
        [Node("image_full", "DynamicReferenceLatentToImage", links={"latent": ("baseline", 0)}),
         Node("preview_full", "PreviewImage", links={"images": ("image_full", 0)}, title="Full compute", size=(360, 400))],
        [Node("image", "DynamicReferenceLatentToImage", links={"latent": ("report", 0)}),
         Node("preview", "PreviewImage", links={"images": ("image", 0)}, title="Dynamic", size=(360, 400))],
    ])


def speed_report_workflow() -> list[Node]:
    """Full-compute Flux with the per-step telemetry and the report."""
    inputs = _flux_inputs()
    text = (
        "## Per-step speed of FLUX.1, unchanged\n\n"
        "**Dynamic Telemetry** records FLOPs and model time of every step without changing a pixel. "
        f"{REPORT_HELP}\n\n{FLUX_FILES}"
    )
    return layout([
        [note("note", text), inputs["unet"], inputs["clip"], inputs["vae"]],
        [inputs["prompt"], inputs["guidance"], inputs["negative"], inputs["latent"]],
        [Node("telemetry", "DynamicTelemetry", links={"model": ("unet", 0)}), _sampler("sampler", "telemetry", "KSampler")],
        [Node("report", "DynamicSpeedReport", links={"model": ("telemetry", 0), "latent": ("sampler", 0)}),
         Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        [Node("decode", "VAEDecode", links={"samples": ("report", 0), "vae": ("vae", 0)}),
         Node("save", "SaveImage", {"filename_prefix": "dynamic_dit"}, {"images": ("decode", 0)})],
    ])


def td_lora_workflow() -> list[Node]:
    """Flux.1 with a TD-LoRA next to the same seed without it; the report shows the gates of every step."""
    text = (
        "## TD-LoRA: LoRA experts mixed by noise level\n\n"
        "**TD-LoRA Loader** applies a timestep-gated TD-LoRA from `models/dynamic_dit/` (or any LoRA from "
        "`models/loras/`, as one expert). The same seed runs without it through **Dynamic Telemetry**; the "
        f"report's table shows the expert gates of every step and what the bypass costs. {REPORT_HELP}\n\n{FLUX_FILES}"
    )
    tdlora = Node("tdlora", "DynamicTDLoRALoader", {"file": "dynamic_dit/flux_td_lora.safetensors", "strength": 1.0},
                  {"model": ("unet", 0)})
    return _flux_comparison(text, [tdlora], "tdlora", "td_lora", "TD-LoRA")


def token_router_workflow() -> list[Node]:
    """The same seed at full compute and through the Token Router."""
    text = (
        "## Token Router against full compute\n\n"
        "**Token Router** runs only part of the image tokens through each block (*reuse*: the others get this "
        "block's last update; training-free). Both images are saved; compare them next to the measured speedup. "
        f"{REPORT_HELP}\n\n{FLUX_FILES}"
    )
    router = Node("router", "DynamicTokenRouter", links={"model": ("unet", 0)})
    return _flux_comparison(text, [router], "router", "token_router", "Token Router")


def width_workflow() -> list[Node]:
    """Full compute next to the Dynamic Width Patcher ('balanced (trades quality)'), same seed."""
    text = (
        "## Dynamic width against full compute\n\n"
        "**Dynamic Width Patcher** ('balanced', which trades some quality for speed) runs noisy steps with fewer attention heads and MLP channels. "
        "Without a router file it ranks them once by a short calibration, which the report shows as one-off "
        f"setup, apart from the steps. {REPORT_HELP}\n\n{FLUX_FILES}"
    )
    width = Node("width", "DynamicWidthPatcher", {"preset": "balanced (trades quality)"}, {"model": ("unet", 0)})
    return _flux_comparison(text, [width], "width", "width", "dynamic width")


def patch_scheduler_workflow() -> list[Node]:
    """DDiT coarse patches against a full-compute baseline of the same seed."""
    text = (
        "## Dynamic patch sizes (DDiT) against full compute\n\n"
        "**Dynamic Patch Scheduler** runs steps where the latent changes slowly on a coarser patch grid (4x fewer "
        f"tokens per 2x patch). The report's table shows every step's patch size and the value that chose it. {REPORT_HELP}"
        f"\n\n{FLUX_FILES}"
    )
    ddit = Node("ddit", "DynamicPatchScheduler", links={"model": ("unet", 0)})
    return _flux_comparison(text, [ddit], "ddit", "ddit", "Dynamic Patch Scheduler")


def benchmark_conditioning_workflow() -> list[Node]:
    """Prompt and negative as conditioning files for `python -m devtools.bench --model ...`."""
    inputs = _flux_inputs()
    text = (
        "## Conditioning files for the benchmark\n\n"
        "Saves the prompt (and the negative) as files under `output/dynamic_dit_bench/` for the command-line "
        "benchmark on your own checkpoint:\n\n`python -m devtools.bench --model "
        "flux1-dev.safetensors --positive <file> --vae ae.safetensors`\n\nNeeds the FLUX.1 text encoders "
        "(`clip_l.safetensors`, `t5xxl_fp16.safetensors` in `models/text_encoders/`)."
    )
    return layout([
        [note("note", text), inputs["clip"]],
        [inputs["prompt"], inputs["guidance"], inputs["negative"]],
        [Node("save_positive", "DynamicBenchmarkConditioning", {"filename_prefix": "dynamic_dit_bench/fox"},
              {"conditioning": ("guidance", 0)}),
         Node("save_negative", "DynamicBenchmarkConditioning", {"filename_prefix": "dynamic_dit_bench/negative"},
              {"conditioning": ("negative", 0)})],
    ])


WORKFLOWS: dict[str, tuple[str, Callable[[], list[Node]]]] = {
    "try_it": ("Try it: the shipped reference model, full compute next to the dynamic chain (no download)", try_it_workflow),
    "flux_speed_report": ("Flux.1 with per-step speed telemetry", speed_report_workflow),
    "flux_td_lora": ("Flux.1 with a TD-LoRA (timestep-gated LoRA experts)", td_lora_workflow),
    "flux_token_router": ("Flux.1 Token Router against full compute", token_router_workflow),
    "flux_dynamic_width": ("Flux.1 with the Dynamic Width Patcher against full compute", width_workflow),
    "flux_patch_scheduler": ("Flux.1 with DDiT dynamic patch sizes, compared with full compute", patch_scheduler_workflow),
    "benchmark_conditioning": ("Conditioning files for the command-line benchmark", benchmark_conditioning_workflow),
}
