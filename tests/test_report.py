"""`main.py report`: the table and plot built from run folders written by real (tiny) training runs."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import dblock
import main
import plotting
import report
from cli_helpers import assert_one_line_error, run_cli, train_args
from dblock import block_for_step
from experiment import RUN_NAME_ENV
from synthetic import write_cifar

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED = 42  # train's default, which decides the block trained at each step


def train_in_process(args: list) -> int:
    """main.py train in this process (imports are already paid for); returns the exit code."""
    return main.main([str(a) for a in args])


def poison_loss(mp: pytest.MonkeyPatch, at_call: int) -> None:
    """Make dblock's training loss non-finite on its `at_call`-th evaluation: train stops there with a UserError."""
    real, calls = dblock.reduce_loss, []

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == at_call else loss

    mp.setattr(dblock, "reduce_loss", poisoned)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run folders of every kind, by real training runs on a synthetic CIFAR-100 (tiny model, CSV logger).

    vit, dblock: trained and tested. unfinished: dblock that failed at step 5, after its epoch-0 checkpoint (step 4).
    crashed: dblock that failed on its first step, before any checkpoint.
    untested: the vit run without its metrics.json.
    """
    root = tmp_path_factory.mktemp("report")
    data_dir = write_cifar(root / "data", "cifar100", n_train=32, n_test=12)  # 4 steps per epoch at batch 8
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DIFFUSIONBLOCKS_OFFLINE", "1")
        mp.setenv(RUN_NAME_ENV, "")  # train sets it; the context removes it again
        assert train_in_process(train_args(data_dir, "vit")) == 0
        assert train_in_process(train_args(data_dir, "dblock", model_type="dblock")) == 0
        with pytest.MonkeyPatch.context() as poisoned:
            poison_loss(poisoned, at_call=6)
            args = train_args(data_dir, "unfinished", "--save_every_n_epochs", "1", model_type="dblock", steps=4)
            assert train_in_process(args) == 2
        with pytest.MonkeyPatch.context() as poisoned:
            poison_loss(poisoned, at_call=1)
            assert train_in_process(train_args(data_dir, "crashed", model_type="dblock")) == 2
    logs = root / "logs"
    shutil.copytree(logs / "vit", logs / "untested")
    (logs / "untested" / "metrics.json").unlink()
    return {name: logs / name for name in ("vit", "dblock", "unfinished", "crashed", "untested")}


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the printed Markdown table as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= {"|", "-"}, lines[1]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def cells(row: dict[str, str], *columns: str) -> tuple[str, ...]:
    """The row's cells in those columns."""
    return tuple(row[column] for column in columns)


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def blocks_trained(steps: int) -> set[int]:
    """Blocks a dblock run trained in its first `steps` optimizer steps."""
    return {block_for_step(SEED, s, 3) for s in range(steps)}


def copy_run(runs: dict[str, Path], source: str, name: str, tmp_path: Path) -> Path:
    """A copy of a run folder, to be altered as runs on other branches (or other loggers) would write it."""
    return Path(shutil.copytree(runs[source], tmp_path / name))


def test_table_rows_statuses_and_paper_rows(runs, tmp_path, capsys):
    order = ["vit", "dblock", "unfinished", "crashed", "untested"]
    out_md, out_png = tmp_path / "report.md", tmp_path / "report.png"
    # Folders and flags interleaved: every folder is taken, whatever its position.
    args = ["report", runs["vit"], "--output", out_md, *(runs[n] for n in order[1:3]), "--plot", out_png,
            *(runs[n] for n in order[3:])]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    rows = parse_table(out)
    assert [r["run"] for r in rows] == [*order, report.PAPER_RUN, report.PAPER_RUN]
    by_run = {r["run"]: r for r in rows}
    for name in ("vit", "dblock"):
        m = metrics(runs[name])
        assert by_run[name]["test acc %"] == f"{100 * m['test/acc']:.2f}"
        assert by_run[name]["images"] == str(m["num_test_images"]) == "12"
        assert by_run[name]["checkpoint scored"] == "last.ckpt" and by_run[name]["status"] == report.TESTED
    vit, db = by_run["vit"], by_run["dblock"]
    expected = ("vit", "cifar100", "1 (6)", "-", "-")
    assert cells(vit, "model", "data", "blocks (layers)", "partition", "gamma") == expected
    expected = ("500", "2", "-", "released")
    assert cells(vit, "epochs (planned)", "steps (done)", "inference steps", "augment") == expected
    expected = ("3 (2,2,2)", "equiprob", "0.05", "3")
    assert cells(db, "blocks (layers)", "partition", "gamma", "inference steps") == expected
    assert (db["epochs (planned)"], db["steps (done)"]) == ("1500", "6")  # dblock: epochs and max_steps x B
    assert (by_run["unfinished"]["status"], by_run["unfinished"]["steps (done)"]) == (report.UNFINISHED, "4")
    assert cells(by_run["crashed"], "status", "steps (done)") == (report.NO_CHECKPOINT, "0")  # from its CSV log
    assert (by_run["untested"]["status"], by_run["untested"]["steps (done)"]) == (report.UNTESTED, "2")
    for name in ("unfinished", "crashed", "untested"):
        assert cells(by_run[name], "test acc %", "images", "checkpoint scored") == ("-", "-", "-")
    paper = [r for r in rows if r["run"] == report.PAPER_RUN]
    assert [cells(r, "model", "data", "blocks (layers)", "test acc %", "status") for r in paper] == [
        ("vit", "cifar100", "1 (12)", "60.25", report.PAPER),
        ("dblock", "cifar100", "3 (4,4,4)", "59.30", report.PAPER),
    ]
    assert out_md.read_text() == out.rstrip("\n") + "\n"  # --output holds exactly the printed table
    assert out_png.read_bytes().startswith(PNG_MAGIC)
    assert err == ""


