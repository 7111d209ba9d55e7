"""Training latents, VAE-encoded once and cached next to a store (keyed by the VAE fingerprint and a
digest of the images), so an SD-size training set never sits in memory as pixels."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ctrak_fast.data.image_sequence import ImageSequence
from ctrak_fast.engine.atomic import atomic_path
from ctrak_fast.models.text2image import TextToImageAdapter


def latent_cache_path(store_path: str | os.PathLike, vae_fingerprint: str) -> Path:
    """`<store>.latents-<vae fingerprint[:16]>.safetensors`, next to the store directory."""
    p = Path(store_path)
    return p.with_name(f"{p.name}.latents-{vae_fingerprint[:16]}.safetensors")


def _images_digest(images: torch.Tensor | Sequence, ids: torch.Tensor, crop: str = "") -> str:
    """sha256 of the images (tensor bytes, or each file's name and bytes, and how files are
    cropped), and the ids."""

    h = hashlib.sha256(crop.encode())
    if isinstance(images, ImageSequence):
        h.update(images.digest().encode())
    elif torch.is_tensor(images):
        t = images.detach().float().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    else:
        for f in images:
            h.update(Path(f).name.encode() + b"\0")
            h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    h.update(ids.detach().long().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_files(
    files: Sequence[Any], image_size: int | None, preprocess: Any = None, first: int = 0
) -> torch.Tensor:
    from ctrak_fast.data.images import load_image

    if image_size is None:
        raise ValueError("image files need image_size (the model's pixel resolution)")
    return torch.stack(
        [load_image(Path(f), image_size, preprocess, first + i) for i, f in enumerate(files)]
    )


def encode_images_cached(
    adapter: TextToImageAdapter,
    images: torch.Tensor | Sequence[str | os.PathLike],
    ids: torch.Tensor,
    store_path: str | os.PathLike,
    batch_size: int = 16,
    image_size: int | None = None,
    preprocess: Any = None,
) -> Any:
    """x0 of the training images [N,C,h,w] float32, VAE-encoded once and cached next to the store.

    images: float32 [N,3,H,W] in [-1,1], or N image files, read `batch_size` at a time, resized
    to `image_size` and cropped by `preprocess` (data.images.Preprocess; default: centre crop;
    file i seeds its random crop or flip), so an SD-size training set never sits in memory as
    pixels (3 MB per 512x512 image, 64 kB as latents). The cache file is keyed by the VAE
    fingerprint (its name) and records a digest of the images (or files, and their crop) and ids;
    a cache of other images is recomputed and replaced. Written atomically (tmp + os.replace).
    Pixel-space models return the images: a tensor stays one, files become an ImageSequence
    (data/image_sequence.py) that featurization reads a batch at a time.
    """
    if not adapter.latent:  # pixels: files stay on disk, read a batch at a time
        if torch.is_tensor(images):
            return images.float()
        if isinstance(images, ImageSequence):
            return images
        if image_size is None:
            raise ValueError("image files need image_size (the model's pixel resolution)")
        seq = ImageSequence(list(images), image_size, preprocess)
        seq.check_files()  # a bad file is refused before the store is touched
        return seq
    from safetensors import safe_open
    from safetensors.torch import save_file

    vae_fp = adapter.fingerprints()["vae"]
    path = latent_cache_path(store_path, vae_fp)
    crop = "" if preprocess is None else json.dumps(preprocess.to_dict(), sort_keys=True)
    digest = _images_digest(images, ids, crop)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("vae") == vae_fp and meta.get("images") == digest:
                return f.get_tensor("latents")
    if torch.is_tensor(images):
        latents = adapter.encode_images(images, batch_size)
    elif isinstance(images, ImageSequence):  # decoded a batch at a time
        batches = images
        latents = torch.cat(
            [
                adapter.encode_images(batches[i : i + batch_size])
                for i in range(0, len(batches), batch_size)
            ]
        )
    else:
        files = list(images)
        latents = torch.cat(
            [
                adapter.encode_images(
                    _load_files(files[i : i + batch_size], image_size, preprocess, i)
                )
                for i in range(0, len(files), batch_size)
            ]
        )
    latents = latents.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(
            {"latents": latents, "ids": ids.long().contiguous()},
            str(tmp),
            metadata={"vae": vae_fp, "images": digest, "format": "ctrak-latents/1"},
        )
    return latents
