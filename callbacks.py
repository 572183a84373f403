"""Progress reporting for batch jobs: one summary line at a time instead of a redrawn bar."""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import pytorch_lightning as pl


def attached_to_terminal() -> bool:
    """Whether a person watches the output (Lightning's bar), as opposed to a Slurm log file."""
    return sys.stderr.isatty()


class LineProgress(pl.Callback):
    """Print `step, epoch, block, loss, images/s, ETA` every `every_s` seconds of training (rank 0 only)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last_time = 0.0
        self._last_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_time, self._last_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if not trainer.is_global_zero or now - self._last_time < self.every_s:
            return
        steps = trainer.global_step - self._last_step
        batch_size = len(batch[1]) * trainer.world_size * trainer.accumulate_grad_batches
        rate = steps / (now - self._last_time) if steps else 0.0
        print(self.summary(trainer, pl_module, outputs, rate * batch_size, rate), flush=True)
        self._last_time, self._last_step = now, trainer.global_step

    @staticmethod
    def summary(trainer, pl_module, outputs, images_per_s: float, steps_per_s: float) -> str:
        """One line describing where training stands."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        total = trainer.estimated_stepping_batches
        remaining = max(total - trainer.global_step, 0)
        eta = str(timedelta(seconds=int(remaining / steps_per_s))) if steps_per_s > 0 else "?"
        block = getattr(pl_module, "current_block", None)
        parts = [
            f"step {trainer.global_step}/{int(total)}",
            f"epoch {trainer.current_epoch}",
            *([f"block {block}"] if block is not None else []),
            f"loss {float(loss):.4f}",
            f"{images_per_s:.0f} images/s",
            f"ETA {eta}",
        ]
        return " | ".join(parts)


class BlockDiagnostics(pl.Callback):
    """Every `every_n_epochs` epochs, log diag/block_acc_<b>: each block's accuracy at the geometric middle of its own
    noise range when fed the true label state plus seeded noise, on a seeded subset of the test split.

    It draws from generators of its own and puts the model back as it found it, so training is unchanged.
    """

    def __init__(self, every_n_epochs: int, images: int, seed: int, batch_size: int):
        self.every_n_epochs, self.images, self.seed, self.batch_size = every_n_epochs, images, seed, batch_size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or not trainer.is_global_zero:
            return
        import torch
        from torch.utils.data import DataLoader

        from diagnose import own_range_accuracy, seeded_subset

        subset = seeded_subset(trainer.datamodule.test_set, self.images, self.seed)
        # A private generator: a loader without one draws its base seed from the global generator training uses.
        loader = DataLoader(subset, batch_size=self.batch_size, generator=torch.Generator().manual_seed(self.seed))
        if pl_module.offloader is not None:
            pl_module.offloader.restore_weights(pl_module.device)  # every block is measured
        model, was_training = pl_module.model, pl_module.model.training
        model.eval()
        batches = ((x.to(pl_module.device), y.to(pl_module.device)) for x, y in loader)
        accuracy = own_range_accuracy(model, batches, self.seed, pl_module.objective.trainable_blocks)
        model.train(was_training)
        metrics = {f"diag/block_acc_{b}": acc for b, acc in accuracy.items()}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=trainer.global_step)
