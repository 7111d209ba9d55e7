"""PNG figures on disk, written atomically: image rows (sample grids) and the helpers every
picture of the package uses. Training (judge evaluation, sample grids) and the benchmarks' reports
draw with them.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas: nothing here touches
pyplot's global state or backend, so importing it never changes a caller's matplotlib set-up.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ctrak_fast.engine.atomic import atomic_path

# An upper bound on a DejaVu Sans character's width, in ems: text wrapped to width / (this *
# fontsize) characters fits the width (an average character is about 0.55 em).
CHAR_EM = 0.62
LINE_SPACING = 1.2  # matplotlib's default, in font sizes per line


def wrap_text(text: str, width_in: float, fontsize: float) -> str:
    """`text` wrapped to fit `width_in` inches at `fontsize` points: every word kept (a word
    longer than a line is broken, never cut), explicit newlines kept."""
    chars = max(4, int(width_in * 72 / (CHAR_EM * fontsize)))
    return "\n".join(
        "\n".join(textwrap.wrap(part, chars, break_on_hyphens=False)) or ""
        for part in text.split("\n")
    )


def text_height(text: str, fontsize: float) -> float:
    """Inches that `text` takes on the figure, one line per newline."""
    return (text.count("\n") + 1) * LINE_SPACING * fontsize / 72


def save_figure(fig: Figure, path: str | PathLike[str], dpi: int = 110) -> Path:
    """Write `fig` as PNG atomically (tmp + rename), creating the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def image_rows(
    rows: Sequence[torch.Tensor], labels: Sequence[str] | None, path: str | PathLike[str]
) -> Path:
    """PNG of image rows: rows[r] is [n, 3, H, W] in [-1, 1], labelled on the left."""
    return save_figure(image_rows_figure(rows, labels), path)


def image_rows_figure(rows: Sequence[torch.Tensor], labels: Sequence[str] | None) -> Figure:
    """The figure of :func:`image_rows`, laid out by hand: 0.8-inch tiles right of a 1.8-inch
    margin that holds each label, wrapped whole; a row is as tall as its label needs."""
    tile, margin, pad, label_pt = 0.8, 1.8, 0.05, 8
    n = max(len(x) for x in rows)
    wrapped = [
        wrap_text(label, margin - 2 * pad, label_pt) for label in labels or ["" for _ in rows]
    ]
    heights = [max(tile, text_height(w, label_pt)) + 2 * pad for w in wrapped]
    fig_w, fig_h = margin + n * tile + pad, sum(heights)
    fig = Figure(figsize=(fig_w, fig_h))
    top = fig_h
    for images, label, h in zip(rows, wrapped, heights, strict=True):
        centre = top - h / 2
        ax = fig.add_axes(
            (margin / fig_w, (centre - tile / 2) / fig_h, len(images) * tile / fig_w, tile / fig_h)
        )
        tiles = [np.pad(to_rgb(im), ((1, 1), (1, 1), (0, 0)), constant_values=0.5) for im in images]
        ax.imshow(np.concatenate(tiles, 1), interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        ax.set_yticks([])
        if label:
            fig.text((margin - pad) / fig_w, centre / fig_h, label, fontsize=label_pt,
                     ha="right", va="center")  # fmt: skip
        top -= h
    return fig


def to_rgb(img: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [-1,1] -> HxWx3 numpy in [0,1]."""
    return ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