def test_plot_has_one_line_per_run_and_block(runs, tmp_path):
    evals = copy_run(runs, "dblock", "evals", tmp_path)
    # Periodic evaluations as a run resumed twice would log them (flag on another branch): version_10 must come after
    # version_2, and the later log of an epoch replaces the earlier one.
    logs = (
        ("version_2", ["epoch,step,eval/acc", "0,4,0.10", "1,8,0.20"]),
        ("version_10", ["epoch,step,eval/acc", "1,8,0.25", "2,12,0.30"]),
        ("version_11", ["epoch,step,diag/block_acc_0,diag/block_acc_1,diag/block_acc_2", "2,12,0.5,0.75,1.0"]),
    )
    for version, lines in logs:
        (evals / "csv" / version).mkdir()
        (evals / "csv" / version / "metrics.csv").write_text("\n".join(lines) + "\n")
    loaded = [report.load_run(str(p)) for p in (*runs.values(), evals)]
    fig = report.plot_runs(loaded)
    ax_acc, ax_diag, *panels = fig.axes
    acc_lines = {line.get_label(): line for line in ax_acc.get_lines()}
    assert set(acc_lines) == {"evals", "paper cifar100 vit 1 (12)", "paper cifar100 dblock 3 (4,4,4)"}
    # a dblock epoch trains one of B = 3 blocks: epochs 0, 1, 2 done are 1/3, 2/3 and 1 end-to-end epochs
    assert list(acc_lines["evals"].get_xdata()) == pytest.approx([1 / 3, 2 / 3, 1])
    assert list(acc_lines["evals"].get_ydata()) == pytest.approx([10, 25, 30])
    diag = {line.get_label(): line for line in ax_diag.get_lines()}  # only evals logged diag/block_acc_<b>
    assert set(diag) == {"evals block 0", "evals block 1", "evals block 2"}
    assert [list(diag[f"evals block {b}"].get_ydata()) for b in range(3)] == [[50.0], [75.0], [100.0]]
    assert list(diag["evals block 0"].get_xdata()) == [1.0]
    assert [ax.get_title() for ax in panels] == [run.name for run in loaded]  # one small panel per run
    colours = plotting.block_colours(3)
    assert [tuple(diag[f"evals block {b}"].get_color()) for b in range(3)] == [tuple(c) for c in colours]
    by_run = {ax.get_title(): {line.get_label(): line for line in ax.get_lines()} for ax in panels}
    for name in ("dblock", "evals"):
        smooth = {k: v for k, v in by_run[name].items() if not k.startswith("_")}
        assert set(smooth) == {f"block {b}" for b in blocks_trained(6)}
        for b in blocks_trained(6):  # a block's curve holds only the steps that trained it, in end-to-end steps
            line = smooth[f"block {b}"]
            trained = [s / 3 for s in range(6) if block_for_step(SEED, s, 3) == b]
            assert list(line.get_xdata()) == pytest.approx(trained)
            assert tuple(line.get_color()) == tuple(colours[b])  # the same colour for a block in every panel
    assert {k for k in by_run["unfinished"] if not k.startswith("_")} == {f"block {b}" for b in blocks_trained(5)}
    assert {k for k in by_run["vit"] if not k.startswith("_")} == {"cross-entropy"}
    assert list(by_run["vit"]["cross-entropy"].get_xdata()) == [0, 1]
    assert not by_run["crashed"]  # the crashed run logged no loss: an empty panel
    assert plotting.render_png(fig).startswith(PNG_MAGIC)


