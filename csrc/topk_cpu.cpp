#include "topk_cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>

#include "thread_pool.h"

namespace ctrak {
namespace {

template <class T>
AlignedBuf<T> alloc_aligned(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(T) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return AlignedBuf<T>(static_cast<T*>(p));
}

struct Variant {
  const char* name;
  const IsaKernels* (*get)();
  bool (*supported)();
};

#if defined(CTRAK_X86)
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

const Variant kVariants[] = {
#if defined(CTRAK_X86)
    {"avx512", &isa_avx512, &has_avx512},
    {"avx2", &isa_avx2, &has_avx2},
#endif
    {"generic", &isa_generic, &always},
};

// Selection order shared by the reservoirs and the final merge: larger value, then smaller id.
inline bool better(const Entry& a, const Entry& b) {
  return a.v > b.v || (a.v == b.v && a.id < b.id);
}

void compact(Reservoir* r, int32_t k, float* thr, int negate) {
  std::nth_element(r->e, r->e + (k - 1), r->e + r->count, better);
  r->count = k;
  const float kth = r->e[k - 1].v;
  *thr = negate ? -kth : kth;
}

// Work below which a call stays on the calling thread. Waking the team and meeting it at the
// closing barrier costs tens of microseconds on an idle machine, and a scheduler time slice
// (milliseconds) per region on an oversubscribed one, where a woken thread waits its turn.
constexpr int64_t kParallelMinFma = int64_t(1) << 24;

// Rows per tile: about 256 KiB of decoded rows, to stay in L2 next to the query panels.
int64_t tile_rows_for(const IsaKernels* isa, int64_t dim) {
  const int64_t mult = isa->row_multiple;
  const int64_t fit = 256 * 1024 / (4 * tile_row_floats(dim)) / mult * mult;
  return std::clamp<int64_t>(fit, mult, 8 * mult);
}

}  // namespace

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const Variant& v : kVariants)
    if (v.supported()) out.emplace_back(v.name);
  return out;
}

const IsaKernels* select_isa(const std::string& name) {
  std::string want = name;
  if (want == "auto") {
    const char* env = std::getenv("CTRAK_CPU_ISA");
    want = env && *env ? env : "auto";
  }
  for (const Variant& v : kVariants) {
    if (!v.supported()) continue;
    if (want == "auto" || want == v.name) return v.get();
  }
  std::string avail;
  for (const std::string& s : cpu_isas()) avail += (avail.empty() ? "" : ", ") + s;
  throw std::invalid_argument("CPU ISA '" + want + "' is not available here (available: " +
                              avail + ")");
}

void rademacher_tile(uint32_t seed, uint64_t row_start, int64_t n_rows, int64_t k, float* out,
                     int num_threads, const std::string& isa) {
  const IsaKernels* kern = select_isa(isa);
  const uint32_t seed_key = mix32(seed ^ kSeedSalt);
  // hashing.py: scale = 1.0 / k**0.5 (Python float = C pow), then rounded to float32.
  const float scale = static_cast<float>(1.0 / std::pow(static_cast<double>(k), 0.5));
  constexpr int64_t kChunk = 32;
  const int64_t chunks = (n_rows + kChunk - 1) / kChunk;
  const int nt = n_rows * k >= (int64_t(1) << 16) ? (num_threads > 0 ? num_threads
                                                                      : default_threads())
                                                   : 1;
  parallel_for(chunks, nt, [&](int64_t c, int) {
    const int64_t r0 = c * kChunk;
    const int64_t rows = std::min(kChunk, n_rows - r0);
    kern->rademacher(seed_key, row_start + static_cast<uint64_t>(r0), rows, k, scale,
                     out + r0 * k);
  });
}

void rademacher_project(uint32_t seed, uint64_t row_start, const float* x, int64_t ldx,
                        int64_t batch, int64_t n, int64_t k, float* out, int num_threads,
                        const std::string& isa) {
  const IsaKernels* kern = select_isa(isa);
  if (batch < 1 || n < 1) return;
  const float scale = static_cast<float>(1.0 / std::pow(static_cast<double>(k), 0.5));
  ProjectArgs a{x, ldx, batch, n, row_start, mix32(seed ^ kSeedSalt), 0, k, out};
  std::memcpy(&a.scale_bits, &scale, 4);
  // Threads own disjoint column ranges (whole panels): no reduction, and no effect on the bits.
  const int64_t align = kern->project_cols_align;
  const int64_t panels = (k + align - 1) / align;
  int64_t tasks = 1;
  if (batch * n * k >= kParallelMinFma) {
    const int nt = num_threads > 0 ? num_threads : default_threads();
    tasks = std::min<int64_t>(nt, panels);
  }
  parallel_for(tasks, static_cast<int>(tasks), [&](int64_t t, int) {
    const int64_t j0 = panels * t / tasks * align;
    const int64_t j1 = std::min(k, panels * (t + 1) / tasks * align);
    if (j0 < j1) kern->project_cols(a, j0, j1);
  });
}

