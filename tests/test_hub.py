"""Sharing models on the Hugging Face Hub: `push`, `test --ckpt_path hf://...`, `LitClassifier.from_pretrained`.

huggingface_hub's real client code runs against tests/fake_hub.py, a Hub stand-in on 127.0.0.1.
"""

import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants

import main
from cli_helpers import assert_one_line_error, read_metrics, run_cli, train_args
from conftest import OFFLINE_ENV
from fake_hub import FakeHub
from synthetic import write_cifar
from test_report import parse_table

MODEL_TYPES = ("vit", "dblock")
# The dblock run: a non-default switch for the card, and an uneven block layout of 12 layers.
DBLOCK_FLAGS = ["--batch_mean_loss_weight", "false", "--num_hidden_layers", "12", "--layers_per_block", "6,4,2"]
PUSHED_FILES = {".gitattributes", "README.md", "config.json", "model.safetensors", "config.yaml", "metrics.json"}


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder with a synthetic CIFAR-100 in data/ and one tiny run per model type in logs/<model_type>/, trained
    once."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        mp.chdir(root)
        data = write_cifar(root / "data", "cifar100", n_train=32, n_test=12)
        for model_type in MODEL_TYPES:
            extra = DBLOCK_FLAGS if model_type == "dblock" else []
            assert main.main([str(a) for a in train_args(data, model_type, *extra, model_type=model_type)]) == 0
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch, trained) -> Path:
    """A fresh working folder (the current directory) with its own copy of the trained runs in logs/."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained / "logs", tmp_path / "logs")
    return tmp_path


@pytest.fixture
def fake_hub():
    hub = FakeHub().start()
    yield hub
    hub.stop()


def use_hub_environment(monkeypatch, **env: str | None) -> None:
    """Set (or, with None, unset) HF_* variables, and the huggingface_hub constants a fresh import would derive from
    them.

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE ... once, at import; a new process (the CLI) gets
    them from the environment, so here they are recomputed by executing the constants module again.
    """
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_XET_CACHE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)  # would override the paths derived from HF_HOME
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    spec = importlib.util.find_spec("huggingface_hub.constants")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name in dir(fresh):
        if name.isupper():
            monkeypatch.setattr(constants, name, getattr(fresh, name))


@pytest.fixture
def hub_env(monkeypatch, tmp_path, fake_hub) -> FakeHub:
    """The Hub client pointed at the fake Hub, online, with an empty cache of its own and a valid token."""
    use_hub_environment(
        monkeypatch, HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=fake_hub.token,
        HF_HUB_OFFLINE=None,
    )
    return fake_hub


def run_test(ckpt_path, data_dir: Path, capsys) -> tuple[int, str, str]:
    """`main.py test cifar100 --ckpt_path ...` on the synthetic data."""
    args = ["--ckpt_path", ckpt_path, "--data_dir", data_dir, "--num_workers", "0", "--accelerator", "cpu"]
    return run_cli(["test", "cifar100", *args], capsys)


def repo_files(hub: FakeHub, repo_id: str) -> dict[str, bytes]:
    """The files on the fake Hub's main branch."""
    repo = hub.repos[repo_id]
    return repo.commits[repo.branches["main"]]


def hub_logs() -> list[str]:
    """Metrics folders of Hub models under logs/."""
    return sorted(p.name for p in Path("logs").glob("hf-*"))


def logits_on_test_split(module, data_dir: Path) -> torch.Tensor:
    """The module's logits on the synthetic test split (the dblock sampler's noise seeded alike for every module)."""
    from data import ImageDataModule

    image_size = module.hparams.arch["image_size"]
    dm = ImageDataModule("cifar100", data_dir=data_dir, batch_size=12, num_workers=0, image_size=image_size)
    dm.setup("test")
    images = torch.cat([x for x, _ in dm.test_dataloader()])
    torch.manual_seed(0)
    with torch.no_grad():
        return module.eval().predict_logits(images)


