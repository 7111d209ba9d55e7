"""The kind of a diffusers UNet2DModel (unconditional or class-conditional) behind
eps(x_t, t, cond): what `Attributor.from_pipeline` wraps a DDPM/DDIM pipeline's UNet in.
Conditions are a class index; there is no concept to remove but by an explicit c-."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ctrak_fast.method.featurize import FeatureSpec
from ctrak_fast.method.methods import GRADIENT_METHODS, get_method
from ctrak_fast.method.query import ConceptQuerySpec, Negative
from ctrak_fast.models.base import Condition, Conditions, ModelKind
from ctrak_fast.models.diffusers_unet import (
    check_prediction_type,
    sample_size,
    schedule_from_scheduler,
    to_eps,
)


class UNet2DAdapter(nn.Module):
    """A diffusers UNet2DModel (DDPMPipeline, DDIMPipeline, ...) as eps(x_t, t, cond).

    cond: int64 [B, 1] class indices (models with `num_class_embeds`) or [B, 0] (unconditional).
    The scheduler's prediction type ("epsilon", "v_prediction", "sample") is converted to eps.
    Attention processors are untouched: the hooks gradient backend needs only Linear/Conv layers.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, null_class: int | None = None) -> None:
        super().__init__()
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
        self.prediction_type = check_prediction_type(scheduler)
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
        return to_eps(out, x_t, tt, self.schedule, self.prediction_type)

    def null_cond(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """[batch, 0] (unconditional) or [batch, 1] of the null class (-1: none)."""
        if self.n_classes is None:
            return torch.zeros(batch, 0, dtype=torch.int64, device=device)
        cls = -1 if self.null_class is None else self.null_class
        return torch.full((batch, 1), cls, dtype=torch.int64, device=device)


class ClassConditions(Conditions):
    """UNet2DModel pipelines: int64 [1] class index, or [0] for unconditional models."""

    def __init__(self, n_classes: int | None) -> None:
        self.n_classes = n_classes

    def one(self, concept: Condition) -> Tensor:
        if self.n_classes is None:
            if isinstance(concept, Tensor) and concept.numel() == 0:
                return concept.reshape(0).to(torch.int64)
            raise ValueError("an unconditional model takes no condition (pass an empty tensor)")
        if isinstance(concept, Tensor):
            return concept.reshape(1).to(torch.int64)
        if not isinstance(concept, int) or not 0 <= concept < self.n_classes:
            raise ValueError(f"a condition is a class index in [0, {self.n_classes}): {concept!r}")
        return torch.tensor([concept], dtype=torch.int64)

    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        raise ValueError(
            "a class-conditional or unconditional model has no concept to remove: pass "
            "negatives=[another class] (the concept flipped), or use image_query"
        )

    def batch(self, conds: Any, n: int) -> Tensor:
        if conds is None:
            return torch.zeros(n, 0 if self.n_classes is None else 1, dtype=torch.int64)
        if isinstance(conds, Tensor):
            return conds.reshape(n, -1).to(torch.int64)
        return super().batch(conds, n)


class UNet2DKind(ModelKind):
    """UNet2DAdapter models (DDPM / DDIM pipelines)."""

    name = "unet2d"
    guidance = 1.0  # a class pipeline may have no unconditional branch

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return isinstance(model, UNet2DAdapter)

    def make_conditions(self) -> ClassConditions:
        return ClassConditions(self.model.n_classes)  # type: ignore[arg-type]

    @staticmethod
    def accepts_unet(unet: Any) -> bool:
        return type(unet).__name__ == "UNet2DModel"

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        method: str,
        *,
        dtype: torch.dtype | None,
        null_class: int | None,
        kwargs: dict[str, Any],
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Without an unconditional class, classifier-free guidance is off: guidance 1 in
        inversion and queries, unless given."""
        model = UNet2DAdapter(pipe.unet, pipe.scheduler, null_class)
        if null_class is not None:
            return model, kwargs
        kwargs = dict(kwargs)
        given = kwargs.get("feature")
        spec = given or get_method(method, GRADIENT_METHODS).feature_spec()
        if spec.inversion and spec.inversion_guidance != 1.0:
            if given is not None and model.n_classes is not None:
                raise ValueError(
                    "this class-conditional model has no unconditional class: use "
                    "inversion_guidance=1.0, or pass null_class="
                )
            spec = FeatureSpec.from_dict({**spec.to_dict(), "inversion_guidance": 1.0})
        kwargs["feature"] = spec
        if kwargs.get("query") is None:
            kwargs["query"] = ConceptQuerySpec(guidance=1.0, timesteps=spec.timesteps)
        return model, kwargs


__all__ = ["ClassConditions", "UNet2DAdapter", "UNet2DKind"]
