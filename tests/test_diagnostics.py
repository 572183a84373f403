"""The diagnostics' numbers against hand computations on small fixed tables of probabilities."""

import math

import pytest
import torch

import diagnostics

# Five images, two classes, given as probabilities (logits = their logs). Top-1 confidences and correctness:
# 0.90 right, 0.62 wrong, 0.70 right, 0.82 wrong, 0.88 wrong. With 15 bins of width 1/15, 0.90 and 0.88 share
# bin 13 (0.867, 0.933]; the others sit alone in bins 9, 10 and 12.
PROBS = torch.tensor([[0.90, 0.10], [0.62, 0.38], [0.30, 0.70], [0.18, 0.82], [0.88, 0.12]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 0, 1])
LOGITS = PROBS.log()
# By hand: bin 13 holds 2 images, confidence 0.89, accuracy 0.5 (gap 0.39); singles' gaps 0.62, 0.30, 0.82.
ECE = (2 * 0.39 + 0.62 + 0.30 + 0.82) / 5  # 0.504
# p(true class) = 0.90, 0.38, 0.70, 0.18, 0.12
NLL = -(math.log(0.90) + math.log(0.38) + math.log(0.70) + math.log(0.18) + math.log(0.12)) / 5  # 1.05294
BRIER = 2 * ((0.10**2) + (0.62**2) + (0.30**2) + (0.82**2) + (0.88**2)) / 5  # two classes: 2 (1 - p_true)^2 = 0.77248


def test_calibration_against_hand_computation():
    result = diagnostics.calibration(LOGITS, LABELS)
    assert result["accuracy"] == pytest.approx(0.4)
    assert result["ece"] == pytest.approx(ECE, abs=1e-12)
    assert result["nll"] == pytest.approx(NLL, abs=1e-12)
    assert result["brier"] == pytest.approx(BRIER, abs=1e-12)
    counts = [row["count"] for row in result["bins"]]
    assert counts == [0] * 9 + [1, 1, 0, 1, 2, 0]
    assert result["bins"][13]["confidence"] == pytest.approx(0.89)
    assert result["bins"][13]["accuracy"] == pytest.approx(0.5)
    assert result["bins"][0]["lo"] == 0.0 and result["bins"][-1]["hi"] == 1.0 and len(result["bins"]) == 15


def test_a_perfectly_calibrated_table_has_zero_ece():
    # Ten images at confidence 0.7 (bin 10), seven of them right.
    probs = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 7 + [1] * 3)
    assert diagnostics.calibration(probs.log(), labels)["ece"] == pytest.approx(0.0, abs=1e-12)


# Three sampler steps over four images (labels 0, 1, 2, 0), three classes. Predictions per step:
# step 0: 1 1 2 1 (images 1, 2 right)  step 1: 0 1 0 1 (images 0, 1 right)  step 2: 0 1 2 0 (all right)
PREDICTIONS = [[1, 1, 2, 1], [0, 1, 0, 1], [0, 1, 2, 0]]
TRAJ_LABELS = torch.tensor([0, 1, 2, 0])


def confident_logits(predictions: list[int], confidence: float = 0.8) -> torch.Tensor:
    """Logits whose softmax puts `confidence` on the given class and the rest evenly on the other two."""
    probs = torch.full((len(predictions), 3), (1 - confidence) / 2, dtype=torch.float64)
    probs[torch.arange(len(predictions)), torch.tensor(predictions)] = confidence
    return probs.log()


def test_trajectory_flips_agreement_and_confidence():
    steps = [(b, s, confident_logits(p)) for b, s, p in zip((0, 1, 2), (80.0, 1.0, 0.002), PREDICTIONS)]
    rows = diagnostics.trajectory(steps, TRAJ_LABELS)
    assert [r["block"] for r in rows] == [0, 1, 2] and [r["sigma"] for r in rows] == [80.0, 1.0, 0.002]
    assert [r["accuracy"] for r in rows] == [0.5, 0.5, 1.0]
    assert rows[0]["wrong_to_right"] is None and rows[0]["right_to_wrong"] is None
    # step 1: image 0 wrong -> right, image 2 right -> wrong; step 2: images 2 and 3 wrong -> right
    assert (rows[1]["wrong_to_right"], rows[1]["right_to_wrong"]) == (1, 1)
    assert (rows[2]["wrong_to_right"], rows[2]["right_to_wrong"]) == (2, 0)
    assert [r["agreement_with_final"] for r in rows] == [0.5, 0.5, 1.0]
    for r in rows:
        assert r["confidence"] == pytest.approx(0.8)
        # entropy of (0.8, 0.1, 0.1)
        assert r["entropy"] == pytest.approx(-(0.8 * math.log(0.8) + 2 * 0.1 * math.log(0.1)))
    # p(true) = 0.8 where right, 0.1 where wrong
    assert rows[0]["p_true"] == pytest.approx((0.8 * 2 + 0.1 * 2) / 4)
    assert rows[0]["nll"] == pytest.approx(-(2 * math.log(0.8) + 2 * math.log(0.1)) / 4)
    for before, after in zip(rows, rows[1:]):
        assert after["accuracy"] - before["accuracy"] == pytest.approx(
            (after["wrong_to_right"] - after["right_to_wrong"]) / len(TRAJ_LABELS))


def test_ensemble_averages_probabilities_and_logits_separately():
    # One image of class 0. Draw 1: (0.90, 0.09, 0.01), right. Draw 2: (0.01, 0.50, 0.49), wrong.
    # Mean probabilities (0.455, 0.295, 0.25) pick class 0; mean logits are the geometric mean
    # (0.095, 0.212, 0.070), which picks class 1.
    labels = torch.tensor([0])
    draw1 = torch.tensor([[0.90, 0.09, 0.01]], dtype=torch.float64).log()
    draw2 = torch.tensor([[0.01, 0.50, 0.49]], dtype=torch.float64).log()
    rows = diagnostics.ensemble([draw1, draw2], labels)
    assert [r["samples"] for r in rows] == [1, 2]
    assert rows[0]["accuracy_mean_probs"] == rows[0]["accuracy_mean_logits"] == rows[0]["accuracy_single_draw"] == 1.0
    second = rows[1]
    assert (second["accuracy_mean_probs"], second["accuracy_mean_logits"], second["accuracy_single_draw"]) == (1, 0, 0)


def test_oracle_sigmas_span_the_whole_range_with_points_inside_every_block():
    boundaries = [0.002, 0.1, 2.0, 80.0]  # three blocks: (2, 80], (0.1, 2], [0.002, 0.1]
    grid = diagnostics.oracle_sigmas(boundaries, per_block=5)
    assert grid[0] == 80.0 and grid[-1] == 0.002 and len(grid) == 17
    assert grid == sorted(grid, reverse=True)
    inside = [sum(lo < s < hi for s in grid) for lo, hi in ((2.0, 80.0), (0.1, 2.0), (0.002, 0.1))]
    assert inside == [5, 5, 5]
    # log-even cell centres: the first point of the top block sits a tenth of the way down its log range
    assert math.log(grid[1]) == pytest.approx(math.log(80.0) - (math.log(80.0) - math.log(2.0)) / 10)


def test_range_midpoint_is_geometric():
    assert diagnostics.range_midpoint(0.01, 100.0) == pytest.approx(1.0)