def row_with_config(run: Path, config: dict, capsys) -> dict[str, str]:
    """The report's row of a run folder once its config.yaml holds `config`."""
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(["report", run], capsys)
    assert code == 0, err
    return parse_table(out)[0]


def test_allocation_and_partition_from_keys_added_on_other_branches(runs, tmp_path, capsys):
    run = copy_run(runs, "dblock", "alloc", tmp_path)
    (run / "blocks.json").unlink()  # blocks.json would take precedence: read the flags alone, as for older runs
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(layers_per_block="3,2,1", partition="uniform", augment="paper", add_rand_aug=True, gamma=0.1)
    row = row_with_config(run, config, capsys)
    expected = ("3 (3,2,1)", "uniform", "paper+RandAugment", "0.1")
    assert cells(row, "blocks (layers)", "partition", "augment", "gamma") == expected
    config.update(layers_per_block="4,2")  # the allocation decides B, whatever the num_blocks flag said
    row = row_with_config(run, config, capsys)
    assert (row["blocks (layers)"], row["epochs (planned)"]) == ("2 (4,2)", "1000")
    ranges = {"sigma_range": [0.1, 1.0], "widened_range": [0.1, 1.0], "probability_mass": 1 / 3}
    blocks = [{"block": b, "layers": layers, **ranges} for b, layers in enumerate([[0, 1], [2, 3, 4], [5]])]
    (run / "blocks.json").write_text(json.dumps({"blocks": blocks}))
    row = row_with_config(run, config, capsys)
    assert cells(row, "blocks (layers)", "epochs (planned)") == ("3 (2,3,1)", "1500")  # blocks.json wins over config


def test_steps_from_the_csv_log_without_a_checkpoint(runs, tmp_path, capsys):
    run = copy_run(runs, "unfinished", "no-ckpt", tmp_path)
    for ckpt in run.glob("*.ckpt"):
        ckpt.unlink()
    code, out, err = run_cli(["report", run], capsys)
    assert code == 0, err
    row = parse_table(out)[0]
    # Steps 0-4 logged their loss (5 done); step 5 failed before logging (the checkpoint had stopped at step 4).
    assert (row["steps (done)"], row["status"]) == ("5", report.NO_CHECKPOINT)


def test_wandb_run_without_csv_history(runs, tmp_path, capsys):
    run = copy_run(runs, "crashed", "wandb-run", tmp_path)
    shutil.rmtree(run / "csv")
    files = run / "wandb" / "offline-run-20260101_000000-wandb-run" / "files"
    files.mkdir(parents=True)
    (files.parent / "run-wandb-run.wandb").write_bytes(b"")  # the history, which the installed wandb cannot read back
    code, out, err = run_cli(["report", run, "--plot", tmp_path / "w.png"], capsys)
    assert code == 0, err
    assert parse_table(out)[0]["steps (done)"] == "?"
    assert "note:" in err and str(run) in err and "W&B" in err and "--logger csv" in err
    (files / "wandb-summary.json").write_text(json.dumps({"trainer/global_step": 5, "train/loss": 1.0}))
    code, out, err = run_cli(["report", run], capsys)
    assert code == 0, err
    assert parse_table(out)[0]["steps (done)"] == "5" and err == ""  # the note is about curves: only with --plot


def test_folder_with_only_metrics_json(runs, tmp_path, capsys):
    run = tmp_path / "scored-elsewhere"
    run.mkdir()
    # json writes 5e-05: no decimal point.
    scored = {**metrics(runs["vit"]), "test/acc": 5e-05, "num_test_images": 20000}
    (run / "metrics.json").write_text(json.dumps(scored))
    code, out, err = run_cli(["report", run], capsys)
    assert code == 0, err
    row = parse_table(out)[0]
    assert (row["model"], row["data"], row["blocks (layers)"], row["status"]) == ("vit", "?", "?", report.TESTED)
    assert (row["test acc %"], row["images"], row["epochs (planned)"]) == (f"{100 * 5e-05:.2f}", "20000", "?")
    assert row["checkpoint scored"].endswith(os.path.join("vit", "last.ckpt"))  # scored in another folder: path kept


