// CPU engine: exact inner-product top-k (both tails) with a running merge, and the Rademacher
// projection tile. Raw pointers only; bindings.cpp owns the Python side and argument checks.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace ctrak {

// ISA variants this CPU can run, best first ("generic" is always present and last).
std::vector<std::string> cpu_isas();

// "auto": the best variant (or $CTRAK_CPU_ISA when set); otherwise the named one. Throws
// std::invalid_argument when that variant is not compiled in or this CPU cannot run it.
const IsaKernels* select_isa(const std::string& name);

// out [n_rows, k] float32 = rows [row_start, row_start + n_rows) of the projection matrix of
// ctrak_fast/hashing.py: +-1/sqrt(k), bit-identical to hashing.rademacher_block.
void rademacher_tile(uint32_t seed, uint64_t row_start, int64_t n_rows, int64_t k, float* out,
                     int num_threads, const std::string& isa);

// out [batch, k] float32 (C-contiguous) += x [batch, n] (row stride ldx) . rows
// [row_start, row_start + n) of that matrix, the signs generated on the fly (never stored).
// Every output is one fma chain over the rows in increasing order: the bits do not depend on
// num_threads, and projecting x in row-ordered pieces gives the bits of projecting it whole.
void rademacher_project(uint32_t seed, uint64_t row_start, const float* x, int64_t ldx,
                        int64_t batch, int64_t n, int64_t k, float* out, int num_threads,
                        const std::string& isa);

// out[q * ldo + i] = score of row i for query q (i < n, q < m), float32: bit-identical to the
// values TopKState selects for the same rows and queries (same kernels, same fma chain).
// feat: [n, dim] in `dtype`; queries: [m, dim] float32; ldo >= n.
void score_dense(const float* queries, int64_t m, int64_t dim, const void* feat, int dtype,
                 int64_t n, float* out, int64_t ldo, int num_threads, const std::string& isa);

// Peak float32 FLOP/s of `num_threads` threads (<= 0: default_threads()) running independent
// fma chains of the ISA variant for about `seconds`: the compute ceiling of the kernels.
double fma_peak_flops(double seconds, int num_threads, const std::string& isa);

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using AlignedBuf = std::unique_ptr<T[], FreeDeleter>;

// Running top-k of m queries over rows streamed in any number of add() calls.
//
// Threads split each add() into runs of consecutive tiles of rows (handed out dynamically; each
// prefetches its next tile); every thread keeps its own reservoirs and thresholds (no locks,
// thresholds persist across calls) and result() merges them. Memory: per thread m * tails * cap
// * 16 bytes (cap = k + max(k / 2, 64)) plus one decoded tile; the thread count is lowered when
// that would exceed kStateBudgetBytes. The result is independent of the thread
// count and of how rows are split across calls: selection is a total order (score descending,
// then id ascending) over scores that are each one fp32 fma chain over d = 0..dim-1.
// One caller at a time: add() and result() of the same state must not run concurrently.
class TopKState {
 public:
  static constexpr int64_t kStateBudgetBytes = int64_t(1) << 30;

  // queries: [m, dim] float32, copied. tails: kTop | kBottom. num_threads <= 0: default_threads()
  // (thread_pool.h).
  TopKState(const float* queries, int64_t m, int64_t dim, int64_t k_top, int tails,
            int num_threads, const std::string& isa);
  ~TopKState();
  TopKState(const TopKState&) = delete;
  TopKState& operator=(const TopKState&) = delete;

  // feat: [n, dim] in `dtype`; ids: [n] or nullptr for base_id + row.
  void add(const void* feat, int dtype, int64_t n, const int64_t* ids, int64_t base_id);

  // Each non-null output is [m, k_top], best first. Throws if fewer than k_top rows were added.
  // Rows whose score is NaN are never selected; should fewer than k_top finite scores exist,
  // the remaining slots hold NaN and id -1.
  void result(float* top_v, int64_t* top_i, float* bot_v, int64_t* bot_i) const;

  int64_t m() const { return m_; }
  int64_t dim() const { return dim_; }
  int64_t k_top() const { return k_; }
  int tails() const { return tails_; }
  int64_t rows_seen() const { return rows_seen_; }
  int num_threads() const { return num_threads_; }
  int64_t tile_rows() const { return tile_rows_; }
  const char* isa() const { return isa_->name; }

 private:
  struct Slot;
  void merge_tail(bool top, float* out_v, int64_t* out_i) const;

  const IsaKernels* isa_;
  int64_t m_, m_pad_, dim_, k_, cap_, tile_rows_;
  int tails_, num_threads_;
  int64_t rows_seen_ = 0;
  AlignedBuf<float> qpack_;
  std::vector<std::unique_ptr<Slot>> slots_;
};

}  // namespace ctrak
