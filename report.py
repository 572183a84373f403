"""`main.py report RUN_DIR...`: one Markdown row per run folder, the paper's Table 1 beside them, and training curves.

Only what runs write is read: config.yaml (the resolved train flags), metrics.json (the test scores),
blocks.json (the layer allocation, when present), the CSV logger's csv/version_N/metrics.csv files,
the step counter of the newest checkpoint and, for runs logged to W&B, files/wandb-summary.json.

torch, matplotlib and the model code are imported inside functions, because main.py imports this module on every
start-up.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import plotting
from errors import UserError
from fileio import check_writable, read_mapping, write_output
from paper import PaperResult, layout_text, paper_results

UNKNOWN, NOT_APPLICABLE = "?", "-"
PAPER_RUN = "paper, Table 1"

TESTED = "tested"
UNTESTED = "trained, not tested"
UNFINISHED = "unfinished (crashed, stopped or running)"
NO_CHECKPOINT = "no checkpoint (crashed or running)"
PAPER = "paper reference"

COLUMNS = (
    "run", "model", "data", "blocks (layers)", "partition", "gamma", "augment", "levers", "epochs (planned)",
    "steps (done)",
    "inference steps", "test acc %", "images", "checkpoint scored", "status",
)
BLOCK_CE = re.compile(r"train/ce_loss_(\d+)")
BLOCK_ACC = re.compile(r"diag/block_acc_(\d+)")
# The periodic test-split evaluation if the run logged it, else the validation split.
ACCURACY_KEYS = ("eval/acc", "val/acc")
EVAL_KEYS = ("test/acc", *ACCURACY_KEYS)


def report(run_dirs: list[str], *, output: str | None = None, plot: str | None = None) -> list[dict[str, str]]:
    """One Markdown table row per run folder (configuration, steps, test accuracy, status), with the paper's Table 1
    rows.

    Args:
        run_dirs: Run folders written by train, e.g. logs/my-sweep-* (a folder needs config.yaml or metrics.json).
        output: Also write the Markdown table to this file.
        plot: Write a PNG: test accuracy against epoch (logged eval/acc or val/acc) and each block's training loss
            against step.
    """
    if not run_dirs:
        raise UserError("give at least one run folder, e.g. `main.py report logs/*`")
    for flag, path in (("--output", output), ("--plot", plot)):
        if path is not None:
            check_writable(flag, path)
    runs = [load_run(path) for path in run_dirs]
    rows = [run_row(run) for run in runs] + paper_rows(runs)
    table = markdown_table(rows)
    if plot is not None:
        for run in runs:
            if run.logs_to_wandb and not run.history:
                note = f"note: {run.path} logged to W&B only: {wandb_history_note()}, so its curves are not plotted"
                print(note, file=sys.stderr)
        png = plotting.render_png(plot_runs(runs))
        write_output(plot, "--plot", lambda f: f.write(png))
    if output is not None:
        write_output(output, "--output", lambda f: f.write((table + "\n").encode()))
    print(table)
    return rows


# ---- reading a run folder -------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """What the report needs from the newest checkpoint of a run."""

    name: str
    global_step: int
    epochs_processed: int | None  # epochs whose batches ran (the last one possibly cut short by max_steps)


@dataclass(frozen=True)
class Run:
    """Everything read from one run folder."""

    path: Path
    config: dict  # config.yaml; empty when the folder holds only a metrics.json
    metrics: dict | None
    blocks: list[dict] | None  # blocks.json's "blocks"
    checkpoint: Checkpoint | None
    history: list[dict[str, float]]  # rows of every csv/version_N/metrics.csv, in version order
    wandb_summary: dict | None
    logs_to_wandb: bool

    @property
    def name(self) -> str:
        """The run folder's name (also for `.` or a path with a trailing slash)."""
        return self.path.resolve().name

    @property
    def model_type(self) -> str | None:
        """vit or dblock, from metrics.json or config.yaml."""
        return (self.metrics or {}).get("model_type") or self.config.get("model_type")

    @property
    def is_dblock(self) -> bool:
        return self.model_type == "dblock"

    @property
    def num_blocks(self) -> int:
        """Blocks trained one per step (1 for the end-to-end baseline); dblock's epochs and max_steps are multiplied by
        it."""
        sizes = block_sizes(self) if self.is_dblock else None
        return len(sizes) if sizes else 1

    @property
    def epoch_scale(self) -> int:
        """What train multiplies --num_epochs and --max_steps by: the blocks this run draws its steps from
        (--train_blocks for an independent job, else all B)."""
        from dblock import parse_block_list

        job_blocks = parse_block_list(self.config.get("train_blocks"), "train_blocks") if self.is_dblock else None
        return len(job_blocks) if job_blocks else self.num_blocks


