"""DDiT's Δ³ statistics on synthetic trajectories: patch spread, percentile, relative ratios, the rule."""
import math

import pytest
import torch

from comfyui_dynamic_dit.methods.patch_scheduler.statistics import (
    choose_patch_factor,
    patch_statistic,
    percentile,
    relative_roughness,
    roughness,
    third_difference,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def quadratic_trajectory(shape=(2, 16, 32, 32), seed=0, dtype=torch.float32):
    """Step latents z_s = a + b s + c s^2 for four consecutive steps s."""
    a, b, c = (torch.randn(shape, generator=gen(seed + i), dtype=torch.float64) for i in range(3))
    return [(a + b * s + c * s * s).to(dtype) for s in (4.0, 5.0, 6.0, 7.0)]


# --- Δ³ scheduler -------------------------------------------------------------------------------------
def rough_trajectory(shape=(2, 16, 32, 32), seed=30, size=0.05):
    """A quadratic trajectory plus a new pixel-level pattern at every step: Δ³ is dominated by per-pixel changes."""
    return [z + size * torch.randn(z.shape, generator=gen(seed + i)) for i, z in enumerate(quadratic_trajectory(shape))]


def test_quadratic_trajectory_has_zero_third_difference_and_gets_the_coarsest_patch():
    assert third_difference(quadratic_trajectory(dtype=torch.float64)).abs().max() < 1e-12
    latents = quadratic_trajectory()  # float32 like the sampler's latents: Δ³ is rounding noise only
    assert third_difference(latents).abs().max() < 1e-4
    values = roughness(latents, (2, 4), native_patch=2, epsilon=0.4)
    relative = relative_roughness(values, roughness(rough_trajectory(), (2, 4), 2, 0.4))
    assert relative.shape == (2,) and relative.max() < 1e-3
    decision = choose_patch_factor(dict(zip((2, 4), relative.tolist())), tau=1.5, epsilon=0.4, reference_step=3)
    assert decision.factor == 4
    assert decision.reason.startswith("patch 4x (Δ³ p40 = 0.00 × step 3's < τ 1.5)")


def test_strong_high_frequency_changes_keep_the_native_patch():
    values = roughness(rough_trajectory(), (2, 4), native_patch=2, epsilon=0.4)
    # std of 0.05 * (1, -3, 3, -1)-weighted noise is 0.05 * sqrt(20) in every patch
    assert values[0] == pytest.approx(torch.full((2,), 0.05 * math.sqrt(20), dtype=torch.float64), rel=0.15)
    relative = relative_roughness(values, roughness(quadratic_trajectory(), (2, 4), 2, 0.4) + 1e-3)
    decision = choose_patch_factor(dict(zip((2, 4), relative.tolist())), tau=1.5, epsilon=0.4, reference_step=3)
    assert decision.factor == 1
    assert decision.reason.startswith("native (Δ³ p40: 2x ") and decision.reason.endswith("× step 3's ≥ τ 1.5)")


def test_largest_patch_below_tau_wins():
    """Δ³ constant over 4x4 regions (per channel) but changing between them: 2x patches (4x4 latent
    pixels) see no variation, 4x patches (8x8) do."""
    base = quadratic_trajectory(shape=(1, 16, 32, 32))
    blocks = torch.randn(1, 16, 8, 8, generator=gen(3)).repeat_interleave(4, -2).repeat_interleave(4, -1)
    latents = [z + (0.1 * blocks if i == 3 else 0) for i, z in enumerate(base)]
    values = roughness(latents, (2, 4), 2, 0.4)
    assert values[0, 0] < 1e-4 and values[1, 0] > 0.05
    relative = dict(zip((2, 4), relative_roughness(values, torch.full_like(values, 0.01)).tolist()))
    assert choose_patch_factor(relative, tau=1.5, epsilon=0.4, reference_step=3).factor == 2
    assert choose_patch_factor(relative, tau=1e3, epsilon=0.4, reference_step=3).factor == 4


def test_the_most_conservative_sample_decides_for_the_batch():
    """Each sample is measured against its own yardstick; the largest ratio counts."""
    values = torch.tensor([[0.010, 0.030]])  # one factor, two samples
    assert relative_roughness(values, torch.tensor([[0.010, 0.010]])).item() == pytest.approx(3.0)
    assert relative_roughness(values, torch.tensor([[0.001, 0.030]])).item() == pytest.approx(10.0)


def test_a_zero_yardstick_is_handled():
    values, zero = torch.tensor([[0.0, 0.2]]), torch.zeros(1, 2)
    assert relative_roughness(torch.zeros(1, 2), zero).item() == 0.0  # still perfectly smooth
    assert relative_roughness(values, zero).item() == math.inf  # any roughness is infinitely more


@pytest.mark.parametrize("q", [0.0, 0.13, 0.4, 0.5, 1.0])
def test_percentile_is_torch_quantile(q):
    values = torch.randn(3, 37, generator=gen(12), dtype=torch.float64)
    assert torch.allclose(percentile(values, q), torch.quantile(values, q, dim=-1))


def test_epsilon_is_a_percentile_over_patches():
    """Δ³ busy in the top 30% of 4x4 patches only: the 20th percentile passes, the 80th does not."""
    delta = torch.zeros(1, 4, 40, 40)
    delta[:, :, :12] = torch.randn(1, 4, 12, 40, generator=gen(5))
    values = patch_statistic(delta, 4, 0.2), patch_statistic(delta, 4, 0.8)
    assert values[0].item() == 0.0 and values[1].item() > 0.5


def test_uniform_change_per_channel_is_no_variation():
    delta = torch.randn(1, 16, 1, 1, generator=gen(11)).expand(1, 16, 24, 24) * 5
    assert patch_statistic(delta, 8, 0.4).item() < 1e-9


def test_patch_statistic_on_odd_sizes_counts_partial_patches_by_their_pixels():
    delta = torch.randn(2, 3, 13, 10, generator=gen(6)).double()
    patch, epsilon = 4, 0.4
    expected = []
    for b in range(2):
        stds = [
            delta[b, :, i : i + patch, j : j + patch].var(dim=(1, 2), unbiased=False).mean().sqrt()
            for i in range(0, 13, patch)
            for j in range(0, 10, patch)
        ]
        expected.append(torch.quantile(torch.stack(stds), epsilon))
    assert torch.allclose(patch_statistic(delta, patch, epsilon), torch.stack(expected))
