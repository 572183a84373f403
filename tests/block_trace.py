"""A tests-only Lightning callback recording, per optimizer step, the block drawn, the blocks holding gradients and
the sum of the step's sigmas, one JSON line per step in <folder>/rank<r>.jsonl.

Tests switch it on with the BLOCK_TRACE_ENV variable: `install()` (run by conftest.py, and by traced_main.py in
subprocesses) makes every training run attach it while the variable names a folder.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytorch_lightning as pl

BLOCK_TRACE_ENV = "DIFFUSIONBLOCKS_TEST_BLOCK_TRACE"  # folder receiving per-rank block traces


class BlockTrace(pl.Callback):
    """Append each rank's step record to <folder>/rank<r>.jsonl just before the optimizer steps."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        last = pl_module.last_loss
        if last is None or last.block is None:
            return
        blocks = enumerate(pl_module.model.blocks)
        with_grad = [b for b, layers in blocks if any(p.grad is not None for p in layers.parameters())]
        record = {
            "rank": trainer.global_rank, "step": trainer.global_step, "block": last.block,
            "blocks_with_grad": with_grad, "sigma_sum": float(last.sigma.sum()),
        }
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def install() -> None:
    """Make run.train attach a BlockTrace whenever BLOCK_TRACE_ENV names a folder."""
    import run

    if getattr(run.train, "traced", False):
        return
    real = run.train

    @functools.wraps(real)
    def train(configs, flags, callbacks=()):
        folder = os.environ.get(BLOCK_TRACE_ENV)
        return real(configs, flags, (*callbacks, *([BlockTrace(folder)] if folder else [])))

    train.traced = True
    run.train = train
