"""Captions the model completes: where an image's caption leaves a factor out, the value under
which the model denoises the image best (a diffusion classifier over that factor's values).

Why: web captions rarely name a colour, a style or a mark, so a method that reads only the
condition path cannot tell an uncaptioned carrier from any other image (docs/RESULTS.md, "Incomplete
captions"). The model has learnt each value from the images that were captioned; asked which
value explains an uncaptioned image best, it answers from the pixels. The completed caption is
then the training-side condition of the attribution features. No label is read: only the model,
the image and the values the factor can take.

The denoising loss is measured at fixed timesteps and fixed noises (seeded, shared by every image
and every candidate value), so a comparison between values is paired and the result is a
deterministic function of (model, image, caption, seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ctrak_fast.method.diffusion import NoiseSchedule, Schedule, add_noise
from ctrak_fast.method.rows import select_rows

COMPLETION_TIMESTEPS: tuple[int, ...] = (99, 199, 299, 399, 499, 599, 699)
"""The timesteps of the classifier: low and middle noise, where the value is still legible."""


@torch.no_grad()
def value_losses(
    model,
    schedule: Schedule,
    x0: Any,
    conds: torch.Tensor,
    factor: int,
    n_value: int,
    timesteps: Sequence[int] = COMPLETION_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean denoising loss of each image under each value of `factor`.

    x0 [N, C, H, W]: a tensor, or a row source read `batch_size` rows at a time (method/rows.py);
    conds int64 [N, F] (the other factors as captioned, null where not).
    Returns [N, n_value]: mean over timesteps of mean((eps - eps_theta(x_t, t, c with
    c[factor] = v))^2), with one fixed noise per timestep shared by every image and value.
    """
    gen = torch.Generator().manual_seed(seed)
    noises = torch.randn((len(timesteps), *tuple(x0.shape)[1:]), generator=gen)
    out = torch.zeros(len(x0), n_value, dtype=torch.float64)
    for start in range(0, len(x0), batch_size):
        x = x0[start : start + batch_size]
        c = conds[start : start + batch_size]
        for j, t in enumerate(timesteps):
            tt = torch.full((len(x),), int(t), dtype=torch.int64)
            x_t = add_noise(x, noises[j].expand_as(x), tt, schedule)
            target = schedule.target(x, noises[j].expand_as(x))  # noise (for a flow: - x0)
            for v in range(n_value):
                cv = c.clone()
                cv[:, factor] = v
                eps = model(x_t, tt, cv)
                err = (eps - target).pow(2).flatten(1).mean(1).double()
                out[start : start + batch_size, v] += err / len(timesteps)
    return out


def complete_captions(
    model,
    x0: Any,
    captions: torch.Tensor,
    n_values: Sequence[int],
    timesteps: Sequence[int] = COMPLETION_TIMESTEPS,
    seed: int = 0,
) -> torch.Tensor:
    """Captions [N, F] with every null entry (index n_values[f]) replaced by the model's value of
    least denoising loss for that image; captioned entries are kept as they are. Each factor is
    completed with the other factors as captioned (nulls stay null), so factors are completed
    independently of each other's guesses.

    Examples:
        >>> from ctrak_fast.models.factor_unet import FactorUNet
        >>> m = FactorUNet([2, 3], image_size=8, block_out_channels=(8, 8),
        ...                attention=(False, False), norm_num_groups=4).eval()
        >>> caps = torch.tensor([[0, 3], [2, 1]])  # image 0: colour left out; 1: shape
        >>> out = complete_captions(m, torch.zeros(2, 3, 8, 8), caps, [2, 3])
        >>> out[0, 0].item(), out[1, 1].item(), bool(out[0, 1] < 3), bool(out[1, 0] < 2)
        (0, 1, True, True)
    """
    out = captions.clone()
    schedule = NoiseSchedule.for_model(model)
    for f, n in enumerate(n_values):
        rows = (captions[:, f] == n).nonzero().flatten()
        if len(rows) == 0:
            continue
        x = select_rows(x0, rows)
        losses = value_losses(model, schedule, x, captions[rows], f, n, timesteps, seed)
        out[rows, f] = losses.argmin(1)
    return out


__all__ = ["COMPLETION_TIMESTEPS", "complete_captions", "value_losses"]