def load_run(path: str) -> Run:
    """Read a run folder; a path that is not one is a one-line error naming it."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"run folder {path} does not exist: pass folders under logs/ written by train")
    config_path, metrics_path, blocks_path = folder / "config.yaml", folder / "metrics.json", folder / "blocks.json"
    if not config_path.is_file() and not metrics_path.is_file():
        raise UserError(
            f"{path} is not a run folder (it holds neither config.yaml nor metrics.json): "
            "pass folders under logs/ written by train"
        )
    return Run(
        path=folder,
        config=read_run_file(config_path) if config_path.is_file() else {},
        metrics=read_run_file(metrics_path) if metrics_path.is_file() else None,
        blocks=read_blocks(blocks_path) if blocks_path.is_file() else None,
        checkpoint=newest_checkpoint(folder),
        history=read_history(folder),
        wandb_summary=read_wandb_summary(folder),
        logs_to_wandb=(folder / "wandb").is_dir(),
    )


def read_run_file(path: Path) -> dict:
    """The mapping in one of the run folder's .json or .yaml files, or a one-line error naming the file."""
    return read_mapping(path, "restore it or leave its run folder out")


def read_blocks(path: Path) -> list[dict]:
    """blocks.json's per-block entries, each with its list of layers."""
    blocks = read_run_file(path).get("blocks")
    listed = isinstance(blocks, list) and blocks
    if not listed or not all(isinstance(b, dict) and isinstance(b.get("layers"), list) for b in blocks):
        raise UserError(
            f"{path} lacks a non-empty \"blocks\" list whose entries hold \"layers\": restore it or delete it"
        )
    return blocks


def newest_checkpoint(folder: Path) -> Checkpoint | None:
    """Step counter and epoch progress of the most recently written checkpoint, or None without one."""
    paths = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))
    if not paths:
        return None
    import torch

    newest = paths[-1]
    try:
        # mmap: only the few bytes of the counters are read, not the weights and optimizer state.
        ckpt = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
        step = int(ckpt["global_step"])
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise UserError(
            f"checkpoint {newest} is corrupt or not a training checkpoint ({type(err).__name__}): "
            "delete it or leave its run folder out"
        ) from None
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    processed = progress.get("processed")
    return Checkpoint(newest.name, step, None if processed is None else int(processed))


def version_number(folder: Path) -> int:
    """N of a CSV logger folder version_N (so version_10 sorts after version_2)."""
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def read_history(folder: Path) -> list[dict[str, float]]:
    """Rows of every CSV logger version (one per start of the run), oldest first; empty cells left out."""
    rows = []
    for path in sorted(folder.glob("csv/version_*/metrics.csv"), key=lambda p: version_number(p.parent)):
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    rows.append({k: float(v) for k, v in row.items() if k is not None and v not in (None, "")})
                except (TypeError, ValueError):
                    raise UserError(
                        f"{path} line {line} holds a non-numeric value: restore the file or delete that line"
                    ) from None
    return rows


def read_wandb_summary(folder: Path) -> dict | None:
    """The newest W&B run's final numbers (files/wandb-summary.json), if W&B wrote one into the run folder."""
    paths = sorted(folder.glob("wandb/*run-*/files/wandb-summary.json"), key=lambda p: p.stat().st_mtime_ns)
    return read_run_file(paths[-1]) if paths else None


def wandb_history_note() -> str:
    """Why a W&B-only run has no curves: the installed wandb cannot read back the history of its .wandb files."""
    from importlib import metadata

    try:
        version = f"wandb {metadata.version('wandb')}"
    except metadata.PackageNotFoundError:
        version = "wandb (not installed)"
    return f"{version} has no reader of the history in .wandb files (train with --logger csv for curves)"


