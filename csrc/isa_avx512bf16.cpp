// AVX512-BF16 kernel of the exact bfloat16 search (bf16_search.cpp): approximate scores of
// bfloat16 rows against the bfloat16 part of the queries with vdpbf16ps (bf16 pairs multiplied
// exactly, accumulated in float32: 32 products per instruction, twice the float32 fma rate),
// each row's norm bound, and the fused candidate filter. Compiled with -mavx512bf16 and only
// called when the CPU reports AVX512-BF16 (bf16_search.cpp). No std:: templates (common.h).
//
// Register tile as in kernel_impl.h: MR rows x NV vectors of 16 queries. A query block is packed
// [pairs][NV*16] uint32 words, word = q_hi[2p] | q_hi[2p+1] << 16; a row's pair word is broadcast.
#include <immintrin.h>

#include "bf16_common.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ctrak {
namespace {

constexpr int W = 16;
constexpr int kMaxNV = 4;
constexpr int kMaxNR = kMaxNV * W;
// 32 zmm registers: MR x NV accumulators + NV query vectors + one broadcast.
constexpr int mr_for(int nv) { return nv >= 4 ? 6 : nv == 3 ? 8 : nv == 2 ? 12 : 16; }

inline int block_nv(int64_t m, int64_t q0) {
  const int64_t nv = (m - q0 + W - 1) / W;
  return nv < kMaxNV ? static_cast<int>(nv) : kMaxNV;
}

size_t packed_words(int64_t m, int64_t dim) {
  return static_cast<size_t>((m + W - 1) / W * W * ((dim + 1) / 2));
}

void pack_queries(const uint16_t* q, int64_t m, int64_t dim, uint32_t* out) {
  const int64_t pairs = (dim + 1) / 2;
  for (int64_t q0 = 0; q0 < m; q0 += kMaxNR) {
    const int nr = block_nv(m, q0) * W;
    uint32_t* dst = out + q0 * pairs;
    for (int64_t p = 0; p < pairs; ++p)
      for (int c = 0; c < nr; ++c) {
        uint32_t w = 0;
        if (q0 + c < m) {
          const uint16_t* row = q + (q0 + c) * dim;
          w = row[2 * p];
          if (2 * p + 1 < dim) w |= static_cast<uint32_t>(row[2 * p + 1]) << 16;
        }
        dst[p * nr + c] = w;
      }
  }
}

// Pair word p of a row; the odd tail pair has a zero high half (never reads past the row).
inline uint32_t pair_word(const uint16_t* row, int64_t p, int64_t dim) {
  if (2 * p + 1 < dim) {
    uint32_t w;
    __builtin_memcpy(&w, row + 2 * p, 4);
    return w;
  }
  return row[2 * p];
}

// Upper bound of ||row||_2. c = the row's sum of squares S by vdpbf16ps: the products are exact,
// each of the < n = dim float32 additions errs by at most one ulp (a factor 1 + d, |d| <= 2u,
// u = 2^-24, whatever the rounding of the unit) and flushed subnormals lose < 2^-126 each, so
// c >= S (1 - g) - n 2^-126 with g = 2nu / (1 - 2nu), i.e.
// S <= (c + n 2^-126) (1 - 2nu) / (1 - 4nu). The factors (1 + 2^-20) cover the roundings of this
// arithmetic itself (a few, each <= u relative); 2^-110 keeps the bound a normal float.
inline float norm_bound(const uint16_t* row, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    const __m512i x = _mm512_loadu_si512(row + i);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)x);
  }
  if (i < dim) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << (dim - i)) - 1);
    const __m512i x = _mm512_maskz_loadu_epi16(mask, row + i);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)x);
  }
  const float c = _mm512_reduce_add_ps(acc);
  const float nu2 = 2.0f * static_cast<float>(dim) * 0x1p-24f;  // dim < 2^20: < 1/8
  const float sq =
      (c + static_cast<float>(dim) * 0x1p-126f + 0x1p-110f) * (1.0f - nu2) / (1.0f - 2.0f * nu2);
  return __builtin_sqrtf(sq * (1.0f + 0x1p-20f)) * (1.0f + 0x1p-20f);
}

inline void push(Bf16Reservoir& r, float lo, float hi, int64_t id, int64_t row,
                 const Bf16Sel& s, float* thr, int negate) {
  Bf16Entry& e = r.e[r.count];
  e.lo = lo, e.hi = hi, e.id = id, e.row = row;
  if (++r.count == r.cap) s.compact(&r, s.k, thr, negate);
}

// Cold path: a lane of this (row, query vector) may still reach its query's k-th.
__attribute__((noinline)) void accept(const Bf16TileArgs& a, __m512 s, __m512 e, int64_t r,
                                      int64_t qb, uint32_t mt, uint32_t mb) {
  float sv[W], ev[W];
  _mm512_storeu_ps(sv, s);
  _mm512_storeu_ps(ev, e);
  const int64_t id = a.ids ? a.ids[r] : a.base_id + r;
  const int64_t row = a.row0 + r;
  const Bf16Sel& c = *a.sel;
  for (; mt; mt &= mt - 1) {
    const int l = __builtin_ctz(mt);
    push(c.res_top[qb + l], sv[l] - ev[l], sv[l] + ev[l], id, row, c, c.thr_top + qb + l, 0);
  }
  for (; mb; mb &= mb - 1) {
    const int l = __builtin_ctz(mb);
    push(c.res_bot[qb + l], -sv[l] - ev[l], -sv[l] + ev[l], id, row, c, c.thr_bot + qb + l, 1);
  }
}

