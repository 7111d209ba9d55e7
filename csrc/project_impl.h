// Body of one instruction-set variant of the fused CPU projection, included by kernel_impl.h
// (same namespace, same `struct V`).
//
//   out[b, j] += sum_i x[b, i] * P[row_start + i, j],   P[i, j] = +-scale by the hash of hashing.py
//
// P never reaches memory: for a block of KC rows x NC = NV*W columns the signs are generated into
// a panel of about 16 KiB (L1), which a register-tiled micro-kernel (MR batch rows x NV vectors)
// streams once per MR batch rows, so one generated sign feeds `batch` fmas.
//
// Summation order. Rows are summed in chunks of a fixed global grid (kProjectGridRows rows of P):
// within a chunk one fma chain per output, in increasing row order, into a zeroed buffer; each
// finished chunk is then added to out, in increasing chunk order. Two levels keep the float32
// error near a blocked BLAS's (a single chain over 10^6 rows loses about 10x more), and the grid
// makes the bits a function of the values and the rows given alone: not of the thread count,
// the batch size or other batch rows, and not of how x is split into calls, provided each grid
// chunk is covered by one call (projection.Projector gathers pieces that share a chunk).
//
// Signs use the two identities of kernels/hash.py: the first xor-shift of mix32 is linear, so it
// is applied once per row key and once per column word; the last one keeps bit 31, so it is
// skipped. Per entry that leaves xor, multiply, shift-xor, multiply, and-or.

namespace {

constexpr int kProjNV = V::kMaxNV;
constexpr int kProjNC = kProjNV * W;              // columns per panel
constexpr int kProjMR = V::mr(kProjNV);           // batch rows per micro-tile
constexpr int64_t kProjKC = 4096 / kProjNC < 64 ? 64 : 4096 / kProjNC;  // panel rows (16 KiB)

typedef uint32_t u32_proj __attribute__((may_alias));

// panel[r][c] = P[row r of the block, column c] for r < kc, as float bits.
inline void sign_panel(const uint32_t* rowkeys, int64_t kc, const uint32_t* colwords,
                       uint32_t scale_bits, float* panel) {
  for (int64_t r = 0; r < kc; ++r) {
    const uint32_t rk = rowkeys[r];
    u32_proj* p = reinterpret_cast<u32_proj*>(panel + r * kProjNC);
    for (int c = 0; c < kProjNC; ++c) {
      uint32_t h = (rk ^ colwords[c]) * kMixC1;
      h ^= h >> 15;
      h *= kMixC2;
      p[c] = (h & 0x80000000u) | scale_bits;
    }
  }
}

// acc[MR x NC] (row stride ldc) += x rows (xr[r] + i) . panel, for i < kc.
__attribute__((always_inline)) inline void project_micro(const float* const* xr, const float* panel,
                                                         int64_t kc, float* acc, int64_t ldc) {
  typename V::reg c[kProjMR][kProjNV];
  for (int r = 0; r < kProjMR; ++r)
    for (int v = 0; v < kProjNV; ++v) c[r][v] = V::load(acc + r * ldc + v * W);
  for (int64_t i = 0; i < kc; ++i) {
    typename V::reg s[kProjNV];
    for (int v = 0; v < kProjNV; ++v) s[v] = V::load(panel + i * kProjNC + v * W);
    for (int r = 0; r < kProjMR; ++r) {
      const typename V::reg xv = V::bcast(xr[r][i]);
      for (int v = 0; v < kProjNV; ++v) c[r][v] = V::fma(xv, s[v], c[r][v]);
    }
  }
  for (int r = 0; r < kProjMR; ++r)
    for (int v = 0; v < kProjNV; ++v) V::store(acc + r * ldc + v * W, c[r][v]);
}

// Columns [j0, j1) of the projection, all batch rows and all n rows of x (one thread).
void project_cols(const ProjectArgs& a, int64_t j0, int64_t j1) {
  alignas(64) float panel[kProjKC * kProjNC];
  uint32_t colwords[kProjNC];
  const int64_t bpad = (a.batch + kProjMR - 1) / kProjMR * kProjMR;
  float* cbuf = new float[bpad * kProjNC];  // one chunk's sums of a column block
  uint32_t* rowkeys = new uint32_t[kProjectGridRows];
  const uint64_t end = a.row_start + static_cast<uint64_t>(a.n);
  for (uint64_t c0 = a.row_start; c0 < end;) {
    const uint64_t grid_end = (c0 / kProjectGridRows + 1) * kProjectGridRows;
    const int64_t clen = static_cast<int64_t>((end < grid_end ? end : grid_end) - c0);
    const float* xc = a.x + static_cast<int64_t>(c0 - a.row_start);
    for (int64_t i = 0; i < clen; ++i) {
      const uint32_t rk = row_key(a.seed_key, c0 + static_cast<uint64_t>(i));
      rowkeys[i] = rk ^ (rk >> 16);
    }
    for (int64_t jb = j0; jb < j1; jb += kProjNC) {
      const int64_t width = j1 - jb < kProjNC ? j1 - jb : kProjNC;
      for (int c = 0; c < kProjNC; ++c) {
        const uint32_t w = static_cast<uint32_t>(jb + c) * kColMult;
        colwords[c] = w ^ (w >> 16);
      }
      for (int64_t e = 0; e < bpad * kProjNC; ++e) cbuf[e] = 0.0f;
      for (int64_t i0 = 0; i0 < clen; i0 += kProjKC) {
        const int64_t kc = clen - i0 < kProjKC ? clen - i0 : kProjKC;
        sign_panel(rowkeys + i0, kc, colwords, a.scale_bits, panel);
        for (int64_t b0 = 0; b0 < bpad; b0 += kProjMR) {
          const float* xr[kProjMR];
          for (int r = 0; r < kProjMR; ++r) {  // rows past the batch repeat the last; not added
            const int64_t b = b0 + r < a.batch ? b0 + r : a.batch - 1;
            xr[r] = xc + b * a.ldx + i0;
          }
          project_micro(xr, panel, kc, cbuf + b0 * kProjNC, kProjNC);
        }
      }
      for (int64_t b = 0; b < a.batch; ++b)
        for (int64_t c = 0; c < width; ++c) a.out[b * a.k + jb + c] += cbuf[b * kProjNC + c];
    }
    c0 += static_cast<uint64_t>(clen);
  }
  delete[] rowkeys;
  delete[] cbuf;
}

}  // namespace
