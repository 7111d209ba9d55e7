"""The CFG negatives of the authors' recipe (METHOD.md §10), for factor models.

- Training-side inversion: ours guides against the null token; the authors' code guides against a
  random other condition, redrawn at every inversion step (their toy model has no null token).
  `InversionNegatives` gives each factor a uniformly random *other* value per sample and step, or
  every factor flipped (two-valued factors).
- Concept queries: `DrawnNegative` is a c- drawn per draw among the concept's other values, as the
  authors' global queries draw it; with two values it is the single flipped c-.

Every draw comes from a generator seeded by the sample's own bytes, so a feature does not depend on
the batch it was made in (stores resume and merge bit for bit).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def sample_seed(seed: int, *tensors: torch.Tensor) -> int:
    """A 63-bit seed from `seed` and the bytes of the tensors (one sample's x0 and cond)."""
    h = hashlib.sha256(str(seed).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def other_values(
    cond: torch.Tensor, n_values: Sequence[int], gens: Sequence[torch.Generator]
) -> torch.Tensor:
    """cond [B, F] with every factor set to a uniformly random other value (one generator per
    sample): value v' = (v + 1 + u) mod n, u uniform in [0, n - 2], so v' != v."""
    n = torch.tensor([int(v) for v in n_values], dtype=torch.int64)
    if (n < 2).any():
        raise ValueError(f"every factor needs >= 2 values for a random other value, got {n_values}")
    u = torch.stack([(torch.rand(len(n), generator=g) * (n - 1)).long() for g in gens])
    return (cond.cpu() + 1 + u.clamp(max=n - 2)) % n


def flip_all(cond: torch.Tensor, n_values: Sequence[int]) -> torch.Tensor:
    """cond [B, F] with every factor flipped to its other value (two-valued factors only)."""
    if any(int(v) != 2 for v in n_values):
        raise ValueError(
            f"inversion_negative='flip' needs two-valued factors, the model has {list(n_values)} "
            "values: use 'random'"
        )
    return 1 - cond


class InversionNegatives:
    """The inversion's CFG negative at step i, [B, F]: `how` "random" (each factor a random other
    value, redrawn every step) or "flip" (each factor flipped, the same every step)."""

    def __init__(
        self,
        how: str,
        x0: torch.Tensor,
        cond: torch.Tensor,
        n_values: Sequence[int],
        seed: int,
    ) -> None:
        if how not in ("random", "flip"):
            raise ValueError(f"inversion negatives are 'random' or 'flip', got {how!r}")
        if cond.is_floating_point() or cond.ndim != 2:
            raise ValueError("random or flipped inversion negatives need factor conditions [B, F]")
        self.how, self.cond, self.n_values = how, cond.to(torch.int64), list(n_values)
        self.device = cond.device
        if how == "flip":
            self.fixed = flip_all(self.cond, self.n_values)
        else:
            self.gens = [
                torch.Generator().manual_seed(sample_seed(seed, x0[b], cond[b]))
                for b in range(len(cond))
            ]

    def __call__(self, step: int) -> torch.Tensor:
        if self.how == "flip":
            return self.fixed
        return other_values(self.cond, self.n_values, self.gens).to(self.device)


@dataclass(frozen=True)
class DrawnNegative:
    """A concept query's c-, drawn per draw among `choices` (the concept set to each of its other
    values): the authors' random c- for the query draws and the slider. Two values: one choice."""

    choices: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("a drawn c- needs at least one choice")

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, ...]: one choice per draw, uniformly."""
        idx = torch.randint(len(self.choices), (n,), generator=generator)
        return torch.stack(self.choices)[idx]
