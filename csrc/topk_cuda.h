// CUDA engine: exact inner-product top-k (both tails) with a running merge across add() calls,
// over device-resident features (add) or host features streamed through pinned double buffers
// (add_host). Plain C++ interface on raw pointers and stream handles (no torch, no pybind11), so
// the .cu compiles on its own.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace ctrak {

struct DeviceFree {  // cudaFree, defined in topk_cuda.cu (this header stays CUDA-free)
  void operator()(void* p) const;
};
template <class T>
using DeviceBuffer = std::unique_ptr<T, DeviceFree>;

struct HostStaging;  // pinned buffers, copy stream and events of add_host (topk_cuda.cu)
struct HostStagingFree {
  void operator()(HostStaging* p) const;
};

// Algorithm (see topk_cuda.cu): rows are processed in chunks. Per chunk, one fused kernel
// computes score tiles and keeps only the scores that pass each query's current threshold:
// block-level candidate lists are built in shared memory and appended to per-query device
// buffers (no score matrix in global memory). Before a chunk that could overflow a buffer, a
// per-query radix select (one block per query and tail) keeps the best k, ties broken by the
// smaller id, and raises the threshold. Any k_top works the same way.
//
// Score kernels ("engine"):
//   mma   float16 / bfloat16 features on tensor cores (mma.sync m16n8k16, float32 accumulate).
//         The float32 queries are split into three 16-bit parts (hi + mid + lo, exact for
//         bfloat16; float16 parts are scaled per query by a power of two): every product is
//         exact and the hi and mid + lo parts accumulate apart, so the score is within
//         2 * gamma(dim + 1) * sum|f u| (+ 2^-33 max|u| sum|f| for float16) of the exact one.
//         Needs dim % 8 == 0 and 16-byte aligned features; otherwise simt runs.
//   simt  float32 fma chains over d = 0..dim-1 (the CPU engine's arithmetic); float32 features
//         always take it.
//   auto  mma where it applies; $CTRAK_CUDA_ENGINE ("mma" | "simt") overrides.
class CudaTopK {
 public:
  static constexpr int64_t kBufferBudgetBytes = int64_t(1) << 30;
  static constexpr int64_t kStagingBytes = int64_t(64) << 20;  // per pinned buffer (two)

  // queries: device float32 [m, dim], C-contiguous, copied on `stream`.
  CudaTopK(uintptr_t queries, int64_t m, int64_t dim, int64_t k_top, int tails, int device,
           uintptr_t stream, const std::string& engine);
  ~CudaTopK();
  CudaTopK(const CudaTopK&) = delete;
  CudaTopK& operator=(const CudaTopK&) = delete;

  // feat: device [n, dim] (kF32 / kF16 / kBF16); ids: device int64 [n] or 0 for base_id + row.
  // Asynchronous on `stream`: the caller keeps feat and ids alive until the stream passes.
  void add(uintptr_t feat, int dtype, int64_t n, uintptr_t ids, int64_t base_id,
           uintptr_t stream);

  // feat: host [n, dim], ids: host int64 [n] or nullptr (pageable or memory-mapped memory).
  // Copies chunk c + 1 into a pinned buffer and over PCIe (a copy stream) while chunk c is
  // scored on `stream`. Returns when the last chunk has been copied out of `feat` / `ids`, so
  // the caller may release them; the scoring may still be running.
  void add_host(const void* feat, int dtype, int64_t n, const int64_t* ids, int64_t base_id,
                uintptr_t stream);

  // Host outputs [m, k_top] (nullptr for a tail not requested), best first; synchronises stream.
  void result(float* top_v, int64_t* top_i, float* bot_v, int64_t* bot_i, uintptr_t stream);

  int64_t m() const { return m_; }
  int64_t dim() const { return dim_; }
  int64_t k_top() const { return k_; }
  int tails() const { return tails_; }
  int64_t rows_seen() const { return rows_seen_; }
  int64_t chunk_rows() const { return chunk_; }
  // The score kernel add() would use for this dtype with aligned features: "mma" or "simt".
  const char* engine_for(int dtype) const;

 private:
  friend struct CudaTopKAccess;  // builds the kernels' view of the buffers (topk_cuda.cu)
  const void* split_queries(int dtype, uintptr_t stream);

  int device_;
  int64_t m_, dim_, k_, cap_, chunk_;
  int tails_, n_tails_;
  int engine_;  // 0 auto, 1 mma, 2 simt
  int64_t rows_seen_ = 0;
  DeviceBuffer<float> q_;           // [m, dim]
  DeviceBuffer<float> vals_;        // [n_tails, m, cap], "larger is better" (bottom negated)
  DeviceBuffer<int64_t> ids_;       // [n_tails, m, cap]
  DeviceBuffer<int> count_;         // [n_tails, m]
  DeviceBuffer<float> thr_;         // [n_tails, m], accept v >= thr
  DeviceBuffer<float> scratch_v_;   // [n_tails, m, k]
  DeviceBuffer<int64_t> scratch_i_;  // [n_tails, m, k]
  // Query parts for the mma kernel, made on first use per 16-bit dtype: [3][m_pad][dim_pad].
  DeviceBuffer<uint16_t> qsplit_[2];  // [0] float16, [1] bfloat16
  DeviceBuffer<float> qscale_[2];     // [m_pad]: score = (hi + lo) * qscale
  std::unique_ptr<HostStaging, HostStagingFree> staging_;
};

}  // namespace ctrak
