"""The training levers' arithmetic against hand computations: the three losses, the weight clamp, the EMA."""

import math

import pytest
import torch
from torch import nn

import losses
from ema import ParameterEMA

# Two images, three classes. Logits chosen so the softmax is exact in the hand computation:
# image 0: logits log(0.7, 0.2, 0.1), label 0; image 1: logits log(0.5, 0.25, 0.25), label 2.
LOGITS = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]).log()
LABELS = torch.tensor([0, 2])


def test_cross_entropy_by_hand():
    ce = losses.per_sample_loss("ce", LOGITS, LABELS, label_smoothing=0.0)
    assert ce.tolist() == pytest.approx([-math.log(0.7), -math.log(0.25)])


def test_label_smoothing_by_hand():
    # target (1 - eps) one-hot + eps / C uniform: CE = -(1 - eps) log p_y - eps / C * sum_c log p_c
    eps = 0.3
    expected = [
        -(1 - eps) * math.log(0.7) - eps / 3 * (math.log(0.7) + math.log(0.2) + math.log(0.1)),
        -(1 - eps) * math.log(0.25) - eps / 3 * (math.log(0.5) + 2 * math.log(0.25)),
    ]
    smoothed = losses.per_sample_loss("ce", LOGITS, LABELS, label_smoothing=eps)
    assert smoothed.tolist() == pytest.approx(expected, rel=1e-6)


def test_brier_by_hand():
    expected = [0.3**2 + 0.2**2 + 0.1**2, 0.5**2 + 0.25**2 + 0.75**2]  # 0.14, 0.875
    score = losses.per_sample_loss("brier", LOGITS, LABELS, label_smoothing=0.0)
    assert score.tolist() == pytest.approx(expected, rel=1e-6)


def test_mse_is_the_squared_distance_of_the_denoised_state():
    denoised = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    target = torch.tensor([[0.0, 0.0], [0.6, 0.8]])
    error = losses.per_sample_loss("mse", LOGITS, LABELS, denoised, target, label_smoothing=0.0)
    assert error.tolist() == pytest.approx([5.0, 3.6])  # (1 + 4), (0.36 + 3.24)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        losses.per_sample_loss("hinge", LOGITS, LABELS, label_smoothing=0.0)


def test_clamp_changes_only_the_weights_above_the_cap():
    w = torch.tensor([0.5, 4.0, 250000.0, 10.0])
    assert losses.clamp_weight(w, 10.0).tolist() == [0.5, 4.0, 10.0, 10.0]
    assert losses.clamp_weight(w, None) is w


def test_ema_equals_the_closed_form_and_untouched_parameters_keep_their_average():
    trained, untouched = nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([3.0]))
    ema = ParameterEMA({"trained": trained, "untouched": untouched}, decay=0.9)
    updates = [torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 4.0]), torch.tensor([0.5, 0.5])]
    for value in updates:
        with torch.no_grad():
            trained.copy_(value)
            untouched.add_(10.0)  # moves, but was not trained at this step: its average must not follow
        ema.update(["trained"])
    k = len(updates)
    closed = 0.9**k * torch.tensor([1.0, -2.0]) + 0.1 * sum(0.9 ** (k - t) * u for t, u in enumerate(updates, 1))
    assert torch.allclose(ema.shadows["trained"], closed, atol=1e-6)
    assert ema.shadows["untouched"].tolist() == [3.0]


def test_ema_swap_scores_the_average_and_restores_the_live_weights_exactly():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = ParameterEMA({"p": p}, decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    ema.update(["p"])  # average (2, 4)
    with ema.swapped_in():
        assert p.tolist() == [2.0, 4.0]
    assert p.tolist() == [3.0, 6.0]


def test_ema_state_round_trip():
    p = nn.Parameter(torch.tensor([1.0]))
    ema = ParameterEMA({"p": p}, decay=0.99)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update(["p"])
    other = ParameterEMA({"p": nn.Parameter(torch.tensor([0.0]))}, decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadows["p"], ema.shadows["p"])
    with pytest.raises(ValueError):
        ParameterEMA({"p": p}, decay=1.0)
