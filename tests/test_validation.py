"""Validation as released (Tiny-ImageNet: best checkpoint by val/acc, tested after training) and
--eval_every_n_epochs."""

import csv
from pathlib import Path

import pytest
import torch

from cli_helpers import read_metrics, run_cli, train_args

EPOCHS = ["--max_steps", "-1", "--num_epochs", "2", "--save_every_n_epochs", "1"]


@pytest.fixture
def tiny_imagenet_dir(tmp_path, monkeypatch):
    """A synthetic Tiny-ImageNet in its real layout (16 training and 16 val images, 2 classes); logs/ land in
    tmp_path."""
    from synthetic import write_tiny_imagenet

    monkeypatch.chdir(tmp_path)
    return write_tiny_imagenet(tmp_path / "data", n_per_class=8)


def logged_rows(run: str, metric: str) -> list[dict]:
    """Rows of the run's CSV metrics that hold `metric`."""
    with open(Path("logs") / run / "csv" / "version_0" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get(metric)]


def scoring_args(data: str, data_dir: Path, ckpt_path: str) -> list[str]:
    """`main.py test` of a checkpoint with the training runs' batch size (so dblock draws the same noise per batch)."""
    return ["test", data, "--ckpt_path", ckpt_path, "--data_dir", data_dir, "--batch_size", "8", "--num_workers", "0",
            "--accelerator", "cpu"]


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_tiny_imagenet_tests_the_best_checkpoint_by_val_acc(tiny_imagenet_dir, capsys, model_type):
    args = train_args(tiny_imagenet_dir, "ti", *EPOCHS, data="tiny-imagenet", model_type=model_type)
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    rows = logged_rows("ti", "val/acc")
    epochs = 2 * (3 if model_type == "dblock" else 1)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))  # every --save_every_n_epochs epoch
    assert all(r["val/f1"] == r["val/acc"] for r in rows) and not logged_rows("ti", "eval/acc")
    accs = [float(r["val/acc"]) for r in rows]
    best_epoch = accs.index(max(accs))  # the first of equal scores is kept
    metrics = read_metrics("logs/ti/metrics.json")
    best = Path(metrics["ckpt_path"])
    assert best.name.startswith(f"epoch={best_epoch}-") and best.is_file() and best.name != "last.ckpt"
    assert torch.load(best, weights_only=True)["epoch"] == best_epoch
    assert metrics["test/acc"] == pytest.approx(max(accs))  # val/ is the test split; the same sampler noise
    code, _, err = run_cli(scoring_args("tiny-imagenet", tiny_imagenet_dir, str(best)), capsys)
    assert code == 0, err
    assert read_metrics(best.parent / "metrics.json")["test/acc"] == metrics["test/acc"]


def test_eval_every_n_epochs_logs_a_curve_and_changes_nothing_else(tiny_imagenet_dir, capsys):
    # dblock trains 6 epochs; validation (checkpoint selection) every 2, the curve every epoch.
    every_2 = ["--max_steps", "-1", "--num_epochs", "2", "--save_every_n_epochs", "2"]
    for run, extra in (("plain", []), ("curve", ["--eval_every_n_epochs", "1"])):
        args = train_args(tiny_imagenet_dir, run, *every_2, *extra, data="tiny-imagenet", model_type="dblock")
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
    curve = logged_rows("curve", "eval/acc")
    assert [int(r["epoch"]) for r in curve] == list(range(6)) and all(r["eval/f1"] == r["eval/acc"] for r in curve)
    val = {run: [(r["epoch"], r["val/acc"]) for r in logged_rows(run, "val/acc")] for run in ("plain", "curve")}
    assert [int(e) for e, _ in val["plain"]] == [1, 3, 5] and val["curve"] == val["plain"]
    assert all(curve[int(e)]["eval/acc"] == acc for e, acc in val["curve"])  # one scoring, two names
    plain, with_curve = read_metrics("logs/plain/metrics.json"), read_metrics("logs/curve/metrics.json")
    assert Path(with_curve["ckpt_path"]).name == Path(plain["ckpt_path"]).name != "last.ckpt"
    assert with_curve["test/acc"] == plain["test/acc"]
    # dblock's sampler draws noise while scoring; training must not see it: identical final weights.
    a, b = (torch.load(f"logs/{run}/last.ckpt", weights_only=True)["state_dict"] for run in ("plain", "curve"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_every_n_epochs_on_cifar_keeps_testing_the_final_weights(cifar_dir, capsys):
    # Scoring mid-training brings offloaded weights back; the training steps after it must still work.
    args = train_args(cifar_dir, "c", *EPOCHS, "--eval_every_n_epochs", "1", "--offload_weights", model_type="dblock")
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert [int(r["epoch"]) for r in logged_rows("c", "eval/acc")] == list(range(6)) and not logged_rows("c", "val/acc")
    metrics = read_metrics("logs/c/metrics.json")
    assert Path(metrics["ckpt_path"]).name == "last.ckpt"


def test_last_checkpoint_holds_the_final_weights_between_periodic_ones(cifar_dir, capsys, monkeypatch):
    import data

    built, real = [], data.train_transform

    def recording_transform(*args):
        """data.train_transform, remembering its arguments."""
        built.append(args)
        return real(*args)

    monkeypatch.setattr(data, "train_transform", recording_transform)
    # 3 epochs of 4 steps, a periodic checkpoint every 2 epochs: Lightning alone would leave epoch 2 in last.ckpt.
    args = train_args(
        cifar_dir, "odd", "--max_steps", "-1", "--num_epochs", "3", "--save_every_n_epochs", "2", "--augment", "flip"
    )
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert built == [("cifar100", 32, False, "flip")]  # --augment reaches the data
    assert torch.load("logs/odd/last.ckpt", weights_only=True)["hyper_parameters"]["augment"] == "flip"
    assert torch.load("logs/odd/last.ckpt", weights_only=True)["global_step"] == 12
    assert not logged_rows("odd", "val/acc") and not logged_rows("odd", "eval/acc")  # no validation split, no curve
    metrics = read_metrics("logs/odd/metrics.json")
    assert Path(metrics["ckpt_path"]).name == "last.ckpt"
    code, _, err = run_cli(scoring_args("cifar100", cifar_dir, "logs/odd/last.ckpt"), capsys)
    assert code == 0, err
    assert read_metrics("logs/odd/metrics.json")["test/acc"] == metrics["test/acc"]
