"""`main.py bench DATA`, the measuring half: memory and speed of one training step, end-to-end ViT against
DiffusionBlocks (bench_render.py turns the results into the table and the chart).

Four variants are measured side by side on random inputs of the dataset's shape (no dataset files):
`vit` (backprop through all layers), `dblock-released` (one block trained per step, but every weight
and AdamW moment stays on the device, as in the released program), `dblock` (this project's default:
AdamW moments of the blocks not being trained live in host memory) and `dblock-offload-weights`
(their weights too); with `--weight_tied`, also `dblock-weight-tied` (every block runs one set of layers, so
nothing is offloaded). Each variant is the LitClassifier `train` builds, stepped through the same objective,
AdamW and gradient clipping as training. The data-loader pipeline of the real recipe is timed on its own.

torch and the project's model code are imported inside functions, because main.py imports this
module on every start-up.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from errors import UserError
from fileio import write_output

CUDA_METHOD = "cuda allocator peak"
CPU_METHOD = "cpu exact accounting: saved tensors + params + grads + optimizer state"


@dataclass(frozen=True)
class Policy:
    """Which per-block tensors a variant keeps in host memory while another block trains."""

    offload_state: bool
    offload_weights: bool


VARIANTS = {
    "vit": Policy(offload_state=False, offload_weights=False),
    "dblock-released": Policy(offload_state=False, offload_weights=False),
    "dblock": Policy(offload_state=True, offload_weights=False),
    "dblock-offload-weights": Policy(offload_state=True, offload_weights=True),
}
WEIGHT_TIED = "dblock-weight-tied"  # measured under --weight_tied: blocks sharing their layers cannot offload them
ALL_VARIANTS = {**VARIANTS, WEIGHT_TIED: Policy(offload_state=False, offload_weights=False)}
RATIO_VARIANT = "dblock"  # the project's default is the one held to the targets
# Largest acceptable dblock / vit ratio per measurement (paper's claims, SPEC section 1).
TARGETS = {"peak_memory": 0.37, "train_step": 0.40, "infer_step": 1.15}
RATIO_KEYS = {"peak_memory": "peak_memory_bytes", "train_step": "train_step_s", "infer_step": "infer_step_s"}
COMPONENTS = ("parameters", "gradients", "optimizer", "activations")
MIB = 2**20


@dataclass(frozen=True)
class Timing:
    """How much bench measures: timed steps, untimed warmup steps, and batches of the loader measurement."""

    steps: int
    warmup_steps: int
    loader_batches: int


def run(configs, timing: Timing, output: str | None, plot: str | None) -> dict:
    """Measure every variant and the loader, print the table, write the JSON and the chart (see main.bench)."""
    from bench_render import format_report, save_plot
    from data import dataset_info
    from objectives import check_train_blocks, check_weight_tying

    check_train_blocks(configs.model.train_blocks, configs.dblock.num_blocks)
    configs.dblock.validate(configs.arch.num_hidden_layers)  # before any model is built
    if configs.model.weight_tied:
        check_weight_tying(configs.model, configs.dblock, configs.arch.num_hidden_layers)
    r = configs.run
    info = dataset_info(r.data, r.data_dir)
    device = resolve_device(r.accelerator)
    use_recipe_matmul_precision(device, r.precision)
    names = [*VARIANTS, *([WEIGHT_TIED] if configs.model.weight_tied else [])]
    results = {name: measure_variant(name, configs, info.num_classes, device, timing) for name in names}
    loader = loader_throughput(
        r.data, info.image_size, configs.arch.image_size, r.batch_size, r.num_workers, timing.loader_batches,
        configs.model.seed, device,
    )
    report = assemble_report(results, loader, device, describe_config(configs, info.num_classes, timing))
    print(format_report(report))
    if output is not None:
        write_output(output, "--output", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    if plot is not None:
        write_output(plot, "--plot", lambda f: save_plot(report, f))
    return report


def describe_config(configs, num_labels: int, timing: Timing) -> dict:
    """The report's `config`: what was measured, in the keys bench has always written."""
    r, d = configs.run, configs.dblock
    return {
        "data": r.data, "accelerator": r.accelerator, "num_labels": num_labels, **configs.arch.to_dict(),
        "batch_size": r.batch_size, "num_blocks": d.num_blocks, "layers_per_block": d.layers_per_block,
        "train_blocks": configs.model.train_blocks, "precision": r.precision, "compile": configs.model.compile_model,
        "steps": timing.steps, "warmup_steps": timing.warmup_steps, "seed": configs.model.seed,
        "num_workers": r.num_workers, "loader_batches": timing.loader_batches,
    }