# ---- one row per run ------------------------------------------------------------------------------
def steps_from_history(rows: list[dict[str, float]]) -> int | None:
    """Optimizer steps done according to the CSV logger, or None without any CSV rows.

    A training row of step s is logged before that step's update (s + 1 steps done once it is logged);
    evaluation rows carry the number of steps already done.
    """
    if not rows:
        return None
    done = [r["step"] + 1 for r in rows if "step" in r and "train/loss" in r]
    done += [r["step"] for r in rows if "step" in r and any(k in r for k in EVAL_KEYS)]
    return int(max(done, default=0))


def steps_done(run: Run) -> int | None:
    """Optimizer steps done: the newest checkpoint's counter, else the CSV log's, else W&B's summary."""
    if run.checkpoint is not None:
        return run.checkpoint.global_step
    from_csv = steps_from_history(run.history)
    if from_csv is not None:
        return from_csv
    step = (run.wandb_summary or {}).get("trainer/global_step")
    return int(step) if isinstance(step, (int, float)) else None


def finished_training(run: Run) -> bool:
    """Whether the newest checkpoint is the end of the planned training (max_steps or every epoch reached)."""
    ckpt, max_steps, num_epochs = run.checkpoint, run.config.get("max_steps"), run.config.get("num_epochs")
    if ckpt is None:
        return False
    if max_steps is not None and max_steps > 0 and ckpt.global_step >= max_steps * run.epoch_scale:
        return True
    done = ckpt.epochs_processed
    return done is not None and num_epochs is not None and done >= num_epochs * run.epoch_scale


def status(run: Run) -> str:
    """How far the run got: tested, trained but not tested, or stopped (or still running) with or without a
    checkpoint."""
    if run.metrics is not None:
        return TESTED
    if run.checkpoint is None:
        return NO_CHECKPOINT
    return UNTESTED if finished_training(run) else UNFINISHED


@functools.cache
def flag_defaults() -> dict:
    """Train's defaults of the flags that an older config.yaml lacks (written before the flag existed)."""
    from config import default_flags  # imports the models: only once a report needs a default

    return default_flags("train")


def flag(config: dict, name: str):
    """A train flag of the run: its value in config.yaml, else train's default of it."""
    return config[name] if name in config else flag_defaults()[name]


def depth(config: dict) -> int:
    """Transformer layers of the run (None in config.yaml means the dataset's default architecture)."""
    from vit import default_arch

    return config.get("num_hidden_layers") or default_arch(config.get("data")).num_hidden_layers


def configured_layout(run: Run) -> tuple[int, ...]:
    """dblock's layers per block by config.yaml's flags, split by the model's own rules (DBlockConfig)."""
    from config import default_configs
    from dblock import parse_layers_per_block, resolve_num_blocks

    cfg = run.config
    try:
        layout = parse_layers_per_block(flag(cfg, "layers_per_block"))
        num_blocks = resolve_num_blocks(cfg.get("num_blocks"), layout)
        dcfg = dataclasses.replace(default_configs().dblock, num_blocks=num_blocks, layers_per_block=layout)
        dcfg.validate(depth(cfg))
    except UserError as err:
        raise UserError(f"{run.path / 'config.yaml'}: {err}") from None
    return dcfg.layout(depth(cfg))


def block_sizes(run: Run) -> list[int] | None:
    """Layers per block: blocks.json (the model's block table), else config.yaml's flags (None when the folder does not
    say)."""
    if run.blocks is not None:
        return [len(b["layers"]) for b in run.blocks]
    if not run.config:
        return None
    if not run.is_dblock:
        return [depth(run.config)]  # the end-to-end baseline is one block of every layer
    return list(configured_layout(run))


def allocation(run: Run) -> str:
    """Blocks and layers per block, e.g. `3 (4,4,4)`."""
    sizes = block_sizes(run)
    return UNKNOWN if sizes is None else layout_text(sizes)


def scored_checkpoint(run: Run) -> str:
    """The checkpoint metrics.json scored: its file name when it lies in the run folder, else its path."""
    path = (run.metrics or {}).get("ckpt_path")
    if not path:
        return NOT_APPLICABLE
    return Path(path).name if Path(path).parent.name == run.name else str(path)


