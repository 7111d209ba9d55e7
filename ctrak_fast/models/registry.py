"""The model kinds by name (models/base.py ModelKind), and the kind of a model or a pipeline.

Adding a kind: write its module (a ModelKind subclass and its Conditions beside it) and add one
entry here. Order matters where kinds overlap: the first that accepts a model is its kind.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ctrak_fast.models.base import ModelKind
from ctrak_fast.models.dit import DiTKind
from ctrak_fast.models.factor import FactorKind
from ctrak_fast.models.pixart import PixArtKind
from ctrak_fast.models.sd3 import SD3Kind
from ctrak_fast.models.sdxl import SDXLKind
from ctrak_fast.models.t2i_features import TextToImageKind
from ctrak_fast.models.unet2d import UNet2DKind

__all__ = ["KINDS", "kind_of", "kind_of_pipeline"]

KINDS: dict[str, type[ModelKind]] = {
    kind.name: kind
    for kind in (
        DiTKind,
        PixArtKind,
        SD3Kind,
        SDXLKind,
        TextToImageKind,
        UNet2DKind,
        FactorKind,
    )
}
"""Every model kind, by name, in the order a model is matched against them."""


def kind_of(model: nn.Module, null_cond: Tensor | None = None) -> ModelKind:
    """The ModelKind of `model` (null_cond: see ModelKind); TypeError for an unknown model."""
    for kind in KINDS.values():
        if kind.accepts(model):
            return kind(model, null_cond)
    raise TypeError(
        f"{type(model).__name__} is not a known model kind: use a FactorUNet, a "
        "TextToImageAdapter, or Attributor.from_pipeline for diffusers pipelines"
    )


def kind_of_pipeline(pipe: Any) -> type[ModelKind]:
    """The ModelKind of a diffusers pipeline object (by its denoiser: .unet or .transformer)."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        unet = getattr(pipe, "transformer", None)
    if unet is None or getattr(pipe, "scheduler", None) is None:
        raise TypeError(
            "from_pipeline needs a diffusers pipeline with .unet (or .transformer) and .scheduler"
        )
    for kind in KINDS.values():
        if kind.accepts_unet(unet):
            return kind
    name = type(unet).__name__
    raise TypeError(f"unsupported pipeline denoiser {name}: expected UNet2D(Condition)Model")
