// CUDA top-k engine; see topk_cuda.h for the algorithm and the two score kernels.
//
// simt: a register-tiled fp32 GEMM (block tile 128 rows x 64 queries, k slab 16, each thread
// 8 x 4): the same fp32 fma chain per score as the CPU kernels.
// mma: tensor cores (mma.sync m16n8k16, fp32 accumulate). Block tile 128 rows x QN queries
// (QN = 32 for m <= 32, else 64), 8 warps of 32 x QN/2, k slabs of 32 in a 3-stage cp.async
// pipeline, two blocks per SM. A feature fragment is loaded once (ldmatrix) and multiplied by the three
// 16-bit parts of the queries; products are exact, the hi part and the mid + lo parts
// accumulate in separate registers and meet once in the epilogue, so the small parts are not
// rounded away against the large running sum.
// Both kernels end in the same fused selection epilogue: scores that pass their query's
// threshold are staged per query in shared memory and appended to the per-query buffers with
// one global atomic per (block, query); nothing else leaves the chip.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "topk_cuda.h"

namespace ctrak {

// Pinned buffers, copy stream and events of add_host: chunk c is copied (host memcpy into
// pinned[c % 2], then H2D on `copy`) while chunk c - 1 is scored on the caller's stream.
struct HostStaging {
  int device = 0;
  size_t feat_bytes = 0;      // capacity of each feature buffer
  int64_t id_rows = 0;        // capacity of each ids buffer
  void* pinned[2] = {nullptr, nullptr};
  int64_t* pinned_ids[2] = {nullptr, nullptr};
  void* dev[2] = {nullptr, nullptr};
  int64_t* dev_ids[2] = {nullptr, nullptr};
  cudaStream_t copy = nullptr;
  cudaEvent_t copied[2] = {nullptr, nullptr};  // H2D of buffer b done: pinned[b] reusable
  cudaEvent_t scored[2] = {nullptr, nullptr};  // kernels reading dev[b] done: dev[b] reusable
  int next = 0;
};

namespace {

#define CUDA_CHECK(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess)                                                               \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +              \
                               cudaGetErrorString(err_));                                  \
  } while (0)

enum Engine : int { kAuto = 0, kMma = 1, kSimt = 2 };

// simt tile.
constexpr int BM = 128;  // rows per block tile (both kernels)
constexpr int BN = 64;   // queries per block tile
constexpr int BK = 16;   // k slab staged in shared memory
constexpr int TM = 8;    // rows per thread
constexpr int TN = 4;    // queries per thread
constexpr int NT = 256;  // threads per block: (BM / TM) * (BN / TN)
constexpr int CT = 512;  // threads of the compaction kernel
static_assert((BM / TM) * (BN / TN) == NT, "thread tile");
static_assert(BM <= 256, "row offsets are staged as uint8");

// mma tile.
constexpr int MMA_BK = 32;            // k per pipeline stage: two m16n8k16 steps
constexpr int MMA_LDS = MMA_BK + 8;   // smem row stride (16-bit elements): 80 bytes, so the
                                      // 8 rows an ldmatrix phase reads fall in distinct banks
constexpr int MMA_NT = 256;           // 8 warps: 4 along rows (32 each) x 2 along queries
constexpr int kStages = 3;            // cp.async pipeline depth: with two blocks per SM, four
                                      // 8 KiB feature stages in flight per SM keep HBM busy
constexpr int kParts = 3;             // query parts: hi, mid, lo
constexpr int kQueryPad = 64;         // m is padded to the largest QN

