// CUDA top-k engine; see topk_cuda.h for the algorithm in one paragraph.
//
// Scores are fp32 fma chains over d = 0..dim-1 (the same chain as the CPU kernels), computed by
// a SIMT register-tiled GEMM: block tile 128 rows x 64 queries, k slab 16, each thread 8 x 4.
// fp32 SIMT rather than tensor cores keeps the scores exact to fp32 accumulation, which the
// tie rule and the tests rely on.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "topk_cuda.h"

namespace ctrak {
namespace {

#define CUDA_CHECK(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess)                                                               \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +              \
                               cudaGetErrorString(err_));                                  \
  } while (0)

constexpr int BM = 128;  // rows per block tile
constexpr int BN = 64;   // queries per block tile
constexpr int BK = 16;   // k slab staged in shared memory
constexpr int TM = 8;    // rows per thread
constexpr int TN = 4;    // queries per thread
constexpr int NT = 256;  // threads per block: (BM / TM) * (BN / TN)
constexpr int CT = 512;  // threads of the compaction kernel
static_assert((BM / TM) * (BN / TN) == NT, "thread tile");
static_assert(BM <= 256, "row offsets are staged as uint8");

struct GemmSmem {
  float a[BK][BM + 4];  // features, transposed; +4 spreads the transposing stores over banks
  float b[BK][BN + 4];  // queries, transposed
};
struct StageSmem {
  float val[BN][BM];     // candidates of one tail, per query of the tile
  uint8_t row[BN][BM];   // their row offsets in the tile
  int cnt[BN];
  int base[BN];          // reserved offsets in the per-query buffers
};
union TileSmem {
  GemmSmem g;
  StageSmem s;
};

