"""`main.py diagnose`: look inside a checkpoint's predictions: calibration, every sampler step, every block in
isolation, noise-draw ensembles and the cost of each number of inference steps.

The passes over the test split run on the model directly (no Lightning loop), each with its own seeded generator,
so the first noise draw at the checkpoint's step count reproduces `main.py test` image by image.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import dblock
import diagnose_render
import diagnostics
import edm

SECOND_DRAW_SALT = 7_919  # seed offset between the sampler noise draws of an ensemble


@dataclass
class Collected:
    """Everything the passes over the test split record, concatenated over batches (on the host)."""

    labels: list[torch.Tensor] = field(default_factory=list)
    # (num_inference_steps, draw) -> per step: (block, sigma, list of logits batches)
    steps: dict[tuple[int, int], list[tuple[int, float, list[torch.Tensor]]]] = field(default_factory=dict)
    sampler_seconds: dict[int, float] = field(default_factory=dict)
    forward_seconds: float = 0.0
    # (block, sigma index) -> [correct count, CE sum, squared-error sum]
    oracle: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    vit_logits: list[torch.Tensor] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading measures the work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def draw_generator(seed: int, draw: int, device: torch.device) -> torch.Generator:
    """The sampler noise of draw k: draw 0 is seeded exactly as `main.py test` seeds its sampler."""
    return torch.Generator(device=device).manual_seed(seed + draw * SECOND_DRAW_SALT)


def sampler_pass(model, images: torch.Tensor, num_steps: int, plan: "Plan", generator: torch.Generator,
                 record: list) -> None:
    """Run the sampler on one batch and append each step's (block, sigma, logits) to `record` (one entry per step)."""
    steps = dblock.sampler_steps(model, images, num_steps, plan.cfg_scale, generator=generator, readout=plan.readout)
    for index, step in enumerate(steps):
        if len(record) <= index:
            record.append((step.block, step.sigma, []))
        record[index][2].append(step.logits.float().cpu())


def oracle_pass(model, images: torch.Tensor, labels: torch.Tensor, plan: "Plan", generator: torch.Generator,
                out: dict) -> None:
    """Every block denoises the true label state plus noise at every sigma (the same noise for every block)."""
    target = model.clean_targets(labels).float()  # (N, D)
    sigmas, blocks = plan.sigmas, plan.oracle_blocks
    for i, sigma in enumerate(sigmas):
        eps = torch.randn(target.shape, device=target.device, generator=generator)
        sigma_t = torch.full((len(labels),), sigma, device=target.device)
        z = target + sigma * eps
        for b in blocks:
            denoised, logits = model.denoise_and_classify(images, z, sigma_t, b)
            sums = out.setdefault((b, i), [0.0, 0.0, 0.0])
            sums[0] += float((logits.argmax(-1) == labels).sum())
            sums[1] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            sums[2] += float(((denoised.float() - target) ** 2).sum())


def timed(device: torch.device, fn):
    """(result of fn(), seconds it took, queued device work included)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


@torch.no_grad()
def collect(model, loader, plan: "Plan", device: torch.device, progress) -> Collected:
    """One pass over the test batches doing every analysis of the plan; `progress(images)` after each batch."""
    out = Collected()
    draws = range(plan.num_samples)
    generators = {(n, k): draw_generator(plan.seed, k, device) for n in plan.step_counts for k in draws}
    oracle_generator = torch.Generator(device=device).manual_seed(plan.seed)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        out.labels.append(labels.cpu())
        if not plan.is_dblock:
            logits, seconds = timed(device, lambda: model(images))
            out.vit_logits.append(logits.float().cpu())
            out.forward_seconds += seconds
            progress(len(labels))
            continue
        for (n, k), g in generators.items():
            record = out.steps.setdefault((n, k), [])
            _, seconds = timed(device, lambda: sampler_pass(model, images, n, plan, g, record))
            if k == 0:
                out.sampler_seconds[n] = out.sampler_seconds.get(n, 0.0) + seconds
        one_call = lambda: model(images, torch.randn(len(labels), model.arch.hidden_size, device=device),  # noqa: E731
                                 torch.full((len(labels),), plan.sigmas[0], device=device), plan.oracle_blocks[0])
        out.forward_seconds += timed(device, one_call)[1]
        oracle_pass(model, images, labels, plan, oracle_generator, out.oracle)
        progress(len(labels))
    return out


@dataclass(frozen=True)
class Plan:
    """What to measure: resolved from the flags and the checkpoint before any data is read."""

    is_dblock: bool
    step_counts: tuple[int, ...]
    default_steps: int | None
    num_samples: int
    seed: int
    cfg_scale: float
    readout: str = dblock.READOUTS[0]  # how the sampler reads the class: the released bridge, or D_x (--loss mse)
    sigmas: tuple[float, ...] = ()
    oracle_blocks: tuple[int, ...] = ()


def final_logits(record: list[tuple[int, float, list[torch.Tensor]]]) -> torch.Tensor:
    """The last sampler step's logits over the whole split."""
    return torch.cat(record[-1][2])


