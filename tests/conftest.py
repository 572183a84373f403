"""Test-wide environment: never touch the network, never prompt for a W&B login, one compute thread."""

import os

import pytest
import torch

OFFLINE_ENV = {
    "DIFFUSIONBLOCKS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    # Tiny models on a shared 2-core machine: one thread per process avoids oversubscription (10-50x slower steps).
    "OMP_NUM_THREADS": "1",
}


def pytest_configure(config):
    """Training runs attach the tests' block trace when BLOCK_TRACE_ENV is set (tests/block_trace.py)."""
    import block_trace

    block_trace.install()


@pytest.fixture(autouse=True, scope="session")
def one_compute_thread():
    """In-process training runs on one thread too (subprocesses get OMP_NUM_THREADS)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def offline_environment(monkeypatch):
    """Every test (and every subprocess it starts) runs offline."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("DIFFUSIONBLOCKS_RUN_NAME", raising=False)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key, raising=False)
