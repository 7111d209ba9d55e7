"""Projection specs: what defines the random matrix P of every feature (serialised into manifests).

P[i, j] = +-1/sqrt(k) is a pure function of (seed, i, j) (hash version 1,
:mod:`ctrak_fast.kernels.hashing`), so a projection never depends on batch size, chunking,
thread count, device or backend, and features made on different machines are comparable. P is
never stored whole; :mod:`.projector` applies it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ctrak_fast.kernels import hashing

KINDS = ("rademacher",)
BACKENDS = ("auto", "reference", "cpu", "triton")
TILE_BYTES = 2**26  # one float32 sign tile: 8192 rows at k = 2048
DEFAULT_CACHE_BYTES = 2**31

Blocks = Sequence[tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class ProjectionSpec:
    """What defines the projection matrix; serialised into every store manifest.

    Args:
        kind: "rademacher" (the only kind of this build).
        k: output dimension (>= 1).
        seed: 0 <= seed < 2**32 (the hash reduces seeds mod 2**32; larger values would collide).
        hash_version: version of the hash in :mod:`ctrak_fast.kernels.hashing`.

    Examples:
        >>> spec = ProjectionSpec(k=512, seed=3)
        >>> ProjectionSpec.from_dict(spec.to_dict()) == spec
        True
    """

    kind: str = "rademacher"
    k: int = 2048
    seed: int = 0
    hash_version: int = hashing.HASH_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; this build knows {KINDS}")
        if not is_int(self.k) or self.k < 1:
            raise ValueError(f"projection k must be a positive int, got {self.k!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"projection seed must be an int in [0, 2**32), got {self.seed!r}")
        if not is_int(self.hash_version) or self.hash_version > hashing.HASH_VERSION:
            raise ValueError(
                f"projection hash_version {self.hash_version!r} is newer than this build's "
                f"hash version {hashing.HASH_VERSION}; upgrade ctrak_fast to read it"
            )
        if self.hash_version != hashing.HASH_VERSION:
            raise ValueError(
                f"projection hash_version {self.hash_version!r} is unknown; this build implements "
                f"hash version {hashing.HASH_VERSION} only"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict with every field (for manifests)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ProjectionSpec:
        """Inverse of :meth:`to_dict`; refuses unknown fields, kinds and newer hash versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown projection spec field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


FACTORIZED_KIND = "factorized"


@dataclass(frozen=True)
class FactorizedSpec:
    """Factorised projection: k_in columns for activations, k_out for output gradients.

    The feature of a layer has ``k = k_out * k_in`` entries, indexed ``o * k_in + i``.

    Examples:
        >>> spec = FactorizedSpec(k_in=16, k_out=8, seed=3)
        >>> FactorizedSpec.from_dict(spec.to_dict()) == spec, spec.k
        (True, 128)
    """

    k_in: int
    k_out: int
    seed: int = 0
    hash_version: int = hashing.HASH_VERSION

    def __post_init__(self):
        for name in ("k_in", "k_out"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.hash_version != hashing.HASH_VERSION:
            raise ValueError(
                f"hash_version {self.hash_version} is not supported (this build: "
                f"{hashing.HASH_VERSION})"
            )

    @property
    def k(self) -> int:
        return self.k_in * self.k_out

    def to_dict(self) -> dict:
        return {"kind": FACTORIZED_KIND, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> FactorizedSpec:
        d = dict(d)
        kind = d.pop("kind", FACTORIZED_KIND)
        if kind != FACTORIZED_KIND:
            raise ValueError(f"not a factorized projection spec: kind={kind!r}")
        return cls(**d)


def dense_matrix(spec: ProjectionSpec, p: int) -> torch.Tensor:
    """The first p rows of the projection matrix, materialised (tests and small p only).

    Returns:
        [p, k] float32 with entries +-1/sqrt(k); ``x @ dense_matrix(spec, x.shape[1])`` equals
        ``Projector(spec, p).project(x)`` to float32 rounding.

    Examples:
        >>> P = dense_matrix(ProjectionSpec(k=4, seed=0), 3)
        >>> P.shape, P.abs().unique().tolist()
        (torch.Size([3, 4]), [0.5])
    """
    return hashing.rademacher_block(spec.seed, 0, p, spec.k)


def default_tile_rows(k: int) -> int:
    """Rows per tile for output dimension k (see :class:`Projector`)."""
    rows = max(1, TILE_BYTES // (4 * k))
    return min(65536, max(64, 1 << (rows.bit_length() - 1)))
