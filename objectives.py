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
from config import ModelSpec
from dblock import block_for_step, noise_generator
from errors import UserError
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


def build_dblock(
    arch: ArchConfig, num_labels: int, dcfg: dblock.DBlockConfig, seed: int, train_blocks: list[int] | None,
    member_blocks: list[list[int]] | None,
) -> nn.Module:
    """The DiffusionBlocks network: joint (every block, shared trainable label table), one independent job's
    blocks (frozen seed-derived label table, its own stem and head), or the assembly of such jobs."""
    def job(blocks) -> dblock.DiffusionBlocksViT:
        return dblock.DiffusionBlocksViT(
            arch=arch, num_labels=num_labels, dcfg=dcfg, built_blocks=tuple(blocks), label_seed=seed
        )

    if member_blocks is not None:
        return dblock.AssembledBlocks([job(m) for m in member_blocks])
    if train_blocks is not None:
        check_train_blocks(train_blocks, dcfg.num_blocks)
        return job(train_blocks)
    return dblock.DiffusionBlocksViT(arch=arch, num_labels=num_labels, dcfg=dcfg)


class VitObjective:
    """End-to-end training: every layer on every step, cross-entropy of the logits."""

    inference_steps = None  # no sampler
    has_blocks = False  # nothing to keep in host memory while another block trains
    find_unused_parameters = False  # every parameter gets a gradient on every step

    def __init__(self, spec: ModelSpec):
        self.spec = spec

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
        """Cross-entropy of the logits (fp32)."""
        loss = F.cross_entropy(model(images).float(), labels)
        return StepLoss(loss, {"train/loss": loss})

    def predict(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The forward pass (`generator` unused: the baseline draws nothing)."""
        return model(images)

    def metric_fields(self) -> dict:
        """Nothing beyond the scores."""
        return {}


class DBlockObjective:
    """DiffusionBlocks: one block per step, the EDM-weighted cross-entropy of its denoised labels."""

    find_unused_parameters = True  # the blocks not drawn get no gradient
    has_blocks = True  # the blocks not being trained can wait in host memory (offload.py)

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        # As released, images are blanked for guidance only when guidance is on.
        self.class_dropout = spec.model.class_dropout_prob if spec.sampler.cfg_scale > 0 else 0.0

    @property
    def trainable_blocks(self) -> list[int]:
        """The blocks this run draws its steps from: --train_blocks, else all."""
        return self.spec.model.train_blocks or list(range(self.spec.dblock.num_blocks))

    @property
    def inference_steps(self) -> int:
        """Sampler steps at test time: the flag if given, else one per block."""
        return self.spec.sampler.num_inference_steps or self.spec.dblock.num_blocks

    def build_model(self) -> nn.Module:
        """The DiffusionBlocks ViT (joint, an independent job's blocks, or an assembly of jobs)."""
        s = self.spec
        return build_dblock(s.arch, s.num_labels, s.dblock, s.model.seed, s.model.train_blocks, s.member_blocks)

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
        """Weighted cross-entropy of `block`; sigmas, noise and image dropout from the micro-batch's own generator."""
        g = noise_generator(self.spec.model.seed, where.step, where.rank, where.micro_batch, images.device)
        ce, weight, sigma = dblock.block_losses(
            model, images, labels, block, generator=g, class_dropout_prob=self.class_dropout
        )
        loss = dblock.reduce_loss(ce, weight, self.spec.dblock.batch_mean_loss_weight)
        return StepLoss(loss, {"train/loss": loss, "train/ce_loss": ce.mean()}, block=block, sigma=sigma)

    def predict(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The Euler sampler's logits, its starting noise drawn from `generator`."""
        steps, cfg_scale = self.inference_steps, self.spec.sampler.cfg_scale
        return dblock.sample_logits(model, images, steps, cfg_scale, generator=generator)

    def metric_fields(self) -> dict:
        """metrics.json records the sampler steps it scored with."""
        return {"num_inference_steps": self.inference_steps}


OBJECTIVES = {"vit": VitObjective, "dblock": DBlockObjective}


def make_objective(spec: ModelSpec) -> VitObjective | DBlockObjective:
    """The objective of the spec's model type."""
    return OBJECTIVES[spec.model.model_type](spec)
