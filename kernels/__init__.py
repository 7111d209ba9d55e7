"""Triton kernels for the projection of per-sample gradients (installed as ``ctrak_fast.kernels``).

A leaf: it imports nothing of the package and takes plain seeds and sizes. Every op dispatches
CUDA tensors to its kernel and everything else to its torch reference, which is the specification
(tests compare the two; ``force=`` chooses); the engine (``ctrak_fast.engine.projector``) sends
CPU tensors to the fused C++ kernel instead. The sign of every projection entry comes from the
counter-based hash of :mod:`.hashing` (its torch reference), bit for bit.

- :func:`rademacher_project_triton`: x @ P, P generated in registers (the dispatch over CUDA, the
  C++ kernel and the reference is ``ctrak_fast.engine.projector.rademacher_project``).
- :func:`linear_grad_project`: per-sample linear-layer gradients sum_t g_t a_t^T projected
  tile by tile, never materialised; :func:`linear_grad_sq_norm` their exact squared norms.
- :func:`factorized_project`: Kronecker (LoGra-style) per-layer projection.
"""

from ._triton import HAS_TRITON, INTERPRET, use_triton
from .factorized_project import (
    factorized_matrices,
    factorized_project,
    factorized_project_reference,
    factorized_seeds,
)
from .hash import sign_matrix
from .linear_grad_project import (
    linear_grad_project,
    linear_grad_project_reference,
    linear_grad_sq_norm,
)
from .rademacher_project import (
    check_args,
    output_buffer,
    rademacher_project_reference,
    rademacher_project_triton,
)

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
    "check_args",
    "output_buffer",
    "rademacher_project_reference",
    "rademacher_project_triton",
    "sign_matrix",
    "use_triton",
]
