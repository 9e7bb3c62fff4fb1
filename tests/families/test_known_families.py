"""A refused family names itself plainly, not by its class path."""
import pytest
import torch

from comfyui_dynamic_dit.families import UnsupportedModelError, adapter_for


class UNetModel(torch.nn.Module):  # the name ComfyUI's SD1.5 / SDXL UNet class has
    pass


@pytest.mark.parametrize("host_name, plain", [("SDXL", "SDXL UNet"), ("BaseModel", "SD1.5 / SD2 UNet"), ("AuraFlow", "AuraFlow"),
                                              ("HunyuanVideo", "HunyuanVideo")])
def test_refused_families_are_named_plainly(host_name, plain):
    with pytest.raises(UnsupportedModelError, match=rf"does not support {plain} models\. Supported: Flux\.1") as error:
        adapter_for(UNetModel(), host_name)
    assert "openaimodel" not in str(error.value) and "UNetModel" not in str(error.value)


def test_a_diffusion_model_class_alone_is_named_too():
    with pytest.raises(UnsupportedModelError, match=r"does not support UNet \(SD1\.5 / SD2 / SDXL\) models"):
        adapter_for(UNetModel())
