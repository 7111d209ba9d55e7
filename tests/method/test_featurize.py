"""Training-side features: exact per-timestep normalisation, linear projection, resume, DAS rows."""

from __future__ import annotations

import pytest
import torch
from helpers import NULL, TS, small_featurizer

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.store import FeatureStore
from ctrak_fast.method.dataset_features import featurize_dataset
from ctrak_fast.method.diffusion import NoiseSchedule
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.grads.layout import blocks_sq_norm, flatten_blocks
from ctrak_fast.method.query import ConceptQuerySpec, concept_query_features


def _data(n=6):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.stack([torch.arange(n) % 3, torch.arange(n) % 2], 1)
    return x, cond, torch.arange(100, 100 + n)


@pytest.mark.parametrize(
    "loss,inversion", [("dps", True), ("dps", False), ("dsm", False), ("eps-norm", False)]
)
def test_per_timestep_normalisation_uses_exact_norm(tiny_unet, loss, inversion):
    x, cond, _ = _data(3)
    fz = small_featurizer(tiny_unet, loss=loss, inversion=inversion, timesteps=(299,))
    blocks, _ = fz.gradient_sum(x, cond)
    torch.testing.assert_close(blocks_sq_norm(blocks), torch.ones(3), atol=1e-5, rtol=0)
    raw, _ = small_featurizer(
        tiny_unet, loss=loss, inversion=inversion, timesteps=(299,), normalize=False
    ).gradient_sum(x, cond)
    g = flatten_blocks(raw)
    torch.testing.assert_close(
        flatten_blocks(blocks), g / g.norm(dim=1, keepdim=True), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("fused", [False, True], ids=["materialised", "fused-linear"])
@pytest.mark.parametrize("param_filter", [None, "attentions"])
@pytest.mark.parametrize("loss,normalize", [("dps", True), ("eps-norm", False)])
def test_layerwise_projection_equals_the_projected_gradient_sum(
    tiny_unet, monkeypatch, fused, param_filter, loss, normalize
):
    # Layer by layer, per timestep, normalised after projecting: the same features as summing the
    # normalised gradients in parameter space and projecting once (to float32 rounding).
    from ctrak_fast.method.grads import layerwise as grads_layerwise

    if fused:  # the wiring of the fused linear kernel (its CPU reference here; Triton on CUDA)
        linear = lambda mod, calls, device: isinstance(mod, torch.nn.Linear)  # noqa: E731
        monkeypatch.setattr(grads_layerwise, "use_fused_linear", linear)
    x, cond, _ = _data(3)
    kw = dict(loss=loss, normalize=normalize, param_filter=param_filter, inversion=loss == "dps")
    spec = FeatureSpec(**{"timesteps": TS, "inversion_steps": 10, **kw})
    fz = [
        Featurizer(tiny_unet, NoiseSchedule(), spec, ProjectionSpec(k=24, seed=3), NULL, **extra)
        for extra in ({"layerwise": False}, {"layerwise": True})
    ]
    assert fz[0].layerwise_projector is None and fz[1].layerwise_projector is not None
    want, dsm_want = fz[0](x, cond)
    got, dsm_got = fz[1](x, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(dsm_got, dsm_want, equal_nan=True)
    with pytest.raises(ValueError, match="hooks"):
        Featurizer(
            tiny_unet, NoiseSchedule(), spec, ProjectionSpec(k=4), NULL, "func", layerwise=True
        )


def test_features_are_the_projected_gradient_sum(tiny_unet):
    x, cond, _ = _data(3)
    fz = small_featurizer(tiny_unet, loss="dsm", inversion=False)
    blocks, _ = fz.gradient_sum(x, cond)
    phi, _ = fz(x, cond)
    torch.testing.assert_close(phi, fz.projector.project_blocks(blocks))


def test_featurize_resume_is_byte_identical(tiny_unet, tmp_path):
    x, cond, ids = _data(8)
    fz = small_featurizer(tiny_unet, loss="eps-norm", inversion=False)
    featurize_dataset(
        fz, x, cond, ids, tmp_path / "full", batch_size=2, shard_rows=4, progress=False
    )

    class Crash(RuntimeError):
        pass

    calls = {"n": 0}
    real = fz.__call__

    def crashing(x0, c):
        calls["n"] += 1
        if calls["n"] == 4:  # after the first shard (2 batches) and half of the second
            raise Crash
        return real(x0, c)

    fz.__call__ = crashing
    with pytest.raises(Crash):
        featurize_dataset(
            _Wrap(fz, crashing),
            x,
            cond,
            ids,
            tmp_path / "resumed",
            batch_size=2,
            shard_rows=4,
            progress=False,
        )
    assert FeatureStore.open(tmp_path / "resumed").n_rows == 4
    featurize_dataset(
        fz, x, cond, ids, tmp_path / "resumed", batch_size=2, shard_rows=4, progress=False
    )
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "manifest.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


class _Wrap:
    """A featurizer whose call is replaced (to inject a crash); specs are the original's."""

    def __init__(self, inner, call):
        self.inner, self.call = inner, call
        self.spec, self.projection, self.k = inner.spec, inner.projection, inner.k

    def meta(self):
        return self.inner.meta()

    def __call__(self, x0, c):
        return self.call(x0, c)


def test_das_rows_are_dtrak_rows_times_dsm(tiny_unet, tmp_path):
    x, cond, ids = _data(4)
    fz = small_featurizer(tiny_unet, loss="eps-norm", inversion=False)
    featurize_dataset(
        fz,
        x,
        cond,
        ids,
        tmp_path / "d",
        batch_size=2,
        shard_rows=2,
        das_path=tmp_path / "das",
        progress=False,
    )
    phi, _ = FeatureStore.open(tmp_path / "d").read_all()
    das, das_ids = FeatureStore.open(tmp_path / "das").read_all()
    _, dsm = fz(x, cond)
    torch.testing.assert_close(das, phi * dsm[:, None])
    assert torch.equal(das_ids, ids)


def test_store_of_other_samples_is_refused(tiny_unet, tmp_path):
    x, cond, ids = _data(4)
    fz = small_featurizer(tiny_unet, loss="eps-norm", inversion=False)
    featurize_dataset(fz, x, cond, ids, tmp_path / "s", batch_size=2, shard_rows=2, progress=False)
    with pytest.raises(ValueError, match="other samples"):
        featurize_dataset(
            fz, x, cond, ids + 1, tmp_path / "s", batch_size=2, shard_rows=2, progress=False
        )


@pytest.mark.parametrize("draws", ["local", "global"])
def test_concept_query_is_mean_of_normalised_slider_grads(tiny_unet, draws):
    fz = small_featurizer(tiny_unet)
    tiny_unet.config = {"image_size": 8, "in_channels": 3}
    tiny_unet.null_cond = lambda b, device=None: NULL.expand(b, -1)
    spec = ConceptQuerySpec(draws=draws, n_draws=2, steps=10, timesteps=TS, guidance=2.0)
    pos = torch.tensor([1, 0])
    negs = [torch.tensor([3, 0]), torch.tensor([1, 2])]
    image = torch.rand(3, 8, 8) * 2 - 1
    q = concept_query_features(fz, spec, pos, negs, image=image)
    assert q.shape == (2, 16) and torch.isfinite(q).all()
    # Recompute the first query by hand from the same draw points.
    from ctrak_fast.method.query import draw_points

    x, t = draw_points(fz, spec, pos, negs[0], image)
    with torch.no_grad():
        d = tiny_unet(x, t, pos.expand(len(x), -1)) - tiny_unet(x, t, negs[0].expand(len(x), -1))
    g = flatten_blocks(fz.grads(x, t, pos.expand(len(x), -1), -spec.weight * d))
    mean = (g / g.norm(dim=1, keepdim=True)).mean(0, keepdim=True)
    full = torch.zeros(1, fz.grads.dim)
    off = 0
    for s in fz.grads.slots:
        full[:, s.offset : s.offset + s.numel] = mean[:, off : off + s.numel]
        off += s.numel
    torch.testing.assert_close(q[:1], fz.projector.project(full), atol=1e-5, rtol=1e-4)


def test_flipped_negative_averages_the_negatives(tiny_unet):
    """c- as a list (the concept flipped to each other value): eps(c-) is their mean, so without
    normalisation the feature is the mean of the single-negative features (the slider is linear
    in d)."""
    from ctrak_fast.method.query import slider_features
    from ctrak_fast.models.factor_unet import flip_factor

    fz = small_featurizer(tiny_unet)
    spec = ConceptQuerySpec(normalize=False)
    pos = torch.tensor([1, 0])
    flips = flip_factor(pos, 0, [3, 2])
    assert [c.tolist() for c in flips] == [[0, 0], [2, 0]]
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([99, 499, 899])
    both = slider_features(fz, spec, pos, flips, x, t)
    each = [slider_features(fz, spec, pos, c, x, t) for c in flips]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2, atol=1e-6, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("param_filter", [None, "attentions"])
def test_cuda_layerwise_features_match_the_cpu_path(tiny_unet, param_filter):
    # On CUDA the Featurizer projects layer by layer (Triton linear_grad_project for the attention
    # projections, Triton rademacher_project for the rest): same features as the CPU's
    # sum-then-project path with the fused C++ kernel.
    import copy

    x, cond, _ = _data(4)
    spec = FeatureSpec(timesteps=TS, inversion_steps=10, loss="dps", param_filter=param_filter)
    proj = ProjectionSpec(k=64, seed=3)
    cpu = Featurizer(tiny_unet, NoiseSchedule(), spec, proj, NULL)
    gpu_model = copy.deepcopy(tiny_unet).cuda()
    gpu = Featurizer(gpu_model, NoiseSchedule(), spec, proj, NULL.cuda())
    assert gpu.layerwise_projector is not None and cpu.layerwise_projector is None
    want, _ = cpu(x, cond)
    got, _ = gpu(x.cuda(), cond.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
