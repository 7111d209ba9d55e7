"""An uncaptioned mark: a small glyph (a watermark, a logo) stamped on part of a training set.

The mark is independent of the factors and never captioned; its position varies over the whole
image, its size and tint jitter a little, so that no fixed region of pixels finds it. What an
image shows of it is recorded beside the image (`marked`, `boxes`): the ground truth of a
benchmark that asks "which training images taught the model to draw this mark?".
"""

from __future__ import annotations

import torch

# An "x" in a ring's corners: unlike every shape of the synthetic set (circle, square, triangle,
# plus-shaped cross), and legible at 3 pixels.
GLYPH = torch.tensor(
    [
        [1, 0, 0, 0, 1],
        [0, 1, 0, 1, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 0, 1, 0],
        [1, 0, 0, 0, 1],
    ],
    dtype=torch.float32,
)
SIZES = (3, 4, 5)  # pixels on a side, drawn per image
GREY = (-1.0, -0.6)  # the mark's tint in [-1, 1] pixels: near black, jittered
ALPHA = (0.75, 1.0)  # its opacity, jittered


def glyph(size: int) -> torch.Tensor:
    """The glyph as a [size, size] mask in [0, 1] (area resampling of GLYPH)."""
    g = torch.nn.functional.interpolate(GLYPH[None, None], size=(size, size), mode="area")
    return (g[0, 0] / g.max()).clamp(0, 1)


def stamp_marks(
    images: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp the mark on round(fraction * N) of `images` [N, 3, H, W] in [-1, 1].

    Returns (stamped images [N, 3, H, W], marked bool [N], boxes int64 [N, 4]: (x0, y0, x1, y1)
    of each mark, -1 where none). A deterministic function of (images, fraction, seed).

    Examples:
        >>> x, marked, boxes = stamp_marks(torch.ones(4, 3, 16, 16), 0.5, seed=0)
        >>> int(marked.sum()), bool((x[~marked] == 1).all()), bool((x[marked] < 1).any())
        (2, True, True)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the marked fraction must be in [0, 1], got {fraction}")
    n, _, h, w = images.shape
    gen = torch.Generator().manual_seed(int(seed) * 104729 + 0x3A7)
    rows = torch.randperm(n, generator=gen)[: round(fraction * n)]
    out = images.clone()
    marked = torch.zeros(n, dtype=torch.bool)
    boxes = torch.full((n, 4), -1, dtype=torch.int64)
    for i in sorted(rows.tolist()):
        size = SIZES[int(torch.randint(len(SIZES), (1,), generator=gen))]
        x0 = int(torch.randint(w - size + 1, (1,), generator=gen))
        y0 = int(torch.randint(h - size + 1, (1,), generator=gen))
        grey = GREY[0] + (GREY[1] - GREY[0]) * float(torch.rand((), generator=gen))
        alpha = ALPHA[0] + (ALPHA[1] - ALPHA[0]) * float(torch.rand((), generator=gen))
        a = alpha * glyph(size)
        patch = out[i, :, y0 : y0 + size, x0 : x0 + size]
        out[i, :, y0 : y0 + size, x0 : x0 + size] = (1 - a) * patch + a * grey
        marked[i] = True
        boxes[i] = torch.tensor([x0, y0, x0 + size, y0 + size])
    return out, marked, boxes


__all__ = ["GLYPH", "glyph", "stamp_marks"]