struct TopKState::Slot {
  AlignedBuf<float> thr_top, thr_bot;  // [m_pad]
  std::vector<Entry> entries;           // [tails][m][cap]
  std::vector<Reservoir> res_top, res_bot;
  AlignedBuf<float> abuf;  // decoded tile (selection never needs cbuf: sums stay in registers)
  SelCtx sel;
};

TopKState::TopKState(const float* queries, int64_t m, int64_t dim, int64_t k_top, int tails,
                     int num_threads, const std::string& isa)
    : isa_(select_isa(isa)), m_(m), dim_(dim), k_(k_top), tails_(tails) {
  if (m < 1 || dim < 1) throw std::invalid_argument("queries must be [m >= 1, dim >= 1]");
  if (k_top < 1 || k_top > (int64_t(1) << 28))
    throw std::invalid_argument("k_top must be in [1, 2**28]");
  if (tails < kTop || tails > kBoth) throw std::invalid_argument("tails must be 1, 2 or 3");

  const int64_t lanes = isa_->lanes;
  m_pad_ = (m + lanes - 1) / lanes * lanes;
  cap_ = k_ + std::max<int64_t>(k_ / 2, 64);  // slack amortises each compaction
  tile_rows_ = tile_rows_for(isa_, dim);

  qpack_ = alloc_aligned<float>(isa_->packed_floats(m, dim));
  isa_->pack_queries(queries, m, dim, qpack_.get());

  const int n_tails = (tails & kTop ? 1 : 0) + (tails & kBottom ? 1 : 0);
  const int64_t slot_bytes = m * n_tails * cap_ * int64_t(sizeof(Entry)) +
                             tile_rows_ * tile_row_floats(dim) * 4 + 2 * m_pad_ * 4;
  const int want = num_threads > 0 ? num_threads : default_threads();
  num_threads_ =
      static_cast<int>(std::clamp<int64_t>(kStateBudgetBytes / slot_bytes, 1, std::max(want, 1)));

  const float inf = std::numeric_limits<float>::infinity();
  for (int t = 0; t < num_threads_; ++t) {
    auto s = std::make_unique<Slot>();
    s->thr_top = alloc_aligned<float>(m_pad_);
    s->thr_bot = alloc_aligned<float>(m_pad_);
    for (int64_t q = 0; q < m_pad_; ++q) {  // padded lanes and disabled tails never accept
      s->thr_top[q] = q < m && (tails & kTop) ? -inf : inf;
      s->thr_bot[q] = q < m && (tails & kBottom) ? inf : -inf;
    }
    s->entries.resize(static_cast<size_t>(m * n_tails * cap_));
    Entry* e = s->entries.data();
    s->res_top.assign(m, Reservoir{nullptr, 0, static_cast<int32_t>(cap_)});
    s->res_bot.assign(m, Reservoir{nullptr, 0, static_cast<int32_t>(cap_)});
    for (int64_t q = 0; q < m; ++q) {
      if (tails & kTop) s->res_top[q].e = e, e += cap_;
      if (tails & kBottom) s->res_bot[q].e = e, e += cap_;
    }
    s->abuf = alloc_aligned<float>(tile_rows_ * tile_row_floats(dim));
    s->sel = SelCtx{static_cast<int32_t>(k_), s->thr_top.get(), s->thr_bot.get(),
                    s->res_top.data(), s->res_bot.data(), &compact};
    slots_.push_back(std::move(s));
  }
}

TopKState::~TopKState() = default;

void TopKState::add(const void* feat, int dtype, int64_t n, const int64_t* ids, int64_t base_id) {
  if (n <= 0) return;
  const size_t row_bytes = static_cast<size_t>(dim_) * (dtype == kF32 ? 4 : 2);
  const int64_t tiles = (n + tile_rows_ - 1) / tile_rows_;
  const int nt = tiles > 1 && n * dim_ * m_pad_ >= kParallelMinFma ? num_threads_ : 1;
  // Tasks of consecutive tiles, still handed out dynamically: within one the thread streams its
  // rows in order and prefetches each next tile while it scores the current one.
  const int64_t per_task = nt > 1 ? std::clamp<int64_t>(tiles / (8 * nt), 1, 16) : tiles;
  const int64_t tasks = (tiles + per_task - 1) / per_task;
  const char* base = static_cast<const char*>(feat);
  parallel_for(tasks, nt, [&](int64_t task, int worker) {
    Slot& s = *slots_[worker];
    const int64_t t_end = std::min(tiles, (task + 1) * per_task);
    for (int64_t t = task * per_task; t < t_end; ++t) {
      const int64_t r0 = t * tile_rows_;
      TileArgs a{};
      a.feat = base + r0 * row_bytes;
      a.dtype = dtype;
      a.rows = std::min(tile_rows_, n - r0);
      a.dim = dim_;
      a.ids = ids ? ids + r0 : nullptr;
      a.base_id = base_id + r0;
      a.abuf = s.abuf.get();
      a.qpack = qpack_.get();
      a.m = m_;
      a.sel = &s.sel;
      if (t + 1 < t_end) {
        a.next_feat = base + (r0 + tile_rows_) * row_bytes;
        a.next_bytes = std::min(tile_rows_, n - r0 - tile_rows_) * static_cast<int64_t>(row_bytes);
      }
      isa_->score_tile(a, tile_rows_);
    }
  });
  rows_seen_ += n;
}