@dataclass
class Variant:
    """One model under test: the training module (model, objective, offloader), its AdamW and compute device."""

    name: str
    module: Any
    optimizer: Any
    device: Any
    bf16: bool

    @property
    def model(self):
        """The network being measured."""
        return self.module.model

    @property
    def offloader(self):
        """What moves the blocks not being trained to host memory (None: everything stays)."""
        return self.module.offloader

    @property
    def is_dblock(self) -> bool:
        """True for the three DiffusionBlocks variants."""
        return self.name != "vit"

    @property
    def policy(self) -> Policy:
        """What this variant keeps in host memory."""
        return ALL_VARIANTS[self.name]


# ---- input checks -------------------------------------------------------------------------------
def resolve_device(accelerator: str):
    """The torch device for --accelerator (auto = CUDA when available)."""
    import torch

    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UserError("--accelerator gpu but no CUDA device is visible: use --accelerator cpu or auto")
    use_cuda = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def use_recipe_matmul_precision(device, precision: str) -> None:
    """The recipe's fp32 on CUDA: TF32 tensor cores for matmuls (as the released program and `train`)."""
    import torch

    if device.type == "cuda" and precision == "32":
        torch.set_float32_matmul_precision("high")


# ---- models -------------------------------------------------------------------------------------
def build_variant(name: str, configs, num_labels: int, device) -> Variant:
    """The LitClassifier `train` would build for `name`, on `device`, with the training recipe's AdamW."""
    import dataclasses

    import torch

    from config import to_hparams
    from module import LitClassifier, build_optimizer

    policy = ALL_VARIANTS[name]
    model = dataclasses.replace(
        configs.model, model_type="vit" if name == "vit" else "dblock", offload_optimizer=policy.offload_state,
        offload_weights=policy.offload_weights, weight_tied=name == WEIGHT_TIED,
    )
    torch.manual_seed(configs.model.seed)  # every variant starts from the same initialisation
    module = LitClassifier(**to_hparams(dataclasses.replace(configs, model=model), num_labels)).to(device).train()
    module.compile_once()
    optimizer = build_optimizer(module.model, module.spec.optim, device)
    return Variant(name, module, optimizer, device, bf16=configs.run.precision == "bf16-mixed")


def autocast(v: Variant):
    """bf16 autocast under --precision bf16-mixed, otherwise a no-op context."""
    import torch

    return torch.autocast(v.device.type, dtype=torch.bfloat16, enabled=v.bf16)


def trained_params(v: Variant, block: int) -> list:
    """Parameters a step on `block` trains: all of vit; one block plus the shared stem and head of dblock."""
    if not v.is_dblock:
        return list(v.model.parameters())
    return [*v.model.blocks[block].parameters(), *v.model.shared_parameters()]


# ---- aten operators per step --------------------------------------------------------------------
COMPILED_GRAPH_EVENT = "## Call CompiledFxGraph"  # the profiler's name of one call of a compiled (inductor) graph


