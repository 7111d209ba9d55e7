"""Applying the random projection phi = x P (P of :mod:`.projection`), with one dispatch per device.

Backends:

- ``"cpu"``: ``ctrak_fast._C.rademacher_project`` (C++, AVX-512 / AVX2 / portable): a fused
  generate-and-multiply kernel; the signs of a 16 KiB panel are hashed into L1 and consumed there
  by a register-tiled fma micro-kernel, so P never reaches memory (csrc/project_impl.h);
- ``"triton"``: ``ctrak_fast.kernels.rademacher_project_triton``, the same fusion on the GPU
  (signs in registers), used for CUDA inputs only;
- ``"reference"``: ``kernels.hashing.rademacher_block`` in torch (the specification; slow),
  tile by tile (``tile_rows`` rows x k columns), each tile consumed by one float32 ``addmm``;
- ``"auto"``: triton for CUDA inputs when importable, else cpu when the extension is built, else
  reference (with a one-time warning).

Summation order. The cpu backend sums every output per chunk of a fixed global grid of rows
(``_C.PROJECT_GRID_ROWS``, one fma chain each, then the chunks in order; as accurate as a blocked
BLAS) and hands each grid chunk to the kernel in one call, so the bits depend only on the values
and the set of rows given: not on the chunking or order of the blocks, the thread count, or the
other rows of the batch. The reference backend accumulates over a fixed grid of ``tile_rows``
rows; within a grid tile the input rows are gathered into one contiguous float32 buffer spanning
the first to the last row given in that tile (rows not given are zero), so it too is invariant to
chunking (bitwise on one machine in practice); across batch sizes the BLAS kernel may change its
summation order (float32 rounding, about 1e-6 relative). The Triton kernel (CUDA inputs) has its
own order and agrees to float32 rounding.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ctrak_fast.engine.native import (
    native_grid_rows,
    native_project_fn,
    native_project_into,
    native_tile_fn,
)
from ctrak_fast.engine.rademacher import rademacher_project_blocks
from ctrak_fast.kernels import hashing

from .projection import (
    BACKENDS,
    DEFAULT_CACHE_BYTES,
    Blocks,
    ProjectionSpec,
    default_tile_rows,
    is_int,
)

REF_CHUNK = 2**21  # entries per reference-hash call (its int64 temporaries are ~40 B/entry)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        # stacklevel: past _warn_once, the helper and the Projector method, to the user's line.
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


class Projector:
    """Projects [B, dim] gradients to [B, k] features with the matrix of ``spec``.

    Args:
        spec: the projection.
        dim: number of rows of P, i.e. the length of the full (flattened) gradient. Blocks given
            to :meth:`project_blocks` must lie in [0, dim); dim may exceed 2**32.
        backend: "auto" | "reference" | "cpu" | "triton" (see the module docstring).
        cache_bytes: memory budget for keeping reference-backend sign tiles across calls (the
            fused cpu and triton backends never store signs). Tiles are kept in order of first use
            until the budget is spent and never evicted, so with ``dim * k * 4 <= cache_bytes``
            every call after the first pays the matmul only, and a smaller budget still caches a
            fixed prefix of the tiles. 0 disables the cache. It saves ~99% of a reference call.
        device: device for the matmul and the cached tiles; None = the input's device.
        tile_rows: rows per tile of the reference backend, the grid of its summation order (and
            of :meth:`rows`); None (default) = the power of two nearest below
            ``TILE_BYTES / (4 k)``, within [64, 65536]: few, large matmuls (each one is a parallel
            region; on a busy machine their start-up dominates small ones), memory bounded
            whatever k. Keep the default to reproduce features bit for bit.

    A Projector holds a scratch tile and the cache: use one per thread (the cpu backend's
    kernel runs on ``torch.get_num_threads()`` threads of its own pool).

    Examples:
        >>> proj = Projector(ProjectionSpec(k=8, seed=1), dim=100, backend="reference")
        >>> x = torch.randn(3, 100)
        >>> proj.project(x).shape
        torch.Size([3, 8])
        >>> a = proj.project_blocks([(60, x[:, 60:]), (0, x[:, :60])])
        >>> torch.allclose(a, proj.project(x))
        True
    """

    def __init__(
        self,
        spec: ProjectionSpec,
        dim: int,
        backend: str = "auto",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        device: str | torch.device | None = None,
        tile_rows: int | None = None,
    ) -> None:
        if not isinstance(spec, ProjectionSpec):
            raise TypeError(f"spec must be a ProjectionSpec, got {type(spec).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown projection backend {backend!r}; choose from {BACKENDS}")
        if not is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if tile_rows is None:
            tile_rows = default_tile_rows(spec.k)
        if not is_int(tile_rows) or tile_rows < 1:
            raise ValueError(f"tile_rows must be a positive int, got {tile_rows!r}")
        self.spec = spec
        self.k = spec.k
        self.dim = dim
        self.tile_rows = tile_rows
        self.device = torch.device(device) if device is not None else None
        self.requested_backend = backend
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        self._native = None
        self._native_grid = 0
        self._scratch: np.ndarray | None = None
        # Where CPU-side tiles come from; CUDA inputs may still go to triton (see project_blocks).
        self.tile_backend = self._resolve_tile_backend(backend)
        self.cache_bytes = int(cache_bytes)

    def _resolve_tile_backend(self, backend: str) -> str:
        if backend == "reference":
            return "reference"
        if backend in ("cpu", "auto", "triton"):
            try:
                self._native = native_tile_fn()
                native_project_fn()
                self._native_grid = native_grid_rows()
                return "cpu"
            except Exception as e:  # reported below, whatever it is
                if backend == "cpu":
                    raise RuntimeError(
                        f"projection backend 'cpu' needs the compiled extension ctrak_fast._C: {e}"
                    ) from e
                if backend == "auto":
                    _warn_once(
                        "native",
                        "ctrak_fast._C is not available; projecting with the slow torch reference "
                        f"(build the extension with `./dev setup` for speed): {e}",
                    )
        return "reference"

    @property
    def cached_bytes(self) -> int:
        """Bytes of sign tiles held in the cache."""
        return self._cached_bytes

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Project full gradients.

        Args:
            x: [B, dim] tensor of any floating dtype (cast to float32 tile by tile).

        Returns:
            [B, k] float32 on the input's device (or ``device``).
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected x of shape [B, {self.dim}], got {list(x.shape)}")
        return self.project_blocks([(0, x)])

    def project_blocks(self, blocks: Blocks) -> torch.Tensor:
        """Project a gradient given as per-parameter blocks with their global row offsets.

        Args:
            blocks: ``[(offset, Tensor[B, n]), ...]``: rows [offset, offset + n) of the gradient,
                non-overlapping, in any order and chunking; rows not given count as zero, so a
                parameter subset never needs the full vector.

        Returns:
            [B, k] float32, equal to projecting the zero-filled full gradient.

        Examples:
            >>> from ctrak_fast.engine.projection import dense_matrix
            >>> proj = Projector(ProjectionSpec(k=4), dim=10, backend="reference")
            >>> g = torch.randn(2, 10)
            >>> P = dense_matrix(proj.spec, 10)
            >>> torch.allclose(proj.project_blocks([(7, g[:, 7:])]), g[:, 7:] @ P[7:])
            True
        """
        blocks = self._check_blocks(blocks)
        batch = blocks[0][1].shape[0]
        device = self.device if self.device is not None else blocks[0][1].device
        out = torch.zeros(batch, self.k, dtype=torch.float32, device=device)
        if device.type == "cuda" and self.requested_backend in ("auto", "triton"):
            # The kernel takes float32/float16/bfloat16 as they are (exact products, float32
            # accumulation); anything else is cast first.
            blocks = [
                (o, x.to(device) if x.dtype in _KERNEL_DTYPES else x.to(device, torch.float32))
                for o, x in blocks
            ]
            return rademacher_project_blocks(blocks, self.spec.seed, self.k, out=out)
        if self.tile_backend == "cpu" and device.type == "cpu":
            return self._project_fused(blocks, out)
        for tile_start, lo, hi, pieces in self._tiles(blocks):
            if len(pieces) == 1:  # the common case: one parameter block covers the span
                buf = pieces[0][1].to(device=device, dtype=torch.float32).contiguous()
            else:
                buf = torch.zeros(batch, hi - lo, dtype=torch.float32, device=device)
                for start, piece in pieces:
                    buf[:, start - lo : start - lo + piece.shape[1]].copy_(piece)
            out.addmm_(buf, self._signs(tile_start, lo, hi, device))
        return out

    def _project_fused(self, blocks: list[tuple[int, torch.Tensor]], out: torch.Tensor):
        """The C++ generate-and-multiply kernel. It sums per chunk of a global grid of rows, so
        every grid chunk must reach it in one call: the rows of whole chunks inside one block go
        as a view, and the pieces of a chunk shared by several blocks are gathered into one
        zero-filled buffer. The bits are then those of projecting the zero-filled vector whole."""
        grid, seed = self._native_grid, self.spec.seed
        shared: list[tuple[int, torch.Tensor]] = []  # pieces of the current partial chunk

        def flush() -> None:
            if len(shared) == 1:
                native_project_into(out, shared[0][1], seed, shared[0][0])
            elif shared:
                lo, hi = shared[0][0], shared[-1][0] + shared[-1][1].shape[1]
                buf = torch.zeros(out.shape[0], hi - lo)
                for start, piece in shared:
                    buf[:, start - lo : start - lo + piece.shape[1]].copy_(piece)
                native_project_into(out, buf, seed, lo)
            shared.clear()

        for offset, x in blocks:  # sorted by offset, non-overlapping
            pos, end = offset, offset + x.shape[1]
            while pos < end:
                chunk = pos // grid * grid
                if shared and shared[0][0] // grid * grid != chunk:
                    flush()
                if pos == chunk and end - pos >= grid:  # whole chunks: one view
                    stop = pos + (end - pos) // grid * grid
                    native_project_into(out, x[:, pos - offset : stop - offset], seed, pos)
                else:
                    stop = min(end, chunk + grid)
                    shared.append((pos, x[:, pos - offset : stop - offset]))
                pos = stop
        flush()
        return out

    def _check_blocks(self, blocks: Blocks) -> list[tuple[int, torch.Tensor]]:
        if not blocks:
            raise ValueError("project_blocks needs at least one block")
        out = []
        batch = None
        for offset, x in blocks:
            if not is_int(offset) or offset < 0:
                raise ValueError(f"block offset must be a non-negative int, got {offset!r}")
            if x.dim() != 2:
                raise ValueError(f"each block must be [B, n], got shape {list(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"blocks must be floating point, got {x.dtype}")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"blocks disagree on the batch size: {batch} vs {x.shape[0]}")
            if offset + x.shape[1] > self.dim:
                raise ValueError(
                    f"block rows [{offset}, {offset + x.shape[1]}) exceed the projector's "
                    f"dim {self.dim}"
                )
            if x.shape[1]:
                out.append((offset, x))
        out.sort(key=lambda b: b[0])
        for (o1, x1), (o2, _) in zip(out, out[1:], strict=False):
            if o1 + x1.shape[1] > o2:
                raise ValueError(f"blocks overlap: [{o1}, {o1 + x1.shape[1]}) and offset {o2}")
        if not out:
            raise ValueError("project_blocks got only empty blocks")
        return out

    def _tiles(self, blocks):
        """Split sorted blocks at grid-tile boundaries.

        Yields (tile_start, lo, hi, pieces): rows [lo, hi) are the span of given rows in the tile
        starting at tile_start, pieces = [(global_row, Tensor[B, n]), ...] in row order.
        """
        T = self.tile_rows
        tile, pieces = None, []
        for offset, x in blocks:
            pos, end = offset, offset + x.shape[1]
            while pos < end:
                t = pos // T * T
                stop = min(end, t + T)
                if t != tile and pieces:
                    yield tile, pieces[0][0], pieces[-1][0] + pieces[-1][1].shape[1], pieces
                    pieces = []
                tile = t
                pieces.append((pos, x[:, pos - offset : stop - offset]))
                pos = stop
        yield tile, pieces[0][0], pieces[-1][0] + pieces[-1][1].shape[1], pieces

    def _signs(self, tile_start: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """Rows [lo, hi) of P (inside the tile at tile_start) as [hi - lo, k] float32."""
        tile = self._cache.get(tile_start)
        if tile is None:
            n = min(self.tile_rows, self.dim - tile_start)
            nbytes = n * self.k * 4
            if self._cached_bytes + nbytes > self.cache_bytes:
                return self._generate(lo, hi - lo, scratch=True).to(device)
            tile = self._generate(tile_start, n, scratch=False).to(device)
            self._cache[tile_start] = tile
            self._cached_bytes += nbytes
        return tile[lo - tile_start : hi - tile_start].to(device)

    def rows(self, row_start: int, n_rows: int) -> torch.Tensor:
        """Rows [row_start, row_start + n_rows) of P from this projector's tile backend.

        Returns:
            [n_rows, k] float32 (CPU) with entries +-1/sqrt(k); a new tensor, not cached.
        """
        return self._generate(row_start, n_rows, scratch=False)

    def _generate(self, row_start: int, n_rows: int, scratch: bool) -> torch.Tensor:
        if self.tile_backend == "cpu":
            if scratch:
                # Uncached tiles are consumed at once: refilling one buffer saves the page faults
                # of a fresh allocation per tile, which cost about as much as generating it.
                if self._scratch is None or self._scratch.shape[0] < n_rows:
                    self._scratch = np.empty((max(n_rows, self.tile_rows), self.k), np.float32)
                out = self._scratch[:n_rows]
            else:
                out = np.empty((n_rows, self.k), dtype=np.float32)
            # Follow torch's thread budget, so set_num_threads governs the whole projection.
            self._native(
                self.spec.seed, row_start, n_rows, self.k, out, num_threads=torch.get_num_threads()
            )
            return torch.from_numpy(out)
        out = torch.empty(n_rows, self.k, dtype=torch.float32)
        step = max(1, REF_CHUNK // self.k)
        for a in range(0, n_rows, step):
            b = min(n_rows, a + step)
            out[a:b] = hashing.rademacher_block(self.spec.seed, row_start + a, b - a, self.k)
        return out
