"""Share trained models on the Hugging Face Hub and score them from it.

`main.py push RUN --repo_id OWNER/NAME` turns a run folder into a Hub model folder and uploads it;
`main.py test DATA --ckpt_path hf://OWNER/NAME[@REVISION]` scores it again. Every Hub chore goes through
huggingface_hub itself: LitClassifier's PyTorchModelHubMixin writes model.safetensors and config.json (and
rebuilds the model with `LitClassifier.from_pretrained`), ModelCard / ModelCardData / EvalResult write the
card, HfApi.create_repo and upload_folder upload, HfApi.resolve_revision and hf_hub_download download
(through the Hub cache, with HF_TOKEN or the cached login, HF_HUB_OFFLINE and HF_ENDPOINT as usual).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx2  # the HTTP client of huggingface_hub: its transport errors mean the Hub could not be reached
import yaml
from huggingface_hub import (
    EvalResult,
    HfApi,
    ModelCard,
    constants,
    get_token,
    hf_hub_download,
    parse_hf_uri,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HfUriError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file

from data import normalization
from errors import UserError
from experiment import LOGS_DIR, module_from_checkpoint, read_checkpoint
from fileio import write_folder_atomic
from module import MODEL_TYPES, LitClassifier
from vit import default_arch

HF_SCHEME = "hf://"
CONFIG_FILE = constants.CONFIG_NAME  # config.json
WEIGHTS_FILE = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors
DATASET_KEY = "dataset"  # config.json entry that is not a LitClassifier hyper-parameter: what the model expects as input

# Top-1 accuracy (%) in the paper (SPEC section 1) and the block count it used, per (dataset, model type).
PAPER_RESULTS = {
    ("cifar100", "vit"): (60.25, None),
    ("cifar100", "dblock"): (59.30, 3),
    ("tiny-imagenet", "vit"): (35.32, None),
    ("tiny-imagenet", "dblock"): (36.16, 2),
}
# Hub dataset ids (model card metadata) and display names of the datasets `train` reads.
HUB_DATASETS = {
    "cifar10": ("uoft-cs/cifar10", "CIFAR-10"),
    "cifar100": ("uoft-cs/cifar100", "CIFAR-100"),
    "tiny-imagenet": ("zh-plus/tiny-imagenet", "Tiny-ImageNet"),
    "imagefolder": (None, "a local image folder"),
}
CARD_TAGS = ["vision-transformer", "diffusion", "block-wise-training"]
CITATION = """@inproceedings{shing2026diffusionblocks,
  title     = {DiffusionBlocks: Block-wise Neural Network Training via Diffusion Interpretation},
  author    = {Shing and Koyama and Akiba},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2506.14202},
  archivePrefix = {arXiv}
}"""
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}
Paper: [arXiv 2506.14202](https://arxiv.org/abs/2506.14202).

| | value |
|---|---|
{% for name, value in architecture %}| {{ name }} | {{ value }} |
{% endfor %}
## Results

Top-1 accuracy on the {{ dataset_name }} test split ({{ num_test_images }} images):

| model | top-1 (%) |
|---|---|
| this model | {{ accuracy }} |
{% if paper %}| paper: {{ paper_row }} | {{ paper }} |
{% endif %}
{{ comparison }}

## How it was trained

```bash
{{ command }}
```

These are the flags that differ from the defaults; `config.yaml` in this repository holds every flag of the run.

## Use it

Score it with this project's command line (the files are downloaded into the Hugging Face cache):

```bash
uv run main.py test {{ data }} --ckpt_path hf://{{ repo_id }}
```

or load it in Python, from the project's root folder:

```python
from module import LitClassifier

model = LitClassifier.from_pretrained("{{ repo_id }}")  # rebuilt from config.json, weights from model.safetensors
logits = model.predict_logits(images)  # images: (N, 3, {{ image_size }}, {{ image_size }}), normalised as in config.json's "dataset"
```

Files: {{ files }}.

## Citation

```bibtex
{{ citation }}
```
"""


# ---- push: which run, which checkpoint ---------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """What push reads from a run folder written by train."""

    folder: Path
    ckpt: Path
    metrics: dict  # metrics.json: the test score of `ckpt`
    config: dict  # config.yaml: the train flags


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line error naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON ({type(err).__name__}): restore it or test the checkpoint again") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object: restore it or test the checkpoint again")
    return value


