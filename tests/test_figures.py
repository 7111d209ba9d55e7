"""PNG figures (figures.py): labels wrapped whole, never cut; rows as tall as their labels; the
PNG of the size drawn."""

from __future__ import annotations

import re

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from ctrak_fast.figures import image_rows, image_rows_figure, text_height, wrap_text


def test_wrap_text_keeps_every_character_and_fits_the_width():
    text = "a prompt about a red circle " * 6 + "and_a_file_name_longer_than_any_line.png"
    wrapped = wrap_text(text, 1.0, 8)
    assert re.sub(r"\s", "", wrapped) == re.sub(r"\s", "", text)
    assert max(len(line) for line in wrapped.split("\n")) <= int(72 / (0.62 * 8))
    assert wrap_text("one\ntwo", 5, 8) == "one\ntwo"  # explicit breaks kept
    assert text_height("one\ntwo", 10) == 2 * 1.2 * 10 / 72


def test_image_rows_labels_whole_inside_the_figure_and_the_png_size(tmp_path):
    rows = [torch.rand(3, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1]
    labels = ["a red circle on a long prompt that needs several lines to be read " * 2, "blue"]
    fig = image_rows_figure(rows, labels)
    shown = [t.get_text() for t in fig.texts]
    assert [re.sub(r"\s", "", s) for s in shown] == [re.sub(r"\s", "", s) for s in labels]
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.texts]
    pictures = [ax.get_window_extent(renderer) for ax in fig.axes]
    assert not boxes[0].overlaps(boxes[1])
    assert not any(b.overlaps(p) for b in boxes for p in pictures)
    assert all(fig.bbox.x0 <= b.x0 and fig.bbox.y0 <= b.y0 and b.y1 <= fig.bbox.y1 for b in boxes)
    path = image_rows(rows, labels, tmp_path / "rows.png")
    w, h = fig.get_size_inches() * 110
    with Image.open(path) as png:
        assert png.size == (int(w), int(h))
