"""Factorised (LoGra-style) featurization: equal to the Kronecker projection of the materialised
per-sample gradients (torch.func reference), exact norms, batch invariance, stores and queries."""

from __future__ import annotations

import pytest
import torch

from ctrak_fast.engine.projection import FactorizedSpec
from ctrak_fast.engine.store import FeatureStore
from ctrak_fast.kernels import factorized_seeds, hashing
from ctrak_fast.method.dataset_features import featurize_dataset
from ctrak_fast.method.diffusion import NoiseSchedule
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.grads.factorized import FactorizedGrads, layer_sq_norm
from ctrak_fast.method.grads.per_sample import PerSampleGrads
from ctrak_fast.method.losses import residual
from ctrak_fast.method.query import ConceptQuerySpec, concept_query_features

NULL = torch.tensor([3, 2])
SPEC = FactorizedSpec(k_in=4, k_out=3, seed=7)


def _inputs(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.tensor([99, 499, 899, 10, 700][:n])
    cond = torch.stack([torch.arange(n) % 3, torch.arange(n) % 2], 1)
    return x, t, cond, torch.randn(n, 3, 8, 8, generator=g)


def _close(got, want, rel=1e-5):
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=rel * want.abs().max().item())


def _kronecker_reference(model, fg: FactorizedGrads, x, t, cond, r, scale):
    """Materialise every per-sample gradient scale * J^T r with torch.func, then
    P_outᵀ [W_b | b_b] P_in per layer; also the exact squared norms over the covered parameters."""
    ref = PerSampleGrads(model, None, backend="func")  # computes (2/D) J^T r
    c = scale / (2.0 / r[0].numel())
    g = {s.name: b * c for s, (_, b) in zip(ref.slots, ref(x, t, cond, r), strict=True)}
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    feats, sq = [], torch.zeros(len(x), dtype=torch.float64)
    for _, wname, layer, bias in fg.layers:
        W = g[wname].reshape(len(x), shapes[wname][0], -1)
        if bias:
            W = torch.cat([W, g[wname[: -len("weight")] + "bias"][:, :, None]], 2)
        s_in, s_out = factorized_seeds(SPEC.seed, layer)
        P_in = hashing.rademacher_block(s_in, 0, W.shape[2], SPEC.k_in).double()
        P_out = hashing.rademacher_block(s_out, 0, W.shape[1], SPEC.k_out).double()
        feats.append((P_out.T @ W.double() @ P_in).flatten(1))
        sq += W.double().pow(2).sum((1, 2))
    return torch.cat(feats, 1), sq


@pytest.mark.parametrize("param_filter", [None, "attentions"])
def test_features_are_the_kronecker_projection_of_the_gradient(tiny_unet, param_filter):
    fg = FactorizedGrads(tiny_unet, param_filter, SPEC)
    x, t, cond, r = _inputs()
    phi, sq = fg(x, t, cond, r, 0.5)
    want, want_sq = _kronecker_reference(tiny_unet, fg, x, t, cond, r, 0.5)
    assert phi.shape == (3, fg.k) and fg.k == len(fg.layers) * SPEC.k
    # float32 sums of many terms: absolute tolerance relative to the largest entry
    _close(phi, want)
    torch.testing.assert_close(sq.double(), want_sq, rtol=1e-4, atol=0)
    if param_filter:
        assert fg.layers and all("attentions" in w for w in fg.layer_names)
    else:  # norms and embeddings are not covered, and say so
        assert any("norm" in n for n in fg.skipped) and any("embed" in n for n in fg.skipped)
        assert not any(n.endswith(("to_q.weight", "conv1.weight")) for n in fg.skipped)


def _conv_grads(conv, a, d):
    """Per-sample (weight, bias) gradients of <conv(a), d> by torch.func."""

    def one(a1, d1):
        def inner(w, b):
            return (torch.nn.functional.conv2d(a1[None], w, b, padding=1) * d1[None]).sum()

        return torch.func.grad(inner, argnums=(0, 1))(conv.weight.detach(), conv.bias.detach())

    return torch.func.vmap(one)(a, d)