struct DevState {
  float* vals;
  int64_t* ids;
  int* count;
  float* thr;
  float* scratch_v;
  int64_t* scratch_i;
  int m;
  int cap;
  int k;
  int n_tails;
  int tail0_bottom;  // slot 0 holds the bottom tail (tails == bottom); slot 1 always does
};

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Order-preserving uint32 key of a float (larger float -> larger key); -0 maps to +0 so that
// equal scores are ties as in the CPU engine. NaN never reaches here (thresholds reject it).
__device__ __forceinline__ uint32_t okey(float v) {
  uint32_t u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_okey(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}
// int64 id -> unsigned key with the same order.
__device__ __forceinline__ uint64_t idkey(int64_t id) {
  return static_cast<uint64_t>(id) ^ 0x8000000000000000ull;
}

// Scores of rows [blockIdx.x * BM, +BM) x queries [blockIdx.y * BN, +BN); each score that passes
// its query's threshold is appended to that query's buffer. Buffers have room for every row of
// the chunk (the compaction kernel runs first), so appends never overflow.
template <class T>
__global__ void __launch_bounds__(NT) score_select_kernel(const T* __restrict__ feat,
                                                          int64_t rows, int dim,
                                                          const float* __restrict__ q,
                                                          const int64_t* __restrict__ ids,
                                                          int64_t base_id, DevState st) {
  __shared__ TileSmem sm;
  const int tid = threadIdx.x;
  const int tx = tid % (BN / TN), ty = tid / (BN / TN);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int q0 = blockIdx.y * BN;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  // 32-bit offsets inside the tile (BM * dim < 2**31 is checked on the host).
  const T* ftile = feat + row0 * dim;
  const float* qtile = q + static_cast<int64_t>(q0) * dim;
  const int rows_here = static_cast<int>(rows - row0 < BM ? rows - row0 : BM);
  const int q_here = min(BN, st.m - q0);
  for (int k0 = 0; k0 < dim; k0 += BK) {
#pragma unroll
    for (int l = 0; l < BM * BK / NT; ++l) {
      const int idx = tid + l * NT, r = idx / BK, kk = idx % BK, d = k0 + kk;
      sm.g.a[kk][r] = r < rows_here && d < dim ? to_float(ftile[r * dim + d]) : 0.0f;
    }
#pragma unroll
    for (int l = 0; l < BN * BK / NT; ++l) {
      const int idx = tid + l * NT, c = idx / BK, kk = idx % BK, d = k0 + kk;
      sm.g.b[kk][c] = c < q_here && d < dim ? qtile[c * dim + d] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = sm.g.a[kk][ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = sm.g.b[kk][tx * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // also guards the reuse of sm as staging below
  }

  const int lane = tid % 32, warp = tid / 32;
  for (int t = 0; t < st.n_tails; ++t) {
    const bool neg = t == 1 || st.tail0_bottom;
    const int64_t slot0 = static_cast<int64_t>(t) * st.m;
    if (tid < BN) sm.s.cnt[tid] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int ql = tx * TN + j;
      if (q0 + ql >= st.m) continue;
      const float thr = st.thr[slot0 + q0 + ql];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int r = ty * TM + i;
        const float v = neg ? -acc[i][j] : acc[i][j];
        if (row0 + r < rows && v >= thr) {
          const int s = atomicAdd(&sm.s.cnt[ql], 1);
          sm.s.val[ql][s] = v;
          sm.s.row[ql][s] = static_cast<uint8_t>(r);
        }
      }
    }
    __syncthreads();
    if (tid < BN && sm.s.cnt[tid] > 0)
      sm.s.base[tid] = atomicAdd(&st.count[slot0 + q0 + tid], sm.s.cnt[tid]);
    __syncthreads();
    for (int ql = warp; ql < BN; ql += NT / 32) {
      const int c = sm.s.cnt[ql];
      if (c == 0) continue;
      const int64_t off = (slot0 + q0 + ql) * st.cap + sm.s.base[ql];
      for (int s = lane; s < c; s += 32) {
        const int64_t row = row0 + sm.s.row[ql][s];
        st.vals[off + s] = sm.s.val[ql][s];
        st.ids[off + s] = ids ? ids[row] : base_id + row;
      }
    }
    __syncthreads();
  }
}

// One block per (query, tail): when the buffer holds more than `limit` entries, keep the best
// k (larger value, then smaller id) in front and set the threshold to the k-th value.
// Radix select: 4 passes of 8 bits over the value keys find the k-th key; if it is tied, 8
// passes over the ids of the tied entries find how far the tie extends.
__global__ void __launch_bounds__(CT) compact_kernel(DevState st, int limit) {
  const int64_t slot = static_cast<int64_t>(blockIdx.y) * st.m + blockIdx.x;
  const int n = st.count[slot];
  if (n <= limit || n <= st.k) return;  // block-uniform
  float* vals = st.vals + slot * st.cap;
  int64_t* ids = st.ids + slot * st.cap;
  const int tid = threadIdx.x;

  __shared__ unsigned int hist[256];
  __shared__ int s_sel, s_want, s_eq, s_out, s_tie;

  // k-th largest value key T; `want` = how many of the entries equal to T are kept.
  uint32_t prefix = 0, mask = 0;
  int want = st.k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += CT) hist[b] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += CT) {
      const uint32_t key = okey(vals[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int cum = 0;
      for (int b = 255; b >= 0; --b) {
        const int h = static_cast<int>(hist[b]);
        if (cum + h >= want) {
          s_sel = b, s_want = want - cum, s_eq = h;
          break;
        }
        cum += h;
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(s_sel) << shift;
    mask |= 0xFFu << shift;
    want = s_want;
    __syncthreads();  // everyone has read s_* before the next pass writes them
  }
  const uint32_t T = prefix;
  const bool all_tied_kept = want == s_eq;

  // Among entries with key == T keep the `want` smallest ids: id key I and quota at I.
  uint64_t I = 0;
  int quota = 0;
  if (!all_tied_kept) {
    uint64_t ipre = 0, imask = 0;
    int w = want;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += CT) hist[b] = 0;
      __syncthreads();
      for (int i = tid; i < n; i += CT) {
        if (okey(vals[i]) != T) continue;
        const uint64_t ik = idkey(ids[i]);
        if ((ik & imask) == ipre) atomicAdd(&hist[(ik >> shift) & 0xFFu], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int cum = 0;
        for (int b = 0; b < 256; ++b) {
          const int h = static_cast<int>(hist[b]);
          if (cum + h >= w) {
            s_sel = b, s_want = w - cum;
            break;
          }
          cum += h;
        }
      }
      __syncthreads();
      ipre |= static_cast<uint64_t>(s_sel) << shift;
      imask |= 0xFFull << shift;
      w = s_want;
      __syncthreads();
    }
    I = ipre;
    quota = w;  // > 1 only for duplicate (value, id) entries, which are interchangeable
  }

  if (tid == 0) s_out = 0, s_tie = 0;
  __syncthreads();
  float* sv = st.scratch_v + slot * st.k;
  int64_t* si = st.scratch_i + slot * st.k;
  for (int i = tid; i < n; i += CT) {
    const float v = vals[i];
    const uint32_t key = okey(v);
    bool take = key > T;
    if (!take && key == T) {
      if (all_tied_kept) {
        take = true;
      } else {
        const uint64_t ik = idkey(ids[i]);
        take = ik < I || (ik == I && atomicAdd(&s_tie, 1) < quota);
      }
    }
    if (take) {
      const int p = atomicAdd(&s_out, 1);
      if (p < st.k) sv[p] = v, si[p] = ids[i];
    }
  }
  __syncthreads();
  for (int i = tid; i < st.k; i += CT) vals[i] = sv[i], ids[i] = si[i];
  if (tid == 0) {
    st.count[slot] = st.k;
    st.thr[slot] = from_okey(T);
  }
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <class T>
T* device_alloc(int64_t n) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(n) * sizeof(T)));
  return static_cast<T*>(p);
}