struct GemmSmem {
  float a[BK][BM + 4];  // features, transposed; +4 spreads the transposing stores over banks
  float b[BK][BN + 4];  // queries, transposed
};
// Candidates of one tail, per query of the tile, waiting for their global slots.
template <int QN>
struct StageSmem {
  float val[QN][BM];
  uint8_t row[QN][BM];  // row offsets in the tile
  int cnt[QN];
  int base[QN];         // reserved offsets in the per-query buffers
};
union TileSmem {
  GemmSmem g;
  StageSmem<BN> s;
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
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
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

// The fused selection epilogue of both score kernels. `for_each(visit)` calls
// visit(row in tile, query in tile, score) for every score this thread holds. Per tail: scores
// that pass their query's threshold are staged in shared memory, each query reserves room in
// its global buffer with one atomic, and the block writes the candidates out. The buffers have
// room for every row of the chunk (the compaction kernel runs first), so appends never
// overflow. Must be reached by every thread of the block (it synchronises).
template <int QN, class ForEach>
__device__ __forceinline__ void append_candidates(const DevState& st, StageSmem<QN>& sm,
                                                  int64_t row0, int rows_here, int q0,
                                                  const int64_t* __restrict__ ids,
                                                  int64_t base_id, ForEach for_each) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int nthreads = blockDim.x, nwarps = nthreads / 32;
  for (int t = 0; t < st.n_tails; ++t) {
    const bool neg = t == 1 || st.tail0_bottom;
    const int64_t slot0 = static_cast<int64_t>(t) * st.m;
    for (int c = tid; c < QN; c += nthreads) sm.cnt[c] = 0;
    __syncthreads();
    for_each([&](int r, int ql, float score) {
      if (r >= rows_here || q0 + ql >= st.m) return;
      const float v = neg ? -score : score;
      if (v >= st.thr[slot0 + q0 + ql]) {  // NaN never passes
        const int s = atomicAdd(&sm.cnt[ql], 1);
        sm.val[ql][s] = v;
        sm.row[ql][s] = static_cast<uint8_t>(r);
      }
    });
    __syncthreads();
    for (int c = tid; c < QN; c += nthreads)
      if (sm.cnt[c] > 0) sm.base[c] = atomicAdd(&st.count[slot0 + q0 + c], sm.cnt[c]);
    __syncthreads();
    for (int ql = warp; ql < QN; ql += nwarps) {
      const int c = sm.cnt[ql];
      if (c == 0) continue;
      const int64_t off = (slot0 + q0 + ql) * st.cap + sm.base[ql];
      for (int s = lane; s < c; s += 32) {
        const int64_t row = row0 + sm.row[ql][s];
        st.vals[off + s] = sm.val[ql][s];
        st.ids[off + s] = ids ? ids[row] : base_id + row;
      }
    }
    __syncthreads();
  }
}

// simt: scores of rows [blockIdx.x * BM, +BM) x queries [blockIdx.y * BN, +BN).
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
  append_candidates<BN>(st, sm.s, row0, rows_here, q0, ids, base_id, [&](auto&& visit) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) visit(ty * TM + i, tx * TN + j, acc[i][j]);
  });
}

// ---- tensor cores --------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 16-bit matrices; lane l supplies the address of row l % 8 of matrix l / 8 and
// receives, in r[i], the pair (row lane / 4, columns 2 * (lane % 4) + {0, 1}) of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += A (16x16, row-major fragment a) * B (16x8, column-major fragment b0, b1), fp32.
template <class T>
struct Mma;
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <class T, int NI>
struct MmaShape {
  static constexpr int QN = 16 * NI;  // queries per block: 2 warps x NI tiles of 8
  static constexpr int A_ELEMS = BM * MMA_LDS;
  static constexpr int STAGE = A_ELEMS + kParts * QN * MMA_LDS;  // 16-bit elements per stage
  static constexpr size_t kGemmBytes = kStages * STAGE * sizeof(T);
  static constexpr size_t kSmemBytes =
      kGemmBytes > sizeof(StageSmem<QN>) ? kGemmBytes : sizeof(StageSmem<QN>);
};