@pytest.mark.parametrize("case", ["missing", "empty", "bad-metrics", "bad-csv", "bad-checkpoint"])
def test_bad_run_folder_is_a_one_line_error_and_writes_nothing(runs, tmp_path, capsys, case):
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    elif case != "missing":
        copy_run(runs, "vit", case, tmp_path)
        if case == "bad-metrics":
            (target / "metrics.json").write_text("{not json")
        elif case == "bad-csv":
            (target / "csv" / "version_0" / "metrics.csv").write_text("step,train/loss\n0,abc\n")
        else:
            (target / "last.ckpt").write_bytes(b"truncated")
    out_md = tmp_path / "out.md"
    args = ["report", runs["vit"], target, "--output", out_md, "--plot", tmp_path / "out.png"]
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, err, case)
    assert out == "" and not out_md.exists() and not (tmp_path / "out.png").exists()


def test_no_run_folder_is_an_argument_error(capsys, tmp_path):
    code, out, err = run_cli(["report"], capsys)
    assert_one_line_error(code, err, "run_dirs")
    assert out == ""
    (tmp_path / "empty.yaml").write_text("run_dirs: []\n")
    code, out, err = run_cli(["report", "--config", tmp_path / "empty.yaml"], capsys)
    assert_one_line_error(code, err, "at least one run folder")


def test_config_of_an_older_run_reads_the_defaults(runs, tmp_path, capsys):
    """A config.yaml written before --partition, --augment and --layers_per_block existed, with depth and block count
    left at null: the defaults the model applies (the paper's 12 layers, 3 blocks of 4)."""
    run = copy_run(runs, "dblock", "older", tmp_path)
    (run / "blocks.json").unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("partition", "augment", "layers_per_block", "gamma"):
        del config[key]
    config.update(num_hidden_layers=None, num_blocks=None)
    row = row_with_config(run, config, capsys)
    expected = ("3 (4,4,4)", "equiprob", "released", "0.05")
    assert cells(row, "blocks (layers)", "partition", "augment", "gamma") == expected
    assert row["epochs (planned)"] == "1500"
    config.update(num_hidden_layers=6, num_blocks=4)  # a split train refuses: the report says why, naming the file
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(["report", run], capsys)
    reason = "--num_hidden_layers 6 is not divisible by --num_blocks 4"
    assert_one_line_error(code, err, str(run / "config.yaml"), reason)
    assert out == ""


def test_checkpoint_counters_match_torch(runs):
    ckpt = torch.load(runs["unfinished"] / "last.ckpt", weights_only=True)
    assert report.newest_checkpoint(runs["unfinished"]).global_step == ckpt["global_step"] == 4


SLURM_DIR = Path(__file__).resolve().parents[1] / "configs" / "slurm"
TRAIN_SCRIPTS = sorted(p.name for p in SLURM_DIR.glob("*.sbatch") if "assemble" not in p.name)


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_slurm_scripts_pass_extra_arguments_to_train(script, tmp_path):
    """The sweep recipe's `sbatch SCRIPT --run_name ... --layers_per_block ...` reaches `main.py train`, after the
    script's flags."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/sh\necho "$@"\n')  # prints the command it would run on every task
    (fake_bin / "uv").write_text("#!/bin/sh\ntrue\n")
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    extra = ["--run_name", "alloc-4-4-4-uniform", "--layers_per_block", "4,4,4", "--partition", "uniform"]
    slurm = {"SLURM_SUBMIT_DIR": str(repo), "SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "1"}
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", **slurm}
    sbatch = ["bash", SLURM_DIR / script, *extra]
    result = subprocess.run(sbatch, env=env, capture_output=True, text=True, check=True)
    command = result.stdout.split()
    assert command[:5] == ["uv", "run", "--frozen", "--no-sync", "main.py"] and command[-len(extra):] == extra


def test_an_independent_job_plans_epochs_for_its_own_blocks(runs, tmp_path, capsys):
    # The unfinished dblock run's last checkpoint is at step 4. With --max_steps 2 a joint run plans 2 x B = 6 steps
    # (unfinished); a job of two blocks plans 2 x 2 = 4 (finished, and a job never tests).
    job = copy_run(runs, "unfinished", "job", tmp_path)
    config = {**yaml.safe_load((job / "config.yaml").read_text()), "max_steps": 2}
    before = row_with_config(job, config, capsys)
    assert cells(before, "epochs (planned)", "status") == (str(config["num_epochs"] * 3), report.UNFINISHED)
    after = row_with_config(job, {**config, "train_blocks": "0,2"}, capsys)
    assert cells(after, "epochs (planned)", "status") == (str(config["num_epochs"] * 2), report.UNTESTED)