def run_row(run: Run) -> dict[str, str]:
    """The table cells of one run: `?` where the folder does not say, `-` where the field does not apply."""
    cfg, metrics = run.config, run.metrics or {}

    def configured(text) -> str:
        """A cell computed from config.yaml, unknown without one."""
        return text() if cfg else UNKNOWN

    def dblock_only(text) -> str:
        """A cell that exists only for DiffusionBlocks runs."""
        return configured(text) if run.is_dblock else NOT_APPLICABLE

    steps = steps_done(run)
    acc = metrics.get("test/acc")
    inference = metrics.get("num_inference_steps") or cfg.get("num_inference_steps") or run.num_blocks
    return {
        "run": run.name,
        "model": run.model_type or UNKNOWN,
        "data": cfg.get("data", UNKNOWN),
        "blocks (layers)": allocation(run),
        "partition": dblock_only(lambda: flag(cfg, "partition")),
        "gamma": dblock_only(lambda: f"{flag(cfg, 'gamma'):g}"),
        "augment": configured(lambda: flag(cfg, "augment") + ("+RandAugment" if cfg.get("add_rand_aug") else "")),
        "levers": configured(lambda: levers(cfg)),
        "epochs (planned)": configured(lambda: planned_epochs(run)),
        "steps (done)": UNKNOWN if steps is None else str(steps),
        "inference steps": dblock_only(lambda: str(inference)),
        "test acc %": NOT_APPLICABLE if acc is None else f"{100 * acc:.2f}",
        "images": str(metrics.get("num_test_images", NOT_APPLICABLE)),
        "checkpoint scored": scored_checkpoint(run),
        "status": status(run),
    }


def levers(config: dict) -> str:
    """The training levers (--loss, --ema_decay, ...) the run set away from the released defaults, else `-`."""
    from config import lever_text

    return lever_text(config) or NOT_APPLICABLE


def planned_epochs(run: Run) -> str:
    """Epochs train plans: --num_epochs, times the blocks it trains for dblock (B, or an independent job's)."""
    num_epochs = run.config.get("num_epochs")
    return UNKNOWN if num_epochs is None else str(num_epochs * run.epoch_scale)


def paper_references(runs: list[Run]) -> list[PaperResult]:
    """The paper's Table 1 rows for every dataset among the runs that the paper reports."""
    datasets = dict.fromkeys(run.config.get("data") for run in runs)  # first-appearance order, no repeats
    return [result for data in datasets for result in paper_results(data)]


def paper_rows(runs: list[Run]) -> list[dict[str, str]]:
    """The paper's rows of the table."""
    rows = []
    for result in paper_references(runs):
        row = dict.fromkeys(COLUMNS, "")
        row.update(run=PAPER_RUN, model=result.model_type, data=result.data, status=PAPER)
        row.update({"blocks (layers)": layout_text(result.layout()), "test acc %": f"{result.accuracy:.2f}"})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    """The report's Markdown table, its columns in COLUMNS order."""
    from diagnose_render import markdown_table as table

    return table(list(COLUMNS), [[row[c] for c in COLUMNS] for row in rows])


# ---- curves ---------------------------------------------------------------------------------------
def series(rows: list[dict[str, float]], x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) points of the rows holding both keys, sorted by x.

    A resumed run logs again the steps after the checkpoint it resumed from; the later log wins,
    because it is the history the saved weights followed.
    """
    points = {r[x]: r[y] for r in rows if x in r and y in r}
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def accuracy_curve(run: Run) -> tuple[list[float], list[float]]:
    """Accuracy (fraction) against end-to-end epochs trained (a dblock epoch trains one block: 1/B of one), from the
    run's periodic evaluations; empty without any."""
    for key in ACCURACY_KEYS:
        epochs, acc = series(run.history, "epoch", key)
        if epochs:
            return [(e + 1) / run.num_blocks for e in epochs], acc
    return [], []


def block_accuracy_curves(run: Run) -> dict[int, tuple[list[float], list[float]]]:
    """diag/block_acc_<b> (train --diagnose_every_n_epochs) against end-to-end epochs, per block."""
    blocks = sorted({int(m.group(1)) for r in run.history for k in r if (m := BLOCK_ACC.fullmatch(k))})
    curves = {}
    for b in blocks:
        epochs, acc = series(run.history, "epoch", f"diag/block_acc_{b}")
        curves[b] = ([(e + 1) / run.num_blocks for e in epochs], acc)
    return curves


