"""Per-sample gradients: hooks vs torch.func vs a loop of single-sample backward passes."""

from __future__ import annotations

import pytest
import torch

from ctrak_fast.method.grads.layout import flatten_blocks, parameter_layout
from ctrak_fast.method.grads.per_sample import PerSampleGrads

TOL = dict(atol=2e-6, rtol=1e-4)  # float32, different summation orders


def _batch(n=4):
    x = torch.randn(n, 3, 8, 8)
    t = torch.randint(0, 1000, (n,))
    cond = torch.stack([torch.randint(0, 4, (n,)), torch.randint(0, 3, (n,))], 1)
    return x, t, cond, torch.randn(n, 3, 8, 8)


def _loop(model, x, t, cond, r, names):
    named = dict(model.named_parameters())
    rows = []
    for b in range(len(x)):
        eps = model(x[b : b + 1], t[b : b + 1], cond[b : b + 1])
        loss = (eps * r[b : b + 1]).sum() * 2 / r[0].numel()
        gs = torch.autograd.grad(loss, [named[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(named[n])).flatten()
                    for g, n in zip(gs, names, strict=True)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize(
    "param_filter", [None, "attentions", r"attentions\.0\.to_(q|k|v)", r"embed|norm"]
)
@pytest.mark.parametrize("backend", ["hooks", "func"])
def test_per_sample_grads_match_loop(tiny_unet, backend, param_filter):
    x, t, cond, r = _batch()
    grads = PerSampleGrads(tiny_unet, param_filter, backend=backend)
    names = [s.name for s in grads.slots]
    got = flatten_blocks(grads(x, t, cond, r))
    torch.testing.assert_close(got, _loop(tiny_unet, x, t, cond, r, names), **TOL)
    assert got.shape == (4, grads.n_selected)


def test_filter_keeps_full_model_offsets(tiny_unet):
    full = {s.name: s.offset for s in parameter_layout(tiny_unet)}
    for s in parameter_layout(tiny_unet, "attentions"):
        assert s.offset == full[s.name]


def test_filter_matching_nothing_is_an_error(tiny_unet):
    with pytest.raises(ValueError, match="matches no parameter"):
        PerSampleGrads(tiny_unet, "no_such_layer")


def test_hooks_do_not_touch_param_grads(tiny_unet):
    x, t, cond, r = _batch(2)
    PerSampleGrads(tiny_unet, backend="hooks")(x, t, cond, r)
    assert all(p.grad is None for p in tiny_unet.parameters())
