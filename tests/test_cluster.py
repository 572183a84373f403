"""Cluster behaviour: Slurm run names and pre-emption, DDP on CPU, progress lines, W&B run ids."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import FAST, TINY_ARCH, cifar_dir, read_metrics, run_cli, train_args  # noqa: F401 (fixture)
from block_trace import BLOCK_TRACE_ENV

REPO = Path(__file__).resolve().parents[1]
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def test_slurm_job_gets_a_deterministic_run_folder(cifar_dir, capsys, monkeypatch):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    args = train_args(cifar_dir, "x", model_type="dblock", steps=1)
    i = args.index("--run_name")
    del args[i : i + 2]
    assert run_cli(args, capsys)[0] == 0
    assert Path("logs/slurm-4242-dblock/last.ckpt").is_file()
    # The requeued job (same job id, same arguments) finds its folder and continues from it.
    monkeypatch.delenv("DIFFUSIONBLOCKS_RUN_NAME")
    args[args.index("--max_steps") + 1] = "2"
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "resuming from logs/slurm-4242-dblock/last.ckpt" in out
    assert torch.load("logs/slurm-4242-dblock/last.ckpt", weights_only=True)["global_step"] == 6
    assert [p.name for p in Path("logs").iterdir()] == ["slurm-4242-dblock"]


def test_wandb_run_id_follows_the_run_name(tmp_path):
    from experiment import make_logger

    a = make_logger("wandb", data="cifar100", run_name="slurm-7-dblock", run_dir=tmp_path, debug=True)
    b = make_logger("wandb", data="cifar100", run_name="slurm-7-dblock", run_dir=tmp_path, debug=True)
    assert a._wandb_init["id"] == b._wandb_init["id"] == "slurm-7-dblock"
    assert a._wandb_init["project"] == "dblocks-cifar100" and a._wandb_init["resume"] == "allow"


def test_wandb_without_credentials_falls_back_offline_with_one_warning(tmp_path, monkeypatch):
    from experiment import make_logger

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.warns(UserWarning, match="no Weights & Biases credentials") as record:
        logger = make_logger("wandb", data="cifar100", run_name="r", run_dir=tmp_path, debug=False)
    assert len(record) == 1 and logger._offline


def test_batch_job_prints_one_line_progress(cifar_dir, capsys):
    code, out, err = run_cli(train_args(cifar_dir, "p", model_type="dblock", steps=2), capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert lines, out
    assert all(f in lines[-1] for f in ("epoch", "block", "loss", "images/s", "ETA")), lines[-1]
    assert "\r" not in out  # no redrawn bar in a log file


def test_non_finite_loss_stops_with_step_block_and_last_good_checkpoint(cifar_dir, capsys, monkeypatch):
    import dblock

    real, calls = dblock.reduce_loss, []

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(dblock, "reduce_loss", poisoned)
    code, _, err = run_cli(train_args(cifar_dir, "nan", "--save_every_n_epochs", "1", model_type="dblock", steps=4), capsys)
    assert code == 2 and "Traceback" not in err
    # Training had started, so Lightning's own notices may precede it; the error itself is one last line.
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:") and err.count("error:") == 1, err
    assert "non-finite loss" in line and "at step 5 (block" in line and "logs/nan/last.ckpt" in line
    # The poisoned step never reached the weights: the last checkpoint is finite and from step 4.
    ckpt = torch.load("logs/nan/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_interrupted_save_never_leaves_a_truncated_checkpoint(cifar_dir, capsys, monkeypatch):
    from experiment import AtomicCheckpointIO, read_checkpoint

    assert run_cli(train_args(cifar_dir, "atomic", steps=1), capsys)[0] == 0
    path = Path("logs/atomic/last.ckpt")
    good = path.read_bytes()

    def dies_mid_write(checkpoint, f):
        f.write(good[: len(good) // 3])
        raise KeyboardInterrupt  # the process is killed half way through writing

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, path)
    assert path.read_bytes() == good
    assert read_checkpoint(str(path))["global_step"] == 1
    assert sorted(p.name for p in path.parent.glob("*.tmp")) == []  # nothing half-written left beside it


@pytest.mark.parametrize("offload", [["--offload_optimizer", "true"], ["--offload_weights", "true"]])
def test_offloading_gives_the_same_training(cifar_dir, capsys, monkeypatch, offload):
    import offload as offload_module

    copies = []
    real_copy = offload_module.copy_to
    monkeypatch.setattr(offload_module, "copy_to", lambda t, d: copies.append(1) or real_copy(t, d))
    states = {}
    for name, flags in (("resident", ["--offload_optimizer", "false"]), ("offloaded", offload)):
        assert run_cli(train_args(cifar_dir, name, *flags, model_type="dblock", steps=4), capsys)[0] == 0
        states[name] = torch.load(f"logs/{name}/last.ckpt", weights_only=True)
    assert copies, "the offloaded run must really move tensors"
    a, b = states["resident"], states["offloaded"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for pa, pb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def _slurm_process(tmp_path, data_dir, max_steps, fake_bin):
    env = {**os.environ, **SLURM_ENV, "PATH": f"{fake_bin}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "main.py"), "train", "cifar100", "--model_type", "dblock", "--data_dir", str(data_dir),
           "--max_steps", str(max_steps), *TINY_ARCH, *FAST]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigusr1_writes_a_checkpoint_and_the_requeued_job_resumes(cifar_dir, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n")
    (fake_bin / "scontrol").chmod(0o755)
    run = tmp_path / "logs" / "slurm-4242-dblock"
    proc = _slurm_process(tmp_path, cifar_dir, 100_000, fake_bin)
    try:
        for line in proc.stdout:  # wait until training is really under way
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not list(run.glob("hpc_ckpt_*.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        while not (tmp_path / "scontrol.args").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()  # Slurm ends the job after requeueing it
        proc.wait()
    (hpc,) = run.glob("hpc_ckpt_*.ckpt")
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    step = torch.load(hpc, weights_only=True)["global_step"]
    assert step > 0
    # The requeued job: same job id, same arguments (a higher step budget so it has work left).
    target = step // 3 + 2
    proc = _slurm_process(tmp_path, cifar_dir, target, fake_bin)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resuming from {Path('logs') / 'slurm-4242-dblock' / hpc.name}" in out
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == target * 3
    assert read_metrics(run / "metrics.json")["num_test_images"] == 12


def test_ddp_two_cpu_processes_train_the_same_block_with_their_own_noise(tmp_path, monkeypatch):
    from synthetic import write_cifar

    monkeypatch.chdir(tmp_path)
    cifar_dir = write_cifar(tmp_path / "data", "cifar100", n_train=32, n_test=13)  # 13 test images: uneven over 2 ranks
    trace = tmp_path / "trace"
    trace.mkdir()
    env = {**os.environ, BLOCK_TRACE_ENV: str(trace), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "tests" / "traced_main.py"), *train_args(cifar_dir, "ddp", "--devices", "2", model_type="dblock", steps=2)]
    proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [[json.loads(line) for line in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert [(r["step"], r["block"]) for r in ranks[0]] == [(r["step"], r["block"]) for r in ranks[1]]
    for records in ranks:
        assert all(r["blocks_with_grad"] == [r["block"]] for r in records)  # blocks not chosen get no gradient
    # Each rank draws its own sigmas (and noise, from the same per-rank generator) at every step.
    assert all(a["sigma_sum"] != b["sigma_sum"] for a, b in zip(*ranks))
    metrics = read_metrics(tmp_path / "logs" / "ddp" / "metrics.json")
    assert metrics["num_test_images"] == 13  # every test image scored exactly once across the two ranks


def test_gradients_are_cleared_before_each_forward(cifar_dir, capsys, monkeypatch):
    """The previous step's gradients are freed before the next forward (less peak memory, safe weight offload)."""
    import dblock

    real, stale = dblock.block_losses, []

    def watching(model, *args, **kwargs):
        stale.append(any(p.grad is not None for p in model.parameters()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(dblock, "block_losses", watching)
    assert run_cli(train_args(cifar_dir, "grads", "--offload_weights", "true", model_type="dblock", steps=2), capsys)[0] == 0
    assert len(stale) == 6 and not any(stale)
