"""method/eps_memo.py: the query side's eps, each (batch, condition) computed once; the concept
features it gives are the ones of the plain calls to the bit, with fewer forwards."""

from __future__ import annotations

import pytest
import torch
from helpers import NULL, TS, small_featurizer

from ctrak_fast.method.eps_memo import EpsMemo, shared_eps_memo
from ctrak_fast.method.featurize import InversionCache
from ctrak_fast.method.query import (
    ConceptQuerySpec,
    concept_query_features,
    context_concept_features,
    draw_negatives,
    draw_points,
    slider_features,
)


class Counted(torch.nn.Module):
    """The model, counting its forwards outside autograd (the slider's eps calls)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.no_grad_calls = model, 0
        self.config = {"image_size": 8, "in_channels": 3}
        self.n_values = model.n_values

    def null_cond(self, b, device=None):
        return NULL.expand(b, -1)

    def forward(self, x, t, cond):
        self.no_grad_calls += not torch.is_grad_enabled()
        return self.model(x, t, cond)


def query_setup(tiny_unet):
    model = Counted(tiny_unet)
    fz = small_featurizer(model)
    # 3 draws x 2 timesteps = 6 points in batches of 4 and 2
    spec = ConceptQuerySpec(n_draws=3, steps=10, timesteps=TS, guidance=2.0, contexts=True)
    return model, fz, spec, torch.tensor([1, 0]), torch.rand(3, 8, 8) * 2 - 1


def test_context_features_equal_the_plain_slider_calls_to_the_bit(tiny_unet):
    model, fz, spec, pos, image = query_setup(tiny_unet)
    # factor 0's contexts: c+ = (1, v), c- its flips (u, v), u != 1: every pair reads the others'
    # conditions, as the demo's 4 x 4 grid does
    contexts = [
        [(torch.tensor([1, v]), [torch.tensor([u, v]) for u in (0, 2)]) for v in (0, 1)],
        [(torch.tensor([u, 0]), [torch.tensor([u, 1])]) for u in (0, 1, 2)],
    ]
    fz.inversion_cache = InversionCache()  # the draws are inverted once, for both paths
    x, t = draw_points(fz, spec, pos, None, image)
    model.no_grad_calls = 0
    plain = torch.stack(
        [
            torch.stack(
                [slider_features(fz, spec, c, n, x, t, batch_size=4) for c, n in pairs]
            ).mean(0)
            for pairs in contexts
        ]
    )
    plain_calls, model.no_grad_calls = model.no_grad_calls, 0
    got = context_concept_features(fz, spec, pos, contexts, image=image, batch_size=4)
    assert torch.equal(got, plain)  # the very same calls: not a rounding apart
    # 2 batches x (2 pairs x 3 + 3 pairs x 2) asked; 2 batches x the 6 distinct conditions made
    assert (plain_calls, model.no_grad_calls) == (2 * (2 * 3 + 3 * 2), 2 * 6)


def test_concept_query_features_share_one_memo_across_rows(tiny_unet):
    model, fz, spec, pos, image = query_setup(tiny_unet)
    spec = ConceptQuerySpec(**{**spec.to_dict(), "contexts": False})
    negs = [[torch.tensor([0, 0]), torch.tensor([2, 0])], torch.tensor([1, 1])]
    x, t = draw_points(fz, spec, pos, None, image)
    plain = torch.stack(
        [slider_features(fz, spec, pos, draw_negatives(spec, n)[1], x, t) for n in negs]
    )
    assert torch.equal(concept_query_features(fz, spec, pos, negs, image=image), plain)


def test_memo_answers_each_batch_and_condition_once():
    calls = []

    def model(x, t, c):
        calls.append(len(x))
        return x * c.float().sum(1).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)

    x, t = torch.randn(5, 1, 2, 2), torch.arange(5)
    memo = EpsMemo(model, x, t, 2)
    a, b = torch.tensor([1, 2]), torch.tensor([0, 2])
    first = memo.eps(0, a)
    assert memo.eps(0, a.clone()) is first  # same condition by value: no second forward
    torch.testing.assert_close(first, model(x[:2], t[:2], a.expand(2, 2)), rtol=0, atol=0)
    memo.eps(0, b)
    last = memo.eps(4, a)  # the short last batch
    assert last.shape == (1, 1, 2, 2)
    assert calls == [2, 2, 2, 1]  # (0, a), the check's own call, (0, b), (4, a)
    with pytest.raises(ValueError, match="start of a batch"):
        memo.eps(1, a)
    with pytest.raises(ValueError, match="start of a batch"):
        memo.eps(6, a)


def test_shared_memo_follows_the_cached_draws(tiny_unet):
    model, fz, spec, pos, image = query_setup(tiny_unet)
    fz.inversion_cache = InversionCache()
    x, t = draw_points(fz, spec, pos, None, image)
    memo = shared_eps_memo(fz, x, t, 4)
    # a second featurizer of the same run (another method) draws the same cached points
    other = small_featurizer(model, normalize="layer")
    other.inversion_cache = fz.inversion_cache
    x2, t2 = draw_points(other, spec, pos, None, image)
    assert x2 is x and shared_eps_memo(other, x2, t2, 4) is memo
    assert shared_eps_memo(fz, x, t, 2) is not memo  # other batches: a new memo, kept instead
    assert fz.inversion_cache.query_eps.batch_size == 2
    fz.inversion_cache = None
    assert shared_eps_memo(fz, x, t, 4) is not shared_eps_memo(fz, x, t, 4)  # no cache: per call
    with pytest.raises(ValueError, match="other draw points"):
        slider_features(fz, spec, pos, torch.tensor([0, 0]), x.clone(), t, 4, memo=memo)
