"""Dense features projected layer by layer: the B × p per-sample gradient is never formed.

The materialised dense path (grads.PerSampleGrads, then Featurizer: sum over timesteps in parameter
space, project once) holds B × p floats, which on a GPU limits the model size. Here each (batch,
timestep) is projected layer by layer into [B, k] instead, with the projection matrix of the same
ProjectionSpec (features agree with the materialised path to float32 rounding):

    Linear, T <= FUSED_MAX_T positions
              kernels.linear_grad_project: W_b = sum_t g_t a_tᵀ tile by tile in on-chip memory
              times the hashed signs (Triton on CUDA; nothing of size B × out × in is written)
    otherwise that layer's per-sample gradient (grads_hooks.layer_grads), projected at once by
              engine.rademacher.rademacher_project (Triton on CUDA, the fused C++ kernel on
              CPU); for long T materialising W_b is the cheaper of the two (see
              linear_grad_project)

so memory is one layer's per-sample gradient. Norms: linear_grad_sq_norm (ghost-norm identity or
W_b, whichever is cheaper) or the layer gradient itself. Projection is linear, P g / |g| =
P (g / |g|), so the per-timestep normalisation is applied to [B, k] afterwards. The price is one
projection per timestep rather than one per sample (9× the projection FLOPs at the paper's 9
timesteps), which is why the CPU keeps the materialised path unless asked
(Featurizer(layerwise=True)).
"""

from __future__ import annotations

import torch
from torch import nn

from ctrak_fast import kernels
from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.rademacher import projection_backend, rademacher_project
from ctrak_fast.method.grads.hooks import HookedGrads, layer_grads, layer_positions
from ctrak_fast.method.grads.layout import parameter_layout

FUSED_MAX_T = 1024  # positions per sample up to which the fused linear kernel is used


class LayerwiseDense:
    """Dense-projected per-sample gradients of scale * <eps(x_t, t, cond), r>, layer by layer.

    Args:
        model: eps model, model(x_t, t, cond).
        param_filter: regex on parameter names (as PerSampleGrads).
        spec: the dense ProjectionSpec; rows of P are the parameters' global offsets.

    Examples:
        >>> lw = LayerwiseDense(model, "attn2", ProjectionSpec(k=512))  # doctest: +SKIP
        >>> phi, sq_norm = lw(x_t, t, cond, r, scale)  # [B, 512], [B]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, param_filter: str | None, spec: ProjectionSpec):
        self.spec = spec
        self.hooked = HookedGrads(model, parameter_layout(model, param_filter))

    def __call__(
        self, x_t, t, cond, r, scale: float, norms: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (features [B, k] float32 of the unnormalised gradient, its squared norm [B] float32
        or None without `norms`)."""
        pairs, r = self.hooked.capture(x_t, t, cond, r, scale)
        n, seed, k = x_t.shape[0], self.spec.seed, self.spec.k
        phi = torch.zeros(n, k, dtype=torch.float32, device=x_t.device)
        sq = torch.zeros(n, dtype=torch.float32, device=x_t.device) if norms else None
        for mod, w, b in self.hooked.layers:
            calls = pairs.get(id(mod), [])
            if not calls:
                continue
            if w is not None and use_fused_linear(mod, calls, x_t):
                A, G = layer_positions(mod, calls)
                bias = None if b is None else b.offset
                kernels.linear_grad_project(
                    A, G, seed, k, w.offset, bias_offset=bias, out=phi, accumulate=True
                )
                if sq is not None:
                    sq += kernels.linear_grad_sq_norm(A, G, bias=b is not None)
                continue
            grads_wb = layer_grads(mod, calls, w is not None, b is not None)
            for slot, g in zip((w, b), grads_wb, strict=True):
                if g is not None:
                    _project_into(phi, sq, g, seed, k, slot.offset)
        for off, g in self.hooked.rest_grads(x_t, t, cond, r, scale):
            _project_into(phi, sq, g, seed, k, off)
        return phi, sq


def use_fused_linear(mod: nn.Module, calls, x: torch.Tensor) -> bool:
    """Whether a layer goes to the fused linear kernel: a Linear layer, inputs the projection sends
    to Triton, few enough positions (the tests force it to check the wiring on CPU)."""
    if not isinstance(mod, nn.Linear) or projection_backend(None, x) != "triton":
        return False
    return sum(d[0].numel() // d.shape[-1] for _, d in calls) <= FUSED_MAX_T


def _project_into(phi, sq, g: torch.Tensor, seed: int, k: int, offset: int) -> None:
    rademacher_project(g, seed, k, offset, phi, accumulate=True)
    if sq is not None:
        sq += g.float().pow(2).sum(1)
