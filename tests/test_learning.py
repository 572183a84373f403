"""Both model types learn a visible signal: stated accuracy within a stated number of steps.

Synthetic CIFAR-10 where each class is a flat colour plus noise (chance = 10 %). Measured on this
project's CI machine class (2 CPU cores, 2026-11-28): vit 1.00 after 40 steps; dblock 0.97 after
80 x 3 steps (each block sees about 80 updates, as each vit layer does after 80 steps). dblock's
result moves with the random stream (0.68 with an earlier data order), hence the wide margin.
"""

import pytest

from cli_helpers import read_metrics, run_cli

LEARN_ARCH = ["--hidden_size", "48", "--num_hidden_layers", "3", "--num_attention_heads", "2",
              "--intermediate_size", "64", "--patch_size", "8"]
FAST = ["--batch_size", "32", "--num_workers", "0", "--accelerator", "cpu", "--logger", "none", "--lr", "3e-3"]
TARGETS = {"vit": (40, 0.90), "dblock": (80, 0.45)}


@pytest.fixture(scope="module")
def learnable_cifar10(tmp_path_factory):
    from synthetic import write_cifar

    return write_cifar(tmp_path_factory.mktemp("learn"), "cifar10", n_train=640, n_test=100, learnable=True, seed=1)


@pytest.mark.parametrize("model_type", sorted(TARGETS))
def test_model_learns_a_visible_signal(model_type, learnable_cifar10, tmp_path, monkeypatch, capsys):
    steps, target = TARGETS[model_type]
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "cifar10", "--model_type", model_type, "--data_dir", learnable_cifar10,
                            "--run_name", "learn", "--max_steps", str(steps), *LEARN_ARCH, *FAST], capsys)
    assert code == 0, err
    acc = read_metrics("logs/learn/metrics.json")["test/acc"]
    assert acc >= target, f"{model_type} reached {acc:.2f} < {target} after {steps} steps"
