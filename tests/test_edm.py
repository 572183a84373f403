"""EDM identities and the SPEC's numbers for boundaries, ranges and the inference grid."""

import math

import pytest
import torch

import edm

SPEC_BOUNDARIES = {
    2: [0.002, 0.3012001, 80.0],
    3: [0.002, 0.17963247, 0.50504146, 80.0],
    4: [0.002, 0.1340761, 0.3012001, 0.6766486, 80.0],
}


@pytest.mark.parametrize("num_blocks", sorted(SPEC_BOUNDARIES))
def test_boundaries_match_spec(num_blocks):
    got = edm.block_boundaries(num_blocks)
    for g, want in zip(got, SPEC_BOUNDARIES[num_blocks], strict=True):
        assert abs(g - want) / want < 1e-6


def test_boundaries_b6_nest_the_b2_and_b3_boundaries():
    b6 = edm.block_boundaries(6)
    assert len(b6) == 7 and b6 == sorted(b6)
    assert abs(b6[3] - SPEC_BOUNDARIES[2][1]) / SPEC_BOUNDARIES[2][1] < 1e-6
    assert abs(b6[2] - SPEC_BOUNDARIES[3][1]) / SPEC_BOUNDARIES[3][1] < 1e-6
    assert abs(b6[4] - SPEC_BOUNDARIES[3][2]) / SPEC_BOUNDARIES[3][2] < 1e-6


@pytest.mark.parametrize("num_blocks", [2, 3, 4, 6])
def test_each_block_holds_equal_probability_mass(num_blocks):
    q_lo, q_hi = edm.cdf_range()
    for b in range(num_blocks):
        lo, hi = edm.block_range(b, edm.block_boundaries(num_blocks))
        mass = (edm.sigma_to_cdf(hi) - edm.sigma_to_cdf(lo)) / (q_hi - q_lo)
        assert mass == pytest.approx(1 / num_blocks, rel=1e-9)


def test_block_zero_holds_the_highest_noise():
    bounds = edm.block_boundaries(3)
    assert edm.block_range(0, bounds) == pytest.approx((0.50504146, 80.0))
    assert edm.block_range(2, bounds) == pytest.approx((0.002, 0.17963247))


def test_widened_ranges_match_spec():
    want = {2: (0.002, 0.22493), 1: (0.17058, 0.53183), 0: (0.39205, 80.0)}
    for b, (lo, hi) in want.items():
        got_lo, got_hi = edm.widened_block_range(b, edm.block_boundaries(3), 0.05)
        assert got_lo == pytest.approx(lo, rel=1e-4) and got_hi == pytest.approx(hi, rel=1e-4)


def test_inference_grid_b3():
    grid = edm.inference_sigmas(3)
    assert grid[0] == 80.0 and grid[2] == 0.002
    assert abs(grid[1] - 0.3012001) / 0.3012001 < 1e-6


def test_inference_routing_agrees_with_training_partition():
    for partition in edm.PARTITIONS:
        for num_blocks in (2, 3, 4, 6):
            bounds = edm.partition_boundaries(partition, num_blocks)
            for b in range(num_blocks):
                lo, hi = edm.block_range(b, bounds)
                assert edm.block_of_sigma(math.sqrt(lo * hi), bounds) == b
    for num_blocks in (2, 3, 4, 6):
        grid = edm.inference_sigmas(num_blocks)
        assert [edm.block_of_sigma(s, edm.block_boundaries(num_blocks)) for s in grid] == list(range(num_blocks))


def test_grid_sigma_on_a_boundary_goes_to_the_lower_noise_block_as_released():
    """n = 4, B = 3: the grid point at sigma 0.179632 is a boundary; the released float32 grid puts it below it."""
    from dblock import sampler_grid

    grid, bounds = sampler_grid(4, edm.EDMConfig()), edm.block_boundaries(3)
    assert grid[2] == pytest.approx(bounds[1], rel=1e-7)
    assert edm.block_of_sigma(grid[2], bounds) == 2
    # The other inner grid point (0.505041) is a boundary too; float32 rounds it up, into block 0,
    # so this grid never runs block 1: a released behaviour worth knowing before choosing n.
    assert grid[1] > bounds[2] and [edm.block_of_sigma(s, bounds) for s in grid] == [0, 0, 2, 2]


