"""What differs between the model types, one object each: the network, its training loss and its prediction.

`vit`: cross-entropy of the end-to-end ViT's logits. `dblock`: one block per optimizer step (drawn from the
seed and the step), sigmas and noise from a per-step generator, the EDM-weighted cross-entropy of that block,
and the Euler sampler over every block at prediction time. LitClassifier (module.py) and bench.py both train
through these objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import dblock
from config import ModelConfig, ModelSpec
from dblock import block_for_step, noise_generator
from errors import UserError
from losses import Criterion, clamp_weight
from vit import ArchConfig, ViTClassifier


@dataclass(frozen=True)
class StepIndex:
    """Where a training micro-batch stands: the optimizer step, the DDP rank and the micro-batch within the step."""

    step: int
    rank: int = 0
    micro_batch: int = 0


@dataclass
class StepLoss:
    """One training micro-batch's loss, the curves logged with it, and (dblock) the block and sigmas it drew."""

    loss: torch.Tensor
    logged: dict[str, torch.Tensor]  # metric name -> value, e.g. {"train/loss": ..., "train/ce_loss": ...}
    block: int | None = None
    sigma: torch.Tensor | None = None


def check_train_blocks(train_blocks: list[int] | None, num_blocks: int) -> None:
    """--train_blocks must name distinct existing blocks."""
    if train_blocks is None:
        return
    distinct = len(set(train_blocks)) == len(train_blocks)
    if not train_blocks or not distinct or not all(0 <= b < num_blocks for b in train_blocks):
        raise UserError(
            f"--train_blocks {','.join(map(str, train_blocks))} must name distinct blocks between 0 and "
            f"{num_blocks - 1}, "
            "e.g. --train_blocks 1"
        )


def check_levers(m: ModelConfig, dcfg: dblock.DBlockConfig, num_layers: int) -> None:
    """Reject the training levers' values and combinations that mean nothing (--loss, --label_smoothing,
    --max_loss_weight, --ema_decay, --weight_tied), naming the flag to change."""
    dblock_only = {"--loss mse": m.loss == "mse", "--max_loss_weight": m.max_loss_weight is not None,
                   "--weight_tied": m.weight_tied}
    for flag, given in dblock_only.items():
        if given and m.model_type != "dblock":
            raise UserError(
                f"{flag} needs --model_type dblock (the end-to-end ViT has no denoised state or EDM weight)"
            )
    if not 0.0 <= m.label_smoothing < 1.0:
        raise UserError(f"--label_smoothing must be in [0, 1), got {m.label_smoothing}")
    if m.label_smoothing and m.loss != "ce":
        raise UserError(f"--label_smoothing smooths the ce loss only: drop it or use --loss ce (got --loss {m.loss})")
    if m.max_loss_weight is not None and not m.max_loss_weight > 0:
        raise UserError(f"--max_loss_weight must be > 0, got {m.max_loss_weight}")
    if m.ema_decay is not None and not 0.0 < m.ema_decay < 1.0:
        raise UserError(f"--ema_decay must be in (0, 1), e.g. 0.999, got {m.ema_decay}")
    if m.weight_tied:
        check_weight_tying(m, dcfg, num_layers)


def check_weight_tying(m: ModelConfig, dcfg: dblock.DBlockConfig, num_layers: int) -> None:
    """--weight_tied shares one set of layers: every block must have as many, and the blocks train jointly."""
    if len(set(dcfg.layout(num_layers))) > 1:
        layout = ",".join(map(str, dcfg.layout(num_layers)))
        raise UserError(f"--weight_tied shares one set of layers, but --layers_per_block {layout} is uneven: drop one")
    if m.train_blocks is not None:
        raise UserError("--weight_tied blocks share their layers, so they cannot train as independent jobs: "
                        "drop --train_blocks")
    if m.offload_weights:
        raise UserError("--weight_tied blocks share their weights, so no block's can wait in host memory: "
                        "drop --offload_weights")


def build_dblock(
    arch: ArchConfig, num_labels: int, dcfg: dblock.DBlockConfig, seed: int, train_blocks: list[int] | None,
    member_blocks: list[list[int]] | None, weight_tied: bool,
) -> nn.Module:
    """The DiffusionBlocks network: joint (every block, shared trainable label table; with `weight_tied`, one set
    of layers for every block), one independent job's blocks (frozen seed-derived label table, its own stem and
    head), or the assembly of such jobs."""
    def job(blocks) -> dblock.DiffusionBlocksViT:
        return dblock.DiffusionBlocksViT(
            arch=arch, num_labels=num_labels, dcfg=dcfg, built_blocks=tuple(blocks), label_seed=seed
        )

    if member_blocks is not None:
        return dblock.AssembledBlocks([job(m) for m in member_blocks])
    if train_blocks is not None:
        check_train_blocks(train_blocks, dcfg.num_blocks)
        return job(train_blocks)
    model = dblock.DiffusionBlocksViT(arch=arch, num_labels=num_labels, dcfg=dcfg)
    if weight_tied:
        dblock.tie_block_layers(model)
    return model


