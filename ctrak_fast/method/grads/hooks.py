"""Batched per-sample gradients from captured activations and output gradients.

One forward pass records, for every hooked layer, its input activation a and output o; one call of
torch.autograd.grad(loss, outputs) gives every delta = dloss/do without computing any parameter
gradient. Each sample's parameter gradient then follows layer by layer:

    Linear     W_b = sum_positions delta aᵀ                     (einsum)
    Conv2d     W_b = delta ⋆ a                                   (one grouped conv backward)
    GroupNorm  w_b = sum_positions delta * normalise(a),  b_b = sum delta
    LayerNorm  same, over the normalised trailing dims
    Embedding  W_b = one_hot(index)ᵀ delta

Samples of a batch never interact in these models (no batch norm), so the summed loss's
gradient with respect to o holds each sample's own delta. Parameters of any other layer type are
computed by the torch.func reference (grads.func_vjp), restricted to those parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctrak_fast.method.grads.layout import Blocks, ParamSlot
from ctrak_fast.method.grads.reference import func_vjp

_SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def plain_conv(mod: nn.Module) -> bool:
    """A Conv2d whose per-sample weight gradient is delta @ unfold(input)ᵀ."""
    return (
        isinstance(mod, nn.Conv2d)
        and mod.groups == 1
        and mod.padding_mode == "zeros"
        and isinstance(mod.padding, tuple)
    )


def conv_weight_grads(mod: nn.Conv2d, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients [B, out, in * kh * kw] of a plain_conv layer.

    The batch is folded into the channels: the weight gradient of one convolution with B groups
    is the B per-sample gradients. Twice as fast on CPU as delta @ unfold(a)ᵀ, and no im2col
    buffer. Only the weight's shape is read: on the CPU a zero-stride view stands in for it."""
    n, c_in = a.shape[:2]
    c_out = delta.shape[1]
    shape = (n * c_out, *mod.weight.shape[1:])
    if a.device.type == "cpu":
        weight = a.new_empty(1).as_strided(shape, (0,) * len(shape))
    else:  # GPU libraries may insist on a dense weight; its values are never read
        weight = a.new_empty(shape)
    gw = torch.ops.aten.convolution_backward(
        delta.reshape(1, n * c_out, *delta.shape[2:]),
        a.reshape(1, n * c_in, *a.shape[2:]),
        weight,
        None,
        mod.stride,
        mod.padding,
        mod.dilation,
        False,
        [0, 0],
        n,
        [False, True, False],
    )[1]
    return gw.reshape(n, c_out, -1)


def _supported(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Conv2d):
        return plain_conv(mod)
    return isinstance(mod, _SUPPORTED)


Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # one layer's calls: [(input a, delta), ...]


