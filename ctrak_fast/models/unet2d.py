"""A diffusers UNet2DModel (unconditional or class-conditional) behind eps(x_t, t, cond): what
`Attributor.from_pipeline` wraps a DDPM/DDIM pipeline's UNet in."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class UNet2DAdapter(nn.Module):
    """A diffusers UNet2DModel (DDPMPipeline, DDIMPipeline, ...) as eps(x_t, t, cond).

    cond: int64 [B, 1] class indices (models with `num_class_embeds`) or [B, 0] (unconditional).
    The scheduler's prediction type ("epsilon", "v_prediction", "sample") is converted to eps.
    Attention processors are untouched: the hooks gradient backend needs only Linear/Conv layers.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, null_class: int | None = None) -> None:
        super().__init__()
        from ctrak_fast.models.text2image import sample_size, schedule_from_scheduler

        cfg: Any = unet.config
        if cfg.get("class_embed_type") not in (None, "timestep") and not cfg.get(
            "num_class_embeds"
        ):
            raise ValueError(
                f"UNet2DModel class_embed_type={cfg.class_embed_type!r} is unsupported"
            )
        self.unet = unet.eval()
        self.n_classes: int | None = cfg.get("num_class_embeds")
        if null_class is not None and (
            self.n_classes is None or not 0 <= null_class < self.n_classes
        ):
            raise ValueError(f"null_class {null_class} is not a class of this model")
        self.null_class = null_class
        self.schedule = schedule_from_scheduler(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.config = {
            "image_size": sample_size(unet),
            "in_channels": int(cfg.in_channels),
            "schedule": self.schedule.config,
        }

    def forward(self, x_t: Tensor, t: Tensor | int, cond: Tensor) -> Tensor:
        tt = t if isinstance(t, Tensor) else torch.tensor(t, dtype=torch.int64, device=x_t.device)
        if tt.ndim == 0:
            tt = tt.expand(x_t.shape[0])
        labels = None
        if self.n_classes is not None:
            labels = cond.reshape(len(x_t), -1)[:, 0]
            if (labels < 0).any():
                raise ValueError(
                    "this class-conditional model has no unconditional class: use guidance 1 "
                    "(the default of from_pipeline), or pass null_class= to from_pipeline"
                )
        out: Tensor = self.unet(x_t, tt.to(x_t.device), class_labels=labels).sample
        if self.prediction_type == "epsilon":
            return out
        ab = self.schedule.alpha_bar(tt, x_t)
        if self.prediction_type == "v_prediction":
            return ab.sqrt() * out + (1 - ab).sqrt() * x_t
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt()

    def null_cond(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """[batch, 0] (unconditional) or [batch, 1] of the null class (-1: none)."""
        if self.n_classes is None:
            return torch.zeros(batch, 0, dtype=torch.int64, device=device)
        cls = -1 if self.null_class is None else self.null_class
        return torch.full((batch, 1), cls, dtype=torch.int64, device=device)


__all__ = ["UNet2DAdapter"]
