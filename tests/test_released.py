"""Checkpoints of the released program through `main.py test`, and predictions.csv.

A released-format checkpoint (Hugging Face ViT names under `model.`, argparse flags as
hyper-parameters) is built from the golden weights; the golden tests prove the conversion computes
what the released program computes, these prove the command line takes that path and scores it like
a native checkpoint of the same weights, image by image.
"""

import csv
import pickle
from pathlib import Path

import pytest
import torch

import released
from cli_helpers import assert_one_line_error, run_cli, train_args
from module import LitClassifier
from test_golden import released_ckpt

TEST_FLAGS = ["--num_workers", "0", "--accelerator", "cpu", "--batch_size", "5"]


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch):
    from synthetic import write_cifar

    monkeypatch.chdir(tmp_path)
    return write_cifar(tmp_path / "data", "cifar10", n_train=16, n_test=12, seed=3)


def save_pair(tmp_path: Path, weights: str, model_type: str) -> tuple[Path, Path]:
    """The golden weights twice: as the released program's checkpoint and as this program's own."""
    raw = released_ckpt(weights, model_type)
    raw_path = tmp_path / "released" / "released.ckpt"
    raw_path.parent.mkdir()
    torch.save(raw, raw_path)
    ours = released.convert_checkpoint(raw, "x")
    module = LitClassifier(**ours["hyper_parameters"])
    module.load_state_dict(ours["state_dict"])
    native_path = tmp_path / "native" / "native.ckpt"
    native_path.parent.mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, native_path)
    return raw_path, native_path


def read_predictions(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def dataset_test_labels(data_dir: Path) -> list[int]:
    with open(data_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        return pickle.load(f, encoding="bytes")[b"labels"]


@pytest.mark.parametrize(
    "model_type,weights,extra",
    [
        ("dblock", "released_dblock_weights.safetensors", []),
        (
            "dblock", "released_dblock_weights.safetensors",
            ["--num_inference_steps", "5", "--raw_embedding_bridge", "false"],
        ),
        ("vit", "released_vit_weights.safetensors", []),
    ],
)
def test_released_checkpoint_scores_like_the_same_weights_in_native_format(
    cifar10_dir, tmp_path, capsys, model_type, weights, extra
):
    raw_path, native_path = save_pair(tmp_path, weights, model_type)
    results = {}
    for path in (raw_path, native_path):
        args = ["test", "cifar10", "--ckpt_path", path, "--data_dir", cifar10_dir, "--save_predictions"]
        code, _, err = run_cli([*args, *TEST_FLAGS, *extra], capsys)
        assert code == 0, err
        metrics = (path.parent / "metrics.json").read_text()
        results[path] = (metrics.replace(str(path), "CKPT"), read_predictions(path.parent / "predictions.csv"))
    assert results[raw_path] == results[native_path]
    rows = results[raw_path][1]
    # Every test image once, in dataset order, with its true label.
    assert [int(r["index"]) for r in rows] == list(range(12))
    assert [int(r["label"]) for r in rows] == dataset_test_labels(cifar10_dir)


def test_predictions_csv_agrees_with_metrics(cifar10_dir, capsys):
    assert run_cli(train_args(cifar10_dir, "p", data="cifar10", model_type="dblock"), capsys)[0] == 0
    args = ["test", "cifar10", "--ckpt_path", "logs/p/last.ckpt", "--data_dir", cifar10_dir, "--save_predictions"]
    code, _, err = run_cli([*args, *TEST_FLAGS], capsys)
    assert code == 0, err
    rows = read_predictions(Path("logs/p/predictions.csv"))
    metrics = (Path("logs/p/metrics.json")).read_text()
    acc = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert len(rows) == 12 and f'"test/acc": {acc}' in metrics


def test_released_checkpoint_with_another_architecture_is_refused(tmp_path, cifar10_dir, capsys):
    raw = released_ckpt("released_dblock_weights.safetensors", "dblock")
    for key in released.ARCH_FLAGS:  # the flags alone say 32 px: the paper's width 128, but the weights are 48 wide
        raw["hyper_parameters"].pop(key)
    torch.save(raw, tmp_path / "odd.ckpt")
    args = ["test", "cifar10", "--ckpt_path", tmp_path / "odd.ckpt", "--data_dir", cifar10_dir, *TEST_FLAGS]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "does not have the released 32px architecture", "hidden_size 48 (expected 128)")
    assert not (tmp_path / "metrics.json").exists()


def test_released_checkpoint_cannot_be_resumed(tmp_path, cifar10_dir, capsys):
    raw_path, _ = save_pair(tmp_path, "released_dblock_weights.safetensors", "dblock")
    args = train_args(cifar10_dir, "r", "--ckpt_path", raw_path, data="cifar10", model_type="dblock")
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "released program", "cannot resume")


def test_foreign_checkpoint_keeps_the_one_line_error(tmp_path, cifar10_dir, capsys):
    foreign = {"state_dict": {"encoder.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 1}}
    torch.save(foreign, tmp_path / "other.ckpt")
    args = ["test", "cifar10", "--ckpt_path", tmp_path / "other.ckpt", "--data_dir", cifar10_dir, *TEST_FLAGS]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "was not written by this program's train command")


def test_released_flags_carry_over_and_absent_ones_take_the_released_defaults():
    raw = released_ckpt("released_dblock_weights.safetensors", "dblock")  # records no seed, gamma or sampler flags
    module = LitClassifier(**released.convert_checkpoint(raw, "x")["hyper_parameters"])
    carried = ("seed", "gamma", "cfg_scale", "num_inference_steps")
    assert tuple(module.hparams[k] for k in carried) == (42, 0.05, 0.0, None)
    raw["hyper_parameters"].update(seed="7", gamma="0.1", cfg_scale=1, num_inference_steps="5")
    hparams = released.convert_checkpoint(raw, "x")["hyper_parameters"]
    assert [(hparams[k], type(hparams[k])) for k in carried] == [(7, int), (0.1, float), (1.0, float), (5, int)]
    vit = released.convert_checkpoint(released_ckpt("released_vit_weights.safetensors", "vit"), "x")["hyper_parameters"]
    assert "gamma" not in vit and "num_blocks" not in vit  # dblock's flags stay out of a vit model


def test_released_architectures_by_image_size():
    """SPEC section 2: the released program's 32 px (CIFAR) and 64 px (Tiny-ImageNet) models."""
    shapes = {size: (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.intermediate_size, a.patch_size)
              for size, a in released.RELEASED_ARCH.items()}
    assert shapes == {32: (128, 12, 4, 3072, 4), 64: (768, 12, 12, 3072, 4)}
