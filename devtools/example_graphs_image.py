"""Example workflows of the image DiT families besides Flux.1: each is ComfyUI's own template graph for the family
(its loaders, file names, scheduler and SamplerCustomAdvanced), sampled twice with the same noise: at full compute
(through Dynamic Telemetry) and through the pack's chain, the Speed Report comparing them."""
from __future__ import annotations

from typing import Callable

from .graph_texts import REPORT_HELP, SKIP_BASELINE
from .workflows import Node, layout, note

Guider = Callable[[str, str, str], Node]  # (node key, model key, title suffix) -> the run's guider node


def _custom_sampler(guider: Guider) -> Callable[[str, str, str], list[Node]]:
    """One run of a SamplerCustomAdvanced graph: its guider and SamplerCustomAdvanced on the shared noise, sampler,
    sigmas and latent."""

    def run(key: str, model: str, title: str) -> list[Node]:
        return [guider(f"guider_{key}", model, title),
                Node(key, "SamplerCustomAdvanced", links={"noise": ("noise", 0), "guider": (f"guider_{key}", 0),
                                                          "sampler": ("sampler_select", 0), "sigmas": ("scheduler", 0),
                                                          "latent_image": ("latent", 0)}, title=f"SamplerCustomAdvanced{title}")]

    return run


def _ksampler(sampling: dict) -> Callable[[str, str, str], list[Node]]:
    """One run of a KSampler graph on the shared prompt, negative prompt and latent."""

    def run(key: str, model: str, title: str) -> list[Node]:
        return [Node(key, "KSampler", sampling, {"model": (model, 0), "positive": ("prompt", 0), "negative": ("negative", 0),
                                                 "latent_image": ("latent", 0)}, title=f"KSampler{title}")]

    return run


def _comparison_rows(run: Callable[[str, str, str], list[Node]], chain_end: str, prefix: str) -> list[list[Node]]:
    """The rows every family's comparison ends with: the full-compute and the dynamic run (`run(key, model, title)`
    gives a run's nodes, the last one keyed `key` with the LATENT), the Speed Report and its table, both images
    decoded and saved."""
    return [
        [*run("baseline", "telemetry", " (full compute)"), *run("dynamic", chain_end, " (dynamic)")],
        [Node("report", "DynamicSpeedReport", links={
            "model": (chain_end, 0), "latent": ("dynamic", 0), "baseline_model": ("telemetry", 0),
            "baseline_latent": ("baseline", 0),
        }), Node("table", "PreviewAny", links={"source": ("report", 1)}, title="Per-step table")],
        [Node("decode_full", "VAEDecode", links={"samples": ("baseline", 0), "vae": ("vae", 0)}),
         Node("save_full", "SaveImage", {"filename_prefix": f"{prefix}_full_compute"}, {"images": ("decode_full", 0)},
              title="Full compute"),
         Node("decode", "VAEDecode", links={"samples": ("report", 0), "vae": ("vae", 0)}),
         Node("save", "SaveImage", {"filename_prefix": f"{prefix}_dynamic"}, {"images": ("decode", 0)}, title="Dynamic")],
    ]


def _chain(model: str, methods: list[tuple[str, str, str]]) -> list[Node]:
    """Dynamic Telemetry on `model` (the full-compute run) and the method nodes chained from it: (key, type, title)."""
    nodes = [Node("telemetry", "DynamicTelemetry", links={"model": (model, 0)}, title="Dynamic Telemetry (full compute)")]
    source = model
    for key, node_type, title in methods:
        nodes.append(Node(key, node_type, links={"model": (source, 0)}, title=title))
        source = key
    return nodes


