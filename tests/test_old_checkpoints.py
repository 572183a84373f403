"""Checkpoints written by an older version of this program (tests/old_checkpoints/make.py, commit b66bf5f) still
load and test to the same logits, image for image; new checkpoints keep their hyper-parameter and weight names."""

import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import read_metrics, run_cli

OLD = Path(__file__).resolve().parent / "old_checkpoints"
# The hyper-parameter names every checkpoint of this program has carried, in their order.
HPARAM_KEYS = [
    "model_type", "arch", "num_labels", "lr", "weight_decay", "scheduler_type", "num_warmup_steps",
    "scheduler_specific_kwargs", "seed", "gradient_checkpointing", "num_blocks", "gamma", "layers_per_block",
    "partition", "train_blocks", "member_blocks", "batch_mean_loss_weight", "raw_embedding_bridge",
    "class_dropout_prob", "num_inference_steps", "cfg_scale", "offload_optimizer", "offload_weights", "compile_model",
    "augment",
]
TINY = ["--hidden_size", "12", "--num_hidden_layers", "3", "--num_attention_heads", "2", "--intermediate_size", "12",
        "--patch_size", "16"]
RUN = ["--batch_size", "8", "--num_workers", "0", "--accelerator", "cpu"]
DBLOCK = ["--layers_per_block", "2,1", "--cfg_scale", "1.5", "--class_dropout_prob", "0.2"]


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch):
    """The synthetic CIFAR-10 make.py scored (same generator seed), with the working directory set to tmp_path."""
    from synthetic import write_cifar

    monkeypatch.chdir(tmp_path)
    return write_cifar(tmp_path / "data", "cifar10", n_train=16, n_test=12, learnable=True)


@pytest.fixture
def recorded_logits(monkeypatch):
    """Every batch of logits the module predicts while testing."""
    from module import LitClassifier

    logits, real = [], LitClassifier.predict_logits

    def predict_logits(self, images, generator=None):
        out = real(self, images, generator)
        logits.append(out.detach().clone())
        return out

    monkeypatch.setattr(LitClassifier, "predict_logits", predict_logits)
    return logits


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_an_old_checkpoint_tests_to_the_same_logits(cifar10_dir, tmp_path, capsys, recorded_logits, model_type):
    ckpt = shutil.copy(OLD / f"{model_type}.ckpt", tmp_path / f"{model_type}.ckpt")
    args = ["test", "cifar10", "--ckpt_path", ckpt, "--data_dir", cifar10_dir, "--seed", "7", *RUN]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    expected = torch.load(OLD / "logits.pt", weights_only=True)[model_type]
    assert torch.equal(torch.cat(recorded_logits), expected)  # the same weights, architecture and sampler noise
    metrics = read_metrics(tmp_path / "metrics.json")
    assert metrics["num_test_images"] == 12 and metrics["model_type"] == model_type


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_new_checkpoints_keep_the_old_names(cifar10_dir, capsys, model_type):
    extra = DBLOCK if model_type == "dblock" else []
    args = ["train", "cifar10", "--model_type", model_type, "--data_dir", cifar10_dir, "--run_name", "new",
            "--max_steps", "1", "--lr", "0.01", "--logger", "none", "--progress_every_s", "0", *TINY, *RUN, *extra]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    old = torch.load(OLD / f"{model_type}.ckpt", weights_only=True)
    new = torch.load("logs/new/last.ckpt", weights_only=True)
    assert list(new["hyper_parameters"]) == list(old["hyper_parameters"]) == HPARAM_KEYS
    assert new["hyper_parameters"] == old["hyper_parameters"]  # same flags, same values
    assert list(new["state_dict"]) == list(old["state_dict"])
    assert all(new["state_dict"][k].shape == v.shape for k, v in old["state_dict"].items())