template <class T>
void launch_score(const void* feat, int64_t rows, int dim, const float* q, const int64_t* ids,
                  int64_t base_id, const DevState& st, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + BM - 1) / BM),
                  static_cast<unsigned>((st.m + BN - 1) / BN));
  score_select_kernel<T><<<grid, NT, 0, stream>>>(static_cast<const T*>(feat), rows, dim, q, ids,
                                                 base_id, st);
}

}  // namespace

void DeviceFree::operator()(void* p) const {
  if (p) cudaFree(p);
}

struct CudaTopKAccess {
  static DevState state(const CudaTopK& s) {
    DevState st;
    st.vals = s.vals_.get();
    st.ids = s.ids_.get();
    st.count = s.count_.get();
    st.thr = s.thr_.get();
    st.scratch_v = s.scratch_v_.get();
    st.scratch_i = s.scratch_i_.get();
    st.m = static_cast<int>(s.m_);
    st.cap = static_cast<int>(s.cap_);
    st.k = static_cast<int>(s.k_);
    st.n_tails = s.n_tails_;
    st.tail0_bottom = s.tails_ == kBottom ? 1 : 0;
    return st;
  }
};

CudaTopK::CudaTopK(uintptr_t queries, int64_t m, int64_t dim, int64_t k_top, int tails,
                   int device, uintptr_t stream)
    : device_(device), m_(m), dim_(dim), k_(k_top), tails_(tails) {
  if (m < 1 || dim < 1 || dim > std::numeric_limits<int>::max() / BM)
    throw std::invalid_argument("queries must be [m >= 1, 1 <= dim < 2**24]");
  if (m > int64_t(65535) * BN) throw std::invalid_argument("at most 4194240 queries per state");
  if (tails < kTop || tails > kBoth) throw std::invalid_argument("tails must be 1, 2 or 3");
  n_tails_ = tails == kBoth ? 2 : 1;
  // Chunk rows: as many as the buffer budget allows (fewer launches), at least 4096.
  const int64_t per_row = m * n_tails_ * int64_t(sizeof(float) + sizeof(int64_t));
  chunk_ = std::clamp<int64_t>(kBufferBudgetBytes / per_row - 2 * k_top, 4096, int64_t(1) << 18);
  chunk_ = chunk_ / BM * BM;
  cap_ = 2 * k_top + chunk_;
  if (k_top < 1 || cap_ > std::numeric_limits<int>::max())
    throw std::invalid_argument("k_top must be in [1, 2**30]");

  DeviceGuard guard(device_);
  const cudaStream_t s = as_stream(stream);
  const int64_t slots = n_tails_ * m;
  q_.reset(device_alloc<float>(m * dim));
  vals_.reset(device_alloc<float>(slots * cap_));
  ids_.reset(device_alloc<int64_t>(slots * cap_));
  count_.reset(device_alloc<int>(slots));
  thr_.reset(device_alloc<float>(slots));
  scratch_v_.reset(device_alloc<float>(slots * k_top));
  scratch_i_.reset(device_alloc<int64_t>(slots * k_top));
  CUDA_CHECK(cudaMemcpyAsync(q_.get(), reinterpret_cast<const void*>(queries),
                             m * dim * sizeof(float), cudaMemcpyDeviceToDevice, s));
  CUDA_CHECK(cudaMemsetAsync(count_.get(), 0, slots * sizeof(int), s));
  const std::vector<float> ninf(slots, -std::numeric_limits<float>::infinity());
  CUDA_CHECK(cudaMemcpyAsync(thr_.get(), ninf.data(), slots * sizeof(float),
                             cudaMemcpyHostToDevice, s));
  CUDA_CHECK(cudaStreamSynchronize(s));  // `ninf` is pageable and about to go
}

