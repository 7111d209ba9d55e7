"""Type stubs of the compiled extension ctrak_fast._C (csrc/bindings.cpp)."""

import numpy as np
import numpy.typing as npt

_Result = tuple[
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.int64] | None,
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.int64] | None,
]

def cpu_isas() -> list[str]:
    """ISA variants of the CPU kernels this machine can run, best first."""

def cpu_isa() -> str:
    """The variant 'auto' selects (honours $CTRAK_CPU_ISA)."""

def has_cuda() -> bool:
    """True when the CUDA engine was compiled in."""

def cpu_fma_peak(seconds: float = 0.25, num_threads: int = 0, isa: str = "auto") -> float:
    """Peak float32 FLOP/s of independent fma chains (the CPU kernels' compute ceiling)."""

def rademacher_tile(
    seed: int,
    row_start: int,
    n_rows: int,
    k: int,
    out: npt.NDArray[np.float32],
    num_threads: int = 0,
    isa: str = "auto",
) -> None:
    """Fill out [n_rows, k] float32 with rows row_start.. of the projection matrix: +-1/sqrt(k),
    bit-identical to ctrak_fast.hashing.rademacher_block(seed, row_start, n_rows, k)."""

def rademacher_project(
    seed: int,
    row_start: int,
    x: npt.NDArray[np.float32],
    k: int,
    out: npt.NDArray[np.float32],
    num_threads: int = 0,
    isa: str = "auto",
) -> None:
    """out [batch, k] += x [batch, n] . rows row_start.. of the projection matrix (+-1/sqrt(k)),
    signs generated on the fly; sums per chunk of a global grid of PROJECT_GRID_ROWS rows."""

PROJECT_GRID_ROWS: int

class MappedFile:
    """Read-only shared memory map of a whole file; a read-only uint8 buffer
    (np.frombuffer(mf, np.uint8) is a zero-copy view that keeps the mapping alive)."""

    def __init__(self, path: str, populate: bool = False, sequential: bool = True) -> None:
        """populate: read and map every page before returning (read-ahead); OSError on failure."""

    def __buffer__(self, flags: int, /) -> memoryview: ...
    def will_need(self, offset: int = 0, length: int = ...) -> None:
        """Start asynchronous read-ahead of a byte range (MADV_WILLNEED)."""

    @property
    def size(self) -> int: ...
    @property
    def path(self) -> str: ...

def score_cpu(
    features: np.ndarray,
    queries: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32] | None = None,
    num_threads: int = 0,
    isa: str = "auto",
) -> npt.NDArray[np.float32]:
    """Dense scores [m, n] = queries . features^T, bit-identical to what TopKState selects;
    out: float32 [m, n] with contiguous rows (any row stride), or None to allocate."""

class TopKState:
    """Running exact top-k of m queries over rows streamed by add()."""

    def __init__(
        self,
        queries: npt.NDArray[np.float32],
        k_top: int,
        tails: str = "both",
        num_threads: int = 0,
        isa: str = "auto",
    ) -> None: ...
    def add(
        self, features: np.ndarray, ids: npt.NDArray[np.int64] | None = None, base_id: int = 0
    ) -> None:
        """features: [n, dim] float32 / float16 / uint16 or int16 (bfloat16 bits)."""

    def result(self) -> _Result:
        """(top_values, top_ids, bottom_values, bottom_ids), [m, k_top] each, best first."""

    @property
    def m(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def k_top(self) -> int: ...
    @property
    def rows_seen(self) -> int: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def tile_rows(self) -> int: ...
    @property
    def isa(self) -> str: ...
    @property
    def tails(self) -> str: ...

def has_avx512bf16() -> bool:
    """True when this CPU runs the exact bfloat16 search's AVX512-BF16 kernel."""

class Bf16TopKState:
    """TopKState for bfloat16 rows: vdpbf16ps scores, a bound on their error, float32 re-scoring
    of every row that can still reach the k-th. Same ids and values as TopKState."""

    def __init__(
        self,
        queries: npt.NDArray[np.float32],
        k_top: int,
        tails: str = "both",
        num_threads: int = 0,
        isa: str = "auto",
        path: str = "auto",
    ) -> None: ...
    def add(
        self, features: np.ndarray, ids: npt.NDArray[np.int64] | None = None, base_id: int = 0
    ) -> None:
        """As TopKState.add; uint16 / int16 (bfloat16 bits) rows take the bfloat16 path."""

    def result(self) -> _Result:
        """As TopKState.result."""

    @property
    def m(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def k_top(self) -> int: ...
    @property
    def rows_seen(self) -> int: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def rescored(self) -> int:
        """Candidates (query, tail, row) re-scored by the float32 engine so far."""

    @property
    def path(self) -> str:
        """'avx512bf16' or 'float32': the engine that runs."""

def topk_cpu(
    features: np.ndarray,
    queries: npt.NDArray[np.float32],
    k_top: int,
    tails: str = "both",
    ids: npt.NDArray[np.int64] | None = None,
    base_id: int = 0,
    num_threads: int = 0,
    isa: str = "auto",
) -> _Result:
    """One-shot TopKState(queries, k_top, tails).add(features, ids, base_id).result()."""

class CudaTopKState:
    """Running exact top-k on a CUDA device (only when has_cuda()). Pointers are device
    addresses, streams cudaStream_t values; buffers must outlive the queued work."""

    def __init__(
        self,
        queries: int,
        m: int,
        dim: int,
        k_top: int,
        tails: str,
        device: int,
        stream: int,
        engine: str = "auto",
    ) -> None:
        """engine: 'mma' (tensor cores), 'simt' (fp32 fma chains) or 'auto'."""

    def add(
        self, features: int, n: int, dtype: str, ids: int, base_id: int, stream: int
    ) -> None: ...
    def add_host(
        self,
        features: np.ndarray,
        ids: npt.NDArray[np.int64] | None = None,
        base_id: int = 0,
        stream: int = 0,
    ) -> None:
        """Host features streamed through pinned double buffers."""

    def engine_for(self, dtype: str) -> str:
        """'mma' or 'simt': the score kernel for aligned features of dtype."""

    def result(self, stream: int) -> _Result: ...
    @property
    def m(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def k_top(self) -> int: ...
    @property
    def rows_seen(self) -> int: ...
