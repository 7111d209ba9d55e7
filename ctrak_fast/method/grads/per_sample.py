"""Per-sample parameter gradients of the form (2/D) * J_theta^T r (see losses.py).

Two implementations of one contract, `PerSampleGrads.__call__(x_t, t, cond, r) -> blocks`:

- "func": torch.func.vmap(grad(...)) over the batch — the reference, any layer type;
- "hooks": one batched forward/backward with hooks on Linear/Conv2d layers and the exact
  per-sample weight gradient sum_positions delta a^T (hooks.py); other parameters fall
  back to the reference.

A gradient is returned as blocks `[(global_offset, Tensor[B, n]), ...]`, one per selected parameter,
where global_offset is the parameter's first row in the *full* model's flattened parameter vector.
A parameter subset is thus projected with exactly the rows a full projection would use for it, and
parameters outside the filter cost nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import HookedGrads
from .layout import Blocks, parameter_layout, total_parameters
from .reference import func_vjp


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
