"""Command line of the DiffusionBlocks reproduction: `main.py {train,test,diagnose,bench} DATA [flags]`,
`main.py report RUN_DIR...`, `main.py assemble CKPT... --output FILE`, `main.py push RUN --repo_id OWNER/NAME`.

Flag names and defaults follow the released program; see README.md for every flag.
"""

from __future__ import annotations

import json
import re
import sys
import typing
import warnings
from typing import Literal, NoReturn

from jsonargparse import ArgumentParser, auto_cli

from accelerator import check_accelerator
from assemble import assemble
from errors import UserError, check_at_least
from flags import Accelerator, Augment, Data, Logger, Loss, ModelType, Partition, Precision, Scheduler
from report import report


class OneLineErrorParser(ArgumentParser):
    """Argument parser that reports a bad flag as one line (no usage dump) and exits with code 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        text = re.sub(r"\s+", " ", str(message)).strip()
        # prog is `<script>` for the command itself, `<script> [options] <subcommand>` for a subcommand
        command = " ".join(["main.py", *(word for word in self.prog.split()[1:] if not word.startswith("["))])
        sys.stderr.write(f"error: {text} (see `{command} --help`)\n")
        raise SystemExit(2)


def train(
    data: Data,
    *,
    model_type: ModelType = "vit",
    data_dir: str = "data",
    run_name: str | None = None,
    postfix: str = "",
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: Accelerator = "auto",
    precision: Precision = "32",
    num_epochs: int = 500,
    max_steps: int = -1,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    num_workers: int = 8,
    add_rand_aug: bool = False,
    augment: Augment = "released",
    save_every_n_epochs: int = 5,
    save_top_k: int = 1,
    eval_every_n_epochs: int | None = None,
    diagnose_every_n_epochs: int | None = None,
    diagnose_images: int = 1000,
    accumulate_grad_batches: int = 1,
    gradient_checkpointing: bool = False,
    optimizer: Literal["adamw"] = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    scheduler_type: Scheduler = "constant_with_warmup",
    num_warmup_steps: int = 0,
    scheduler_specific_kwargs: str = "{}",
    seed: int = 42,
    ckpt_path: str | None = None,
    logger: Logger = "wandb",
    debug: bool = False,
    progress_every_s: float = 60.0,
    log_every_n_steps: int = 50,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    patch_size: int | None = None,
    image_size: int | None = None,
    num_blocks: int | None = None,
    layers_per_block: str | None = None,
    partition: Partition = "equiprob",
    train_blocks: str | None = None,
    gamma: float = 0.05,
    num_inference_steps: int | None = None,
    cfg_scale: float = 0.0,
    class_dropout_prob: float = 0.0,
    batch_mean_loss_weight: bool = True,
    raw_embedding_bridge: bool = True,
    offload_optimizer: bool = True,
    offload_weights: bool = False,
    compile: bool = False,  # noqa: A002 (the flag is --compile)
    loss: Loss = "ce",
    label_smoothing: float = 0.0,
    max_loss_weight: float | None = None,
    ema_decay: float | None = None,
    use_ema: bool = True,
    weight_tied: bool = False,
) -> dict:
    """Train a model, save checkpoints in logs/<run_name>/, then test the best (validation split) or the final weights.

    Args:
        data: Dataset: cifar10, cifar100, tiny-imagenet, digits (scikit-learn's bundled 8x8 digits, no download) or
            imagefolder (class folders under --data_dir/train and /test).
        model_type: vit (end-to-end baseline) or dblock (DiffusionBlocks, one block trained per step).
        data_dir: Folder holding (or receiving) the dataset files.
        run_name: Run folder name under logs/ (default: <timestamp>-<model_type><postfix>, or slurm-<job id>-... under
            Slurm).
        postfix: Appended to the default run name (the recipes use "-rand-augment").
        devices: Accelerators per node; more than one trains with DDP.
        num_nodes: Nodes (multi-node DDP, e.g. under srun).
        accelerator: Lightning accelerator: auto, gpu, cpu.
        precision: 32 (fp32 with TF32 matmuls, as released) or bf16-mixed.
        num_epochs: Epochs of the end-to-end schedule; dblock trains num_epochs x num_blocks epochs.
        max_steps: Stop after this many optimizer steps (x num_blocks for dblock); -1 = no limit.
        batch_size: Training batch size per device.
        eval_batch_size: Test batch size (default: batch_size).
        num_workers: Data loader worker processes.
        add_rand_aug: Add RandAugment after the horizontal flip (with any --augment).
        augment: Training augmentation: released (the dataset's random crop and flip), none (resize and centre crop, as
            at test), crop (the random crop only) or flip (the flip only).
        save_every_n_epochs: Write a checkpoint every this many epochs (plus last.ckpt); tiny-imagenet also validates
            then.
        save_top_k: How many periodic checkpoints to keep (-1 = all): the best by val/acc on tiny-imagenet, else the
            latest.
        eval_every_n_epochs: Score the test split every this many epochs and log eval/acc, a learning curve (default:
            never); changes neither training nor the checkpoint tested.
        diagnose_every_n_epochs: dblock: every this many epochs, log each block's accuracy at the middle of its own
            noise range when fed the true label state plus noise (diag/block_acc_<b>); changes nothing else.
        diagnose_images: Test images (a seeded subset) that --diagnose_every_n_epochs scores.
        accumulate_grad_batches: Batches per optimizer step.
        gradient_checkpointing: Recompute activations in backward (vit baseline only).
        optimizer: Optimizer (only adamw, as released).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        scheduler_type: transformers.get_scheduler schedule, stepped every optimizer step.
        num_warmup_steps: Warmup optimizer steps (the recipes multiply by num_blocks for dblock).
        scheduler_specific_kwargs: JSON object of extra schedule arguments, e.g. '{"min_lr": 5e-5}'.
        seed: Global seed (data order, initialisation, block sequence).
        ckpt_path: Resume training from this checkpoint, in its run folder.
        logger: wandb (project dblocks-<DATA>), csv (run folder) or none.
        debug: Log to W&B offline.
        log_every_n_steps: Send training metrics to the logger every this many optimizer steps.
        progress_every_s: Without a terminal (batch jobs), print a one-line progress summary this often, in seconds.
        hidden_size: Transformer width (default per dataset: 128; tiny-imagenet 768).
        num_hidden_layers: Transformer depth (default 12).
        num_attention_heads: Attention heads (default 4; tiny-imagenet 12).
        intermediate_size: MLP width (default 3072).
        patch_size: Patch side in pixels (default 4).
        image_size: Input side in pixels (default 32; tiny-imagenet 64).
        num_blocks: dblock: number of blocks B the layers are split into (default 3, or the length of
            --layers_per_block).
        layers_per_block: dblock: layers of each block, block 0 (highest noise) first, e.g. 6,4,2 (default: the even
            split).
        partition: dblock: noise-range boundaries: equiprob (equal training probability, released) or uniform (equal
            width in log sigma).
        train_blocks: dblock: train only these blocks (e.g. 1 or 0,2) as an independent job with a frozen seed-derived
            label table; combine the jobs with `main.py assemble`.
        gamma: dblock: log-space overlap of neighbouring blocks' noise ranges.
        num_inference_steps: dblock: sampler steps at test time (default num_blocks).
        cfg_scale: dblock: classifier-free guidance scale at test time (0 = off; 1 = the conditional logits).
        class_dropout_prob: dblock: training probability of blanking the image; as released, only with --cfg_scale > 0.
        batch_mean_loss_weight: dblock: released loss mean(CE) x mean(w); false = the paper's mean(CE x w).
        raw_embedding_bridge: dblock: released sampler mixes raw label embeddings; false = the L2-normalised ones.
        offload_optimizer: dblock: keep AdamW moments of blocks not being trained in host memory (same numerics).
        offload_weights: dblock: keep weights of blocks not being trained in host memory too (one device only).
        compile: torch.compile the model (worth it on GPUs; the first steps are slow while it compiles).
        loss: Per-sample loss, times the EDM weight for dblock: ce (released), mse (dblock: squared error of the
            denoised label state) or brier (squared error of the softmax against the one-hot label).
        label_smoothing: --loss ce only: cross-entropy against (1 - EPS) one-hot + EPS uniform (0 = off, released).
        max_loss_weight: dblock: clamp the EDM loss weight at this value (default: unclamped, as released).
        ema_decay: Keep an exponential moving average of the trained weights with this decay, in (0, 1) (default
            off); validation, the final test, test and push score it.
        use_ema: With --ema_decay: score the averaged weights (false = the raw ones) at validation and the final test.
        weight_tied: dblock: every block reuses one set of L/B layers; each keeps its noise range (no offloading).
    """
    flags = dict(locals())  # the flags exactly as resolved, saved as config.yaml
    import run
    from config import build_configs

    check_at_least(
        devices=devices, num_nodes=num_nodes, num_epochs=num_epochs, batch_size=batch_size,
        eval_batch_size=eval_batch_size, save_every_n_epochs=save_every_n_epochs,
        accumulate_grad_batches=accumulate_grad_batches, num_inference_steps=num_inference_steps,
        log_every_n_steps=log_every_n_steps, eval_every_n_epochs=eval_every_n_epochs,
        diagnose_every_n_epochs=diagnose_every_n_epochs, diagnose_images=diagnose_images,
    )
    check_accelerator(accelerator)
    return run.train(build_configs(data, flags), flags)


def test(
    data: Data,
    *,
    ckpt_path: str,
    model_type: ModelType | None = None,
    data_dir: str = "data",
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    num_workers: int = 8,
    accelerator: Accelerator = "auto",
    precision: Precision = "32",
    seed: int = 42,
    num_inference_steps: int | None = None,
    cfg_scale: float | None = None,
    raw_embedding_bridge: bool | None = None,
    save_predictions: bool = False,
    use_ema: bool | None = None,
) -> dict:
    """Score a checkpoint on DATA's test split; metrics.json goes next to it (Hub models: logs/hf-OWNER--NAME/).

    Args:
        data: Dataset: cifar10, cifar100, tiny-imagenet, digits or imagefolder.
        ckpt_path: Checkpoint written by train, a folder written by push, or hf://OWNER/NAME[@REVISION] (architecture
            and model type are read from it).
        model_type: Optional check: must match the checkpoint's model type.
        data_dir: Folder holding (or receiving) the dataset files.
        batch_size: Batch size (used when --eval_batch_size is not given).
        eval_batch_size: Test batch size.
        num_workers: Data loader worker processes.
        accelerator: Lightning accelerator: auto, gpu, cpu.
        precision: 32 (fp32 with TF32 matmuls) or bf16-mixed.
        seed: Seed of the sampler's initial noise (dblock).
        num_inference_steps: dblock: sampler steps (default: the checkpoint's, else num_blocks); any value works.
        cfg_scale: dblock: classifier-free guidance scale (default: the checkpoint's).
        raw_embedding_bridge: dblock: override the checkpoint's bridge quirk (true = released raw table).
        save_predictions: Also write predictions.csv (index, label, prediction per test image, in dataset order) next to
            metrics.json.
        use_ema: Score the checkpoint's averaged weights (--ema_decay runs); false = the raw ones (default: the
            checkpoint's).
    """
    import run
    from config import build_configs

    check_at_least(batch_size=batch_size, eval_batch_size=eval_batch_size, num_inference_steps=num_inference_steps)
    check_accelerator(accelerator)
    overrides = {
        "num_inference_steps": num_inference_steps, "cfg_scale": cfg_scale,
        "raw_embedding_bridge": raw_embedding_bridge,
        "use_ema": use_ema,
    }
    flags = {k: v for k, v in locals().items() if k in TEST_RUN_FLAGS}
    return run.test(build_configs(data, flags), ckpt_path, model_type, overrides, save_predictions)


# test's flags that describe the run (the others override the checkpoint's hyper-parameters)
TEST_RUN_FLAGS = ("data_dir", "batch_size", "eval_batch_size", "num_workers", "accelerator", "precision", "seed")


def diagnose(
    data: Data,
    *,
    ckpt_path: str,
    num_inference_steps: str | None = None,
    num_samples: int = 1,
    seed: int = 42,
    max_images: int | None = None,
    sigmas_per_block: int = 5,
    output: str | None = None,
    data_dir: str = "data",
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    num_workers: int = 8,
    accelerator: Accelerator = "auto",
    cfg_scale: float | None = None,
    raw_embedding_bridge: bool | None = None,
    use_ema: bool | None = None,
) -> dict:
    """Look inside a checkpoint: calibration, every sampler step, every block in isolation, noise-draw ensembles, cost.

    Writes diagnostics.json, diagnostics.md and PNG figures into diagnostics/ next to the checkpoint's metrics.json
    (or --output) and prints the tables.

    Args:
        data: Dataset the checkpoint was trained on (its test split is diagnosed).
        ckpt_path: Any checkpoint `test` accepts: a .ckpt file, an assembled or released-format one, a pushed folder or hf://OWNER/NAME[@REVISION].
        num_inference_steps: dblock: comma-separated sampler step counts to compare, e.g. 1,2,3,6,12 (default: the
            checkpoint's).
        num_samples: dblock: independent sampler noise draws whose averaged predictions are scored (1..K rows).
        seed: Seed of the sampler noise (the first draw reproduces `test --seed`), the oracle noise and --max_images.
        max_images: Diagnose a seeded subset of this many test images (default: all).
        sigmas_per_block: dblock: noise levels per block range in the blocks-in-isolation sweep (plus sigma_min and
            sigma_max).
        output: Folder receiving the results (default: diagnostics/ beside the checkpoint's metrics.json).
        data_dir: Folder holding (or receiving) the dataset files.
        batch_size: Batch size (used when --eval_batch_size is not given).
        eval_batch_size: Batch size of the passes over the test split.
        num_workers: Data loader worker processes.
        accelerator: auto, gpu or cpu.
        cfg_scale: dblock: classifier-free guidance scale (default: the checkpoint's).
        raw_embedding_bridge: dblock: override the checkpoint's bridge quirk (true = released raw table).
        use_ema: Diagnose the checkpoint's averaged weights (--ema_decay runs); false = the raw ones (default: the
            checkpoint's).
    """
    import diagnose as diagnosis
    from config import build_configs

    check_at_least(batch_size=batch_size, eval_batch_size=eval_batch_size, num_samples=num_samples,
                   max_images=max_images, sigmas_per_block=sigmas_per_block)
    check_accelerator(accelerator)
    request = diagnosis.Request(
        ckpt_path=ckpt_path, step_counts=diagnosis.parse_step_counts(num_inference_steps), num_samples=num_samples,
        seed=seed, max_images=max_images, sigmas_per_block=sigmas_per_block, output=output,
    )
    flags = {k: v for k, v in locals().items() if k in TEST_RUN_FLAGS}
    overrides = {"cfg_scale": cfg_scale, "raw_embedding_bridge": raw_embedding_bridge, "use_ema": use_ema}
    return diagnosis.run(build_configs(data, flags), request, overrides)


def bench(
    data: Data,
    *,
    batch_size: int = 128,
    num_blocks: int | None = None,
    layers_per_block: str | None = None,
    train_blocks: str | None = None,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    patch_size: int | None = None,
    image_size: int | None = None,
    accelerator: Accelerator = "auto",
    precision: Precision = "32",
    compile: bool = False,
    overhead: bool = False,
    steps: int = 5,
    warmup_steps: int = 2,
    num_workers: int = 2,
    loader_batches: int = 20,
    output: str | None = None,
    plot: str | None = None,
    seed: int = 42,
    data_dir: str = "data",
    weight_tied: bool = False,
) -> dict:
    """Measure peak training memory (by component), step and inference times of vit and dblock variants, loader speed.

    Args:
        data: Dataset whose shape is used: cifar10, cifar100, tiny-imagenet, digits or imagefolder (inputs are random;
            no image is read).
        batch_size: Training and inference batch size.
        num_blocks: dblock: number of blocks B the layers are split into (default 3, or the length of
            --layers_per_block).
        layers_per_block: dblock: layers of each block, block 0 first, e.g. 6,4,2 (default: the even split); the worst
            block is reported.
        train_blocks: dblock: measure an independent job that builds and trains only these blocks (e.g. 1); no inference
            timing.
        hidden_size: Transformer width (default per dataset: 128; tiny-imagenet 768).
        num_hidden_layers: Transformer depth (default 12).
        num_attention_heads: Attention heads (default 4; tiny-imagenet 12).
        intermediate_size: MLP width (default 3072).
        patch_size: Patch side in pixels (default 4).
        image_size: Input side in pixels (default 32; tiny-imagenet 64).
        accelerator: auto (CUDA if present), cpu or gpu.
        precision: 32 (fp32, TF32 matmuls on CUDA) or bf16-mixed.
        compile: Run the models through torch.compile.
        overhead: Instead, measure aten ops and host milliseconds per training step of vit, dblock and dblock without
            offloading against bare PyTorch loops, at tiny widths and as configured (see docs/benchmarks.md).
        steps: Timed training steps (and inference batches) per variant; the median is reported.
        warmup_steps: Untimed steps before timing, after every block has been trained once.
        num_workers: Data loader worker processes for the loader measurement.
        loader_batches: Batches timed in the loader measurement (after one untimed batch that starts the workers).
        output: Write the results as JSON to this file.
        plot: Write a PNG stacked-bar chart of the memory breakdown to this file.
        seed: Seed of initialisation, inputs and the block sequence.
        data_dir: imagefolder only: folder whose train/ class folders give the number of classes.
        weight_tied: Also measure dblock-weight-tied: every block reuses one set of layers (see train's --weight_tied).
    """
    flags = dict(locals())
    import bench as benchmark
    from config import build_configs
    from fileio import check_writable

    check_at_least(batch_size=batch_size, num_blocks=num_blocks, steps=steps, loader_batches=loader_batches)
    check_at_least(minimum=0, warmup_steps=warmup_steps, num_workers=num_workers)
    check_accelerator(accelerator)
    for flag, path in (("--output", output), ("--plot", plot)):
        if path is not None:
            check_writable(flag, path)
    timing = benchmark.Timing(steps=steps, warmup_steps=warmup_steps, loader_batches=loader_batches)
    if overhead:
        import overhead as host_overhead

        return host_overhead.run(build_configs(data, flags), timing, output)
    return benchmark.run(build_configs(data, flags), timing, output, plot)


def push(
    run: str,
    *,
    repo_id: str,
    private: bool = False,
    dry_run: str | None = None,
    include_checkpoint: bool = False,
) -> str:
    """Share a trained model on the Hugging Face Hub: model.safetensors, config.json, config.yaml, metrics.json, card.

    Args:
        run: Run folder written by train (its last.ckpt, or the checkpoint its metrics.json scored), or a .ckpt file in
            one.
        repo_id: Hub repository OWNER/NAME, created if missing; needs a token (`hf auth login` or HF_TOKEN).
        private: Create the repository as private (an existing one keeps its visibility).
        dry_run: Write the model folder here and upload nothing.
        include_checkpoint: Also upload the Lightning .ckpt (optimizer state included, for resuming).
    """
    from config import default_flags
    from hub.publish import push as push_model

    return push_model(
        run, repo_id=repo_id, private=private, dry_run=dry_run, include_checkpoint=include_checkpoint,
        train_defaults=default_flags("train"),
    )


COMMANDS = {
    "train": train, "test": test, "diagnose": diagnose, "bench": bench, "report": report, "assemble": assemble,
    "push": push,
}
# Subcommands whose positional argument is a list, and their flags that take the next token as value.
LIST_POSITIONALS = {"report": ("--output", "--plot", "--config"), "assemble": ("--output", "--config")}


def boolean_flags() -> set[str]:
    """`--name` of every boolean flag of every subcommand."""
    flags = set()
    for fn in COMMANDS.values():
        for name, hint in typing.get_type_hints(fn).items():
            if hint in (bool, bool | None):
                flags.add(f"--{name}")
    return flags


DASH_VALUE_FLAGS = ("--postfix",)  # values such as "-rand-augment" start with a dash


def expand_bare_flags(argv: list[str]) -> list[str]:
    """Accept the released program's switches (`--add_rand_aug`, `--debug`, ...) without a value, meaning true,
    and `--postfix -rand-augment` although its value starts with a dash."""
    flags, out, skip = boolean_flags(), [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token in DASH_VALUE_FLAGS and following is not None:
            out.append(f"{token}={following}")
            skip = True
            continue
        out.append(token)
        if token in flags and (following or "").lower() not in ("true", "false", "yes", "no", "1", "0"):
            out.append("true")
    return out


def bundle_list_positional(argv: list[str]) -> list[str]:
    """Gather the positional arguments of `report` and `assemble` into one JSON list: jsonargparse reads a
    list positional from a single token."""
    if not argv or argv[0] not in LIST_POSITIONALS:
        return argv
    value_flags, flags, items, i = LIST_POSITIONALS[argv[0]], [], [], 1
    while i < len(argv):
        token = argv[i]
        if token in value_flags and i + 1 < len(argv):
            flags += argv[i : i + 2]
            i += 2
            continue
        (flags if token.startswith("-") else items).append(token)
        i += 1
    return [argv[0], *flags, *([json.dumps(items)] if items else [])]


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the chosen subcommand; bad input becomes one line on stderr and exit code 2."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    # config.yaml is written into the run folder before Lightning's first checkpoint; that is expected.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    argv = bundle_list_positional(expand_bare_flags(sys.argv[1:] if argv is None else argv))
    try:
        auto_cli(COMMANDS, args=argv, parser_class=OneLineErrorParser, as_positional=True)
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
