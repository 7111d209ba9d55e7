"""Pictures of results: the attribution gallery and benchmark plots (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def to_rgb(img: torch.Tensor):
    """[3,H,W] in [-1,1] -> HxWx3 numpy in [0,1]."""
    return ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def ranked(scores: torch.Tensor, n_top: int, n_bottom: int) -> tuple[list[int], list[int]]:
    """Row indices of the n_top highest and n_bottom lowest scores (ties by index)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:n_top].tolist(), order[-n_bottom:].flip(0).tolist() if n_bottom else []


def gallery(
    rows: list[dict], images: torch.Tensor, describe, path, n_top: int = 10, n_bottom: int = 5
):
    """Write a PNG: each row is one (query, method) pair: the query image, its top-n_top and
    bottom-n_bottom training images with score and label.

    rows: dicts {"title": str, "query": [3,H,W], "scores": [N]}; images: [N,3,H,W] training images;
    describe(i) -> short label of training row i.
    """
    cols = 1 + n_top + (1 + n_bottom if n_bottom else 0)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(cols * 1.05, len(rows) * 1.45), squeeze=False
    )
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
            ax.set_title(f"{head}\n{label}", fontsize=5.5 if c else 6, pad=2)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def bar_plot(table: dict[str, dict[str, float]], title: str, path, ylabel: str = "P@10"):
    """Grouped bars: table[group][series] -> value. Written atomically as PNG."""
    groups = list(table)
    series = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups), 3.2))
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
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
