#include "checksum.h"

#include <array>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define CTRAK_X86 1
#endif

namespace ctrak {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;

// tables[j][b]: CRC of byte b followed by j zero bytes (slice-by-8).
const std::array<std::array<uint32_t, 256>, 8>& tables() {
  static const auto t = [] {
    std::array<std::array<uint32_t, 256>, 8> t{};
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      t[0][b] = c;
    }
    for (int j = 1; j < 8; ++j)
      for (uint32_t b = 0; b < 256; ++b) t[j][b] = (t[j - 1][b] >> 8) ^ t[0][t[j - 1][b] & 0xFF];
    return t;
  }();
  return t;
}

uint32_t crc_table(uint32_t c, const uint8_t* p, size_t n) {
  const auto& t = tables();
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= c;
    c = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^
        t[4][(w >> 24) & 0xFF] ^ t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^
        t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return c;
}

#ifdef CTRAK_X86
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t c, const uint8_t* p, size_t n) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c64);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

// Three equal-length streams at once (raw, un-inverted CRC states).
__attribute__((target("sse4.2"))) void crc_hw3(uint32_t* c, const uint8_t* a, const uint8_t* b,
                                                const uint8_t* d, size_t n) {
  uint64_t x = c[0], y = c[1], z = c[2];
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t wa, wb, wd;
    std::memcpy(&wa, a + i, 8);
    std::memcpy(&wb, b + i, 8);
    std::memcpy(&wd, d + i, 8);
    x = _mm_crc32_u64(x, wa);
    y = _mm_crc32_u64(y, wb);
    z = _mm_crc32_u64(z, wd);
  }
  c[0] = static_cast<uint32_t>(x);
  c[1] = static_cast<uint32_t>(y);
  c[2] = static_cast<uint32_t>(z);
  const size_t done = n & ~size_t(7);
  c[0] = crc_hw(c[0], a + done, n - done);
  c[1] = crc_hw(c[1], b + done, n - done);
  c[2] = crc_hw(c[2], d + done, n - done);
}

bool has_sse42() {
  static const bool ok = __builtin_cpu_supports("sse4.2");
  return ok;
}
#endif

uint32_t crc_raw(uint32_t c, const uint8_t* p, size_t n) {
#ifdef CTRAK_X86
  if (has_sse42()) return crc_hw(c, p, n);
#endif
  return crc_table(c, p, n);
}

}  // namespace

bool crc32c_hardware() {
#ifdef CTRAK_X86
  return has_sse42();
#else
  return false;
#endif
}

uint32_t crc32c(const uint8_t* data, size_t n, uint32_t crc) {
  return ~crc_raw(~crc, data, n);
}

uint32_t block_crc32c(const uint8_t* data, size_t n, size_t block) {
  const size_t n_blocks = block ? (n + block - 1) / block : 0;
  std::vector<uint32_t> crcs(n_blocks);
  size_t i = 0;
#ifdef CTRAK_X86
  if (has_sse42()) {
    for (; i + 3 <= n_blocks && (i + 3) * block <= n; i += 3) {
      uint32_t c[3] = {~0u, ~0u, ~0u};
      crc_hw3(c, data + i * block, data + (i + 1) * block, data + (i + 2) * block, block);
      for (int j = 0; j < 3; ++j) crcs[i + j] = ~c[j];
    }
  }
#endif
  for (; i < n_blocks; ++i) {
    const size_t lo = i * block, len = (lo + block <= n) ? block : n - lo;
    crcs[i] = crc32c(data + lo, len);
  }
  // The list of block CRCs, as little-endian bytes.
  std::vector<uint8_t> bytes(4 * n_blocks);
  for (size_t j = 0; j < n_blocks; ++j)
    for (int b = 0; b < 4; ++b) bytes[4 * j + b] = static_cast<uint8_t>(crcs[j] >> (8 * b));
  return crc32c(bytes.data(), bytes.size());
}

}  // namespace ctrak
