"""Exponential moving average of the trained weights (`--ema_decay`), updated only where a step trained.

A DiffusionBlocks step trains one block and the shared stem and head; the other blocks' weights do not move, so
their averages must not move either (averaging an unchanged weight would still pull a stale average towards it,
which is not what an average of that block's own training trajectory means). After an update of k steps that all
trained a parameter p, its average is decay^k * start + (1 - decay) * sum_t decay^(k - t) p_t.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class ParameterEMA:
    """Shadow copies of named parameters; `update(names)` moves the named shadows towards the live weights."""

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.parameters = named_parameters
        self.shadows = {name: p.detach().clone() for name, p in named_parameters.items()}
        self._names = {id(p): name for name, p in named_parameters.items()}

    def names_of(self, parameters: list[nn.Parameter]) -> list[str]:
        """The names of these parameters (each once, also when blocks share them)."""
        return list(dict.fromkeys(self._names[id(p)] for p in parameters))

    def to(self, device: torch.device) -> None:
        """Keep the shadows on `device` (the trained weights' device: no copy between memories at each update)."""
        self.shadows = {name: s.to(device) for name, s in self.shadows.items()}

    @torch.no_grad()
    def reset(self) -> None:
        """Averages equal to the live weights (a checkpoint without averages, e.g. a pushed model of averages)."""
        for name, p in self.parameters.items():
            self.shadows[name].copy_(p)

    @torch.no_grad()
    def update(self, names: list[str]) -> None:
        """shadow <- decay * shadow + (1 - decay) * weight, for the parameters one optimizer step trained."""
        shadows = [self.shadows[n] for n in names]
        live = [self.parameters[n].detach().to(s.device) for n, s in zip(names, shadows)]
        torch._foreach_lerp_(shadows, live, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows by parameter name (saved in checkpoints beside the live weights)."""
        return dict(self.shadows)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadows saved by state_dict (onto the devices they live on now)."""
        missing = set(self.shadows) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for name, shadow in self.shadows.items():
            shadow.copy_(state[name])

    @torch.no_grad()
    def swap_in(self) -> dict[str, torch.Tensor]:
        """Copy the averages into the parameters; returns the live weights, for `restore`."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        for name, p in self.parameters.items():
            p.copy_(self.shadows[name])
        return saved

    @torch.no_grad()
    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Put back the live weights swap_in returned, bit for bit."""
        for name, p in self.parameters.items():
            p.copy_(saved[name])

    @contextmanager
    def swapped_in(self):
        """Within the block the parameters hold the averages; the live weights come back afterwards, bit for bit."""
        saved = self.swap_in()
        try:
            yield
        finally:
            self.restore(saved)
