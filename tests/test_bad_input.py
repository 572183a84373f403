"""Every bad input we know of: non-zero exit, one clear line on stderr, no traceback, no partial output.

Tried here: unknown DATA, unknown model type, malformed JSON, unknown scheduler, scheduler without its
required kwargs, missing / corrupt / truncated / foreign / mismatched checkpoints (test and resume),
checkpoint of another class count, depth not divisible by blocks, negative gamma, zero batch size,
zero eval batch size, zero eval interval, unknown augmentation, heads not dividing the hidden size,
patch not dividing the image, missing data offline, unreadable data folder, imagefolder without its
folders, a bad run name, batch larger than the training set.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli, train_args

REPO = Path(__file__).resolve().parents[1]


def no_run_folders() -> bool:
    return not Path("logs").exists() or not any(Path("logs").iterdir())


TRAIN_CASES = {
    "unknown DATA": (["train", "mnist"], ["data", "mnist"]),
    "unknown model type": (["--model_type", "resnet"], ["model_type", "resnet"]),
    "unknown optimizer": (["--optimizer", "sgd"], ["optimizer", "sgd"]),  # the released flag takes adamw only
    "malformed JSON": (
        ["--scheduler_specific_kwargs", "{min_lr: 5e-5"], ["--scheduler_specific_kwargs", "not valid JSON"]
    ),
    "JSON not an object": (["--scheduler_specific_kwargs", "[1, 2]"], ["JSON object"]),
    "unknown scheduler": (["--scheduler_type", "cosine_annealing"], ["scheduler_type", "cosine_annealing"]),
    "scheduler missing kwargs": (["--scheduler_type", "cosine_with_min_lr"], ["cosine_with_min_lr", "min_lr"]),
    "depth not divisible by blocks": (["--model_type", "dblock", "--num_blocks", "4"], ["--num_blocks 4", "divisible"]),
    "negative gamma": (["--model_type", "dblock", "--gamma", "-0.1"], ["--gamma"]),
    "zero batch size": (["--batch_size", "0"], ["--batch_size", ">= 1"]),
    "zero eval batch size": (["--eval_batch_size", "0"], ["--eval_batch_size"]),
    "zero eval interval": (["--eval_every_n_epochs", "0"], ["--eval_every_n_epochs", ">= 1"]),
    "unknown augmentation": (["--augment", "mixup"], ["augment", "mixup"]),
    "heads do not divide hidden": (["--num_attention_heads", "5"], ["--num_attention_heads 5", "--hidden_size 24"]),
    "patch does not divide image": (["--patch_size", "5"], ["--patch_size 5"]),
    "bad run name": (["--run_name", "a/b"], ["--run_name"]),
    "batch larger than training set": (["--batch_size", "64"], ["--batch_size 64", "lower --batch_size"]),
    "missing resume checkpoint": (["--ckpt_path", "nowhere/last.ckpt"], ["nowhere/last.ckpt", "does not exist"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_train_input(case, cifar_dir, capsys):
    extra, fragments = TRAIN_CASES[case]
    args = train_args(cifar_dir, "bad")
    if extra[0] == "train":  # replace the subcommand and DATA
        args[:2] = extra
    else:
        args += extra
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, *fragments)
    assert no_run_folders()


def test_missing_data_offline_names_url_and_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(train_args(tmp_path / "empty", "x"), capsys)
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert_one_line_error(code, err, url, str(tmp_path / "empty"))
    assert no_run_folders()


def test_unreadable_data_folder(cifar_dir, monkeypatch, capsys):
    import data

    # Tests run as root, where permission bits are not enforced: simulate the denial os.access reports.
    monkeypatch.setattr(data.os, "access", lambda path, mode: Path(path) != Path(cifar_dir))
    code, _, err = run_cli(train_args(cifar_dir, "x"), capsys)
    assert_one_line_error(code, err, "not readable", str(cifar_dir))
    assert no_run_folders()


def test_imagefolder_without_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    code, _, err = run_cli(train_args(tmp_path / "imgs", "x", data="imagefolder"), capsys)
    assert_one_line_error(code, err, "train", "test")


@pytest.fixture
def trained_vit(cifar_dir, capsys):
    assert run_cli(train_args(cifar_dir, "good", steps=1), capsys)[0] == 0
    return Path("logs/good/last.ckpt")


def _test(cifar_dir, ckpt, *extra):
    return ["test", "cifar100", "--ckpt_path", ckpt, "--data_dir", cifar_dir, "--num_workers", "0",
            "--accelerator", "cpu", *extra]


def test_missing_checkpoint(cifar_dir, capsys):
    code, _, err = run_cli(_test(cifar_dir, "logs/none.ckpt"), capsys)
    assert_one_line_error(code, err, "logs/none.ckpt", "does not exist")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_damaged_checkpoint(trained_vit, cifar_dir, capsys, damage):
    bad = trained_vit.with_name(f"{damage}.ckpt")
    raw = trained_vit.read_bytes()
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all" * 100)
    else:
        torch.save({"weights": torch.zeros(3)}, bad)
    before = (trained_vit.parent / "metrics.json").read_bytes()
    code, _, err = run_cli(_test(cifar_dir, bad), capsys)
    assert_one_line_error(code, err, str(bad))
    assert (trained_vit.parent / "metrics.json").read_bytes() == before  # nothing overwritten
    # Resuming from it fails the same way, before any run folder is touched.
    code, _, err = run_cli(train_args(cifar_dir, "other", "--ckpt_path", bad), capsys)
    assert_one_line_error(code, err, str(bad))


def test_mismatched_model_type(trained_vit, cifar_dir, capsys):
    code, _, err = run_cli(_test(cifar_dir, trained_vit, "--model_type", "dblock"), capsys)
    assert_one_line_error(code, err, "holds a vit model", "--model_type dblock")


def test_checkpoint_of_another_class_count(trained_vit, tmp_path, capsys):
    from synthetic import write_cifar

    c10 = write_cifar(tmp_path / "c10", "cifar10", n_train=8, n_test=4)
    args = ["test", "cifar10", "--ckpt_path", trained_vit, "--data_dir", c10, "--num_workers", "0"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "100 classes", "cifar10 has 10")


def test_real_process_exit_code_and_single_line(tmp_path):
    """The installed entry point itself (not only main()) exits non-zero with one line and no traceback."""
    proc = subprocess.run(
        [sys.executable, REPO / "main.py", "train", "cifar100", "--batch_size", "0", "--data_dir", tmp_path],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "--batch_size")