# ---- push, then test from the Hub --------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pushed_model_scores_exactly_like_its_run(workdir, trained, hub_env, capsys, model_type):
    from experiment import module_from_checkpoint
    from module import LitClassifier

    data = trained / "data"
    code, _, err = run_test(f"logs/{model_type}/last.ckpt", data, capsys)
    assert code == 0, err
    local = read_metrics(f"logs/{model_type}/metrics.json")

    code, out, err = run_cli(["push", f"logs/{model_type}", "--repo_id", f"me/{model_type}"], capsys)
    assert code == 0, err
    assert f"--ckpt_path hf://me/{model_type}" in out
    dblock_files = {"blocks.json"} if model_type == "dblock" else set()  # train writes it for dblock runs
    # No .ckpt without --include_checkpoint.
    assert set(repo_files(hub_env, f"me/{model_type}")) == PUSHED_FILES | dblock_files

    code, _, err = run_test(f"hf://me/{model_type}", data, capsys)
    assert code == 0, err
    pulled = read_metrics(f"logs/hf-me--{model_type}/metrics.json")
    assert pulled == {**local, "ckpt_path": f"hf://me/{model_type}"}
    assert read_metrics(f"logs/{model_type}/metrics.json") == local  # the run folder is left alone

    # In Python: the mixin rebuilds the network from config.json alone, with the run's exact weights and predictions.
    ckpt = torch.load(f"logs/{model_type}/last.ckpt", weights_only=True)
    model = LitClassifier.from_pretrained(f"me/{model_type}")
    assert not model.training and model.hparams.model_type == model_type
    assert model.state_dict().keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["state_dict"].items())
    original = module_from_checkpoint(ckpt, "last.ckpt", None, {})
    assert torch.equal(logits_on_test_split(model, data), logits_on_test_split(original, data))


def test_revision_pins_a_commit(workdir, trained, hub_env, capsys):
    assert run_cli(["push", "logs/vit", "--repo_id", "me/model"], capsys)[0] == 0
    first = hub_env.repos["me/model"].branches["main"]
    assert run_cli(["push", "logs/dblock", "--repo_id", "me/model"], capsys)[0] == 0  # main moves on to another model

    code, _, err = run_test(f"hf://me/model@{first}", trained / "data", capsys)
    assert code == 0, err
    assert read_metrics(f"logs/hf-me--model-{first}/metrics.json")["model_type"] == "vit"
    code, _, err = run_test("hf://me/model", trained / "data", capsys)
    assert code == 0, err
    assert read_metrics("logs/hf-me--model/metrics.json")["model_type"] == "dblock"


def test_private_repository_needs_the_token(workdir, trained, hub_env, monkeypatch, capsys):
    assert run_cli(["push", "logs/vit", "--repo_id", "me/secret", "--private"], capsys)[0] == 0
    assert hub_env.repos["me/secret"].private
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_test("hf://me/secret", trained / "data", capsys)
    assert_one_line_error(code, err, "me/secret not found", "hf auth login")


