import torch
import torch.nn.functional as F

from comfyui_dynamic_dit.core.flops import FlopBreakdown, attention_flops, linear_flops, measure_flops


def test_measure_flops_counts_cpu_attention():
    q = torch.randn(2, 3, 40, 16)
    k = torch.randn(2, 3, 24, 16)
    flops, out = measure_flops(lambda: F.scaled_dot_product_attention(q, k, k))
    assert out.shape == (2, 3, 40, 16)
    assert flops == attention_flops(2, 3, 40, 24, 16) == 4 * 2 * 3 * 40 * 24 * 16


def test_measure_flops_counts_linear_layers():
    layer = torch.nn.Linear(32, 48)
    flops, _ = measure_flops(lambda: layer(torch.randn(5, 7, 32)))
    assert flops == linear_flops(35, 32, 48)


def test_breakdown_arithmetic():
    a = FlopBreakdown(qkv=1.0, mlp=2.0)
    b = FlopBreakdown(attention=3.0, extra=0.5)
    assert (a + b).total == 6.5
    assert a.scaled(2.0).mlp == 4.0
    assert (a + b).as_dict()["total"] == 6.5
