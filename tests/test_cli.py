"""End-to-end command line: train then test, resume, configs, schedulers, and the run folder."""

import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

import main
from cli_helpers import FAST, TINY_ARCH, cifar_dir, read_metrics, run_cli, train_args  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def scoring_record(monkeypatch):
    """Record what every test run scores: the weights at fit start and at test start, and the logits.

    The logits are the module's own, its sampler noise drawn from the generator the module seeds itself
    (nothing here reseeds anything), so test-after-fit and a separate test must agree on their own.
    """
    from module import LitClassifier

    record = {"fit_start": [], "test_start": [], "logits": []}
    real_test_start, real_predict = LitClassifier.on_test_epoch_start, LitClassifier.predict_logits

    def snapshot(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_test_epoch_start(self):
        real_test_start(self)
        record["test_start"].append(snapshot(self))
        record["logits"].append([])

    def predict_logits(self, images, generator=None):
        logits = real_predict(self, images, generator)
        record["logits"][-1].append(logits.detach().clone())
        return logits

    monkeypatch.setattr(LitClassifier, "on_fit_start", lambda self: record["fit_start"].append(snapshot(self)))
    monkeypatch.setattr(LitClassifier, "on_test_epoch_start", on_test_epoch_start)
    monkeypatch.setattr(LitClassifier, "predict_logits", predict_logits)
    return record


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:5]}"


@pytest.mark.parametrize("model_type", ["vit", "dblock"])
def test_train_then_test(cifar_dir, capsys, model_type, scoring_record):
    code, out, err = run_cli(train_args(cifar_dir, "run", model_type=model_type), capsys)
    assert code == 0, err
    run = Path("logs/run")
    assert {"last.ckpt", "config.yaml", "metrics.json"} <= {p.name for p in run.iterdir()}
    trained = read_metrics(run / "metrics.json")
    assert trained["model_type"] == model_type and trained["num_test_images"] == 12
    assert trained["test/f1"] == trained["test/acc"]
    assert Path(trained["ckpt_path"]) == (run / "last.ckpt").resolve()  # no validation split: the final weights
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * (3 if model_type == "dblock" else 1)  # dblock steps are x num_blocks
    assert ckpt["hyper_parameters"]["model_type"] == model_type
    # The test after training scored the final weights: those of last.ckpt, not the initial ones.
    (initial,), (after_fit,) = scoring_record["fit_start"], scoring_record["test_start"]
    assert_same_weights(after_fit, ckpt["state_dict"], "test after fit vs last.ckpt")
    changed = [k for k in initial if not torch.equal(initial[k], after_fit[k])]
    assert len(changed) > len(initial) // 2, f"training changed only {changed}"
    logged = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "test/acc", "test/f1"} <= set(logged)
    if model_type == "dblock":  # per-block curves of whichever blocks were drawn
        assert "train/ce_loss" in logged and any(k.startswith("train/loss_") for k in logged)
    code, out, err = run_cli(["test", "cifar100", "--ckpt_path", run / "last.ckpt", "--data_dir", cifar_dir, "--batch_size", "8",
                              "--num_workers", "0", "--accelerator", "cpu", "--model_type", model_type], capsys)
    assert code == 0, err
    tested = read_metrics(run / "metrics.json")
    assert tested["num_test_images"] == 12 and tested["ckpt_path"].endswith("last.ckpt")
    assert "test/acc" in out
    # The same weights, and for dblock the same sampler noise (both seeded with --seed 42).
    # The separate test of last.ckpt scores the same weights and gives the same logits, image for image.
    assert_same_weights(scoring_record["test_start"][1], ckpt["state_dict"], "test of last.ckpt vs last.ckpt")
    after_fit_logits, tested_logits = (torch.cat(batches) for batches in scoring_record["logits"])
    assert after_fit_logits.shape == (12, 100) and after_fit_logits.abs().sum() > 0
    assert torch.equal(after_fit_logits, tested_logits)
    assert tested["test/acc"] == trained["test/acc"]


def test_dblock_checkpoint_tests_with_any_number_of_steps(cifar_dir, capsys):
    assert run_cli(train_args(cifar_dir, "db", model_type="dblock", steps=1), capsys)[0] == 0
    for steps in ("1", "5"):
        code, _, err = run_cli(["test", "cifar100", "--ckpt_path", "logs/db/last.ckpt", "--data_dir", cifar_dir,
                                "--num_workers", "0", "--accelerator", "cpu", "--num_inference_steps", steps], capsys)
        assert code == 0, err
        assert read_metrics("logs/db/metrics.json")["num_inference_steps"] == int(steps)


def test_resume_continues_in_the_same_run_folder(cifar_dir, capsys):
    assert run_cli(train_args(cifar_dir, "res", steps=2), capsys)[0] == 0
    code, _, err = run_cli(train_args(cifar_dir, "ignored", "--ckpt_path", "logs/res/last.ckpt", steps=4), capsys)
    assert code == 0, err
    assert not Path("logs/ignored").exists()
    assert sorted(p.name for p in Path("logs/res/csv").iterdir()) == ["version_0", "version_1"]  # history kept
    assert torch.load("logs/res/last.ckpt", weights_only=True)["global_step"] == 4


