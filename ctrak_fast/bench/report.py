"""Pictures of results: the attribution gallery and benchmark plots (PNG; sample grids are
:func:`ctrak_fast.figures.image_rows`).

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas: nothing here touches
pyplot's global state or backend, so importing it never changes a caller's matplotlib set-up.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from ctrak_fast.figures import save_figure, to_rgb


def ranked(scores: torch.Tensor, n_top: int, n_bottom: int) -> tuple[list[int], list[int]]:
    """Row indices of the n_top highest and n_bottom lowest scores (ties by index)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:n_top].tolist(), order[-n_bottom:].flip(0).tolist() if n_bottom else []


def gallery(
    rows: list[dict], images: torch.Tensor, describe, path, n_top: int = 10, n_bottom: int = 5
):
    """Write a PNG: each row is one (query, method) pair: the query image, its top-n_top and
    bottom-n_bottom training images with score and label.

    rows: dicts {"title": str, "query": [3,H,W], "scores": [N]}, and "region" where the query
    named one (a box [x0, y0, x1, y1], or a mask's {"bbox": [...]}: outlined on the query);
    images: [N,3,H,W] training images; describe(i) -> short label of training row i.
    """
    cols = 1 + n_top + (1 + n_bottom if n_bottom else 0)
    fig = Figure(figsize=(cols * 1.05, len(rows) * 1.45))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, row in enumerate(rows):
        top, bottom = ranked(row["scores"], n_top, n_bottom)
        cells = [("query", row["query"], row["title"])]
        cells += [(f"+{row['scores'][i]:.2g}", images[i], describe(i)) for i in top]
        if n_bottom:
            cells.append(None)
            cells += [(f"{row['scores'][i]:.2g}", images[i], describe(i)) for i in bottom]
        for c, cell in enumerate(cells):
            ax = axes[r, c]
            ax.axis("off")
            if cell is None:
                ax.text(0.5, 0.5, "most\nopposing\n→", ha="center", va="center", fontsize=7)
                continue
            head, img, label = cell
            ax.imshow(to_rgb(img), interpolation="nearest")
            if c == 0 and row.get("region") is not None:
                outline_region(ax, row["region"])
            ax.set_title(f"{head}\n{label}", fontsize=5.5 if c else 6, pad=2)
    fig.tight_layout(pad=0.3)
    return save_figure(fig, path)


def outline_region(ax, region) -> None:
    """Outline a query's region on its image axis: a box [x0, y0, x1, y1] in pixels (solid), or
    a mask's bounding box {"bbox": [...]} (dashed)."""
    from matplotlib.patches import Rectangle

    box, style = (region["bbox"], "--") if isinstance(region, dict) else (region, "-")
    x0, y0, x1, y1 = box
    ax.add_patch(
        Rectangle(
            (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="magenta", lw=1.2, ls=style
        )
    )


def bar_plot(table: dict[str, dict[str, float]], title: str, path, ylabel: str = "P@10"):
    """Grouped bars: table[group][series] -> value. Written atomically as PNG."""
    groups = list(table)
    series = list(next(iter(table.values())))
    fig = Figure(figsize=(1.2 + 1.1 * len(groups), 3.2))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [table[g][s] for g in groups], width, label=s)
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)
