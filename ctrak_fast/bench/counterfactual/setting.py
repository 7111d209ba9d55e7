"""The counterfactual setting: a training set, a model and a training recipe small enough to
retrain a hundred times on two CPU cores, written down in one JSON file that ships
(assets/counterfactual/<name>/setting.json), with the subset masks derived from it.

The data are the synthetic shapes with a count per (shape, colour) combination: two values
(`rare`) are carried by few images, so that removing a few percent of the training set can take
a concept away from the model, which is what remove-and-retrain measures.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ctrak_fast.data import ConceptDataset, SyntheticConfig, make_dataset
from ctrak_fast.engine.atomic import atomic_write_text

__all__ = ["CounterfactualSetting", "subset_masks", "mask_to_text", "mask_from_text"]

FORMAT = "ctrak-counterfactual/1"


@dataclass
class CounterfactualSetting:
    """Everything that determines the ground truth (saved as setting.json).

    shapes / colours: the synthetic factors; common / rare_count: images per combination, a
    combination with a value in `rare` gets rare_count; data_seed: the renders; caption_drop: the
    fraction of each factor's captions left out (the model is told the null token; `labels` keep
    what the images show).
    block_out_channels, steps, batch_size, lr, train_seed: the FactorUNet and its training, the
    same for every retrained model (only the training subset changes).
    n_subsets, subset_fraction, subset_seed: the LDS subsets (random halves by default).
    queries_per_combo: generated query images per combination (judge-confirmed), alternately
    validation and test (CFG `guidance`, the first judge-confirmed of `query_candidates`).
    n_draws / whole_points: the fixed draws of the measured outputs. judge_steps /
    judge_renders: the judge's training.
    removal_fractions, removal_seeds: remove-and-retrain (fractions of N, training seeds).
    removal_queries: how many test concept queries remove-and-retrain asks (rare values first).
    """

    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[str, ...] = ("red", "green", "blue")
    rare: tuple[str, ...] = ("triangle", "blue")
    common_count: int = 40
    rare_count: int = 8
    data_seed: int = 0
    caption_drop: float = 0.0  # each factor's caption dropped on this fraction (SyntheticConfig)
    image_size: int = 16
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    train_seed: int = 0
    n_subsets: int = 32
    subset_fraction: float = 0.5
    subset_seed: int = 0
    judge_steps: int = 1500
    judge_renders: int = 500  # fresh renders per combination the judge learns from
    queries_per_combo: int = 2
    query_candidates: int = 16
    confirm_queries: bool = True  # False: the first samples whatever the judge says (tests)
    guidance: float = 4.0
    n_draws: int = 2
    whole_points: int = 16
    probe_seed: int = 0
    removal_fractions: tuple[float, ...] = (0.05, 0.10)
    removal_seeds: tuple[int, ...] = (0, 1)
    removal_queries: int = 2
    removal_samples: int = 48
    format: str = field(default=FORMAT)

    def __post_init__(self) -> None:
        for name in ("shapes", "colours", "rare", "block_out_channels"):
            setattr(self, name, tuple(getattr(self, name)))
        self.removal_fractions = tuple(float(f) for f in self.removal_fractions)
        self.removal_seeds = tuple(int(s) for s in self.removal_seeds)
        unknown = [v for v in self.rare if v not in self.shapes + self.colours]
        if unknown:
            raise ValueError(f"rare values {unknown} are neither shapes nor colours")
        if not 0.0 < self.subset_fraction < 1.0:
            raise ValueError(f"subset_fraction must be in (0, 1), got {self.subset_fraction}")
        if self.n_subsets < 2 or min(self.common_count, self.rare_count) < 1:
            raise ValueError("need >= 2 subsets and >= 1 image per combination")
        if self.format != FORMAT:
            raise ValueError(f"setting format {self.format!r}, this version reads {FORMAT!r}")

    @property
    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(
            image_size=self.image_size,
            shapes=self.shapes,
            colours=self.colours,
            per_combo=max(self.common_count, self.rare_count),
            n_heldout=0,
            seed=self.data_seed,
            caption_drop=self.caption_drop,
        )

    def count(self, combo: tuple[int, int]) -> int:
        s, c = combo
        rare = self.shapes[s] in self.rare or self.colours[c] in self.rare
        return self.rare_count if rare else self.common_count

    def dataset(self) -> ConceptDataset:
        """The training set: the first count(combo) renders of every combination (ids 0..N-1)."""
        full = make_dataset(self.synthetic)
        keep = torch.zeros(len(full), dtype=torch.bool)
        for combo in full.combos():
            rows = (full.labels == torch.tensor(combo)).all(1).nonzero().flatten()
            keep[rows[: self.count(tuple(combo))]] = True
        data = full.subset(keep)
        data.ids = torch.arange(len(data), dtype=torch.int64)
        return data

    def model_kwargs(self) -> dict:
        levels = len(self.block_out_channels)
        return {
            "block_out_channels": self.block_out_channels,
            "attention": tuple([False] * (levels - 1) + [True]),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CounterfactualSetting:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a counterfactual setting")
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(raw) - known)
        if extra:
            raise ValueError(f"{path}: unknown keys {extra}")
        return cls(**raw)


def subset_masks(n: int, n_subsets: int, fraction: float, seed: int) -> torch.Tensor:
    """bool [n_subsets, n]: subset m holds round(fraction * n) images drawn without replacement
    by a generator seeded (seed, m), so one mask never depends on how many others are drawn."""
    size = round(fraction * n)
    out = torch.zeros(n_subsets, n, dtype=torch.bool)
    for m in range(n_subsets):
        g = torch.Generator().manual_seed(seed * 1_000_003 + m)
        out[m, torch.randperm(n, generator=g)[:size]] = True
    return out


def mask_to_text(mask: torch.Tensor) -> str:
    """A mask as a string of 0/1 (the form masks ship in: diffable, 1 byte per image)."""
    return "".join("1" if b else "0" for b in mask.tolist())


def mask_from_text(text: str, n: int) -> torch.Tensor:
    if len(text) != n or set(text) - {"0", "1"}:
        raise ValueError(f"a mask must be {n} characters of 0/1")
    return torch.tensor([ch == "1" for ch in text], dtype=torch.bool)