def test_print_config_round_trip(cifar_dir, capsys, tmp_path):
    args = train_args(cifar_dir, "cfg", "--lr", "0.0005", "--scheduler_type", "cosine_with_min_lr",
                      "--scheduler_specific_kwargs", '{"min_lr": 5e-5}', model_type="dblock")
    code, printed, err = run_cli([*args, "--print_config"], capsys)
    assert code == 0, err
    cfg = yaml.safe_load(printed)
    assert cfg["lr"] == 0.0005 and cfg["model_type"] == "dblock" and cfg["data"] == "cifar100"
    (tmp_path / "cfg.yaml").write_text(printed)
    code, again, err = run_cli(["train", "--config", tmp_path / "cfg.yaml", "--print_config"], capsys)
    assert code == 0, err
    assert yaml.safe_load(again) == cfg


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_recipe_configs_load(recipe, capsys):
    code, printed, err = run_cli(["train", "cifar100", "--config", REPO / "configs" / recipe, "--print_config"], capsys)
    assert code == 0, err
    cfg = yaml.safe_load(printed)
    assert cfg["model_type"] in ("vit", "dblock")
    if "rand-augment" in recipe:
        assert cfg["add_rand_aug"] and cfg["postfix"] == "-rand-augment"
        assert cfg["num_warmup_steps"] == 3900 * (cfg["num_blocks"] if cfg["model_type"] == "dblock" else 1)


def test_saved_config_reloads_as_a_config_file(cifar_dir, capsys):
    assert run_cli(train_args(cifar_dir, "saved"), capsys)[0] == 0
    saved = yaml.safe_load(Path("logs/saved/config.yaml").read_text())
    assert saved["run_name"] == "saved" and saved["max_steps"] == 2
    code, printed, err = run_cli(["train", "--config", "logs/saved/config.yaml", "--print_config"], capsys)
    assert code == 0, err
    assert yaml.safe_load(printed) == saved


def test_imagefolder_end_to_end(tmp_path, monkeypatch, capsys):
    from synthetic import write_imagefolder

    monkeypatch.chdir(tmp_path)
    root = write_imagefolder(tmp_path / "folder", n_per_class=4, classes=("cat", "dog", "eel"), size=16, split="val")
    code, _, err = run_cli(["train", "imagefolder", "--data_dir", root, "--run_name", "if", "--max_steps", "1",
                            "--image_size", "16", *TINY_ARCH, *FAST], capsys)
    assert code == 0, err
    m = read_metrics("logs/if/metrics.json")
    assert m["num_test_images"] == 12
    assert torch.load("logs/if/last.ckpt", weights_only=True)["hyper_parameters"]["num_labels"] == 3


def test_default_run_name_is_timestamp_model_postfix(cifar_dir, capsys):
    args = [a for a in train_args(cifar_dir, "x", "--postfix", "-pf", steps=1)]
    i = args.index("--run_name")
    del args[i : i + 2]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    (run,) = Path("logs").iterdir()
    assert run.name.endswith("-vit-pf") and run.name[:8].isdigit()


def help_entries(page: str) -> dict[str, str]:
    """`--flag` -> its explanation on an argparse --help page (metavar dropped, wrapped lines joined)."""
    entries, current = {}, None
    for line in page.splitlines():
        start = re.match(r"^  (--\w+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if start:
            current = start.group(1)
            entries[current] = start.group(2) or ""
        elif current and line.startswith(" " * 10):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", sorted(main.COMMANDS))
def test_help_explains_every_flag(command, capsys, monkeypatch):
    """Every flag's --help line carries its docstring explanation, not only its type and default."""
    monkeypatch.setenv("COLUMNS", "100")
    code, page, err = run_cli([command, "--help"], capsys)
    assert code == 0, err
    entries = help_entries(page)
    function = main.COMMANDS[command]
    flags = [name for name, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert flags
    for name in flags:
        assert f"--{name}" in entries, f"--{name} missing from `main.py {command} --help`"
        explanation = entries[f"--{name}"].split("(type:")[0].strip()
        assert len(explanation) >= 10, f"--{name} is not explained: document it under Args: in {function.__name__}'s docstring"


def flag_reference_sections() -> dict[str, str]:
    """docs/flags.md split at its "## `COMMAND` flags" headings: command name -> that section's text."""
    page = (REPO / "docs" / "flags.md").read_text()
    parts = re.split(r"^## `(\w+)` flags$", page, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_flag_reference_documents_every_flag_under_its_command():
    sections = flag_reference_sections()
    assert sorted(sections) == sorted(main.COMMANDS)
    for command_name, command in main.COMMANDS.items():
        for name in command.__code__.co_varnames[1 : command.__code__.co_kwonlyargcount + 1]:
            assert f"`--{name}`" in sections[command_name], f"--{name} of {command_name} missing from docs/flags.md"


def test_readme_links_only_to_pages_that_exist():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs|tests)/[^)#]+)", readme)
    assert "docs/flags.md" in targets
    for target in targets:
        assert (REPO / target).is_file(), target


def test_per_block_curves_hold_only_steps_that_trained_the_block(cifar_dir, capsys):
    import csv

    assert run_cli(train_args(cifar_dir, "curves", model_type="dblock", steps=2), capsys)[0] == 0
    rows = list(csv.DictReader(open("logs/curves/csv/version_0/metrics.csv")))
    drawn = {int(r["step"]): int(float(r["train/block"])) for r in rows if r.get("train/block")}
    assert sorted(drawn) == list(range(6))
    logged = {(int(r["step"]), k) for r in rows for k in r if k.startswith(("train/loss_", "train/ce_loss_")) and r[k]}
    expected = {(step, f"train/{key}_{block}") for step, block in drawn.items() for key in ("loss", "ce_loss")}
    assert logged == expected, f"logged at steps that trained another block: {sorted(logged - expected)[:6]}"
