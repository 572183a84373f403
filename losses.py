"""Per-sample training losses of the label denoiser (`--loss`), before the EDM weight is applied.

Each returns one value per image (N,); the objective multiplies by the (optionally clamped) EDM weight and
reduces. `ce` is the released program's loss; `mse` is EDM's own objective in label space; `brier` is the squared
error of the predicted distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from flags import Loss

LOSSES = get_args(Loss)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of the logits (fp32), optionally against a smoothed target (N,)."""
    return F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)


def squared_error(denoised: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EDM's objective: ||D_x - y||^2 summed over the label-embedding dimensions (N,)."""
    return ((denoised.float() - target.float()) ** 2).sum(dim=-1)


def brier(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Brier score of the softmax against the one-hot label: sum_c (p_c - [c = label])^2 (N,)."""
    probs = logits.float().softmax(dim=-1)
    return ((probs - F.one_hot(labels, probs.shape[-1]).float()) ** 2).sum(dim=-1)


def per_sample_loss(
    kind: str, logits: torch.Tensor, labels: torch.Tensor, denoised: torch.Tensor | None = None,
    target: torch.Tensor | None = None, *, label_smoothing: float,
) -> torch.Tensor:
    """The per-sample loss `--loss kind` of one batch; `denoised` and `target` are needed by `mse` only."""
    if kind == "ce":
        return cross_entropy(logits, labels, label_smoothing)
    if kind == "mse":
        return squared_error(denoised, target)
    if kind == "brier":
        return brier(logits, labels)
    raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class Criterion:
    """The per-sample loss of `--loss` and `--label_smoothing`, called as the denoiser's loss (dblock.Criterion)."""

    kind: str
    label_smoothing: float

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, denoised: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return per_sample_loss(self.kind, logits, labels, denoised, target, label_smoothing=self.label_smoothing)


def clamp_weight(weight: torch.Tensor, max_loss_weight: float | None) -> torch.Tensor:
    """The EDM weight capped at `max_loss_weight` (None: uncapped, as released)."""
    return weight if max_loss_weight is None else weight.clamp(max=max_loss_weight)
