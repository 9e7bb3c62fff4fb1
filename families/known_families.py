"""Plain names of the model families this pack refuses, for the error a person reads.

Keyed by the host's model class name (`type(model_patcher.model).__name__`, ComfyUI's model_base) and,
where the host name is missing, by the diffusion model's class. Only names: nothing here patches.
"""
from __future__ import annotations

HOST_MODEL_NAMES: dict[str, str] = {
    "BaseModel": "SD1.5 / SD2 UNet",
    "SD21UNCLIP": "SD2.1 unCLIP UNet",
    "SDXL": "SDXL UNet",
    "SDXLRefiner": "SDXL Refiner UNet",
    "SVD_img2vid": "Stable Video Diffusion UNet",
    "Stable_Zero123": "Stable Zero123 UNet",
    "SD_X4Upscaler": "SD x4 Upscaler UNet",
    "Lotus": "Lotus UNet",
    "StableCascade_C": "Stable Cascade (stage C)",
    "StableCascade_B": "Stable Cascade (stage B)",
    "AuraFlow": "AuraFlow",
    "StableAudio1": "Stable Audio",
    "HunyuanDiT": "Hunyuan-DiT",
    "PixArt": "PixArt",
    "ChromaRadiance": "Chroma Radiance",
    "GenmoMochi": "Mochi video",
    "HunyuanVideo": "HunyuanVideo",
    "CosmosVideo": "Cosmos video",
    "CosmosPredict2": "Cosmos Predict2",
    "Lumina2": "Lumina 2",
    "WAN21_Vace": "Wan 2.1 VACE",
    "WAN21_Camera": "Wan 2.1 camera control",
    "WAN21_HuMo": "Wan HuMo",
    "WAN22_Animate": "Wan 2.2 Animate",
    "WAN22_S2V": "Wan 2.2 speech-to-video",
    "Hunyuan3Dv2": "Hunyuan3D 2",
    "Hunyuan3Dv2_1": "Hunyuan3D 2.1",
    "HiDream": "HiDream",
    "ACEStep": "ACE-Step audio",
    "Omnigen2": "OmniGen2",
    "HunyuanImage21": "HunyuanImage 2.1",
}

DIFFUSION_MODEL_NAMES: dict[str, str] = {
    "UNetModel": "UNet (SD1.5 / SD2 / SDXL)",
    "MMDiT": "MMDiT",
    "ChromaRadiance": "Chroma Radiance",
}


def plain_name(host_model_name: str | None, diffusion_class: type) -> str | None:
    """What a person calls this model (the host's model type by its usual name), or None when unknown."""
    if host_model_name in HOST_MODEL_NAMES:
        return HOST_MODEL_NAMES[host_model_name]
    return DIFFUSION_MODEL_NAMES.get(diffusion_class.__name__)
