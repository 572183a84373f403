"""The accelerator check: a visible NVIDIA GPU that torch cannot use stops train, test and bench with one line.

Both conditions are simulated (the probes are monkeypatched), so this runs the same with and without a GPU.
Breakages caught: the check missing from a command, firing under --accelerator cpu or without a GPU,
a message that omits the driver, the build or the command that fixes it, and a driver probe that misreads.
"""

from __future__ import annotations

import stat

import pytest
import torch

import accelerator
from cli_helpers import assert_one_line_error, run_cli, train_args
from errors import UserError

DRIVER_535 = "535.104.05"  # the CUDA 12.2 series the paper's machines ran
PROC_TEXT = (
    f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {DRIVER_535}  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)


def simulate(monkeypatch, *, driver: str | None, usable: bool, cuda_build: str | None = "13.2") -> None:
    """Pretend a GPU with `driver` is visible (None: no GPU) and torch, built for `cuda_build`, can or cannot use it."""
    monkeypatch.setattr(accelerator, "nvidia_driver_version", lambda: driver)
    monkeypatch.setattr(accelerator, "torch_sees_cuda", lambda: usable)
    monkeypatch.setattr(accelerator, "torch_cuda_build", lambda: cuda_build)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def command(name: str, data_dir, accelerator_flag: str) -> list[str]:
    """A tiny train, test, diagnose or bench command line with the given --accelerator."""
    if name == "train":
        args = train_args(data_dir, "acc", model_type="dblock")
        args[args.index("--accelerator") + 1] = accelerator_flag
        return args
    if name in ("test", "diagnose"):
        return [name, "cifar100", "--data_dir", data_dir, "--ckpt_path", "missing.ckpt",
                "--accelerator", accelerator_flag]
    return ["bench", "cifar100", "--batch_size", "2", "--steps", "1", "--accelerator", accelerator_flag]


@pytest.mark.parametrize("name", ["train", "test", "diagnose", "bench"])
def test_an_unusable_gpu_stops_the_command_in_one_line(cifar_dir, capsys, monkeypatch, name):
    simulate(monkeypatch, driver=DRIVER_535, usable=False)
    code, out, err = run_cli(command(name, cifar_dir, "auto"), capsys)
    assert code == 2
    fix = f"`{accelerator.DEFAULT_INSTALL}`"
    assert_one_line_error(code, err, DRIVER_535, torch.__version__, "CUDA 13.2", fix, "--accelerator cpu")
    assert not (cifar_dir.parent / "logs").exists(), "nothing may be written before the check"


def test_accelerator_cpu_skips_the_check(cifar_dir, capsys, monkeypatch):
    simulate(monkeypatch, driver=DRIVER_535, usable=False)
    accelerator.check_accelerator("cpu")
    # The command goes on to its next check: the missing checkpoint, not the driver.
    code, _, err = run_cli(command("test", cifar_dir, "cpu"), capsys)
    assert code == 2 and "missing.ckpt" in err and DRIVER_535 not in err, err


@pytest.mark.parametrize(
    "driver, usable, hidden",
    [(None, False, False), (DRIVER_535, True, False), (DRIVER_535, False, True)],
    ids=["no-gpu", "usable-gpu", "gpus-hidden"],
)
def test_nothing_to_report_passes_silently(monkeypatch, capsys, driver, usable, hidden):
    simulate(monkeypatch, driver=driver, usable=usable)
    if hidden:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for flag in ("auto", "gpu"):
        accelerator.check_accelerator(flag)
    assert capsys.readouterr() == ("", "")


def test_gpu_flag_is_checked_too(monkeypatch):
    simulate(monkeypatch, driver=DRIVER_535, usable=False)
    with pytest.raises(UserError, match=DRIVER_535):
        accelerator.check_accelerator("gpu")


@pytest.mark.parametrize(
    "driver, cuda_build, fix",
    [
        (DRIVER_535, "13.2", f"needs a driver >= 580: run `{accelerator.DEFAULT_INSTALL}`"),
        ("470.256.02", "12.8", "update the NVIDIA driver to >= 525"),
        (DRIVER_535, None, f"CPU-only: run `{accelerator.DEFAULT_INSTALL}`"),
        ("580.65.06", None, f"`{accelerator.CUDA13_INSTALL}`"),
        (DRIVER_535, "12.8", "CUDA_VISIBLE_DEVICES"),
    ],
    ids=["cuda13-build-old-driver", "driver-too-old", "cpu-build", "cpu-build-new-driver", "driver-suits-build"],
)
def test_the_fix_fits_driver_and_build(driver, cuda_build, fix):
    assert fix in accelerator.suggested_fix(driver, cuda_build)


def test_driver_version_is_read_from_proc(tmp_path, monkeypatch):
    proc = tmp_path / "version"
    proc.write_text(PROC_TEXT)
    monkeypatch.setattr(accelerator, "DRIVER_VERSION_FILE", proc)
    assert accelerator.nvidia_driver_version() == DRIVER_535
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs@U16)\n"
    proc.write_text(open_module)
    assert accelerator.nvidia_driver_version() == "580.65.06"


def test_driver_version_falls_back_to_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator, "DRIVER_VERSION_FILE", tmp_path / "absent")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 580.65.06\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(accelerator, "NVIDIA_SMI", str(smi))
    assert accelerator.nvidia_driver_version() == "580.65.06"
    monkeypatch.setattr(accelerator, "NVIDIA_SMI", str(tmp_path / "not-installed"))
    assert accelerator.nvidia_driver_version() is None
