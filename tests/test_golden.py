"""Golden cross-checks: this project's models, loaded with the released program's weights through
`released.convert_checkpoint`, reproduce the released program's own outputs (tests/golden/README.md).

Every case compares numbers the released program computed; a change to any piece of wiring
(preconditioning, adaLN order, label normalisation, bridge table, guidance formula, block routing)
moves them far beyond the tolerances. `pytest -k golden` selects them all.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dblock
import released
from module import LitClassifier

GOLDEN = Path(__file__).parent / "golden"
META = json.loads((GOLDEN / "meta.json").read_text())
OUT = load_file(GOLDEN / "released_outputs.safetensors")
LOGITS_ATOL = 1e-5
SAMPLER_ATOL = 1e-4
ARCH_FLAGS = {k: META["arch"][k] for k in released.ARCH_FLAGS}


def released_ckpt(weights: str, model_type: str) -> dict:
    """A checkpoint as the released program writes it: `model.`-prefixed state dict, argparse flags as hparams."""
    state = {f"model.{k}": v for k, v in load_file(GOLDEN / weights).items()}
    if model_type == "dblock":
        state["model.sigmas"] = torch.tensor(META["cases"]["sampler.n3.cfg0.0"]["sigmas"])
    flags = {"model_type": model_type, "image_size": 32, "num_labels": META["num_labels"],
             "num_blocks": META["num_blocks"], **ARCH_FLAGS}
    return {"state_dict": state, "hyper_parameters": flags}


def load_golden(weights: str, model_type: str, **overrides) -> torch.nn.Module:
    """This project's model holding the golden weights, converted exactly as `main.py test` converts them."""
    ckpt = released.convert_checkpoint(released_ckpt(weights, model_type), "golden.ckpt")
    module = LitClassifier(**{**ckpt["hyper_parameters"], **overrides})
    module.load_state_dict(ckpt["state_dict"])
    return module.model.eval()


@pytest.fixture(scope="module")
def golden_dblock():
    return load_golden("released_dblock_weights.safetensors", "dblock")


def test_golden_conversion_keeps_every_tensor_and_the_released_architecture(golden_dblock):
    weights = load_file(GOLDEN / "released_dblock_weights.safetensors")
    assert len(golden_dblock.state_dict()) == len(weights)
    assert sum(p.numel() for p in golden_dblock.parameters()) == sum(v.numel() for v in weights.values())
    assert [len(b) for b in golden_dblock.blocks] == [2, 2, 2]
    # Layer i of the released model is layer i % 2 of block i // 2.
    released_layer_3 = weights["vit.encoder.layer.3.adaLN_modulation.linear.weight"]
    assert torch.equal(golden_dblock.blocks[1][1].ada.weight, released_layer_3)
    assert golden_dblock.boundaries == pytest.approx(META["block_sigmas"], rel=1e-9)


def test_golden_clean_targets_are_normalised_label_rows(golden_dblock):
    assert torch.allclose(golden_dblock.clean_targets(OUT["labels"]), OUT["clean_targets"], atol=1e-7)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_golden_block_logits_losses_and_weights(golden_dblock, block):
    sigma, eps = OUT[f"block{block}.sigma"], OUT[f"block{block}.eps"]
    z = OUT["clean_targets"] + sigma[:, None] * eps
    with torch.no_grad():
        logits = golden_dblock(OUT["images"], z, sigma, block)
        ce, w = dblock.denoising_losses(golden_dblock, OUT["images"], OUT["labels"], sigma, eps, block)
    assert (logits - OUT[f"block{block}.logits"]).abs().max() <= LOGITS_ATOL
    assert torch.allclose(ce, OUT[f"block{block}.ce"], atol=LOGITS_ATOL)
    assert torch.allclose(w, OUT[f"block{block}.w"], rtol=1e-6)
    released_loss = dblock.reduce_loss(ce, w, batch_mean_loss_weight=True)
    paper_loss = dblock.reduce_loss(ce, w, batch_mean_loss_weight=False)
    assert released_loss.item() == pytest.approx(OUT[f"block{block}.loss_released"].item(), rel=1e-5)
    assert paper_loss.item() == pytest.approx(OUT[f"block{block}.loss_per_sample"].item(), rel=1e-5)


def test_golden_block_ranges_hold_the_released_sigmas(golden_dblock):
    for block in range(3):
        lo, hi = golden_dblock.training_range(block)
        sigma = OUT[f"block{block}.sigma"]
        assert lo <= sigma.min().item() and sigma.max().item() <= hi


CASES = [(n, s) for n in (1, 2, 3, 5) for s in (0.0, 1.5)]


@pytest.mark.parametrize("num_steps,cfg_scale", CASES)
def test_golden_sampler(golden_dblock, num_steps, cfg_scale):
    case = f"sampler.n{num_steps}.cfg{cfg_scale}"
    assert dblock.sampler_grid(num_steps, golden_dblock.edm_cfg) == META["cases"][case]["sigmas"]
    logits = dblock.sample_logits(golden_dblock, OUT["images"], num_steps, cfg_scale, z0=OUT["sampler.z0_unscaled"])
    assert (logits - OUT[f"{case}.logits"]).abs().max() <= SAMPLER_ATOL


def test_golden_sampler_with_normalised_bridge_differs():
    """The raw-table bridge is a released quirk the golden outputs depend on; the switch really changes them."""
    normalised = load_golden("released_dblock_weights.safetensors", "dblock", raw_embedding_bridge=False)
    logits = dblock.sample_logits(normalised, OUT["images"], 3, 0.0, z0=OUT["sampler.z0_unscaled"])
    assert (logits - OUT["sampler.n3.cfg0.0.logits"]).abs().max() > 100 * SAMPLER_ATOL


def test_golden_vit_logits():
    vit = load_golden("released_vit_weights.safetensors", "vit")
    with torch.no_grad():
        logits = vit(OUT["images"])
    assert (logits - OUT["vit.logits"]).abs().max() <= LOGITS_ATOL
