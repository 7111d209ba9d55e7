// AVX2 + FMA + F16C (x86-64-v3) variant of the CPU kernels; compiled with -mavx2 -mfma -mf16c
// and only called when the CPU reports those features (see topk_cpu.cpp).
#include <immintrin.h>

#include "common.h"

namespace ctrak {
namespace avx2 {

struct V {
  using reg = __m256;
  static constexpr const char* kName = "avx2";
  static constexpr int W = 8;
  static constexpr int kMaxNV = 2;
  static constexpr int kRowMultiple = 48;
  // 16 ymm registers: MR x NV accumulators + NV query vectors + a broadcast.
  static constexpr int mr(int nv) { return nv >= 2 ? 6 : 12; }

  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline reg bcast(float x) { return _mm256_set1_ps(x); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline uint32_t ge_mask(reg a, reg b) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ)));
  }
  static inline uint32_t le_mask(reg a, reg b) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LE_OQ)));
  }

  static void decode_f16(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) d[i] = half_to_float(s[i]);
  }
  static void decode_bf16(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i w =
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) d[i] = bf16_to_float(s[i]);
  }
};

#include "kernel_impl.h"

}  // namespace avx2

const IsaKernels* isa_avx2() { return &avx2::kKernels; }

}  // namespace ctrak
