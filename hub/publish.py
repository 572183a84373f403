"""`main.py push RUN --repo_id OWNER/NAME`: a run folder as a Hub model folder, uploaded (--dry_run: written only)."""

from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from data import normalization
from errors import UserError
from experiment import module_from_checkpoint, read_checkpoint
from fileio import read_mapping, write_folder_atomic
from hub import CONFIG_FILE, DATASET_KEY, HF_SCHEME, WEIGHTS_FILE, talking_to_hub
from hub.card import model_card, train_command


# ---- which run, which checkpoint -----------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """What push reads from a run folder written by train."""

    folder: Path
    ckpt: Path
    metrics: dict  # metrics.json: the test score of `ckpt`
    config: dict  # config.yaml: the train flags


def scored_checkpoint(path: Path, folder: Path, metrics_file: Path) -> tuple[Path, dict]:
    """The checkpoint to push and the metrics.json that scores it.

    A run folder pushes the checkpoint its metrics.json scored (train scores last.ckpt); a .ckpt file
    must be the one its folder's metrics.json scored, so the card reports the accuracy of these weights.
    """
    if not metrics_file.is_file():
        ckpt = path if path.is_file() else folder / "last.ckpt"
        raise UserError(
            f"{folder} has no metrics.json: score the checkpoint first with `main.py test DATA --ckpt_path {ckpt}`"
        )
    metrics = read_mapping(metrics_file, "restore it or test the checkpoint again")
    scored = metrics.get("ckpt_path") if "test/acc" in metrics else None
    scored_ckpt = folder / Path(scored).name if scored else None  # test writes metrics.json beside what it scored
    ckpt = path if path.is_file() else scored_ckpt or folder / "last.ckpt"
    if ckpt != scored_ckpt:
        raise UserError(
            f"{metrics_file} does not score {ckpt} (it scores {scored}): run `main.py test DATA --ckpt_path {ckpt}` "
            "first, so the model card reports the accuracy of these weights"
        )
    if not ckpt.is_file():
        raise UserError(
            f"{metrics_file} scores {ckpt}, which is no longer there: "
            "test the checkpoint you want to push, then push again"
        )
    return ckpt, metrics


def find_run(run: str) -> Run:
    """The checkpoint to push and its run's metrics.json and config.yaml."""
    path = Path(run)
    if not path.exists():
        raise UserError(
            f"{run} does not exist: pass a run folder written by train (logs/<run>) or a .ckpt file in one"
        )
    folder = path if path.is_dir() else path.parent
    ckpt, metrics = scored_checkpoint(path, folder, folder / "metrics.json")
    config_file = folder / "config.yaml"
    config = read_mapping(config_file, "push a run folder written by train")
    if "data" not in config:
        raise UserError(f"{config_file} has no `data` key: push a run folder written by train")
    return Run(folder=folder, ckpt=ckpt, metrics=metrics, config=config)


def check_repo_id(repo_id: str) -> None:
    """--repo_id must name a repository as OWNER/NAME (the card's commands need the full name)."""
    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise UserError(
            "--repo_id must be OWNER/NAME (letters, digits, '-', '_', '.'), e.g. --repo_id my-name/dblock-cifar100"
        )


def require_token() -> str:
    """The Hub token (HF_TOKEN or the one `hf auth login` cached): uploading needs write access."""
    token = get_token()
    if not token:
        raise UserError(
            "pushing needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN "
            "(or write the folder only, with --dry_run FOLDER)"
        )
    return token


# ---- the model folder --------------------------------------------------------------------------
def dataset_entry(data: str) -> dict:
    """config.json's "dataset": the dataset and the normalisation the test transform applies (for from_pretrained)."""
    normalize = normalization(data)
    return {"name": data, "mean": list(normalize.mean), "std": list(normalize.std)}


def build_model_folder(folder: Path, run: Run, *, repo_id: str, include_checkpoint: bool, train_defaults: dict) -> None:
    """Write the model folder: model.safetensors and config.json (the mixin), config.yaml, metrics.json, blocks.json,
    the card."""
    path = str(run.ckpt)
    ckpt = read_checkpoint(path)
    module = module_from_checkpoint(ckpt, path, None, {})
    hparams = dict(ckpt["hyper_parameters"])  # every hyper-parameter, so fields added later travel too
    data = str(run.config["data"])
    copies = [run.folder / "config.yaml", run.folder / "metrics.json", run.folder / "blocks.json"]
    copies = [p for p in copies if p.is_file()] + ([run.ckpt] if include_checkpoint else [])
    card = model_card(
        repo_id=repo_id, data=data, metrics=run.metrics, hparams=hparams, module=module,
        command=train_command(run.config, train_defaults), files=[WEIGHTS_FILE, CONFIG_FILE, *(p.name for p in copies)],
    )
    card.save(folder / "README.md")  # written first: save_pretrained keeps an existing README.md
    with module.scored_weights():  # the moving average, where the run kept one (and scored it)
        module.save_pretrained(folder, config={**hparams, DATASET_KEY: dataset_entry(data)})
    for source in copies:
        shutil.copy2(source, folder / source.name)


# ---- upload ------------------------------------------------------------------------------------
def upload(folder: Path, *, repo_id: str, private: bool, token: str) -> str:
    """Create the repository if needed and commit the folder to it; returns the commit's URL."""
    api = HfApi(token=token)
    with talking_to_hub(f"pushing to {repo_id} failed", api.endpoint, upload_hint):
        try:
            api.create_repo(repo_id, private=private or None, exist_ok=True)
            message = "Upload model with `main.py push`"
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
        except OfflineModeIsEnabled:
            raise UserError(
                "HF_HUB_OFFLINE=1 forbids uploading: unset it to push, or write the folder only with --dry_run FOLDER"
            ) from None
    return commit.commit_url


def upload_hint(err: HfHubHTTPError) -> str:
    """What to do about a refused upload."""
    status = err.response.status_code if err.response is not None else None
    if status == 401:
        return ": the token was refused; run `hf auth login` again or set HF_TOKEN to a valid token"
    if status == 403:
        return ": the token cannot write there; use a token with write access, or push under your own name"
    return ""


def push(
    run: str, *, repo_id: str, private: bool, dry_run: str | None, include_checkpoint: bool, train_defaults: dict
) -> str:
    """`main.py push`: build the model folder of a run and upload it (or, with dry_run, only write it)."""
    check_repo_id(repo_id)
    source = find_run(run)
    build = functools.partial(
        build_model_folder, run=source, repo_id=repo_id, include_checkpoint=include_checkpoint,
        train_defaults=train_defaults,
    )
    data = source.config["data"]
    if dry_run is not None:
        target = Path(dry_run)
        if target.exists():
            raise UserError(f"--dry_run {dry_run} already exists: choose a new folder (push never overwrites one)")
        write_folder_atomic(target, build)
        print(f"wrote {target} (nothing uploaded): test it with `main.py test {data} --ckpt_path {target}`")
        return str(target)
    token = require_token()
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        build(Path(tmp))
        url = upload(Path(tmp), repo_id=repo_id, private=private, token=token)
    print(f"pushed {source.ckpt} to {url}: test it with `main.py test {data} --ckpt_path {HF_SCHEME}{repo_id}`")
    return url
