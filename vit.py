"""Architecture configuration shared by both models, and the end-to-end ViT baseline.

The baseline is Hugging Face's ViT image classifier (CLS token, CLS pooling, final LayerNorm,
linear head), built through the public `transformers` API only so it works with transformers 5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from errors import UserError


@dataclass(frozen=True)
class ArchConfig:
    """Transformer shape; defaults are the paper's CIFAR configuration (SPEC section 2)."""

    hidden_size: int = 128
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 3072  # Hugging Face ViTConfig default, not 4 x hidden (as released)
    patch_size: int = 4
    image_size: int = 32
    num_channels: int = 3
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        """Reject shapes no transformer can have, with a message naming the flag to change."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "image_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"--num_attention_heads {self.num_attention_heads} does not divide --hidden_size {self.hidden_size}: "
                "choose a head count that divides the hidden size"
            )
        if self.image_size % self.patch_size:
            raise UserError(f"--patch_size {self.patch_size} does not divide --image_size {self.image_size}: choose one that does")

    @property
    def num_patches(self) -> int:
        """Number of image patches (tokens other than the CLS / label token)."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """Plain dict for checkpoint hyper-parameters (loads with torch.load(weights_only=True))."""
        return asdict(self)


# Named sizes per dataset: only the fields that differ from ArchConfig's defaults.
DATASET_ARCH: dict[str, dict] = {
    "cifar10": {},
    "cifar100": {},
    "digits": {"image_size": 16},
    "imagefolder": {},
    "tiny-imagenet": {"hidden_size": 768, "num_attention_heads": 12, "image_size": 64},
}


def default_arch(data: str, **overrides) -> ArchConfig:
    """The paper's architecture for a dataset, with any non-None overrides applied."""
    fields = {**DATASET_ARCH.get(data, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return ArchConfig(**fields)


def vit_config(arch: ArchConfig, num_labels: int, attn_implementation: str = "sdpa") -> ViTConfig:
    """Hugging Face ViTConfig for the baseline (scaled-dot-product attention kernels by default)."""
    return ViTConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=arch.hidden_dropout_prob,
        attention_probs_dropout_prob=arch.attention_probs_dropout_prob,
        initializer_range=arch.initializer_range,
        layer_norm_eps=arch.layer_norm_eps,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=arch.num_channels,
        qkv_bias=True,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
    )


class ViTClassifier(nn.Module):
    """End-to-end ViT baseline: images (N, C, H, W) -> logits (N, num_labels)."""

    def __init__(self, *, arch: ArchConfig, num_labels: int, attn_implementation: str = "sdpa"):
        super().__init__()
        self.vit = ViTForImageClassification(vit_config(arch, num_labels, attn_implementation))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits of the CLS token."""
        return self.vit(pixel_values=pixel_values).logits

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in backward instead of storing them."""
        self.vit.gradient_checkpointing_enable()
