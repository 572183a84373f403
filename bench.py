"""`main.py bench DATA`: memory and speed of one training step, end-to-end ViT against DiffusionBlocks.

Four variants are measured side by side on random inputs of the dataset's shape (no dataset files):
`vit` (backprop through all layers), `dblock-released` (one block trained per step, but every weight
and AdamW moment stays on the device, as in the released program), `dblock` (this project's default:
AdamW moments of the blocks not being trained live in host memory) and `dblock-offload-weights`
(their weights too). The data-loader pipeline of the real recipe is timed on its own.

torch and the project's model code are imported inside functions, because main.py imports this
module on every start-up.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from accelerator import check_accelerator
from errors import UserError, check_at_least
from fileio import write_atomic
from flags import Accelerator, Data, Precision

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
RATIO_VARIANT = "dblock"  # the project's default is the one held to the targets
# Largest acceptable dblock / vit ratio per measurement (paper's claims, SPEC section 1).
TARGETS = {"peak_memory": 0.37, "train_step": 0.40, "infer_step": 1.15}
RATIO_KEYS = {"peak_memory": "peak_memory_bytes", "train_step": "train_step_s", "infer_step": "infer_step_s"}
COMPONENTS = ("parameters", "gradients", "optimizer", "activations")
MIB = 2**20


def bench(
    data: Data,
    *,
    batch_size: int = 128,
    num_blocks: int | None = None,
    layers_per_block: str | None = None,
    train_blocks: str | None = None,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    patch_size: int | None = None,
    image_size: int | None = None,
    accelerator: Accelerator = "auto",
    precision: Precision = "32",
    compile: bool = False,
    steps: int = 5,
    warmup_steps: int = 2,
    num_workers: int = 2,
    loader_batches: int = 20,
    output: str | None = None,
    plot: str | None = None,
    seed: int = 42,
    data_dir: str = "data",
) -> dict:
    """Measure peak training memory (by component), step and inference time of vit and dblock variants, and loader speed.

    Args:
        data: Dataset whose shape is used: cifar10, cifar100, tiny-imagenet or imagefolder (inputs are random; no image is read).
        batch_size: Training and inference batch size.
        num_blocks: dblock: number of blocks B the layers are split into (default 3, or the length of --layers_per_block).
        layers_per_block: dblock: layers of each block, block 0 first, e.g. 6,4,2 (default: the even split); the worst block is reported.
        train_blocks: dblock: measure an independent job that builds and trains only these blocks (e.g. 1); no inference timing.
        hidden_size: Transformer width (default per dataset: 128; tiny-imagenet 768).
        num_hidden_layers: Transformer depth (default 12).
        num_attention_heads: Attention heads (default 4; tiny-imagenet 12).
        intermediate_size: MLP width (default 3072).
        patch_size: Patch side in pixels (default 4).
        image_size: Input side in pixels (default 32; tiny-imagenet 64).
        accelerator: auto (CUDA if present), cpu or gpu.
        precision: 32 (fp32, TF32 matmuls on CUDA) or bf16-mixed.
        compile: Run the models through torch.compile.
        steps: Timed training steps (and inference batches) per variant; the median is reported.
        warmup_steps: Untimed steps before timing, after every block has been trained once.
        num_workers: Data loader worker processes for the loader measurement.
        loader_batches: Batches timed in the loader measurement (after one untimed batch that starts the workers).
        output: Write the results as JSON to this file.
        plot: Write a PNG stacked-bar chart of the memory breakdown to this file.
        seed: Seed of initialisation, inputs and the block sequence.
        data_dir: imagefolder only: folder whose train/ class folders give the number of classes.
    """
    from data import dataset_info
    from dblock import parse_block_list, parse_layers_per_block, resolve_num_blocks
    from module import check_train_blocks
    from vit import default_arch

    layout = parse_layers_per_block(layers_per_block)
    num_blocks = resolve_num_blocks(num_blocks, layout)
    job_blocks = parse_block_list(train_blocks, "--train_blocks")
    check_train_blocks(job_blocks, num_blocks)
    check_at_least(batch_size=batch_size, num_blocks=num_blocks, steps=steps, loader_batches=loader_batches)
    check_at_least(minimum=0, warmup_steps=warmup_steps, num_workers=num_workers)
    check_accelerator(accelerator)
    for flag, path in (("--output", output), ("--plot", plot)):
        if path is not None:
            check_writable(flag, path)
    arch = default_arch(
        data, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size, patch_size=patch_size, image_size=image_size,
    )
    check_blocks(num_blocks, layout, arch.num_hidden_layers)
    info = dataset_info(data, data_dir)
    device = resolve_device(accelerator)
    use_recipe_matmul_precision(device, precision)
    run = RunConfig(
        batch_size=batch_size, num_blocks=num_blocks, layers_per_block=layout, train_blocks=job_blocks, precision=precision, compile=compile, steps=steps,
        warmup_steps=warmup_steps, seed=seed,
    )
    results = {name: measure_variant(name, arch, info.num_classes, device, run) for name in VARIANTS}
    loader = loader_throughput(data, info.image_size, arch.image_size, batch_size, num_workers, loader_batches, seed, device)
    config = {
        "data": data, "accelerator": accelerator, "num_labels": info.num_classes, **arch.to_dict(), **asdict(run),
        "num_workers": num_workers, "loader_batches": loader_batches,
    }
    report = assemble_report(results, loader, device, config)
    print(format_report(report))
    if output is not None:
        write_output(output, "--output", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    if plot is not None:
        write_output(plot, "--plot", lambda f: save_plot(report, f))
    return report


@dataclass(frozen=True)
class RunConfig:
    """Settings shared by every variant's measurement."""

    batch_size: int
    num_blocks: int
    layers_per_block: tuple[int, ...] | None  # None: the even split
    train_blocks: list[int] | None  # an independent job's blocks; None: all (joint training)
    precision: str
    compile: bool
    steps: int
    warmup_steps: int
    seed: int


