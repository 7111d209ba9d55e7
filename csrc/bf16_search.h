// Exact top-k over bfloat16 rows, scored with AVX512-BF16 (vdpbf16ps) and re-scored with the
// float32 engine: ids and values equal TopKState's on the same rows, ties included.
//
// The float32 engine (topk_cpu.h) is the reference and the fallback: it runs in place of the
// bfloat16 path on a CPU without AVX512-BF16, when $CTRAK_BF16_SEARCH=0, when path="float32",
// and for queries the error bound cannot cover (non-finite, or ||u||_2 >= 2^100).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bf16_common.h"
#include "topk_cpu.h"

namespace ctrak {

// Whether this CPU runs the AVX512-BF16 kernel (and the binary has it).
bool cpu_has_avx512bf16();

class Bf16TopKState {
 public:
  static constexpr int64_t kStateBudgetBytes = int64_t(1) << 30;

  // queries: [m, dim] float32, copied. isa: the float32 engine's variant (re-scoring and
  // fallback). path: "auto" (bfloat16 where the CPU has it and $CTRAK_BF16_SEARCH != "0"),
  // "bf16" (throws std::invalid_argument on a CPU without it) or "float32".
  Bf16TopKState(const float* queries, int64_t m, int64_t dim, int64_t k_top, int tails,
                int num_threads, const std::string& isa, const std::string& path);
  ~Bf16TopKState();
  Bf16TopKState(const Bf16TopKState&) = delete;
  Bf16TopKState& operator=(const Bf16TopKState&) = delete;

  // feat: [n, dim] in `dtype`; ids: [n] or nullptr for base_id + row. bfloat16 rows take the
  // approximate path; float32 / float16 rows go through the float32 engine whole.
  void add(const void* feat, int dtype, int64_t n, const int64_t* ids, int64_t base_id);

  // As TopKState::result: [m, k_top] per tail, best first, NaN / -1 padding.
  void result(float* top_v, int64_t* top_i, float* bot_v, int64_t* bot_i) const;

  int64_t m() const { return m_; }
  int64_t dim() const { return dim_; }
  int64_t k_top() const { return k_; }
  int tails() const { return tails_; }
  int64_t rows_seen() const;
  int num_threads() const { return num_threads_; }
  // "avx512bf16" or "float32" (the engine that runs).
  const char* path() const { return fallback_ ? "float32" : "avx512bf16"; }
  // Candidates (query, tail, row) re-scored by the float32 engine so far: what the filter let
  // through. (The re-scoring itself scores the union of a query block's candidate rows.)
  int64_t rescored() const { return rescored_; }

 private:
  struct Slot;
  void push_exact(Slot& s, int64_t q, bool top, float v, int64_t id);
  void add_bf16(const uint16_t* feat, int64_t n, const int64_t* ids, int64_t base_id);
  void add_other(const void* feat, int dtype, int64_t n, const int64_t* ids, int64_t base_id);
  void rescore(const uint16_t* feat);

  std::unique_ptr<TopKState> fallback_;
  const Bf16Kernels* kern_ = nullptr;
  std::string isa_;
  int64_t m_, m_pad_, dim_, k_, cap0_, tile_rows_, score_lanes_;
  int tails_, num_threads_;
  int64_t rows_seen_ = 0, rescored_ = 0;
  std::vector<float> queries_;      // [m, dim]
  std::vector<uint32_t> qpack_;     // bfloat16 query pairs
  std::vector<float> err_scale_, err_abs_;  // [m_pad]
  float query_norm_max_ = 0.0f;
  std::vector<std::unique_ptr<Slot>> slots_;
};

}  // namespace ctrak
