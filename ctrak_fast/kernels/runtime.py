"""Triton import shim shared by the kernels, and the dispatch rule of their public ops.

- Without Triton installed the package still imports: every public op then runs its torch
  reference, and ``force="triton"`` raises.
- On a machine without CUDA the kernels can only run under Triton's interpreter, and the interpreter
  must be chosen before ``triton.language`` is imported (its own ``@jit`` helpers such as
  ``tl.zeros`` are bound at import time). So, when nothing has imported Triton yet, no CUDA device
  is present and the user did not decide, we set ``TRITON_INTERPRET=1``. If something imported
  Triton earlier in compiled mode (``import diffusers`` does), CPU tensors cannot reach the kernels
  in this process; :func:`check_runnable` says so.
"""

from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: references only
    triton = None
    HAS_TRITON = False

    class _TLStub:
        """Just enough of triton.language for module-level kernel definitions to evaluate."""

        @staticmethod
        def constexpr(value=None):
            return value

    tl = _TLStub()

if HAS_TRITON:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # The mode triton.language was imported in, which our kernels must match (TRITON_INTERPRET may
    # have been changed since).
    INTERPRET = isinstance(tl.zeros, InterpretedFunction)
else:
    INTERPRET = False

# The interpreter stores bfloat16 as raw uint16 and its tl.dot multiplies those integers; kernels
# upcast dot operands to float32 there (the values are exact in float32: same arithmetic).
DOT_UPCAST = tl.constexpr(INTERPRET)


def jit(fn=None, **kwargs):
    """``triton.jit`` in triton.language's mode; without Triton, a stub that raises if launched."""

    def wrap(f):
        if HAS_TRITON:
            # What triton.jit does, but keyed on INTERPRET rather than on the current environment.
            return InterpretedFunction(f, **kwargs) if INTERPRET else JITFunction(f, **kwargs)

        class _Missing:
            def __getitem__(self, grid):
                raise RuntimeError(f"{f.__name__}: Triton is not installed")

        return _Missing()

    return wrap if fn is None else wrap(fn)


def check_runnable(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on these tensors in this process."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use force='reference' (or force=None)")
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(devices)}")
    if INTERPRET or devices == {"cuda"}:
        return
    if devices == {"cpu"}:
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is first "
            "imported (something imported triton in compiled mode earlier in this process)"
        )
    raise RuntimeError(f"no Triton kernels for device type {devices.pop()!r}")


def use_triton(force: str | None, *tensors: torch.Tensor) -> bool:
    """Dispatch rule of every public op: CUDA tensors -> kernel, otherwise -> reference."""
    if force not in (None, "reference", "triton"):
        raise ValueError(f"force must be None, 'reference' or 'triton', got {force!r}")
    if force == "reference":
        return False
    if force == "triton":
        check_runnable(*tensors)
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
