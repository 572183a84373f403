"""Where `main.py test --ckpt_path` finds its checkpoint: a .ckpt file, a folder written by push, or the Hub."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, parse_hf_uri
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfUriError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from errors import UserError
from experiment import LOGS_DIR, read_checkpoint
from fileio import read_mapping
from flags import ModelType
from hub import CONFIG_FILE, DATASET_KEY, HF_SCHEME, WEIGHTS_FILE, talking_to_hub


def read_model_folder(folder: Path, label: str) -> dict:
    """A model folder written by push as the checkpoint dict test uses: {"state_dict", "hyper_parameters"}."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise UserError(
                f"{label} has no {name}: pass a .ckpt file (a run folder's last.ckpt), a folder written by "
                "`main.py push --dry_run`, or hf://OWNER/NAME"
            )
    config = read_mapping(folder / CONFIG_FILE, "download or push it again")
    if config.get("model_type") not in typing.get_args(ModelType):
        raise UserError(f"{label}/{CONFIG_FILE} was not written by `main.py push` (no model_type vit or dblock)")
    try:
        state_dict = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"{label}/{WEIGHTS_FILE} is corrupt or truncated ({type(err).__name__}): download or push it again"
        ) from None
    hparams = {key: value for key, value in config.items() if key != DATASET_KEY}
    return {"state_dict": state_dict, "hyper_parameters": hparams}


def parse_model_uri(uri: str) -> tuple[str, str | None]:
    """(OWNER/NAME, revision or None) of hf://OWNER/NAME[@REVISION]; anything else is a one-line error."""
    try:
        parsed = parse_hf_uri(uri)
    except HfUriError:
        parsed = None
    if parsed is None or parsed.type != "model" or parsed.path_in_repo:
        raise UserError(
            f"--ckpt_path {uri} is not a model repository: use hf://OWNER/NAME or hf://OWNER/NAME@REVISION"
        )
    return parsed.id, parsed.revision


def unreachable(uri: str) -> UserError:
    """Why a model neither downloads nor sits in the cache: offline mode, or no connection to the Hub."""
    if constants.HF_HUB_OFFLINE:
        return UserError(
            f"{uri} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
            "downloading it: unset HF_HUB_OFFLINE"
        )
    return UserError(
        f"cannot reach the Hub at {constants.ENDPOINT} and {uri} is not in the Hugging Face cache: "
        "check the network or HF_ENDPOINT"
    )


def download_model(uri: str) -> Path:
    """Download config.json and model.safetensors of hf://OWNER/NAME[@REVISION] into the Hub cache; returns their
    folder.

    The revision is resolved to one commit first, so both files come from the same commit even if the
    branch moves; offline (HF_HUB_OFFLINE=1 or no network) the cached copy is used.
    """
    repo_id, revision = parse_model_uri(uri)
    with talking_to_hub(f"downloading {uri} failed", constants.ENDPOINT):
        try:
            resolved = HfApi().resolve_revision(repo_id, revision=revision)
            paths = [hf_hub_download(repo_id, name, revision=resolved) for name in (CONFIG_FILE, WEIGHTS_FILE)]
        except RevisionNotFoundError:
            raise UserError(
                f"{uri}: revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit of it"
            ) from None
        except RepositoryNotFoundError:
            raise UserError(
                f"{uri}: repository {repo_id} not found on {constants.ENDPOINT} (or it is private and your token "
                "cannot read it): check the name, or log in with `hf auth login` or HF_TOKEN"
            ) from None
        except (RevisionResolutionError, LocalEntryNotFoundError, OfflineModeIsEnabled):
            raise unreachable(uri) from None
        except EntryNotFoundError:
            raise UserError(
                f"{uri} has no {CONFIG_FILE} or {WEIGHTS_FILE}: it was not written by `main.py push`"
            ) from None
    return Path(paths[0]).parent  # one commit, so one snapshot folder of the cache holds both files


def logs_folder_name(uri: str) -> str:
    """`hf-OWNER--NAME[-REVISION]`: the logs/ folder that holds the metrics of a Hub model."""
    repo_id, revision = parse_model_uri(uri)
    name = "hf-" + repo_id.replace("/", "--")
    if revision:
        name += "-" + re.sub(r"[^A-Za-z0-9._-]", "_", revision)
    return name


def resolve_checkpoint(ckpt_path: str) -> tuple[dict, Path]:
    """The checkpoint `test` scores and the folder its metrics.json goes to.

    hf://OWNER/NAME[@REVISION]: downloaded through the Hub cache, metrics in logs/hf-OWNER--NAME[-REVISION]/;
    a folder written by `push --dry_run`: metrics in logs/<folder name>/ (the pushed folder stays as pushed);
    a .ckpt file: read by experiment.read_checkpoint, metrics next to it.
    """
    if ckpt_path.startswith(HF_SCHEME):
        return read_model_folder(download_model(ckpt_path), ckpt_path), LOGS_DIR / logs_folder_name(ckpt_path)
    path = Path(ckpt_path)
    if path.is_dir():
        return read_model_folder(path, ckpt_path), LOGS_DIR / path.resolve().name
    return read_checkpoint(ckpt_path), path.resolve().parent
