"""Shared helpers for tests that drive main.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main
from block_trace import BLOCK_TRACE_ENV

TINY_ARCH = [
    "--hidden_size", "24", "--num_hidden_layers", "6", "--num_attention_heads", "2",
    "--intermediate_size", "48", "--patch_size", "8",
]
FAST = ["--batch_size", "8", "--num_workers", "0", "--accelerator", "cpu", "--logger", "csv", "--progress_every_s", "0", "--log_every_n_steps", "1"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run main.py in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def train_args(data_dir: Path, run_name: str, *extra: str, data: str = "cifar100", model_type: str = "vit", steps: int = 2) -> list[str]:
    """A tiny, fast training command."""
    return ["train", data, "--model_type", model_type, "--data_dir", data_dir, "--run_name", run_name,
            "--max_steps", str(steps), *TINY_ARCH, *FAST, *extra]


def traced_training(args: list[str], trace_dir: Path, monkeypatch, capsys) -> list[dict]:
    """Train through the CLI with the block trace on; returns rank 0's per-step records (block, blocks_with_grad, ...)."""
    trace_dir.mkdir()
    monkeypatch.setenv(BLOCK_TRACE_ENV, str(trace_dir))
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    return [json.loads(line) for line in (trace_dir / "rank0.jsonl").read_text().splitlines()]


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Bad input: non-zero exit, one line on stderr starting with 'error:', no traceback, naming what is wrong."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """A synthetic CIFAR-100 in the real on-disk format, with the working directory set to tmp_path (logs/ land there)."""
    from synthetic import write_cifar

    monkeypatch.chdir(tmp_path)
    return write_cifar(tmp_path / "data", "cifar100", n_train=32, n_test=12)