class OpCounter:
    """Counts the aten operators the host dispatches while active, through torch.profiler: every outermost aten
    event (the operators an operator calls inside are not counted again), and the calls of compiled graphs, whose
    fused kernels are not aten operators. A TorchDispatchMode counts the same eager operators but makes dynamo run
    a compiled model eagerly, so it cannot count a compiled step."""

    def __init__(self):
        self.ops = 0
        self.graph_calls = 0
        self._profiler = None

    def __enter__(self) -> OpCounter:
        from torch.profiler import ProfilerActivity, profile

        # Silences kineto's log (level 5, above its errors): its probe for a GPU prints an ERROR line on every
        # machine without one, and nothing it logs bears on counting CPU events.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self._profiler = profile(activities=[ProfilerActivity.CPU], acc_events=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profiler.__exit__(*exc)
        events = self._profiler.events()
        self.ops = sum(1 for e in events if is_aten(e) and not has_aten_caller(e))
        self.graph_calls = sum(1 for e in events if e.name.startswith(COMPILED_GRAPH_EVENT))


def is_aten(event) -> bool:
    return event.name.startswith("aten::")


def has_aten_caller(event) -> bool:
    """True if an aten operator encloses the profiler event (it runs inside that operator)."""
    parent = event.cpu_parent
    while parent is not None:
        if is_aten(parent):
            return True
        parent = parent.cpu_parent
    return False


# ---- one training step --------------------------------------------------------------------------
class SavedTensorCounter:
    """Bytes autograd saves for backward, each storage counted once in full; parameters' own storages left out."""

    def __init__(self, params):
        import torch

        self.skip = {storage_key(p) for p in params}
        self.storages: dict[tuple, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        """Record the storage behind a tensor autograd saves; the tensor itself is kept as it is."""
        key = storage_key(t)
        if key not in self.skip:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def nbytes(self) -> int:
        """Total bytes of the distinct storages recorded so far."""
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorCounter:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def storage_key(t) -> tuple:
    """Identity of the memory behind a tensor: views of one storage share it."""
    return t.device.type, t.device.index, t.untyped_storage().data_ptr()


def train_step(v: Variant, batch, step: int, block: int, count_saved: bool = False) -> int:
    """One optimizer step of training on `block` (the whole network for vit), gradients left in place: the module's
    own block activation and loss, then backward, the recipe's clipping and AdamW; returns saved-for-backward bytes."""
    import torch

    from module import GRADIENT_CLIP_VAL
    from objectives import StepIndex

    images, labels = batch
    block = v.module.start_block(step, v.optimizer, block if v.is_dblock else None)
    # Made after start_block: offloading weights gives the block's parameters new storages.
    counter = SavedTensorCounter(v.model.parameters()) if count_saved else contextlib.nullcontext()
    with counter, autocast(v):
        loss = v.module.block_loss(images, labels, StepIndex(step), block).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), GRADIENT_CLIP_VAL)
    v.optimizer.step()
    return counter.nbytes if count_saved else 0


def step_and_clear(v: Variant, batch, step: int, block: int) -> None:
    """A training step as the recipe runs it, gradients freed at the end (zero_grad(set_to_none=True))."""
    train_step(v, batch, step, block)
    v.optimizer.zero_grad(set_to_none=True)


