"""The LightningModule that trains and scores either model type (`vit` or `dblock`)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
import pytorch_lightning as pl
from huggingface_hub import PyTorchModelHubMixin
from transformers import get_scheduler

import dblock
from errors import UserError
from offload import BlockOffloader
from vit import ArchConfig, ViTClassifier

MODEL_TYPES = ("vit", "dblock")
BLOCK_TRACE_ENV = "DIFFUSIONBLOCKS_BLOCK_TRACE"  # debugging aid: folder receiving per-rank block traces


def capture_rng_states() -> dict:
    """Every random generator training draws from (dropout, sigmas, noise, augmentation, data order)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Put the generators back where capture_rng_states found them."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def block_for_step(seed: int, step: int, num_blocks: int) -> int:
    """Block trained at optimizer step `step`: a pure function of (seed, step), identical on every rank and after resume."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return int(torch.randint(num_blocks, (1,), generator=g))


def noise_generator(seed: int, step: int, rank: int, micro_batch: int, device: torch.device) -> torch.Generator:
    """Generator of one micro-batch's sigmas, noise and image dropout: derived from (seed, step, rank, micro-batch),
    so DDP ranks draw different noise and a resumed run draws exactly what the straight run would."""
    key = ((seed * 1_000_003 + step) * 1_009 + rank) * 1_013 + micro_batch
    return torch.Generator(device=device).manual_seed(key % (2**63))


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, num_warmup_steps: int, num_training_steps: int, kwargs: dict):
    """The released schedule: transformers.get_scheduler, stepped every optimizer step."""
    return get_scheduler(
        name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, scheduler_specific_kwargs=kwargs
    )


def check_scheduler(name: str, num_warmup_steps: int, kwargs: dict) -> None:
    """Build the schedule once on a dummy optimizer so a bad combination fails before any data is read."""
    if num_warmup_steps < 0:
        raise UserError(f"--num_warmup_steps must be >= 0, got {num_warmup_steps}")
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        make_scheduler(dummy, name, num_warmup_steps, max(num_warmup_steps, 1) + 10, kwargs)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        raise UserError(f"--scheduler_type {name} with --scheduler_specific_kwargs {kwargs}: {message}") from None


def check_train_blocks(train_blocks: list[int] | None, num_blocks: int) -> None:
    """--train_blocks must name distinct existing blocks."""
    if train_blocks is None:
        return
    if not train_blocks or len(set(train_blocks)) != len(train_blocks) or not all(0 <= b < num_blocks for b in train_blocks):
        raise UserError(
            f"--train_blocks {','.join(map(str, train_blocks))} must name distinct blocks between 0 and {num_blocks - 1}, e.g. --train_blocks 1"
        )


def build_dblock(arch: ArchConfig, num_labels: int, dcfg, seed: int, train_blocks: list[int] | None, member_blocks: list[list[int]] | None):
    """The DiffusionBlocks network: joint (every block, shared trainable label table), one independent job's
    blocks (frozen seed-derived label table, its own stem and head), or the assembly of such jobs."""
    if member_blocks is not None:
        members = [dblock.DiffusionBlocksViT(arch=arch, num_labels=num_labels, dcfg=dcfg, built_blocks=tuple(m), label_seed=seed) for m in member_blocks]
        return dblock.AssembledBlocks(members)
    if train_blocks is not None:
        check_train_blocks(train_blocks, dcfg.num_blocks)
        return dblock.DiffusionBlocksViT(arch=arch, num_labels=num_labels, dcfg=dcfg, built_blocks=tuple(train_blocks), label_seed=seed)
    return dblock.DiffusionBlocksViT(arch=arch, num_labels=num_labels, dcfg=dcfg)


class LitClassifier(
    pl.LightningModule,
    PyTorchModelHubMixin,
    library_name="pytorch",
    license="apache-2.0",
    paper_url="https://arxiv.org/abs/2506.14202",
    tags=["diffusionblocks", "image-classification"],
):
    """Image classifier trained end to end (`vit`) or one diffusion block per step (`dblock`).

    Hyper-parameters are plain Python values so checkpoints open with torch.load(weights_only=True).
    The Hugging Face mixin gives `save_pretrained` (model.safetensors + config.json of the hyper-parameters)
    and `LitClassifier.from_pretrained("OWNER/NAME" or a folder)`, which rebuilds the model from config.json
    alone and returns it in eval mode (see hub.py and `main.py push`).
    `augment` is not used here: it records the training augmentation (`--augment`) for whoever reads the checkpoint.
    """

    def __init__(
        self,
        *,
        model_type: str = "vit",
        arch: dict | None = None,
        num_labels: int = 100,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        scheduler_type: str = "constant_with_warmup",
        num_warmup_steps: int = 0,
        scheduler_specific_kwargs: dict | None = None,
        seed: int = 42,
        gradient_checkpointing: bool = False,
        num_blocks: int = 3,
        gamma: float = 0.05,
        layers_per_block: list[int] | None = None,
        partition: str = "equiprob",
        train_blocks: list[int] | None = None,
        member_blocks: list[list[int]] | None = None,
        batch_mean_loss_weight: bool = True,
        raw_embedding_bridge: bool = True,
        class_dropout_prob: float = 0.0,
        num_inference_steps: int | None = None,
        cfg_scale: float = 0.0,
        offload_optimizer: bool = True,
        offload_weights: bool = False,
        compile_model: bool = False,
        augment: str = "released",
    ):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise UserError(f"unknown model type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise UserError(f"--class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        self.save_hyperparameters()
        arch_cfg = ArchConfig(**(arch or {}))
        if model_type == "vit":
            self.model = ViTClassifier(arch=arch_cfg, num_labels=num_labels)
            if gradient_checkpointing:
                self.model.enable_gradient_checkpointing()
        else:
            dcfg = dblock.DBlockConfig(
                num_blocks=num_blocks,
                gamma=gamma,
                layers_per_block=tuple(layers_per_block) if layers_per_block else None,
                partition=partition,
                batch_mean_loss_weight=batch_mean_loss_weight,
                raw_embedding_bridge=raw_embedding_bridge,
            )
            self.model = build_dblock(arch_cfg, num_labels, dcfg, seed, train_blocks, member_blocks)
        use_offload = model_type == "dblock" and member_blocks is None and (offload_optimizer or offload_weights)
        self.offloader = BlockOffloader(self.model.blocks, offload_weights=offload_weights) if use_offload else None
        # As released, images are blanked for guidance only when guidance is on.
        self.class_dropout = class_dropout_prob if cfg_scale > 0 else 0.0
        self.current_block: int | None = None
        self.last_sigma: torch.Tensor | None = None  # the last step's noise levels (block trace)
        self._correct = 0
        self._total = 0
        self.save_predictions = False  # test: keep every prediction for predictions.csv
        self.predictions: list[torch.Tensor] = []
        self.test_results: dict[str, float] = {}
        # Metric prefix -> every how many epochs it is due, set by the train command: "val" (datasets with a
        # validation split, the checkpoint selection) and "eval" (--eval_every_n_epochs); both score the test split.
        self.eval_schedule: dict[str, int] = {}
        self._due_prefixes: list[str] = []
        self._training_rng: dict | None = None

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        # The mixin loads weights non-strictly by default; config.json rebuilds the exact network, so every weight must load.
        return super()._from_pretrained(strict=strict, **kwargs)

    def setup(self, stage: str) -> None:
        # Compiled in place, so state_dict keys (and checkpoints) are the same with and without it.
        if stage == "fit" and self.hparams.compile_model and self.model._compiled_call_impl is None:
            self.model.compile()

    @property
    def is_dblock(self) -> bool:
        return self.hparams.model_type == "dblock"

    @property
    def trainable_blocks(self) -> list[int]:
        """The blocks this run draws its steps from: --train_blocks, else all."""
        return self.hparams.train_blocks or list(range(self.hparams.num_blocks))

    @property
    def covers_all_blocks(self) -> bool:
        """Whether this model can run the sampler (an independent job holding some blocks cannot)."""
        return not self.is_dblock or sorted(self.model.owner if self.hparams.member_blocks else self.trainable_blocks) == list(range(self.hparams.num_blocks))

    @property
    def inference_steps(self) -> int:
        """Sampler steps at test time: the flag if given, else one per block."""
        return self.hparams.num_inference_steps or self.hparams.num_blocks

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels = batch
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            # Lightning clears gradients only after the forward pass; clearing them first frees the
            # previous step's gradients during this forward and lets offloaded weights move without them.
            self.optimizers().optimizer.zero_grad(set_to_none=True)
        if not self.is_dblock:
            loss = F.cross_entropy(self.model(images).float(), labels)
            self.check_finite(loss)
            self.log("train/loss", loss, prog_bar=True)
            return loss
        block = self.block_at(self.global_step)
        self.current_block = block
        if self.offloader is not None:
            self.offloader.activate(block, self.optimizers().optimizer, self.device)
            self.offloader.prefetch(self.block_at(self.global_step + 1))  # copied while this step computes
        g = noise_generator(self.hparams.seed, self.global_step, self.global_rank, batch_idx % self.trainer.accumulate_grad_batches, self.device)
        loss, ce, self.last_sigma = dblock.training_loss(self.model, images, labels, block, generator=g, class_dropout_prob=self.class_dropout)
        self.check_finite(loss)
        self.log_dict({"train/loss": loss, "train/ce_loss": ce}, prog_bar=True)
        self.log("train/block", float(block))
        self.log_block_losses(block, loss, ce)
        return loss

    def block_at(self, step: int) -> int:
        """The block trained at optimizer step `step` (one of --train_blocks when given)."""
        return self.trainable_blocks[block_for_step(self.hparams.seed, step, len(self.trainable_blocks))]

    def log_block_losses(self, block: int, loss: torch.Tensor, ce: torch.Tensor) -> None:
        """Per-block curves `train/loss_<b>`, `train/ce_loss_<b>`, sent straight to the loggers at the steps that trained
        block b (Lightning's self.log would re-send each key's last value at every later logging step)."""
        # Lightning's own cadence: it logs a step's metrics when (step + 1) is a multiple of log_every_n_steps.
        if not self.loggers or (self.global_step + 1) % self.trainer.log_every_n_steps:
            return
        metrics = {f"train/loss_{block}": float(loss), f"train/ce_loss_{block}": float(ce)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop before a non-finite loss reaches the weights, naming the step, the block and the last good checkpoint."""
        if torch.isfinite(loss):
            return
        callback = getattr(self.trainer, "checkpoint_callback", None)
        last_good = (callback.last_model_path or callback.best_model_path) if callback else ""
        block = f" (block {self.current_block})" if self.is_dblock else ""
        raise UserError(
            f"non-finite loss {loss.item()} at step {self.global_step}{block}; last good checkpoint: {last_good or 'none yet'}. "
            "Resume from it with --ckpt_path and a lower --lr, or use --precision 32"
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.is_dblock and os.environ.get(BLOCK_TRACE_ENV):
            self.trace_block()

    def trace_block(self) -> None:
        """Append this rank's drawn block, the blocks holding gradients and the sum of its sigmas to <trace dir>/rank<r>.jsonl."""
        with_grad = [b for b, layers in enumerate(self.model.blocks) if any(p.grad is not None for p in layers.parameters())]
        record = {
            "rank": self.global_rank, "step": self.global_step, "block": self.current_block, "blocks_with_grad": with_grad,
            "sigma_sum": float(self.last_sigma.sum()),
        }
        path = Path(os.environ[BLOCK_TRACE_ENV]) / f"rank{self.global_rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # With the step-derived data order (data.py), restoring the generators makes a resume bit-exact.
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        trainable = [p for p in self.parameters() if p.requires_grad]  # an independent job's label table is frozen
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused)
        scheduler = make_scheduler(
            optimizer,
            self.hparams.scheduler_type,
            self.hparams.num_warmup_steps,
            int(self.trainer.estimated_stepping_batches),
            self.hparams.scheduler_specific_kwargs or {},
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.offloader is not None:
            self.offloader.restore_weights(self.device)

    # ---- scoring (validation while training, test after it) -------------------------------------
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images (the diffusion sampler for dblock)."""
        if not self.is_dblock:
            return self.model(images)
        return dblock.sample_logits(self.model, images, self.inference_steps, self.hparams.cfg_scale)

    def start_scoring(self) -> None:
        """Put every block on the device (inference needs all of them) and reset the counts."""
        if self.offloader is not None:
            self.offloader.restore_weights(self.device)
        self._correct, self._total = 0, 0
        self.predictions = []

    def score_batch(self, batch) -> None:
        """Count the correct top-1 predictions of one batch."""
        images, labels = batch
        preds = self.predict_logits(images).argmax(dim=-1)
        self._correct += int((preds == labels).sum())
        self._total += labels.numel()
        if self.save_predictions:
            self.predictions.append(torch.stack([labels, preds], dim=1).cpu())

    def scored_accuracy(self) -> tuple[float, int]:
        """(accuracy, number of images) counted since start_scoring, summed over every DDP rank."""
        counts = torch.tensor([self._correct, self._total], dtype=torch.float64, device=self.device)
        correct, total = (int(v) for v in self.trainer.strategy.reduce(counts, reduce_op="sum"))
        return correct / max(total, 1), total

    def on_validation_epoch_start(self) -> None:
        self._due_prefixes = [p for p, every in self.eval_schedule.items() if (self.current_epoch + 1) % every == 0]
        # Scoring must not move training's generators (dblock's sampler draws noise): with or without
        # evaluation, training sees the same randomness. Seeding makes every evaluation use the same noise.
        self._training_rng = capture_rng_states()
        torch.manual_seed(self.hparams.seed)
        self.start_scoring()

    def validation_step(self, batch, batch_idx):
        # Lightning validates every gcd of the intervals; an epoch where no metric is due skips the forward.
        if self._due_prefixes:
            self.score_batch(batch)

    def on_validation_epoch_end(self) -> None:
        acc, _ = self.scored_accuracy()
        for prefix in self._due_prefixes:
            self.log_dict({f"{prefix}/acc": acc, f"{prefix}/f1": acc}, sync_dist=False)
        restore_rng_states(self._training_rng)

    def on_test_epoch_start(self) -> None:
        self.start_scoring()

    def test_step(self, batch, batch_idx):
        self.score_batch(batch)

    def on_test_epoch_end(self) -> None:
        acc, total = self.scored_accuracy()
        # Micro-averaged F1 of single-label multiclass predictions equals accuracy (as released).
        self.test_results = {"test/acc": acc, "test/f1": acc, "num_test_images": total}
        self.log_dict({"test/acc": acc, "test/f1": acc}, sync_dist=False)
