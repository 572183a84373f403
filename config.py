"""Typed configuration of a run, built from command-line flags by one function (`build_configs`).

main.py's subcommand signatures are the one place a flag's name, type and default are written;
`default_flags` reads them and `default_configs` / `default_hparams` derive every default from them.
The checkpoint's hyper-parameters (`hparams`) are these configs flattened under today's key names.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass, fields

from dblock import DBlockConfig, parse_block_list, parse_layers_per_block, resolve_num_blocks
from errors import UserError
from vit import ArchConfig, default_arch

# The training levers' flags (issue 17), recorded in a checkpoint's hyper-parameters only where they differ from
# train's defaults: a released-default checkpoint keeps exactly the keys every earlier one has.
LEVER_FLAGS = ("loss", "label_smoothing", "max_loss_weight", "ema_decay", "use_ema", "weight_tied")
ARCH_FLAGS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "image_size"
)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (transformers.get_scheduler, stepped every optimizer step)."""

    optimizer: str
    lr: float
    weight_decay: float
    scheduler_type: str
    num_warmup_steps: int
    scheduler_specific_kwargs: dict  # extra schedule arguments, e.g. {"min_lr": 5e-5}


@dataclass(frozen=True)
class SamplerConfig:
    """dblock's sampler when scoring: steps (None: one per block), guidance scale, and the seed of its noise."""

    num_inference_steps: int | None
    cfg_scale: float
    seed: int


@dataclass(frozen=True)
class ModelConfig:
    """What the LitClassifier trains beyond architecture, blocks, optimiser and sampler."""

    model_type: str
    seed: int  # initialisation, block sequence, noise; an independent job's label table
    gradient_checkpointing: bool
    train_blocks: list[int] | None  # an independent job's blocks; None: all (joint training)
    class_dropout_prob: float
    offload_optimizer: bool
    offload_weights: bool
    compile_model: bool
    augment: str  # a record only: the data module applies it; stored so a checkpoint says how it was trained
    loss: str  # per-sample training loss (losses.py): ce (released), mse or brier
    label_smoothing: float  # of the ce loss
    max_loss_weight: float | None  # dblock: cap of the EDM loss weight (None: uncapped, released)
    ema_decay: float | None  # decay of the weights' moving average (None: no average kept)
    use_ema: bool  # score the moving average (when kept) rather than the raw weights
    weight_tied: bool  # dblock: every block reuses the same layers


@dataclass(frozen=True)
class RunConfig:
    """The run around the model: devices, data loading, length, checkpoints and logging."""

    data: str
    data_dir: str
    run_name: str | None
    postfix: str
    devices: int
    num_nodes: int
    accelerator: str
    precision: str
    num_epochs: int
    max_steps: int
    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    add_rand_aug: bool
    save_every_n_epochs: int
    save_top_k: int
    eval_every_n_epochs: int | None
    diagnose_every_n_epochs: int | None  # dblock: blocks-in-isolation accuracy while training (callbacks.py)
    diagnose_images: int
    accumulate_grad_batches: int
    ckpt_path: str | None
    logger: str
    debug: bool
    progress_every_s: float
    log_every_n_steps: int


@dataclass(frozen=True)
class Configs:
    """Every typed config of one command."""

    arch: ArchConfig
    dblock: DBlockConfig
    optim: OptimConfig
    sampler: SamplerConfig
    model: ModelConfig
    run: RunConfig


def default_flags(command: str = "train") -> dict:
    """Flag name -> default, read from main.py's signature of `command`."""
    return dict(signature_defaults(command))


@functools.cache
def signature_defaults(command: str) -> tuple[tuple[str, object], ...]:
    """(flag, default) pairs of main.py's `command`, read once."""
    import main  # main.py imports this module's users at start-up; read its signatures only when asked

    parameters = inspect.signature(main.COMMANDS[command]).parameters.items()
    return tuple((name, p.default) for name, p in parameters if p.default is not p.empty)


