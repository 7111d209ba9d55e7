// Portable variant of the CPU kernels: plain C++ on small fixed-size arrays that the compiler
// vectorises for the baseline target (SSE2 on x86-64, NEON on aarch64). Always available.
#include "common.h"

namespace ctrak {
namespace generic {

struct V {
  struct reg {
    float x[4];
  };
  static constexpr const char* kName = "generic";
  static constexpr int W = 4;
  static constexpr int kMaxNV = 2;
  static constexpr int kRowMultiple = 48;
  static constexpr int mr(int nv) { return nv >= 2 ? 4 : 8; }

  static inline reg zero() { return reg{{0.0f, 0.0f, 0.0f, 0.0f}}; }
  static inline reg load(const float* p) { return reg{{p[0], p[1], p[2], p[3]}}; }
  static inline void store(float* p, reg v) {
    for (int i = 0; i < W; ++i) p[i] = v.x[i];
  }
  static inline reg bcast(float s) { return reg{{s, s, s, s}}; }
  static inline reg fma(reg a, reg b, reg c) {
    for (int i = 0; i < W; ++i) c.x[i] += a.x[i] * b.x[i];
    return c;
  }
  static inline uint32_t ge_mask(reg a, reg b) {
    uint32_t m = 0;
    for (int i = 0; i < W; ++i) m |= static_cast<uint32_t>(a.x[i] >= b.x[i]) << i;
    return m;
  }
  static inline uint32_t le_mask(reg a, reg b) {
    uint32_t m = 0;
    for (int i = 0; i < W; ++i) m |= static_cast<uint32_t>(a.x[i] <= b.x[i]) << i;
    return m;
  }
  static void decode_f16(const uint16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = half_to_float(s[i]);
  }
  static void decode_bf16(const uint16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(s[i]);
  }
};

#include "kernel_impl.h"

}  // namespace generic

const IsaKernels* isa_generic() { return &generic::kKernels; }

}  // namespace ctrak
