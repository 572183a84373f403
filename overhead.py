"""`main.py bench DATA --overhead`: what the host does per training step, against a bare PyTorch loop.

The paper's model is small enough that a GPU step is bound by the host: kernels launched, Python, Lightning. Both
are measured at two sizes: `launch-bound` (the configured depth and blocks, tiny widths and batch, so that compute is
negligible) and `configured` (the flags as given: the paper's model by default). Variants:

- `vit`, `dblock` (defaults: AdamW moments offloaded) and `dblock-no-offload` (--offload_optimizer false): the
  LitClassifier `train` builds, stepped by a Lightning Trainer with train's clipping, precision and logging cadence
  (no logger, no checkpoints: the loggers write only at logging steps).
- `vit-bare`, `dblock-bare`: the same network and loss (the objective), backward, the same clipping and AdamW in a
  plain loop: no Lightning, no offloading, no scheduler.

Host time per step is the interval between the starts of consecutive steps (Lightning's on_train_batch_start; the
loop's own top), CUDA work waited for at each mark, so a Trainer's setup and teardown are left out and its per-step
loop counted in. Variants alternate over rounds (a fresh model each) and the median of every timed interval is
reported; a project / bare ratio is the median over rounds of the ratio of the two round medians. aten ops per
step are counted by torch.profiler (bench.OpCounter) over the same steps in an extra, untimed run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import sys
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import bench
from fileio import write_output

# Widths at which compute is negligible; depth and blocks stay as configured.
LAUNCH_BOUND_ARCH = {"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16, "patch_size": 8}
LAUNCH_BOUND_BATCH = 8
LAUNCH_BOUND_STEPS_FACTOR = 10  # launch-bound steps are milliseconds: time this many times --steps per round
ROUNDS = {"launch-bound": 5, "configured": 3}
PROJECT = {"vit": "vit", "dblock": "dblock", "dblock-no-offload": "dblock-released"}  # -> bench.VARIANTS policy
BARE = {"vit-bare": "vit", "dblock-bare": "dblock-released"}
HOST_RATIOS = {"vit": "vit-bare", "dblock": "dblock-bare"}  # project variant -> its bare loop
OPS_RATIO = ("dblock", "dblock-no-offload")  # offloading may add at most OPS_TARGET to the ops of a step
OPS_TARGET, HOST_TARGET = 1.01, 1.3
METHOD = (
    "host ms per step: median interval between the starts of consecutive training steps over alternated rounds, "
    "CUDA work waited for at each mark (Lightning's on_train_batch_start for the project, the loop top for bare); "
    "host ratios: median over rounds of the ratio of the two variants' round medians; "
    "aten ops per step: outermost aten events of torch.profiler over the same steps, untimed run"
)


class StepClock(pl.Callback):
    """Marks the start of steps first .. first + steps (timing, or counting ops in between)."""

    def __init__(self, first: int, steps: int, device: torch.device, count_ops: bool):
        self.first, self.steps, self.device = first, steps, device
        self.marks: list[float] = []
        self.ops = bench.OpCounter() if count_ops else None

    def tick(self, index: int) -> None:
        """Called at the top of step `index`."""
        if not self.first <= index <= self.first + self.steps:
            return
        if self.ops is None:
            bench.synchronize(self.device)
            self.marks.append(time.perf_counter())
        elif index == self.first:
            self.ops.__enter__()
        elif index == self.first + self.steps:
            self.ops.__exit__(None, None, None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tick(batch_idx)

    @property
    def intervals_ms(self) -> list[float]:
        """Milliseconds of each timed step."""
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]

    @property
    def ops_per_step(self) -> float:
        """Mean aten ops of a counted step."""
        return self.ops.ops / self.steps


def lightning_steps(configs, name: str, num_labels: int, device, batch, clock: StepClock) -> None:
    """Train a fresh module of variant `name` for clock.first + clock.steps + 1 steps under a Trainer as train's."""
    from config import default_flags
    from module import GRADIENT_CLIP_VAL

    module = bench.build_variant(PROJECT[name], configs, num_labels, device).module
    total = clock.first + clock.steps + 1
    precision = configs.run.precision
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=total,
        precision="32-true" if precision == "32" else precision, gradient_clip_val=GRADIENT_CLIP_VAL,
        log_every_n_steps=default_flags("train")["log_every_n_steps"], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[clock],
    )
    # batch_size=None: the loader hands out the ready batch as it is (a bare list would be read as many loaders).
    trainer.fit(module, train_dataloaders=DataLoader([batch] * total, batch_size=None))


