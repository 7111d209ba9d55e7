"""The counter-based hash that defines the random projection: :mod:`.reference` (torch, the
specification every implementation reproduces bit for bit) and :mod:`.triton` (its Triton device
functions and the sign-matrix kernel)."""

from .reference import (
    COL_MULT,
    HASH_VERSION,
    MASK32,
    MIX_C1,
    MIX_C2,
    SEED_SALT,
    mix32,
    mix32_int,
    rademacher_block,
    row_keys,
    seed_key,
    sign_bits,
)
from .triton import sign_matrix

__all__ = [
    "COL_MULT",
    "HASH_VERSION",
    "MASK32",
    "MIX_C1",
    "MIX_C2",
    "SEED_SALT",
    "mix32",
    "mix32_int",
    "rademacher_block",
    "row_keys",
    "seed_key",
    "sign_bits",
    "sign_matrix",
]