# --- Flux 2 ------------------------------------------------------------------------------------------------
FLUX2_PROMPT = "a photograph of a red fox in fresh snow, morning light, 85mm"
FLUX2_FILES = (
    "**Files** (Comfy-Org/flux2-dev on Hugging Face, the names of ComfyUI's own Flux 2 template): "
    "`flux2_dev_fp8mixed.safetensors` in `models/diffusion_models/`, `mistral_3_small_flux2_bf16.safetensors` "
    "(*Load CLIP* type `flux2`) in `models/text_encoders/`, `flux2-vae.safetensors` in `models/vae/`. Flux 2 Klein "
    "works the same way (`flux-2-klein-4b.safetensors`, `qwen_3_4b.safetensors`)."
)


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

    def guider(key: str, model: str, title: str) -> Node:
        return Node(key, "BasicGuider", links={"model": (model, 0), "conditioning": ("guidance", 0)}, title=f"BasicGuider{title}")

    chain = _chain("unet", [("patch", "DynamicPatchScheduler", "Dynamic Patch Scheduler"),
                            ("width", "DynamicWidthPatcher", "Dynamic Width Patcher"), ("router", "DynamicTokenRouter", "Dynamic Token Router")])
    return layout([
        [note("note", text, size=(460, 560)), unet, clip, vae],
        [prompt, guidance, Node("latent", "EmptyFlux2LatentImage", {**size, "batch_size": 1}),
         Node("scheduler", "Flux2Scheduler", {"steps": 20, **size}),
         Node("sampler_select", "KSamplerSelect", {"sampler_name": "euler"}), Node("noise", "RandomNoise", {"noise_seed": 42})],
        chain,
        *_comparison_rows(_custom_sampler(guider), "router", "flux2"),
    ])


# --- Chroma ------------------------------------------------------------------------------------------------
CHROMA_PROMPT = ("a nature documentary close-up photograph of a tiger's eye and the fur around it, natural light, "
                 "subtle shadows")
CHROMA_NEGATIVE = ("low quality, greyscale, unfinished sketch, blurred, lacks detail, chromatic aberrations, "
                   "oversaturated, toony, bold outlines, flat colors")
CHROMA_FILES = (
    "**Files** (the names of ComfyUI's own Chroma template): `Chroma1-HD-fp8mixed.safetensors` (Comfy-Org/"
    "Chroma1-HD_repackaged) or `Chroma1-HD.safetensors` (lodestones/Chroma1-HD) in `models/diffusion_models/`, "
    "`t5xxl_fp8_e4m3fn_scaled.safetensors` (*Load CLIP* type `chroma`) in `models/text_encoders/`, `ae.safetensors` "
    "in `models/vae/`."
)


def chroma_workflow() -> list[Node]:
    text = (
        "## Chroma text-to-image: full compute next to the dynamic chain\n\n"
        "ComfyUI's stock Chroma graph (Load Diffusion Model → ModelSamplingAuraFlow shift 1 → CFGGuider cfg 3.5 with a "
        "negative prompt → SamplerCustomAdvanced, euler, beta 26 steps, 1024x1024) sampled twice with the same noise: "
        "through **Dynamic Telemetry** (full compute, the baseline) and through **Dynamic Patch Scheduler → Dynamic Width "
        "Patcher → Token Router** at their defaults. On Chroma the Patch Scheduler runs training-free (its `embedding` "
        "stays `none`): the pack places each coarse token at the centre of the region it covers.\n\n"
        f"{REPORT_HELP}\n\n{CHROMA_FILES}\n\n{SKIP_BASELINE}"
    )
    size = {"width": 1024, "height": 1024}
    unet = Node("unet", "UNETLoader", {"unet_name": "Chroma1-HD-fp8mixed.safetensors", "weight_dtype": "default"})
    shift = Node("shift", "ModelSamplingAuraFlow", {"shift": 1.0}, {"model": ("unet", 0)})
    clip = Node("clip", "CLIPLoader", {"clip_name": "t5xxl_fp8_e4m3fn_scaled.safetensors", "type": "chroma", "device": "default"})
    tokens = Node("tokens", "T5TokenizerOptions", {"min_padding": 0, "min_length": 0}, {"clip": ("clip", 0)})
    vae = Node("vae", "VAELoader", {"vae_name": "ae.safetensors"})
    prompt = Node("prompt", "CLIPTextEncode", {"text": CHROMA_PROMPT}, {"clip": ("tokens", 0)}, title="Prompt")
    negative = Node("negative", "CLIPTextEncode", {"text": CHROMA_NEGATIVE}, {"clip": ("tokens", 0)}, title="Negative prompt")

    def guider(key: str, model: str, title: str) -> Node:
        return Node(key, "CFGGuider", {"cfg": 3.5}, {"model": (model, 0), "positive": ("prompt", 0), "negative": ("negative", 0)},
                    title=f"CFGGuider{title}")

    chain = _chain("shift", [("patch", "DynamicPatchScheduler", "Dynamic Patch Scheduler"),
                            ("width", "DynamicWidthPatcher", "Dynamic Width Patcher"), ("router", "DynamicTokenRouter", "Dynamic Token Router")])
    return layout([
        [note("note", text, size=(460, 600)), unet, shift, clip, tokens, vae],
        [prompt, negative, Node("latent", "EmptySD3LatentImage", {**size, "batch_size": 1}),
         Node("scheduler", "BasicScheduler", {"scheduler": "beta", "steps": 26, "denoise": 1.0}, {"model": ("shift", 0)}),
         Node("sampler_select", "KSamplerSelect", {"sampler_name": "euler"}), Node("noise", "RandomNoise", {"noise_seed": 42})],
        chain,
        *_comparison_rows(_custom_sampler(guider), "router", "chroma"),
    ])


