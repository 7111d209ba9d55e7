// Plain data shared by the CPU engine (topk_cpu.cpp) and its per-ISA kernels (isa_*.cpp).
//
// The ISA translation units are compiled with different -m flags. Anything they share must be
// plain data or have internal linkage (`static inline`): an `inline` function or a std template
// instantiated in an AVX-512 unit could otherwise be picked by the linker for the generic path and
// crash a machine without AVX-512.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ctrak {

enum FeatureDType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Tails : int { kTop = 1, kBottom = 2, kBoth = 3 };

// Counter-based hash of ctrak_fast/hashing.py (version 1); all arithmetic modulo 2**32.
constexpr uint32_t kMixC1 = 0x7FEB352Du;
constexpr uint32_t kMixC2 = 0x846CA68Bu;
constexpr uint32_t kSeedSalt = 0x9E3779B9u;
constexpr uint32_t kColMult = 0x85EBCA6Bu;

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixC1;
  x ^= x >> 15;
  x *= kMixC2;
  return x ^ (x >> 16);
}

static inline uint32_t row_key(uint32_t seed_key, uint64_t row) {
  return mix32(mix32(static_cast<uint32_t>(row) ^ seed_key) ^ static_cast<uint32_t>(row >> 32));
}

// IEEE binary16 bits -> float (exact); the scalar tail of the vector decoders.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // subnormal: man * 2^-24
    __builtin_memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float out;
  __builtin_memcpy(&out, &bits, 4);
  return out;
}

static inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  __builtin_memcpy(&out, &bits, 4);
  return out;
}

// Decoded feature tiles are stored as k-block slabs: slab b holds dims [b * kTileKc, (b + 1) *
// kTileKc) of every tile row at the fixed row stride kTileStride, so a micro-kernel addresses its
// MR rows from one pointer with constant offsets (no register per row). The extra cache line per
// row keeps the rows a micro-kernel streams in distinct cache sets.
constexpr int64_t kTileKc = 128;
constexpr int64_t kTileStride = kTileKc + 16;

// Floats of one decoded row across all its slabs.
static inline int64_t tile_row_floats(int64_t dim) {
  return (dim + kTileKc - 1) / kTileKc * kTileStride;
}

// One selected candidate. Selection order: larger v first, then smaller id.
struct Entry {
  float v;
  int64_t id;
};

// Unordered candidate buffer of one (query, tail): appends until full, then `compact` keeps the
// best k and raises the acceptance threshold. Amortised O(1) per accepted candidate for any k.
struct Reservoir {
  Entry* e;
  int32_t count;
  int32_t cap;
};

// Per-thread selection state handed to the kernels. Scores are filtered with one compare per
// lane: top tail accepts s >= thr_top[q], bottom tail accepts s <= thr_bot[q] and stores -s so
// both tails share the "larger is better" reservoir code.
struct SelCtx {
  int32_t k;
  float* thr_top;      // [m_pad]; +inf on padded lanes / disabled tail
  float* thr_bot;      // [m_pad]; -inf on padded lanes / disabled tail
  Reservoir* res_top;  // [m]
  Reservoir* res_bot;  // [m]
  // Keep the best k of *r and write the new threshold (negated for the bottom tail) to *thr.
  void (*compact)(Reservoir* r, int32_t k, float* thr, int negate);
};

// One tile of rows scored against all queries by one thread.
struct TileArgs {
  const void* feat;    // first row of the tile, [rows, dim] in `dtype`
  int32_t dtype;
  int64_t rows;        // valid rows in this tile (<= tile_rows)
  int64_t dim;
  const int64_t* ids;  // ids of the tile's rows, or nullptr: id = base_id + row
  int64_t base_id;     // id of the tile's first row when ids == nullptr
  float* abuf;         // scratch [slabs][tile_rows][kTileStride] float32 (decoded features)
  float* cbuf;         // dense mode: scratch [tile_rows, m_pad] float32 (the finished scores)
  const float* qpack;  // queries packed by the ISA's pack_queries
  int64_t m;
  SelCtx* sel;         // selection state; unused when dense
  int32_t dense;       // 1: leave every score in cbuf [tile_rows, m_pad] instead of selecting
  const void* next_feat;  // the rows this thread scores next (prefetched), or nullptr
  int64_t next_bytes;
};

// Rows of P per summation chunk of the fused projection (project_impl.h): a fixed global grid.
constexpr int64_t kProjectGridRows = 4096;

// One call of the fused projection (project_impl.h):
//   out[b, j] += sum_i x[b * ldx + i] * P[row_start + i, j]   (b < batch, i < n, j < k)
struct ProjectArgs {
  const float* x;       // [batch, n] float32, row stride ldx
  int64_t ldx;
  int64_t batch;
  int64_t n;
  uint64_t row_start;   // global row of P for x's column 0
  uint32_t seed_key;    // mix32(seed ^ kSeedSalt)
  uint32_t scale_bits;  // float bits of 1/sqrt(k)
  int64_t k;
  float* out;           // [batch, k] float32, C-contiguous; accumulated into
};

// Entry points of one instruction-set variant.
struct IsaKernels {
  const char* name;
  int32_t lanes;         // queries per vector register; m is padded to a multiple
  int32_t row_multiple;  // tile_rows must be a multiple of this
  size_t (*packed_floats)(int64_t m, int64_t dim);
  void (*pack_queries)(const float* q, int64_t m, int64_t dim, float* out);
  void (*score_tile)(const TileArgs& a, int64_t tile_rows);
  // out [n_rows, k] = +-scale with the hash's sign for rows row_start.. (single thread).
  void (*rademacher)(uint32_t seed_key, uint64_t row_start, int64_t n_rows, int64_t k,
                     float scale, float* out);
  // Columns [j0, j1) of the fused projection (single thread); j0 a multiple of project_cols_align.
  void (*project_cols)(const ProjectArgs& a, int64_t j0, int64_t j1);
  int32_t project_cols_align;
  // iters x kFmaChains dependent-free vector fmas (the peak-FLOP/s probe); returns a value that
  // depends on all of them, so nothing is optimised away.
  float (*fma_loop)(int64_t iters);
};

constexpr int kFmaChains = 12;  // independent chains: more than FMA latency x issue width

const IsaKernels* isa_generic();
#if defined(CTRAK_X86)
const IsaKernels* isa_avx2();
const IsaKernels* isa_avx512();
#endif

}  // namespace ctrak
