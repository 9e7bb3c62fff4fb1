"""WeightSlices: a budget that is known only once the host has loaded the model."""
import torch

from comfyui_dynamic_dit.dynamic_core.slicing import WeightSlices


def test_a_lazy_budget_is_asked_once_and_bounds_the_cache():
    layers = [torch.nn.Linear(16, 16) for _ in range(3)]  # 16x16 float32 + bias = 1088 bytes each
    asked = []
    weights = WeightSlices(max_bytes=lambda: asked.append(1) or 2 * 1100)
    like = torch.zeros(1, 16)
    assert asked == [] and weights.cached_bytes == 0
    for layer in layers:
        weights.get(layer, like, "full", None, None)
    assert asked == [1]
    assert weights.cached_bytes == 2 * 1088  # the least recently used slice went first
    weights.get(layers[2], like, "full", None, None)
    assert weights.hits == 1
    weights.get(layers[0], like, "full", None, None)
    assert weights.misses == 4 and asked == [1]
