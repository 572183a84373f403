"""The training levers of issue 17 through the code that trains with them: the objective's loss on a fixed batch
against a hand computation, the weight clamp, the moving average after real training steps, weight tying, the
flags' errors, and scoring (test, push) with the average.

Breakages these catch: a loss computed on the wrong tensor (logits for mse, D_x for brier), smoothing ignored, the
clamp applied below W or to the loss instead of the weight, an average updated for blocks a step did not train or
before the optimizer step, averages lost in checkpoints, test or push scoring the raw weights, blocks that hold
copies instead of one shared set of layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import dblock
from cli_helpers import TINY_ARCH, assert_one_line_error, run_cli, train_args
from module import EMA_KEY, LitClassifier
from objectives import StepIndex
from vit import default_arch

ARCH = default_arch("cifar10", hidden_size=24, num_hidden_layers=6, num_attention_heads=2, intermediate_size=48,
                    patch_size=8).to_dict()
NUM_LABELS = 5
SIGMA_DATA = 0.5


def lit(model_type: str = "dblock", **levers) -> LitClassifier:
    """A tiny LitClassifier in eval mode (no dropout: the hand computation repeats the forward pass)."""
    torch.manual_seed(0)
    return LitClassifier(model_type=model_type, arch=ARCH, num_labels=NUM_LABELS, **levers).eval()


def fixed_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(NUM_LABELS, (n,), generator=g)


def hand_inputs(module: LitClassifier, images, labels, block: int):
    """What the objective draws at step 0 (same generator, same order), and the denoiser's outputs on it."""
    model = module.model
    g = dblock.noise_generator(module.spec.model.seed, 0, 0, 0, images.device)
    lo, hi = model.training_range(block)
    from edm import sample_truncated_lognormal

    sigma = sample_truncated_lognormal(len(labels), lo, hi, cfg=model.edm_cfg, generator=g)
    eps = torch.randn((len(labels), ARCH["hidden_size"]), generator=g)
    target = torch.nn.functional.normalize(model.label_embed.weight, dim=-1)[labels]
    D_x, logits = model.denoise_and_classify(images, target + sigma[:, None] * eps, sigma, block)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    return D_x, logits, target, weight


