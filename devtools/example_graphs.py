"""The example workflows of example_workflows/, as node descriptions laid out in columns.

Each starts with a note that says what it shows and what it needs. `try_it` runs on the reference
model the pack ships (no download, under a minute on a CPU); the flux_* ones need FLUX.1-dev weights, the
wan* ones the Wan 2.1 / 2.2 files of ComfyUI's own Wan templates (stock loaders, stock file names).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .example_graphs_image import (chroma_workflow, flux2_dev_workflow, qwen_image_edit_workflow, qwen_image_workflow,
                                   pixart_sigma_workflow, sd35_large_workflow, z_image_turbo_workflow)
from .example_graphs_video import ltxv_t2v_workflow, video_out
from .graph_texts import REPORT_HELP, SKIP_BASELINE
from .workflows import Node, layout, note

FLUX_FILES = (
    "Needs FLUX.1-dev: `flux1-dev.safetensors` in `models/diffusion_models/`, `clip_l.safetensors` and "
    "`t5xxl_fp16.safetensors` in `models/text_encoders/`, `ae.safetensors` in `models/vae/` (about 34 GB together). "
    "No download at hand? Start with the **1 Try it (no download)** workflow: it runs on the small model the pack ships."
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


REFERENCE_SAMPLING = {"seed": 42, "steps": 16, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
REFERENCE_CONDITIONING = {"positive": ("reference", 1), "negative": ("reference", 2), "latent_image": ("reference", 3)}


SHIPPED_TRAINED_FILE = "reference_coarse_patches_x2.safetensors"  # reference/dynamic_dit/, listed by the file combos


def _report(key: str, dynamic_model: str, sampler: str, image: str, title: str | None = None) -> Node:
    """The Speed Report of the `sampler` run against the "baseline" one: speed, and how close the image stayed."""
    return Node(key, "DynamicSpeedReport", links={
        "model": (dynamic_model, 0), "latent": (sampler, 0), "baseline_model": ("telemetry", 0),
        "baseline_latent": ("baseline", 0), "image": (image, 0), "baseline_image": ("image_full", 0),
    }, title=title)


def _preview(key: str, sampler: str, title: str) -> list[Node]:
    """The reference model's latent of `sampler` as an image (`image<key>`) and its preview."""
    return [Node(f"image{key}", "DynamicReferenceLatentToImage", links={"latent": (sampler, 0)}),
            Node(f"preview{key}", "PreviewImage", links={"images": (f"image{key}", 0)}, title=title, size=(340, 380))]