// Rows [i0, i0 + MR) (clamped to the tile) x queries [q0, q0 + NV*16), scored and filtered.
template <int NV>
__attribute__((always_inline)) inline void micro_tile(const Bf16TileArgs& a, int64_t i0,
                                                      int64_t q0) {
  constexpr int MR = mr_for(NV);
  constexpr int NR = NV * W;
  const int64_t dim = a.dim, pairs = (dim + 1) / 2, full = dim / 2;
  const uint16_t* rows[MR];
  for (int r = 0; r < MR; ++r)  // rows past the tile repeat its last row; never accepted
    rows[r] = a.feat + (i0 + r < a.rows ? i0 + r : a.rows - 1) * dim;
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint32_t* B = a.qpack + q0 * pairs;
  for (int64_t p = 0; p < full; ++p) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + p * NR + v * W);
    for (int r = 0; r < MR; ++r) {
      int32_t w;
      __builtin_memcpy(&w, rows[r] + 2 * p, 4);
      const __m512i x = _mm512_set1_epi32(w);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)x, (__m512bh)b[v]);
    }
  }
  if (full < pairs) {  // odd dim: the last element, paired with zero
    for (int r = 0; r < MR; ++r) {
      const __m512i x = _mm512_set1_epi32(static_cast<int32_t>(pair_word(rows[r], full, dim)));
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)x,
                                     (__m512bh)_mm512_loadu_si512(B + full * NR + v * W));
    }
  }

  const Bf16Sel& s = *a.sel;
  __m512 cq[NV], ca[NV], tt[NV], tb[NV];
  for (int v = 0; v < NV; ++v) {
    cq[v] = _mm512_loadu_ps(a.err_scale + q0 + v * W);
    ca[v] = _mm512_loadu_ps(a.err_abs + q0 + v * W);
    tt[v] = _mm512_loadu_ps(s.thr_top + q0 + v * W);
    tb[v] = _mm512_loadu_ps(s.thr_bot + q0 + v * W);
  }
  for (int r = 0; r < MR && i0 + r < a.rows; ++r) {
    // A flagged row's norm is NaN: every compare below is false (bf16_search adds it apart).
    const __m512 nb = _mm512_set1_ps(a.norms[i0 + r]);
    for (int v = 0; v < NV; ++v) {
      const __m512 e = _mm512_fmadd_ps(nb, cq[v], ca[v]);
      const uint32_t mt = _mm512_cmp_ps_mask(_mm512_add_ps(acc[r][v], e), tt[v], _CMP_GE_OQ);
      const uint32_t mb = _mm512_cmp_ps_mask(_mm512_sub_ps(acc[r][v], e), tb[v], _CMP_LE_OQ);
      if (__builtin_expect((mt | mb) != 0, 0)) {
        accept(a, acc[r][v], e, i0 + r, q0 + v * W, mt, mb);
        tt[v] = _mm512_loadu_ps(s.thr_top + q0 + v * W);  // a compaction may have raised them
        tb[v] = _mm512_loadu_ps(s.thr_bot + q0 + v * W);
      }
    }
  }
}

template <int NV>
void query_block(const Bf16TileArgs& a, int64_t q0) {
  constexpr int MR = mr_for(NV);
  for (int64_t i0 = 0; i0 < a.rows; i0 += MR) micro_tile<NV>(a, i0, q0);
}

template <int NV>
inline void query_block_nv(int nv, const Bf16TileArgs& a, int64_t q0) {
  if (nv == NV)
    query_block<NV>(a, q0);
  else if constexpr (NV > 1)
    query_block_nv<NV - 1>(nv, a, q0);
}

void score_tile(Bf16TileArgs& a) {
  a.n_flagged = 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    const float n = norm_bound(a.feat + r * a.dim, a.dim);
    // Non-finite rows, and rows large enough that a float32 partial sum could overflow, are
    // re-scored exactly whatever their approximate score.
    if (!(n * a.query_norm_max < 0x1p100f)) {
      a.norms[r] = __builtin_nanf("");
      a.flagged[a.n_flagged++] = static_cast<int32_t>(r);
    } else {
      a.norms[r] = n;
    }
  }
  for (int64_t q0 = 0; q0 < a.m; q0 += kMaxNR) query_block_nv<kMaxNV>(block_nv(a.m, q0), a, q0);
}

const Bf16Kernels kKernels = {W, &packed_words, &pack_queries, &score_tile};

}  // namespace

const Bf16Kernels* bf16_kernels_avx512bf16() { return &kKernels; }

}  // namespace ctrak
