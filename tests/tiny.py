"""The tiny transformer the tests build and train: one definition, with per-test overrides; and train's block
configuration with overrides.

Golden data (tests/golden) and the old checkpoints (tests/old_checkpoints) keep their own recorded shapes.
"""

import dataclasses

from config import default_configs
from dblock import DBlockConfig
from vit import ArchConfig

TINY = {
    "hidden_size": 24, "num_hidden_layers": 6, "num_attention_heads": 2, "intermediate_size": 48, "patch_size": 8,
    "image_size": 16,
}
# The CLI takes the image size from the dataset (32 for CIFAR), so its flags name only the transformer's shape.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")


def tiny_arch(**overrides) -> ArchConfig:
    """The tiny architecture, with `overrides` (ArchConfig field names) applied."""
    return ArchConfig(**{**TINY, **overrides})


def tiny_arch_flags(**overrides) -> list[str]:
    """Command-line flags for the tiny transformer shape, with `overrides` applied (an image_size override adds
    --image_size)."""
    shape = {**{name: TINY[name] for name in SHAPE_FIELDS}, **overrides}
    return [str(item) for name, value in shape.items() for item in (f"--{name}", value)]


def dblock_config(**overrides) -> DBlockConfig:
    """train's block configuration (its flag defaults), with `overrides` (DBlockConfig field names) applied."""
    return dataclasses.replace(default_configs().dblock, **overrides)
