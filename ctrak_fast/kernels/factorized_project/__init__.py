"""Kronecker (LoGra-style) per-layer projection: :mod:`.triton` (the public
:func:`factorized_project`) beside :mod:`.reference` (the specification and the seeds)."""

from .reference import factorized_matrices, factorized_project_reference, factorized_seeds
from .triton import factorized_project

__all__ = [
    "factorized_matrices",
    "factorized_project",
    "factorized_project_reference",
    "factorized_seeds",
]
