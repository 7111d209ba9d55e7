// Plain data shared by the exact bfloat16 search (bf16_search.cpp) and its AVX512-BF16 kernel
// (isa_avx512bf16.cpp, compiled with -mavx512bf16). Plain data only, as in common.h: the kernel
// unit is compiled with flags the rest of the binary must not inherit.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ctrak {

// One candidate of one (query, tail). [lo, hi] holds the float32 engine's score of the row (the
// bottom tail stores the negated score, so both tails keep "larger is better"). row >= 0: the
// interval comes from the approximate score and the row is row `row` of the current add() call;
// row == -1: the row was re-scored with the float32 engine, lo == hi == its score.
struct Bf16Entry {
  float lo;
  float hi;
  int64_t id;
  int64_t row;
};

// Growable unordered candidate buffer: appends until full, then `compact` drops every entry whose
// hi is below the k-th largest lo (it cannot be in the top k) and grows the buffer if that freed
// too little.
struct Bf16Reservoir {
  Bf16Entry* e;
  int32_t count;
  int32_t cap;
};

struct Bf16Sel {
  int32_t k;
  float* thr_top;  // [m_pad]: accept a + e >= thr_top[q]; +inf on padded lanes / disabled tail
  float* thr_bot;  // [m_pad]: accept a - e <= thr_bot[q]; -inf on padded lanes / disabled tail
  Bf16Reservoir* res_top;  // [m]
  Bf16Reservoir* res_bot;  // [m]
  // Prune *r as above and write its new threshold (negated for the bottom tail) to *thr.
  void (*compact)(Bf16Reservoir* r, int32_t k, float* thr, int negate);
};

// One tile of bfloat16 rows scored approximately against all queries by one thread.
struct Bf16TileArgs {
  const uint16_t* feat;  // first row of the tile, [rows, dim] bfloat16 bits
  int64_t rows;
  int64_t dim;
  int64_t row0;          // index of the tile's first row within the add() call
  const int64_t* ids;    // ids of the tile's rows, or nullptr: id = base_id + row
  int64_t base_id;
  const uint32_t* qpack;  // bfloat16 query pairs packed by Bf16Kernels::pack_queries
  const float* err_scale;  // [m_pad] c_q: the score error is <= norm_i * c_q + err_abs[q]
  const float* err_abs;    // [m_pad]
  float query_norm_max;    // max_q ||u_q||_2 (rows with norm * this >= 2^100 are flagged)
  int64_t m;
  float* norms;          // scratch [tile rows]: the rows' norm bounds (NaN: flagged row)
  int32_t* flagged;      // scratch [tile rows]: out, indices of flagged rows (see bf16_search)
  int32_t n_flagged;     // out
  Bf16Sel* sel;
};

struct Bf16Kernels {
  int32_t lanes;  // queries per vector; m is padded to a multiple
  // uint32 words of the packed query pairs of [m, dim] queries.
  size_t (*packed_words)(int64_t m, int64_t dim);
  // q_hi [m, dim] bfloat16 bits -> blocks of query pairs (see isa_avx512bf16.cpp).
  void (*pack_queries)(const uint16_t* q_hi, int64_t m, int64_t dim, uint32_t* out);
  void (*score_tile)(Bf16TileArgs& a);
};

#if defined(CTRAK_X86)
const Bf16Kernels* bf16_kernels_avx512bf16();
#endif

}  // namespace ctrak
