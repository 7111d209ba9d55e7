"""Reference per-sample gradients: scale * J^T r per sample with torch.func (any layer type)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .layout import Blocks, ParamSlot


def func_vjp(
    model: nn.Module,
    slots: list[ParamSlot],
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    r: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
) -> Blocks:
    """Reference: scale * J^T r per sample with torch.func, for the parameters in `slots`."""
    named = dict(model.named_parameters())
    params = {s.name: named[s.name].detach() for s in slots}

    def vjp_one(p, x, tt, c, rr):
        eps = functional_call(model, p, (x[None], tt[None], c[None]))
        return (eps * rr[None]).sum() * scale

    g = vmap(grad(vjp_one), in_dims=(None, 0, 0, 0, 0), chunk_size=chunk_size)(
        params, x_t, t, cond, r.detach()
    )
    return [(s.offset, g[s.name].flatten(1)) for s in slots]
