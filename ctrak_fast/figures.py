"""PNG figures on disk, written atomically: image rows (sample grids) and the helpers every
picture of the package uses. Training (judge evaluation, sample grids) and the benchmarks' reports
draw with them.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas: nothing here touches
pyplot's global state or backend, so importing it never changes a caller's matplotlib set-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ctrak_fast.engine.atomic import atomic_path


def save_figure(fig: Figure, path, dpi: int = 110) -> Path:
    """Write `fig` as PNG atomically (tmp + rename), creating the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def image_rows(rows: Sequence[torch.Tensor], labels: Sequence[str] | None, path) -> Path:
    """PNG of image rows: rows[r] is [n, 3, H, W] in [-1, 1], labelled on the left."""
    n = max(len(x) for x in rows)
    fig = Figure(figsize=(n * 0.8 + 1.8, len(rows) * 0.85))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for r, (ax, images) in enumerate(zip(axes, rows, strict=True)):
        tiles = [np.pad(to_rgb(im), ((1, 1), (1, 1), (0, 0)), constant_values=0.5) for im in images]
        ax.imshow(np.concatenate(tiles, 1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if labels:
            ax.set_ylabel(labels[r], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def to_rgb(img: torch.Tensor):
    """[3,H,W] in [-1,1] -> HxWx3 numpy in [0,1]."""
    return ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