def loss_curves(run: Run) -> dict[int | None, tuple[list[float], list[float]]]:
    """Unweighted cross-entropy against end-to-end steps (optimizer steps / B): per block (train/ce_loss_<b>) for
    dblock, key None for the vit's train/loss (its cross-entropy)."""
    rows = run.history
    blocks = sorted({int(m.group(1)) for r in rows for k in r if (m := BLOCK_CE.fullmatch(k))})
    if not blocks:
        steps, losses = series(rows, "step", "train/loss")
        return {None: (steps, losses)} if steps else {}
    curves = {}
    for b in blocks:
        # Lightning repeats a block's last loss on later rows until the epoch ends: keep the steps that trained it.
        steps, losses = series([r for r in rows if r.get("train/block", b) == b], "step", f"train/ce_loss_{b}")
        curves[b] = ([s / run.num_blocks for s in steps], losses)
    return curves


def plot_runs(runs: list[Run]):
    """Accuracy of every evaluated run and the blocks' own-range accuracy (top), then one small panel of training
    cross-entropy per run, coloured by block, a smoothed curve over the faint raw one (below); every x axis counts
    end-to-end epochs or steps, so a vit and its dblock twin line up."""
    columns = min(max(len(runs), 2), 4)
    rows = 1 + -(-len(runs) // columns)
    fig = plotting.new_figure(4 * columns, 3.4 * rows)
    grid = fig.add_gridspec(rows, columns)
    half = columns // 2
    ax_acc, ax_diag = fig.add_subplot(grid[0, :half]), fig.add_subplot(grid[0, half:])
    draw_accuracy(ax_acc, runs)
    draw_block_accuracy(ax_diag, runs)
    colours = plotting.block_colours(max((r.num_blocks for r in runs), default=1))
    first = None
    for i, run in enumerate(runs):
        ax = fig.add_subplot(grid[1 + i // columns, i % columns], sharey=first)
        first = first or ax
        draw_losses(ax, run, colours)
    return fig


def draw_accuracy(ax, runs: list[Run]) -> None:
    """Test (or validation) accuracy against end-to-end epochs, one line per evaluated run; the paper's dashed."""
    for run in runs:
        epochs, acc = accuracy_curve(run)
        if epochs:
            ax.plot(epochs, [100 * a for a in acc], marker="o", ms=3, label=run.name)
    if not ax.get_lines():
        ax.text(0.5, 0.95, "no eval/acc or val/acc logged", ha="center", va="top", transform=ax.transAxes)
    for ref, style in zip(paper_references(runs), ("--", ":", "-.", (0, (5, 5)))):
        label = f"paper {ref.data} {ref.model_type} {layout_text(ref.layout())}"
        ax.axhline(ref.accuracy, linestyle=style, linewidth=1.2, color="gray", label=label)
    ax.set(xlabel="end-to-end epochs (dblock: epochs / B)", ylabel="test accuracy (%)",
           title="Accuracy during training")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)


def draw_block_accuracy(ax, runs: list[Run]) -> None:
    """diag/block_acc_<b> curves: colour by block, line style by run."""
    styles = ("-", "--", ":", "-.")
    for i, run in enumerate(runs):
        curves = block_accuracy_curves(run)
        colours = plotting.block_colours(len(curves))
        for (b, (epochs, acc)), colour in zip(curves.items(), colours):
            ax.plot(epochs, [100 * a for a in acc], linestyle=styles[i % len(styles)], marker="o", ms=3,
                    color=colour, label=f"{run.name} block {b}")
    if ax.get_lines():
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no diag/block_acc logged\n(train --diagnose_every_n_epochs N)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set(xlabel="end-to-end epochs (dblock: epochs / B)", ylabel="accuracy (%)",
           title="Each block at its own noise range (true label state + noise)")
    ax.grid(alpha=0.3)


def draw_losses(ax, run: Run, colours: list) -> None:
    """One run's training cross-entropy: faint raw points, a smoothed line per block (black for the vit)."""
    curves = loss_curves(run)
    for block, (steps, losses) in curves.items():
        colour = "black" if block is None else colours[block]
        label = "cross-entropy" if block is None else f"block {block}"
        window = max(1, len(losses) // 15)
        ax.plot(steps, losses, color=colour, alpha=0.25, lw=0.8, marker="o" if len(steps) == 1 else None)
        ax.plot(steps, plotting.smoothed(losses, window), color=colour, lw=1.6, label=label)
    if curves:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=run.name, xlabel="end-to-end steps (dblock: steps / B)", ylabel="training cross-entropy")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
