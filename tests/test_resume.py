"""Exact resume: N steps straight == N/2 steps, stop, resume to N (CPU).

Bit-exact at an epoch boundary and mid-epoch: weights, optimizer state, scheduler state, random
generators, data order, augmentation and the block sequence all continue where they stopped.
"""

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli, train_args
from block_trace import BLOCK_TRACE_ENV

STEPS_PER_EPOCH = 4  # 32 synthetic training images, batch 8


def final_state(run: str) -> dict:
    return torch.load(Path("logs") / run / "last.ckpt", weights_only=True)


def trained_blocks(trace_dir: Path) -> list[tuple[int, int]]:
    records = [json.loads(line) for line in (trace_dir / "rank0.jsonl").read_text().splitlines()]
    return [(r["step"], r["block"]) for r in records]


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train_in_pieces(cifar_dir, capsys, monkeypatch, tmp_path, model_type, total, first, flags=()):
    """Run `total` steps straight, and `first` then resume to `total` (with extra `flags`); return both final
    checkpoints and block traces."""
    scale = 3 if model_type == "dblock" else 1
    traces = {}
    for name, pieces in (("straight", [total]), ("pieces", [first, total])):
        trace = tmp_path / f"trace-{name}"
        trace.mkdir()
        monkeypatch.setenv(BLOCK_TRACE_ENV, str(trace))
        for i, steps in enumerate(pieces):
            extra = ["--ckpt_path", f"logs/{name}/last.ckpt"] if i else []
            code, _, err = run_cli(train_args(cifar_dir, name, *extra, *flags, "--save_every_n_epochs", "1",
                                              model_type=model_type, steps=steps // scale), capsys)
            assert code == 0, err
        traces[name] = trained_blocks(trace) if model_type == "dblock" else None
    return final_state("straight"), final_state("pieces"), traces


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_resume_at_epoch_boundary_is_bit_exact(cifar_dir, capsys, monkeypatch, tmp_path, model_type):
    scale = 3 if model_type == "dblock" else 1
    total = 2 * STEPS_PER_EPOCH * scale
    straight, pieces, traces = train_in_pieces(cifar_dir, capsys, monkeypatch, tmp_path, model_type, total, total // 2)
    assert straight["global_step"] == pieces["global_step"] == total
    assert_same_tensors(straight["state_dict"], pieces["state_dict"], "weights")
    assert_same_tensors(straight["optimizer_states"], pieces["optimizer_states"], "optimizer")
    assert_same_tensors(straight["lr_schedulers"], pieces["lr_schedulers"], "scheduler")
    assert_same_tensors(straight["rng_states"]["torch"], pieces["rng_states"]["torch"], "rng")
    if model_type == "dblock":
        assert traces["straight"] == traces["pieces"] and len(traces["straight"]) == total


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_resume_mid_epoch_is_bit_exact(cifar_dir, capsys, monkeypatch, tmp_path, model_type):
    scale = 3 if model_type == "dblock" else 1
    total, first = 2 * STEPS_PER_EPOCH * scale, 3 * scale
    assert first % STEPS_PER_EPOCH != 0  # the stop really is mid-epoch
    straight, pieces, traces = train_in_pieces(cifar_dir, capsys, monkeypatch, tmp_path, model_type, total, first)
    assert straight["global_step"] == pieces["global_step"] == total
    assert_same_tensors(straight["state_dict"], pieces["state_dict"], "weights")
    assert_same_tensors(straight["optimizer_states"], pieces["optimizer_states"], "optimizer")
    assert_same_tensors(straight["lr_schedulers"], pieces["lr_schedulers"], "scheduler")
    if model_type == "dblock":
        assert traces["straight"] == traces["pieces"]


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_resume_with_the_moving_average_is_bit_exact(cifar_dir, capsys, monkeypatch, tmp_path, model_type):
    scale = 3 if model_type == "dblock" else 1
    total, first = 2 * STEPS_PER_EPOCH * scale, 3 * scale
    straight, pieces, _ = train_in_pieces(
        cifar_dir, capsys, monkeypatch, tmp_path, model_type, total, first, flags=("--ema_decay", "0.9")
    )
    assert_same_tensors(straight["state_dict"], pieces["state_dict"], "weights")
    assert_same_tensors(straight["optimizer_states"], pieces["optimizer_states"], "optimizer")
    assert_same_tensors(straight["ema_state"], pieces["ema_state"], "moving average")
    weights = straight["state_dict"]
    assert any(not torch.equal(v, weights[f"model.{k}"]) for k, v in straight["ema_state"].items())  # not the weights


def test_augmentation_does_not_depend_on_workers_or_resume_point(tmp_path):
    """Each training sample's augmentation comes from its own seed: same batches with 0 or 2 workers."""
    from data import ImageDataModule
    from synthetic import write_cifar

    root = write_cifar(tmp_path, "cifar10", n_train=16, n_test=4)
    batches = []
    for workers in (0, 2):
        dm = ImageDataModule("cifar10", data_dir=str(root), batch_size=4, num_workers=workers, add_rand_aug=True)
        dm.setup("fit")
        batches.append([images for images, _ in dm.train_dataloader()])
    assert len(batches[0]) == 4
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True))