def capture_deltas(
    model: nn.Module, modules: list[nn.Module], x_t, t, cond, r, scale: float
) -> tuple[dict[int, Pairs], torch.Tensor]:
    """One forward and one backward of scale * <eps(x_t, t, cond), r> -> ({id(module): [(its
    input a, dloss/doutput delta) per call, in call order]}, r). No parameter gradient is computed;
    calls whose output does not reach the loss are left out.

    r: a tensor shaped like eps, or a callable r(eps, x) (losses.Residual) evaluated on this
    forward's output, which saves the forward a separate residual would cost."""
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooked = {id(m) for m in modules}

    def capture(mod, inputs, output):
        if id(mod) in hooked and output.requires_grad:
            records.append((mod, inputs[0].detach(), output))

    handles = [m.register_forward_hook(capture) for m in modules]
    try:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(getattr(r, "needs_input_grad", False))
            eps = model(x, t, cond)
            r = r(eps, x) if callable(r) else r.detach()
            loss = (eps * r).sum() * scale
            deltas = torch.autograd.grad(loss, [o for _, _, o in records], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    pairs: dict[int, Pairs] = {}
    for (mod, a, _), d in zip(records, deltas, strict=True):
        if d is not None:
            pairs.setdefault(id(mod), []).append((a, d.detach()))
    return pairs, r


class HookedGrads:
    """Per-sample gradients of scale * <eps(x_t, t, cond), r> for the parameters in `slots`."""

    def __init__(self, model: nn.Module, slots: list[ParamSlot]):
        self.model = model
        self.slots = slots
        by_name = {s.name: s for s in slots}
        self.layers: list[tuple[nn.Module, ParamSlot | None, ParamSlot | None]] = []
        covered: set[str] = set()
        for mname, mod in model.named_modules():
            if not _supported(mod):
                continue
            prefix = f"{mname}." if mname else ""
            w, b = by_name.get(prefix + "weight"), by_name.get(prefix + "bias")
            if w is None and b is None:
                continue
            self.layers.append((mod, w, b))
            covered.update(s.name for s in (w, b) if s is not None)
        self.rest = [s for s in slots if s.name not in covered]

    def capture(self, x_t, t, cond, r, scale: float) -> tuple[dict[int, Pairs], torch.Tensor]:
        """capture_deltas over the hooked layers."""
        return capture_deltas(self.model, [m for m, _, _ in self.layers], x_t, t, cond, r, scale)

    def rest_grads(self, x_t, t, cond, r: torch.Tensor, scale: float) -> Blocks:
        """Gradients of the parameters no hook covers, by the torch.func reference."""
        return func_vjp(self.model, self.rest, x_t, t, cond, r, scale) if self.rest else []

    def __call__(self, x_t, t, cond, r, scale: float) -> Blocks:
        pairs, r = self.capture(x_t, t, cond, r, scale)
        grads: dict[str, torch.Tensor] = {}
        for mod, w, b in self.layers:
            calls = pairs.get(id(mod), [])
            grads_wb = layer_grads(mod, calls, w is not None, b is not None)
            for slot, g in zip((w, b), grads_wb, strict=True):
                if g is not None:
                    grads[slot.name] = g
        for (_, g), s in zip(self.rest_grads(x_t, t, cond, r, scale), self.rest, strict=True):
            grads[s.name] = g
        n = x_t.shape[0]
        return [
            (s.offset, grads[s.name] if s.name in grads else x_t.new_zeros(n, s.numel))
            for s in self.slots
        ]


def layer_grads(mod, pairs: Pairs, want_w: bool, want_b: bool):
    """Per-sample (weight, bias) gradients [B, numel] of one layer summed over its calls `pairs`;
    None where not wanted or the layer was not called."""
    gw = gb = None
    for a, delta in pairs:
        w1, b1 = _layer_grads(mod, a, delta, want_w, want_b)
        if w1 is not None:
            gw = w1.flatten(1) if gw is None else gw + w1.flatten(1)
        if b1 is not None:
            gb = b1.flatten(1) if gb is None else gb + b1.flatten(1)
    return gw, gb


def layer_positions(mod: nn.Module, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear or plain Conv2d layer's inputs and output gradients over all its calls as
    A [B, T, in] (a conv's im2col columns) and G [B, T, out]: W_b = G_bᵀ A_b."""
    As, Gs = [], []
    for a, d in pairs:
        n = a.shape[0]
        if isinstance(mod, nn.Conv2d):
            a = F.unfold(a, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2)
            d = d.flatten(2).transpose(1, 2)
        As.append(a.reshape(n, -1, a.shape[-1]))
        Gs.append(d.reshape(n, -1, d.shape[-1]))
    return torch.cat(As, 1), torch.cat(Gs, 1)


def _layer_grads(mod, a, delta, want_w: bool, want_b: bool):
    """Per-sample (weight, bias) gradients of one layer call; either may be None if not wanted."""
    n = a.shape[0]
    gw = gb = None
    if isinstance(mod, nn.Linear):
        a2 = a.reshape(n, -1, a.shape[-1])
        d2 = delta.reshape(n, -1, delta.shape[-1])
        if want_w:
            gw = torch.bmm(d2.transpose(1, 2), a2)
        if want_b:
            gb = d2.sum(1)
    elif isinstance(mod, nn.Conv2d):
        if want_w:
            gw = conv_weight_grads(mod, a, delta)
        if want_b:
            gb = delta.sum((2, 3))
    elif isinstance(mod, nn.GroupNorm):
        if want_w:
            a_hat = F.group_norm(a, mod.num_groups, eps=mod.eps)
            gw = (delta * a_hat).flatten(2).sum(2)
        if want_b:
            gb = delta.flatten(2).sum(2)
    elif isinstance(mod, nn.LayerNorm):
        dims = tuple(range(1, a.dim() - len(mod.normalized_shape)))
        if want_w:
            a_hat = F.layer_norm(a, mod.normalized_shape, eps=mod.eps)
            gw = (delta * a_hat).sum(dims) if dims else delta * a_hat
        if want_b:
            gb = delta.sum(dims) if dims else delta
    elif isinstance(mod, nn.Embedding):
        onehot = F.one_hot(a.reshape(n, -1), mod.num_embeddings).to(delta.dtype)
        gw = torch.bmm(onehot.transpose(1, 2), delta.reshape(n, -1, delta.shape[-1]))
    return gw, gb