def find_run(run: str) -> Run:
    """The checkpoint to push and its run's metrics.json and config.yaml.

    A run folder pushes the checkpoint its metrics.json scored (train scores last.ckpt); a .ckpt file
    must be the one its folder's metrics.json scored, so the card reports the accuracy of these weights.
    """
    path = Path(run)
    if not path.exists():
        raise UserError(f"{run} does not exist: pass a run folder written by train (logs/<run>) or a .ckpt file in one")
    folder = path if path.is_dir() else path.parent
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        ckpt = path if path.is_file() else folder / "last.ckpt"
        raise UserError(f"{folder} has no metrics.json: score the checkpoint first with `main.py test DATA --ckpt_path {ckpt}`")
    metrics = read_json(metrics_file)
    scored = metrics.get("ckpt_path") if "test/acc" in metrics else None
    scored_ckpt = folder / Path(scored).name if scored else None  # test writes metrics.json beside what it scored
    ckpt = path if path.is_file() else scored_ckpt or folder / "last.ckpt"
    if ckpt != scored_ckpt:
        raise UserError(
            f"{metrics_file} does not score {ckpt} (it scores {scored}): "
            f"run `main.py test DATA --ckpt_path {ckpt}` first, so the model card reports the accuracy of these weights"
        )
    if not ckpt.is_file():
        raise UserError(f"{metrics_file} scores {ckpt}, which is no longer there: test the checkpoint you want to push, then push again")
    config_file = folder / "config.yaml"
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{config_file} is missing or unreadable ({type(err).__name__}): push a run folder written by train") from None
    if not isinstance(config, dict) or "data" not in config:
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
        raise UserError("--repo_id must be OWNER/NAME (letters, digits, '-', '_', '.'), e.g. --repo_id my-name/dblock-cifar100")


def require_token() -> str:
    """The Hub token (HF_TOKEN or the one `hf auth login` cached): uploading needs write access."""
    token = get_token()
    if not token:
        raise UserError(
            "pushing needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN "
            "(or write the folder only, with --dry_run FOLDER)"
        )
    return token


# ---- push: the model folder --------------------------------------------------------------------
def dataset_entry(data: str) -> dict:
    """config.json's "dataset": the dataset and the normalisation the test transform applies (from_pretrained users need it)."""
    normalize = normalization(data)
    return {"name": data, "mean": list(normalize.mean), "std": list(normalize.std)}


def flag_text(value) -> str:
    """A config value as the command line spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def train_command(config: dict, defaults: dict) -> str:
    """`uv run main.py train DATA --flag value ...` with the flags of config.yaml that differ from train's defaults."""
    words = ["uv", "run", "main.py", "train", str(config["data"])]
    for key, value in config.items():
        if key != "data" and (key not in defaults or defaults[key] != value):
            words += [f"--{key}", flag_text(value)]
    return shlex.join(words)


def architecture_rows(hparams: dict, module: LitClassifier) -> list[tuple[str, str]]:
    """The card's table of what the network is."""
    arch = hparams["arch"]
    layers = arch["num_hidden_layers"]
    rows = [
        ("model type", f"`{hparams['model_type']}`"),
        ("layers / hidden size / heads / MLP width", f"{layers} / {arch['hidden_size']} / {arch['num_attention_heads']} / {arch['intermediate_size']}"),
        ("image size / patch size", f"{arch['image_size']} / {arch['patch_size']}"),
        ("classes", str(hparams["num_labels"])),
        ("parameters", f"{sum(p.numel() for p in module.model.parameters()):,}"),
    ]
    if hparams["model_type"] == "dblock":
        quirks = f"{hparams['batch_mean_loss_weight']} / {hparams['raw_embedding_bridge']}"
        rows += [
            ("blocks B (layers per block)", f"{hparams['num_blocks']} ({layers // hparams['num_blocks']})"),
            ("sampler steps at test time / guidance scale", f"{module.inference_steps} / {hparams['cfg_scale']}"),
            ("released quirks: batch-mean loss weight / raw embedding bridge", quirks),
        ]
    return rows


def describe(hparams: dict) -> str:
    """What the model is, in a paragraph."""
    layers = hparams["arch"]["num_hidden_layers"]
    if hparams["model_type"] == "vit":
        return (
            f"The end-to-end ViT baseline of DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026): {layers} pre-LayerNorm "
            "transformer layers with a CLS token, trained with backpropagation through all of them."
        )
    blocks = hparams["num_blocks"]
    return (
        f"A ViT image classifier trained with DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026): its {layers} transformer "
        f"layers are split into {blocks} blocks of {layers // blocks}, and each block is trained on its own, one block per "
        "step, as an EDM denoiser of the label embedding for one range of noise levels. At test time a sampler walks "
        "the noise levels from high to low, each step run by the block that owns that level, and the last step's logits "
        "give the class."
    )