def synchronize(device) -> None:
    """Wait for queued CUDA work, so wall-clock times and peaks cover it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory -------------------------------------------------------------------------------------
def on_accelerator(t, device) -> bool:
    """True for a tensor in accelerator memory; on CPU there is one memory and the offload policy decides instead."""
    return device.type == "cpu" or t.device.type == device.type


def resident_bytes(v: Variant, block: int) -> dict[str, int]:
    """Parameter, gradient and AdamW-moment bytes on the accelerator during a step on `block`.

    On CUDA the device of each tensor decides (the offloader really moved the rest to host memory);
    on CPU the variant's policy decides what would be there.
    """
    import torch

    everything = list(v.model.parameters())
    trained = trained_params(v, block)
    cpu = v.device.type == "cpu"
    weights = trained if cpu and v.policy.offload_weights else everything
    states = trained if cpu and v.policy.offload_state else everything
    moments = [t for p in states for t in v.optimizer.state.get(p, {}).values() if torch.is_tensor(t) and t.ndim > 0]
    grads = [p.grad for p in everything if p.grad is not None]
    return {
        "parameters": sum(p.nbytes for p in weights if on_accelerator(p, v.device)),
        "gradients": sum(g.nbytes for g in grads if on_accelerator(g, v.device)),
        # Scalar step counters (4 bytes per tensor) are left out; the offloader leaves them in place too.
        "optimizer": sum(t.nbytes for t in moments if on_accelerator(t, v.device)),
    }


def measure_memory(v: Variant, batch, block: int) -> dict:
    """Peak memory of one training step on `block`, split into parameters, gradients, optimizer and activations."""
    import torch

    cuda = v.device.type == "cuda"
    if cuda:
        synchronize(v.device)
        torch.cuda.reset_peak_memory_stats(v.device)
    saved = train_step(v, batch, 0, block, count_saved=not cuda)
    parts = resident_bytes(v, block)  # after the update: gradients still there, every moment created
    if cuda:
        synchronize(v.device)
        peak = torch.cuda.max_memory_allocated(v.device)
        # Everything else allocated at the peak: saved activations, their gradients in flight, the batch, workspaces.
        parts["activations"] = peak - sum(parts.values())
    else:
        parts["activations"] = saved
        peak = sum(parts.values())
    v.optimizer.zero_grad(set_to_none=True)
    return {"block": block, "peak_memory_bytes": peak, "breakdown": {k: parts[k] for k in COMPONENTS}}


# ---- time ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device) -> float:
    """Wall-clock seconds of fn(), queued CUDA work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def infer(v: Variant, images, generator) -> None:
    """Class logits of one test batch as scoring computes them: the forward pass for vit, the sampler for dblock."""
    import torch

    with torch.no_grad(), autocast(v):
        v.module.predict_logits(images, generator)


def drawn_block(v: Variant, step: int) -> int:
    """The block training draws at `step` (vit: its one block)."""
    return v.module.objective.block_at(step) if v.is_dblock else v.module.trainable_blocks[0]


def measure_variant(name: str, configs, num_labels: int, device, timing: Timing) -> dict:
    """Memory (worst block), median training-step time and median inference time of one variant."""
    import torch

    print(f"bench: measuring {name} ...", file=sys.stderr, flush=True)  # a paper-size run takes minutes on CPU
    fresh_compile_cache(configs)
    v = build_variant(name, configs, num_labels, device)
    batch = random_batch(configs, num_labels, device)
    trainable = v.module.trainable_blocks
    for i, block in enumerate(trainable):  # every block trained once: all AdamW moments exist (steady state)
        step_and_clear(v, batch, i, block)
    for i in range(timing.warmup_steps):
        step_and_clear(v, batch, i, drawn_block(v, i))
    memory = max((measure_memory(v, batch, b) for b in trainable), key=lambda m: m["peak_memory_bytes"])
    steps = range(timing.warmup_steps, timing.warmup_steps + timing.steps)
    blocks = [drawn_block(v, i) for i in steps]
    train_times = [timed(functools.partial(step_and_clear, v, batch, i, b), device) for i, b in zip(steps, blocks)]
    ops = count_step_ops(v, batch, steps.stop)
    infer_times = infer_times_of(v, batch[0], timing, configs.model.seed) if v.module.covers_all_blocks else []
    num_parameters = sum(p.numel() for p in v.model.parameters())  # shared (weight-tied) ones counted once
    del v, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    train_s = statistics.median(train_times)
    infer_s = statistics.median(infer_times) if infer_times else None
    return {
        **memory,
        "train_step_s": train_s,
        "infer_step_s": infer_s,
        "train_images_per_s": configs.run.batch_size / train_s,
        "infer_images_per_s": configs.run.batch_size / infer_s if infer_s else None,
        "train_blocks": blocks,
        "ops_per_step": ops.ops,
        "compiled_graph_calls_per_step": ops.graph_calls,
        "num_parameters": num_parameters,
    }