def parse_json_object(text: str, flag: str) -> dict:
    """Parse a JSON object given on the command line, or fail with a one-line hint."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{flag} is not valid JSON ({err.msg} at column {err.colno}): pass an object such as '{{\"min_lr\": 5e-5}}'"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object such as '{{\"min_lr\": 5e-5}}', got {text!r}")
    return value


def pick(cls, values: dict):
    """An instance of the dataclass `cls` from the entries of `values` named as its fields."""
    return cls(**{f.name: values[f.name] for f in fields(cls)})


def build_configs(data: str, flags: dict) -> Configs:
    """The typed configs of a command from its flags; a flag the command does not have takes train's default.

    The one place flags become configs, shared by train, test and bench.
    """
    values = {**default_flags("train"), **flags, "data": data}
    layout = parse_layers_per_block(values["layers_per_block"])
    kwargs = values["scheduler_specific_kwargs"]
    values.update(
        compile_model=values["compile"],
        train_blocks=parse_block_list(values["train_blocks"], "--train_blocks"),
        scheduler_specific_kwargs=(
            kwargs if isinstance(kwargs, dict) else parse_json_object(kwargs, "--scheduler_specific_kwargs")
        ),
    )
    dcfg = DBlockConfig(
        num_blocks=resolve_num_blocks(values["num_blocks"], layout), gamma=values["gamma"], layers_per_block=layout,
        partition=values["partition"], batch_mean_loss_weight=values["batch_mean_loss_weight"],
        raw_embedding_bridge=values["raw_embedding_bridge"],
    )
    return Configs(
        arch=default_arch(data, **{name: values[name] for name in ARCH_FLAGS}), dblock=dcfg,
        optim=pick(OptimConfig, values), sampler=pick(SamplerConfig, values), model=pick(ModelConfig, values),
        run=pick(RunConfig, values),
    )


def default_configs(data: str = "cifar100") -> Configs:
    """The configs of `main.py train DATA` without flags: the defaults every tool reads."""
    return build_configs(data, {})


def to_hparams(configs: Configs, num_labels: int, member_blocks: list[list[int]] | None = None) -> dict:
    """The checkpoint's hyper-parameters (plain values, key names and order as every checkpoint of this program has)."""
    m, d, o, s = configs.model, configs.dblock, configs.optim, configs.sampler
    return {
        "model_type": m.model_type, "arch": configs.arch.to_dict(), "num_labels": num_labels, "lr": o.lr,
        "weight_decay": o.weight_decay, "scheduler_type": o.scheduler_type, "num_warmup_steps": o.num_warmup_steps,
        "scheduler_specific_kwargs": dict(o.scheduler_specific_kwargs), "seed": m.seed,
        "gradient_checkpointing": m.gradient_checkpointing, "num_blocks": d.num_blocks, "gamma": d.gamma,
        "layers_per_block": list(d.layers_per_block) if d.layers_per_block else None, "partition": d.partition,
        "train_blocks": m.train_blocks, "member_blocks": member_blocks,
        "batch_mean_loss_weight": d.batch_mean_loss_weight, "raw_embedding_bridge": d.raw_embedding_bridge,
        "class_dropout_prob": m.class_dropout_prob, "num_inference_steps": s.num_inference_steps,
        "cfg_scale": s.cfg_scale, "offload_optimizer": m.offload_optimizer, "offload_weights": m.offload_weights,
        "compile_model": m.compile_model, "augment": m.augment,
        **{key: value for key, value in lever_values(m).items() if value != lever_defaults()[key]},
    }


def lever_values(m: ModelConfig) -> dict:
    """The training levers' values of a model config, by flag name."""
    return {key: getattr(m, key) for key in LEVER_FLAGS}


def lever_text(values: dict) -> str:
    """The levers set away from train's defaults, as flags (`--loss mse --ema_decay 0.999`); "" for the released
    defaults. `values` maps flag names to values; missing ones are the defaults."""
    changed = {k: values[k] for k in LEVER_FLAGS if k in values and values[k] != lever_defaults()[k]}
    return " ".join(f"--{k}" if v is True else f"--{k} {str(v).lower()}" for k, v in changed.items())


def lever_defaults() -> dict:
    """Train's defaults of the training levers (what a checkpoint lacking one of them was trained with)."""
    return {key: default_flags("train")[key] for key in LEVER_FLAGS}


def default_hparams() -> dict:
    """Hyper-parameters a checkpoint may lack (older ones, the released program's): train's defaults.

    `num_labels` has no default: every checkpoint records it; the levers' (LEVER_FLAGS) are in lever_defaults.
    """
    hparams = to_hparams(default_configs(), num_labels=0)
    del hparams["num_labels"]
    hparams["arch"] = asdict(ArchConfig())
    return hparams


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint's hyper-parameters as typed configs: what LitClassifier builds and trains."""

    model: ModelConfig
    arch: ArchConfig
    num_labels: int
    dblock: DBlockConfig
    optim: OptimConfig
    sampler: SamplerConfig
    member_blocks: list[list[int]] | None  # an assembly of independent jobs: each job's blocks


def spec_from_hparams(hparams: dict) -> ModelSpec:
    """Typed configs of a full hyper-parameter dict (the inverse of to_hparams)."""
    layout = hparams["layers_per_block"]
    # A checkpoint does not record the optimizer: AdamW is the only one.
    optimizer, kwargs = default_flags()["optimizer"], hparams["scheduler_specific_kwargs"] or {}
    dcfg = DBlockConfig(
        num_blocks=hparams["num_blocks"], gamma=hparams["gamma"], layers_per_block=tuple(layout) if layout else None,
        partition=hparams["partition"], batch_mean_loss_weight=hparams["batch_mean_loss_weight"],
        raw_embedding_bridge=hparams["raw_embedding_bridge"],
    )
    return ModelSpec(
        model=pick(ModelConfig, {**lever_defaults(), **hparams}), arch=ArchConfig(**hparams["arch"]),
        num_labels=hparams["num_labels"],
        dblock=dcfg,
        optim=pick(OptimConfig, {**hparams, "optimizer": optimizer, "scheduler_specific_kwargs": kwargs}),
        sampler=pick(SamplerConfig, hparams), member_blocks=hparams["member_blocks"],
    )
