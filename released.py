"""Checkpoints of the authors' released program, converted to this project's models.

The released program (SakanaAI/DiffusionBlocks) saves Lightning checkpoints whose state dict is a
Hugging Face ViT layout under `model.` (transformers 4.x key names; dblock adds adaLN linears, a
time embedder, a label-embedding table and a persistent `sigmas` buffer holding its inference
grid) and whose hyper-parameters are its argparse flags. It fixes the architecture by image size
(SPEC section 2); architecture fields found among the hyper-parameters (as a modified copy of the
released program would record them) override that, and the state dict's shapes are checked against
the result.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import torch

from config import default_configs
from errors import UserError
from flags import ModelType
from vit import ArchConfig, default_arch

PREFIX = "model."
CONVERTED = "converted_from_released"  # marks a converted checkpoint: it can be tested, not resumed
ARCH_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")
# Released program: the architecture is a function of the image size alone, the paper's for CIFAR and Tiny-ImageNet.
RELEASED_ARCH = {arch.image_size: arch for arch in map(default_arch, ("cifar100", "tiny-imagenet"))}
# Released flags that carry over as they are; an absent one takes LitClassifier's default (the released default too).
CARRIED_FLAGS = {"seed": int, "gamma": float, "cfg_scale": float, "num_inference_steps": int}

# transformers 4.x ViT layer names -> transformers 5 names (under `vit.encoder.layer.{i}.` / `vit.layers.{i}.`).
VIT_LAYER_KEYS = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}
# Released dblock layer names -> this project's AdaLNLayer names.
DBLOCK_LAYER_KEYS = {
    "attention.attention.query": "attn.query",
    "attention.attention.key": "attn.key",
    "attention.attention.value": "attn.value",
    "attention.output.dense": "attn.out",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "adaLN_modulation.linear": "ada",
}
# Released dblock names outside the layers -> this project's DiffusionBlocksViT names.
DBLOCK_SHARED_KEYS = {
    "vit.embeddings.patch_embeddings.projection": "patch_embed",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.label_embeddings": "label_embed",
    "vit.time_embedder.mlp.0": "noise_embed.mlp.0",
    "vit.time_embedder.mlp.2": "noise_embed.mlp.2",
    "vit.layernorm": "final_norm",
    "adaLN_modulation.linear": "final_ada",
    "classifier": "classifier",
}
LAYER_KEY = re.compile(r"vit\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def rename(key: str, table: dict[str, str]) -> str:
    """Map `<name>[.weight|.bias]` through `table` (exact names first, then with the suffix split off)."""
    if key in table:
        return table[key]
    stem, _, suffix = key.rpartition(".")
    if stem in table:
        return f"{table[stem]}.{suffix}"
    raise KeyError(key)


def layer_owner(layers_per_block: list[int]) -> list[tuple[int, int]]:
    """(block, position in block) of every layer index, block 0 first."""
    return [(b, j) for b, n in enumerate(layers_per_block) for j in range(n)]


def dblock_state_dict(released: dict[str, torch.Tensor], layers_per_block: list[int]) -> dict[str, torch.Tensor]:
    """A released DiffusionBlocks state dict (no `model.` prefix, no `sigmas`) under DiffusionBlocksViT's names."""
    owner, out = layer_owner(layers_per_block), {}
    for key, value in released.items():
        layer = LAYER_KEY.fullmatch(key)
        if layer:
            b, j = owner[int(layer[1])]
            out[f"blocks.{b}.{j}.{DBLOCK_LAYER_KEYS[layer[2]]}.{layer[3]}"] = value
        else:
            out[rename(key, DBLOCK_SHARED_KEYS)] = value
    return out


