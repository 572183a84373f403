"""The model card (README.md) of a pushed model: Hub metadata with the measured accuracy, then what a reader needs."""

from __future__ import annotations

import shlex

from huggingface_hub import EvalResult, ModelCard

from config import lever_text, lever_values
from dblock import block_table
from module import LitClassifier
from paper import layout_text, paper_result
from vit import default_arch

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
# images: (N, 3, {{ image_size }}, {{ image_size }}), normalised as in config.json's "dataset"
logits = model.predict_logits(images)
```

Files: {{ files }}.

## Citation

```bibtex
{{ citation }}
```
"""


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


def block_layout(module: LitClassifier) -> list[int]:
    """Layers per block, block 0 first: the model's own block table; the end-to-end baseline is one block of all."""
    if module.hparams.model_type == "vit":
        return [module.hparams.arch["num_hidden_layers"]]
    return [len(row["layers"]) for row in block_table(module.model)]


def architecture_rows(hparams: dict, module: LitClassifier) -> list[tuple[str, str]]:
    """The card's table of what the network is."""
    arch = hparams["arch"]
    shape = [arch[key] for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")]
    rows = [
        ("model type", f"`{hparams['model_type']}`"),
        ("layers / hidden size / heads / MLP width", " / ".join(map(str, shape))),
        ("image size / patch size", f"{arch['image_size']} / {arch['patch_size']}"),
        ("classes", str(hparams["num_labels"])),
        ("parameters", f"{sum(p.numel() for p in module.model.parameters()):,}"),
        ("training levers (flags away from the released defaults)", lever_text(lever_values(module.spec.model))
         or "none"),
    ]
    if module.ema is not None:
        scored = "the moving average" if module.scores_ema else "the raw weights (--use_ema false)"
        rows.append(("weights in model.safetensors", f"{scored}, decay {module.spec.model.ema_decay}"))
    if hparams["model_type"] == "dblock":
        quirks = f"{hparams['batch_mean_loss_weight']} / {hparams['raw_embedding_bridge']}"
        rows += [
            ("blocks B (layers per block)", layout_text(block_layout(module))),
            ("sampler steps at test time / guidance scale", f"{module.inference_steps} / {hparams['cfg_scale']}"),
            ("released quirks: batch-mean loss weight / raw embedding bridge", quirks),
        ]
    return rows


def describe(hparams: dict, layout: list[int]) -> str:
    """What the model is, in a paragraph."""
    layers = hparams["arch"]["num_hidden_layers"]
    if hparams["model_type"] == "vit":
        return (
            f"The end-to-end ViT baseline of DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026): {layers} pre-LayerNorm "
            "transformer layers with a CLS token, trained with backpropagation through all of them."
        )
    return (
        f"A ViT image classifier trained with DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026): its {layers} "
        f"transformer layers are split into {len(layout)} blocks of {', '.join(map(str, layout))} layers (block 0 "
        "first), and each block is trained on its own, one block per step, as an EDM denoiser of the label embedding "
        "for one range of noise levels. At test time a sampler walks the noise levels from high to low, each step run "
        "by the block that owns that level, and the last step's logits give the class."
        + (" Its blocks are weight-tied: every block runs the same layers, only the noise range differs."
           if hparams.get("weight_tied") else "")
    )


def paper_comparison(data: str, hparams: dict, layout: list[int]) -> tuple[float | None, str, str]:
    """(paper's top-1 or None, the paper row's name, a sentence on how comparable they are)."""
    model_type = hparams["model_type"]
    paper = paper_result(data, model_type)
    if paper is None:
        return None, "", f"The paper reports no {model_type} result on this dataset."
    row = "ViT, end-to-end" if model_type == "vit" else f"ViT + DiffusionBlocks, B = {paper.num_blocks}"
    if hparams["arch"] == default_arch(data).to_dict() and tuple(layout) == paper.layout():
        return paper.accuracy, row, "Same architecture as the paper's; the training recipe is in config.yaml."
    return paper.accuracy, row, (
        "This model's architecture or block layout differs from the paper's, so the two numbers are not directly "
        "comparable."
    )


def model_card(
    *, repo_id: str, data: str, metrics: dict, hparams: dict, module: LitClassifier, command: str, files: list[str]
) -> ModelCard:
    """The README.md of the model repository: Hub metadata with a model-index of the measured accuracy, then prose."""
    hub_dataset, dataset_name = HUB_DATASETS.get(data, (None, data))
    accuracy = float(metrics["test/acc"])
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
    layout = block_layout(module)
    paper, paper_row, comparison = paper_comparison(data, hparams, layout)
    kind = "ViT baseline" if hparams["model_type"] == "vit" else "DiffusionBlocks ViT"
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=f"{kind} on {dataset_name}",
        description=describe(hparams, layout),
        architecture=architecture_rows(hparams, module),
        dataset_name=dataset_name,
        num_test_images=metrics.get("num_test_images", "all"),
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
