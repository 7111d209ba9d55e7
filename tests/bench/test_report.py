"""Pictures of results (bench/report.py, bench/demo.py's held-out plot): the gallery's titles and
captions in full, wrapped and never overlapping, the query framed and its region outlined; the
bar plot's error bars from the CIs and its legend off the bars; each PNG of the size drawn."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Rectangle
from PIL import Image

from ctrak_fast.bench.demo import heldout_plot
from ctrak_fast.bench.report import (
    CELL,
    DIVIDER,
    PAD,
    QUERY_COLOUR,
    bar_figure,
    bar_plot,
    gallery,
    gallery_figure,
)

LONG_TITLE = "held-out blue circle · concept-trak-cond: shape=circle " + "and more words " * 12
LONG_FILE = "a_training_image_file_name_far_longer_than_one_cell_0001.png"


def _rows(n_train: int = 12) -> tuple[list[dict], torch.Tensor]:
    images = torch.rand(n_train, 3, 8, 8) * 2 - 1
    region = [1, 2, 6, 7]
    rows = [
        {"title": LONG_TITLE, "query": images[0], "scores": torch.randn(n_train)},
        {"title": "short", "query": images[1], "scores": torch.randn(n_train), "region": region},
    ]
    return rows, images


def _describe(i: int) -> str:
    return LONG_FILE if i % 2 else f"red circle {i}"


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _pixels(fig) -> tuple[int, int]:
    """The PNG's size at save_figure's 110 dpi (Agg truncates the fraction of a pixel)."""
    w, h = fig.get_size_inches() * 110
    return int(w), int(h)


def test_gallery_writes_a_png_of_the_size_drawn(tmp_path):
    rows, images = _rows()
    path = gallery(rows, images, _describe, tmp_path / "g.png", n_top=4, n_bottom=2)
    fig = gallery_figure(rows, images, _describe, n_top=4, n_bottom=2)
    assert fig.get_size_inches()[0] == pytest.approx(7 * CELL + DIVIDER + 2 * PAD)
    with Image.open(path) as png:
        assert png.size == _pixels(fig)
    # Without the opposing tail: no divider column.
    fig = gallery_figure(rows, images, _describe, n_top=3, n_bottom=0)
    assert fig.get_size_inches()[0] == pytest.approx(4 * CELL + 2 * PAD)


def test_gallery_titles_and_captions_are_whole_and_wrapped():
    rows, images = _rows()
    fig = gallery_figure(rows, images, _describe, n_top=4, n_bottom=2)
    texts = [t.get_text() for t in fig.texts]
    # Every title reaches matplotlib whole (only line breaks added), the long one on 2+ lines.
    for row in rows:
        assert _squash(row["title"]) in {_squash(t) for t in texts}
    assert any(_squash(t) == _squash(LONG_TITLE) and "\n" in t for t in texts)
    # Each shown training image's label whole, the long file name broken over lines, not cut.
    assert sum(_squash(LONG_FILE) in _squash(t) for t in texts) >= 1
    long_captions = [t for t in texts if _squash(LONG_FILE) in _squash(t)]
    assert all(t.count("\n") >= 2 for t in long_captions)
    assert all("…" not in t and "..." not in t for t in texts)


def test_gallery_text_never_overlaps_text_or_images_and_stays_on_the_figure():
    rows, images = _rows()
    fig = gallery_figure(rows, images, _describe, n_top=4, n_bottom=2)
    renderer = FigureCanvasAgg(fig).get_renderer()
    page = fig.bbox
    boxes = [t.get_window_extent(renderer) for t in fig.texts if t.get_text()]
    pictures = [ax.get_window_extent(renderer) for ax in fig.axes if ax.images]
    # per row: the title, then the query's and the 6 ranked images' captions above them
    assert len(boxes) == 2 * (1 + 1 + 6) and len(pictures) == 2 * (1 + 6)
    for b in boxes:
        assert page.x0 <= b.x0 and b.x1 <= page.x1 and page.y0 <= b.y0 and b.y1 <= page.y1
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    for b, p in itertools.product(boxes, pictures):
        assert not b.overlaps(p), (b, p)


def test_gallery_frames_the_query_and_outlines_its_region():
    rows, images = _rows()
    fig = gallery_figure(rows, images, _describe, n_top=2, n_bottom=0)
    query_axes = [ax for ax in fig.axes if ax.axison]
    assert len(query_axes) == 2  # one framed query per row; the ranked images unframed
    for ax in query_axes:
        assert ax.spines["top"].get_linewidth() >= 2
        assert ax.spines["top"].get_edgecolor() == pytest.approx((0.12, 0.47, 0.71, 1), abs=0.01)
    assert QUERY_COLOUR == "tab:blue"
    boxes = [p for ax in query_axes for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 1  # only the second row named a region: x0, y0 = 1, 2; 5 x 5
    box = boxes[0]
    assert box.get_xy() == (0.5, 1.5) and (box.get_width(), box.get_height()) == (5, 5)


TABLE = {"shape": {"ours": 0.9, "d-trak": 0.1}, "colour": {"ours": 0.95, "d-trak": 0.8}}
CIS = {
    "shape": {"ours": (0.8, 1.0), "d-trak": (0.0, 0.25)},
    "colour": {"ours": (0.9, 1.0), "d-trak": (0.6, 0.9)},
}


def test_bar_plot_draws_the_cis_as_error_bars_and_the_legend_off_the_axes(tmp_path):
    fig = bar_figure(TABLE, "held-out P@10", intervals=CIS)
    ax = fig.axes[0]
    spans = sorted(
        (round(seg[0][1], 6), round(seg[1][1], 6))
        for c in ax.containers
        if isinstance(c, ErrorbarContainer)
        for seg in c.lines[2][0].get_segments()
    )
    assert spans == sorted({v for row in CIS.values() for v in row.values()})
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1
    path = bar_plot(TABLE, "held-out P@10", tmp_path / "b.png", intervals=CIS)
    with Image.open(path) as png:
        assert png.size == _pixels(fig)


def test_heldout_plot_reads_p10_and_its_ci_from_results(tmp_path):
    results = {
        "methods": {
            m: {"heldout": {f: {"p@10": TABLE[f][m], "p@10_ci": list(CIS[f][m])} for f in TABLE}}
            for m in ("ours", "d-trak")
        }
    }
    path = heldout_plot(results, tmp_path / "h.png")
    with Image.open(path) as png:
        assert png.size == _pixels(bar_figure(TABLE, "t", intervals=CIS))
