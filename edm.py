"""EDM pieces for DiffusionBlocks (Karras et al. 2022 preconditioning, as used by the paper).

Every function is pure and device-agnostic: tensors in, tensors out, on the caller's device and
dtype. Names follow the EDM paper: sigma (noise level), sigma_data, P_mean, P_std, c_skip, c_out,
c_in, c_noise. The paper's notation for the block partition: B blocks, block 0 handles the
HIGHEST noise levels, block B-1 the lowest.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EDMConfig:
    """Constants of the noise distribution and preconditioning (defaults: the paper's, EDM's Table 1)."""

    sigma_data: float = 0.5  # the data standard deviation the preconditioning assumes (EDM's value, kept by the paper)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    P_mean: float = -1.2  # mean of ln(sigma) under the training log-normal
    P_std: float = 1.2  # standard deviation of ln(sigma) under the training log-normal


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions to x until it has target_ndim dimensions."""
    return x.reshape(x.shape + (1,) * (target_ndim - x.ndim))


def c_skip(sigma: torch.Tensor, sigma_data: float = EDMConfig.sigma_data) -> torch.Tensor:
    """EDM skip scaling sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float = EDMConfig.sigma_data) -> torch.Tensor:
    """EDM output scaling sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma: torch.Tensor, sigma_data: float = EDMConfig.sigma_data) -> torch.Tensor:
    """EDM input scaling 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1.0 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """EDM noise conditioning ln(sigma) / 4."""
    return torch.log(sigma) / 4.0


def scalings(
    sigma: torch.Tensor, sigma_data: float = EDMConfig.sigma_data
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): (c_skip, c_out, c_in, c_noise) of each sigma."""
    return c_skip(sigma, sigma_data), c_out(sigma, sigma_data), c_in(sigma, sigma_data), c_noise(sigma)


def loss_weight(sigma: torch.Tensor, sigma_data: float = EDMConfig.sigma_data) -> torch.Tensor:
    """EDM loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, i.e. 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _normal_cdf(x: float) -> float:
    """Standard normal CDF Phi(x) in float64."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _normal_icdf(q: float) -> float:
    """Standard normal quantile Phi^-1(q) in float64."""
    return float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))


def sigma_to_cdf(sigma: float, cfg: EDMConfig = EDMConfig()) -> float:
    """Probability that the training log-normal puts below sigma."""
    return _normal_cdf((math.log(sigma) - cfg.P_mean) / cfg.P_std)


def cdf_to_sigma(q: float, cfg: EDMConfig = EDMConfig()) -> float:
    """Inverse of sigma_to_cdf: the noise level at probability q of the training log-normal."""
    return math.exp(cfg.P_mean + cfg.P_std * _normal_icdf(q))


def cdf_range(cfg: EDMConfig = EDMConfig()) -> tuple[float, float]:
    """(q_lo, q_hi): the log-normal's probability at sigma_min and sigma_max."""
    return sigma_to_cdf(cfg.sigma_min, cfg), sigma_to_cdf(cfg.sigma_max, cfg)


PARTITIONS = ("equiprob", "uniform")


