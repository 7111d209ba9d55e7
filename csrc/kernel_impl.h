// Body of one instruction-set variant of the CPU top-k kernels. Included once per ISA
// translation unit (isa_*.cpp) inside that ISA's namespace, after `struct V` (vector width W,
// register-tile shapes, load/store/fma/compare, fp16 and bf16 decode) is defined.
//
// Scores are a GEMM  S[rows, m] = A[rows, dim] . Q[m, dim]^T  vectorised over queries: a register
// tile holds MR feature rows x NV vectors of W queries. Query blocks are packed once
// ([dim][NV*W] per block) so the kernel streams them contiguously; feature rows are broadcast
// from float32 k-block slabs at a fixed row stride (one pointer, constant offsets). A register
// tile's sums stay in registers for the whole dim, so every score is the same single fma chain
// over d = 0..dim-1 whatever the blocking, the thread count or the path (fused or not).
// The selection is fused: each finished register tile is compared against per-query thresholds
// (one compare per vector and tail) and only the rare survivors leave registers. In dense mode
// (score export) the finished tile goes to cbuf instead: the same bits topk would have selected.
// The source rows of the next tile are prefetched, a line per k step, while this one is scored.
//
// No std:: templates here (see common.h on why).

namespace {

constexpr int W = V::W;
constexpr int kMaxNR = V::kMaxNV * W;

constexpr bool every_mr_divides_row_multiple() {
  for (int nv = 1; nv <= V::kMaxNV; ++nv)
    if (V::kRowMultiple % V::mr(nv) != 0) return false;
  return true;
}
static_assert(every_mr_divides_row_multiple(), "tile rows must be a multiple of every MR");

inline int64_t round_up(int64_t x, int64_t r) { return (x + r - 1) / r * r; }

inline int block_nv(int64_t m, int64_t q0) {
  const int64_t nv = (m - q0 + W - 1) / W;
  return nv < V::kMaxNV ? static_cast<int>(nv) : V::kMaxNV;
}

size_t packed_floats(int64_t m, int64_t dim) {
  return static_cast<size_t>(round_up(m, W) * dim);
}

// q [m, dim] -> blocks of NV*W queries; block at q0 is [dim][NV*W] at out + q0 * dim, padded
// lanes are zero. Every block before the last is full, so the offsets need no table.
void pack_queries(const float* q, int64_t m, int64_t dim, float* out) {
  for (int64_t q0 = 0; q0 < m; q0 += kMaxNR) {
    const int nr = block_nv(m, q0) * W;
    float* dst = out + q0 * dim;
    for (int64_t d = 0; d < dim; ++d)
      for (int c = 0; c < nr; ++c)
        dst[d * nr + c] = q0 + c < m ? q[(q0 + c) * dim + d] : 0.0f;
  }
}

// Dims [d0, d0 + len) of tile row r -> float32 at dst; zeros past a.rows (those scores are
// computed and then discarded by the row check in accept()).
inline void decode_row(const TileArgs& a, int64_t r, int64_t d0, int64_t len, float* dst) {
  if (r >= a.rows) {
    for (int64_t d = 0; d < len; ++d) dst[d] = 0.0f;
    return;
  }
  switch (a.dtype) {
    case kF16:
      V::decode_f16(static_cast<const uint16_t*>(a.feat) + r * a.dim + d0, dst, len);
      break;
    case kBF16:
      V::decode_bf16(static_cast<const uint16_t*>(a.feat) + r * a.dim + d0, dst, len);
      break;
    default: {
      const float* src = static_cast<const float*>(a.feat) + r * a.dim + d0;
      for (int64_t d = 0; d < len; ++d) dst[d] = src[d];
    }
  }
}

// The whole tile -> abuf's k-block slabs ([slab][tile_rows][kTileStride], common.h), row by row
// so that the source streams in order.
void decode_tile(const TileArgs& a, int64_t tile_rows) {
  for (int64_t r = 0; r < tile_rows; ++r) {
    float* dst = a.abuf + r * kTileStride;
    for (int64_t d0 = 0; d0 < a.dim; d0 += kTileKc, dst += tile_rows * kTileStride)
      decode_row(a, r, d0, a.dim - d0 < kTileKc ? a.dim - d0 : kTileKc, dst);
  }
}

// Software prefetch of the next tile's source rows, spread over the micro-tiles of the first
// query block so that its memory reads overlap this tile's fmas.
struct Prefetch {
  const char* p;
  const char* end;
  int64_t step;  // bytes per micro-tile, a multiple of 64
};

inline void push(Reservoir& r, float v, int64_t id, const SelCtx& s, float* thr, int negate) {
  r.e[r.count].v = v;
  r.e[r.count].id = id;
  if (++r.count == r.cap) s.compact(&r, s.k, thr, negate);
}

// Cold path: some lane of this (row, query vector) passed a threshold.
__attribute__((noinline)) void accept(const TileArgs& a, typename V::reg s, int64_t row,
                                      int64_t qb, uint32_t mt, uint32_t mb) {
  if (row >= a.rows) return;  // zero padding of the last tile
  float lanes[W];
  V::store(lanes, s);
  const int64_t id = a.ids ? a.ids[row] : a.base_id + row;
  SelCtx& c = *a.sel;
  for (; mt; mt &= mt - 1) {
    const int64_t q = qb + __builtin_ctz(mt);
    push(c.res_top[q], lanes[q - qb], id, c, c.thr_top + q, 0);
  }
  for (; mb; mb &= mb - 1) {
    const int64_t q = qb + __builtin_ctz(mb);
    push(c.res_bot[q], -lanes[q - qb], id, c, c.thr_bot + q, 1);
  }
}

// MR rows x NV vectors of W queries held in registers (every member is inlined, so the
// accumulators never leave them).
template <int NV>
struct RegTile {
  static constexpr int MR = V::mr(NV);
  static constexpr int NR = NV * W;
  typename V::reg acc[MR][NV];

