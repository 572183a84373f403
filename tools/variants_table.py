"""The table of docs/variants.md from tools/variants.sh's run folders: each run's final test accuracy and the
`main.py diagnose` figures that explain it. Usage: python tools/variants_table.py PREFIX RUN_FOLDER...
(folders named <PREFIX>-<variant>-s<seed>, each with metrics.json and diagnostics/diagnostics.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SAMPLER_STEPS = 3  # the sampler the table reads: one step per block (B = 3)


def own_range_accuracy(blocks: dict) -> list[float]:
    """Each block's mean accuracy over the grid's sigmas inside its own noise range (fed the true label state)."""
    per_block: dict[int, list[float]] = {}
    for row in blocks["rows"]:
        if row["in_own_range"]:
            per_block.setdefault(row["block"], []).append(row["accuracy"])
    return [sum(a) / len(a) for _, a in sorted(per_block.items())]


def row(prefix: str, folder: Path) -> list[str]:
    """One table row: variant, seed, test %, sampler %, step-1 %, flips at step 2, blocks' accuracies, ECE."""
    variant, seed = folder.name.removeprefix(f"{prefix}-").rsplit("-s", 1)
    test = json.loads((folder / "metrics.json").read_text())["test/acc"]
    diag = json.loads((folder / "diagnostics" / "diagnostics.json").read_text())
    sampler = next(s for s in diag["sampler"] if s["num_inference_steps"] == SAMPLER_STEPS)
    first, second = sampler["trajectory"][0], sampler["trajectory"][1]
    blocks = [f"{100 * a:.1f}" for a in own_range_accuracy(diag["blocks"])]
    return [variant, seed, f"{100 * test:.1f}", f"{100 * sampler['accuracy']:.1f}", f"{100 * first['accuracy']:.1f}",
            f"{second['wrong_to_right']} / {second['right_to_wrong']}", *blocks, f"{diag['calibration']['ece']:.3f}"]


LEADING_COLUMNS = ["variant", "seed", "test %", f"{SAMPLER_STEPS}-step sampler %", "step 1 %", "flips at step 2"]


def main(prefix: str, folders: list[str]) -> None:
    rows = [row(prefix, Path(f)) for f in folders]
    num_blocks = len(rows[0]) - len(LEADING_COLUMNS) - 1  # the block columns sit between these and the ECE
    header = [*LEADING_COLUMNS, *(f"block {b}" for b in range(num_blocks)), "ECE"]
    for cells in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
