"""Training and testing, top to bottom, each a short sequence of named steps (main.py turns flags into configs)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytorch_lightning as pl

from config import Configs, spec_from_hparams, to_hparams
from data import ImageDataModule
from errors import UserError
from experiment import (
    check_resumable, evaluation_schedule, find_resume_checkpoint, make_logger, make_trainer, module_from_checkpoint,
    read_checkpoint, resolve_run_dir, write_metrics, write_predictions,
)
from fileio import write_json_atomic, write_text_atomic
from module import LitClassifier, Scoring, check_scheduler
from objectives import check_levers, make_objective


def train(configs: Configs, flags: dict, callbacks: tuple[pl.Callback, ...] = ()) -> dict:
    """Train a model in logs/<run_name>/, then test the checkpoint the recipe scores (see main.train)."""
    check_training(configs)
    dm = make_datamodule(configs, configs.arch.image_size, train=True)
    pl.seed_everything(configs.model.seed, workers=True, verbose=False)
    hparams = to_hparams(configs, dm.info.num_classes)
    module = LitClassifier(scoring=training_scoring(configs, hparams, dm), **hparams)
    run_dir, ckpt_path = find_run(configs, module)
    if is_launching_process():
        read_data_first(dm)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = training_trainer(configs, module, run_dir, (*callbacks, *diagnostic_callbacks(configs)))
    if trainer.is_global_zero:
        save_resolved_config(run_dir, flags)
        if configs.model.model_type == "dblock":
            write_block_table(run_dir, module.model, configs.model.weight_tied)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if not module.covers_all_blocks:
        blocks, total = configs.model.train_blocks, configs.dblock.num_blocks
        print(f"trained blocks {blocks} of {total}: combine every block's job with `main.py assemble`, "
              "then test the result")
        return {}
    return test_after_fit(trainer, module, dm, run_dir)


def check_training(configs: Configs) -> None:
    """Reject flag combinations training cannot run, before any data is read."""
    m, r, o = configs.model, configs.run, configs.optim
    if m.offload_weights and (r.devices > 1 or r.num_nodes > 1):
        raise UserError(
            "--offload_weights works on one device only (DDP needs every weight on its device): "
            "drop it or use --devices 1"
        )
    if m.train_blocks is not None and m.model_type != "dblock":
        raise UserError("--train_blocks needs --model_type dblock")
    if r.diagnose_every_n_epochs is not None and m.model_type != "dblock":
        raise UserError("--diagnose_every_n_epochs measures dblock's blocks: drop it or use --model_type dblock")
    check_levers(m, configs.dblock, configs.arch.num_hidden_layers)
    check_scheduler(o.scheduler_type, o.num_warmup_steps, o.scheduler_specific_kwargs)


def make_datamodule(configs: Configs, image_size: int, train: bool) -> ImageDataModule:
    """The dataset's data module at the model's image size (training augmentation only for training)."""
    r = configs.run
    m = configs.model
    extra = {"add_rand_aug": r.add_rand_aug, "seed": m.seed, "augment": m.augment} if train else {}
    return ImageDataModule(
        r.data, data_dir=r.data_dir, batch_size=r.batch_size, eval_batch_size=r.eval_batch_size,
        num_workers=r.num_workers, image_size=image_size, **extra,
    )


def training_scoring(configs: Configs, hparams: dict, dm: ImageDataModule) -> Scoring:
    """When training scores the test split; an independent job holding some blocks cannot predict, so never."""
    r = configs.run
    schedule = evaluation_schedule(dm.has_validation_split, r.save_every_n_epochs, r.eval_every_n_epochs)
    predicts = make_objective(spec_from_hparams(hparams)).covers_all_blocks
    return Scoring(schedule=schedule if predicts else {}, sampler_seed=configs.model.seed)


def diagnostic_callbacks(configs: Configs) -> tuple[pl.Callback, ...]:
    """The blocks-in-isolation curve of --diagnose_every_n_epochs, if asked for."""
    from callbacks import BlockDiagnostics

    r = configs.run
    if r.diagnose_every_n_epochs is None:
        return ()
    return (BlockDiagnostics(r.diagnose_every_n_epochs, r.diagnose_images, configs.model.seed, r.eval_batch_size
                             or r.batch_size),)


def find_run(configs: Configs, module: LitClassifier) -> tuple[Path, str | None]:
    """The run folder and the checkpoint to resume from (--ckpt_path, or the one a requeued job left in its folder)."""
    r = configs.run
    run_dir = resolve_run_dir(r.run_name, configs.model.model_type, r.postfix, r.ckpt_path)
    ckpt_path = r.ckpt_path or find_resume_checkpoint(run_dir)
    if ckpt_path:
        # Fail now, in one line, on a missing, corrupt or incompatible file.
        check_resumable(read_checkpoint(ckpt_path), ckpt_path, module.hparams)
    return run_dir, ckpt_path


def is_launching_process() -> bool:
    """True in the process a user started, not in the DDP workers Lightning or srun start beside it."""
    ranks = ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(name, "0")) == 0 for name in ranks)


def read_data_first(dm: ImageDataModule) -> None:
    """Read (or download) the data before the run folder exists, so bad data leaves nothing behind;
    Lightning's own prepare_data/setup then find it ready."""
    dm.prepare_data()
    dm.setup("fit")
    dm.train_dataloader()  # rejects a batch larger than the training set


