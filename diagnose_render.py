"""Figures of `main.py diagnose`, drawn from the diagnostics dictionary alone (so they can be redrawn from the JSON)."""

from __future__ import annotations

import plotting

PERCENT = 100.0


def new_figure(width: float, height: float, panels: int = 1):
    """A figure with `panels` side-by-side axes."""
    fig = plotting.new_figure(width, height)
    axes = fig.subplots(1, panels)
    return fig, ([axes] if panels == 1 else list(axes))


def trajectory_figure(sampler: list[dict]):
    """Accuracy and mean top-1 confidence against sampler step, one line per number of inference steps."""
    fig, (ax_acc, ax_conf) = new_figure(11, 4.2, 2)
    for run in sampler:
        rows = run["trajectory"]
        steps = [r["step"] + 1 for r in rows]
        label = f"{run['num_inference_steps']} steps"
        ax_acc.plot(steps, [PERCENT * r["accuracy"] for r in rows], marker="o", label=label)
        ax_conf.plot(steps, [PERCENT * r["confidence"] for r in rows], marker="o", label=label)
    ax_acc.set(xlabel="sampler step (denoiser call)", ylabel="accuracy (%)", title="Accuracy of each step's prediction")
    ax_conf.set(xlabel="sampler step (denoiser call)", ylabel="mean top-1 confidence (%)", title="Confidence")
    for ax in (ax_acc, ax_conf):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def blocks_figure(blocks: dict):
    """Each block fed the true label state at every noise level: accuracy (left) and denoising error (right).

    The shaded band of a block's colour is the range it denoises at inference; dotted lines are the boundaries.
    """
    fig, (ax_acc, ax_err) = new_figure(12, 4.4, 2)
    colours = plotting.block_colours(len(blocks["ranges"]))
    for b, colour in enumerate(colours):
        rows = [r for r in blocks["rows"] if r["block"] == b]
        sigmas = [r["sigma"] for r in rows]
        ax_acc.plot(sigmas, [PERCENT * r["accuracy"] for r in rows], marker="o", ms=3, color=colour, label=f"block {b}")
        ax_err.plot(sigmas, [r["denoising_mse"] for r in rows], marker="o", ms=3, color=colour, label=f"block {b}")
        lo, hi = blocks["ranges"][b]
        for ax in (ax_acc, ax_err):
            ax.axvspan(lo, hi, color=colour, alpha=0.10, lw=0)
    if "sampler_accuracy" in blocks:
        ax_acc.axhline(PERCENT * blocks["image_only_accuracy"], color="gray", ls=":", lw=1,
                       label="sampler's first step (image only)")
        ax_acc.axhline(PERCENT * blocks["sampler_accuracy"], color="gray", ls="--", lw=1, label="full sampler")
    for ax in (ax_acc, ax_err):
        for boundary in blocks["boundaries"][1:-1]:  # the inner ones: the ends are sigma_min and sigma_max
            ax.axvline(boundary, color="black", ls=":", lw=1)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_err.set_yscale("log")
    ax_acc.set(xlabel="noise level sigma", ylabel="accuracy (%)",
               title="Blocks in isolation: accuracy from z = y + sigma eps")
    ax_err.set(xlabel="noise level sigma", ylabel="mean ||D_x - y||^2", title="Denoising error of D_x")
    return fig