void TopKState::merge_tail(bool top, float* out_v, int64_t* out_i) const {
  const float sign = top ? 1.0f : -1.0f;  // the bottom tail is stored negated
  // The merge reads every slot's reservoir once: worth the pool only for large m * k.
  const int nt = m_ > 1 && m_ * cap_ * num_threads_ >= (int64_t(1) << 18) ? num_threads_ : 1;
  parallel_for(m_, nt, [&](int64_t q, int) {
    std::vector<Entry> all;
    for (const auto& s : slots_) {
      const Reservoir& r = top ? s->res_top[q] : s->res_bot[q];
      all.insert(all.end(), r.e, r.e + r.count);
    }
    const int64_t have = std::min<int64_t>(k_, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + have, all.end(), better);
    for (int64_t j = 0; j < k_; ++j) {
      out_v[q * k_ + j] = j < have ? sign * all[j].v : std::numeric_limits<float>::quiet_NaN();
      out_i[q * k_ + j] = j < have ? all[j].id : -1;
    }
  });
}

void TopKState::result(float* top_v, int64_t* top_i, float* bot_v, int64_t* bot_i) const {
  if (rows_seen_ < k_)
    throw std::invalid_argument("k_top=" + std::to_string(k_) + " exceeds the " +
                                std::to_string(rows_seen_) + " rows added");
  if (top_v && (tails_ & kTop)) merge_tail(true, top_v, top_i);
  if (bot_v && (tails_ & kBottom)) merge_tail(false, bot_v, bot_i);
}

void score_dense(const float* queries, int64_t m, int64_t dim, const void* feat, int dtype,
                 int64_t n, float* out, int64_t ldo, int num_threads, const std::string& isa) {
  if (m < 1 || dim < 1) throw std::invalid_argument("queries must be [m >= 1, dim >= 1]");
  if (n <= 0) return;
  const IsaKernels* kern = select_isa(isa);
  const int64_t lanes = kern->lanes, m_pad = (m + lanes - 1) / lanes * lanes;
  const int64_t tile_rows = tile_rows_for(kern, dim), lda = tile_row_floats(dim);
  AlignedBuf<float> qpack = alloc_aligned<float>(kern->packed_floats(m, dim));
  kern->pack_queries(queries, m, dim, qpack.get());
  const size_t row_bytes = static_cast<size_t>(dim) * (dtype == kF32 ? 4 : 2);
  const int64_t tiles = (n + tile_rows - 1) / tile_rows;
  const int nt = n * dim * m_pad < kParallelMinFma
                     ? 1
                     : static_cast<int>(std::min<int64_t>(
                           num_threads > 0 ? num_threads : default_threads(), tiles));
  std::vector<AlignedBuf<float>> abuf, cbuf;
  for (int t = 0; t < nt; ++t) {
    abuf.push_back(alloc_aligned<float>(tile_rows * lda));
    cbuf.push_back(alloc_aligned<float>(tile_rows * m_pad));
  }
  const char* base = static_cast<const char*>(feat);
  parallel_for(tiles, nt, [&](int64_t t, int worker) {
    const int64_t r0 = t * tile_rows;
    TileArgs a{};
    a.feat = base + r0 * row_bytes;
    a.dtype = dtype;
    a.rows = std::min(tile_rows, n - r0);
    a.dim = dim;
    a.abuf = abuf[worker].get();
    a.cbuf = cbuf[worker].get();
    a.qpack = qpack.get();
    a.m = m;
    a.dense = 1;
    kern->score_tile(a, tile_rows);
    // cbuf is [row][query]; out is [query][row]: transpose the valid part.
    for (int64_t q = 0; q < m; ++q) {
      float* dst = out + q * ldo + r0;
      const float* src = a.cbuf + q;
      for (int64_t r = 0; r < a.rows; ++r) dst[r] = src[r * m_pad];
    }
  });
}

double fma_peak_flops(double seconds, int num_threads, const std::string& isa) {
  const IsaKernels* kern = select_isa(isa);
  const int nt = num_threads > 0 ? num_threads : default_threads();
  const double flops_per_iter = 2.0 * kFmaChains * kern->lanes;
  std::vector<float> results(nt);
  volatile float sink = 0.0f;  // keeps the loops' results alive
  auto timed = [&](int64_t iters, int threads) {
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(threads, threads, [&](int64_t t, int) { results[t] = kern->fma_loop(iters); });
    const auto t1 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) sink = sink + results[t];
    return std::chrono::duration<double>(t1 - t0).count();
  };
  int64_t iters = 1 << 16;  // calibrate on one thread to about a tenth of the budget
  while (timed(iters, 1) < seconds / 10 && iters < (int64_t(1) << 40)) iters *= 2;
  const int64_t full = static_cast<int64_t>(iters * seconds / std::max(timed(iters, 1), 1e-9));
  const double t = timed(std::max<int64_t>(full, 1), nt);
  return flops_per_iter * static_cast<double>(std::max<int64_t>(full, 1)) * nt / t;
}

}  // namespace ctrak