def count_step_ops(v: Variant, batch, step: int) -> OpCounter:
    """The aten operators (and compiled-graph calls) of training step `step`, an untimed one after the timed steps."""
    with OpCounter() as counter:
        step_and_clear(v, batch, step, drawn_block(v, step))
    return counter


def infer_times_of(v: Variant, images, timing: Timing, seed: int) -> list[float]:
    """Seconds of each timed inference batch, after the warmup ones, with every block on the device."""
    import torch

    v.module.eval()
    if v.offloader is not None:
        v.offloader.restore_weights(v.device)  # sampling runs every block
    generator = torch.Generator(device=v.device).manual_seed(seed)
    for _ in range(timing.warmup_steps):
        infer(v, images, generator)
    return [timed(lambda: infer(v, images, generator), v.device) for _ in range(timing.steps)]


def fresh_compile_cache(configs) -> None:
    """Under --compile: forget the graphs compiled for the previous variant, so that each variant compiles (and is
    timed and counted with) its own."""
    if configs.model.compile_model:
        import torch

        torch._dynamo.reset()


def random_batch(configs, num_labels: int, device):
    """Normalised-image-like noise and random labels of the configured shape, on the device."""
    import torch

    arch = configs.arch
    g = torch.Generator().manual_seed(configs.model.seed)
    images = torch.randn(configs.run.batch_size, arch.num_channels, arch.image_size, arch.image_size, generator=g)
    labels = torch.randint(num_labels, (configs.run.batch_size,), generator=g)
    return images.to(device), labels.to(device)


# ---- data loader --------------------------------------------------------------------------------
def loader_throughput(
    data: str, native_size: int, image_size: int, batch_size: int, num_workers: int, batches: int, seed: int, device
) -> float:
    """Images per second of DATA's released training pipeline (uint8 array -> train_transform -> batches)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from data import ArrayDataset, train_transform

    n = (batches + 1) * batch_size
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, native_size, native_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    loader = DataLoader(
        ArrayDataset(images, labels, train_transform(data, image_size, add_rand_aug=False, augment="released")),
        batch_size=batch_size,
        shuffle=True, drop_last=True, num_workers=num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    it = iter(loader)
    next(it)  # starts the workers; a one-off cost of every epoch, not of throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    del it
    return batches * batch_size / elapsed


# ---- report -------------------------------------------------------------------------------------
def assemble_report(results: dict, loader_images_per_s: float, device, config: dict) -> dict:
    """Everything measured, with the dblock / vit ratios and the targets they are held to."""
    vit, db = results["vit"], results[RATIO_VARIANT]
    ratios = {name: db[key] / vit[key] if db[key] is not None else None for name, key in RATIO_KEYS.items()}
    fastest = max(results, key=lambda name: results[name]["train_images_per_s"])
    return {
        **results,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": describe_device(device),
        "method": CUDA_METHOD if device.type == "cuda" else CPU_METHOD,
        "config": config,
        "versions": versions(),
        "ratio_variant": RATIO_VARIANT,
        "ratios": ratios,
        "targets": {
            name: {"max": limit, "pass": ratios[name] <= limit if ratios[name] is not None else None}
            for name, limit in TARGETS.items()
        },
        "loader_images_per_s": loader_images_per_s,
        "fastest_train_variant": fastest,
        "loader_slower_than_training": loader_images_per_s < results[fastest]["train_images_per_s"],
    }


def describe_device(device) -> str:
    """The compute device in words."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"cpu: {cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that decide the numbers."""
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "pytorch-lightning", "torchvision"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found
