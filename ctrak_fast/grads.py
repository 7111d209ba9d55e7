"""Per-sample parameter gradients of the form (2/D) * J_theta^T r (see losses.py).

Two implementations of one contract, `PerSampleGrads.__call__(x_t, t, cond, r) -> blocks`:

- "func": torch.func.vmap(grad(...)) over the batch — the reference, any layer type;
- "hooks": one batched forward/backward with hooks on Linear/Conv2d layers and the exact
  per-sample weight gradient sum_positions delta a^T (see grads_hooks.py); other parameters fall
  back to the reference.

A gradient is returned as blocks `[(global_offset, Tensor[B, n]), ...]`, one per selected parameter,
where global_offset is the parameter's first row in the *full* model's flattened parameter vector.
A parameter subset is thus projected with exactly the rows a full projection would use for it, and
parameters outside the filter cost nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Blocks = list[tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class ParamSlot:
    name: str
    offset: int  # first row in the full flattened parameter vector
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def parameter_layout(model: nn.Module, param_filter: str | None = None) -> list[ParamSlot]:
    """Slots of the parameters whose name matches the regex `param_filter` (all when None).

    Offsets follow `model.named_parameters()` order over *all* parameters, so they do not depend on
    the filter. Raises ValueError when the filter matches nothing.
    """
    pattern = re.compile(param_filter) if param_filter else None
    slots, offset = [], 0
    for name, p in model.named_parameters():
        if pattern is None or pattern.search(name):
            slots.append(ParamSlot(name, offset, tuple(p.shape)))
        offset += p.numel()
    if not slots:
        raise ValueError(f"parameter filter {param_filter!r} matches no parameter of the model")
    return slots


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks_sq_norm(blocks: Blocks) -> torch.Tensor:
    """Exact per-sample squared L2 norm over all blocks: [B] float32."""
    return sum(b.float().pow(2).sum(1) for _, b in blocks)


def scale_blocks_(blocks: Blocks, scale: torch.Tensor) -> Blocks:
    """Multiply each sample's gradient by scale[b] (scale [B]) in place; returns blocks."""
    for _, b in blocks:
        b.mul_(scale[:, None].to(b.dtype))
    return blocks


def add_blocks(acc: Blocks | None, blocks: Blocks) -> Blocks:
    if acc is None:
        return [(off, b.clone()) for off, b in blocks]
    for (off_a, a), (off_b, b) in zip(acc, blocks, strict=True):
        assert off_a == off_b
        a.add_(b)
    return acc


def flatten_blocks(blocks: Blocks) -> torch.Tensor:
    """[B, p_selected] in block order (for tests and small models)."""
    return torch.cat([b for _, b in blocks], 1)


class PerSampleGrads:
    """Per-sample gradients g_b = (2/D) J_theta(x_b, t_b, c_b)^T r_b of a model eps(x_t, t, cond).

    Args:
        model: module called as model(x_t [B,C,H,W], t [B], cond [B,F]) -> eps [B,C,H,W].
        param_filter: regex on parameter names; only matching parameters get gradients.
        backend: "func" (torch.func reference) or "hooks" (batched capture, falls back per layer).
        chunk_size: vmap chunk (bounds the memory of the reference path).

    Examples:
        >>> grads = PerSampleGrads(model, param_filter="attn")       # doctest: +SKIP
        >>> blocks = grads(x_t, t, cond, r)  # [(offset, [B, n]), ...]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        param_filter: str | None = None,
        backend: str = "func",
        chunk_size: int | None = None,
    ):
        if backend not in ("func", "hooks"):
            raise ValueError(f"unknown gradient backend {backend!r}; expected 'func' or 'hooks'")
        self.model = model
        self.param_filter = param_filter
        self.slots = parameter_layout(model, param_filter)
        self.dim = total_parameters(model)
        self.backend = backend
        self.chunk_size = chunk_size
        self._hooks = None
        if backend == "hooks":
            from .grads_hooks import HookedGrads

            self._hooks = HookedGrads(model, self.slots)

    @property
    def n_selected(self) -> int:
        return sum(s.numel for s in self.slots)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, r) -> Blocks:
        """x_t: [B,C,H,W]; t: [B] int64; cond: [B,F]; r: [B,C,H,W], or a losses.Residual (the
        hooks evaluate it on their own forward) -> blocks [(offset, [B, n_param])]."""
        scale = 2.0 / x_t[0].numel()
        if self._hooks is not None:
            return self._hooks(x_t, t, cond, r, scale)
        if callable(r):
            r = r.standalone(self.model, x_t, t, cond)
        return self._func(x_t, t, cond, r, scale)

    def _func(self, x_t, t, cond, r, scale) -> Blocks:
        return func_vjp(self.model, self.slots, x_t, t, cond, r, scale, self.chunk_size)


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