def vit_state_dict(released: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers 4.x ViTForImageClassification state dict under ViTClassifier's (transformers 5) names."""
    out = {}
    for key, value in released.items():
        layer = LAYER_KEY.fullmatch(key)
        if layer:
            key = f"vit.layers.{layer[1]}.{VIT_LAYER_KEYS[layer[2]]}.{layer[3]}"
        out[f"vit.{key}"] = value
    return out


def is_released_checkpoint(ckpt: object) -> bool:
    """Whether a loaded checkpoint has the released program's layout (Hugging Face names under `model.vit.`)."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    return isinstance(state, dict) and any(k.startswith(f"{PREFIX}vit.embeddings.") for k in state)


def arch_from_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The architecture numbers a released state dict's shapes pin down (all but the head count)."""
    patch = state["vit.embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
    positions = state["vit.embeddings.position_embeddings"].shape[1] - 1
    layers = {int(m[1]) for k in state if (m := LAYER_KEY.fullmatch(k))}
    return {
        "hidden_size": patch.shape[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": state["vit.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "patch_size": patch.shape[-1],
        "image_size": int(round(positions**0.5)) * patch.shape[-1],
    }


def released_arch(flags: dict, state: dict[str, torch.Tensor], path: str) -> ArchConfig:
    """The released program's architecture for the checkpoint's image size (and any architecture flags it records),
    checked against the state dict's shapes."""
    image_size = int(flags.get("image_size", ArchConfig().image_size))
    if image_size not in RELEASED_ARCH:
        sizes = " and ".join(map(str, RELEASED_ARCH))
        raise UserError(
            f"checkpoint {path} has image_size {image_size}; the released program only defines {sizes} px models"
        )
    recorded = {k: int(flags[k]) for k in ARCH_FLAGS if flags.get(k) is not None}
    arch = dataclasses.replace(RELEASED_ARCH[image_size], **recorded)
    found = arch_from_shapes(state)
    differ = {k: (v, getattr(arch, k)) for k, v in found.items() if getattr(arch, k) != v}
    if differ:
        detail = ", ".join(f"{k} {got} (expected {want})" for k, (got, want) in differ.items())
        raise UserError(f"checkpoint {path} does not have the released {image_size}px architecture: {detail}")
    return arch


def carried_flags(flags: dict, model_type: str) -> dict:
    """The released flags this program's hyper-parameters keep (dblock's only for dblock), in their types."""
    names = ("seed",) if model_type == "vit" else tuple(CARRIED_FLAGS)
    return {name: CARRIED_FLAGS[name](flags[name]) for name in names if flags.get(name) is not None}


def released_layout(flags: dict, arch: ArchConfig, path: str) -> tuple[int, ...]:
    """Layers per block of a released dblock checkpoint: its num_blocks, split evenly as the model splits them."""
    defaults = default_configs().dblock
    dcfg = dataclasses.replace(defaults, num_blocks=int(flags.get("num_blocks", defaults.num_blocks)))
    if arch.num_hidden_layers % dcfg.num_blocks:
        raise UserError(
            f"checkpoint {path} has {arch.num_hidden_layers} layers, not divisible by its num_blocks {dcfg.num_blocks}"
        )
    return dcfg.layout(arch.num_hidden_layers)


def convert_checkpoint(ckpt: dict, path: str) -> dict:
    """A released Lightning checkpoint as this program's checkpoint: {"state_dict", "hyper_parameters"} for
    LitClassifier."""
    flags = ckpt.get("hyper_parameters", {})
    model_type = flags.get("model_type")
    if model_type not in typing.get_args(ModelType):
        raise UserError(
            f"checkpoint {path} looks like the released program's but its model_type is {model_type!r}: "
            "pass a vit or dblock checkpoint"
        )
    # The sigmas buffer is the released sampler's grid, which this program recomputes.
    state = {k.removeprefix(PREFIX): v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    state.pop("sigmas", None)
    try:
        arch = released_arch(flags, state, path)
        num_labels = int(flags.get("num_labels") or state["classifier.weight"].shape[0])
        hparams = {"model_type": model_type, "arch": arch.to_dict(), "num_labels": num_labels}
        hparams.update(carried_flags(flags, model_type))
        if model_type == "vit":
            converted = vit_state_dict(state)
        else:
            layout = released_layout(flags, arch, path)
            hparams["num_blocks"] = len(layout)
            converted = dblock_state_dict(state, list(layout))
    except KeyError as err:
        raise UserError(
            f"checkpoint {path} looks like the released program's but lacks or misnames {err}: "
            "it is damaged or from another program"
        ) from None
    return {"state_dict": {f"model.{k}": v for k, v in converted.items()}, "hyper_parameters": hparams, CONVERTED: True}