  __attribute__((always_inline)) void zero() {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  __attribute__((always_inline)) void load(const float* C, int64_t ldc) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = V::load(C + r * ldc + v * W);
  }
  __attribute__((always_inline)) void store(float* C, int64_t ldc) const {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) V::store(C + r * ldc + v * W, acc[r][v]);
  }

  // acc += A[0:MR, 0:kc] . B[0:kc, 0:NR]: Ap rows kTileStride floats apart, B packed [kc][NR].
  // The first pf_lines iterations each prefetch one cache line of pf.
  __attribute__((always_inline)) void fma_block(const float* Ap, const float* B, int64_t kc,
                                                const char* pf, int64_t pf_lines) {
    for (int64_t d = 0; d < kc; ++d) {
      // Locality 2 (prefetcht1): measured faster than t0 (which evicts the query panel from
      // L1) and than nta, for the rows a micro-tile reads next.
      if (d < pf_lines) __builtin_prefetch(pf + 64 * d, 0, 2);
      typename V::reg b[NV];
      for (int v = 0; v < NV; ++v) b[v] = V::load(B + d * NR + v * W);
      for (int r = 0; r < MR; ++r) {
        const typename V::reg x = V::bcast(Ap[r * kTileStride + d]);
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(x, b[v], acc[r][v]);
      }
    }
  }

  // Finished scores of rows i0.. for queries q0..: compare with the thresholds; only lanes
  // that pass leave registers.
  __attribute__((always_inline)) void select(const TileArgs& a, int64_t i0, int64_t q0) {
    const SelCtx& s = *a.sel;
    typename V::reg tt[NV], tb[NV];
    for (int v = 0; v < NV; ++v) {
      tt[v] = V::load(s.thr_top + q0 + v * W);
      tb[v] = V::load(s.thr_bot + q0 + v * W);
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) {
        const uint32_t mt = V::ge_mask(acc[r][v], tt[v]);
        const uint32_t mb = V::le_mask(acc[r][v], tb[v]);
        if (__builtin_expect((mt | mb) != 0, 0)) {
          accept(a, acc[r][v], i0 + r, q0 + v * W, mt, mb);
          tt[v] = V::load(s.thr_top + q0 + v * W);  // a compaction may have raised them
          tb[v] = V::load(s.thr_bot + q0 + v * W);
        }
      }
    }
  }
};

// Lines of the next tile to prefetch during one micro-tile, and where.
inline int64_t prefetch_lines(const Prefetch& pf) { return pf.p < pf.end ? pf.step / 64 : 0; }

