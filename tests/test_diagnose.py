"""`main.py diagnose` on real checkpoints: it reproduces `test`, its numbers add up, a trained model's blocks behave
as the method says, every checkpoint kind works, and bad flags leave nothing behind.

The trained model is the learning test's (tests/test_learning.py: band-order images that only the layout tells
apart), trained for fewer steps: 100 x 3 steps reach about 0.8 test accuracy on this machine class.
"""

import json
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, read_metrics, run_cli, train_args
from test_learning import FAST as LEARN_FAST
from test_learning import LEARN_ARCH

LOADER = ["--num_workers", "0", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dblock and a vit trained on the band-order task, each with `test --save_predictions` run once."""
    from synthetic import write_cifar

    work = tmp_path_factory.mktemp("diagnose")
    data = write_cifar(work / "data", "cifar10", n_train=640, n_test=120, bands=True, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        import main

        for model_type, steps in (("dblock", 100), ("vit", 20)):
            assert main.main(["train", "cifar10", "--model_type", model_type, "--data_dir", str(data), "--run_name",
                              model_type, "--max_steps", str(steps), *LEARN_ARCH, *LEARN_FAST]) == 0
            assert main.main(["test", "cifar10", "--ckpt_path", f"logs/{model_type}/last.ckpt", "--data_dir", str(data),
                              "--save_predictions", "true", *LOADER]) == 0
    return work, data


def diagnose(work: Path, data: Path, ckpt: str, capsys, *extra: str) -> tuple[int, str, str]:
    return run_cli(["diagnose", "cifar10", "--ckpt_path", ckpt, "--data_dir", data, *LOADER, *extra], capsys)


def read_report(folder: Path) -> dict:
    return json.loads((folder / "diagnostics.json").read_text())


def test_final_step_reproduces_test_image_by_image(trained, capsys, monkeypatch):
    work, data = trained
    monkeypatch.chdir(work)
    code, out, err = diagnose(work, data, "logs/dblock/last.ckpt", capsys, "--num_inference_steps", "1,3,6",
                              "--num_samples", "3")
    assert code == 0, err
    report = read_report(work / "logs/dblock/diagnostics")
    tested = [int(line.split(",")[2]) for line in (work / "logs/dblock/predictions.csv").read_text().split()[1:]]
    assert report["predictions"] == tested  # the checkpoint's own 3 steps, first noise draw, seed 42
    acc = read_metrics(work / "logs/dblock/metrics.json")["test/acc"]
    by_steps = {r["num_inference_steps"]: r for r in report["sampler"]}
    assert by_steps[3]["accuracy"] == pytest.approx(acc)
    assert report["ensemble"]["rows"][0]["accuracy_mean_probs"] == pytest.approx(acc)  # one draw is `test`
    assert report["calibration"]["accuracy"] == pytest.approx(acc)
    assert "## Blocks in isolation" in out and "## Calibration" in out and "### Trajectory, 6 steps" in out
    for name in ("diagnostics.md", "blocks.png", "trajectory.png", "reliability.png", "cost.png"):
        assert (work / "logs/dblock/diagnostics" / name).stat().st_size > 1000


def test_trajectory_flips_account_for_every_accuracy_change(trained, capsys, monkeypatch):
    work, data = trained
    monkeypatch.chdir(work)
    assert diagnose(work, data, "logs/dblock/last.ckpt", capsys, "--num_inference_steps", "2,6",
                    "--output", "traj")[0] == 0
    report = read_report(work / "traj")
    n = report["num_images"]
    assert n == 120
    for run in report["sampler"]:
        rows = run["trajectory"]
        assert len(rows) == run["num_inference_steps"]
        assert rows[-1]["accuracy"] == run["accuracy"] and rows[-1]["agreement_with_final"] == 1.0
        assert rows[0]["sigma"] == 80.0 and rows[-1]["sigma"] == pytest.approx(0.002)
        for before, after in zip(rows, rows[1:]):
            assert after["accuracy"] - before["accuracy"] == pytest.approx(
                (after["wrong_to_right"] - after["right_to_wrong"]) / n)
        assert run["ms_per_image"] > 0


def test_trained_blocks_read_the_label_state_at_low_noise_and_the_image_at_high_noise(trained, capsys, monkeypatch):
    work, data = trained
    monkeypatch.chdir(work)
    assert diagnose(work, data, "logs/dblock/last.ckpt", capsys, "--output", "oracle")[0] == 0
    blocks = read_report(work / "oracle")["blocks"]
    sigmas = blocks["sigmas"]
    assert sigmas[0] == 80.0 and sigmas[-1] == pytest.approx(0.002) and len(sigmas) == 3 * 5 + 2
    acc = {(r["block"], r["sigma"]): r["accuracy"] for r in blocks["rows"]}
    assert {b for b, _ in acc} == {0, 1, 2}  # every block at every sigma
    lowest, highest = sigmas[-1], sigmas[0]
    for b in range(3):
        assert acc[(b, lowest)] >= 0.95, f"block {b} fed an almost clean label state: {acc[(b, lowest)]}"
    # At sigma 80 the label state is noise: the block that owns that range classifies from the image alone, as the
    # sampler's first step does, and no better than from a clean state.
    assert acc[(0, highest)] <= acc[(0, lowest)]
    assert abs(acc[(0, highest)] - blocks["image_only_accuracy"]) < 0.1
    errors = {r["sigma"]: r["denoising_mse"] for r in blocks["rows"] if r["block"] == 2}
    assert errors[lowest] < errors[sigmas[len(sigmas) // 2]] < errors[highest]


def test_vit_gets_calibration_and_a_note(trained, capsys, monkeypatch):
    work, data = trained
    monkeypatch.chdir(work)
    code, out, err = diagnose(work, data, "logs/vit/last.ckpt", capsys, "--num_inference_steps", "1,2")
    assert code == 0, err
    report = read_report(work / "logs/vit/diagnostics")
    assert set(report) >= {"calibration", "predictions", "notes"} and "sampler" not in report and "blocks" not in report
    assert "only calibration applies" in report["notes"][0] and "Note:" in out
    assert report["calibration"]["accuracy"] == pytest.approx(read_metrics(work / "logs/vit/metrics.json")["test/acc"])
    assert sorted(p.name for p in (work / "logs/vit/diagnostics").iterdir()) == [
        "diagnostics.json", "diagnostics.md", "reliability.png"]


def test_independent_jobs_and_their_assembly(cifar_dir, capsys):
    for name, blocks in (("j1", "1"), ("j02", "0,2")):
        args = train_args(cifar_dir, name, "--train_blocks", blocks, model_type="dblock", steps=3)
        assert run_cli(args, capsys)[0] == 0
    flags = ["--data_dir", cifar_dir, *LOADER, "--batch_size", "4"]
    code, _, err = run_cli(["diagnose", "cifar100", "--ckpt_path", "logs/j1/last.ckpt", *flags], capsys)
    assert code == 0, err
    job = read_report(Path("logs/j1/diagnostics"))
    assert "calibration" not in job and "sampler" not in job and "holds blocks [1] of 3" in job["notes"][0]
    assert {r["block"] for r in job["blocks"]["rows"]} == {1}
    Path("whole").mkdir()
    assert run_cli(["assemble", "logs/j1/last.ckpt", "logs/j02/last.ckpt", "--output", "whole/model.ckpt"],
                   capsys)[0] == 0
    code, _, err = run_cli(["diagnose", "cifar100", "--ckpt_path", "whole/model.ckpt", *flags], capsys)
    assert code == 0, err
    whole = read_report(Path("whole/diagnostics"))
    assert {r["block"] for r in whole["blocks"]["rows"]} == {0, 1, 2} and whole["notes"] == []
    assert run_cli(["test", "cifar100", "--ckpt_path", "whole/model.ckpt", *flags], capsys)[0] == 0
    assert whole["calibration"]["accuracy"] == pytest.approx(read_metrics("whole/metrics.json")["test/acc"])


def test_released_checkpoint_and_a_seeded_subset(tmp_path, monkeypatch, capsys):
    from synthetic import write_cifar
    from test_released import save_pair

    monkeypatch.chdir(tmp_path)
    data = write_cifar(tmp_path / "data", "cifar10", n_train=16, n_test=12, seed=3)
    raw, _ = save_pair(tmp_path, "released_dblock_weights.safetensors", "dblock")
    flags = ["--data_dir", data, *LOADER, "--batch_size", "5"]
    assert run_cli(["test", "cifar10", "--ckpt_path", raw, *flags], capsys)[0] == 0
    assert run_cli(["diagnose", "cifar10", "--ckpt_path", raw, *flags], capsys)[0] == 0
    full = read_report(raw.parent / "diagnostics")
    assert full["calibration"]["accuracy"] == pytest.approx(read_metrics(raw.parent / "metrics.json")["test/acc"])
    assert run_cli(["diagnose", "cifar10", "--ckpt_path", raw, *flags, "--max_images", "5", "--output", "sub"],
                   capsys)[0] == 0
    assert read_report(tmp_path / "sub")["num_images"] == 5


@pytest.mark.parametrize("flags,fragment", [
    (["--num_inference_steps", "0,3"], "--num_inference_steps"),
    (["--num_inference_steps", "two"], "comma-separated integers"),
    (["--num_samples", "0"], "--num_samples"),
    (["--max_images", "0"], "--max_images"),
    (["--output", "missing/deeper/out"], "does not exist"),
])
def test_bad_flags_are_one_line_errors_and_leave_no_folder(cifar_dir, capsys, flags, fragment):
    assert run_cli(train_args(cifar_dir, "r", model_type="dblock", steps=1), capsys)[0] == 0
    code, _, err = run_cli(["diagnose", "cifar100", "--ckpt_path", "logs/r/last.ckpt", "--data_dir", cifar_dir,
                            *LOADER, *flags], capsys)
    assert_one_line_error(code, err, fragment)
    assert code == 2
    assert not Path("logs/r/diagnostics").exists() and not Path("missing").exists()


def test_another_dataset_is_a_one_line_error(cifar_dir, capsys, tmp_path):
    from synthetic import write_cifar

    assert run_cli(train_args(cifar_dir, "r", model_type="dblock", steps=1), capsys)[0] == 0
    other = write_cifar(tmp_path / "c10", "cifar10", n_train=8, n_test=4)
    code, _, err = run_cli(["diagnose", "cifar10", "--ckpt_path", "logs/r/last.ckpt", "--data_dir", other, *LOADER],
                           capsys)
    assert_one_line_error(code, err, "classifies 100 classes")
    assert not Path("logs/r/diagnostics").exists()


def test_diagnose_every_n_epochs_logs_block_curves_and_changes_nothing_else(cifar_dir, capsys):
    import csv

    import torch

    epochs = ["--max_steps", "-1", "--num_epochs", "2", "--save_every_n_epochs", "1"]  # dblock: 6 epochs of 4 steps
    for run, extra in (("plain", []), ("diag", ["--diagnose_every_n_epochs", "2", "--diagnose_images", "5"])):
        code, _, err = run_cli(train_args(cifar_dir, run, *epochs, *extra, model_type="dblock"), capsys)
        assert code == 0, err
    with open("logs/diag/csv/version_0/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/block_acc_0")]
    assert [int(r["epoch"]) for r in rows] == [1, 3, 5]
    assert all(0.0 <= float(r[f"diag/block_acc_{b}"]) <= 1.0 for r in rows for b in range(3))
    # Same weights, optimizer state and test accuracy: the measurement never touches training's randomness.
    a, b = (torch.load(f"logs/{run}/last.ckpt", weights_only=True) for run in ("plain", "diag"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert read_metrics("logs/plain/metrics.json")["test/acc"] == read_metrics("logs/diag/metrics.json")["test/acc"]


def test_diagnose_every_n_epochs_needs_dblock(cifar_dir, capsys):
    code, _, err = run_cli(train_args(cifar_dir, "v", "--diagnose_every_n_epochs", "1"), capsys)
    assert_one_line_error(code, err, "--diagnose_every_n_epochs")
    assert not Path("logs/v").exists()


def test_a_weight_tied_model_is_diagnosed_as_a_diffusion_model(cifar_dir, capsys):
    assert run_cli(train_args(cifar_dir, "tied", "--weight_tied", "true", model_type="dblock", steps=3), capsys)[0] == 0
    code, _, err = run_cli(["diagnose", "cifar100", "--ckpt_path", "logs/tied/last.ckpt", "--data_dir", cifar_dir,
                            *LOADER], capsys)
    assert code == 0, err
    report = read_report(Path("logs/tied/diagnostics"))
    assert report["sampler"] and {r["block"] for r in report["blocks"]["rows"]} == {0, 1, 2}


def test_a_pushed_folder_is_diagnosed_like_its_run(cifar_dir, capsys):
    assert run_cli(train_args(cifar_dir, "p", model_type="dblock", steps=2), capsys)[0] == 0
    assert run_cli(["push", "logs/p", "--repo_id", "me/p", "--dry_run", "pushed"], capsys)[0] == 0
    flags = ["--data_dir", cifar_dir, *LOADER]
    assert run_cli(["diagnose", "cifar100", "--ckpt_path", "logs/p/last.ckpt", *flags, "--output", "from-run"],
                   capsys)[0] == 0
    code, _, err = run_cli(["diagnose", "cifar100", "--ckpt_path", "pushed", *flags], capsys)
    assert code == 0, err
    pushed = read_report(Path("logs/pushed/diagnostics"))  # a pushed folder stays as pushed: results go to logs/
    from_run = read_report(Path("from-run"))
    assert pushed["predictions"] == from_run["predictions"]
    assert pushed["blocks"]["rows"] == from_run["blocks"]["rows"]  # CE and D_x errors at 17 sigmas: the same weights
    assert not Path("pushed/diagnostics").exists()


def test_variants_table_reads_a_diagnosed_run(trained, capsys, monkeypatch, tmp_path):
    """tools/variants_table.py (docs/variants.md's table) on a real run folder and its default diagnose output."""
    import importlib.util
    import shutil

    work, data = trained
    monkeypatch.chdir(work)
    assert diagnose(work, data, "logs/dblock/last.ckpt", capsys, "--output", "logs/dblock/diagnostics")[0] == 0
    run = tmp_path / "pfx-label-smoothing-s7"
    shutil.copytree(work / "logs/dblock", run)
    tool = Path(__file__).parents[1] / "tools" / "variants_table.py"
    spec = importlib.util.spec_from_file_location("variants_table", tool)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    variant, seed, test, sampler, first, flips, *blocks, ece = table.row("pfx", run)
    acc = read_metrics(run / "metrics.json")["test/acc"]
    assert (variant, seed, test) == ("label-smoothing", "7", f"{100 * acc:.1f}")
    assert sampler == test  # the 3-step sampler of diagnose is `test`'s
    steps = next(r for r in read_report(run / "diagnostics")["sampler"] if r["num_inference_steps"] == 3)["trajectory"]
    assert first == f"{100 * steps[0]['accuracy']:.1f}"  # block 0 at sigma 80, the image alone
    wrong_to_right, right_to_wrong = map(int, flips.split(" / "))  # the hand-off from block 0 to block 1
    assert (wrong_to_right - right_to_wrong) / 120 == pytest.approx(steps[1]["accuracy"] - steps[0]["accuracy"])
    assert len(blocks) == 3 and all(0 <= float(b) <= 100 for b in blocks) and 0 <= float(ece) <= 1
