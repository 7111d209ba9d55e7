// AVX-512 (x86-64-v4) variant of the CPU kernels; compiled with -mavx512f/bw/dq/vl -mfma -mf16c
// and only called when the CPU reports AVX-512F/BW/DQ/VL (see topk_cpu.cpp).
#include <immintrin.h>

#include "common.h"

// GCC 12 reports the _mm512_undefined_*() operands inside its own intrinsics headers as "may be
// used uninitialized" (GCC bug 105593); nothing in this file reads uninitialised data.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ctrak {
namespace avx512 {

struct V {
  using reg = __m512;
  static constexpr const char* kName = "avx512";
  static constexpr int W = 16;
  static constexpr int kMaxNV = 4;
  static constexpr int kRowMultiple = 48;
  // 32 zmm registers: MR x NV accumulators + NV query vectors + a broadcast.
  static constexpr int mr(int nv) { return nv >= 4 ? 6 : nv == 3 ? 8 : nv == 2 ? 12 : 16; }

  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline reg bcast(float x) { return _mm512_set1_ps(x); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline uint32_t ge_mask(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static inline uint32_t le_mask(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }

  static void decode_f16(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(s + i))));
    for (; i < n; ++i) d[i] = half_to_float(s[i]);
  }
  static void decode_bf16(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
      _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) d[i] = bf16_to_float(s[i]);
  }
};

#include "kernel_impl.h"

}  // namespace avx512

const IsaKernels* isa_avx512() { return &avx512::kKernels; }

}  // namespace ctrak