// Query parts for the mma kernel. Block `row` (of m_pad) writes out[p][row][0..dim_pad) for the
// parts p = 0, 1, 2 (zero beyond m and dim) and qscale[row]. bfloat16: u = hi + mid + lo
// exactly (8 + 8 + 8 significand bits). float16: u is first scaled by 2^s so that max|u| lies
// in [2^14, 2^15) (the parts then use the float16 range, not its subnormals); qscale = 2^-s
// undoes it in the epilogue (exact). Each residual v - part is exact in fp32.
template <class T>
__global__ void split_queries_kernel(const float* __restrict__ q, int m, int dim, int m_pad,
                                     int dim_pad, T* __restrict__ out,
                                     float* __restrict__ qscale) {
  __shared__ float red[32];
  const int row = blockIdx.x, tid = threadIdx.x;
  float mx = 0.0f;
  if (row < m)
    for (int d = tid; d < dim; d += blockDim.x)
      mx = fmaxf(mx, fabsf(q[static_cast<int64_t>(row) * dim + d]));
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (tid % 32 == 0) red[tid / 32] = mx;
  __syncthreads();
  if (tid < 32) {
    mx = tid < static_cast<int>(blockDim.x / 32) ? red[tid] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (tid == 0) red[0] = mx;
  }
  __syncthreads();
  mx = red[0];
  float scale = 1.0f, inv = 1.0f;
  if (std::is_same<T, __half>::value && mx > 0.0f && isfinite(mx)) {
    int e;
    frexpf(mx, &e);                          // mx in [2^(e-1), 2^e)
    const int s = max(-126, min(126, 15 - e));  // mx * 2^s in [2^14, 2^15)
    scale = ldexpf(1.0f, s);
    inv = ldexpf(1.0f, -s);
  }
  const int64_t plane = static_cast<int64_t>(m_pad) * dim_pad;
  T* o = out + static_cast<int64_t>(row) * dim_pad;
  for (int d = tid; d < dim_pad; d += blockDim.x) {
    const float v = row < m && d < dim ? q[static_cast<int64_t>(row) * dim + d] * scale : 0.0f;
    const T hi = from_float<T>(v);
    const float r1 = v - to_float(hi);
    const T mid = from_float<T>(r1);
    const T lo = from_float<T>(r1 - to_float(mid));
    o[d] = hi;
    o[plane + d] = mid;
    o[2 * plane + d] = lo;
  }
  if (tid == 0) qscale[row] = inv;
}

// mma: scores of rows [blockIdx.x * BM, +BM) x queries [blockIdx.y * QN, +QN). Features are
// [rows, dim] 16-bit, 16-byte aligned, dim % 8 == 0; qs is [3][m_pad][dim_pad] (dim_pad a
// multiple of MMA_BK), so query loads need no bounds.
template <class T, int NI>
__global__ void __launch_bounds__(MMA_NT, 2) mma_score_kernel(
    const T* __restrict__ feat, int64_t rows, int dim, const T* __restrict__ qs,
    const float* __restrict__ qscale, int m_pad, int dim_pad, const int64_t* __restrict__ ids,
    int64_t base_id, DevState st) {
  using S = MmaShape<T, NI>;
  constexpr int QN = S::QN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;  // warp tile: rows wm*32.., queries wn*QN/2..
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int q0 = blockIdx.y * QN;
  const int rows_here = static_cast<int>(rows - row0 < BM ? rows - row0 : BM);
  const T* ftile = feat + row0 * dim;

  // acc[mi][ni][part][c]: part 0 accumulates hi, part 1 mid + lo.
  float acc[2][NI][2][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mi][ni][h][c] = 0.0f;

  auto load_stage = [&](int buf, int k0) {
    T* as = smem + buf * S::STAGE;
    T* bs = as + S::A_ELEMS;
    for (int c = tid; c < BM * (MMA_BK / 8); c += MMA_NT) {
      const int r = c / (MMA_BK / 8), kc = c % (MMA_BK / 8) * 8;
      const bool ok = r < rows_here && k0 + kc < dim;  // dim % 8 == 0: whole chunk or none
      cp_async16(as + r * MMA_LDS + kc, ok ? ftile + static_cast<int64_t>(r) * dim + k0 + kc : feat,
                 ok);
    }
    for (int c = tid; c < kParts * QN * (MMA_BK / 8); c += MMA_NT) {
      const int pr = c / (MMA_BK / 8), kc = c % (MMA_BK / 8) * 8;
      const int p = pr / QN, ql = pr % QN;
      cp_async16(bs + pr * MMA_LDS + kc,
                 qs + (static_cast<int64_t>(p) * m_pad + q0 + ql) * dim_pad + k0 + kc, true);
    }
  };

  const int ktiles = dim_pad / MMA_BK;
#pragma unroll
  for (int st0 = 0; st0 < kStages - 1; ++st0) {
    if (st0 < ktiles) load_stage(st0, st0 * MMA_BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    // Refill the stage consumed in iteration kt - 1 (the barrier at its end makes that safe).
    const int pre = kt + kStages - 1;
    if (pre < ktiles) load_stage(pre % kStages, pre * MMA_BK);
    cp_async_commit();  // possibly empty: one group per iteration keeps the count below right
    cp_async_wait<kStages - 1>();  // groups 0..kt are complete: stage kt has landed
    __syncthreads();
    const T* as = smem + (kt % kStages) * S::STAGE;
    const T* bs = as + S::A_ELEMS;
#pragma unroll
    for (int ks = 0; ks < MMA_BK; ks += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(a[mi], as + (wm * 32 + mi * 16 + (lane & 15)) * MMA_LDS + ks + (lane >> 4) * 8);
      // Part p's fragments of two n-tiles at a time: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
      // (n 8-15, k 0-7), (n 8-15, k 8-15). hi goes to acc[..][0], mid and lo to acc[..][1];
      // the rolled loop over mid and lo keeps the compiler from hoisting every part's
      // fragments at once (two blocks per SM leave 128 registers).
      const int bn = wn * (NI * 8) + (lane & 7) + ((lane >> 4) << 3);
      const int bk = ks + ((lane >> 3) & 1) * 8;
      auto part = [&](int p, int h) {
#pragma unroll
        for (int ni = 0; ni < NI; ni += 2) {
          uint32_t b[4];
          ldmatrix_x4(b, bs + (p * QN + bn + ni * 8) * MMA_LDS + bk);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            Mma<T>::run(acc[mi][ni][h], a[mi], b[0], b[1]);
            Mma<T>::run(acc[mi][ni + 1][h], a[mi], b[2], b[3]);
          }
        }
      };
      part(0, 0);
#pragma unroll 1
      for (int p = 1; p < kParts; ++p) part(p, 1);
    }
    __syncthreads();  // stage kt % kStages is refilled at the top of iteration kt + 1
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory becomes the candidate staging area

  // hi + (mid + lo), one rounding, then the power-of-two query scale (exact). Done before the
  // epilogue so that only half the accumulators stay live through it.
#pragma unroll
  for (int ni = 0; ni < NI; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float sc = qscale[q0 + wn * (NI * 8) + ni * 8 + 2 * (lane & 3) + j];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int c = j; c < 4; c += 2)
          acc[mi][ni][0][c] = (acc[mi][ni][0][c] + acc[mi][ni][1][c]) * sc;
    }
  auto& stage = *reinterpret_cast<StageSmem<QN>*>(smem_raw);
  append_candidates<QN>(st, stage, row0, rows_here, q0, ids, base_id, [&](auto&& visit) {
    // Accumulator c of tile (mi, ni): row g + 8 * (c / 2), column 2 * (lane % 4) + c % 2.
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          visit(wm * 32 + mi * 16 + (lane >> 2) + (c >> 1) * 8,
                wn * (NI * 8) + ni * 8 + 2 * (lane & 3) + (c & 1), acc[mi][ni][0][c]);
  });
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

int64_t round_up(int64_t x, int64_t r) { return (x + r - 1) / r * r; }

template <class T>
void launch_simt(const void* feat, int64_t rows, int dim, const float* q, const int64_t* ids,
                 int64_t base_id, const DevState& st, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + BM - 1) / BM),
                  static_cast<unsigned>((st.m + BN - 1) / BN));
  score_select_kernel<T><<<grid, NT, 0, stream>>>(static_cast<const T*>(feat), rows, dim, q, ids,
                                                 base_id, st);
}

