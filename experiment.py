"""Run folders, loggers, checkpoints and the Lightning Trainer around LitClassifier."""

from __future__ import annotations

import netrc
import os
import re
import warnings
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import torch
import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from callbacks import LineProgress, attached_to_terminal
import released
from errors import UserError
from fileio import write_atomic, write_json_atomic, write_text_atomic
from module import GRADIENT_CLIP_VAL, MODEL_TYPES, LitClassifier, Scoring

LOGS_DIR = Path("logs")
RUN_NAME_ENV = "DIFFUSIONBLOCKS_RUN_NAME"  # shared with the DDP worker processes Lightning re-launches


# ---- run folders ------------------------------------------------------------------------------
def default_run_name(model_type: str, postfix: str) -> str:
    """`<local timestamp>-<model_type><postfix>`, or `slurm-<job id>-...` inside a Slurm job so a requeued job finds
    its folder."""
    if os.environ.get(RUN_NAME_ENV):
        return os.environ[RUN_NAME_ENV]
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = array_job and f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    job = job or os.environ.get("SLURM_JOB_ID")
    stamp = f"slurm-{job}" if job else datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{model_type}{postfix}"


def resolve_run_dir(run_name: str | None, model_type: str, postfix: str, ckpt_path: str | None) -> Path:
    """The run folder: the resumed checkpoint's folder, else logs/<run_name>."""
    if ckpt_path:
        return Path(ckpt_path).resolve().parent
    name = run_name or default_run_name(model_type, postfix)
    if not re.fullmatch(r"[A-Za-z0-9._=+-]+", name):
        raise UserError(f"--run_name {name!r} may only hold letters, digits and . _ = + -: choose a simpler name")
    os.environ[RUN_NAME_ENV] = name
    return LOGS_DIR / name


def find_resume_checkpoint(run_dir: Path) -> str | None:
    """The newest of last.ckpt and Lightning's pre-emption checkpoints (hpc_ckpt_N.ckpt) in an existing run folder."""
    candidates = [p for p in (run_dir / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    print(
        f"resuming from {newest} (the run folder {run_dir} already holds a checkpoint; "
        "pick another --run_name for a fresh run)"
    )
    return str(newest)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written beside their destination and renamed, so a killed save never leaves a truncated file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f))


# ---- logging ----------------------------------------------------------------------------------
def wandb_has_credentials() -> bool:
    """Whether W&B can log in without asking: an API key in the environment or in the netrc file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_logger(kind: str, *, data: str, run_name: str, run_dir: Path, debug: bool):
    """The experiment logger: W&B (offline with --debug or without credentials), CSV, or none."""
    if kind == "none":
        return False
    if kind == "csv":
        # A new version_N folder per (re)start: resuming never overwrites earlier metrics.
        return CSVLogger(save_dir=str(run_dir), name="csv")
    offline = debug or os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")
    if not offline and not wandb_has_credentials():
        warnings.warn(
            "no Weights & Biases credentials found (run `wandb login`): logging offline to the run folder", stacklevel=2
        )
        offline = True
    # The W&B run id is derived from the run name so a resumed or requeued job continues the same W&B run.
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]
    return WandbLogger(
        project=f"dblocks-{data}", name=run_name, id=run_id, save_dir=str(run_dir), offline=offline, resume="allow"
    )


# ---- evaluation and checkpoints ---------------------------------------------------------------
def evaluation_schedule(
    has_validation_split: bool, save_every_n_epochs: int, eval_every_n_epochs: int | None
) -> dict[str, int]:
    """Metric prefix -> epochs between scorings of the test split during training.

    "val" (released, datasets with a validation split only): at every periodic checkpoint, to keep the best ones.
    "eval" (--eval_every_n_epochs): a learning curve on any dataset, never used to choose a checkpoint.
    """
    schedule = {"val": save_every_n_epochs} if has_validation_split else {}
    if eval_every_n_epochs is not None:
        schedule["eval"] = eval_every_n_epochs
    return schedule


# ---- checkpoints ------------------------------------------------------------------------------
def read_checkpoint(path: str) -> dict:
    """Open a checkpoint safely (weights_only): one written by this program, or one of the released program,
    converted."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"checkpoint {path} does not exist: "
            "pass --ckpt_path a .ckpt file written by train, e.g. logs/<run>/last.ckpt"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise UserError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}): "
            "use another checkpoint from the run folder"
        ) from None
    if released.is_released_checkpoint(ckpt):
        return released.convert_checkpoint(ckpt, path)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or hparams.get("model_type") not in MODEL_TYPES:
        raise UserError(
            f"checkpoint {path} was not written by this program's train command: pass a logs/<run>/*.ckpt file"
        )
    return ckpt


