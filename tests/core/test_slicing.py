"""Axis selections and narrowed layers: views when kept units are contiguous, one gather otherwise,
and the host layer's own op on exactly the kept part."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_dynamic_dit.core.slicing import AxisSelection, ReducedLinear, narrowed_layer


def test_contiguous_units_are_a_view_and_scattered_units_one_gather():
    weight = torch.randn(12, 5)
    prefix = AxisSelection.of_units((0, 1), 3)
    assert prefix.contiguous and prefix.runs == ((0, 6),) and prefix.size == 6
    view = prefix.take(weight, 0)
    assert view.data_ptr() == weight.data_ptr() and torch.equal(view, weight[:6])
    scattered = AxisSelection.of_units((0, 2), 3)
    assert not scattered.contiguous and scattered.runs == ((0, 3), (6, 9))
    assert torch.equal(scattered.take(weight, 0), weight[[0, 1, 2, 6, 7, 8]])
    assert scattered.index("cpu") is scattered.index("cpu")  # made once, then reused


def test_selections_concatenate_shift_and_merge():
    heads = AxisSelection.of_units((1,), 2)
    qkv = heads + heads.shifted(4) + heads.shifted(8)
    assert qkv.runs == ((2, 4), (6, 8), (10, 12))
    assert (AxisSelection.span(0, 3) + AxisSelection.span(3, 5)).runs == ((0, 5),)
    with pytest.raises(ValueError):
        AxisSelection([])


class Wrapped(torch.nn.Linear):
    """A layer type with its own forward (as ComfyUI's ops have)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 2.0


def test_narrowed_layer_runs_the_layer_class_own_forward_on_the_kept_part():
    torch.manual_seed(0)
    layer = Wrapped(6, 8)
    x = torch.randn(3, 6)
    rows, cols = AxisSelection([(1, 3), (5, 8)]), AxisSelection.span(2, 6)
    got = ReducedLinear(layer, rows, cols)(x[:, 2:6])
    expected = F.linear(x[:, 2:6], layer.weight[[1, 2, 5, 6, 7]][:, 2:6], layer.bias[[1, 2, 5, 6, 7]]) * 2.0
    torch.testing.assert_close(got, expected)
    reduced = narrowed_layer(layer, rows, cols)
    assert layer.weight.shape == (8, 6) and reduced.weight.shape == (5, 4)  # the layer is untouched


def test_weight_functions_see_the_whole_weight_and_are_narrowed_after():
    layer = torch.nn.Linear(4, 6)
    seen = []

    def double(w):
        seen.append(tuple(w.shape))
        return w * 2

    layer.weight_function, layer.bias_function, layer.comfy_cast_weights = [double], [], False
    rows = AxisSelection.span(2, 5)
    reduced = narrowed_layer(layer, rows, None)
    assert reduced.weight_function[0] is double and len(reduced.weight_function) == 2
    assert reduced.weight_function[1](layer.weight).shape == (3, 4)
    assert layer.weight_function == [double]  # the host's list is not modified


def test_a_replaced_forward_gets_the_full_input_and_gives_the_kept_rows():
    torch.manual_seed(1)
    layer = torch.nn.Linear(6, 8)
    extra = torch.randn(8, 6) * 0.1
    original = layer.forward
    layer.forward = lambda x: original(x) + F.linear(x, extra)  # e.g. a bypass-mode LoRA
    rows, cols = AxisSelection.of_units((0, 2), 2), AxisSelection.span(0, 3)
    x = torch.randn(2, 3)
    got = ReducedLinear(layer, rows, cols)(x)
    merged = layer.weight + extra
    torch.testing.assert_close(got, F.linear(x, merged[[0, 1, 4, 5], :3], layer.bias[[0, 1, 4, 5]]))
