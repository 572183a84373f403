"""Test-wide environment: never touch the network, never prompt for a W&B login."""

import os

import pytest

OFFLINE_ENV = {
    "DIFFUSIONBLOCKS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(autouse=True)
def offline_environment(monkeypatch):
    """Every test (and every subprocess it starts) runs offline."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("DIFFUSIONBLOCKS_RUN_NAME", raising=False)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key, raising=False)