def summarise(out: Collected, plan: Plan, model) -> dict:
    """The diagnostics dictionary (diagnostics.json) from what the passes collected."""
    labels = torch.cat(out.labels)
    n_images = len(labels)
    report: dict = {"num_images": n_images, "forward_ms_per_image": 1000 * out.forward_seconds / n_images}
    if not plan.is_dblock:
        logits = torch.cat(out.vit_logits)
        report.update(calibration=diagnostics.calibration(logits, labels), predictions=logits.argmax(dim=-1).tolist())
        return report
    if plan.step_counts:
        report.update(sampler_summary(out, plan, labels))
    report["blocks"] = oracle_summary(out, plan, model, n_images)
    if "calibration" in report:
        # The first sampler step sees almost pure noise (sigma_max): its accuracy is what the image alone gives.
        steps = report["calibration"]["num_inference_steps"]
        first = next(r for r in report["sampler"] if r["num_inference_steps"] == steps)
        report["blocks"]["image_only_accuracy"] = first["trajectory"][0]["accuracy"]
        report["blocks"]["sampler_accuracy"] = report["calibration"]["accuracy"]
    return report


def sampler_summary(out: Collected, plan: Plan, labels: torch.Tensor) -> dict:
    """Per step count: accuracy, cost and trajectory; calibration and ensembles at the checkpoint's step count."""
    n_images = len(labels)
    sampler = [
        {
            "num_inference_steps": n,
            "accuracy": diagnostics.accuracy(final_logits(out.steps[(n, 0)]), labels),
            "ms_per_image": 1000 * out.sampler_seconds[n] / n_images,
            "trajectory": diagnostics.trajectory(
                [(b, s, torch.cat(chunks)) for b, s, chunks in out.steps[(n, 0)]], labels
            ),
        }
        for n in plan.step_counts
    ]
    default = plan.default_steps if plan.default_steps in plan.step_counts else plan.step_counts[0]
    calibration = diagnostics.calibration(final_logits(out.steps[(default, 0)]), labels)
    draws = [final_logits(out.steps[(default, k)]) for k in range(plan.num_samples)]
    return {
        "sampler": sampler,
        "predictions": final_logits(out.steps[(default, 0)]).argmax(dim=-1).tolist(),  # as `test` predicts, in order
        "calibration": {"num_inference_steps": default, **calibration},
        "ensemble": {"num_inference_steps": default, "rows": diagnostics.ensemble(draws, labels)},
    }


def oracle_summary(out: Collected, plan: Plan, model, n_images: int) -> dict:
    """Per block and sigma: accuracy, mean CE and mean squared denoising error; with the blocks' own ranges."""
    rows = []
    for (b, i), (correct, ce, sq) in sorted(out.oracle.items()):
        rows.append({
            "block": b, "sigma": plan.sigmas[i], "accuracy": correct / n_images, "ce": ce / n_images,
            "denoising_mse": sq / n_images, "in_own_range": model.block_of_sigma(plan.sigmas[i]) == b,
        })
    return {
        "boundaries": list(model.boundaries),
        "ranges": [list(edm.block_range(b, model.boundaries)) for b in range(model.num_blocks)],
        "sigmas": list(plan.sigmas),
        "rows": rows,
    }


# ---- the command ----------------------------------------------------------------------------------------------------
def parse_step_counts(text: str | int | None) -> tuple[int, ...]:
    """`1,2,3,6,12` -> (1, 2, 3, 6, 12); None -> () (the checkpoint's own step count)."""
    from errors import UserError

    if text is None:
        return ()
    try:
        counts = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise UserError(f"--num_inference_steps {text!r} must be comma-separated integers such as 1,2,3,6,12") from None
    if min(counts) < 1:
        raise UserError(f"--num_inference_steps {text} must list step counts >= 1")
    return tuple(dict.fromkeys(counts))  # first-appearance order, no repeats


def seeded_subset(dataset, max_images: int | None, seed: int):
    """The whole split in order, or `max_images` images drawn with the seed (kept in dataset order)."""
    from torch.utils.data import Subset

    if max_images is None or max_images >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_images]
    return Subset(dataset, sorted(chosen.tolist()))


