"""Example workflows of the video families beyond Wan: ComfyUI's stock graphs (loaders, file names, sampler settings)
with the pack's nodes added, full compute next to the dynamic chain."""
from __future__ import annotations

from .graph_texts import REPORT_HELP, SKIP_BASELINE
from .workflows import Node, layout, note

LTXV_PROMPT = (
    "A red fox trots through fresh snow in a birch forest at sunrise, its breath steaming in the cold air, the camera "
    "tracking it slowly from the side, soft golden light between the trees."
)
LTXV_NEGATIVE = "low quality, worst quality, deformed, distorted, disfigured, motion smear, motion artifacts, fused fingers, bad anatomy, weird hand, ugly"
LTXV_FPS = 24.0
LTXV_CHAIN_HELP = (
    "The chain at the nodes' defaults, on LTX-Video: **Dynamic Patch Scheduler** runs some steps on 2x coarser patches "
    "in height and width (frames unchanged; a quarter of the video tokens), chosen from how evenly the latent changes; "
    "**Dynamic Width Patcher** ('quality') runs the noisiest steps "
    "with 90 % of the self-attention heads and feed-forward channels, rising to full width (cross-attention to the "
    "text keeps its width); **Dynamic Token Router** ('reuse', keep 0.7) runs 70 % of the video tokens (frames x rows "
    "x columns) through every block but the first and last two, the others get the block's last update. Each method is "
    "training-free and can be bypassed (Ctrl+B) on its own."
)


def video_out(key: str, latent: tuple[str, int], prefix: str, title: str, vae: tuple[str, int], fps: float) -> list[Node]:
    """VAE Decode -> Create Video -> Save Video (`output/video/<prefix>`), as ComfyUI's video templates end."""
    return [
        Node(f"decode{key}", "VAEDecode", links={"samples": latent, "vae": vae}, title=f"VAE Decode{title}"),
        Node(f"video{key}", "CreateVideo", {"fps": fps}, {"images": (f"decode{key}", 0)}, title=f"Create Video{title}"),
        Node(f"save{key}", "SaveVideo", {"filename_prefix": f"video/{prefix}", "format": "auto", "codec": "auto"},
             {"video": (f"video{key}", 0)}, title=f"Save Video{title}"),
    ]


def ltxv_t2v_workflow() -> list[Node]:
    """LTX-Video 0.9.5 text-to-video as ComfyUI's example builds it, full compute next to the dynamic chain."""
    text = (
        "## LTX-Video text-to-video: full compute next to the dynamic chain\n\n"
        "ComfyUI's stock LTX-Video graph (Load Checkpoint → LTXVConditioning 25 fps → SamplerCustom euler, LTXVScheduler "
        "30 steps, cfg 3; 768x512, 97 frames) sampled twice with the same seed: through **Dynamic Telemetry** (full "
        "compute, the baseline) and through **Patch Scheduler → Width Patcher → Token Router**. Both videos are saved "
        "(`output/video/`)."
        f"\n\n{LTXV_CHAIN_HELP}\n\n{REPORT_HELP}\n\n"
        "**Files** (Lightricks/LTX-Video on Hugging Face, about 16 GB together): `ltx-video-2b-v0.9.5.safetensors` "
        "(6.3 GB, the model and its VAE) in `models/checkpoints/`, `t5xxl_fp16.safetensors` (9.8 GB, *Load CLIP* type "
        f"`ltxv`) in `models/text_encoders/`.\n\n{SKIP_BASELINE}"
    )
    checkpoint = Node("checkpoint", "CheckpointLoaderSimple", {"ckpt_name": "ltx-video-2b-v0.9.5.safetensors"})
    clip = Node("clip", "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "ltxv", "device": "default"})
    positive = Node("prompt", "CLIPTextEncode", {"text": LTXV_PROMPT}, {"clip": ("clip", 0)}, title="Positive prompt")
    negative = Node("negative", "CLIPTextEncode", {"text": LTXV_NEGATIVE}, {"clip": ("clip", 0)}, title="Negative prompt")
    conditioning = Node("conditioning", "LTXVConditioning", {"frame_rate": 25.0},
                        {"positive": ("prompt", 0), "negative": ("negative", 0)})
    latent = Node("latent", "EmptyLTXVLatentVideo", {"width": 768, "height": 512, "length": 97, "batch_size": 1},
                  title="Empty LTXV latent (768x512, 97 frames)")
    scheduler = Node("scheduler", "LTXVScheduler", {"steps": 30, "max_shift": 2.05, "base_shift": 0.95, "stretch": True,
                                                    "terminal": 0.1}, {"latent": ("latent", 0)})
    sampler = Node("sampler_select", "KSamplerSelect", {"sampler_name": "euler"})
    telemetry = Node("telemetry", "DynamicTelemetry", links={"model": ("checkpoint", 0)}, title="Dynamic Telemetry (full compute)")
    chain = [
        Node("ddit", "DynamicPatchScheduler", links={"model": ("checkpoint", 0)}),
        Node("width", "DynamicWidthPatcher", links={"model": ("ddit", 0)}),
        Node("router", "DynamicTokenRouter", links={"model": ("width", 0)}),
    ]

    def sample(key: str, model: str, title: str) -> Node:
        return Node(key, "SamplerCustom", {"add_noise": True, "noise_seed": 42, "cfg": 3.0},
                    {"model": (model, 0), "positive": ("conditioning", 0), "negative": ("conditioning", 1),
                     "sampler": ("sampler_select", 0), "sigmas": ("scheduler", 0), "latent_image": ("latent", 0)}, title=title)

    return layout([
        [note("note", text, size=(440, 520)), checkpoint, clip],
        [positive, negative, conditioning, latent],
        [scheduler, sampler, telemetry, *chain],
        [sample("baseline", "telemetry", "SamplerCustom (full compute)"), sample("dynamic", "router", "SamplerCustom (dynamic)")],
        [Node("report", "DynamicSpeedReport", links={"model": ("router", 0), "latent": ("dynamic", 0),
                                                    "baseline_model": ("telemetry", 0), "baseline_latent": ("baseline", 0)}),
         Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        video_out("_full", ("baseline", 0), "ltxv_full_compute", " (full compute)", ("checkpoint", 2), LTXV_FPS),
        video_out("", ("report", 0), "ltxv_dynamic", " (dynamic)", ("checkpoint", 2), LTXV_FPS),
    ])