def paper_comparison(data: str, hparams: dict) -> tuple[float | None, str, str]:
    """(paper's top-1 or None, the paper row's name, a sentence on how comparable they are)."""
    paper, blocks = PAPER_RESULTS.get((data, hparams["model_type"]), (None, None))
    row = "ViT, end-to-end" if hparams["model_type"] == "vit" else f"ViT + DiffusionBlocks, B = {blocks}"
    if paper is None:
        return None, row, f"The paper reports no {hparams['model_type']} result on this dataset."
    same = hparams["arch"] == default_arch(data).to_dict() and (blocks is None or hparams["num_blocks"] == blocks)
    if same:
        return paper, row, "Same architecture as the paper's; the training recipe is in config.yaml."
    return paper, row, "This model's architecture or block count differs from the paper's, so the two numbers are not directly comparable."


def model_card(*, repo_id: str, run: Run, hparams: dict, module: LitClassifier, command: str, files: list[str]) -> ModelCard:
    """The README.md of the model repository: Hub metadata with a model-index of the measured accuracy, then prose."""
    data = str(run.config["data"])
    hub_dataset, dataset_name = HUB_DATASETS.get(data, (None, data))
    accuracy = float(run.metrics["test/acc"])
    # The mixin's class-level card data (license, library name, its tags), extended with this model's.
    card_data = module.generate_model_card().data
    card_data.tags = sorted({*(card_data.tags or []), *CARD_TAGS, hparams["model_type"]})
    card_data.datasets = [hub_dataset] if hub_dataset else None
    card_data.metrics = ["accuracy"]
    card_data.pipeline_tag = "image-classification"
    card_data.model_name = repo_id.split("/")[1]
    card_data.eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=hub_dataset or data,
            dataset_name=dataset_name,
            dataset_split="test",
            metric_type="accuracy",
            metric_name="top-1 accuracy",
            metric_value=accuracy,
        )
    ]
    paper, paper_row, comparison = paper_comparison(data, hparams)
    kind = "ViT baseline" if hparams["model_type"] == "vit" else "DiffusionBlocks ViT"
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=f"{kind} on {dataset_name}",
        description=describe(hparams),
        architecture=architecture_rows(hparams, module),
        dataset_name=dataset_name,
        num_test_images=run.metrics.get("num_test_images", "all"),
        accuracy=f"{100 * accuracy:.2f}",
        paper=f"{paper:.2f}" if paper is not None else None,
        paper_row=paper_row,
        comparison=comparison,
        command=command,
        data=data,
        repo_id=repo_id,
        image_size=hparams["arch"]["image_size"],
        files=", ".join(f"`{name}`" for name in files),
        citation=CITATION,
    )


def build_model_folder(folder: Path, run: Run, *, repo_id: str, include_checkpoint: bool, train_defaults: dict) -> None:
    """Write the model folder: model.safetensors and config.json (the mixin), config.yaml, metrics.json, blocks.json, card."""
    path = str(run.ckpt)
    ckpt = read_checkpoint(path)
    module = module_from_checkpoint(ckpt, path, None, {})
    hparams = dict(ckpt["hyper_parameters"])  # every hyper-parameter, so fields added later travel too
    config = {**hparams, DATASET_KEY: dataset_entry(str(run.config["data"]))}
    copies = [run.folder / "config.yaml", run.folder / "metrics.json", run.folder / "blocks.json"]
    copies = [p for p in copies if p.is_file()] + ([run.ckpt] if include_checkpoint else [])
    files = [WEIGHTS_FILE, CONFIG_FILE, *(p.name for p in copies)]
    card = model_card(
        repo_id=repo_id, run=run, hparams=hparams, module=module, command=train_command(run.config, train_defaults), files=files
    )
    card.save(folder / "README.md")  # written first: save_pretrained keeps an existing README.md
    module.save_pretrained(folder, config=config)
    for source in copies:
        shutil.copy2(source, folder / source.name)


def hub_answer(err: HfHubHTTPError) -> str:
    """The Hub's reply to a failed request, on one line."""
    status = err.response.status_code if err.response is not None else "no answer"
    message = (err.server_message or str(err)).split("\n")[0]
    return " ".join(f"HTTP {status} {message}".split())