def make_plan(
    module, step_counts: tuple[int, ...], num_samples: int, seed: int, sigmas_per_block: int
) -> tuple[Plan, list[str]]:
    """What this checkpoint can be diagnosed with, and a one-line note for every analysis it cannot run."""
    notes = []
    if not isinstance(module.model, dblock.NoisePartition):  # the end-to-end ViT has no noise ranges
        if step_counts or num_samples > 1:
            notes.append("a vit checkpoint has no sampler or blocks: only calibration applies "
                         "(--num_inference_steps and --num_samples are for dblock)")
        return Plan(is_dblock=False, step_counts=(), default_steps=None, num_samples=1, seed=seed, cfg_scale=0.0), notes
    model = module.model
    built = tuple(sorted(getattr(model, "owner", None) or model.built_blocks))
    sigmas = tuple(diagnostics.oracle_sigmas(model.boundaries, sigmas_per_block))
    if not module.covers_all_blocks:
        notes.append(f"this job holds blocks {list(built)} of {model.num_blocks}: the sampler needs every block, "
                     "so only "
                     "the blocks in isolation are measured (assemble the jobs with `main.py assemble` for the rest)")
        step_counts = ()
    else:
        step_counts = step_counts or (module.inference_steps,)
    plan = Plan(is_dblock=True, step_counts=step_counts, default_steps=module.inference_steps, num_samples=num_samples,
                seed=seed, cfg_scale=module.spec.sampler.cfg_scale, readout=module.objective.readout, sigmas=sigmas,
                oracle_blocks=built)
    return plan, notes


@dataclass(frozen=True)
class Request:
    """What diagnose measures, from its flags (the data and loader flags travel in the run's Configs)."""

    ckpt_path: str
    step_counts: tuple[int, ...]
    num_samples: int
    seed: int
    max_images: int | None
    sigmas_per_block: int
    output: str | None


def run(configs, request: Request, overrides: dict) -> dict:
    """Diagnose a checkpoint: load it, pass over the test split once, write diagnostics/ and print its tables."""
    from tqdm import tqdm

    from bench import resolve_device
    from experiment import module_from_checkpoint
    from hub.resolve import resolve_checkpoint
    from run import check_same_classes, make_datamodule

    ckpt, run_dir = resolve_checkpoint(request.ckpt_path)
    module = module_from_checkpoint(ckpt, request.ckpt_path, None, overrides)
    plan, notes = make_plan(module, request.step_counts, request.num_samples, request.seed, request.sigmas_per_block)
    target = output_folder(request.output, run_dir)
    dm = make_datamodule(configs, module.hparams.arch["image_size"], train=False)
    check_same_classes(dm, module, configs.run.data, request.ckpt_path)
    dm.setup("test")
    dm.test_set = seeded_subset(dm.test_set, request.max_images, request.seed)
    device = resolve_device(configs.run.accelerator)
    model = module.model.to(device).eval()
    with module.scored_weights(), tqdm(total=len(dm.test_set), desc="diagnose", unit="image", file=sys.stderr) as bar:
        collected = collect(model, dm.test_dataloader(), plan, device, bar.update)  # the weights `test` scores
    report = {
        "checkpoint": str(request.ckpt_path), "model_type": module.hparams.model_type, "data": configs.run.data,
        "seed": request.seed, "notes": notes, **summarise(collected, plan, model),
    }
    figures = write_report(target, report)
    print(diagnose_render.markdown(report))
    print(f"wrote {target}: diagnostics.json, diagnostics.md, {', '.join(figures)}")
    return report


def output_folder(output: str | None, run_dir: Path) -> Path:
    """--output, else diagnostics/ beside the checkpoint's metrics.json (created if missing)."""
    from errors import UserError

    if output is None:
        return run_dir / "diagnostics"
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise UserError(f"--output {output} is a file: give a folder")
    if not target.resolve().parent.is_dir():
        raise UserError(
            f"--output {output}: folder {target.resolve().parent} does not exist: create it or choose another"
        )
    return target


def write_report(target: Path, report: dict) -> list[str]:
    """diagnostics.json, diagnostics.md and the figures, all in place at once (an earlier folder is replaced whole)."""
    from fileio import replace_folder_atomic

    figures = diagnose_render.figures(report)

    def build(folder: Path) -> None:
        (folder / "diagnostics.json").write_text(json.dumps(report, indent=2) + "\n")
        (folder / "diagnostics.md").write_text(diagnose_render.markdown(report))
        for name, png in figures.items():
            (folder / name).write_bytes(png)

    replace_folder_atomic(target, build)
    return sorted(figures)


@torch.no_grad()
def own_range_accuracy(model, batches, seed: int, blocks: list[int]) -> dict[int, float]:
    """Each block's accuracy at the geometric midpoint of its own range, fed the true label state plus seeded noise:
    the blocks-in-isolation measurement that training logs as diag/block_acc_<b>."""
    generator = None
    correct: dict[int, float] = {}
    total = 0
    for images, labels in batches:
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(seed)
        target = model.clean_targets(labels).float()
        for b in blocks:
            sigma = diagnostics.range_midpoint(*edm.block_range(b, model.boundaries))
            z = target + sigma * torch.randn(target.shape, device=target.device, generator=generator)
            sigma_t = torch.full((len(labels),), sigma, device=images.device)
            _, logits = model.denoise_and_classify(images, z, sigma_t, b)
            correct[b] = correct.get(b, 0.0) + float((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return {b: c / max(total, 1) for b, c in correct.items()}
