"""The LightningModule that trains and scores a model through its objective (objectives.py): optimiser,
schedule, logging, scoring and offload hooks, the same for every model type."""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from dataclasses import dataclass, field
from typing import get_args

import torch
import pytorch_lightning as pl
from huggingface_hub import PyTorchModelHubMixin
from transformers import get_scheduler

from config import LEVER_FLAGS, OptimConfig, default_hparams, spec_from_hparams
from ema import ParameterEMA
from errors import UserError
from flags import ModelType
from objectives import StepIndex, StepLoss, make_objective
from offload import BlockOffloader

MODEL_TYPES = get_args(ModelType)
EMA_KEY = "ema_state"  # the checkpoint entry holding the moving averages (--ema_decay), beside state_dict
# Graphs --compile makes of the model's forward for each block (the block index is a Python int, so each block is
# its own graph): training and scoring (grad mode on and off), each once more when a smaller last batch makes the
# batch size dynamic.
COMPILED_GRAPHS_PER_BLOCK = 4
GRADIENT_CLIP_VAL = 1.0  # the released recipe's gradient-norm clipping (train's Trainer and bench)


def capture_rng_states() -> dict:
    """Every random generator training draws from (dropout, augmentation, data order): saved for a bit-exact resume."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Put the generators back where capture_rng_states found them."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, num_warmup_steps: int, num_training_steps: int,
                   kwargs: dict):
    """The released schedule: transformers.get_scheduler, stepped every optimizer step."""
    return get_scheduler(
        name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs,
    )


def check_scheduler(name: str, num_warmup_steps: int, kwargs: dict) -> None:
    """Build the schedule once on a dummy optimizer so a bad combination fails before any data is read."""
    if num_warmup_steps < 0:
        raise UserError(f"--num_warmup_steps must be >= 0, got {num_warmup_steps}")
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        make_scheduler(dummy, name, num_warmup_steps, max(num_warmup_steps, 1) + 10, kwargs)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        raise UserError(f"--scheduler_type {name} with --scheduler_specific_kwargs {kwargs}: {message}") from None


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """The recipe's AdamW over the trainable parameters (an independent job's label table is frozen); fused on CUDA."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay, fused=device.type == "cuda")


@dataclass(frozen=True)
class Scoring:
    """How a run scores the test split; not a hyper-parameter (a checkpoint does not record it).

    schedule: metric prefix -> every how many epochs it is due while training: "val" (datasets with a validation
    split, the checkpoint selection) and "eval" (--eval_every_n_epochs); both score the test split.
    sampler_seed: seed of the sampler's noise at every scoring (None: the model's seed).
    save_predictions: keep every test prediction (for predictions.csv).
    """

    schedule: dict[str, int] = field(default_factory=dict)
    sampler_seed: int | None = None
    save_predictions: bool = False


def resolve_hparams(hparams: dict) -> dict:
    """Every hyper-parameter, train's default where the dict lacks one (older and converted checkpoints)."""
    unknown = set(hparams) - {"num_labels", *default_hparams(), *LEVER_FLAGS}
    if unknown:
        raise TypeError(f"unknown hyper-parameters {sorted(unknown)}")
    if hparams.get("model_type", "vit") not in MODEL_TYPES:
        raise UserError(f"unknown model type {hparams['model_type']!r}: choose one of {', '.join(MODEL_TYPES)}")
    if not 0.0 <= hparams.get("class_dropout_prob", 0.0) <= 1.0:
        raise UserError(f"--class_dropout_prob must be in [0, 1], got {hparams['class_dropout_prob']}")
    resolved = {**default_hparams(), **hparams}
    first = {key: resolved.pop(key) for key in ("model_type", "arch")} | {"num_labels": hparams["num_labels"]}
    return {**first, **resolved}  # the key order of every checkpoint