def objective_loss(module: LitClassifier, images, labels, block: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return module.objective.loss(module.model, images, labels, StepIndex(0), block).loss


@pytest.mark.parametrize("levers", [{"loss": "mse"}, {"loss": "brier"}, {"label_smoothing": 0.2}, {}])
def test_dblock_loss_through_the_objective_matches_a_hand_computation(levers):
    module = lit(**levers)
    images, labels = fixed_batch()
    with torch.no_grad():
        D_x, logits, target, weight = hand_inputs(module, images, labels, block=1)
        p = logits.double().softmax(-1)
        onehot = torch.eye(NUM_LABELS, dtype=torch.float64)[labels]
        eps = levers.get("label_smoothing", 0.0)
        per_sample = {
            "mse": ((D_x - target).double() ** 2).sum(-1),
            "brier": ((p - onehot) ** 2).sum(-1),
            "ce": -((1 - eps) * onehot + eps / NUM_LABELS).mul(p.log()).sum(-1),
        }[levers.get("loss", "ce")]
    expected = per_sample.mean() * weight.double().mean()  # the released batch-mean quirk, on by default
    assert objective_loss(module, images, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_vit_brier_and_label_smoothing_match_a_hand_computation():
    images, labels = fixed_batch()
    for levers in ({"loss": "brier"}, {"label_smoothing": 0.3}):
        module = lit("vit", **levers)
        with torch.no_grad():
            p = module.model(images).double().softmax(-1)
        onehot = torch.eye(NUM_LABELS, dtype=torch.float64)[labels]
        if levers.get("loss") == "brier":
            expected = ((p - onehot) ** 2).sum(-1).mean()
        else:
            expected = -((0.7 * onehot + 0.3 / NUM_LABELS) * p.log()).sum(-1).mean()
        assert objective_loss(module, images, labels, block=None).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mse_reads_the_denoised_state_through_forward_which_compile_compiles(monkeypatch):
    """--compile compiles `forward`: the training loss must reach D_x through it, not around it."""
    module, calls = lit(loss="mse"), []
    real = dblock.DiffusionBlocksViT.forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("denoised", args[4] if len(args) > 4 else False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dblock.DiffusionBlocksViT, "forward", counting)
    objective_loss(module, *fixed_batch())
    assert calls == [True]


def reduce_inputs(monkeypatch, module, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample losses and weights the objective hands to reduce_loss."""
    seen, real = [], dblock.reduce_loss
    monkeypatch.setattr(dblock, "reduce_loss", lambda loss, w, flag: seen.append((loss, w)) or real(loss, w, flag))
    objective_loss(module, images, labels, block=2)  # the lowest noise: weights in the thousands
    monkeypatch.setattr(dblock, "reduce_loss", real)
    return seen[0]


def test_the_clamp_changes_only_the_weights_above_w(monkeypatch):
    images, labels = fixed_batch(16)
    loss, weight = reduce_inputs(monkeypatch, lit(), images, labels)
    cap = float(weight.median())
    assert (weight > cap).any() and (weight < cap).any()
    clamped_loss, clamped = reduce_inputs(monkeypatch, lit(max_loss_weight=cap), images, labels)
    assert torch.equal(clamped_loss, loss)
    assert torch.equal(clamped, torch.where(weight > cap, torch.full_like(weight, cap), weight))


# ---- the moving average through training ------------------------------------------------------------
class Recorder:
    """A Lightning callback keeping the weights and averages at the start and after every training batch, with the
    block the batch drew (the module averages in its own on_train_batch_end, which Lightning runs after this one's:
    the averages are read one batch late, at the next batch's start and at the end of training)."""

    def __init__(self):
        import pytorch_lightning as pl

        self.weights, self.averages, self.blocks = [], [], []
        recorder = self

        def snapshot(tensors):
            return {n: t.detach().clone() for n, t in tensors}

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if not recorder.weights:
                    recorder.weights.append(snapshot(module.model.named_parameters()))
                recorder.averages.append(snapshot(module.ema.shadows.items()))

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                recorder.weights.append(snapshot(module.model.named_parameters()))
                recorder.blocks.append(module.current_block)

            def on_train_end(self, trainer, module):
                recorder.averages.append(snapshot(module.ema.shadows.items()))

        self.callback = Callback()


def train_with(monkeypatch, capsys, cifar_dir, name: str, *flags: str, steps: int, callbacks=()) -> dict:
    """Train the tiny dblock model through the command line, with extra Lightning callbacks; the last checkpoint."""
    import functools

    import run

    monkeypatch.setattr(run, "train", functools.partial(run.train, callbacks=callbacks))
    code, _, err = run_cli(train_args(cifar_dir, name, *flags, model_type="dblock", steps=steps), capsys)
    assert code == 0, err
    return torch.load(Path("logs") / name / "last.ckpt", weights_only=True)


def trained_at(name: str, block: int) -> bool:
    """Whether a step on `block` trains the parameter `name` (its own layers, and the shared stem and head)."""
    return not name.startswith("blocks.") or name.startswith(f"blocks.{block}.")


def test_ema_after_real_steps_is_the_closed_form_and_untrained_blocks_keep_theirs(monkeypatch, capsys, cifar_dir):
    decay, rec = 0.8, Recorder()
    ckpt = train_with(monkeypatch, capsys, cifar_dir, "ema", "--ema_decay", str(decay), steps=2,
                      callbacks=(rec.callback,))
    ema, start = ckpt[EMA_KEY], rec.weights[0]
    assert len(rec.blocks) == 6  # 2 x B optimizer steps
    for name in ema:
        updates = [w[name] for block, w in zip(rec.blocks, rec.weights[1:]) if trained_at(name, block)]
        k = len(updates)
        closed = decay**k * start[name] + (1 - decay) * sum(decay ** (k - t) * p for t, p in enumerate(updates, 1))
        assert torch.allclose(ema[name], closed, atol=1e-6), name
    for step, block in enumerate(rec.blocks):
        before, after = rec.averages[step], rec.averages[step + 1]
        untrained = [name for name in before if not trained_at(name, block)]
        assert untrained and all(torch.equal(before[n], after[n]) for n in untrained), (step, block)
    shared = "classifier.weight"
    assert not torch.equal(ema[shared], ckpt["state_dict"][f"model.{shared}"])  # an average, not the last weights


def test_validation_with_the_average_leaves_training_on_the_raw_weights(monkeypatch, capsys, cifar_dir):
    plain = train_with(monkeypatch, capsys, cifar_dir, "plain", "--ema_decay", "0.9", steps=4)
    validated = train_with(monkeypatch, capsys, cifar_dir, "validated", "--ema_decay", "0.9",
                           "--eval_every_n_epochs", "1", steps=4)
    for key, value in plain["state_dict"].items():
        assert torch.equal(value, validated["state_dict"][key]), key
    for key, value in plain[EMA_KEY].items():
        assert torch.equal(value, validated[EMA_KEY][key]), key


@pytest.fixture
def recorded_classifier(monkeypatch):
    """The classifier weight the model holds each time it predicts."""
    seen, real = [], LitClassifier.predict_logits

    def predict_logits(self, images, generator=None):
        seen.append(self.model.classifier.weight.detach().clone())
        return real(self, images, generator)

    monkeypatch.setattr(LitClassifier, "predict_logits", predict_logits)
    return seen


def test_test_and_push_score_the_average_unless_use_ema_false(cifar_dir, capsys, recorded_classifier):
    from safetensors.torch import load_file

    code, _, err = run_cli(train_args(cifar_dir, "ema", "--ema_decay", "0.5", model_type="dblock", steps=2), capsys)
    assert code == 0, err
    ckpt = torch.load("logs/ema/last.ckpt", weights_only=True)
    average, raw = ckpt[EMA_KEY]["classifier.weight"], ckpt["state_dict"]["model.classifier.weight"]
    assert not torch.equal(average, raw)
    assert torch.equal(recorded_classifier[-1], average)  # the final test of train
    for use_ema, expected in (("true", average), ("false", raw)):
        recorded_classifier.clear()
        args = ["test", "cifar100", "--ckpt_path", "logs/ema/last.ckpt", "--data_dir", cifar_dir, "--use_ema", use_ema,
                "--batch_size", "8", "--num_workers", "0", "--accelerator", "cpu"]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        assert recorded_classifier and all(torch.equal(w, expected) for w in recorded_classifier), use_ema
    code, _, err = run_cli(["push", "logs/ema", "--repo_id", "me/ema", "--dry_run", "pushed"], capsys)
    assert code == 0, err
    assert torch.equal(load_file("pushed/model.safetensors")["model.classifier.weight"], average)
    assert "decay 0.5" in Path("pushed/README.md").read_text()


# ---- weight tying -----------------------------------------------------------------------------------
def test_weight_tied_blocks_share_one_storage_and_any_block_trains_it():
    module = lit(weight_tied=True).train()
    model = module.model
    per_block = [list(block.parameters()) for block in model.blocks]
    for b in (1, 2):
        assert all(p.data_ptr() == q.data_ptr() for p, q in zip(per_block[0], per_block[b]))
    untied = sum(p.numel() for p in lit().model.parameters())
    layers = sum(p.numel() for p in per_block[0])
    assert sum(p.numel() for p in model.parameters()) == untied - 2 * layers
    assert module.offloader is None  # nothing can wait in host memory
    images, labels = fixed_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with torch.no_grad():  # away from the zero-initialised classifier and modulations, so every weight has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for block in (2, 0, 1):
        before = [p.detach().clone() for p in per_block[0]]
        module.objective.loss(model, images, labels, StepIndex(0), block).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all(not torch.equal(p, q) for p, q in zip(per_block[0], before)), block  # block 0's layers moved


def test_weight_tied_runs_train_test_resume_and_push(cifar_dir, capsys):
    args = train_args(cifar_dir, "tied", "--weight_tied", "--save_every_n_epochs", "1", model_type="dblock", steps=2)
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "weight-tied" in out
    ckpt = torch.load("logs/tied/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["weight_tied"] is True
    state = ckpt["state_dict"]
    for key in [k for k in state if k.startswith("model.blocks.0.")]:
        assert torch.equal(state[key], state[key.replace("blocks.0.", "blocks.2.")]), key
    assert Path("logs/tied/blocks.json").read_text().count('"weight_tied": true') == 1
    code, _, err = run_cli(train_args(cifar_dir, "tied", "--weight_tied", "--ckpt_path", "logs/tied/last.ckpt",
                                      model_type="dblock", steps=3), capsys)
    assert code == 0, err
    code, _, err = run_cli(["push", "logs/tied", "--repo_id", "me/tied", "--dry_run", "pushed"], capsys)
    assert code == 0, err
    test = ["test", "cifar100", "--data_dir", cifar_dir, "--batch_size", "8", "--num_workers", "0",
            "--accelerator", "cpu", "--ckpt_path"]
    scores = []
    for source in ("logs/tied/last.ckpt", "pushed"):
        code, out, err = run_cli([*test, source], capsys)
        assert code == 0, err
        scores.append(json_metrics(source)["test/acc"])
    assert scores[0] == scores[1]


def json_metrics(source: str) -> dict:
    import json

    folder = Path(source).parent if source.endswith(".ckpt") else Path(source)
    return json.loads((folder / "metrics.json").read_text())


# ---- bad combinations -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "flags", "fragment"),
    [
        ("dblock", ["--label_smoothing", "0.1", "--loss", "mse"], "--label_smoothing"),
        ("dblock", ["--label_smoothing", "0.1", "--loss", "brier"], "--label_smoothing"),
        ("dblock", ["--label_smoothing", "-0.1"], "--label_smoothing must be in [0, 1)"),
        ("dblock", ["--weight_tied", "--layers_per_block", "3,2,1"], "uneven"),
        ("dblock", ["--weight_tied", "--train_blocks", "1"], "--train_blocks"),
        ("dblock", ["--weight_tied", "--offload_weights"], "--offload_weights"),
        ("dblock", ["--ema_decay", "1.0"], "--ema_decay must be in (0, 1)"),
        ("dblock", ["--ema_decay", "0"], "--ema_decay must be in (0, 1)"),
        ("dblock", ["--max_loss_weight", "0"], "--max_loss_weight must be > 0"),
        ("vit", ["--loss", "mse"], "--loss mse needs --model_type dblock"),
        ("vit", ["--max_loss_weight", "10"], "--max_loss_weight needs --model_type dblock"),
        ("vit", ["--weight_tied"], "--weight_tied needs --model_type dblock"),
    ],
)
def test_bad_lever_combinations_are_one_line_errors(cifar_dir, capsys, model_type, flags, fragment):
    code, _, err = run_cli(train_args(cifar_dir, "bad", *flags, model_type=model_type), capsys)
    assert_one_line_error(code, err, fragment)
    assert code == 2
    assert not Path("logs/bad").exists()


def test_bench_measures_the_weight_tied_variant(cifar_dir, capsys):
    args = ["bench", "cifar10", *TINY_ARCH, "--accelerator", "cpu", "--batch_size", "4", "--steps", "1",
            "--warmup_steps", "0", "--loader_batches", "1", "--num_workers", "0", "--weight_tied", "--output", "b.json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    import json

    report = json.loads(Path("b.json").read_text())
    tied, untied = report["dblock-weight-tied"], report["dblock-released"]
    layers = untied["num_parameters"] - tied["num_parameters"]
    assert layers > 0 and tied["breakdown"]["parameters"] < untied["breakdown"]["parameters"]
    assert "dblock-weight-tied" in out and f"dblock-weight-tied {tied['num_parameters']:,}" in out
    assert math.isfinite(tied["train_step_s"])


def test_an_mse_model_predicts_through_its_denoised_state():
    """--loss mse never trains the head: the sampler steps on D_x (EDM's sampler) and classifies the last D_x by its
    distance to the clean label embeddings."""
    import edm

    module = lit(loss="mse")
    model, images = module.model, fixed_batch(4)[0]
    assert not model.label_embed.weight.requires_grad  # a learnt table would collapse onto one row
    with torch.no_grad():
        for p in model.parameters():  # away from the zero initialisation, so D_x depends on the image
            p.add_(0.05 * torch.randn_like(p))
        z0 = torch.randn(4, ARCH["hidden_size"], generator=torch.Generator().manual_seed(3))
        predicted = module.objective.predict(model, images, torch.Generator().manual_seed(3))
        sigmas = dblock.sampler_grid(3, model.edm_cfg)
        z = z0 * math.sqrt(1 + sigmas[0] ** 2)
        for i, sigma in enumerate(sigmas):
            D_x = model.denoise_and_classify(images, z, torch.full((4,), sigma), model.block_of_sigma(sigma))[0]
            if i + 1 < len(sigmas):
                z = edm.euler_step(z, D_x, sigma, sigmas[i + 1])
        targets = torch.nn.functional.normalize(model.label_embed.weight, dim=-1)
        expected = -((D_x[:, None] - targets[None]) ** 2).sum(-1)
    assert torch.allclose(predicted, expected, atol=1e-5)
    assert not torch.allclose(predicted, predicted[:1])  # the images are told apart (the head alone gives zeros)