def reliability_figure(calibration: dict):
    """Reliability diagram: accuracy per confidence bin against the diagonal, image counts as bar shading."""
    fig, (ax,) = new_figure(5, 4.6)
    bins = [b for b in calibration["bins"] if b["count"]]
    total = sum(b["count"] for b in bins)
    width = calibration["bins"][0]["hi"] - calibration["bins"][0]["lo"]
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", edgecolor="black",
           color=[(0.2, 0.4, 0.8, 0.25 + 0.75 * b["count"] / total) for b in bins], label="accuracy in bin")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 confidence", ylabel="accuracy",
           title=f"ECE {calibration['ece']:.3f}, NLL {calibration['nll']:.3f}, Brier {calibration['brier']:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def cost_figure(sampler: list[dict], forward_ms: float | None):
    """Accuracy against milliseconds per image, one point per number of inference steps."""
    fig, (ax,) = new_figure(5.5, 4.2)
    xs = [run["ms_per_image"] for run in sampler]
    ys = [PERCENT * run["accuracy"] for run in sampler]
    ax.plot(xs, ys, marker="o")
    for run, x, y in zip(sampler, xs, ys):
        ax.annotate(f"{run['num_inference_steps']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if forward_ms is not None:
        ax.axvline(forward_ms, color="gray", ls=":", lw=1, label="one network call")
        ax.legend(fontsize=8)
    ax.set(xlabel="sampler ms per image", ylabel="accuracy (%)", title="Accuracy against cost (labels: steps)")
    ax.grid(alpha=0.3)
    return fig


def figures(report: dict) -> dict[str, bytes]:
    """File name -> PNG bytes for every figure the diagnostics hold data for."""
    out = {}
    if "calibration" in report:
        out["reliability.png"] = plotting.render_png(reliability_figure(report["calibration"]))
    if report.get("sampler"):
        out["trajectory.png"] = plotting.render_png(trajectory_figure(report["sampler"]))
        out["cost.png"] = plotting.render_png(cost_figure(report["sampler"], report.get("forward_ms_per_image")))
    if report.get("blocks"):
        out["blocks.png"] = plotting.render_png(blocks_figure(report["blocks"]))
    return out


# ---- Markdown -------------------------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns, readable as plain text too."""
    cells = [header, *[[str(c).replace("|", "\\|") for c in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals; blank when absent."""
    return "" if value is None else f"{PERCENT * value:.2f}"


def count(value: int | None) -> str:
    return "" if value is None else str(value)


def calibration_section(cal: dict) -> str:
    steps = f" (sampler with {cal['num_inference_steps']} steps)" if "num_inference_steps" in cal else ""
    table = markdown_table(["accuracy %", "ECE (15 bins)", "NLL", "Brier"],
                           [[pct(cal["accuracy"]), f"{cal['ece']:.4f}", f"{cal['nll']:.4f}", f"{cal['brier']:.4f}"]])
    return f"## Calibration of the final predictions{steps}\n\n{table}"


def sampler_section(sampler: list[dict], forward_ms: float) -> str:
    summary = markdown_table(
        ["inference steps", "accuracy %", "sampler ms / image"],
        [[str(r["num_inference_steps"]), pct(r["accuracy"]), f"{r['ms_per_image']:.3f}"] for r in sampler],
    )
    parts = [f"## Sampler: accuracy and cost\n\nOne network call: {forward_ms:.3f} ms / image.\n\n{summary}"]
    for run in sampler:
        rows = [[str(r["step"] + 1), str(r["block"]), f"{r['sigma']:.4g}", pct(r["accuracy"]), pct(r["confidence"]),
                 pct(r["p_true"]), f"{r['nll']:.4f}", f"{r['entropy']:.4f}", pct(r["agreement_with_final"]),
                 count(r["wrong_to_right"]), count(r["right_to_wrong"])] for r in run["trajectory"]]
        table = markdown_table(["step", "block", "sigma", "acc %", "confidence %", "p(true) %", "NLL", "entropy",
                                "agrees with final %", "wrong->right", "right->wrong"], rows)
        parts.append(f"### Trajectory, {run['num_inference_steps']} steps\n\n{table}")
    return "\n\n".join(parts)


def blocks_section(blocks: dict) -> str:
    num_blocks = len(blocks["ranges"])
    by_key = {(r["block"], r["sigma"]): r for r in blocks["rows"]}
    built = sorted({r["block"] for r in blocks["rows"]})
    rows = []
    for sigma in blocks["sigmas"]:
        owner = next(b for b, (lo, hi) in enumerate(blocks["ranges"]) if lo <= sigma <= hi)
        cells = [f"{sigma:.4g}", str(owner)]
        for b in built:
            r = by_key[(b, sigma)]
            mark = "*" if r["in_own_range"] else ""
            cells.append(f"{pct(r['accuracy'])}{mark} / {r['ce']:.3f} / {r['denoising_mse']:.4f}")
        rows.append(cells)
    header = ["sigma", "owner", *[f"block {b}: acc % / CE / mse" for b in built]]
    ranges = ", ".join(f"block {b} [{lo:.4g}, {hi:.4g}]" for b, (lo, hi) in enumerate(blocks["ranges"]))
    note = (f"Each block is fed z = y + sigma eps (y the true class's normalised embedding) at every sigma. "
            f"`*` marks sigmas inside the block's own range ({ranges}); {num_blocks} blocks.")
    return f"## Blocks in isolation\n\n{note}\n\n{markdown_table(header, rows)}"


def ensemble_section(ensemble: dict) -> str:
    rows = [[str(r["samples"]), pct(r["accuracy_mean_probs"]), pct(r["accuracy_mean_logits"]),
             pct(r["accuracy_single_draw"])]
            for r in ensemble["rows"]]
    header = ["noise draws k", "acc % (mean probabilities)", "acc % (mean logits)", "acc % (draw k alone)"]
    table = markdown_table(header, rows)
    return f"## Noise-draw ensembles ({ensemble['num_inference_steps']} steps)\n\n{table}"


def markdown(report: dict) -> str:
    """diagnostics.md: the tables of every analysis the report holds, and its notes."""
    head = (f"# Diagnostics of {report['checkpoint']}\n\n{report['model_type']} on {report['data']}, "
            f"{report['num_images']} test images, seed {report['seed']}.")
    parts = [head, *([calibration_section(report["calibration"])] if "calibration" in report else [])]
    if report.get("sampler"):
        parts.append(sampler_section(report["sampler"], report["forward_ms_per_image"]))
    if report.get("blocks"):
        parts.append(blocks_section(report["blocks"]))
    if report.get("ensemble"):
        parts.append(ensemble_section(report["ensemble"]))
    parts += [f"Note: {note}" for note in report.get("notes", [])]
    return "\n\n".join(parts) + "\n"