def upload(folder: Path, *, repo_id: str, private: bool, token: str) -> str:
    """Create the repository if needed and commit the folder to it; returns the commit's URL."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model with `main.py push`")
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE=1 forbids uploading: unset it to push, or write the folder only with --dry_run FOLDER") from None
    except HfHubHTTPError as err:
        raise UserError(f"pushing to {repo_id} failed: {hub_answer(err)}{upload_hint(err)}") from None
    except httpx2.TransportError as err:
        raise UserError(f"cannot reach the Hub at {api.endpoint} ({type(err).__name__}): check the network or HF_ENDPOINT") from None
    return commit.commit_url


def upload_hint(err: HfHubHTTPError) -> str:
    """What to do about a refused upload."""
    status = err.response.status_code if err.response is not None else None
    if status == 401:
        return ": the token was refused; run `hf auth login` again or set HF_TOKEN to a valid token"
    if status == 403:
        return ": the token cannot write there; use a token with write access, or push under your own name"
    return ""


def push(run: str, *, repo_id: str, private: bool, dry_run: str | None, include_checkpoint: bool, train_defaults: dict) -> str:
    """`main.py push`: build the model folder of a run and upload it (or, with dry_run, only write it)."""
    check_repo_id(repo_id)
    source = find_run(run)
    build = functools.partial(
        build_model_folder, run=source, repo_id=repo_id, include_checkpoint=include_checkpoint, train_defaults=train_defaults
    )
    if dry_run is not None:
        target = Path(dry_run)
        if target.exists():
            raise UserError(f"--dry_run {dry_run} already exists: choose a new folder (push never overwrites one)")
        write_folder_atomic(target, build)
        print(f"wrote {target} (nothing uploaded): test it with `main.py test {source.config['data']} --ckpt_path {target}`")
        return str(target)
    token = require_token()
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        build(Path(tmp))
        url = upload(Path(tmp), repo_id=repo_id, private=private, token=token)
    print(f"pushed {source.ckpt} to {url}: test it with `main.py test {source.config['data']} --ckpt_path {HF_SCHEME}{repo_id}`")
    return url


# ---- test: where a checkpoint comes from --------------------------------------------------------
def read_model_folder(folder: Path, label: str) -> dict:
    """A model folder written by push as the checkpoint dict test uses: {"state_dict", "hyper_parameters"}."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise UserError(
                f"{label} has no {name}: pass a .ckpt file (a run folder's last.ckpt), a folder written by `main.py push --dry_run`, "
                "or hf://OWNER/NAME"
            )
    config = read_json(folder / CONFIG_FILE)
    if config.get("model_type") not in MODEL_TYPES:
        raise UserError(f"{label}/{CONFIG_FILE} was not written by `main.py push` (no model_type vit or dblock)")
    try:
        state_dict = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{label}/{WEIGHTS_FILE} is corrupt or truncated ({type(err).__name__}): download or push it again") from None
    hparams = {key: value for key, value in config.items() if key != DATASET_KEY}
    return {"state_dict": state_dict, "hyper_parameters": hparams}


def download_model(uri: str) -> Path:
    """Download config.json and model.safetensors of hf://OWNER/NAME[@REVISION] into the Hub cache; returns their folder.

    The revision is resolved to one commit first, so both files come from the same commit even if the
    branch moves; offline (HF_HUB_OFFLINE=1 or no network) the cached copy is used.
    """
    try:
        parsed = parse_hf_uri(uri)
    except HfUriError:
        parsed = None
    if parsed is None or parsed.type != "model" or parsed.path_in_repo:
        raise UserError(f"--ckpt_path {uri} is not a model repository: use hf://OWNER/NAME or hf://OWNER/NAME@REVISION")
    repo_id, revision = parsed.id, parsed.revision
    try:
        resolved = HfApi().resolve_revision(repo_id, revision=revision)
        paths = [hf_hub_download(repo_id, name, revision=resolved) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except RevisionNotFoundError:
        raise UserError(f"{uri}: revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit of it") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{uri}: repository {repo_id} not found on {constants.ENDPOINT} (or it is private and your token cannot read it): "
            "check the name, or log in with `hf auth login` or HF_TOKEN"
        ) from None
    except (RevisionResolutionError, LocalEntryNotFoundError, OfflineModeIsEnabled):
        if constants.HF_HUB_OFFLINE:
            raise UserError(
                f"{uri} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it: "
                "unset HF_HUB_OFFLINE"
            ) from None
        raise UserError(
            f"cannot reach the Hub at {constants.ENDPOINT} and {uri} is not in the Hugging Face cache: check the network or HF_ENDPOINT"
        ) from None
    except EntryNotFoundError:
        raise UserError(f"{uri} has no {CONFIG_FILE} or {WEIGHTS_FILE}: it was not written by `main.py push`") from None
    except HfHubHTTPError as err:
        raise UserError(f"downloading {uri} failed: {hub_answer(err)}") from None
    except httpx2.TransportError as err:
        raise UserError(f"cannot reach the Hub at {constants.ENDPOINT} ({type(err).__name__}): check the network or HF_ENDPOINT") from None
    return Path(paths[0]).parent  # one commit, so one snapshot folder of the cache holds both files


def logs_folder_name(uri: str) -> str:
    """`hf-OWNER--NAME[-REVISION]`: the logs/ folder that holds the metrics of a Hub model."""
    parsed = parse_hf_uri(uri)
    name = "hf-" + parsed.id.replace("/", "--")
    if parsed.revision:
        name += "-" + re.sub(r"[^A-Za-z0-9._-]", "_", parsed.revision)
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

