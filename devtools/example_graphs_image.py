"""The Flux 2 example workflow: ComfyUI's own Flux 2 dev text-to-image graph (its template's loaders, file names,
Flux2Scheduler and SamplerCustomAdvanced), sampled twice with the same noise: at full compute and through the
Patch Scheduler, Width Patcher and Token Router."""
from __future__ import annotations

from .graph_texts import REPORT_HELP, SKIP_BASELINE
from .workflows import Node, layout, note

FLUX2_PROMPT = "a photograph of a red fox in fresh snow, morning light, 85mm"
FLUX2_FILES = (
    "**Files** (Comfy-Org/flux2-dev on Hugging Face, the names of ComfyUI's own Flux 2 template): "
    "`flux2_dev_fp8mixed.safetensors` in `models/diffusion_models/`, `mistral_3_small_flux2_bf16.safetensors` "
    "(*Load CLIP* type `flux2`) in `models/text_encoders/`, `flux2-vae.safetensors` in `models/vae/`. Flux 2 Klein "
    "works the same way (`flux-2-klein-4b.safetensors`, `qwen_3_4b.safetensors`)."
)


def _sampler(key: str, model: str, title: str) -> list[Node]:
    """Guider and sampler of one run: the template's BasicGuider and SamplerCustomAdvanced on the shared noise,
    sampler, sigmas and latent."""
    return [
        Node(f"guider_{key}", "BasicGuider", links={"model": (model, 0), "conditioning": ("guidance", 0)},
             title=f"BasicGuider{title}"),
        Node(key, "SamplerCustomAdvanced", links={"noise": ("noise", 0), "guider": (f"guider_{key}", 0),
                                                  "sampler": ("sampler_select", 0), "sigmas": ("scheduler", 0),
                                                  "latent_image": ("latent", 0)}, title=f"SamplerCustomAdvanced{title}"),
    ]


def flux2_dev_workflow() -> list[Node]:
    text = (
        "## Flux 2 dev text-to-image: full compute next to the dynamic chain\n\n"
        "ComfyUI's stock Flux 2 graph (Load Diffusion Model → BasicGuider with FluxGuidance 4 → SamplerCustomAdvanced, "
        "euler, Flux2Scheduler 20 steps, 1024x1024) sampled twice with the same noise: through **Dynamic Telemetry** "
        "(full compute, the baseline) and through **Dynamic Patch Scheduler → Dynamic Width Patcher → Token Router** at "
        "their defaults. On Flux 2 the Patch Scheduler runs training-free (its `embedding` stays `none`).\n\n"
        f"{REPORT_HELP}\n\n{FLUX2_FILES}\n\n{SKIP_BASELINE}"
    )
    size = {"width": 1024, "height": 1024}
    unet = Node("unet", "UNETLoader", {"unet_name": "flux2_dev_fp8mixed.safetensors", "weight_dtype": "default"})
    clip = Node("clip", "CLIPLoader", {"clip_name": "mistral_3_small_flux2_bf16.safetensors", "type": "flux2", "device": "default"})
    vae = Node("vae", "VAELoader", {"vae_name": "flux2-vae.safetensors"})
    prompt = Node("prompt", "CLIPTextEncode", {"text": FLUX2_PROMPT}, {"clip": ("clip", 0)}, title="Prompt")
    guidance = Node("guidance", "FluxGuidance", {"guidance": 4.0}, {"conditioning": ("prompt", 0)})
    latent = Node("latent", "EmptyFlux2LatentImage", {**size, "batch_size": 1})
    scheduler = Node("scheduler", "Flux2Scheduler", {"steps": 20, **size})
    sampler_select = Node("sampler_select", "KSamplerSelect", {"sampler_name": "euler"})
    noise = Node("noise", "RandomNoise", {"noise_seed": 42})
    telemetry = Node("telemetry", "DynamicTelemetry", links={"model": ("unet", 0)}, title="Dynamic Telemetry (full compute)")
    patch = Node("patch", "DynamicPatchScheduler", links={"model": ("unet", 0)}, title="Dynamic Patch Scheduler")
    width = Node("width", "DynamicWidthPatcher", links={"model": ("patch", 0)}, title="Dynamic Width Patcher")
    router = Node("router", "DynamicTokenRouter", links={"model": ("width", 0)}, title="Token Router")
    return layout([
        [note("note", text, size=(460, 560)), unet, clip, vae],
        [prompt, guidance, latent, scheduler, sampler_select, noise],
        [telemetry, patch, width, router],
        [*_sampler("baseline", "telemetry", " (full compute)"), *_sampler("dynamic", "router", " (dynamic)")],
        [Node("report", "DynamicSpeedReport", links={
            "model": ("router", 0), "latent": ("dynamic", 0), "baseline_model": ("telemetry", 0),
            "baseline_latent": ("baseline", 0),
        }), Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        [Node("decode_full", "VAEDecode", links={"samples": ("baseline", 0), "vae": ("vae", 0)}),
         Node("save_full", "SaveImage", {"filename_prefix": "flux2_full_compute"}, {"images": ("decode_full", 0)},
              title="Full compute"),
         Node("decode", "VAEDecode", links={"samples": ("report", 0), "vae": ("vae", 0)}),
         Node("save", "SaveImage", {"filename_prefix": "flux2_dynamic"}, {"images": ("decode", 0)}, title="Dynamic")],
    ])