class VitObjective:
    """End-to-end training: every layer on every step, cross-entropy of the logits."""

    inference_steps = None  # no sampler
    has_blocks = False  # nothing to keep in host memory while another block trains
    find_unused_parameters = False  # every parameter gets a gradient on every step

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.criterion = Criterion(spec.model.loss, spec.model.label_smoothing)

    @property
    def trainable_blocks(self) -> list[int]:
        """The whole network counts as one block 0."""
        return [0]

    def build_model(self) -> nn.Module:
        """The Hugging Face ViT classifier."""
        model = ViTClassifier(arch=self.spec.arch, num_labels=self.spec.num_labels)
        if self.spec.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    covers_all_blocks = True  # the baseline always predicts

    def block_at(self, step: int) -> int | None:
        """No block choice: the whole network trains."""
        return None

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, where: StepIndex, block) -> StepLoss:
        """Cross-entropy of the logits (fp32, as released), or the --loss brier of their softmax; batch mean."""
        logits = model(images).float()
        if self.criterion.kind == "ce":
            loss = F.cross_entropy(logits, labels, label_smoothing=self.criterion.label_smoothing)
        else:
            loss = self.criterion(logits, labels).mean()
        return StepLoss(loss, {"train/loss": loss})

    def trained_parameters(self, model: nn.Module, block: int | None) -> list[nn.Parameter]:
        """Every trainable parameter: a step trains the whole network."""
        return [p for p in model.parameters() if p.requires_grad]

    def predict(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The forward pass (`generator` unused: the baseline draws nothing)."""
        return model(images)

    def metric_fields(self) -> dict:
        """Nothing beyond the scores."""
        return {}


class DBlockObjective:
    """DiffusionBlocks: one block per step, the EDM-weighted loss (cross-entropy, as released) of its denoised
    labels."""

    find_unused_parameters = True  # the blocks not drawn get no gradient

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        m = spec.model
        # None: the released cross-entropy, computed exactly as released.
        released = m.loss == "ce" and not m.label_smoothing
        self.criterion = None if released else Criterion(m.loss, m.label_smoothing)
        # As released, images are blanked for guidance only when guidance is on.
        self.class_dropout = spec.model.class_dropout_prob if spec.sampler.cfg_scale > 0 else 0.0

    @property
    def trainable_blocks(self) -> list[int]:
        """The blocks this run draws its steps from: --train_blocks, else all."""
        return self.spec.model.train_blocks or list(range(self.spec.dblock.num_blocks))

    @property
    def has_blocks(self) -> bool:
        """Whether the blocks not being trained can wait in host memory (offload.py): not when they share layers."""
        return not self.spec.model.weight_tied

    @property
    def inference_steps(self) -> int:
        """Sampler steps at test time: the flag if given, else one per block."""
        return self.spec.sampler.num_inference_steps or self.spec.dblock.num_blocks

    def build_model(self) -> nn.Module:
        """The DiffusionBlocks ViT (joint, an independent job's blocks, or an assembly of jobs); under --loss mse its
        label table is frozen at its initialisation."""
        s = self.spec
        m = s.model
        model = build_dblock(s.arch, s.num_labels, s.dblock, m.seed, m.train_blocks, s.member_blocks, m.weight_tied)
        if m.loss == "mse" and s.member_blocks is None:
            # The squared error to a learnt target collapses: equal rows of the table make it zero for any D_x.
            model.label_embed.weight.requires_grad_(False)
        return model

    @property
    def covers_all_blocks(self) -> bool:
        """Whether the sampler can run (an independent job holding some blocks cannot)."""
        members = self.spec.member_blocks
        held = [b for blocks in members for b in blocks] if members else self.trainable_blocks
        return sorted(held) == list(range(self.spec.dblock.num_blocks))

    def block_at(self, step: int) -> int:
        """The block trained at optimizer step `step`, the same on every rank and after resume."""
        blocks = self.trainable_blocks
        return blocks[block_for_step(self.spec.model.seed, step, len(blocks))]

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, where: StepIndex, block) -> StepLoss:
        """EDM-weighted loss of `block` (the weight capped at --max_loss_weight); sigmas, noise and image dropout
        from the micro-batch's own generator."""
        g = noise_generator(self.spec.model.seed, where.step, where.rank, where.micro_batch, images.device)
        per_sample, weight, sigma = dblock.block_losses(
            model, images, labels, block, generator=g, class_dropout_prob=self.class_dropout, criterion=self.criterion
        )
        weight = clamp_weight(weight, self.spec.model.max_loss_weight)
        loss = dblock.reduce_loss(per_sample, weight, self.spec.dblock.batch_mean_loss_weight)
        logged = {"train/loss": loss, f"train/{self.spec.model.loss}_loss": per_sample.mean()}
        return StepLoss(loss, logged, block=block, sigma=sigma)

    def trained_parameters(self, model: nn.Module, block: int) -> list[nn.Parameter]:
        """What a step on `block` trains: its layers (shared by every block under --weight_tied) and the trainable
        stem and head."""
        return [p for p in (*model.blocks[block].parameters(), *model.shared_parameters()) if p.requires_grad]

    def predict(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The Euler sampler's logits, its starting noise drawn from `generator`; a model trained with --loss mse (whose
        head never trains) is read through its denoised state."""
        steps, cfg_scale = self.inference_steps, self.spec.sampler.cfg_scale
        return dblock.sample_logits(model, images, steps, cfg_scale, generator=generator, readout=self.readout)

    @property
    def readout(self) -> str:
        """How the sampler reads a label state (dblock.READOUTS): the denoised state itself for --loss mse."""
        return "denoised" if self.spec.model.loss == "mse" else "bridge"

    def metric_fields(self) -> dict:
        """metrics.json records the sampler steps it scored with."""
        return {"num_inference_steps": self.inference_steps}


OBJECTIVES = {"vit": VitObjective, "dblock": DBlockObjective}


def make_objective(spec: ModelSpec) -> VitObjective | DBlockObjective:
    """The objective of the spec's model type."""
    return OBJECTIVES[spec.model.model_type](spec)