class NonFiniteWatch:
    """The first non-finite training loss (its step and value), kept on the device so that no step reads it.

    From that step on, every optimizer update is skipped exactly (skip_update). The run stops at the next logging step,
    checkpoint or end of training (LitClassifier.check_finite), before anything is logged or saved.
    """

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)  # -1: every loss so far was finite
        self.loss = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Keep `loss` and `step` if the loss is the first non-finite one."""
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)

    def skip_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the coming optimizer step a no-op once a loss was non-finite: on the device for fused AdamW (what
        build_optimizer makes on CUDA); otherwise (CPU, where reading waits for no device) by dropping the gradients,
        which AdamW skips."""
        seen = self.step >= 0
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = seen.float()
        elif seen:
            optimizer.zero_grad(set_to_none=True)

    def first(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, None if none: reads the device, so only at logging steps."""
        step = int(self.step)
        return (step, float(self.loss)) if step >= 0 else None


def allow_compiled_graphs(graphs: int) -> None:
    """Raise dynamo's recompile limit (8 by default) to `graphs` if lower: past the limit it runs the model's forward
    eagerly, after one warning, for every block and batch size it has not compiled yet."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs)


class LitClassifier(
    pl.LightningModule,
    PyTorchModelHubMixin,
    library_name="pytorch",
    license="apache-2.0",
    paper_url="https://arxiv.org/abs/2506.14202",
    tags=["diffusionblocks", "image-classification"],
):
    """Image classifier trained end to end (`vit`) or one diffusion block per step (`dblock`).

    `hparams` are the checkpoint's hyper-parameters (config.to_hparams): plain Python values, so checkpoints open
    with torch.load(weights_only=True); missing ones take train's defaults. `scoring` says how the run scores.
    `augment` is kept only as a record of how the run was trained: the data module applies it, this class never
    reads it.
    The Hugging Face mixin gives `save_pretrained` (model.safetensors + config.json of the hyper-parameters)
    and `LitClassifier.from_pretrained("OWNER/NAME" or a folder)`, which rebuilds the model from config.json
    alone and returns it in eval mode (see hub/ and `main.py push`).
    """

    def __init__(self, *, scoring: Scoring | None = None, **hparams):
        super().__init__()
        self.save_hyperparameters(resolve_hparams(hparams))
        self.spec = spec_from_hparams(self.hparams)
        self.objective = make_objective(self.spec)
        self.scoring = scoring or Scoring()
        self.model = self.objective.build_model()
        m = self.spec.model
        wanted = m.offload_optimizer or m.offload_weights
        offloads = self.objective.has_blocks and self.spec.member_blocks is None and wanted
        self.offloader = BlockOffloader(self.model.blocks, offload_weights=m.offload_weights) if offloads else None
        self.last_loss: StepLoss | None = None  # the last training micro-batch's loss terms (for callbacks)
        self.non_finite: NonFiniteWatch | None = None  # made on the device at the first training step
        self._correct = 0
        self._total = 0
        self._generator: torch.Generator | None = None
        self.predictions: list[torch.Tensor] = []
        self.test_results: dict[str, float] = {}
        self._due_prefixes: list[str] = []
        self.ema = self.build_ema()
        self._ema_names: dict[int | None, list[str]] = {}
        self._live_weights: dict[str, torch.Tensor] | None = None  # the raw weights while the averages are scored
        self._step_before_batch = 0

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        # The mixin loads weights non-strictly by default; config.json rebuilds the exact network: all must load.
        # config.json also describes the expected input (its "dataset" entry), which is not a hyper-parameter.
        loading = inspect.signature(PyTorchModelHubMixin._from_pretrained).parameters
        hparams = {"num_labels", *default_hparams(), *LEVER_FLAGS}
        kept = {k: v for k, v in kwargs.items() if k in loading or k in hparams}
        return super()._from_pretrained(strict=strict, **kept)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.compile_once()

    def compile_once(self) -> None:
        """torch.compile the model under --compile, in place, so state_dict keys (and checkpoints) stay the same."""
        if self.spec.model.compile_model and self.model._compiled_call_impl is None:
            allow_compiled_graphs(COMPILED_GRAPHS_PER_BLOCK * self.spec.dblock.num_blocks)
            self.model.compile()

    @property
    def current_block(self) -> int | None:
        """The block the last training step drew (None for vit and before the first step)."""
        return self.last_loss.block if self.last_loss else None

    @property
    def trainable_blocks(self) -> list[int]:
        """The blocks this run draws its steps from (the whole network is one block 0 for vit)."""
        return self.objective.trainable_blocks

    @property
    def covers_all_blocks(self) -> bool:
        """Whether this model can predict (an independent job holding some blocks cannot run the sampler)."""
        return self.objective.covers_all_blocks

    @property
    def inference_steps(self) -> int | None:
        """dblock's sampler steps at test time (None for vit)."""
        return self.objective.inference_steps

    # ---- training -------------------------------------------------------------------------
    def start_block(self, step: int, optimizer, block: int | None = None) -> int | None:
        """The block step `step` trains (or `block`), brought on the device with its optimizer state first."""
        drawn = block is None
        block = self.objective.block_at(step) if drawn else block
        if self.offloader is not None:
            self.offloader.activate(block, optimizer, self.device)
            if drawn:  # training: the next step's block is known, so its state is copied while this step computes
                self.offloader.prefetch(self.objective.block_at(step + 1))
        return block

    def block_loss(self, images: torch.Tensor, labels: torch.Tensor, where: StepIndex, block: int | None) -> StepLoss:
        """One micro-batch's training loss (the objective's), as training and bench compute it."""
        return self.objective.loss(self.model, images, labels, where, block)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        optimizer = self.optimizers().optimizer
        if micro_batch == 0:
            # Lightning clears gradients only after the forward pass; clearing them first frees the
            # previous step's gradients during this forward and lets offloaded weights move without them.
            optimizer.zero_grad(set_to_none=True)
        block = self.start_block(self.global_step, optimizer)
        out = self.block_loss(images, labels, StepIndex(self.global_step, self.global_rank, micro_batch), block)
        self.last_loss = out
        self.watch_finite(out)
        if self.is_logging_step(self.global_step):  # Lightning sends only a logging step's values; each log costs
            self.check_finite()  # before this step's metrics reach the loggers
            self.log_metrics(out)
        return out.loss

    def log_metrics(self, out: StepLoss) -> None:
        """The step's curves through Lightning (`train/loss`, ...), and dblock's block and per-block curves."""
        self.log_dict(out.logged, prog_bar=True)
        if out.block is not None:
            # A device tensor made by a fill: a Python float would be copied to the device, which waits for it.
            self.log("train/block", torch.full((), float(out.block), device=out.loss.device))
            self.log_block_curves(out)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        """Nothing: training_step cleared the gradients before its forward pass (Lightning would loop again)."""

    def is_logging_step(self, step: int) -> bool:
        """Lightning's own cadence: it logs a step's metrics when (step + 1) is a multiple of log_every_n_steps, and
        when training is asked to stop."""
        return (step + 1) % self.trainer.log_every_n_steps == 0 or self.trainer.should_stop

    def log_block_curves(self, out: StepLoss) -> None:
        """Per-block curves `train/loss_<b>`, `train/ce_loss_<b>`, sent straight to the loggers at the steps that
        trained block b (Lightning's self.log would re-send each key's last value at every later logging step)."""
        if not self.loggers:
            return
        metrics = {f"{name}_{out.block}": float(value.detach()) for name, value in out.logged.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def watch_finite(self, out: StepLoss) -> None:
        """Record a non-finite loss on the device (reading it would make the host wait for the forward pass)."""
        if self.non_finite is None:
            self.non_finite = NonFiniteWatch(out.loss.device)
        self.non_finite.observe(out.loss.detach(), self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        # After backward, before clipping: from a non-finite loss on, no update reaches the weights.
        if self.non_finite is not None:
            self.non_finite.skip_update(optimizer)

    def check_finite(self) -> None:
        """Stop if a training loss was non-finite, naming its step, block and the last good checkpoint."""
        found = self.non_finite.first() if self.non_finite is not None else None
        if found is None:
            return
        step, value = found
        callback = getattr(self.trainer, "checkpoint_callback", None)
        last_good = (callback.last_model_path or callback.best_model_path) if callback else ""
        if last_good and not os.path.exists(last_good):  # a save in progress names its file before writing it
            last_good = ""
        block = self.objective.block_at(step)
        where = f" (block {block})" if block is not None else ""
        raise UserError(
            f"non-finite loss {value} at step {step}{where}; last good checkpoint: "
            f"{last_good or 'none yet'}. Resume from it with --ckpt_path and a lower --lr, or use --precision 32"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never save weights trained past a non-finite loss
        checkpoint["rng_states"] = capture_rng_states()
        if self.ema is not None:
            checkpoint[EMA_KEY] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # With the step-derived data order (data.py), restoring the generators makes a resume bit-exact.
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
        if self.ema is not None and EMA_KEY in checkpoint:
            self.ema.load_state_dict(checkpoint[EMA_KEY])

    # ---- moving average of the weights (--ema_decay) ------------------------------------------------
    def build_ema(self) -> ParameterEMA | None:
        """The moving average of every trainable parameter under --ema_decay (None without it)."""
        decay = self.spec.model.ema_decay
        if decay is None:
            return None
        return ParameterEMA({name: p for name, p in self.model.named_parameters() if p.requires_grad}, decay)

    def load_ema(self, checkpoint: dict) -> None:
        """The averages of a checkpoint whose weights are loaded; one without any (a pushed model, whose weights are
        the averages already) starts them at its weights."""
        if self.ema is None:
            return
        if EMA_KEY in checkpoint:
            self.ema.load_state_dict(checkpoint[EMA_KEY])
        else:
            self.ema.reset()

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_before_batch = self.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Average only after a batch that ended with an optimizer step, and only what that step trained.
        if self.ema is not None and self.global_step > self._step_before_batch:
            self.ema.update(self.ema_names(self.current_block))

    def ema_names(self, block: int | None) -> list[str]:
        """Names of the parameters a step on `block` trains, in the moving average: listed once per block, not at
        every step."""
        if block not in self._ema_names:
            self._ema_names[block] = self.ema.names_of(self.objective.trained_parameters(self.model, block))
        return self._ema_names[block]

    @property
    def scores_ema(self) -> bool:
        """Whether scoring uses the moving average (kept, and not turned off by --use_ema false)."""
        return self.ema is not None and self.spec.model.use_ema

    @contextlib.contextmanager
    def scored_weights(self):
        """Within the block the model holds the weights scoring uses (the averages where scored), e.g. for push."""
        if not self.scores_ema:
            yield
            return
        with self.ema.swapped_in():
            yield

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.spec.optim, self.device)
        o = self.spec.optim
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = make_scheduler(optimizer, o.scheduler_type, o.num_warmup_steps, steps, o.scheduler_specific_kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        self.check_finite()
        if self.offloader is not None:
            self.offloader.restore_weights(self.device)

    # ---- scoring (validation while training, test after it) -------------------------------------
    def predict_logits(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class logits for a batch of images (dblock: the sampler, its noise drawn from `generator`)."""
        return self.objective.predict(self.model, images, generator)

    def start_scoring(self) -> None:
        """Put every block on the device (inference needs all of them), reset the counts, seed the sampler's noise."""
        if self.offloader is not None:
            self.offloader.restore_weights(self.device)
        if self.scores_ema and self._live_weights is None:
            self._live_weights = self.ema.swap_in()
        self._correct, self._total = 0, 0
        self.predictions = []
        # Its own generator: scoring never moves training's, and every scoring draws the same noise.
        seed = self.spec.model.seed if self.scoring.sampler_seed is None else self.scoring.sampler_seed
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def score_batch(self, batch) -> None:
        """Count the correct top-1 predictions of one batch."""
        images, labels = batch
        preds = self.predict_logits(images, self._generator).argmax(dim=-1)
        self._correct += int((preds == labels).sum())
        self._total += labels.numel()
        if self.scoring.save_predictions:
            self.predictions.append(torch.stack([labels, preds], dim=1).cpu())

    def end_scoring(self) -> None:
        """Put the raw weights back where scoring used the averages (training continues from them)."""
        if self._live_weights is not None:
            self.ema.restore(self._live_weights)
            self._live_weights = None

    def scored_accuracy(self) -> tuple[float, int]:
        """(accuracy, number of images) counted since start_scoring, summed over every DDP rank."""
        counts = torch.tensor([self._correct, self._total], dtype=torch.float64, device=self.device)
        correct, total = (int(v) for v in self.trainer.strategy.reduce(counts, reduce_op="sum"))
        return correct / max(total, 1), total

    def on_validation_epoch_start(self) -> None:
        schedule = self.scoring.schedule
        self._due_prefixes = [p for p, every in schedule.items() if (self.current_epoch + 1) % every == 0]
        self.start_scoring()

    def validation_step(self, batch, batch_idx):
        # Lightning validates every gcd of the intervals; an epoch where no metric is due skips the forward.
        if self._due_prefixes:
            self.score_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self.end_scoring()
        acc, _ = self.scored_accuracy()
        for prefix in self._due_prefixes:
            self.log_dict({f"{prefix}/acc": acc, f"{prefix}/f1": acc}, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self.start_scoring()

    def test_step(self, batch, batch_idx):
        self.score_batch(batch)

    def on_test_epoch_end(self) -> None:
        self.end_scoring()
        acc, total = self.scored_accuracy()
        # Micro-averaged F1 of single-label multiclass predictions equals accuracy (as released).
        self.test_results = {"test/acc": acc, "test/f1": acc, "num_test_images": total}
        self.log_dict({"test/acc": acc, "test/f1": acc}, sync_dist=False)