@dataclass
class Variant:
    """One model under test with its optimizer, offload policy and compute device."""

    name: str
    model: Any
    optimizer: Any
    offloader: Any
    device: Any
    bf16: bool

    @property
    def is_dblock(self) -> bool:
        """True for the three DiffusionBlocks variants."""
        return self.name != "vit"

    @property
    def blocks(self) -> list[int]:
        """Blocks a step can train (the whole network counts as one block 0 for vit)."""
        return list(self.model.built_blocks) if self.is_dblock else [0]

    @property
    def can_sample(self) -> bool:
        """Whether every block exists, so the sampler can run (not so for an independent job's model)."""
        return not self.is_dblock or len(self.model.built_blocks) == self.model.num_blocks

    @property
    def policy(self) -> Policy:
        """What this variant keeps in host memory."""
        return VARIANTS[self.name]


# ---- input checks -------------------------------------------------------------------------------
def check_blocks(num_blocks: int, layout: tuple[int, ...] | None, num_layers: int) -> None:
    """Reject a block split the depth does not allow, before any model is built."""
    from dblock import DBlockConfig

    DBlockConfig(num_blocks=num_blocks, layers_per_block=layout).validate(num_layers)


def check_writable(flag: str, path: str) -> None:
    """Fail now, in one line, if `path` cannot receive a file (rather than after minutes of measuring)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    if not target.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {target.parent} does not exist: create it or choose another path")
    if not os.access(target.parent, os.W_OK):
        raise UserError(f"{flag} {path}: folder {target.parent} is not writable: choose another path")


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
def build_variant(name: str, arch, num_labels: int, device, run: RunConfig) -> Variant:
    """The model of `name`, on `device`, with the training recipe's AdamW and the variant's offloader."""
    import torch

    import dblock
    from offload import BlockOffloader
    from vit import ViTClassifier

    torch.manual_seed(run.seed)  # every variant starts from the same initialisation
    if name == "vit":
        model = ViTClassifier(arch=arch, num_labels=num_labels)
    else:
        from module import build_dblock

        dcfg = dblock.DBlockConfig(num_blocks=run.num_blocks, layers_per_block=run.layers_per_block)
        model = build_dblock(arch, num_labels, dcfg, run.seed, run.train_blocks, None)
    model.to(device).train()
    if run.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=device.type == "cuda")
    policy = VARIANTS[name]
    offloader = BlockOffloader(model.blocks, offload_weights=policy.offload_weights) if policy.offload_state else None
    return Variant(name, model, optimizer, offloader, device, bf16=run.precision == "bf16-mixed")


def autocast(v: Variant):
    """bf16 autocast under --precision bf16-mixed, otherwise a no-op context."""
    import torch

    return torch.autocast(v.device.type, dtype=torch.bfloat16, enabled=v.bf16)


def trained_params(v: Variant, block: int) -> list:
    """Parameters a step on `block` trains: all of vit; one block plus the shared stem and head of dblock."""
    if not v.is_dblock:
        return list(v.model.parameters())
    return [*v.model.blocks[block].parameters(), *v.model.shared_parameters()]


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


def train_step(v: Variant, batch, block: int, count_saved: bool = False) -> int:
    """One AdamW step on `block` (the whole network for vit), gradients left in place; returns saved-for-backward bytes if counted."""
    import torch
    import torch.nn.functional as F

    import dblock

    images, labels = batch
    if v.offloader is not None:
        v.offloader.activate(block, v.optimizer, v.device)
    # Made after activate: offloading weights gives the block's parameters new storages.
    counter = SavedTensorCounter(v.model.parameters()) if count_saved else contextlib.nullcontext()
    with counter, autocast(v):
        if v.is_dblock:
            loss = dblock.training_loss(v.model, images, labels, block)[0]
        else:
            loss = F.cross_entropy(v.model(images).float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
    v.optimizer.step()
    return counter.nbytes if count_saved else 0


def step_and_clear(v: Variant, batch, block: int) -> None:
    """A training step as the recipe runs it, gradients freed at the end (zero_grad(set_to_none=True))."""
    train_step(v, batch, block)
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
    """Peak memory of one training step on `block` and its split into parameters, gradients, optimizer and activations."""
    import torch

    cuda = v.device.type == "cuda"
    if cuda:
        synchronize(v.device)
        torch.cuda.reset_peak_memory_stats(v.device)
    saved = train_step(v, batch, block, count_saved=not cuda)
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


def infer(v: Variant, images) -> None:
    """Class logits of one test batch: the forward pass for vit, the sampler with one step per block for dblock."""
    import torch

    import dblock

    with torch.no_grad(), autocast(v):
        if v.is_dblock:
            dblock.sample_logits(v.model, images, v.model.num_blocks)
        else:
            v.model(images)


def measure_variant(name: str, arch, num_labels: int, device, run: RunConfig) -> dict:
    """Memory (worst block), median training-step time and median inference time of one variant."""
    import torch

    from module import block_for_step

    print(f"bench: measuring {name} ...", file=sys.stderr, flush=True)  # a paper-size run takes minutes on CPU
    with compile_limits(run):
        v = build_variant(name, arch, num_labels, device, run)
        batch = random_batch(arch, num_labels, run, device)
        for block in v.blocks:  # every block trained once: all AdamW moments exist (steady state)
            step_and_clear(v, batch, block)
        for i in range(run.warmup_steps):
            step_and_clear(v, batch, v.blocks[block_for_step(run.seed, i, len(v.blocks))])
        memory = max((measure_memory(v, batch, b) for b in v.blocks), key=lambda m: m["peak_memory_bytes"])
        blocks = [v.blocks[block_for_step(run.seed, run.warmup_steps + i, len(v.blocks))] for i in range(run.steps)]
        train_times = [timed(lambda b=b: step_and_clear(v, batch, b), device) for b in blocks]
        infer_times = []
        if v.can_sample:
            v.model.eval()
            if v.offloader is not None:
                v.offloader.restore_weights(device)  # sampling runs every block
            for _ in range(run.warmup_steps):
                infer(v, batch[0])
            infer_times = [timed(lambda: infer(v, batch[0]), device) for _ in range(run.steps)]
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
        "train_images_per_s": run.batch_size / train_s,
        "infer_images_per_s": run.batch_size / infer_s if infer_s else None,
        "train_blocks": blocks,
    }


def compile_limits(run: RunConfig):
    """Under --compile: a fresh compile cache per variant, with room for one graph per block, train and eval."""
    if not run.compile:
        return contextlib.nullcontext()
    import torch

    torch._dynamo.reset()
    return torch._dynamo.config.patch(recompile_limit=max(8, 4 * run.num_blocks))


def random_batch(arch, num_labels: int, run: RunConfig, device):
    """Normalised-image-like noise and random labels of the configured shape, on the device."""
    import torch

    g = torch.Generator().manual_seed(run.seed)
    images = torch.randn(run.batch_size, arch.num_channels, arch.image_size, arch.image_size, generator=g)
    labels = torch.randint(num_labels, (run.batch_size,), generator=g)
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
        ArrayDataset(images, labels, train_transform(data, image_size, add_rand_aug=False)), batch_size=batch_size, shuffle=True,
        drop_last=True, num_workers=num_workers, pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
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
        "targets": {name: {"max": limit, "pass": ratios[name] <= limit if ratios[name] is not None else None} for name, limit in TARGETS.items()},
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


def job_note(config: dict) -> str:
    """`, independent job: blocks 1` when only some blocks are built."""
    blocks = config.get("train_blocks")
    return f", independent job: blocks {','.join(map(str, blocks))}" if blocks else ""


def layout_note(config: dict) -> str:
    """` (layers 6,4,2)` for an uneven block layout, empty for the even split."""
    layout = config.get("layers_per_block")
    return f" (layers {','.join(map(str, layout))})" if layout else ""


def optional(value: float | None, width: int, spec: str) -> str:
    """A right-aligned number, or `n/a` for a measurement that was not made."""
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_report(report: dict) -> str:
    """The human-readable table: one row per variant, then the loader and the ratios against the targets."""
    c = report["config"]
    header = (
        f"{'variant':<24}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'peak':>9}"
        f"{'train s':>10}{'infer s':>10}{'train img/s':>13}{'infer img/s':>13}"
    )
    lines = [
        f"bench {c['data']}: batch {c['batch_size']}, B={c['num_blocks']}{layout_note(c)}{job_note(c)}, precision {c['precision']}"
        f"{', compiled' if c['compile'] else ''}; hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_attention_heads']} heads, MLP {c['intermediate_size']}, patch {c['patch_size']}, {c['image_size']} px, "
        f"{c['num_labels']} classes",
        f"device: {report['device']}; torch {report['versions']['torch']}; {report['date']}",
        f"memory method: {report['method']} (MiB; peak = worst block for dblock)",
        "",
        header,
        "-" * len(header),
    ]
    for name in VARIANTS:
        r = report[name]
        mib = [r["breakdown"][k] / MIB for k in COMPONENTS] + [r["peak_memory_bytes"] / MIB]
        lines.append(
            f"{name:<24}" + "".join(f"{x:>9.1f}" for x in mib)
            + f"{r['train_step_s']:>10.4f}{optional(r['infer_step_s'], 10, '.4f')}{r['train_images_per_s']:>13.1f}"
            + optional(r["infer_images_per_s"], 13, ".1f")
        )
    fastest = report["fastest_train_variant"]
    verdict = "SLOWER than" if report["loader_slower_than_training"] else "keeps up with"
    lines += [
        "-" * len(header),
        f"data loader: {report['loader_images_per_s']:.1f} img/s (train_transform, {c['num_workers']} workers), "
        f"{verdict} the fastest training step ({fastest}, {report[fastest]['train_images_per_s']:.1f} img/s)",
        "",
        f"{RATIO_VARIANT} / vit       ratio   target",
    ]
    for name, target in report["targets"].items():
        label = name.replace("_", " ")
        verdict = {True: "PASS", False: "FAIL", None: "n/a (an independent job cannot sample)"}[target["pass"]]
        lines.append(f"{label:<18}{optional(report['ratios'][name], 7, '.3f')}   <= {target['max']:.2f}  {verdict}")
    return "\n".join(lines)


def save_plot(report: dict, f) -> None:
    """PNG stacked bars of each variant's memory breakdown into the open file f."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg renders the PNG

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    names = list(VARIANTS)
    bottom = [0.0] * len(names)
    for component in COMPONENTS:
        heights = [report[n]["breakdown"][component] / MIB for n in names]
        ax.bar(names, heights, bottom=bottom, label=component)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, n in enumerate(names):
        ax.annotate(f"{report[n]['peak_memory_bytes'] / MIB:.0f}", (i, bottom[i]), ha="center", va="bottom")
    c = report["config"]
    ax.set_ylabel("MiB")
    ax.set_title(f"Training-step memory, {c['data']}, batch {c['batch_size']}, B={c['num_blocks']}{layout_note(c)} ({report['method'].split(':')[0]})", fontsize=9)
    ax.legend()
    fig.savefig(f, format="png", dpi=120)


def write_output(path: str, flag: str, write: Callable[[Any], Any]) -> None:
    """Write an output file atomically; an unwritable path becomes a one-line error naming the flag."""
    try:
        write_atomic(path, write)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write ({e.strerror or e}): choose another path") from None
