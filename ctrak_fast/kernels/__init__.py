"""Triton kernels for the projection of per-sample gradients.

A leaf: it imports nothing of the rest of the package and takes plain seeds and sizes. One folder
per op, ``<op>/triton.py`` (the kernel, its launcher and the public op) beside
``<op>/reference.py`` (the torch specification: the tests' oracle and the CPU path). A public op
dispatches by :func:`.runtime.use_triton`: CUDA tensors to its kernel, everything else to its
reference (``force=`` chooses); the projection ``x @ P`` is dispatched by the engine
(``ctrak_fast.engine.rademacher.rademacher_project``), which also has a C++ kernel for CPU tensors.
The sign of every projection entry comes from the counter-based hash of :mod:`.hashing`, bit for
bit.

- :func:`rademacher_project_triton`: x @ P, P generated in registers (the dispatch over CUDA, the
  C++ kernel and the reference is ``ctrak_fast.engine.rademacher.rademacher_project``).
- :func:`linear_grad_project`: per-sample linear-layer gradients sum_t g_t a_t^T projected
  tile by tile, never materialised; :func:`linear_grad_sq_norm` their exact squared norms.
- :func:`factorized_project`: Kronecker (LoGra-style) per-layer projection.
"""

from .factorized_project import (
    factorized_matrices,
    factorized_project,
    factorized_project_reference,
    factorized_seeds,
)
from .hashing import sign_matrix
from .linear_grad_project import (
    linear_grad_project,
    linear_grad_project_reference,
    linear_grad_sq_norm,
)
from .rademacher_project import rademacher_project_reference, rademacher_project_triton
from .runtime import HAS_TRITON, INTERPRET, use_triton

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "factorized_matrices",
    "factorized_project",
    "factorized_project_reference",
    "factorized_seeds",
    "linear_grad_project",
    "linear_grad_project_reference",
    "linear_grad_sq_norm",
    "rademacher_project_reference",
    "rademacher_project_triton",
    "sign_matrix",
    "use_triton",
]
