"""What a classifier's logits say beyond accuracy: calibration, per-sampler-step statistics, noise-draw ensembles.

Pure functions of logits and labels (tensors in, plain Python numbers out), so each is checked against a hand
computation on a small table. `diagnose.py` feeds them a checkpoint's logits; `diagnose_plots.py` draws them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, the usual choice since Guo et al. (2017)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float64, so that sums over thousands of images do not drift with the dtype of the logits."""
    return logits.double().softmax(dim=-1)


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    return F.cross_entropy(logits.double(), labels).item()


def brier(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over images of sum_c (p_c - [c = label])^2 (0 perfect, 2 worst)."""
    probs = probabilities(logits)
    onehot = F.one_hot(labels, probs.shape[-1]).double()
    return ((probs - onehot) ** 2).sum(dim=-1).mean().item()


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin (lo, hi] of top-1 confidence: its bounds, image count, mean confidence and accuracy."""
    confidence, prediction = probabilities(logits).max(dim=-1)
    correct = (prediction == labels).double()
    index = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    rows = []
    for b in range(num_bins):
        members = index == b
        count = int(members.sum())
        rows.append({
            "lo": b / num_bins,
            "hi": (b + 1) / num_bins,
            "count": count,
            "confidence": confidence[members].mean().item() if count else None,
            "accuracy": correct[members].mean().item() if count else None,
        })
    return rows


def expected_calibration_error(bins: list[dict]) -> float:
    """ECE: the image-weighted mean gap |accuracy - confidence| over the reliability bins."""
    total = sum(row["count"] for row in bins)
    gaps = (row["count"] * abs(row["accuracy"] - row["confidence"]) for row in bins if row["count"])
    return sum(gaps) / max(total, 1)


def calibration(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> dict:
    """Accuracy, ECE, NLL and Brier score of final predictions, with the reliability diagram's bins."""
    bins = reliability_bins(logits, labels, num_bins)
    return {
        "accuracy": accuracy(logits, labels),
        "ece": expected_calibration_error(bins),
        "nll": nll(logits, labels),
        "brier": brier(logits, labels),
        "bins": bins,
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return (logits.argmax(dim=-1) == labels).double().mean().item()


def step_statistics(
    logits: torch.Tensor, labels: torch.Tensor, final: torch.Tensor, previous: torch.Tensor | None
) -> dict:
    """One sampler step's logits judged on their own and against the final and the previous step's predictions.

    `final` and `previous` are predicted classes (N,); the flips count images whose correctness changed.
    """
    probs = probabilities(logits)
    prediction = probs.argmax(dim=-1)
    correct = prediction == labels
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(dim=-1)
    row = {
        "accuracy": correct.double().mean().item(),
        "confidence": probs.max(dim=-1).values.mean().item(),
        "p_true": probs.gather(1, labels[:, None]).mean().item(),
        "nll": nll(logits, labels),
        "entropy": entropy.mean().item(),
        "agreement_with_final": (prediction == final).double().mean().item(),
        "wrong_to_right": None,
        "right_to_wrong": None,
    }
    if previous is not None:
        was_correct = previous == labels
        row["wrong_to_right"] = int((~was_correct & correct).sum())
        row["right_to_wrong"] = int((was_correct & ~correct).sum())
    return row


def trajectory(steps: list[tuple[int, float, torch.Tensor]], labels: torch.Tensor) -> list[dict]:
    """Per sampler step (block, sigma, logits), in order: the block and sigma, then `step_statistics`."""
    final = steps[-1][2].argmax(dim=-1)
    rows, previous = [], None
    for index, (block, sigma, logits) in enumerate(steps):
        rows.append({"step": index, "block": block, "sigma": sigma, **step_statistics(logits, labels, final, previous)})
        previous = logits.argmax(dim=-1)
    return rows


def ensemble(draws: list[torch.Tensor], labels: torch.Tensor) -> list[dict]:
    """Accuracy when averaging the first k noise draws' probabilities (and, separately, their logits), k = 1..K."""
    rows = []
    probs_sum = torch.zeros_like(draws[0], dtype=torch.float64)
    logits_sum = torch.zeros_like(draws[0], dtype=torch.float64)
    for k, logits in enumerate(draws, start=1):
        probs_sum += probabilities(logits)
        logits_sum += logits.double()
        rows.append({
            "samples": k,
            "accuracy_mean_probs": accuracy(probs_sum, labels),
            "accuracy_mean_logits": accuracy(logits_sum, labels),
            "accuracy_single_draw": accuracy(logits, labels),
        })
    return rows


def oracle_sigmas(boundaries: list[float], per_block: int = 5) -> list[float]:
    """Noise levels for the blocks-in-isolation sweep, descending, from the ascending block boundaries
    sigma_min < ... < sigma_max: sigma_max, then `per_block` points log-evenly inside every block's range (cell
    centres on the log-sigma axis, so none sits on a boundary), then sigma_min."""
    edges = sorted(boundaries, reverse=True)
    grid = [edges[0]]
    for hi, lo in zip(edges[:-1], edges[1:]):
        width = (math.log(hi) - math.log(lo)) / per_block
        grid += [math.exp(math.log(hi) - width * (i + 0.5)) for i in range(per_block)]
    return [*grid, edges[-1]]


def range_midpoint(lo: float, hi: float) -> float:
    """The geometric midpoint of a noise range: the middle of the range on the log-sigma axis the blocks split."""
    return math.sqrt(lo * hi)
