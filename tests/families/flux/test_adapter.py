import pytest
import torch

from comfyui_dynamic_dit.families import UnsupportedModelError, adapter_for
from comfyui_dynamic_dit.families.flux import DOUBLE, SINGLE
from comfyui_dynamic_dit.integration.patching import adapter_of
from comfyui_dynamic_dit.core.flops import measure_flops


def test_describes_the_tiny_flux(flux_model, tiny_config):
    adapter = adapter_of(flux_model)
    arch = adapter.arch
    assert (arch.hidden_size, arch.num_heads, arch.head_dim) == (256, 4, 64)
    assert arch.mlp_hidden == 1024
    assert (arch.depth_double, arch.depth_single) == (tiny_config.depth, tiny_config.depth_single_blocks)
    assert [b.kind for b in adapter.blocks] == [DOUBLE] * 2 + [SINGLE] * 4
    assert adapter.patch_key(adapter.blocks[3]) == ("single_block", 1)


@pytest.mark.parametrize(
    "height,width,text,batch,guidance",
    [(32, 32, 8, 2, True), (30, 34, 7, 1, True), (17, 23, 5, 3, False)],
)
def test_analytic_flops_match_flop_counter(flux_model, height, width, text, batch, guidance):
    model = flux_model.model.diffusion_model
    adapter = adapter_of(flux_model)
    arguments = dict(
        x=torch.randn(batch, 16, height, width),
        timestep=torch.full((batch,), 0.7),
        context=torch.randn(batch, text, 64),
        y=torch.randn(batch, 32),
        guidance=torch.full((batch,), 3.5) if guidance else None,
    )
    with torch.no_grad():
        measured, _ = measure_flops(lambda: model(**arguments, transformer_options={}))
    analytic = adapter.full_flops(adapter.call_layout(arguments)).total
    assert measured > 0
    assert analytic == pytest.approx(measured, rel=0.02)


def test_analytic_flops_count_kontext_reference_tokens(flux_model):
    model = flux_model.model.diffusion_model
    adapter = adapter_of(flux_model)
    arguments = dict(
        x=torch.randn(1, 16, 16, 16),
        timestep=torch.full((1,), 0.5),
        context=torch.randn(1, 6, 64),
        y=torch.randn(1, 32),
        guidance=torch.full((1,), 3.5),
        ref_latents=[torch.randn(1, 16, 12, 20)],
    )
    with torch.no_grad():
        measured, _ = measure_flops(lambda: model(**arguments, transformer_options={}))
    shape = adapter.call_layout(arguments)
    assert shape.image_tokens == 64 + 60
    assert adapter.full_flops(shape).total == pytest.approx(measured, rel=0.02)


def test_refuses_other_families_naming_the_supported_ones():
    class NotADiT(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match=r"'NotADiT'.*Supported: Flux\.1"):
        adapter_for(NotADiT())