def test_uniform_partition_is_equal_in_log_sigma():
    # 0.002 * 40000**(k / 4): each boundary sqrt(200) = 14.1421356... times the one below.
    want = [0.002, 0.028284271247461905, 0.4, 5.656854249492381, 80.0]
    bounds = edm.uniform_boundaries(4)
    assert bounds == pytest.approx(want, rel=1e-12)
    assert bounds[0] == 0.002 and bounds[-1] == 80.0
    assert edm.partition_boundaries("uniform", 4) == bounds
    assert edm.partition_boundaries("equiprob", 4) == edm.block_boundaries(4)


# EDM preconditioning at sigma_data 0.5, by hand: at sigma = 0.5, sigma^2 + sigma_data^2 = 1/2; at sigma = 2, 17/4.
HAND_SCALINGS = {  # sigma: (c_skip, c_out, c_in, c_noise)
    0.5: (0.5, 0.25 / math.sqrt(0.5), math.sqrt(2.0), math.log(0.5) / 4),  # 0.5, 0.353553, 1.414214, -0.173287
    2.0: (1 / 17, 2 / math.sqrt(17), 2 / math.sqrt(17), math.log(2.0) / 4),  # 0.058824, 0.485071, 0.485071, 0.173287
}


@pytest.mark.parametrize("sigma", sorted(HAND_SCALINGS))
def test_scalings_match_hand_values(sigma):
    got = edm.scalings(torch.tensor([sigma], dtype=torch.float64))
    assert len(got) == 4
    for name, value, want in zip(("c_skip", "c_out", "c_in", "c_noise"), got, HAND_SCALINGS[sigma], strict=True):
        assert value.item() == pytest.approx(want, rel=1e-12), name
    # sigma_data is passed through: c_skip = 1 / (sigma^2 + 1) at sigma_data 1.
    c_skip_at_1 = edm.scalings(torch.tensor([sigma], dtype=torch.float64), 1.0)[0].item()
    assert c_skip_at_1 == pytest.approx({0.5: 0.8, 2.0: 0.2}[sigma])


def test_preconditioning_limits_and_identities():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    sd = edm.EDMConfig().sigma_data
    assert sd == 0.5  # SPEC: sigma_data = 0.5
    assert torch.allclose(edm.c_in(sigma) * torch.sqrt(sigma**2 + sd**2), torch.ones_like(sigma))
    assert torch.allclose(edm.loss_weight(sigma), 1 / edm.c_out(sigma) ** 2)
    assert torch.allclose(edm.loss_weight(sigma), 4 + 1 / sigma**2)
    tiny = torch.tensor([1e-8], dtype=torch.float64)
    assert edm.c_skip(tiny).item() == pytest.approx(1.0, abs=1e-12)
    assert edm.c_out(tiny).item() == pytest.approx(0.0, abs=1e-7)
    assert edm.c_noise(torch.tensor([math.e**4])).item() == pytest.approx(1.0)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_sampled_sigmas_stay_inside_widened_range(block):
    lo, hi = edm.widened_block_range(block, edm.block_boundaries(3), 0.05)
    g = torch.Generator().manual_seed(0)
    s = edm.sample_truncated_lognormal(20000, lo, hi, generator=g)
    assert s.dtype == torch.float32 and s.min() >= lo and s.max() <= hi
    # Truncated log-normal: the median in CDF space is the midpoint of the range's CDF values.
    q_mid = (edm.sigma_to_cdf(lo) + edm.sigma_to_cdf(hi)) / 2
    assert s.median().item() == pytest.approx(edm.cdf_to_sigma(q_mid), rel=0.05)


def test_sampler_generator_is_deterministic():
    a = edm.sample_truncated_lognormal(8, 0.1, 1.0, generator=torch.Generator().manual_seed(3))
    b = edm.sample_truncated_lognormal(8, 0.1, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_euler_step_reaches_denoised_at_zero_sigma():
    z, d = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(edm.euler_step(z, d, 2.0, 0.0), d)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        edm.block_boundaries(0)
    with pytest.raises(ValueError):
        edm.widened_block_range(0, edm.block_boundaries(3), -0.1)
    with pytest.raises(ValueError):
        edm.partition_boundaries("linear", 3)
    with pytest.raises(ValueError):
        edm.inference_sigmas(0)
