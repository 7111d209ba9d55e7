"""A small folder of real images with three factors, for trying `ctrak` on "your own images":
scikit-learn's handwritten digits (8 x 8 scans of real handwriting), coloured and put on a
background, written as PNGs with a labels.json that holds out some digit-colour pairs.

    python -m ctrak_fast.data.digit_folder --out my_digits    # -> my_digits/{images,labels.json}

Factors: digit (0-3), colour (red, green, blue), background (black, white). Held out by default:
digit 3 in red and digit 1 in blue (on either background): no image of them is written, and
labels.json's "held_out" names them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ctrak_fast.engine.atomic import atomic_write_text

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245)}
HELD_OUT = ({"digit": "3", "colour": "red"}, {"digit": "1", "colour": "blue"})


def make_digit_folder(
    out: str | Path,
    digits: tuple[int, ...] = (0, 1, 2, 3),
    per_combo: int = 12,
    image_size: int = 16,
    held_out: tuple[dict, ...] = HELD_OUT,
    seed: int = 0,
) -> Path:
    """Write out/images/*.png and out/labels.json (records format with held_out); returns the
    labels file. Each (digit, colour, background) gets `per_combo` different handwritten digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dependency of the test suite and the README walk-through
        raise ImportError("make_digit_folder needs scikit-learn (pip install scikit-learn)") from e
    scans = load_digits()
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for d in digits:
        pool = np.flatnonzero(scans.target == d)
        for colour, rgb in COLOURS.items():
            if any(h == {"digit": str(d), "colour": colour} for h in held_out):
                continue
            for background, bg in BACKGROUNDS.items():
                for i in rng.choice(pool, size=per_combo, replace=False):
                    ink = (scans.images[i] / 16.0)[..., None]  # [8, 8, 1] stroke intensity
                    pixels = np.asarray(bg) * (1 - ink) + np.asarray(rgb) * ink
                    name = f"images/{d}_{colour}_{background}_{i:04d}.png"
                    image = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
                    image.resize((image_size, image_size), Image.Resampling.BILINEAR).save(
                        out / name
                    )
                    samples.append(
                        {"file": name, "digit": str(d), "colour": colour, "background": background}
                    )
    labels = out / "labels.json"
    atomic_write_text(
        labels, json.dumps({"samples": samples, "held_out": list(held_out)}, indent=1)
    )
    return labels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--per-combo", type=int, default=12)
    p.add_argument("--image-size", type=int, default=16)
    a = p.parse_args(argv)
    labels = make_digit_folder(a.out, per_combo=a.per_combo, image_size=a.image_size)
    n = len(json.loads(labels.read_text())["samples"])
    print(f"{n} images and {labels}")


if __name__ == "__main__":
    main()
