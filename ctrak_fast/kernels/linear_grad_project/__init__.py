"""Per-sample linear-layer gradients W_b = sum_t g_t a_t^T projected without being stored:
:mod:`.triton` (the kernel and the public dispatch :func:`linear_grad_project`) beside
:mod:`.reference` (the specification, and the exact norms :func:`linear_grad_sq_norm`)."""

from .reference import linear_grad_project_reference, linear_grad_sq_norm
from .triton import linear_grad_project

__all__ = ["linear_grad_project", "linear_grad_project_reference", "linear_grad_sq_norm"]