def _reference_report(dynamic_model: str, title: str) -> list[list[Node]]:
    """The Speed Report of the "sampler" run against the "baseline" one (PSNR and SSIM of the two images too), its
    table, and the two images side by side."""
    return [
        [_report("report", dynamic_model, "sampler", "image"),
         Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        _preview("_full", "baseline", "Full compute"),
        _preview("", "sampler", title),
    ]


def try_it_workflow() -> list[Node]:
    """The reference model at full compute, through the nodes at their defaults and with the trained file it ships."""
    text = (
        "## Try Dynamic DiT, no download\n\n"
        "**Load Reference Model** gives the small Flux model the pack ships (9M parameters, trained on photographs, "
        "64 px; pick a photo class). The same seed is sampled three times: at full compute (through **Dynamic "
        "Telemetry**, the baseline), through **Patch Scheduler → Width Patcher → Token Router** at their defaults "
        "(training-free), and through **Load Trained Dynamic DiT** with the coarse-patch file the pack ships for this "
        "model (trained by the Train node's *coarse patches* recipe). Press *Queue*: on a CPU it takes well under a "
        "minute.\n\n"
        f"{REPORT_HELP} Each report shows its speedup and how close its image stayed (PSNR against the full-compute "
        "image). Measured on this model: the defaults x1.32 fewer FLOPs at 24.4 dB (four photo classes); the trained "
        "file x2.21 fewer FLOPs and x1.8 model time at 25.8 dB over the 15 classes (coffee 24.1 dB, worst 20.6 dB). "
        "On a model this small time follows FLOPs only in part; BENCHMARKS.md has large models' numbers."
    )
    dynamic_chain = [
        Node("ddit", "DynamicPatchScheduler", links={"model": ("reference", 0)}),
        Node("width", "DynamicWidthPatcher", links={"model": ("ddit", 0)}),
        Node("router", "DynamicTokenRouter", links={"model": ("width", 0)}),
    ]
    return layout([
        [note("note", text, size=(420, 440)),
         Node("reference", "DynamicReferenceModelLoader", {"photo_class": "coffee", "batch_size": 1})],
        [Node("telemetry", "DynamicTelemetry", links={"model": ("reference", 0)}, title="Dynamic Telemetry (full compute)"),
         *dynamic_chain,
         Node("trained", "DynamicTrainedLoader", {"file": SHIPPED_TRAINED_FILE}, {"model": ("reference", 0)})],
        [Node("baseline", "KSampler", REFERENCE_SAMPLING, {"model": ("telemetry", 0), **REFERENCE_CONDITIONING},
              title="KSampler (full compute)"),
         Node("sampler", "KSampler", REFERENCE_SAMPLING, {"model": ("router", 0), **REFERENCE_CONDITIONING},
              title="KSampler (defaults)"),
         Node("sampler_trained", "KSampler", REFERENCE_SAMPLING, {"model": ("trained", 0), **REFERENCE_CONDITIONING},
              title="KSampler (trained file)")],
        [_report("report", "router", "sampler", "image", "Speed Report (defaults)"),
         _report("report_trained", "trained", "sampler_trained", "image_trained", "Speed Report (trained file)"),
         Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        [*_preview("_full", "baseline", "Full compute"), *_preview("", "sampler", "Defaults")],
        [*_preview("_trained", "sampler_trained", "Trained file"),
         Node("table_trained", "PreviewAny", links={"source": ("report_trained", 1)}, title="Per-step table (trained file)")],
    ])


def train_workflow() -> list[Node]:
    """The reference model: train token routers (DiffCR) with TD-LoRA for it, then sample with and without them."""
    text = (
        "## Train Dynamic DiT on the reference model, no download\n\n"
        "**Train Dynamic DiT** samples the connected model at full compute for the prompt (the teacher: its own "
        "sampler and schedule), then trains the chosen parts until the model at the target FLOPs matches those "
        "samples: here DiffCR token routers and keep ratios per block and step with TD-LoRA experts as "
        "compensation, at half the FLOPs. It writes one file, `models/dynamic_dit/trained/reference_diffcr."
        "safetensors` (the Token Router reads it in mode *as trained*, the TD-LoRA Loader its experts) and "
        "returns the model with both applied. On a 2-core CPU the whole workflow takes about 100 s (the training 89 s). "
        "100 steps show how training works, not a file that holds up: this one's image stays about 15 dB from full "
        "compute, and the report says the difference is plain to see. For a file that holds up, pick a *recipe* on "
        "the node (measured on this model: coarse patches 25.4 dB at 45 % FLOPs in 47 min; BENCHMARKS.md).\n\n"
        f"{REPORT_HELP} Train on the sampler, steps and cfg you sample with."
    )
    return layout([
        [note("note", text, size=(420, 420)),
         Node("reference", "DynamicReferenceModelLoader", {"photo_class": "coffee", "batch_size": 1})],
        [Node("train", "DynamicTrainer", {
            "parts": "token routers + TD-LoRA (DiffCR)", "target_flops": 0.5, "steps": 100, "filename": "trained/reference_diffcr",
            "sampling_steps": 16, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "seeds": 2,
        }, links={"model": ("reference", 0), "positive": ("reference", 1), "negative": ("reference", 2),
                  "latent": ("reference", 3)}),
         Node("train_report", "PreviewAny", links={"source": ("train", 1)}, title="Training report")],
        [Node("telemetry", "DynamicTelemetry", links={"model": ("reference", 0)}, title="Dynamic Telemetry (full compute)"),
         Node("baseline", "KSampler", REFERENCE_SAMPLING, {"model": ("telemetry", 0), **REFERENCE_CONDITIONING},
              title="KSampler (full compute)"),
         Node("sampler", "KSampler", REFERENCE_SAMPLING, {"model": ("train", 0), **REFERENCE_CONDITIONING},
              title="KSampler (trained)")],
        *_reference_report("train", "Trained, half the FLOPs"),
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
    return _flux_comparison(text, [router], "router", "token_router", "Dynamic Token Router")


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


# --- Wan 2.1 / 2.2 video: ComfyUI's stock Wan graphs (loaders, file names, sampler settings) -------------
WAN_NEGATIVE = (  # the negative prompt of ComfyUI's own Wan templates (Wan's recommended one)
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
WAN_PROMPT = (
    "A red fox trots through fresh snow in a birch forest at sunrise, its breath steaming in the cold air, "
    "the camera tracking it slowly from the side, soft golden light between the trees."
)
WAN_FPS = 16.0  # Wan 2.1 and 2.2 A14B make 16 frames per second
WAN_TEXT_ENCODER = "`umt5_xxl_fp8_e4m3fn_scaled.safetensors` (6.7 GB) in `models/text_encoders/`"
WAN_VAE = "`wan_2.1_vae.safetensors` (0.25 GB) in `models/vae/`"
WAN_CHAIN_HELP = (
    "The chain at the nodes' defaults, on Wan: **Dynamic Patch Scheduler** runs some steps on 2x coarser patches in "
    "height and width (frames unchanged; a quarter of the video tokens), chosen from how evenly the latent changes; "
    "**Dynamic Width Patcher** ('quality') runs the noisiest steps with 90 % of the self-attention heads and FFN channels, "
    "rising to full width (cross-attention to the text keeps its width); **Token Router** ('reuse', keep 0.7) runs 70 % "
    "of the video tokens (frames x rows x cols) through every block but the first and last two, the others get the "
    "block's last update. Each method is training-free and can be bypassed (Ctrl+B) on its own."
)


def _video_out(key: str, latent: tuple[str, int], prefix: str, title: str) -> list[Node]:
    """The Wan templates' ending: VAE Decode -> Create Video (16 fps) -> Save Video."""
    return video_out(key, latent, prefix, title, ("vae", 0), WAN_FPS)


def _wan_text(clip: Node) -> tuple[Node, Node]:
    positive = Node("prompt", "CLIPTextEncode", {"text": WAN_PROMPT}, {"clip": (clip.key, 0)}, title="Positive prompt")
    negative = Node("negative", "CLIPTextEncode", {"text": WAN_NEGATIVE}, {"clip": (clip.key, 0)}, title="Negative prompt")
    return positive, negative


def _dynamic_chain(model: str, suffix: str = "", title: str = "") -> list[Node]:
    """Patch Scheduler -> Width Patcher -> Token Router at their defaults on `model`."""
    return [
        Node(f"ddit{suffix}", "DynamicPatchScheduler", links={"model": (model, 0)}, title=f"Dynamic Patch Scheduler{title}"),
        Node(f"width{suffix}", "DynamicWidthPatcher", links={"model": (f"ddit{suffix}", 0)}, title=f"Dynamic Width Patcher{title}"),
        Node(f"router{suffix}", "DynamicTokenRouter", links={"model": (f"width{suffix}", 0)}, title=f"Token Router{title}"),
    ]


def wan21_t2v_workflow() -> list[Node]:
    """Wan 2.1 T2V 1.3B as ComfyUI's template builds it, full compute next to the dynamic chain."""
    text = (
        "## Wan 2.1 text-to-video 1.3B: full compute next to the dynamic chain\n\n"
        "ComfyUI's stock Wan 2.1 graph (Load Diffusion Model → ModelSamplingSD3 shift 8 → KSampler uni_pc / simple, "
        "30 steps, cfg 6; 832x480, 33 frames) sampled twice with the same seed: through **Dynamic Telemetry** (full "
        "compute, the baseline) and through **Patch Scheduler → Width Patcher → Token Router**. Both videos are saved "
        f"(`output/video/`).\n\n{WAN_CHAIN_HELP}\n\n{REPORT_HELP}\n\n"
        "**Files** (Comfy-Org/Wan_2.1_ComfyUI_repackaged on Hugging Face, about 9.8 GB together): "
        "`wan2.1_t2v_1.3B_fp16.safetensors` (2.8 GB) in `models/diffusion_models/`, "
        f"{WAN_TEXT_ENCODER}, {WAN_VAE}.\n\n{SKIP_BASELINE}"
    )
    unet = Node("unet", "UNETLoader", {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"})
    clip = Node("clip", "CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"})
    vae = Node("vae", "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"})
    positive, negative = _wan_text(clip)
    latent = Node("latent", "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1},
                  title="Empty video latent (832x480, 33 frames)")
    shift = Node("shift", "ModelSamplingSD3", {"shift": 8.0}, {"model": ("unet", 0)})
    sampling = {"seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0}
    conditioning = {"positive": ("prompt", 0), "negative": ("negative", 0), "latent_image": ("latent", 0)}
    telemetry = Node("telemetry", "DynamicTelemetry", links={"model": ("shift", 0)}, title="Dynamic Telemetry (full compute)")
    return layout([
        [note("note", text, size=(460, 700)), unet, clip, vae],
        [positive, negative, latent, shift],
        [telemetry, *_dynamic_chain("shift")],
        [Node("baseline", "KSampler", sampling, {"model": ("telemetry", 0), **conditioning}, title="KSampler (full compute)"),
         Node("sampler", "KSampler", sampling, {"model": ("router", 0), **conditioning}, title="KSampler (dynamic)")],
        [Node("report", "DynamicSpeedReport", links={
            "model": ("router", 0), "latent": ("sampler", 0), "baseline_model": ("telemetry", 0), "baseline_latent": ("baseline", 0),
        }), Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        _video_out("_full", ("baseline", 0), "wan21_full_compute", " (full compute)"),
        _video_out("", ("report", 0), "wan21_dynamic", " (dynamic)"),
    ])


def wan22_t2v_a14b_workflow() -> list[Node]:
    """Wan 2.2 T2V A14B: the high-noise expert samples the first half of the steps, the low-noise expert the
    rest (two KSamplerAdvanced, as ComfyUI's template does it), each expert through the dynamic chain."""
    text = (
        "## Wan 2.2 text-to-video A14B (two experts): full compute next to the dynamic chain\n\n"
        "ComfyUI's stock Wan 2.2 graph: the high-noise expert samples steps 0-10 of 20 (KSamplerAdvanced, "
        "leftover noise returned), the low-noise expert steps 10-20; ModelSamplingSD3 shift 8 on both, euler / simple, "
        "cfg 3.5; 1280x704, 81 frames. The dynamic chain **Patch Scheduler → Width Patcher → Token Router** sits on "
        "both experts (each expert's schedules run over its own part of the steps, its noise levels deciding the "
        "width), and each expert has its own **Dynamic Speed Report**, compared with the same expert at full compute "
        f"(**Dynamic Telemetry**, same seed).\n\n{WAN_CHAIN_HELP}\n\n{REPORT_HELP}\n\n"
        "**Files** (Comfy-Org/Wan_2.2_ComfyUI_Repackaged and Wan_2.1_ComfyUI_repackaged on Hugging Face, about 35.6 GB "
        "together): `wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors` and `wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors` "
        f"(14.3 GB each) in `models/diffusion_models/`, {WAN_TEXT_ENCODER}, {WAN_VAE} (Wan 2.2's A14B uses the Wan 2.1 VAE)."
        f"\n\n{SKIP_BASELINE}"
    )
    unets = {
        expert: Node(f"unet_{expert}", "UNETLoader",
                     {"unet_name": f"wan2.2_t2v_{expert}_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"},
                     title=f"Load Diffusion Model ({expert} noise)")
        for expert in ("high", "low")
    }
    clip = Node("clip", "CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"})
    vae = Node("vae", "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"})
    positive, negative = _wan_text(clip)
    latent = Node("latent", "EmptyHunyuanLatentVideo", {"width": 1280, "height": 704, "length": 81, "batch_size": 1},
                  title="Empty video latent (1280x704, 81 frames)")
    shifts = {expert: Node(f"shift_{expert}", "ModelSamplingSD3", {"shift": 8.0}, {"model": (f"unet_{expert}", 0)},
                           title=f"ModelSamplingSD3 ({expert} noise)") for expert in ("high", "low")}
    telemetry = {expert: Node(f"telemetry_{expert}", "DynamicTelemetry", links={"model": (f"shift_{expert}", 0)},
                              title=f"Dynamic Telemetry ({expert} noise, full compute)") for expert in ("high", "low")}
    chains = {expert: _dynamic_chain(f"shift_{expert}", f"_{expert}", f" ({expert} noise)") for expert in ("high", "low")}

    def sampler(key: str, model: str, latent_in: tuple[str, int], high: bool, title: str) -> Node:
        widgets = {"add_noise": "enable" if high else "disable", "noise_seed": 42, "steps": 20, "cfg": 3.5,
                   "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0 if high else 10,
                   "end_at_step": 10 if high else 10000, "return_with_leftover_noise": "enable" if high else "disable"}
        return Node(key, "KSamplerAdvanced", widgets, {"model": (model, 0), "positive": ("prompt", 0), "negative": ("negative", 0),
                                                       "latent_image": latent_in}, title=title)

    def report(expert: str, sampler_key: str, baseline_key: str) -> list[Node]:
        return [Node(f"report_{expert}", "DynamicSpeedReport", links={
                    "model": (f"router_{expert}", 0), "latent": (sampler_key, 0),
                    "baseline_model": (f"telemetry_{expert}", 0), "baseline_latent": (baseline_key, 0)},
                    title=f"Dynamic Speed Report ({expert} noise)"),
                Node(f"table_{expert}", "PreviewAny", links={"source": (f"report_{expert}", 1)}, title=f"Per-step table ({expert} noise)")]

    return layout([
        [note("note", text, size=(460, 760)), unets["high"], unets["low"], clip, vae],
        [positive, negative, latent, shifts["high"], shifts["low"]],
        [telemetry["high"], *chains["high"]],
        [telemetry["low"], *chains["low"]],
        [sampler("baseline_high", "telemetry_high", ("latent", 0), True, "KSamplerAdvanced (high noise, full compute)"),
         sampler("baseline_low", "telemetry_low", ("baseline_high", 0), False, "KSamplerAdvanced (low noise, full compute)"),
         # the low-noise expert continues from the high-noise report's pass-through latent, so each report runs
         # (and draws) right after its own expert
         sampler("sampler_high", "router_high", ("latent", 0), True, "KSamplerAdvanced (high noise, dynamic)"),
         sampler("sampler_low", "router_low", ("report_high", 0), False, "KSamplerAdvanced (low noise, dynamic)")],
        [*report("high", "sampler_high", "baseline_high"), *report("low", "sampler_low", "baseline_low")],
        _video_out("_full", ("baseline_low", 0), "wan22_full_compute", " (full compute)"),
        _video_out("", ("report_low", 0), "wan22_dynamic", " (dynamic)"),
    ])


class ExampleWorkflow(NamedTuple):
    """One example workflow: its file's name, what it shows, the nodes."""

    title: str  # the file name: ComfyUI's template browser titles (and describes) a pack's templates by it alone
    description: str  # the saved workflow's own title
    build: Callable[[], list[Node]]


# Digits first: the template browser's A-Z order (and a file system that lists by name) starts with try_it.
WORKFLOWS: dict[str, ExampleWorkflow] = {
    "try_it": ExampleWorkflow(
        "1 Try it (no download)",
        "Try it: the shipped reference model at full compute, at the nodes' defaults and with a trained file (no download)",
        try_it_workflow),
    "train_reference": ExampleWorkflow(
        "2 Train on the reference model (no download)",
        "Train token routers (DiffCR) for the shipped reference model, then sample with them (no download)",
        train_workflow),
    "flux_speed_report": ExampleWorkflow(
        "FLUX.1 dev, Speed Report",
        "Flux.1 with per-step speed telemetry",
        speed_report_workflow),
    "flux_td_lora": ExampleWorkflow(
        "FLUX.1 dev, TD-LoRA Loader",
        "Flux.1 with a TD-LoRA (timestep-gated LoRA experts)",
        td_lora_workflow),
    "flux_token_router": ExampleWorkflow(
        "FLUX.1 dev, Token Router",
        "Flux.1 Token Router against full compute",
        token_router_workflow),
    "flux_dynamic_width": ExampleWorkflow(
        "FLUX.1 dev, Dynamic Width Patcher",
        "Flux.1 with the Dynamic Width Patcher against full compute",
        width_workflow),
    "flux_patch_scheduler": ExampleWorkflow(
        "FLUX.1 dev, Patch Scheduler (DDiT)",
        "Flux.1 with DDiT dynamic patch sizes, compared with full compute",
        patch_scheduler_workflow),
    "benchmark_conditioning": ExampleWorkflow(
        "Tool, conditioning files for the benchmark",
        "Conditioning files for the command-line benchmark",
        benchmark_conditioning_workflow),
    "wan21_t2v_1_3b": ExampleWorkflow(
        "Wan 2.1, text to video 1.3B",
        "Wan 2.1 text-to-video 1.3B, full compute next to the dynamic chain",
        wan21_t2v_workflow),
    "wan22_t2v_a14b": ExampleWorkflow(
        "Wan 2.2, text to video A14B",
        "Wan 2.2 text-to-video A14B (high- and low-noise experts) with the dynamic chain on both",
        wan22_t2v_a14b_workflow),
    "flux2_dev_t2i": ExampleWorkflow(
        "Flux 2 dev, text to image",
        "Flux 2 dev text-to-image, full compute next to the dynamic chain",
        flux2_dev_workflow),
    "chroma_t2i": ExampleWorkflow(
        "Chroma, text to image",
        "Chroma text-to-image, full compute next to the dynamic chain",
        chroma_workflow),
    "qwen_image_t2i": ExampleWorkflow(
        "Qwen-Image, 8-step Lightning",
        "Qwen-Image text-to-image with the 8-step Lightning LoRA, full compute next to the dynamic chain",
        qwen_image_workflow),
    "qwen_image_edit_2509": ExampleWorkflow(
        "Qwen-Image Edit 2509, 4-step Lightning",
        "Qwen-Image Edit 2509 with the 4-step Lightning LoRA, full compute next to the dynamic chain",
        qwen_image_edit_workflow),
    "z_image_turbo_t2i": ExampleWorkflow(
        "Z-Image-Turbo, 9 steps",
        "Z-Image-Turbo text-to-image at 9 steps, full compute next to the dynamic chain",
        z_image_turbo_workflow),
    "sd35_large_t2i": ExampleWorkflow(
        "SD3.5 Large, text to image",
        "SD3.5 Large text-to-image, full compute next to the dynamic chain",
        sd35_large_workflow),
    "pixart_sigma_t2i": ExampleWorkflow(
        "PixArt-Sigma, text to image",
        "PixArt-Σ text-to-image, full compute next to the dynamic chain",
        pixart_sigma_workflow),
    "ltxv_t2v": ExampleWorkflow(
        "LTX-Video, text to video",
        "LTX-Video 0.9.5 text-to-video, full compute next to the dynamic chain",
        ltxv_t2v_workflow),
}