def block_boundaries(num_blocks: int, cfg: EDMConfig = EDMConfig()) -> list[float]:
    """Equi-probability boundaries sigma_0 < ... < sigma_B (ascending): the truncated log-normal in B equal masses."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    q_lo, q_hi = cdf_range(cfg)
    inner = [cdf_to_sigma(q_lo + (q_hi - q_lo) * i / num_blocks, cfg) for i in range(1, num_blocks)]
    return [cfg.sigma_min, *inner, cfg.sigma_max]


def uniform_boundaries(num_blocks: int, cfg: EDMConfig = EDMConfig()) -> list[float]:
    """Ascending boundaries equally spaced in log sigma from sigma_min to sigma_max (the paper's uniform partition)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
    inner = [math.exp(lo + (hi - lo) * i / num_blocks) for i in range(1, num_blocks)]
    return [cfg.sigma_min, *inner, cfg.sigma_max]


def partition_boundaries(partition: str, num_blocks: int, cfg: EDMConfig = EDMConfig()) -> list[float]:
    """Ascending block boundaries of a named partition: `equiprob` (released) or `uniform` in log sigma."""
    if partition == "equiprob":
        return block_boundaries(num_blocks, cfg)
    if partition == "uniform":
        return uniform_boundaries(num_blocks, cfg)
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")


def block_range(block: int, bounds: list[float]) -> tuple[float, float]:
    """(lo, hi) noise range of a block given ascending boundaries; block 0 holds the highest noise."""
    k = len(bounds) - 2 - block
    return bounds[k], bounds[k + 1]


def widened_block_range(
    block: int, bounds: list[float], gamma: float, cfg: EDMConfig = EDMConfig()
) -> tuple[float, float]:
    """Block range widened by gamma * ln(hi/lo) on each side in log space, clipped to [sigma_min, sigma_max]."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    lo, hi = block_range(block, bounds)
    margin = gamma * math.log(hi / lo)
    lo_w = max(cfg.sigma_min, math.exp(math.log(lo) - margin))
    hi_w = min(cfg.sigma_max, math.exp(math.log(hi) + margin))
    return lo_w, hi_w


def probability_mass(lo: float, hi: float, cfg: EDMConfig = EDMConfig()) -> float:
    """Share of the training log-normal, truncated to [sigma_min, sigma_max], that lies in [lo, hi]."""
    q_lo, q_hi = cdf_range(cfg)
    return (sigma_to_cdf(hi, cfg) - sigma_to_cdf(lo, cfg)) / (q_hi - q_lo)


def block_of_sigma(sigma: float, bounds: list[float]) -> int:
    """The block whose (unwidened) range holds sigma; block 0 holds the highest noise.

    As released (torch.bucketize with right=True): a sigma equal to a boundary belongs to the range
    above it, and sigmas outside [sigma_0, sigma_B] go to the nearest end block. The released
    sampler compares its float32 grid against float64 boundaries, so callers pass float32 sigmas.
    """
    num_blocks = len(bounds) - 1
    ascending = min(max(bisect.bisect_right(bounds, sigma) - 1, 0), num_blocks - 1)
    return num_blocks - 1 - ascending


def sample_truncated_lognormal(
    n: int,
    lo: float,
    hi: float,
    *,
    cfg: EDMConfig = EDMConfig(),
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw n sigmas from the training log-normal truncated to [lo, hi] by inverse-CDF sampling on `device`."""
    q_lo, q_hi = sigma_to_cdf(lo, cfg), sigma_to_cdf(hi, cfg)
    u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
    z = torch.special.ndtri(q_lo + (q_hi - q_lo) * u)
    sigma = torch.exp(cfg.P_mean + cfg.P_std * z).to(torch.float32)
    # ndtri of a float64 in (q_lo, q_hi) can round one ulp past the ends; keep the range exact.
    return sigma.clamp(lo, hi)


def inference_sigmas(num_steps: int, cfg: EDMConfig = EDMConfig()) -> list[float]:
    """Inference grid: num_steps sigmas equally spaced in CDF space from sigma_max down to sigma_min, both included."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    q_lo, q_hi = cdf_range(cfg)
    if num_steps == 1:
        return [cfg.sigma_min]
    grid = [q_hi - (q_hi - q_lo) * i / (num_steps - 1) for i in range(num_steps)]
    sigmas = [cdf_to_sigma(q, cfg) for q in grid]
    # The endpoints are exact constants; do not let the quantile round trip perturb them.
    sigmas[0], sigmas[-1] = cfg.sigma_max, cfg.sigma_min
    return sigmas


def euler_step(z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dz/dsigma = (z - D) / sigma."""
    return z + (sigma_next - sigma) * (z - denoised) / sigma
