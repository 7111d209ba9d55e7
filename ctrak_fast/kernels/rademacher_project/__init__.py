"""``x @ P``, P the hashed Rademacher matrix: :mod:`.triton` (the kernel, P generated in
registers) beside :mod:`.reference` (its torch specification). The dispatch over devices, with the
C++ kernel for CPU tensors, is ``ctrak_fast.engine.rademacher.rademacher_project``."""

from .reference import SUPPORTED_DTYPES, check_args, output_buffer, rademacher_project_reference
from .triton import rademacher_project_triton

__all__ = [
    "SUPPORTED_DTYPES",
    "check_args",
    "output_buffer",
    "rademacher_project_reference",
    "rademacher_project_triton",
]
