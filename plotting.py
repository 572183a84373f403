"""What every figure of this program shares: block colours, smoothing, PNG rendering (no pyplot, no global state)."""

from __future__ import annotations

import io


def new_figure(width: float, height: float):
    """A constrained-layout matplotlib Figure (Agg renders it; pyplot's global backend state is never touched)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def block_colours(num_blocks: int) -> list:
    """One colour per block from a sequential map: block 0 (highest noise) darkest, the last block lightest."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(b / max(num_blocks - 1, 1) * 0.85) for b in range(num_blocks)]


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (fewer at the start), so a noisy curve's trend shows."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def render_png(fig) -> bytes:
    """The figure as PNG bytes, rendered before any file is written."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
