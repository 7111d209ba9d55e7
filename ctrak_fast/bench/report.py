"""Pictures of results: the attribution gallery and benchmark plots (PNG; sample grids are
:func:`ctrak_fast.figures.image_rows`).

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas: nothing here touches
pyplot's global state or backend, so importing it never changes a caller's matplotlib set-up.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ctrak_fast.figures import save_figure, text_height, to_rgb, wrap_text


def ranked(scores: torch.Tensor, n_top: int, n_bottom: int) -> tuple[list[int], list[int]]:
    """Row indices of the n_top highest and n_bottom lowest scores (ties by index)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:n_top].tolist(), order[-n_bottom:].flip(0).tolist() if n_bottom else []


# The gallery's layout, in inches and points: cells of one width, text wrapped to fit them and
# given the height its lines need, so no text is cut or overlaps another.
CELL = 1.3  # a column's width; the image is CELL - 2 * PAD square
PAD = 0.08
DIVIDER = 0.8  # the "most opposing" column
TITLE_PT, CAPTION_PT = 9.5, 7.5
QUERY_COLOUR, REGION_COLOUR = "tab:blue", "magenta"


def gallery(
    rows: list[dict[str, Any]],
    images: torch.Tensor,
    describe: Callable[[int], str],
    path: str | PathLike[str],
    n_top: int = 10,
    n_bottom: int = 5,
) -> Path:
    """Write a PNG: each row is one (query, method) pair: the query image, its top-n_top and
    bottom-n_bottom training images with score and label.

    rows: dicts {"title": str, "query": [3,H,W], "scores": [N]}, and "region" where the query
    named one (a box [x0, y0, x1, y1], or a mask's {"bbox": [...]}: outlined on the query);
    images: [N,3,H,W] training images; describe(i) -> short label of training row i.
    """
    return save_figure(gallery_figure(rows, images, describe, n_top, n_bottom), path)


def gallery_figure(
    rows: list[dict[str, Any]],
    images: torch.Tensor,
    describe: Callable[[int], str],
    n_top: int = 10,
    n_bottom: int = 5,
) -> Figure:
    """The figure of :func:`gallery`. Each row: its title in full across the figure, then the
    query (framed, its region outlined) and the ranked training images, each under a caption
    wrapped to its cell."""
    widths = [CELL] * (1 + n_top) + ([DIVIDER] + [CELL] * n_bottom if n_bottom else [])
    fig_w = sum(widths) + 2 * PAD
    laid = []
    for row in rows:
        top, bottom = ranked(row["scores"], n_top, n_bottom)
        head = "query" + (" (region outlined)" if row.get("region") is not None else "")
        cells: list[tuple[str, torch.Tensor] | None] = [(head, row["query"])]
        cells += [(f"+{row['scores'][i]:.2g}\n{describe(i)}", images[i]) for i in top]
        if n_bottom:
            cells.append(None)
            cells += [(f"{row['scores'][i]:.2g}\n{describe(i)}", images[i]) for i in bottom]
        captions = [wrap_text(c[0], CELL - PAD, CAPTION_PT) if c else "" for c in cells]
        title = wrap_text(row["title"], 0.85 * (fig_w - 2 * PAD), TITLE_PT)  # bold is wider
        laid.append((title, captions, cells))
    img = CELL - 2 * PAD
    bands = [
        (text_height(t, TITLE_PT), max(text_height(c, CAPTION_PT) for c in caps))
        for t, caps, _ in laid
    ]
    # A row, top down: PAD, title, PAD, captions, PAD, images, 2 PAD.
    fig_h = sum(t + c + img + 5 * PAD for t, c in bands)
    fig = Figure(figsize=(fig_w, fig_h))
    y = fig_h  # the top of the next band, in inches from the bottom
    for row, (title, captions, cells), (title_h, caption_h) in zip(rows, laid, bands, strict=True):
        y -= PAD
        fig.text(PAD / fig_w, y / fig_h, title, fontsize=TITLE_PT, weight="bold", va="top")
        y -= title_h + PAD
        image_y = y - caption_h - PAD - img
        x = PAD
        for c, (cell, text, w) in enumerate(zip(cells, captions, widths, strict=True)):
            ax = fig.add_axes(
                ((x + (w - img) / 2) / fig_w, image_y / fig_h, img / fig_w, img / fig_h)
            )
            x += w
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.axis("off")
                ax.text(0.5, 0.5, "most\nopposing\n→", ha="center", va="center", fontsize=8)
                continue
            ax.imshow(to_rgb(cell[1]), interpolation="nearest")
            fig.text(
                (x - w / 2) / fig_w, y / fig_h, text, fontsize=CAPTION_PT, ha="center", va="top"
            )
            if c == 0:
                ax.spines[:].set(color=QUERY_COLOUR, linewidth=3)
                if row.get("region") is not None:
                    outline_region(ax, row["region"])
            else:
                ax.axis("off")
        y = image_y - 2 * PAD
    return fig


def outline_region(ax: Axes, region: list[float] | dict[str, Any]) -> None:
    """Outline a query's region on its image axis: a box [x0, y0, x1, y1] in pixels (solid), or
    a mask's bounding box {"bbox": [...]} (dashed)."""
    from matplotlib.patches import Rectangle

    box, style = (region["bbox"], "--") if isinstance(region, dict) else (region, "-")
    x0, y0, x1, y1 = box
    ax.add_patch(
        Rectangle(
            (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=REGION_COLOUR, lw=1.2, ls=style
        )
    )


def bar_plot(
    table: dict[str, dict[str, float]],
    title: str,
    path: str | PathLike[str],
    ylabel: str = "P@10",
    intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> Path:
    """Grouped bars: table[group][series] -> value, with error bars from intervals[group][series]
    -> (low, high) where given (a 95% CI). The legend sits right of the axes, never on a bar.
    Written atomically as PNG."""
    return save_figure(bar_figure(table, title, ylabel, intervals), path)


def bar_figure(
    table: dict[str, dict[str, float]],
    title: str,
    ylabel: str = "P@10",
    intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> Figure:
    """The figure of :func:`bar_plot`."""
    groups = list(table)
    series = list(next(iter(table.values())))
    fig = Figure(figsize=(3.4 + 1.2 * len(groups), 3.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        values = [table[g][s] for g in groups]
        errors = None
        if intervals is not None:  # matplotlib's yerr: distances below and above each bar
            lows, highs = zip(*(intervals[g][s] for g in groups), strict=True)
            errors = [
                [v - lo for v, lo in zip(values, lows, strict=True)],
                [hi - v for v, hi in zip(values, highs, strict=True)],
            ]
        ax.bar(xs, values, width, label=s, yerr=errors, capsize=2, ecolor="0.2")
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_title(wrap_text(title, 1.2 * len(groups) + 1.5, 10), fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    note = "\nerror bars: 95% CI" if intervals is not None else ""
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=f"method{note}",
               title_fontsize=8)  # fmt: skip
    return fig
