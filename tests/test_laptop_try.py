"""The README's laptop try (scikit-learn's digits: no GPU, no download) runs as written, at a reduced size."""

from __future__ import annotations

import shlex
from pathlib import Path

from cli_helpers import read_metrics, run_cli

REPO = Path(__file__).resolve().parents[1]
TRY_HEADING = "## Try it on a laptop"
# Appended to the README's train commands (later flags win): a few steps, no W&B, a progress line per step.
REDUCED_TRAIN = ["--max_steps", "2", "--logger", "csv", "--progress_every_s", "0"]


def try_commands() -> list[list[str]]:
    """main.py's arguments in each `uv run main.py ...` line of the README's laptop-try section."""
    section = (REPO / "README.md").read_text().split(TRY_HEADING, 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line)[3:] for line in section.splitlines() if line.startswith("uv run main.py ")]


def option(args: list[str], name: str) -> str:
    """The value given to --name in args."""
    return args[args.index(f"--{name}") + 1]


def test_readme_laptop_try_trains_and_tests_both_models_on_digits(tmp_path, monkeypatch, capsys):
    commands = try_commands()
    trained = [args for args in commands if args[0] == "train"]
    assert {option(args, "config") for args in trained} == {"configs/digits-dblock.yaml", "configs/digits-vit.yaml"}
    assert any(args[0] == "test" for args in commands)
    assert all(args[1] == "digits" for args in commands)
    monkeypatch.chdir(tmp_path)  # logs/ lands here; the commands name configs/ relative to the repository
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for args in commands:
        extra = REDUCED_TRAIN if args[0] == "train" else []
        code, _, err = run_cli([*args, *extra], capsys)
        assert code == 0, (args, err)
        run_dir = Path("logs", option(args, "run_name")) if args[0] == "train" else Path(option(args, "ckpt_path")).parent
        metrics = read_metrics(run_dir / "metrics.json")
        assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["num_test_images"] == 500, metrics
