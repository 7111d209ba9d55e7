"""A latent model's VAE: pixels -> the diffusion model's x0 and back (every latent kind shares
these: the text-to-image adapters, DiT, PixArt, SD3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["decode_latents", "encode_latents"]


def _scale(vae: nn.Module) -> tuple[float, float]:
    cfg: Any = vae.config
    return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_latents(
    vae: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 16
) -> torch.Tensor:
    """Images [B,3,H,W] in [-1,1] -> x0 [B,C,h,w] float32 on the CPU: (posterior mean - shift)
    * scaling_factor; the mean, not a sample, so the features of an image are deterministic."""
    sf, shift = _scale(vae)
    vdt = next(vae.parameters()).dtype
    out = []
    coder: Any = vae  # a diffusers AutoencoderKL
    for chunk in images.split(batch_size):  # type: ignore[no-untyped-call]
        lat = coder.encode(chunk.to(device, vdt)).latent_dist.mean
        out.append(((lat.float() - shift) * sf).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(
    vae: nn.Module, x0: torch.Tensor, device: torch.device, batch_size: int = 16
) -> torch.Tensor:
    """x0 [B,C,h,w] -> images [B,3,H,W] float32 in [-1, 1] (clamped), on the CPU."""
    sf, shift = _scale(vae)
    vdt = next(vae.parameters()).dtype
    coder: Any = vae
    out = [
        coder.decode((c.to(device, vdt) / sf) + shift).sample.float().cpu()
        for c in x0.split(batch_size)  # type: ignore[no-untyped-call]
    ]
    return torch.cat(out).clamp(-1, 1)
