// CUDA engine: exact inner-product top-k (both tails) over device-resident features, with a
// running merge across add() calls. Plain C++ interface on raw device pointers and stream
// handles (no torch, no pybind11), so the .cu compiles on its own.
#pragma once

#include <cstdint>
#include <memory>

namespace ctrak {

struct DeviceFree {  // cudaFree, defined in topk_cuda.cu (this header stays CUDA-free)
  void operator()(void* p) const;
};
template <class T>
using DeviceBuffer = std::unique_ptr<T, DeviceFree>;

// Algorithm (see topk_cuda.cu): rows are processed in chunks. Per chunk, one fused kernel
// computes fp32 score tiles (128 rows x 64 queries) and keeps only the scores that pass each
// query's current threshold: block-level candidate lists are built in shared memory and
// appended to per-query device buffers (no score matrix in global memory). Before a chunk that
// could overflow a buffer, a per-query radix select (one block per query and tail) keeps the
// best k, ties broken by the smaller id, and raises the threshold. Any k_top works the same way.
class CudaTopK {
 public:
  static constexpr int64_t kBufferBudgetBytes = int64_t(1) << 30;

  // queries: device float32 [m, dim], C-contiguous, copied on `stream`.
  CudaTopK(uintptr_t queries, int64_t m, int64_t dim, int64_t k_top, int tails, int device,
           uintptr_t stream);
  ~CudaTopK();
  CudaTopK(const CudaTopK&) = delete;
  CudaTopK& operator=(const CudaTopK&) = delete;

  // feat: device [n, dim] (kF32 / kF16 / kBF16); ids: device int64 [n] or 0 for base_id + row.
  // Asynchronous on `stream`: the caller keeps feat and ids alive until the stream passes.
  void add(uintptr_t feat, int dtype, int64_t n, uintptr_t ids, int64_t base_id,
           uintptr_t stream);

  // Host outputs [m, k_top] (nullptr for a tail not requested), best first; synchronises stream.
  void result(float* top_v, int64_t* top_i, float* bot_v, int64_t* bot_i, uintptr_t stream);

  int64_t m() const { return m_; }
  int64_t dim() const { return dim_; }
  int64_t k_top() const { return k_; }
  int tails() const { return tails_; }
  int64_t rows_seen() const { return rows_seen_; }
  int64_t chunk_rows() const { return chunk_; }

 private:
  friend struct CudaTopKAccess;  // builds the kernels' view of the buffers (topk_cuda.cu)
  int device_;
  int64_t m_, dim_, k_, cap_, chunk_;
  int tails_, n_tails_;
  int64_t rows_seen_ = 0;
  DeviceBuffer<float> q_;           // [m, dim]
  DeviceBuffer<float> vals_;        // [n_tails, m, cap], "larger is better" (bottom negated)
  DeviceBuffer<int64_t> ids_;       // [n_tails, m, cap]
  DeviceBuffer<int> count_;         // [n_tails, m]
  DeviceBuffer<float> thr_;         // [n_tails, m], accept v >= thr
  DeviceBuffer<float> scratch_v_;   // [n_tails, m, k]
  DeviceBuffer<int64_t> scratch_i_;  // [n_tails, m, k]
};

}  // namespace ctrak
