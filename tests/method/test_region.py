"""Region queries: the query's loss restricted to a part of the image (a box or a mask), checked
against the literal masked loss by autograd, on the pixel grid and on a coarser (latent) grid."""

from __future__ import annotations

import pytest
import torch

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.method.diffusion import NoiseSchedule
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.grads.layout import flatten_blocks
from ctrak_fast.method.losses import region_mask, region_weight
from ctrak_fast.method.query import ConceptQuerySpec, concept_query_features, image_query_features

NULL = torch.tensor([3, 2])


def _featurizer(model, **kw):
    spec = FeatureSpec(
        **{"loss": "eps-norm", "inversion": False, "timesteps": (299,), "normalize": False, **kw}
    )
    return Featurizer(
        model, NoiseSchedule(), spec, ProjectionSpec(k=16, seed=3), NULL,
        projector_backend="reference",
    )  # fmt: skip


def test_region_weight_by_hand():
    mask = region_mask((2, 0, 6, 2), 4, 8)  # x in [2, 6), y in [0, 2): 8 of 32 pixels
    assert mask.sum() == 8 and mask[0, 2] == 1 and mask[2, 2] == 0 and mask[0, 6] == 0
    w = region_weight(mask, (4, 8))
    assert w.shape == (1, 1, 4, 8) and torch.allclose(w.sum(), torch.tensor(32.0))
    assert w[0, 0, 0, 2] == 4.0  # 32 pixels / 8 inside
    # a latent grid 2 x 4: each cell weighs the part of its 2 x 2 pixels inside the box
    lat = region_weight(mask, (2, 4))
    assert lat[0, 0].tolist() == [[0.0, 4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="not inside"):
        region_mask((0, 0, 9, 2), 4, 8)
    with pytest.raises(ValueError, match="empty"):
        region_mask(torch.zeros(4, 8), 4, 8)
    with pytest.raises(ValueError, match="image 4 x 8"):
        region_mask(torch.ones(3, 3), 4, 8)


def test_region_image_query_is_the_gradient_of_the_masked_loss(tiny_unet):
    """Features of an image query with a region = the projected per-sample gradient of
    sum over the region of eps^2 / its area (D-TRAK's loss restricted to the region)."""
    fz = _featurizer(tiny_unet)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.tensor([[0, 1], [2, 0]])
    w = region_weight(region_mask((1, 2, 5, 7), 8, 8), (8, 8))
    blocks, _ = fz.gradient_sum(x0, cond, w)
    got = flatten_blocks(blocks)
    x_t = fz.trajectory(x0, cond)[299]
    params = dict(tiny_unet.named_parameters())
    inside = w[0, 0] > 0
    for b in range(2):
        eps = tiny_unet(x_t[b : b + 1], torch.tensor([299]), cond[b : b + 1])
        loss = eps[0][:, inside].pow(2).sum() / (3 * inside.sum())  # mean over the region only
        grads = torch.autograd.grad(loss, [params[s.name] for s in fz.grads.slots])
        want = torch.cat([gr.flatten() for gr in grads])
        torch.testing.assert_close(got[b], want, atol=1e-6, rtol=1e-4)
    # the projected features are those gradients, and differ from the whole image's
    feats = image_query_features(fz, x0, cond, w)
    torch.testing.assert_close(feats, fz.features(blocks))
    assert not torch.allclose(feats, image_query_features(fz, x0, cond))


def test_a_region_of_the_whole_image_is_no_region(tiny_unet):
    fz = _featurizer(tiny_unet)
    spec = ConceptQuerySpec(timesteps=(299,), n_draws=2, seed=4)
    pos, negs = torch.tensor([1, 0]), [torch.tensor([3, 0])]
    image = torch.rand(3, 8, 8) * 2 - 1
    whole = region_weight(torch.ones(8, 8), (8, 8))
    plain = concept_query_features(fz, spec, pos, negs, image=image)
    torch.testing.assert_close(
        concept_query_features(fz, spec, pos, negs, image=image, region=whole), plain
    )
    part = region_weight(region_mask((0, 0, 4, 4), 8, 8), (8, 8))
    assert not torch.allclose(
        concept_query_features(fz, spec, pos, negs, image=image, region=part), plain
    )


def test_attributor_region_query_and_its_errors():
    from ctrak_fast.api import Attributor, shipped_dataset, shipped_model

    att = Attributor(
        shipped_model(), "concept-trak-cond", projection=ProjectionSpec(k=32),
        feature=FeatureSpec(timesteps=(299,), inversion_steps=10),
    )  # fmt: skip
    image = shipped_dataset(per_combo=1).images[0]
    q = att.query("shape=circle,colour=red", image=image, region=(4, 4, 12, 12), n_draws=1)
    assert q.meta["region"] == [4, 4, 12, 12] and torch.isfinite(q.features).all()
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    qm = att.query("shape=circle,colour=red", image=image, region=mask, n_draws=1)
    torch.testing.assert_close(qm.features, q.features)
    with pytest.raises(ValueError, match="not inside"):
        att.query("shape=circle", image=image, region=(0, 0, 17, 4), n_draws=1)
    with pytest.raises(ValueError, match="draws='local'"):
        att.query("shape=circle", region=(0, 0, 4, 4), draws="global", n_draws=1)