def training_trainer(configs: Configs, module: LitClassifier, run_dir: Path, callbacks: tuple) -> pl.Trainer:
    """The Trainer of this run; dblock's epochs and steps count every block (num_epochs x blocks trained)."""
    r, schedule = configs.run, module.scoring.schedule
    scale = len(module.trainable_blocks)
    return make_trainer(
        run_dir=run_dir,
        logger=make_logger(r.logger, data=r.data, run_name=run_dir.name, run_dir=run_dir, debug=r.debug),
        accelerator=r.accelerator, devices=r.devices, num_nodes=r.num_nodes, precision=r.precision,
        max_epochs=r.num_epochs * scale, max_steps=r.max_steps * scale if r.max_steps > 0 else -1,
        accumulate_grad_batches=r.accumulate_grad_batches, save_every_n_epochs=r.save_every_n_epochs,
        save_top_k=r.save_top_k, find_unused_parameters=module.objective.find_unused_parameters,
        progress_every_s=r.progress_every_s, log_every_n_steps=r.log_every_n_steps,
        validate_every=math.gcd(*schedule.values()) or None, best_by="val/acc" if "val" in schedule else None,
        callbacks=callbacks,
    )


def test_after_fit(trainer: pl.Trainer, module: LitClassifier, dm: ImageDataModule, run_dir: Path) -> dict:
    """Score, as released, the best checkpoint by val/acc where the dataset has a validation split, else the final
    weights; from the file, exactly as `main.py test --ckpt_path <it> --seed <seed>` would."""
    callback = trainer.checkpoint_callback
    scored = ("val" in module.scoring.schedule and callback.best_model_path) or callback.last_model_path
    tested = module_from_checkpoint(read_checkpoint(scored), scored, None, {}, module.scoring)
    trainer.test(tested, datamodule=dm, verbose=True)
    if trainer.is_global_zero:
        return write_metrics(run_dir / "metrics.json", tested, scored)
    return {}


def write_block_table(run_dir: Path, model, weight_tied: bool) -> None:
    """blocks.json in the run folder, and one line per block on stdout: layers, noise ranges, probability mass;
    under --weight_tied, `"weight_tied": true` says every block runs the same layers (block 0's)."""
    from dblock import block_table

    table = block_table(model)
    for row in table:
        lo, hi = row["sigma_range"]
        wlo, whi = row["widened_range"]
        print(
            f"block {row['block']}: layers {row['layers'][0]}-{row['layers'][-1]}, sigma [{lo:.6g}, {hi:.6g}] "
            f"(trained on [{wlo:.6g}, {whi:.6g}]), probability mass {row['probability_mass']:.4f}"
        )
    if weight_tied:
        print("weight-tied: every block runs the same layers (block 0's parameters)")
    write_json_atomic(run_dir / "blocks.json", {"blocks": table, **({"weight_tied": True} if weight_tied else {})})


def save_resolved_config(run_dir: Path, flags: dict) -> None:
    """config.yaml in the run folder: the flags of this run, loadable again with --config."""
    import yaml

    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(flags, sort_keys=False))


def test(configs: Configs, ckpt_path: str, model_type: str | None, overrides: dict, save_predictions: bool) -> dict:
    """Score a checkpoint on the test split; metrics.json (and predictions.csv) next to it (see main.test)."""
    from hub.resolve import resolve_checkpoint

    ckpt, run_dir = resolve_checkpoint(ckpt_path)  # a .ckpt file, a folder written by push, or hf://OWNER/NAME[@REV]
    scoring = Scoring(sampler_seed=configs.model.seed, save_predictions=save_predictions)
    module = module_from_checkpoint(ckpt, ckpt_path, model_type, overrides, scoring)
    dm = make_datamodule(configs, module.hparams.arch["image_size"], train=False)
    check_same_classes(dm, module, configs.run.data, ckpt_path)
    trainer = scoring_trainer(configs, run_dir)
    trainer.test(module, datamodule=dm, verbose=True)
    run_dir.mkdir(parents=True, exist_ok=True)  # logs/hf-OWNER--NAME/ for a Hub model, created only once it is scored
    if save_predictions:
        write_predictions(run_dir / "predictions.csv", module)
    return write_metrics(run_dir / "metrics.json", module, str(ckpt_path))


def check_same_classes(dm: ImageDataModule, module: LitClassifier, data: str, ckpt_path: str) -> None:
    """The dataset must have the checkpoint's classes."""
    if dm.info.num_classes != module.hparams.num_labels:
        raise UserError(
            f"checkpoint {ckpt_path} classifies {module.hparams.num_labels} classes but {data} has "
            f"{dm.info.num_classes}: "
            "test on the dataset the checkpoint was trained on"
        )


def scoring_trainer(configs: Configs, run_dir: Path) -> pl.Trainer:
    """A one-device Trainer that only tests (no logger, no checkpoints)."""
    r = configs.run
    return make_trainer(
        run_dir=run_dir, logger=False, accelerator=r.accelerator, devices=1, num_nodes=1, precision=r.precision,
        max_epochs=1, max_steps=-1, accumulate_grad_batches=1, save_every_n_epochs=1, save_top_k=0,
        find_unused_parameters=False, progress_every_s=r.progress_every_s, log_every_n_steps=r.log_every_n_steps,
    )
