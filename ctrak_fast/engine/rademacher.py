"""The one dispatch of the projection ``x @ P`` (P the hashed Rademacher matrix of
:mod:`.projection`): :func:`projection_backend` picks the kernel (Triton for CUDA tensors, the
fused C++ kernel for CPU tensors when built, else the torch reference) and every projection of
the package asks it: :func:`rademacher_project`, :func:`rademacher_project_blocks`, the
:class:`.projector.Projector` and the layer-by-layer featurizer."""

from __future__ import annotations

import torch

from ctrak_fast import kernels
from ctrak_fast.engine.native import native_available, native_project_into
from ctrak_fast.kernels.rademacher_project import (
    check_args,
    output_buffer,
    rademacher_project_reference,
    rademacher_project_triton,
)

from .projection import Blocks

FORCES = (None, "cpu", "reference", "triton")


def projection_backend(force: str | None, *tensors: torch.Tensor) -> str:
    """The one dispatch rule of the projection: which kernel projects these tensors.

    Args:
        force: None = "triton" for CUDA tensors (Triton installed), "cpu" (the fused C++ kernel)
            for CPU tensors when the extension is built, else "reference"; or one of those names,
            checked against the tensors ("cpu" needs CPU tensors and the extension, "triton" a
            device the kernels run on).
        tensors: the operands (one device).

    Returns:
        "triton" | "cpu" | "reference".
    """
    if force not in FORCES:
        raise ValueError(f"force must be None, 'cpu', 'reference' or 'triton', got {force!r}")
    if force == "cpu":
        if any(t.is_cuda for t in tensors):
            raise ValueError("force='cpu' needs CPU tensors")
        if not native_available():
            raise RuntimeError("force='cpu' needs the compiled extension ctrak_fast._C")
        return "cpu"
    if kernels.use_triton(force, *tensors):
        return "triton"
    if force is None and all(t.device.type == "cpu" for t in tensors) and native_available():
        return "cpu"
    return "reference"


def rademacher_project(
    x: torch.Tensor,
    seed: int,
    k: int,
    row_offset: int = 0,
    out: torch.Tensor | None = None,
    *,
    accumulate: bool = False,
    force: str | None = None,
) -> torch.Tensor:
    """``x @ P[row_offset : row_offset + p]`` on any device, P the hashed Rademacher matrix
    (+-1/sqrt(k), a pure function of (seed, row, column)), never stored.

    Dispatch by :func:`projection_backend`: CUDA tensors -> the Triton kernel
    (``kernels.rademacher_project_triton``), CPU tensors -> the fused C++ kernel
    (``ctrak_fast._C.rademacher_project``) when it is built, else the torch reference
    (``kernels.rademacher_project_reference``, the specification).

    Args:
        x: [B, p] float32 / float16 / bfloat16; any strides.
        seed: projection seed.
        k: number of output columns (any k >= 1).
        row_offset: global row of P for x's first column; may exceed 2**32.
        out: optional [B, k] float32 on x's device, written (or added to) and returned.
        accumulate: add the projection to ``out`` instead of overwriting it.
        force: None, or "cpu" | "triton" | "reference" to choose the kernel.

    Returns:
        [B, k] float32; every backend agrees with the reference to float32 rounding.

    Examples:
        >>> y = rademacher_project(torch.randn(4, 1000), seed=0, k=64, row_offset=2**33)
        >>> y.shape, y.dtype
        (torch.Size([4, 64]), torch.float32)
    """
    check_args(x, seed, k, row_offset)
    out = output_buffer(x, k, out, accumulate)
    backend = projection_backend(force, x, out)
    if backend == "triton":
        return rademacher_project_triton(x, seed, k, row_offset, out, accumulate=accumulate)
    if backend == "reference":
        ref = rademacher_project_reference(x, seed, k, row_offset)
        return out.add_(ref) if accumulate else out.copy_(ref)
    dst = out if out.is_contiguous() else torch.zeros(out.shape, dtype=torch.float32)
    if not accumulate or dst is not out:
        dst.zero_()
    native_project_into(dst, x, seed, row_offset)
    if dst is out:
        return out
    return out.add_(dst) if accumulate else out.copy_(dst)


def rademacher_project_blocks(
    blocks: Blocks, seed: int, k: int, *, out: torch.Tensor | None = None, force: str | None = None
) -> torch.Tensor:
    """Project a vector given as blocks: ``sum_b x_b @ P[offset_b : offset_b + n_b]``, each block
    by :func:`rademacher_project`.

    Args:
        blocks: [(offset, x [B, n])...], one B for all, on one device; offsets are global rows of P
            (blocks may come in any order; overlapping blocks simply add).
        seed, k, force: as in :func:`rademacher_project`.
        out: optional [B, k] float32 to add into; a new zero tensor otherwise.

    Returns:
        [B, k] float32, equal to projecting the zero-filled concatenation.

    Examples:
        >>> g1, g2 = torch.randn(2, 30), torch.randn(2, 7)
        >>> y = rademacher_project_blocks([(0, g1), (100, g2)], seed=1, k=16)
        >>> y2 = rademacher_project(g1, 1, 16) + rademacher_project(g2, 1, 16, row_offset=100)
        >>> torch.allclose(y, y2, atol=1e-5)
        True
    """
    if not blocks:
        raise ValueError("blocks must not be empty")
    B, device = blocks[0][1].shape[0], blocks[0][1].device
    if out is None:
        out = torch.zeros(B, k, dtype=torch.float32, device=device)
    for offset, x in blocks:
        if x.ndim != 2 or x.shape[0] != B or x.device != device:
            raise ValueError(
                f"every block must be [B={B}, n] on {device}, got {tuple(x.shape)} on {x.device}"
            )
        rademacher_project(x, seed, k, offset, out, accumulate=True, force=force)
    return out