def module_from_checkpoint(
    ckpt: dict, path: str, model_type: str | None, overrides: dict, scoring: Scoring | None = None
) -> LitClassifier:
    """Rebuild the LitClassifier a checkpoint was trained as, with test-time overrides, and load its weights."""
    hparams = dict(ckpt["hyper_parameters"])
    if model_type is not None and model_type != hparams["model_type"]:
        raise UserError(
            f"checkpoint {path} holds a {hparams['model_type']} model but --model_type {model_type} was given: "
            f"drop --model_type or pass --model_type {hparams['model_type']}"
        )
    hparams.update({k: v for k, v in overrides.items() if v is not None})
    module = LitClassifier(scoring=scoring, **hparams)
    try:
        module.load_state_dict(ckpt["state_dict"])
        module.load_ema(ckpt)
    except RuntimeError:
        raise UserError(
            f"checkpoint {path} does not match the architecture in its own hyper-parameters: it is damaged, use another"
        ) from None
    return module


def check_resumable(ckpt: dict, path: str, hparams) -> None:
    """Resuming needs the same model type, architecture and class count as the checkpoint's (and the same moving
    average and weight tying, which a checkpoint lacking them did not have)."""
    from config import lever_defaults

    saved, hparams = {**lever_defaults(), **ckpt["hyper_parameters"]}, {**lever_defaults(), **hparams}
    if ckpt.get(released.CONVERTED):
        raise UserError(
            f"checkpoint {path} is the released program's: `main.py test` scores it, "
            "but training cannot resume from it; start a new run"
        )
    keys = ("model_type", "arch", "num_labels", "ema_decay")
    if saved.get("model_type") == "dblock":
        keys += ("num_blocks", "layers_per_block", "partition", "train_blocks", "weight_tied")
    for key in keys:
        if saved.get(key) != hparams.get(key):
            raise UserError(
                f"checkpoint {path} was trained with {key}={saved.get(key)} but this run has {key}={hparams.get(key)}: "
                "resume with the checkpoint's flags (see config.yaml in its folder) or start a new --run_name"
            )


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt always ends as the final weights.

    Lightning writes last.ckpt only together with a periodic checkpoint, so a run of 7 epochs saving every 5 would
    leave epoch 5 in it; the final weights are what a run without a validation split tests and names last.ckpt.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skipped when this step is already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# ---- trainer ----------------------------------------------------------------------------------
def make_trainer(
    *,
    run_dir: Path,
    logger,
    accelerator: str,
    devices: int,
    num_nodes: int,
    precision: str,
    max_epochs: int,
    max_steps: int,
    accumulate_grad_batches: int,
    save_every_n_epochs: int,
    save_top_k: int,
    find_unused_parameters: bool,
    progress_every_s: float,
    log_every_n_steps: int,
    validate_every: int | None = None,
    best_by: str | None = None,
    callbacks: tuple[pl.Callback, ...] = (),
) -> pl.Trainer:
    """Trainer with the released recipe's clipping and checkpointing, writing everything into run_dir.

    validate_every: run the validation loop every this many epochs (None: never).
    best_by: keep the --save_top_k checkpoints with the highest value of this metric (None: the latest ones).
    callbacks: more Lightning callbacks to attach.
    """
    if precision == "32":
        # As released: fp32 weights and activations, TF32 tensor cores for matmuls on Ampere and newer.
        torch.set_float32_matmul_precision("high")
    checkpoint = RunCheckpoint(
        dirpath=str(run_dir), filename="{epoch}-{step}", every_n_epochs=save_every_n_epochs, save_top_k=save_top_k,
        save_last=True,
        monitor=best_by, mode="max",
    )
    extra = [LearningRateMonitor(logging_interval="step")] if logger else []
    interactive = attached_to_terminal()
    if not interactive:
        extra.append(LineProgress(every_s=progress_every_s))
    distributed = devices > 1 or num_nodes > 1
    strategy = ("ddp_find_unused_parameters_true" if find_unused_parameters else "ddp") if distributed else "auto"
    return pl.Trainer(
        default_root_dir=str(run_dir),
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision="32-true" if precision == "32" else precision,
        max_epochs=max_epochs,
        max_steps=max_steps,
        gradient_clip_val=GRADIENT_CLIP_VAL,
        accumulate_grad_batches=accumulate_grad_batches,
        logger=logger,
        callbacks=[checkpoint, *extra, *callbacks],
        enable_progress_bar=interactive,
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=log_every_n_steps,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=validate_every or 1,
        limit_val_batches=1.0 if validate_every else 0,
    )


def write_predictions(path: Path, module: LitClassifier) -> None:
    """predictions.csv: one row per test image in dataset order (index, label, prediction), to compare runs image by
    image."""
    rows = torch.cat(module.predictions).tolist() if module.predictions else []
    lines = ["index,label,prediction", *(f"{i},{label},{pred}" for i, (label, pred) in enumerate(rows))]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_metrics(path: Path, module: LitClassifier, ckpt_path: str | None) -> dict:
    """metrics.json: the test scores with what was scored."""
    payload = {**module.test_results, "model_type": module.hparams.model_type, "ckpt_path": ckpt_path}
    payload.update(module.objective.metric_fields())
    write_json_atomic(path, payload)
    return payload