# --- Qwen-Image --------------------------------------------------------------------------------------------
QWEN_PROMPT = ("a vibrant, warm neon-lit street scene in Hong Kong in the afternoon, colorful Chinese and English signs "
               "glowing brightly, a bookstore window with the sign \"Dynamic DiT\"")
QWEN_FILES = (
    "**Files** (Comfy-Org/Qwen-Image_ComfyUI, the names of ComfyUI's own Qwen-Image template): "
    "`qwen_image_fp8_e4m3fn.safetensors` in `models/diffusion_models/`, `Qwen-Image-Lightning-8steps-V1.0.safetensors` "
    "(lightx2v/Qwen-Image-Lightning) in `models/loras/`, `qwen_2.5_vl_7b_fp8_scaled.safetensors` (*Load CLIP* type "
    "`qwen_image`) in `models/text_encoders/`, `qwen_image_vae.safetensors` in `models/vae/`. Without the Lightning "
    "LoRA (bypass it with Ctrl+B): 20 steps, cfg 2.5."
)


def qwen_image_workflow() -> list[Node]:
    text = (
        "## Qwen-Image text-to-image (Lightning, 8 steps): full compute next to the dynamic chain\n\n"
        "ComfyUI's stock Qwen-Image graph (Load Diffusion Model → the 8-step Lightning LoRA → ModelSamplingAuraFlow "
        "shift 3.1 → KSampler euler / simple, 8 steps, cfg 1, 1328x1328) sampled twice with the same seed: through "
        "**Dynamic Telemetry** (full compute, the baseline) and through **Dynamic Patch Scheduler → Dynamic Width "
        "Patcher → Token Router** at their defaults, with the LoRA applied before them (they compose in either order). "
        "The Patch Scheduler runs Qwen-Image training-free; at 8 steps its `auto` has little history to decide from "
        "(it keeps the first three and the last two steps native). Qwen-Image Edit works the same way: the reference "
        "image's tokens always run every block in full, at their own size.\n\n"
        f"{REPORT_HELP}\n\n{QWEN_FILES}\n\n{SKIP_BASELINE}"
    )
    unet = Node("unet", "UNETLoader", {"unet_name": "qwen_image_fp8_e4m3fn.safetensors", "weight_dtype": "default"})
    lora = Node("lora", "LoraLoaderModelOnly", {"lora_name": "Qwen-Image-Lightning-8steps-V1.0.safetensors", "strength_model": 1.0},
                {"model": ("unet", 0)}, title="Lightning LoRA (8 steps)")
    shift = Node("shift", "ModelSamplingAuraFlow", {"shift": 3.1}, {"model": ("lora", 0)})
    clip = Node("clip", "CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image", "device": "default"})
    vae = Node("vae", "VAELoader", {"vae_name": "qwen_image_vae.safetensors"})
    prompt = Node("prompt", "CLIPTextEncode", {"text": QWEN_PROMPT}, {"clip": ("clip", 0)}, title="Prompt")
    negative = Node("negative", "CLIPTextEncode", {"text": ""}, {"clip": ("clip", 0)}, title="Negative prompt")
    sampling = {"seed": 42, "steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    chain = _chain("shift", [("patch", "DynamicPatchScheduler", "Dynamic Patch Scheduler"),
                            ("width", "DynamicWidthPatcher", "Dynamic Width Patcher"), ("router", "DynamicTokenRouter", "Dynamic Token Router")])
    return layout([
        [note("note", text, size=(460, 640)), unet, lora, shift, clip, vae],
        [prompt, negative, Node("latent", "EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1})],
        chain,
        *_comparison_rows(_ksampler(sampling), "router", "qwen_image"),
    ])


QWEN_EDIT_PROMPT = "replace the cat with a dalmatian"
QWEN_EDIT_FILES = (
    "**Files** (Comfy-Org/Qwen-Image-Edit_ComfyUI, the names of ComfyUI's own Qwen-Image Edit 2509 template): "
    "`qwen_image_edit_2509_fp8_e4m3fn.safetensors` in `models/diffusion_models/`, "
    "`Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors` (lightx2v) in `models/loras/`, "
    "`qwen_2.5_vl_7b_fp8_scaled.safetensors` (*Load CLIP* type `qwen_image`) and `qwen_image_vae.safetensors` as for "
    "Qwen-Image; the image to edit in `input/`. Edit 2511 works the same way (its references are modulated at timestep 0 "
    "on ComfyUI 0.12 and newer)."
)


def qwen_image_edit_workflow() -> list[Node]:
    text = (
        "## Qwen-Image Edit 2509 (Lightning, 4 steps): full compute next to the dynamic chain\n\n"
        "ComfyUI's stock Qwen-Image Edit graph (Load Image → FluxKontextImageScale → VAE Encode for the canvas, "
        "TextEncodeQwenImageEditPlus with the image as reference, the 4-step Lightning LoRA → ModelSamplingAuraFlow 3 → "
        "CFGNorm → KSampler euler / simple, 4 steps, cfg 1) sampled twice with the same seed: through **Dynamic "
        "Telemetry** (full compute) and through **Dynamic Width Patcher → Token Router** at their defaults. The "
        "reference image's tokens run every block in full: the Token Router routes only the tokens of the image "
        "being made, so the edit keeps reading its source as it is. The **Dynamic Patch Scheduler** runs edits too (the "
        "reference keeps its own size), but at 4 steps its `auto` mode keeps every step native, so it is left out.\n\n"
        f"{REPORT_HELP}\n\n{QWEN_EDIT_FILES}\n\n{SKIP_BASELINE}"
    )
    unet = Node("unet", "UNETLoader", {"unet_name": "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "weight_dtype": "default"})
    lora = Node("lora", "LoraLoaderModelOnly", {"lora_name": "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors",
                                                "strength_model": 1.0}, {"model": ("unet", 0)}, title="Lightning LoRA (4 steps)")
    shift = Node("shift", "ModelSamplingAuraFlow", {"shift": 3.0}, {"model": ("lora", 0)})
    norm = Node("norm", "CFGNorm", {"strength": 1.0}, {"model": ("shift", 0)})
    clip = Node("clip", "CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image", "device": "default"})
    vae = Node("vae", "VAELoader", {"vae_name": "qwen_image_vae.safetensors"})
    image = Node("image", "LoadImage", {"image": "image_qwen_image_edit_2509_input_image.png"}, title="Image to edit")
    scaled = Node("scaled", "FluxKontextImageScale", links={"image": ("image", 0)})
    latent = Node("latent", "VAEEncode", links={"pixels": ("scaled", 0), "vae": ("vae", 0)})
    encode = {"clip": ("clip", 0), "vae": ("vae", 0), "image1": ("scaled", 0)}
    prompt = Node("prompt", "TextEncodeQwenImageEditPlus", {"prompt": QWEN_EDIT_PROMPT}, encode, title="Prompt")
    negative = Node("negative", "TextEncodeQwenImageEditPlus", {"prompt": ""}, encode, title="Negative prompt")
    sampling = {"seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    chain = _chain("norm", [("width", "DynamicWidthPatcher", "Dynamic Width Patcher"), ("router", "DynamicTokenRouter", "Dynamic Token Router")])
    return layout([
        [note("note", text, size=(460, 640)), unet, lora, shift, norm, clip, vae],
        [image, scaled, latent, prompt, negative],
        chain,
        *_comparison_rows(_ksampler(sampling), "router", "qwen_image_edit"),
    ])


# --- Z-Image Turbo -----------------------------------------------------------------------------------------
Z_IMAGE_PROMPT = ("realistic photo, close-up of a fox peeking through pine branches, dappled sunlight on its face, "
                  "natural colors, shallow depth of field")
Z_IMAGE_FILES = (
    "**Files** (Comfy-Org/z_image_turbo, the names of ComfyUI's own Z-Image-Turbo templates): "
    "`z_image_turbo_bf16.safetensors` in `models/diffusion_models/`, `qwen_3_4b.safetensors` (*Load CLIP* type "
    "`lumina2`) in `models/text_encoders/`, `ae.safetensors` in `models/vae/`. Z-Image (base, "
    "`z_image_bf16.safetensors`) works the same way at its template's 25 steps, cfg 4."
)


def z_image_turbo_workflow() -> list[Node]:
    text = (
        "## Z-Image-Turbo text-to-image (9 steps): full compute next to the dynamic chain\n\n"
        "ComfyUI's stock Z-Image-Turbo graph (Load Diffusion Model → ModelSamplingAuraFlow shift 3 → KSampler "
        "res_multistep / simple, 9 steps, cfg 1, the negative prompt zeroed, 1024x1024) sampled twice with the same "
        "seed: through **Dynamic Telemetry** (full compute, the baseline) and through **Dynamic Patch Scheduler → "
        "Dynamic Width Patcher → Token Router** at their defaults. Z-Image's blocks have no patch point of their own "
        "in ComfyUI: the pack adds one to each block through ComfyUI's object patches, which ComfyUI applies and "
        "removes with the model. At 9 steps the Patch Scheduler's `auto` has little history to decide from (it keeps "
        "the first three and the last two steps native); a manual schedule such as `0-35%:2` coarsens early steps "
        "on purpose.\n\n"
        f"{REPORT_HELP}\n\n{Z_IMAGE_FILES}\n\n{SKIP_BASELINE}"
    )
    unet = Node("unet", "UNETLoader", {"unet_name": "z_image_turbo_bf16.safetensors", "weight_dtype": "default"})
    shift = Node("shift", "ModelSamplingAuraFlow", {"shift": 3.0}, {"model": ("unet", 0)})
    clip = Node("clip", "CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"})
    vae = Node("vae", "VAELoader", {"vae_name": "ae.safetensors"})
    prompt = Node("prompt", "CLIPTextEncode", {"text": Z_IMAGE_PROMPT}, {"clip": ("clip", 0)}, title="Prompt")
    negative = Node("negative", "ConditioningZeroOut", links={"conditioning": ("prompt", 0)}, title="Negative (zeroed)")
    sampling = {"seed": 42, "steps": 9, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple", "denoise": 1.0}
    chain = _chain("shift", [("patch", "DynamicPatchScheduler", "Dynamic Patch Scheduler"),
                             ("width", "DynamicWidthPatcher", "Dynamic Width Patcher"), ("router", "DynamicTokenRouter", "Dynamic Token Router")])
    return layout([
        [note("note", text, size=(460, 640)), unet, shift, clip, vae],
        [prompt, negative, Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1})],
        chain,
        *_comparison_rows(_ksampler(sampling), "router", "z_image_turbo"),
    ])


# --- SD3.5 Large ------------------------------------------------------------------------------------------
SD3_PROMPT = "a crystal pink dragon in a blue mystery sky, hyperdetailed"
SD3_FILES = (
    "**Files** (Comfy-Org/stable-diffusion-3.5-fp8, the name in ComfyUI's own SD3.5 templates): "
    "`sd3.5_large_fp8_scaled.safetensors` in `models/checkpoints/` (model, text encoders and VAE in one file). SD3.5 "
    "Medium and Large Turbo work the same way."
)


def sd35_large_workflow() -> list[Node]:
    text = (
        "## SD3.5 Large text-to-image: full compute next to the dynamic chain\n\n"
        "ComfyUI's stock SD3.5 graph (Load Checkpoint → KSampler euler / simple, 32 steps, cfg 4.5, the negative "
        "zeroed, 1024x1024) sampled twice with the same seed: through **Dynamic Telemetry** (full compute, the "
        "baseline) and through **Dynamic Patch Scheduler → Dynamic Width Patcher → Token Router** at their defaults. "
        "SD3's forward runs no model wrappers of its own: the pack adds that point through ComfyUI's object patches. "
        "The Patch Scheduler runs SD3 training-free, a coarse token taking the absolute position embeddings "
        "interpolated at the centre of its region.\n\n"
        f"{REPORT_HELP}\n\n{SD3_FILES}\n\n{SKIP_BASELINE}"
    )
    checkpoint = Node("checkpoint", "CheckpointLoaderSimple", {"ckpt_name": "sd3.5_large_fp8_scaled.safetensors"})
    prompt = Node("prompt", "CLIPTextEncode", {"text": SD3_PROMPT}, {"clip": ("checkpoint", 1)}, title="Prompt")
    negative = Node("negative", "ConditioningZeroOut", links={"conditioning": ("prompt", 0)}, title="Negative (zeroed)")
    sampling = {"seed": 42, "steps": 32, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    chain = _chain("checkpoint", [("patch", "DynamicPatchScheduler", "Dynamic Patch Scheduler"),
                                 ("width", "DynamicWidthPatcher", "Dynamic Width Patcher"), ("router", "DynamicTokenRouter", "Dynamic Token Router")])
    rows = _comparison_rows(_ksampler(sampling), "router", "sd35_large")
    for node in rows[-1]:  # the checkpoint holds the VAE
        if node.type == "VAEDecode":
            node.links["vae"] = ("checkpoint", 2)
    return layout([
        [note("note", text, size=(460, 600)), checkpoint],
        [prompt, negative, Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1})],
        chain,
        *rows,
    ])


# --- PixArt-Σ ---------------------------------------------------------------------------------------------
PIXART_PROMPT = "a small cactus with a happy face in the Sahara desert, photo"
PIXART_FILES = (
    "**Files** (PixArt-alpha/PixArt-Sigma, the names ComfyUI's PixArt examples use): `PixArt-Sigma-XL-2-1024-MS.pth` in "
    "`models/diffusion_models/`, `t5xxl_fp16.safetensors` (*Load CLIP* type `pixart`) in `models/text_encoders/`, "
    "`sdxl_vae.safetensors` in `models/vae/`. The 512 px and 2K PixArt-Σ checkpoints work the same way."
)


def pixart_sigma_workflow() -> list[Node]:
    text = (
        "## PixArt-Σ text-to-image: full compute next to the dynamic chain\n\n"
        "The usual PixArt-Σ graph (Load Diffusion Model, T5-XXL through *Load CLIP* type `pixart`, the SDXL VAE → "
        "KSampler euler / normal, 20 steps, cfg 4.5, 1024x1024) sampled twice with the same seed: through **Dynamic "
        "Telemetry** (full compute, the baseline) and through **Dynamic Patch Scheduler → Dynamic Width Patcher → "
        "Token Router** at their defaults. PixArt's blocks and forward have no patch points of their own in ComfyUI: "
        "the pack adds them through ComfyUI's object patches. PixArt predicts noise on a discrete schedule: the Patch "
        "Scheduler's coarse steps run training-free with that arithmetic.\n\n"
        f"{REPORT_HELP}\n\n{PIXART_FILES}\n\n{SKIP_BASELINE}"
    )
    unet = Node("unet", "UNETLoader", {"unet_name": "PixArt-Sigma-XL-2-1024-MS.pth", "weight_dtype": "default"})
    clip = Node("clip", "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"})
    vae = Node("vae", "VAELoader", {"vae_name": "sdxl_vae.safetensors"})
    prompt = Node("prompt", "CLIPTextEncode", {"text": PIXART_PROMPT}, {"clip": ("clip", 0)}, title="Prompt")
    negative = Node("negative", "CLIPTextEncode", {"text": ""}, {"clip": ("clip", 0)}, title="Negative prompt")
    sampling = {"seed": 42, "steps": 20, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    chain = _chain("unet", [("patch", "DynamicPatchScheduler", "Dynamic Patch Scheduler"),
                            ("width", "DynamicWidthPatcher", "Dynamic Width Patcher"), ("router", "DynamicTokenRouter", "Dynamic Token Router")])
    return layout([
        [note("note", text, size=(460, 600)), unet, clip, vae],
        [prompt, negative, Node("latent", "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1})],
        chain,
        *_comparison_rows(_ksampler(sampling), "router", "pixart_sigma"),
    ])
