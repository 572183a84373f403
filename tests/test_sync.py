"""The training step never reads a device value between logging steps: on a GPU each read stops the host until the
queued work has run. On CPU the reads are counted: every Tensor method that hands a value to Python."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

from cli_helpers import run_cli, train_args
from module import LitClassifier

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
# Reads of host-only tensors, made by design: (file name, function). They never wait for a device.
HOST_ONLY = {
    ("dblock.py", "block_for_step"),  # the block drawn from a CPU generator seeded by (seed, step)
    ("optimizer.py", "_get_value"),  # non-capturable AdamW's step counter, a CPU tensor on every device
}


class ReadCounter:
    """Counts value reads (by method and caller) while `active`, the span of one training batch."""

    def __init__(self):
        self.active = False
        self.reads: Counter = Counter()

    def wrap(self, name: str, real):
        """`real` with a count of each call made while active from code outside HOST_ONLY."""
        def counted(tensor, *args, **kwargs):
            if self.active:
                caller = sys._getframe(1).f_code
                place = (caller.co_filename.rsplit("/", 1)[-1], caller.co_name)
                if place not in HOST_ONLY:
                    self.reads[(name, *place)] += 1
            return real(tensor, *args, **kwargs)
        return counted

    def batch_hook(self, real, active: bool):
        """A LitClassifier batch hook that starts (active=True) or ends the counted span around `real`."""
        def hook(module, *args, **kwargs):
            if active:
                self.active = True
            result = real(module, *args, **kwargs)
            self.active = active
            return result
        return hook


@pytest.fixture
def read_counter(monkeypatch) -> ReadCounter:
    """Counts reads made from on_train_batch_start to the end of on_train_batch_end: forward, loss, backward,
    clipping, optimizer step and every hook Lightning calls in between."""
    counter = ReadCounter()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(LitClassifier, "on_train_batch_start",
                        counter.batch_hook(LitClassifier.on_train_batch_start, active=True))
    monkeypatch.setattr(LitClassifier, "on_train_batch_end",
                        counter.batch_hook(LitClassifier.on_train_batch_end, active=False))
    return counter


@pytest.fixture
def cuda_optimizer(monkeypatch):
    """Train's optimizer as build_optimizer makes it on CUDA (fused AdamW, which runs on CPU too)."""
    import module

    real = module.build_optimizer
    cuda = torch.device("cuda")
    monkeypatch.setattr(module, "build_optimizer", lambda model, optim, device: real(model, optim, cuda))


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_training_step_reads_no_device_value_between_logging_steps(
    cifar_dir, capsys, read_counter, cuda_optimizer, model_type
):
    # The progress line reads the loss at its own cadence (every --progress_every_s seconds): none in this run.
    quiet = ["--log_every_n_steps", "1000", "--progress_every_s", "1000"]
    args = train_args(cifar_dir, "quiet", *quiet, model_type=model_type, steps=3)
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert not read_counter.reads, dict(read_counter.reads)


def test_the_counter_sees_the_reads_of_logging_steps(cifar_dir, capsys, read_counter):
    # Control: at every-step logging, the non-finite check and the per-block curves read values and are counted.
    code, _, err = run_cli(train_args(cifar_dir, "loud", model_type="dblock", steps=2), capsys)
    assert code == 0, err
    assert read_counter.reads[("__int__", "module.py", "first")] >= 2, dict(read_counter.reads)  # one per step


def test_a_non_finite_loss_between_logging_steps_stops_the_run_before_any_save(cifar_dir, capsys, monkeypatch):
    import dblock
    from dblock import block_for_step
    from tiny import dblock_config

    real, calls = dblock.reduce_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(dblock, "reduce_loss", poisoned)
    args = train_args(cifar_dir, "late", "--log_every_n_steps", "1000", model_type="dblock", steps=3)
    code, _, err = run_cli(args, capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: non-finite loss nan at step 1"), err
    assert f"(block {block_for_step(42, 1, dblock_config().num_blocks)})" in line and "none yet" in line, line
    assert not list(cifar_dir.parent.glob("logs/late/**/*.ckpt"))


@pytest.mark.parametrize("fused", [True, False])
def test_no_update_reaches_the_weights_after_a_non_finite_loss(fused):
    from module import NonFiniteWatch

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    watch = NonFiniteWatch(weight.device)
    for step, scale in enumerate([1.0, float("nan"), 1.0]):
        loss = (weight * scale).sum()
        loss.backward()
        watch.observe(loss.detach(), step)
        watch.skip_update(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            after_first = weight.detach().clone()
    assert watch.first() == (1, pytest.approx(float("nan"), nan_ok=True))
    # Both later steps are skipped exactly: fused AdamW on the device (as under a GradScaler), the others on the host.
    assert torch.equal(weight.detach(), after_first)
    assert int(optimizer.state[weight]["step"]) == 1