# ---- the model folder ----------------------------------------------------------------------------
def test_dry_run_writes_a_complete_model_folder(workdir, trained, fake_hub, monkeypatch, capsys):
    use_hub_environment(
        monkeypatch, HF_ENDPOINT=fake_hub.url, HF_HOME=str(workdir / "hf-home"), HF_TOKEN=None, HF_HUB_OFFLINE=None
    )
    run = Path("logs/dblock")
    (run / "blocks.json").write_text('{"blocks": "per-block record"}')
    # The tiny run scores 0; the card must carry any value.
    metrics = {**read_metrics(run / "metrics.json"), "test/acc": 5 / 12}
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = run_cli(["push", run, "--repo_id", "me/db", "--dry_run", "out", "--include_checkpoint"], capsys)
    assert code == 0, err  # no token needed: nothing is uploaded
    assert fake_hub.requests == []
    out_dir = Path("out")
    assert {p.name for p in out_dir.iterdir()} == PUSHED_FILES - {".gitattributes"} | {"blocks.json", "last.ckpt"}
    assert (out_dir / "blocks.json").read_bytes() == (run / "blocks.json").read_bytes()

    # config.json: every hyper-parameter of the checkpoint, plus the dataset and its normalisation.
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    config = json.loads((out_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "dataset"} == json.loads(json.dumps(ckpt["hyper_parameters"]))
    assert config["dataset"] == {"name": "cifar100", "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}

    # The card: Hub metadata with the measured accuracy, then the facts a reader needs.
    card = ModelCard.load(out_dir / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "pytorch"
    assert card.data.datasets == ["uoft-cs/cifar100"] and "diffusionblocks" in card.data.tags
    (result,) = card.data.eval_results
    measured = (result.metric_type, result.metric_value, result.dataset_type)
    assert measured == ("accuracy", metrics["test/acc"], "uoft-cs/cifar100")
    assert "| this model | 41.67 |" in card.text
    assert "| paper: ViT + DiffusionBlocks, B = 3 | 59.30 |" in card.text
    assert "uv run main.py test cifar100 --ckpt_path hf://me/db" in card.text
    assert "Shing and Koyama and Akiba" in card.text and "2506.14202" in card.text and "ICLR" in card.text

    # The training command in the card resolves to exactly the run's config.yaml.
    (command,) = [line for line in card.text.splitlines() if line.startswith("uv run main.py train ")]
    code, printed, err = run_cli([*shlex.split(command)[3:], "--print_config"], capsys)
    assert code == 0, err
    assert "--batch_mean_loss_weight false" in command
    assert yaml.safe_load(printed) == yaml.safe_load((run / "config.yaml").read_text())


def test_uneven_block_layout_on_the_card_and_in_the_report(workdir, capsys):
    """--layers_per_block 6,4,2: the card and the report describe the layout the model has, not an even split."""
    assert run_cli(["push", "logs/dblock", "--repo_id", "me/db", "--dry_run", "out"], capsys)[0] == 0
    card = ModelCard.load("out/README.md")
    assert "| layers / hidden size / heads / MLP width | 12 / 24 / 2 / 48 |" in card.text
    assert "| blocks B (layers per block) | 3 (6,4,2) |" in card.text
    assert "its 12 transformer layers are split into 3 blocks of 6, 4, 2 layers (block 0 first)" in card.text
    assert "architecture or block layout differs from the paper's" in card.text
    for source in ("blocks.json", "config.yaml"):  # the model's block table, then (without it) the run's flags
        code, out, err = run_cli(["report", "logs/dblock"], capsys)
        assert code == 0, err
        assert parse_table(out)[0]["blocks (layers)"] == "3 (6,4,2)", source
        Path("logs/dblock/blocks.json").unlink(missing_ok=True)


def test_card_compares_with_the_paper_only_for_the_papers_model():
    from hub.card import paper_comparison
    from vit import default_arch

    dblock = {"model_type": "dblock", "arch": default_arch("cifar100").to_dict()}
    paper, row, note = paper_comparison("cifar100", dblock, [4, 4, 4])
    assert (paper, row) == (59.30, "ViT + DiffusionBlocks, B = 3") and note.startswith("Same architecture")
    paper, row, note = paper_comparison("cifar100", dblock, [6, 4, 2])  # same depth and B, another layout
    assert (paper, row) == (59.30, "ViT + DiffusionBlocks, B = 3") and "not directly comparable" in note
    vit = {"model_type": "vit", "arch": default_arch("tiny-imagenet").to_dict()}
    paper, row, note = paper_comparison("tiny-imagenet", vit, [12])
    assert (paper, row) == (35.32, "ViT, end-to-end") and note.startswith("Same architecture")
    paper, _, note = paper_comparison("cifar10", dblock, [4, 4, 4])
    assert paper is None and note == "The paper reports no dblock result on this dataset."


def test_card_and_report_read_the_one_paper_table(monkeypatch):
    import paper
    import report
    from hub.card import paper_comparison
    from vit import default_arch

    monkeypatch.setattr(paper, "PAPER_TABLE1", (paper.PaperResult("cifar100", "dblock", 2, 12.34),))
    run = report.Run(path=Path("run"), config={"data": "cifar100"}, metrics=None, blocks=None, checkpoint=None,
                     history=[], wandb_summary=None, logs_to_wandb=False)
    (row,) = report.paper_rows([run])
    assert (row["model"], row["blocks (layers)"], row["test acc %"]) == ("dblock", "2 (6,6)", "12.34")
    dblock = {"model_type": "dblock", "arch": default_arch("cifar100").to_dict()}
    paper_acc, paper_row, note = paper_comparison("cifar100", dblock, [6, 6])
    assert (paper_acc, paper_row) == (12.34, "ViT + DiffusionBlocks, B = 2") and note.startswith("Same architecture")


def test_dry_run_folder_tests_like_its_run(workdir, trained, capsys):
    from module import LitClassifier

    assert run_cli(["push", "logs/vit", "--repo_id", "me/vit", "--dry_run", "pushed"], capsys)[0] == 0
    pushed_metrics = Path("pushed/metrics.json").read_bytes()
    code, _, err = run_test("pushed", trained / "data", capsys)
    assert code == 0, err
    assert Path("pushed/metrics.json").read_bytes() == pushed_metrics  # results go to logs/pushed/, not into the folder
    tested = read_metrics("logs/pushed/metrics.json")
    assert tested["test/acc"] == read_metrics("logs/vit/metrics.json")["test/acc"] and tested["ckpt_path"] == "pushed"
    assert LitClassifier.from_pretrained("pushed").hparams.num_labels == 100


def test_push_takes_the_checkpoint_that_metrics_scored(workdir, trained, capsys):
    shutil.copy("logs/vit/last.ckpt", "logs/vit/best.ckpt")
    assert run_test("logs/vit/best.ckpt", trained / "data", capsys)[0] == 0  # metrics.json now scores best.ckpt
    args = ["push", "logs/vit", "--repo_id", "me/vit", "--dry_run", "out", "--include_checkpoint"]
    assert run_cli(args, capsys)[0] == 0
    assert (Path("out/best.ckpt").exists(), Path("out/last.ckpt").exists()) == (True, False)


def test_weights_that_do_not_fit_config_json_are_refused(workdir, trained, capsys):
    from safetensors.torch import load_file, save_file

    from module import LitClassifier

    assert run_cli(["push", "logs/vit", "--repo_id", "me/vit", "--dry_run", "out"], capsys)[0] == 0
    weights = load_file("out/model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, "out/model.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        LitClassifier.from_pretrained("out")  # strict, unlike the mixin's default
    code, _, err = run_test("out", trained / "data", capsys)
    assert_one_line_error(code, err, "does not match the architecture")


# ---- offline and the cache -----------------------------------------------------------------------
def test_offline_mode_scores_from_the_cache(workdir, trained, hub_env, monkeypatch, capsys):
    assert run_cli(["push", "logs/vit", "--repo_id", "me/vit"], capsys)[0] == 0
    assert run_test("hf://me/vit", trained / "data", capsys)[0] == 0  # fills the cache
    online = read_metrics("logs/hf-me--vit/metrics.json")
    shutil.rmtree("logs/hf-me--vit")
    use_hub_environment(monkeypatch, HF_HUB_OFFLINE="1")  # same HF_ENDPOINT, HF_HOME and HF_TOKEN as hub_env
    seen = len(hub_env.requests)
    code, _, err = run_test("hf://me/vit", trained / "data", capsys)
    assert code == 0, err
    assert len(hub_env.requests) == seen  # the Hub, although up, was not asked
    assert read_metrics("logs/hf-me--vit/metrics.json") == online


def test_offline_without_a_cached_copy_is_one_line(workdir, trained, fake_hub, monkeypatch, capsys):
    use_hub_environment(monkeypatch, HF_ENDPOINT=fake_hub.url, HF_HOME=str(workdir / "hf-home"), HF_HUB_OFFLINE="1")
    code, _, err = run_test("hf://me/vit", trained / "data", capsys)
    assert_one_line_error(code, err, "hf://me/vit is not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert fake_hub.requests == [] and hub_logs() == []


# ---- failures: one line, exit code 2, nothing written ----------------------------------------------
def test_download_failures_are_one_line(workdir, trained, hub_env, capsys):
    assert run_cli(["push", "logs/vit", "--repo_id", "me/vit"], capsys)[0] == 0
    HfApi().create_repo("me/empty")  # a repository without the model's files
    cases = [
        ("hf://me/nope", ["repository me/nope not found", "hf auth login"]),
        ("hf://me/vit@nope", ["revision 'nope' does not exist in me/vit"]),
        ("hf://me/empty", ["hf://me/empty has no config.json or model.safetensors"]),
        ("hf://datasets/me/vit", ["is not a model repository", "hf://OWNER/NAME"]),
        ("hf://me", ["is not a model repository"]),
        ("logs", ["logs has no config.json", "push --dry_run"]),
    ]
    for ckpt_path, fragments in cases:
        code, _, err = run_test(ckpt_path, trained / "data", capsys)
        assert code == 2, (ckpt_path, err)
        assert_one_line_error(code, err, *fragments)
    hub_env.stop()
    code, _, err = run_test("hf://me/vit", trained / "data", capsys)  # never downloaded, and now unreachable
    assert_one_line_error(code, err, "cannot reach the Hub", "not in the Hugging Face cache")
    assert hub_logs() == []


def test_push_without_a_token_is_one_line(workdir, hub_env, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(["push", "logs/vit", "--repo_id", "me/vit"], capsys)
    assert code == 2
    assert_one_line_error(code, err, "pushing needs a Hugging Face token", "hf auth login", "HF_TOKEN")
    assert hub_env.requests == []


def test_push_with_a_refused_token_is_one_line(workdir, hub_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, _, err = run_cli(["push", "logs/vit", "--repo_id", "me/vit"], capsys)
    assert code == 2
    assert_one_line_error(code, err, "pushing to me/vit failed: HTTP 401", "hf auth login")
    assert hub_env.repos == {}


def test_push_that_cannot_reach_the_hub_is_one_line(workdir, hub_env, monkeypatch, capsys):
    use_hub_environment(monkeypatch, HF_HUB_OFFLINE="1")
    code, _, err = run_cli(["push", "logs/vit", "--repo_id", "me/vit"], capsys)
    assert_one_line_error(code, err, "HF_HUB_OFFLINE=1 forbids uploading", "--dry_run")
    use_hub_environment(monkeypatch, HF_HUB_OFFLINE=None)
    hub_env.stop()
    code, _, err = run_cli(["push", "logs/vit", "--repo_id", "me/vit"], capsys)
    assert_one_line_error(code, err, f"cannot reach the Hub at {hub_env.url}", "HF_ENDPOINT")
    assert hub_env.repos == {}


def test_push_bad_input_is_one_line(workdir, hub_env, capsys):
    shutil.copy("logs/vit/last.ckpt", "logs/vit/other.ckpt")
    shutil.copytree("logs/dblock", "logs/unscored")
    Path("logs/unscored/metrics.json").unlink()
    Path("taken").mkdir()
    cases = [
        (["logs/vit", "--repo_id", "no-owner"], ["--repo_id must be OWNER/NAME"]),
        (["logs/vit", "--repo_id", "me/bad name"], ["--repo_id must be OWNER/NAME"]),
        (["logs/missing", "--repo_id", "me/x"], ["logs/missing does not exist"]),
        (
            ["logs/unscored", "--repo_id", "me/x"],
            ["has no metrics.json", "main.py test DATA --ckpt_path logs/unscored/last.ckpt"],
        ),
        (["logs/vit/other.ckpt", "--repo_id", "me/x"], ["does not score logs/vit/other.ckpt", "main.py test"]),
        (["logs/vit", "--repo_id", "me/x", "--dry_run", "taken"], ["--dry_run taken already exists"]),
    ]
    for args, fragments in cases:
        code, _, err = run_cli(["push", *args], capsys)
        assert code == 2, (args, err)
        assert_one_line_error(code, err, *fragments)
    assert hub_env.repos == {} and list(Path("taken").iterdir()) == []
