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

import contextlib
from collections.abc import Callable, Iterator

import httpx2  # the HTTP client of huggingface_hub: its transport errors mean the Hub could not be reached
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from errors import UserError

HF_SCHEME = "hf://"
CONFIG_FILE = constants.CONFIG_NAME  # config.json
WEIGHTS_FILE = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors
DATASET_KEY = "dataset"  # config.json entry that is no LitClassifier hyper-parameter: what the model expects as input


def hub_answer(err: HfHubHTTPError) -> str:
    """The Hub's reply to a failed request, on one line."""
    status = err.response.status_code if err.response is not None else "no answer"
    message = (err.server_message or str(err)).split("\n")[0]
    return " ".join(f"HTTP {status} {message}".split())


@contextlib.contextmanager
def talking_to_hub(
    failed: str, endpoint: str, hint: Callable[[HfHubHTTPError], str] = lambda err: ""
) -> Iterator[None]:
    """Turn a refused request (`failed`: what did not happen) or an unreachable Hub into a one-line error.

    Requests that fail in ways with their own advice catch those errors first, inside the block.
    """
    try:
        yield
    except HfHubHTTPError as err:
        raise UserError(f"{failed}: {hub_answer(err)}{hint(err)}") from None
    except httpx2.TransportError as err:
        raise UserError(
            f"cannot reach the Hub at {endpoint} ({type(err).__name__}): check the network or HF_ENDPOINT"
        ) from None
