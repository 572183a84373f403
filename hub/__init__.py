"""Share trained models on the Hugging Face Hub (`hub.publish`) and score them from it (`hub.resolve`).

`main.py push RUN --repo_id OWNER/NAME` turns a run folder into a Hub model folder and uploads it
(hub.publish, with the model card from hub.card); `main.py test DATA --ckpt_path hf://OWNER/NAME[@REVISION]`
scores it again (hub.resolve). Every Hub chore goes through huggingface_hub itself: LitClassifier's
PyTorchModelHubMixin writes model.safetensors and config.json (and rebuilds the model with
`LitClassifier.from_pretrained`), ModelCard / ModelCardData / EvalResult write the card, HfApi.create_repo and
upload_folder upload, HfApi.resolve_revision and hf_hub_download download (through the Hub cache, with HF_TOKEN or
the cached login, HF_HUB_OFFLINE and HF_ENDPOINT as usual).

This file holds what both directions share: the files of a model folder and the Hub's answer to a failed request.
"""

from __future__ import annotations

from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

HF_SCHEME = "hf://"
CONFIG_FILE = constants.CONFIG_NAME  # config.json
WEIGHTS_FILE = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors
DATASET_KEY = "dataset"  # config.json entry that is no LitClassifier hyper-parameter: what the model expects as input


def hub_answer(err: HfHubHTTPError) -> str:
    """The Hub's reply to a failed request, on one line."""
    status = err.response.status_code if err.response is not None else "no answer"
    message = (err.server_message or str(err)).split("\n")[0]
    return " ".join(f"HTTP {status} {message}".split())