template <class T, int NI>
void launch_mma(const void* feat, int64_t rows, int dim, const void* qs, const float* qscale,
                int m_pad, int dim_pad, const int64_t* ids, int64_t base_id, const DevState& st,
                cudaStream_t stream) {
  using S = MmaShape<T, NI>;
  const auto kernel = mma_score_kernel<T, NI>;
  // Above 48 KiB of dynamic shared memory needs the opt-in (per device, cheap to repeat).
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(S::kSmemBytes)));
  const dim3 grid(static_cast<unsigned>((rows + BM - 1) / BM),
                  static_cast<unsigned>((st.m + S::QN - 1) / S::QN));
  kernel<<<grid, MMA_NT, S::kSmemBytes, stream>>>(static_cast<const T*>(feat), rows, dim,
                                                  static_cast<const T*>(qs), qscale, m_pad,
                                                  dim_pad, ids, base_id, st);
}

int parse_engine(const std::string& name) {
  std::string want = name;
  if (want == "auto") {
    const char* env = std::getenv("CTRAK_CUDA_ENGINE");
    want = env && *env ? env : "auto";
  }
  if (want == "auto") return kAuto;
  if (want == "mma") return kMma;
  if (want == "simt") return kSimt;
  throw std::invalid_argument("CUDA engine must be 'auto', 'mma' or 'simt', got '" + want + "'");
}

}  // namespace

void DeviceFree::operator()(void* p) const {
  if (p) cudaFree(p);
}