def bare_steps(configs, name: str, num_labels: int, device, batch, clock: StepClock) -> None:
    """The same network, loss, clipping and AdamW in a plain loop, for clock.first + clock.steps + 1 steps."""
    from module import GRADIENT_CLIP_VAL
    from objectives import StepIndex

    v = bench.build_variant(BARE[name], configs, num_labels, device)
    model, objective, optimizer = v.model, v.module.objective, v.optimizer
    images, labels = batch
    for step in range(clock.first + clock.steps + 1):
        clock.tick(step)
        optimizer.zero_grad(set_to_none=True)
        with bench.autocast(v):
            loss = objective.loss(model, images, labels, StepIndex(step), objective.block_at(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP_VAL)
        optimizer.step()


def run_variant(configs, name: str, num_labels: int, device, batch, clock: StepClock) -> StepClock:
    """Step variant `name` under `clock` (Lightning for the project's variants, the plain loop for bare ones)."""
    steps = lightning_steps if name in PROJECT else bare_steps
    bench.fresh_compile_cache(configs)
    steps(configs, name, num_labels, device, batch, clock)
    return clock


def steps_to_every_block(configs) -> int:
    """Steps until dblock has trained each of its blocks once: from then on every AdamW moment exists."""
    from dblock import block_for_step

    blocks = configs.model.train_blocks or list(range(configs.dblock.num_blocks))
    drawn, step = set(), 0
    while len(drawn) < len(blocks):
        drawn.add(block_for_step(configs.model.seed, step, len(blocks)))
        step += 1
    return step


def measure_size(configs, num_labels: int, device, warmup_steps: int, steps: int, rounds: int) -> dict:
    """Ops and host time per step of every variant at one size, after the warmup steps of the steady state."""
    names = [*PROJECT, *BARE]
    warmup = steps_to_every_block(configs) + warmup_steps
    batch = bench.random_batch(configs, num_labels, device)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):  # alternated, so drift hits every variant alike
            print(f"bench --overhead: round {r + 1}/{rounds}, {name} ...", file=sys.stderr, flush=True)
            clock = run_variant(configs, name, num_labels, device, batch, StepClock(warmup, steps, device, False))
            times[name].append(clock.intervals_ms)
    ops = {n: run_variant(configs, n, num_labels, device, batch, StepClock(warmup, steps, device, True)).ops_per_step
           for n in names}
    variants = {
        name: {
            "ops_per_step": ops[name],
            "host_ms_per_step": statistics.median(t for round_ in times[name] for t in round_),
            "round_medians_ms": [statistics.median(round_) for round_ in times[name]],
        }
        for name in names
    }
    return {"variants": variants, **judge(variants)}


def paired_ratio(project: dict, bare: dict) -> float:
    """Median over rounds of project / bare round medians: each ratio compares two runs of the same round, so the
    machine's load drifting between rounds (here it doubles a round's times at random) cancels out of it."""
    return statistics.median(p / b for p, b in zip(project["round_medians_ms"], bare["round_medians_ms"]))


def judge(variants: dict) -> dict:
    """The ratios and their PASS/FAIL against the targets."""
    ops = variants[OPS_RATIO[0]]["ops_per_step"] / variants[OPS_RATIO[1]]["ops_per_step"]
    host = {p: paired_ratio(variants[p], variants[b]) for p, b in HOST_RATIOS.items()}
    targets = {f"ops {OPS_RATIO[0]} / {OPS_RATIO[1]}": {"value": ops, "max": OPS_TARGET, "pass": ops <= OPS_TARGET}}
    for project, value in host.items():
        targets[f"host {project} / {HOST_RATIOS[project]}"] = {
            "value": value, "max": HOST_TARGET, "pass": value <= HOST_TARGET,
        }
    return {"targets": targets}


def launch_bound(configs):
    """The configured run at tiny widths and batch: the configured depth and blocks."""
    arch = dataclasses.replace(configs.arch, **LAUNCH_BOUND_ARCH)
    return dataclasses.replace(configs, arch=arch, run=dataclasses.replace(configs.run, batch_size=LAUNCH_BOUND_BATCH))


def size_config(configs) -> dict:
    """What a size measured: the transformer's shape, blocks and batch."""
    return {**configs.arch.to_dict(), "num_blocks": configs.dblock.num_blocks, "batch_size": configs.run.batch_size}


def run(configs, timing: bench.Timing, output: str | None) -> dict:
    """Measure both sizes, print the table, write the JSON (see main.bench --overhead)."""
    from bench_render import format_overhead
    from data import dataset_info

    info = dataset_info(configs.run.data, configs.run.data_dir)
    device = bench.resolve_device(configs.run.accelerator)
    bench.use_recipe_matmul_precision(device, configs.run.precision)
    sizes = {"launch-bound": (launch_bound(configs), LAUNCH_BOUND_STEPS_FACTOR * timing.steps),
             "configured": (configs, timing.steps)}
    report = {"sizes": {}}
    for size, (c, steps) in sizes.items():
        measured = measure_size(c, info.num_classes, device, timing.warmup_steps, steps, ROUNDS[size])
        report["sizes"][size] = {"config": {**size_config(c), "steps_per_round": steps, "rounds": ROUNDS[size]},
                                 **measured}
    report |= {
        "pass": all(t["pass"] for s in report["sizes"].values() for t in s["targets"].values()),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": bench.describe_device(device), "versions": bench.versions(), "method": METHOD,
        "config": {"data": configs.run.data, "precision": configs.run.precision,
                   "compile": configs.model.compile_model, "warmup_steps": timing.warmup_steps,
                   "seed": configs.model.seed},
    }
    print(format_overhead(report))
    if output is not None:
        write_output(output, "--output", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    return report