CudaTopK::~CudaTopK() {
  // Free on this state's device; cudaFree waits for the work still using the buffers.
  int prev = 0;
  const bool switched = cudaGetDevice(&prev) == cudaSuccess && prev != device_ &&
                        cudaSetDevice(device_) == cudaSuccess;
  q_.reset(), vals_.reset(), ids_.reset(), count_.reset(), thr_.reset();
  scratch_v_.reset(), scratch_i_.reset();
  if (switched) cudaSetDevice(prev);
}

void CudaTopK::add(uintptr_t feat, int dtype, int64_t n, uintptr_t ids, int64_t base_id,
                   uintptr_t stream) {
  if (n <= 0) return;
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
    throw std::invalid_argument("dtype must be float32, float16 or bfloat16");
  DeviceGuard guard(device_);
  const cudaStream_t s = as_stream(stream);
  const DevState st = CudaTopKAccess::state(*this);
  const size_t elem = dtype == kF32 ? 4 : 2;
  const int64_t* id_ptr = reinterpret_cast<const int64_t*>(ids);
  const dim3 cgrid(static_cast<unsigned>(m_), static_cast<unsigned>(n_tails_));
  for (int64_t r0 = 0; r0 < n; r0 += chunk_) {
    const int64_t rows = std::min(chunk_, n - r0);
    compact_kernel<<<cgrid, CT, 0, s>>>(st, static_cast<int>(cap_ - rows));
    CUDA_CHECK(cudaGetLastError());
    const void* f = reinterpret_cast<const char*>(feat) + r0 * dim_ * elem;
    const int64_t* ip = id_ptr ? id_ptr + r0 : nullptr;
    const int dim = static_cast<int>(dim_);
    if (dtype == kF32)
      launch_score<float>(f, rows, dim, q_.get(), ip, base_id + r0, st, s);
    else if (dtype == kF16)
      launch_score<__half>(f, rows, dim, q_.get(), ip, base_id + r0, st, s);
    else
      launch_score<__nv_bfloat16>(f, rows, dim, q_.get(), ip, base_id + r0, st, s);
    CUDA_CHECK(cudaGetLastError());
  }
  rows_seen_ += n;
}

void CudaTopK::result(float* top_v, int64_t* top_i, float* bot_v, int64_t* bot_i,
                      uintptr_t stream) {
  if (rows_seen_ < k_)
    throw std::invalid_argument("k_top=" + std::to_string(k_) + " exceeds the " +
                                std::to_string(rows_seen_) + " rows added");
  DeviceGuard guard(device_);
  const cudaStream_t s = as_stream(stream);
  const DevState st = CudaTopKAccess::state(*this);
  compact_kernel<<<dim3(static_cast<unsigned>(m_), static_cast<unsigned>(n_tails_)), CT, 0, s>>>(
      st, static_cast<int>(k_));
  CUDA_CHECK(cudaGetLastError());

  // The first k entries of every buffer, unordered: order them on the host (m * k entries).
  const int64_t slots = n_tails_ * m_;
  std::vector<int> count(slots);
  std::vector<float> v(slots * k_);
  std::vector<int64_t> id(slots * k_);
  CUDA_CHECK(cudaMemcpyAsync(count.data(), count_.get(), slots * sizeof(int),
                             cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaMemcpy2DAsync(v.data(), k_ * sizeof(float), vals_.get(), cap_ * sizeof(float),
                               k_ * sizeof(float), slots, cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaMemcpy2DAsync(id.data(), k_ * sizeof(int64_t), ids_.get(),
                               cap_ * sizeof(int64_t), k_ * sizeof(int64_t), slots,
                               cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));

  std::vector<std::pair<float, int64_t>> e;
  for (int t = 0; t < n_tails_; ++t) {
    const bool bottom = t == 1 || tails_ == kBottom;
    float* out_v = bottom ? bot_v : top_v;
    int64_t* out_i = bottom ? bot_i : top_i;
    if (!out_v) continue;
    for (int64_t q = 0; q < m_; ++q) {
      const int64_t slot = t * m_ + q;
      const int64_t have = std::min<int64_t>(count[slot], k_);
      e.clear();
      for (int64_t j = 0; j < have; ++j) e.emplace_back(v[slot * k_ + j], id[slot * k_ + j]);
      std::sort(e.begin(), e.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      for (int64_t j = 0; j < k_; ++j) {
        out_v[q * k_ + j] = j < have ? (bottom ? -e[j].first : e[j].first)
                                     : std::numeric_limits<float>::quiet_NaN();
        out_i[q * k_ + j] = j < have ? e[j].second : -1;
      }
    }
  }
}

}  // namespace ctrak
