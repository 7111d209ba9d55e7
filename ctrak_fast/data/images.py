"""Reading one image or mask file: EXIF orientation applied, pixel count capped, PIL's warnings
made errors; every problem a ValueError naming the file."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

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


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """float32 [3, S, S] in [-1, 1]; ValueError naming the file on any problem."""
    if not path.is_file():
        raise ValueError(f"image file missing: {path}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: not a PNG/JPG file")
    with open_image(path) as im:
        mode = im.mode
        if mode not in ("RGB", "RGBA", "L", "P"):
            raise ValueError(f"{path}: unsupported image mode {mode!r} (need RGB, RGBA, L or P)")
        if mode == "RGBA":  # composite onto white, the synthetic background
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BOX)
        arr = np.asarray(im, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{path}: expected 3 channels, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: image contains NaN/Inf")
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