void HostStagingFree::operator()(HostStaging* h) const {
  if (!h) return;
  int prev = 0;
  const bool switched = cudaGetDevice(&prev) == cudaSuccess && prev != h->device &&
                        cudaSetDevice(h->device) == cudaSuccess;
  // Nothing may still read the buffers: the last copies and the kernels that used them.
  for (int b = 0; b < 2; ++b)
    if (h->scored[b]) cudaEventSynchronize(h->scored[b]);
  if (h->copy) cudaStreamSynchronize(h->copy);
  for (int b = 0; b < 2; ++b) {
    if (h->pinned[b]) cudaFreeHost(h->pinned[b]);
    if (h->pinned_ids[b]) cudaFreeHost(h->pinned_ids[b]);
    if (h->dev[b]) cudaFree(h->dev[b]);
    if (h->dev_ids[b]) cudaFree(h->dev_ids[b]);
    if (h->copied[b]) cudaEventDestroy(h->copied[b]);
    if (h->scored[b]) cudaEventDestroy(h->scored[b]);
  }
  if (h->copy) cudaStreamDestroy(h->copy);
  if (switched) cudaSetDevice(prev);
  delete h;
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
                   int device, uintptr_t stream, const std::string& engine)
    : device_(device), m_(m), dim_(dim), k_(k_top), tails_(tails), engine_(parse_engine(engine)) {
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
  staging_.reset();  // first: it waits for the kernels still reading its buffers
  q_.reset(), vals_.reset(), ids_.reset(), count_.reset(), thr_.reset();
  scratch_v_.reset(), scratch_i_.reset();
  for (int i = 0; i < 2; ++i) qsplit_[i].reset(), qscale_[i].reset();
  if (switched) cudaSetDevice(prev);
}

const char* CudaTopK::engine_for(int dtype) const {
  return dtype != kF32 && dim_ % 8 == 0 && engine_ != kSimt ? "mma" : "simt";
}

const void* CudaTopK::split_queries(int dtype, uintptr_t stream) {
  const int idx = dtype == kF16 ? 0 : 1;
  if (!qsplit_[idx]) {
    const int64_t m_pad = round_up(m_, kQueryPad), dim_pad = round_up(dim_, MMA_BK);
    qsplit_[idx].reset(device_alloc<uint16_t>(kParts * m_pad * dim_pad));
    qscale_[idx].reset(device_alloc<float>(m_pad));
    const cudaStream_t s = as_stream(stream);
    const int md = static_cast<int>(m_), dd = static_cast<int>(dim_);
    const int mp = static_cast<int>(m_pad), dp = static_cast<int>(dim_pad);
    if (dtype == kF16)
      split_queries_kernel<__half><<<mp, 256, 0, s>>>(
          q_.get(), md, dd, mp, dp, reinterpret_cast<__half*>(qsplit_[idx].get()),
          qscale_[idx].get());
    else
      split_queries_kernel<__nv_bfloat16><<<mp, 256, 0, s>>>(
          q_.get(), md, dd, mp, dp, reinterpret_cast<__nv_bfloat16*>(qsplit_[idx].get()),
          qscale_[idx].get());
    CUDA_CHECK(cudaGetLastError());
  }
  return qsplit_[idx].get();
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
  const bool mma = std::strcmp(engine_for(dtype), "mma") == 0 && feat % 16 == 0;
  const void* qs = mma ? split_queries(dtype, stream) : nullptr;
  const float* qscale = mma ? qscale_[dtype == kF16 ? 0 : 1].get() : nullptr;
  const int m_pad = static_cast<int>(round_up(m_, kQueryPad));
  const int dim_pad = static_cast<int>(round_up(dim_, MMA_BK));
  const dim3 cgrid(static_cast<unsigned>(m_), static_cast<unsigned>(n_tails_));
  for (int64_t r0 = 0; r0 < n; r0 += chunk_) {
    const int64_t rows = std::min(chunk_, n - r0);
    compact_kernel<<<cgrid, CT, 0, s>>>(st, static_cast<int>(cap_ - rows));
    CUDA_CHECK(cudaGetLastError());
    const void* f = reinterpret_cast<const char*>(feat) + r0 * dim_ * elem;
    const int64_t* ip = id_ptr ? id_ptr + r0 : nullptr;
    const int dim = static_cast<int>(dim_);
    const int64_t b = base_id + r0;
    if (mma && dtype == kF16 && m_ <= 32)
      launch_mma<__half, 2>(f, rows, dim, qs, qscale, m_pad, dim_pad, ip, b, st, s);
    else if (mma && dtype == kF16)
      launch_mma<__half, 4>(f, rows, dim, qs, qscale, m_pad, dim_pad, ip, b, st, s);
    else if (mma && m_ <= 32)
      launch_mma<__nv_bfloat16, 2>(f, rows, dim, qs, qscale, m_pad, dim_pad, ip, b, st, s);
    else if (mma)
      launch_mma<__nv_bfloat16, 4>(f, rows, dim, qs, qscale, m_pad, dim_pad, ip, b, st, s);
    else if (dtype == kF32)
      launch_simt<float>(f, rows, dim, q_.get(), ip, b, st, s);
    else if (dtype == kF16)
      launch_simt<__half>(f, rows, dim, q_.get(), ip, b, st, s);
    else
      launch_simt<__nv_bfloat16>(f, rows, dim, q_.get(), ip, b, st, s);
    CUDA_CHECK(cudaGetLastError());
  }
  rows_seen_ += n;
}