// The tile's rows x queries [q0, q0 + NV*W). Each micro-tile keeps its sums in registers over
// the whole dim (so each score is one fma chain over d = 0..dim-1), reading the packed query
// block k block by k block from L1/L2. fused (one query block only): each micro-tile decodes
// its MR rows one k block at a time into an L1-sized corner of abuf just before using them, one
// pass over the rows with nothing decoded going through L2; otherwise decode_tile decoded the
// tile into abuf's slabs once for every query block.
template <int NV>
void query_block(const TileArgs& a, int64_t tile_rows, int64_t q0, bool fused, Prefetch& pf) {
  constexpr int MR = V::mr(NV), NR = NV * W;
  const int64_t m_pad = round_up(a.m, W);
  for (int64_t i0 = 0; i0 < tile_rows; i0 += MR) {
    RegTile<NV> t;
    t.zero();
    for (int64_t kb0 = 0, slab = 0; kb0 < a.dim; kb0 += kTileKc, ++slab) {
      const int64_t len = a.dim - kb0 < kTileKc ? a.dim - kb0 : kTileKc;
      const float* Ap = a.abuf + (slab * tile_rows + i0) * kTileStride;
      if (fused) {
        for (int r = 0; r < MR; ++r) decode_row(a, i0 + r, kb0, len, a.abuf + r * kTileStride);
        Ap = a.abuf;
      }
      const int64_t lines = prefetch_lines(pf);
      t.fma_block(Ap, a.qpack + q0 * a.dim + kb0 * NR, len, pf.p, lines);
      pf.p += lines * 64;
    }
    if (a.dense)
      t.store(a.cbuf + i0 * m_pad + q0, m_pad);
    else
      t.select(a, i0, q0);
  }
}

template <int NV>
inline void query_block_nv(int nv, const TileArgs& a, int64_t tile_rows, int64_t q0, bool fused,
                           Prefetch& pf) {
  if (nv == NV)
    query_block<NV>(a, tile_rows, q0, fused, pf);
  else if constexpr (NV > 1)
    query_block_nv<NV - 1>(nv, a, tile_rows, q0, fused, pf);
}

void score_tile(const TileArgs& a, int64_t tile_rows) {
  // The micro-tiles of the first query block carry the prefetch of the next tile.
  const int nv0 = block_nv(a.m, 0);
  const int64_t steps = (a.dim + kTileKc - 1) / kTileKc * (tile_rows / V::mr(nv0));
  const char* next = static_cast<const char*>(a.next_feat);
  Prefetch pf{next, next + a.next_bytes, round_up((a.next_bytes + steps - 1) / steps, 64)};
  const bool fused = a.m <= kMaxNR;
  if (!fused) decode_tile(a, tile_rows);
  for (int64_t q0 = 0; q0 < a.m; q0 += kMaxNR)
    query_block_nv<V::kMaxNV>(block_nv(a.m, q0), a, tile_rows, q0, fused, pf);
}

typedef uint32_t u32_alias __attribute__((may_alias));

// entry = scale with the sign bit of mix32(row_key ^ col * C) (bit 31 set = negative), written
// as a bit pattern so the loop vectorises without a select.
void rademacher(uint32_t seed_key, uint64_t row_start, int64_t n_rows, int64_t k, float scale,
                float* out) {
  u32_alias sbits;
  __builtin_memcpy(&sbits, &scale, sizeof sbits);
  for (int64_t i = 0; i < n_rows; ++i) {
    const uint32_t rk = row_key(seed_key, row_start + static_cast<uint64_t>(i));
    u32_alias* o = reinterpret_cast<u32_alias*>(out + i * k);
    for (int64_t j = 0; j < k; ++j)
      o[j] = sbits ^ (mix32(rk ^ (static_cast<uint32_t>(j) * kColMult)) & 0x80000000u);
  }
}

float fma_loop(int64_t iters) {
  typename V::reg acc[kFmaChains];
  const typename V::reg b = V::bcast(0.99999994f), c = V::bcast(1e-7f);
  for (int i = 0; i < kFmaChains; ++i) acc[i] = V::bcast(static_cast<float>(i));
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kFmaChains; ++i) acc[i] = V::fma(acc[i], b, c);
  float lanes[W], sum = 0.0f;
  for (int i = 0; i < kFmaChains; ++i) {
    V::store(lanes, acc[i]);
    sum += lanes[0];
  }
  return sum;
}

}  // namespace

#include "project_impl.h"

namespace {

const IsaKernels kKernels = {V::kName,     W,          V::kRowMultiple, &packed_floats,
                             &pack_queries, &score_tile, &rademacher,     &project_cols,
                             kProjNC,       &fma_loop};

}  // namespace
