"""The choice types of command-line flags, in one place (jsonargparse validates Literal values)."""

from __future__ import annotations

from typing import Literal

from edm import PARTITIONS

Data = Literal["cifar10", "cifar100", "tiny-imagenet", "digits", "imagefolder"]
ModelType = Literal["vit", "dblock"]
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
]  # transformers.get_scheduler names that need no validation metric
Logger = Literal["wandb", "csv", "none"]
Precision = Literal["32", "bf16-mixed"]
Accelerator = Literal["auto", "cpu", "gpu"]
Partition = Literal[PARTITIONS]
Augment = Literal["released", "none", "crop", "flip"]  # training augmentation: the released one or a part of it
Loss = Literal["ce", "mse", "brier"]  # per-sample training loss (losses.py)
