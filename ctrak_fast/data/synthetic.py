"""Procedural concept images: one coloured shape on a white background.

Factors are shape x colour; position, size and rotation are random nuisances. Shapes are rasterised
as analytic masks on a 4x supersampled grid and box-downsampled, so edges are anti-aliased and the
same seed gives bit-identical images on any machine (numpy PCG64, float64 arithmetic).

A Latin-square transversal of (shape, colour) pairs is held out of the training set: every shape
and every colour is seen in training, but some combinations never are, which is what concept-level
attribution is tested on (METHOD.md §9).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctrak_fast.engine.atomic import atomic_write_text

from .dataset import ConceptDataset, drop_captions
from .marks import stamp_marks

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Saturated, well separated in RGB (yellow is darkened slightly to stay visible on white).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.80, 0.05),
    "magenta": (0.85, 0.15, 0.85),
    "cyan": (0.05, 0.75, 0.85),
}
BACKGROUND = (1.0, 1.0, 1.0)
SUPERSAMPLE = 4
# Nuisance ranges, in units of the half image width ([-1, 1] coordinates).
SIZE_RANGE = (0.50, 0.80)  # shape "radius"
MAX_ROTATION_DEG = 25.0  # small enough that a square never turns into a diamond
OUTLINE = 0.3  # outline width as a fraction of the shape's size (a 16x16 image needs a thick one)


@dataclass
class SyntheticConfig:
    """Everything that determines a synthetic dataset (saved as JSON next to the model).

    heldout: explicit (shape_idx, colour_idx) pairs; None -> `n_heldout` pairs drawn from `seed`.
    """

    image_size: int = 16
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    per_combo: int = 250
    n_heldout: int = 2
    heldout: list[tuple[int, int]] | None = None
    seed: int = 0
    outline: bool = False  # a black outline around the shape (the paper's synthetic images)
    # Incomplete captions: each factor's caption is dropped (the model is told its null token)
    # for this fraction of the training images, drawn per factor from `seed`. The images still
    # show the value: `labels` keep the truth, `captions` what the model was told.
    caption_drop: float = 0.0
    # An uncaptioned mark (data/marks.py) stamped on this fraction of the training images; the
    # dataset's `marks` record where (the truth), no caption ever names it.
    mark_fraction: float = 0.0
    factors: tuple[str, ...] = field(default=("shape", "colour"), init=False)

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        self.colours = tuple(self.colours)
        unknown = [s for s in self.shapes if s not in SHAPES] + [
            c for c in self.colours if c not in COLOURS
        ]
        if unknown:
            raise ValueError(f"unknown shapes/colours {unknown}; known: {SHAPES}, {tuple(COLOURS)}")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")
        if not 0.0 <= self.caption_drop < 1.0:
            raise ValueError(f"caption_drop must be in [0, 1), got {self.caption_drop}")
        if not 0.0 <= self.mark_fraction <= 1.0:
            raise ValueError(f"mark_fraction must be in [0, 1], got {self.mark_fraction}")
        if self.heldout is None:
            self.heldout = latin_heldout(
                len(self.shapes), len(self.colours), self.n_heldout, self.seed
            )
        self.heldout = [(int(s), int(c)) for s, c in self.heldout]
        self.n_heldout = len(self.heldout)
        _check_latin(self.heldout, len(self.shapes), len(self.colours))

    @property
    def values(self) -> dict[str, list[str]]:
        return {"shape": list(self.shapes), "colour": list(self.colours)}

    def combos(self, which: str = "all") -> list[tuple[int, int]]:
        """(shape_idx, colour_idx) pairs: 'all', 'seen' (in training) or 'heldout'."""
        every = [(s, c) for s in range(len(self.shapes)) for c in range(len(self.colours))]
        held = set(self.heldout)
        if which == "all":
            return every
        if which == "seen":
            return [p for p in every if p not in held]
        if which == "heldout":
            return sorted(held)
        raise ValueError(f"which must be 'all', 'seen' or 'heldout', got {which!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("factors")
        d["shapes"], d["colours"] = list(self.shapes), list(self.colours)
        d["heldout"] = [list(p) for p in self.heldout]
        for key in ("caption_drop", "mark_fraction"):  # configs without stay as they were written
            if not d[key]:
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticConfig:
        d = dict(d)
        d.pop("factors", None)
        if d.get("heldout") is not None:
            d["heldout"] = [tuple(p) for p in d["heldout"]]
        return cls(**d)

    def save_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> SyntheticConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def latin_heldout(n_shapes: int, n_colours: int, n: int, seed: int) -> list[tuple[int, int]]:
    """`n` (shape, colour) pairs, no shape or colour repeated (a partial transversal), by seed."""
    if not 0 <= n <= min(n_shapes, n_colours):
        raise ValueError(f"n_heldout must be in [0, {min(n_shapes, n_colours)}], got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E1D]))
    shapes = rng.permutation(n_shapes)[:n]
    colours = rng.permutation(n_colours)[:n]
    return sorted((int(s), int(c)) for s, c in zip(shapes, colours, strict=True))


def _check_latin(pairs, n_shapes: int, n_colours: int) -> None:
    s_idx, c_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(set(s_idx)) != len(s_idx) or len(set(c_idx)) != len(c_idx):
        raise ValueError(
            f"held-out pairs {pairs} repeat a shape or a colour (must be a Latin transversal)"
        )
    if any(not (0 <= s < n_shapes and 0 <= c < n_colours) for s, c in pairs):
        raise ValueError(f"held-out pairs {pairs} out of range")
    if len(pairs) == min(n_shapes, n_colours) and len(pairs) == max(n_shapes, n_colours):
        pass  # a full transversal still leaves every shape and colour seen with other partners


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the shape's own frame (unit "radius", v pointing up). u, v: [n, S, S]."""
    if shape == "circle":
        return u * u + v * v <= 0.85**2  # radii chosen so the four shapes have similar areas
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        # Equilateral, vertices on the unit circle, one pointing up; centroid at the origin.
        return (v >= -0.5) & (np.sqrt(3.0) * u + v <= 1.0) & (-np.sqrt(3.0) * u + v <= 1.0)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(shape: str, image_size: int, size, angle, cx, cy) -> np.ndarray:
    """Area coverage [n, H, W] in [0, 1] of the shape in each output pixel."""
    s = image_size * SUPERSAMPLE
    g = (np.arange(s) + 0.5) / s * 2.0 - 1.0  # pixel centres in [-1, 1]
    y, x = -g[:, None], g[None, :]  # image rows run downwards; v points up
    dx = (x[None] - cx[:, None, None]) / size[:, None, None]
    dy = (y[None] - cy[:, None, None]) / size[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = _shape_mask(shape, u, v).astype(np.float64)
    n = mask.shape[0]
    # Box downsample = the exact area coverage of each output pixel (anti-aliasing).
    return mask.reshape(n, image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(2, 4))


def _draw(
    shape: str, rgb, image_size: int, size, angle, cx, cy, outline: bool = False
) -> np.ndarray:
    """Render n images; size/angle/cx/cy: [n]. Returns float64 [n, 3, H, W] in [0, 1]. With
    `outline`, the outer band of the shape (OUTLINE of its size) is black."""
    alpha = _coverage(shape, image_size, size, angle, cx, cy)[:, None]
    bg = np.asarray(BACKGROUND)[None, :, None, None]
    fg = np.asarray(rgb)[None, :, None, None]
    img = bg * (1.0 - alpha) + fg * alpha
    if outline:
        inner = _coverage(shape, image_size, size * (1.0 - OUTLINE), angle, cx, cy)[:, None]
        img = img * (1.0 - (alpha - inner))  # the band between outer and inner shape: black
    return img


def render(
    shape: str | int,
    colour: str | int,
    n: int,
    seed: int,
    image_size: int = 16,
    cfg: SyntheticConfig | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Draw `n` images of one (shape, colour) combination, nuisances random from `seed`.

    shape/colour: names, or indices into cfg.shapes / cfg.colours (default config if cfg is None).
    The result depends only on (shape, colour, n, seed, image_size): rendering one combination never
    consumes randomness of another, so any combination (seen or held out) can be drawn on demand.

    Returns: float32 [n, 3, image_size, image_size] in [-1, 1].

    Examples:
        >>> render("triangle", "red", 8, seed=1).shape
        torch.Size([8, 3, 16, 16])
    """
    cfg = cfg or SyntheticConfig(image_size=image_size)
    shape = cfg.shapes[shape] if isinstance(shape, (int, np.integer)) else shape
    colour = cfg.colours[colour] if isinstance(colour, (int, np.integer)) else colour
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown shape/colour {shape!r}/{colour!r}")
    # Seed keyed by names (not indices) so a combination renders the same under any config order.
    key = [seed, SHAPES.index(shape), list(COLOURS).index(colour), image_size]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    size = rng.uniform(*SIZE_RANGE, n)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n))
    # Keep the whole shape inside the frame (rotated square corners reach ~1.06 * size).
    lim = 1.0 - 1.1 * size
    cx = rng.uniform(-1.0, 1.0, n) * lim
    cy = rng.uniform(-1.0, 1.0, n) * lim
    out = np.empty((n, 3, image_size, image_size), dtype=np.float32)
    for i in range(0, n, chunk):  # bounds the supersampled buffer to ~chunk * (4S)^2 floats
        sl = slice(i, i + chunk)
        out[sl] = _draw(
            shape, COLOURS[colour], image_size, size[sl], angle[sl], cx[sl], cy[sl], cfg.outline
        )
    return torch.from_numpy(out) * 2.0 - 1.0


def paper_config(per_combo: int = 1000, image_size: int = 16, seed: int = 0) -> SyntheticConfig:
    """The paper's own synthetic setting (Park et al., METHOD.md §9) at our image size: one
    outlined triangle or circle, red or blue, on white, random position; red triangles held out.
    (The paper: 64x64 images, 10,000 of them.)"""
    return SyntheticConfig(
        image_size=image_size,
        shapes=("triangle", "circle"),
        colours=("red", "blue"),
        per_combo=per_combo,
        heldout=[(0, 0)],
        seed=seed,
        outline=True,
    )


def make_dataset(cfg: SyntheticConfig | None = None, split: str = "train") -> ConceptDataset:
    """The training set (split='train': seen combinations only, `per_combo` images each) or a set
    over every combination (split='all', e.g. for the judge; drawn with a different seed stream).

    Rows are grouped by combination in (shape, colour) order; ids are 0..N-1 in that order.
    """
    cfg = cfg or SyntheticConfig()
    if split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all', got {split!r}")
    combos = cfg.combos("seen" if split == "train" else "all")
    seed = cfg.seed if split == "train" else cfg.seed + 1_000_003
    images = torch.cat([render(s, c, cfg.per_combo, seed, cfg.image_size, cfg) for s, c in combos])
    labels = torch.tensor(combos, dtype=torch.int64).repeat_interleave(cfg.per_combo, dim=0)
    captions = None
    if cfg.caption_drop and split == "train":
        n_values = [len(cfg.shapes), len(cfg.colours)]
        captions = drop_captions(labels, n_values, cfg.caption_drop, seed)
    marks = None
    if cfg.mark_fraction and split == "train":
        images, _, marks = stamp_marks(images, cfg.mark_fraction, seed)
    return ConceptDataset(
        images=images,
        labels=labels,
        captions=captions,
        marks=marks,
        ids=torch.arange(len(images), dtype=torch.int64),
        factors=["shape", "colour"],
        values=cfg.values,
        heldout=list(cfg.heldout),
        meta={"synthetic": cfg.to_dict(), "split": split},
    )
