"""Factorised (Kronecker, LoGra-style) features of per-sample gradients, never forming them.

A Linear or Conv2d layer applied at positions t has the per-sample weight gradient
W_b = sum_t g_t a_tᵀ (a conv's a_t is its im2col column). With the Kronecker projection
P = P_out ⊗ P_in of ``kernels.factorized_project``:

    P vec(W_b) = vec((G_b P_out)ᵀ (A_b P_in))        cost T (in k_in + out k_out + k_in k_out)

(the formula of ``kernels.factorized_project``, whose signs it shares). A conv's A_b P_in is itself
a convolution of the layer input with P_in as the kernel, so no im2col buffer is formed. P_in and
P_out are small (in × k_in, out × k_out): they are hashed once per layer and cached on the device.
The exact norm for the per-timestep normalisation (METHOD.md §4) comes from the "ghost norm"
||W_b||² = sum_{t,t'} (a_t·a_t')(g_t·g_t'), cost T² (in + out), or from W_b itself where
out·in < T (in + out) makes that cheaper. A selected bias rides along as a constant-1 input column.
Normalisation and embedding layers are not covered: their selected parameters are listed in
``skipped`` and are in neither the features nor the norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctrak_fast import kernels
from ctrak_fast.engine.projection import FactorizedSpec
from ctrak_fast.kernels.factorized_project import factorized_matrices
from ctrak_fast.method.grads.hooks import capture_deltas, layer_grads, layer_positions, plain_conv
from ctrak_fast.method.grads.layout import parameter_layout


def _covered(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or plain_conv(mod)


class FactorizedGrads:
    """Per-sample factorised features of scale * <eps(x_t, t, cond), r> for the selected layers.

    Args:
        model: eps model, model(x_t, t, cond).
        param_filter: regex on parameter names; a layer is covered when its weight is selected.
        spec: kernels.FactorizedSpec (k_in, k_out, seed). Layer i of the feature uses the seeds of
            its weight's index in model.named_parameters(), so features do not depend on the filter.

    Examples:
        >>> fg = FactorizedGrads(model, "attn", FactorizedSpec(k_in=8, k_out=8))  # doctest: +SKIP
        >>> phi, sq_norm = fg(x_t, t, cond, r, scale)  # [B, fg.k], [B]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, param_filter: str | None, spec: FactorizedSpec):
        self.model = model
        self.spec = spec
        selected = {s.name for s in parameter_layout(model, param_filter)}
        index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        # (module, weight name, seed index, has selected bias)
        self.layers: list[tuple[nn.Module, str, int, bool]] = []
        covered: set[str] = set()
        for mname, mod in model.named_modules():
            prefix = f"{mname}." if mname else ""
            if not _covered(mod) or prefix + "weight" not in selected:
                continue
            bias = prefix + "bias" in selected and mod.bias is not None
            self.layers.append((mod, prefix + "weight", index[prefix + "weight"], bias))
            covered.update([prefix + "weight"] + ([prefix + "bias"] if bias else []))
        if not self.layers:
            raise ValueError(
                f"factorized projection: parameter filter {param_filter!r} selects no Linear or "
                "Conv2d weight"
            )
        self.skipped = sorted(selected - covered)
        self._matrices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def k(self) -> int:
        return len(self.layers) * self.spec.k

    @property
    def layer_names(self) -> list[str]:
        return [w for _, w, _, _ in self.layers]

    def __call__(
        self, x_t, t, cond, r, scale: float, norms: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (features [B, k] float32 in layer order, squared gradient norms [B] float32, or
        None without `norms`)."""
        grads, _ = capture_deltas(
            self.model, [m for m, _, _, _ in self.layers], x_t, t, cond, r, scale
        )
        n = x_t.shape[0]
        feats, sq = [], x_t.new_zeros(n, dtype=torch.float32) if norms else None
        for mod, _, layer, bias in self.layers:
            pairs = grads.get(id(mod), [])
            phi = x_t.new_zeros(n, self.spec.k, dtype=torch.float32)
            P_in, P_out = self._signs(mod, layer, x_t.device)
            for a, d in pairs:
                Ap, Gp = _projected_sides(mod, a, d, P_in, P_out, bias)
                phi += torch.bmm(Gp.transpose(1, 2), Ap).flatten(1)
            feats.append(phi)
            if sq is not None and pairs:
                sq += layer_sq_norm(mod, pairs, bias)
        return torch.cat(feats, 1), sq

    def _signs(self, mod: nn.Module, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in [in + 1, k_in], P_out [out, k_out]) of a layer: hashed once, cached (they are
        small), rows in the order of the flattened weight (Conv2d: (channel, kh, kw))."""
        key = (layer, device)
        if key not in self._matrices:
            w = mod.weight
            mats = factorized_matrices(
                self.spec.k_in, self.spec.k_out, self.spec.seed, layer, w[0].numel() + 1, w.shape[0]
            )
            self._matrices[key] = (mats[0].to(device), mats[1].to(device))
        return self._matrices[key]


def _projected_sides(mod, a, delta, P_in, P_out, bias: bool):
    """A P_in [B, T, k_in] and G P_out [B, T, k_out] without unfolding a convolution's input: for
    Conv2d, unfold(a)ᵀ P_in is the convolution of a with P_in as a [k_in, C, kh, kw] kernel.
    A selected bias is the constant-1 input: row `in` of P_in added at every position."""
    n, d_in = a.shape[0], P_in.shape[0] - 1
    a, delta = a.float(), delta.float()
    if isinstance(mod, nn.Conv2d):
        kernel = P_in[:d_in].T.reshape(-1, *mod.weight.shape[1:])
        Ap = F.conv2d(a, kernel, None, mod.stride, mod.padding, mod.dilation).flatten(2)
        Ap = Ap.transpose(1, 2)
        Gp = delta.flatten(2).transpose(1, 2) @ P_out
    else:
        Ap = a.reshape(n, -1, d_in) @ P_in[:d_in]
        Gp = delta.reshape(n, -1, delta.shape[-1]) @ P_out
    return (Ap + P_in[d_in] if bias else Ap), Gp


def layer_sq_norm(mod: nn.Module, pairs, bias: bool = False) -> torch.Tensor:
    """||sum over calls of G_bᵀ [A_b | 1]||_F² per sample (the 1-column only with bias), by the
    cheaper of the ghost-norm identity and W_b itself (a conv's by one grouped conv backward,
    without unfolding its input)."""
    d_out, d_in = mod.weight.shape[0], mod.weight[0].numel()
    positions = sum(d[0].numel() // d_out for _, d in pairs)
    if isinstance(mod, nn.Linear) or positions * (d_in + d_out) < d_in * d_out:
        A, G = layer_positions(mod, pairs)
        return kernels.linear_grad_sq_norm(A, G, bias=bias)  # picks ghost or W_b itself
    gw, gb = layer_grads(mod, [(a.float(), d.float()) for a, d in pairs], True, bias)
    return gw.pow(2).sum(1) + gb.pow(2).sum(1) if bias else gw.pow(2).sum(1)