def test_ghost_norm_and_explicit_norm_agree():
    g = torch.Generator().manual_seed(0)
    for T, d_in, d_out in [(3, 40, 50), (60, 5, 4)]:  # ghost branch, then explicit
        lin = torch.nn.Linear(d_in, d_out)
        pairs = [  # a layer called twice: the norm is of the summed gradient
            (torch.randn(2, T, d_in, generator=g), torch.randn(2, T, d_out, generator=g))
            for _ in range(2)
        ]
        A, G = (torch.cat(side, 1) for side in zip(*pairs, strict=True))
        for bias in (False, True):
            A1 = torch.cat([A, torch.ones(*A.shape[:2], 1)], 2) if bias else A
            want = torch.bmm(G.transpose(1, 2), A1).pow(2).sum((1, 2))
            torch.testing.assert_close(layer_sq_norm(lin, pairs, bias), want, rtol=1e-5, atol=1e-5)
    for size, c_in, c_out in [(2, 16, 32), (12, 3, 8)]:  # ghost branch, then grouped conv
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        a = torch.randn(2, c_in, size, size, generator=g)
        d = torch.randn(2, c_out, size, size, generator=g)
        for bias in (False, True):
            want = _conv_grads(conv, a, d)
            want = want[0].pow(2).sum((1, 2, 3, 4)) + (want[1].pow(2).sum(1) if bias else 0)
            got = layer_sq_norm(conv, [(a, d)], bias)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_features_do_not_depend_on_the_batch(tiny_unet):
    fg = FactorizedGrads(tiny_unet, None, SPEC)
    x, t, cond, r = _inputs(4)
    phi, sq = fg(x, t, cond, r, 1.0)
    for i in range(4):
        one, sq1 = fg(x[i : i + 1], t[i : i + 1], cond[i : i + 1], r[i : i + 1], 1.0)
        _close(one[0], phi[i].double())
        torch.testing.assert_close(sq1[0], sq[i], rtol=1e-4, atol=0)


def test_filter_without_linear_or_conv_weights_is_refused(tiny_unet):
    with pytest.raises(ValueError, match="selects no Linear or Conv2d weight"):
        FactorizedGrads(tiny_unet, r"norm", SPEC)


def _featurizer(model, **kw):
    spec = FeatureSpec(**{"timesteps": (99, 499), "inversion": False, "loss": "dsm", **kw})
    return Featurizer(model, NoiseSchedule(), spec, SPEC, NULL)


def test_featurizer_sums_unit_normalised_timesteps(tiny_unet):
    fz = _featurizer(tiny_unet)
    x, _, cond, _ = _inputs(2)
    phi, _ = fz(x, cond)
    fg = FactorizedGrads(tiny_unet, None, SPEC)
    want = torch.zeros(2, fz.k, dtype=torch.float64)
    for ts in fz.spec.timesteps:
        x_t = fz.trajectory(x, cond)[ts]
        tt = torch.full((2,), ts)
        r, _ = residual(
            "dsm", tiny_unet, fz.schedule, x_t, tt, cond, x0=x, noise=fz.noise(x.shape[1:])[ts]
        )
        f, sq = _kronecker_reference(tiny_unet, fg, x_t, tt, cond, r, 2.0 / r[0].numel())
        want += f / sq.sqrt()[:, None]
    _close(phi, want)
    with pytest.raises(AttributeError, match="factorized"):
        fz.projector  # noqa: B018


def test_factorized_store_and_query(tiny_unet, tmp_path):
    fz = _featurizer(tiny_unet, loss="dps", inversion=True, inversion_steps=10)
    x, _, cond, _ = _inputs(4)
    store = featurize_dataset(
        fz, x, cond, torch.arange(4), tmp_path / "s", batch_size=2, shard_rows=2, progress=False
    )
    assert isinstance(store, FeatureStore) and store.k == fz.k and store.n_rows == 4
    proj = store.meta["projection"]
    assert (
        proj["kind"] == "factorized"
        and proj["layers"] == FactorizedGrads(tiny_unet, None, SPEC).layer_names
    )
    q = concept_query_features(
        fz,
        ConceptQuerySpec(timesteps=(99, 499), n_draws=2, steps=10),
        torch.tensor([1, 0]),
        [torch.tensor([3, 0]), torch.tensor([1, 2])],
        image=x[1],
    )
    assert q.shape == (2, fz.k) and torch.isfinite(q).all() and (q != 0).any()


def test_attributor_with_a_factorized_projection(tmp_path):
    from ctrak_fast import Attributor, FactorizedSpec, shipped_dataset, shipped_model

    spec = FeatureSpec(timesteps=(499,), inversion_steps=10)
    att = Attributor(shipped_model(), projection=FactorizedSpec(k_in=2, k_out=2), feature=spec)
    assert att.k == 4 * len(att.featurizer.meta()["projection"]["layers"])
    store = att.featurize(shipped_dataset(per_combo=1), tmp_path / "s", batch_size=7)
    q = att.query("shape=triangle,colour=red", draws="global", n_draws=1)
    res = att.attribute(q, store, k=3)
    assert q.features.shape == (2, att.k) and res.top_ids.shape == (2, 3)
