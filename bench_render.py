"""`main.py bench DATA`, the rendering half: the measured report as a table (stdout) and a PNG chart."""

from __future__ import annotations

from bench import ALL_VARIANTS, COMPONENTS, MIB, RATIO_VARIANT


def measured(report: dict) -> list[str]:
    """The variants the report holds, in the table's order."""
    return [name for name in ALL_VARIANTS if name in report]


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


def ops_note(report: dict) -> str:
    """What ops/step counts, and under --compile how many compiled-graph calls each step makes."""
    note = "ops/step: outermost aten operators the host dispatches in one training step (torch.profiler)"
    if not report["config"]["compile"]:
        return note
    calls = ", ".join(f"{name} {report[name]['compiled_graph_calls_per_step']}" for name in measured(report))
    return f"{note}; a compiled graph's fused kernels are not aten operators: compiled-graph calls per step {calls}"


def format_report(report: dict) -> str:
    """The human-readable table: one row per variant, then the loader and the ratios against the targets."""
    c = report["config"]
    header = (
        f"{'variant':<24}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'peak':>9}"
        f"{'train s':>10}{'infer s':>10}{'train img/s':>13}{'infer img/s':>13}{'ops/step':>10}"
    )
    lines = [
        f"bench {c['data']}: batch {c['batch_size']}, B={c['num_blocks']}{layout_note(c)}{job_note(c)}, "
        f"precision {c['precision']}"
        f"{', compiled' if c['compile'] else ''}; hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_attention_heads']} heads, MLP {c['intermediate_size']}, patch {c['patch_size']}, "
        f"{c['image_size']} px, "
        f"{c['num_labels']} classes",
        f"device: {report['device']}; torch {report['versions']['torch']}; {report['date']}",
        f"memory method: {report['method']} (MiB; peak = worst block for dblock)",
        "",
        header,
        "-" * len(header),
    ]
    for name in measured(report):
        r = report[name]
        mib = [r["breakdown"][k] / MIB for k in COMPONENTS] + [r["peak_memory_bytes"] / MIB]
        lines.append(
            f"{name:<24}" + "".join(f"{x:>9.1f}" for x in mib)
            + f"{r['train_step_s']:>10.4f}{optional(r['infer_step_s'], 10, '.4f')}{r['train_images_per_s']:>13.1f}"
            + optional(r["infer_images_per_s"], 13, ".1f") + f"{r['ops_per_step']:>10,}"
        )
    counts = ", ".join(f"{name} {report[name]['num_parameters']:,}" for name in measured(report))
    fastest = report["fastest_train_variant"]
    verdict = "SLOWER than" if report["loader_slower_than_training"] else "keeps up with"
    lines += [
        "-" * len(header),
        f"parameters: {counts}",
        ops_note(report),
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
    names = measured(report)
    bottom = [0.0] * len(names)
    for component in COMPONENTS:
        heights = [report[n]["breakdown"][component] / MIB for n in names]
        ax.bar(names, heights, bottom=bottom, label=component)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, n in enumerate(names):
        ax.annotate(f"{report[n]['peak_memory_bytes'] / MIB:.0f}", (i, bottom[i]), ha="center", va="bottom")
    c = report["config"]
    ax.set_ylabel("MiB")
    method = report["method"].split(":")[0]
    blocks = f"B={c['num_blocks']}{layout_note(c)}"
    title = f"Training-step memory, {c['data']}, batch {c['batch_size']}, {blocks} ({method})"
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.savefig(f, format="png", dpi=120)


def format_overhead(report: dict) -> str:
    """`bench --overhead`'s table: ops and host time per step of every variant at each size, then the targets."""
    header = f"{'variant':<20}{'aten ops/step':>15}{'host ms/step':>14}  round medians (ms)"
    lines = [f"bench --overhead: device {report['device']}; torch {report['versions']['torch']}; {report['date']}",
             f"method: {report['method']}"]
    for size, s in report["sizes"].items():
        c = s["config"]
        lines += [
            "",
            f"{size}: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, "
            f"MLP {c['intermediate_size']}, patch {c['patch_size']}, B={c['num_blocks']}, batch {c['batch_size']}; "
            f"{c['rounds']} rounds of {c['steps_per_round']} steps",
            header, "-" * len(header),
        ]
        for name, v in s["variants"].items():
            rounds = " ".join(f"{m:.2f}" for m in v["round_medians_ms"])
            lines.append(f"{name:<20}{v['ops_per_step']:>15.1f}{v['host_ms_per_step']:>14.2f}  {rounds}")
        for target, t in s["targets"].items():
            lines.append(f"target {target}: {t['value']:.3f} (max {t['max']}) {'PASS' if t['pass'] else 'FAIL'}")
    lines.append(f"overall: {'PASS' if report['pass'] else 'FAIL'}")
    return "\n".join(lines)
