"""Stop before any work when an NVIDIA GPU is visible but the installed torch build cannot use it.

Without this check, a CUDA 13 build of torch on a machine with an older driver (CUDA 12 clusters run the
535 series) warns once, reports no GPU, and `--accelerator auto` trains on the CPU, hundreds of times slower.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from errors import UserError

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")  # present whenever the NVIDIA kernel driver is loaded
NVIDIA_SMI = "nvidia-smi"
NVIDIA_SMI_TIMEOUT_S = 10
# Oldest driver series each CUDA major version runs on (CUDA minor-version compatibility).
MIN_DRIVER = {"12": 525, "13": 580}
DEFAULT_INSTALL = "uv sync --locked"  # the cu12 dependency group: torch's newest CUDA 12 build
CUDA13_INSTALL = "uv sync --locked --no-group cu12 --group cu13"  # the newest torch, a CUDA 13 build


def parse_driver_version(text: str) -> str | None:
    """The driver version (e.g. 535.104.05) in /proc/driver/nvidia/version or nvidia-smi output, else None."""
    match = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else None


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA driver's version, read from /proc (Linux) or asked of nvidia-smi; None when there is no GPU."""
    if DRIVER_VERSION_FILE.exists():
        return parse_driver_version(DRIVER_VERSION_FILE.read_text(errors="replace"))
    smi = shutil.which(NVIDIA_SMI)
    if smi is None:
        return None
    try:
        query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"]
        answer = subprocess.run(query, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_driver_version(answer.stdout)


def torch_sees_cuda() -> bool:
    """Whether torch can use a CUDA device."""
    import torch

    return torch.cuda.is_available()


def torch_cuda_build() -> str | None:
    """The CUDA version the installed torch was built for (e.g. 12.8); None for a CPU-only build."""
    import torch

    return torch.version.cuda


def gpus_hidden() -> bool:
    """True when CUDA_VISIBLE_DEVICES hides every GPU on purpose (empty, or -1)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")


def suggested_fix(driver: str, cuda_build: str | None) -> str:
    """What to do about a torch build (its CUDA version, None for a CPU-only build) that cannot use this driver."""
    series = int(driver.split(".")[0])
    oldest = MIN_DRIVER["12"]
    if series < oldest:
        return f"update the NVIDIA driver to >= {oldest}"
    if cuda_build is None:
        newest = f" (or `{CUDA13_INSTALL}` for the newest, CUDA 13)" if series >= MIN_DRIVER["13"] else ""
        return f"this torch build is CPU-only: run `{DEFAULT_INSTALL}` to install the CUDA 12 build{newest}"
    needed = MIN_DRIVER.get(cuda_build.split(".")[0])
    if needed is not None and series < needed:
        return f"the CUDA {cuda_build} build needs a driver >= {needed}: run `{DEFAULT_INSTALL}` for the CUDA 12 build"
    return "the driver suits this build: check that `nvidia-smi` lists the GPU and that CUDA_VISIBLE_DEVICES names it"


def check_accelerator(accelerator: str) -> None:
    """Fail in one line when a GPU is visible but torch cannot use it, unless `--accelerator cpu` asks for the CPU."""
    if accelerator == "cpu" or gpus_hidden():
        return
    driver = nvidia_driver_version()
    if driver is None or torch_sees_cuda():
        return
    import torch

    cuda_build = torch_cuda_build()
    build = f"CUDA {cuda_build} build" if cuda_build else "CPU-only build"
    raise UserError(
        f"NVIDIA driver {driver} is loaded but torch {torch.__version__} ({build}) cannot use the GPU: "
        f"{suggested_fix(driver, cuda_build)}; or pass --accelerator cpu to run on the CPU"
    )
