"""Reading one image or mask file: EXIF orientation applied, pixel count capped, PIL's warnings
made errors; every problem a ValueError naming the file. Training images are preprocessed as
diffusers' training scripts do (Preprocess: resize the short side, crop, optional flip)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

# Decoded pixels allowed per file (a 7000 x 7000 photo): a small file that decodes to more is a
# decompression bomb (PIL only warns below 2 x its own 89 M limit).
MAX_PIXELS = 50_000_000


@contextlib.contextmanager
def open_image(path: Path, what: str = "image") -> Iterator[Image.Image]:
    """The decoded image, upright (its EXIF orientation applied), checked for size before it is
    decoded; PIL warnings (bombs, odd metadata) are errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ValueError(
                        f"{path}: {w} x {h} pixels, more than the {MAX_PIXELS:,} allowed "
                        "(a decompression bomb?)"
                    )
                im.load()
                yield ImageOps.exif_transpose(im)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: unreadable {what} (ValueError: {e})") from None
    except Exception as e:  # PIL raises many types (and warnings) for corrupt files
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {first})") from None


@dataclass(frozen=True)
class Preprocess:
    """How a training image becomes S x S, as in diffusers' text-to-image training scripts:
    resize the short side to S, then crop the centre (`center_crop`, default) or a random
    window (diffusers' own default, `--random-crop` here), then mirror at random (`flip`,
    diffusers' `--random_flip`). Random crops and flips are drawn from (`seed`, the row's
    index), so every run sees the same pixels. The resize keeps this package's box filter
    (diffusers: bilinear), so square images load exactly as they always did.

    Examples:
        >>> Preprocess().to_dict()
        {'center_crop': True, 'flip': False, 'seed': 0}
    """

    center_crop: bool = True
    flip: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, im: Image.Image, size: int, index: int = 0) -> Image.Image:
        """`im` resized on its short side to `size`, cropped to size x size, maybe flipped."""
        w, h = im.size
        if w != h:
            warn_not_square()
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BOX)
        rng = np.random.default_rng([self.seed, index])
        if self.center_crop:  # torchvision's CenterCrop: the offset rounds to nearest
            left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        else:
            left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
        im = im.crop((left, top, left + size, top + size))
        if self.flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return im


@functools.cache
def warn_not_square() -> None:
    """Once per process: non-square images are cropped, not squashed."""
    warnings.warn(
        "some images are not square: each is resized on its short side and cropped to a "
        "square (the centre by default, as diffusers' training scripts do), so the features "
        "see the pixels the model was trained on; pass --random-crop / --flip to match a "
        "model trained with them",
        UserWarning,
        stacklevel=3,
    )


IMAGE_MODES = ("RGB", "RGBA", "L", "P")


def check_image_file(path: Path) -> None:
    """What load_image refuses that a file's header shows (missing, not PNG/JPG, unreadable
    header, too many pixels, an unsupported mode), without decoding its pixels: ValueError
    naming the file. A streamed set is checked so before its first row is featurized."""
    if not path.is_file():
        raise ValueError(f"image file missing: {path}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: not a PNG/JPG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(path) as im:
                (w, h), mode = im.size, im.mode
    except Exception as e:  # PIL raises many types (and warnings) for corrupt files
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {first})") from None
    if w * h > MAX_PIXELS:
        raise ValueError(
            f"{path}: {w} x {h} pixels, more than the {MAX_PIXELS:,} allowed "
            "(a decompression bomb?)"
        )
    if mode not in IMAGE_MODES:
        raise ValueError(f"{path}: unsupported image mode {mode!r} (need RGB, RGBA, L or P)")


def load_image(
    path: Path, image_size: int, preprocess: Preprocess | None = None, index: int = 0
) -> torch.Tensor:
    """float32 [3, S, S] in [-1, 1], preprocessed by `preprocess` (default: centre crop, no
    flip; `index`: the row, which seeds random crops and flips); ValueError naming the file on
    any problem."""
    if not path.is_file():
        raise ValueError(f"image file missing: {path}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: not a PNG/JPG file")
    with open_image(path) as im:
        mode = im.mode
        if mode not in IMAGE_MODES:
            raise ValueError(f"{path}: unsupported image mode {mode!r} (need RGB, RGBA, L or P)")
        if mode == "RGBA":  # composite onto white, the synthetic background
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    # Outside open_image, whose PIL warnings are errors: the not-square notice is a warning.
    return image_tensor(im, image_size, preprocess, index, str(path))


def image_tensor(
    im: Image.Image, image_size: int, preprocess: Preprocess | None, index: int, name: str
) -> torch.Tensor:
    """A decoded RGB (or RGBA, L, P) image -> float32 [3, S, S] in [-1, 1], preprocessed."""
    if im.mode == "RGBA":  # composite onto white, the synthetic background
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    im = (preprocess or Preprocess()).apply(im.convert("RGB"), image_size, index)
    arr = np.asarray(im, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name}: expected 3 channels, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: image contains NaN/Inf")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_mask(path: Path, size) -> torch.Tensor:
    """A region mask PNG -> float32 [H, W] at the query image's `size` (H, W; resized by nearest
    neighbour, as the query image is resized to the model's size): 1 where it is not black."""
    with open_image(path, "mask") as im:
        gray = im.convert("L")
    h, w = int(size[0]), int(size[1])
    if gray.size != (w, h):
        gray = gray.resize((w, h), Image.Resampling.NEAREST)
    mask = torch.from_numpy(np.asarray(gray, dtype=np.float32) > 0).float()
    if mask.sum() == 0:
        raise ValueError(f"{path}: the mask is all black (an empty region)")
    return mask