void CudaTopK::add_host(const void* feat, int dtype, int64_t n, const int64_t* ids,
                        int64_t base_id, uintptr_t stream) {
  if (n <= 0) return;
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
    throw std::invalid_argument("dtype must be float32, float16 or bfloat16");
  DeviceGuard guard(device_);
  const size_t row_bytes = static_cast<size_t>(dim_) * (dtype == kF32 ? 4 : 2);
  if (!staging_) {
    std::unique_ptr<HostStaging, HostStagingFree> h(new HostStaging);
    h->device = device_;
    h->feat_bytes = std::max<size_t>(kStagingBytes, 4 * static_cast<size_t>(dim_));
    h->id_rows = static_cast<int64_t>(h->feat_bytes / (2 * static_cast<size_t>(dim_)));
    CUDA_CHECK(cudaStreamCreateWithFlags(&h->copy, cudaStreamNonBlocking));
    for (int b = 0; b < 2; ++b) {
      CUDA_CHECK(cudaHostAlloc(&h->pinned[b], h->feat_bytes, cudaHostAllocDefault));
      CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&h->pinned_ids[b]), h->id_rows * 8,
                               cudaHostAllocDefault));
      CUDA_CHECK(cudaMalloc(&h->dev[b], h->feat_bytes));
      CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&h->dev_ids[b]), h->id_rows * 8));
      CUDA_CHECK(cudaEventCreateWithFlags(&h->copied[b], cudaEventDisableTiming));
      CUDA_CHECK(cudaEventCreateWithFlags(&h->scored[b], cudaEventDisableTiming));
    }
    staging_ = std::move(h);
  }
  HostStaging& h = *staging_;
  const cudaStream_t s = as_stream(stream);
  const int64_t per = std::min<int64_t>(h.id_rows, static_cast<int64_t>(h.feat_bytes / row_bytes));
  const char* src = static_cast<const char*>(feat);
  for (int64_t r0 = 0; r0 < n; r0 += per) {
    const int b = h.next;
    h.next ^= 1;
    const int64_t rows = std::min(per, n - r0);
    // pinned[b] is free once its previous H2D copy is done (long ago: two chunks back).
    CUDA_CHECK(cudaEventSynchronize(h.copied[b]));
    std::memcpy(h.pinned[b], src + r0 * row_bytes, rows * row_bytes);
    if (ids) std::memcpy(h.pinned_ids[b], ids + r0, rows * sizeof(int64_t));
    // dev[b] is free once the kernels of two chunks back have read it.
    CUDA_CHECK(cudaStreamWaitEvent(h.copy, h.scored[b], 0));
    CUDA_CHECK(cudaMemcpyAsync(h.dev[b], h.pinned[b], rows * row_bytes, cudaMemcpyHostToDevice,
                               h.copy));
    if (ids)
      CUDA_CHECK(cudaMemcpyAsync(h.dev_ids[b], h.pinned_ids[b], rows * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, h.copy));
    CUDA_CHECK(cudaEventRecord(h.copied[b], h.copy));
    CUDA_CHECK(cudaStreamWaitEvent(s, h.copied[b], 0));
    add(reinterpret_cast<uintptr_t>(h.dev[b]), dtype, rows,
        ids ? reinterpret_cast<uintptr_t>(h.dev_ids[b]) : 0, base_id + r0, stream);
    CUDA_CHECK(cudaEventRecord(h.scored[b], s));
  }
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
