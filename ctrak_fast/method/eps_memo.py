"""The model's eps at a concept query's draw points, each (batch, condition) computed once.

Why: the slider of every (c+, c-) pair of a query evaluates eps at the same draw points, and the
pairs share their conditions. A context-averaged query over a 4 x 4 factor grid (the demo's
concept-trak-cond) asks for 64 (batch, condition) evaluations of which 16 are distinct, and the
published concept-trak of the same query asks for 7 more of those 16. Each entry is the very
call it replaces (same model, same batch of points, same condition), so the features are the
same to the bit; the memo only drops repeated forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ctrak_fast.method.featurize import Featurizer

__all__ = ["EpsMemo", "shared_eps_memo"]

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # eps(x_t, t, c)


class EpsMemo:
    """eps of `model` at draw points x [n,...], t [n], in batches of `batch_size` points (the
    slider's batches), memoised per (batch, condition). Memory: one eps [batch, ...] per distinct
    (batch, condition) asked for.

    Examples:
        >>> model = lambda x, t, c: x * c.float().sum()  # any eps(x_t, t, c)
        >>> memo = EpsMemo(model, torch.ones(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), 2)
        >>> memo.eps(2, torch.tensor([1, 2])).shape  # the batch of points 2.. (one point)
        torch.Size([1, 1, 2, 2])
    """

    def __init__(self, model: EpsModel, x: torch.Tensor, t: torch.Tensor, batch_size: int) -> None:
        self.model, self.x, self.t, self.batch_size = model, x, t, int(batch_size)
        self._eps: dict[tuple[Any, ...], torch.Tensor] = {}

    def covers(self, model: EpsModel, x: torch.Tensor, t: torch.Tensor, batch_size: int) -> bool:
        """Whether this memo answers for `model` at these points (the same tensors) and batches."""
        return model is self.model and x is self.x and t is self.t and batch_size == self.batch_size

    @torch.no_grad()
    def eps(self, start: int, cond: torch.Tensor) -> torch.Tensor:
        """eps [b, ...] of the batch of points x[start : start + batch_size] under one condition
        cond [...] (factor indices [F], or an embedding), broadcast over the batch."""
        if start % self.batch_size or not 0 <= start < len(self.x):
            raise ValueError(f"{start} is not the start of a batch of {self.batch_size} points")
        c = cond.detach().cpu().contiguous()
        key = (start, c.dtype, tuple(c.shape), c.reshape(-1).view(torch.uint8).numpy().tobytes())
        if key not in self._eps:
            end = start + self.batch_size
            xb, tb = self.x[start:end], self.t[start:end]
            self._eps[key] = self.model(xb, tb, cond.unsqueeze(0).expand(len(xb), *cond.shape))
        return self._eps[key]


def shared_eps_memo(
    featurizer: Featurizer, x: torch.Tensor, t: torch.Tensor, batch_size: int
) -> EpsMemo:
    """The EpsMemo of these draw points: the one the featurizers of a run share through their
    inversion cache when it covers them (the concept methods of one query draw the same cached
    points), else a new one, which the cache then keeps (only the latest: a query's methods run
    one after another, so memory stays one query's)."""
    cache = featurizer.inversion_cache
    held = None if cache is None else cache.query_eps
    if isinstance(held, EpsMemo) and held.covers(featurizer.model, x, t, batch_size):
        return held
    memo = EpsMemo(featurizer.model, x, t, batch_size)
    if cache is not None:
        cache.query_eps = memo
    return memo
