// Exact bfloat16 top-k: approximate scores with vdpbf16ps, a rigorous bound on their error, and
// the float32 engine's own scores for every row that can still reach the k-th.
//
// Notation: x a bfloat16 row (exact), u a float32 query, h = bf16(u) (round to nearest), l = u - h,
// s = the float32 engine's score of (x, u) (one fma chain over d), a = the kernel's score of
// (x, h) (vdpbf16ps: exact products, float32 sums), N >= ||x||_2 (isa_avx512bf16.cpp's bound),
// U = ||u||_2, H = ||h||_2 <= (1 + 2^-8) U, L = ||l||_2, n = dim, u0 = 2^-24,
// gamma_n = n u0 / (1 - n u0). Then
//   |s - x.u|  <= gamma_n sum|x_d u_d| + n 2^-126        (n roundings; underflow of the chain,
//                                                          flushed or not)
//              <= gamma_n N U + n 2^-126                  (Cauchy-Schwarz)
//   |a - x.h|  <= g2_n N H,  g2_n = 2 n u0 / (1 - 2 n u0)  (each float32 add errs by <= 1 ulp,
//                                                          i.e. a factor 1 + d, |d| <= 2 u0,
//                                                          whatever the unit's rounding; products
//                                                          exact)
//               + 2^-126 (||h||_1 + sqrt(n) N + 2 n)      (vdpbf16ps reads subnormal inputs as 0
//                                                          and flushes subnormal products and sums)
//   |x.u - x.h| = |x.l| <= N L                            (Cauchy-Schwarz: the q_lo term)
// so |a - s| <= N c + e0 with c = g2_n H + gamma_n U + L + 2^-126 sqrt(n) and
// e0 = 2^-126 (||h||_1 + 3 n). The kernel forms lo = a - (N c + e0) and hi = a + ...
// in float32: those roundings are <= u0 (|a| + e) each, and |a| <= (1 + g2_n) N H, so the
// terms 2^-22 U and the factors (1 + 2^-18) below cover them. Hence lo <= s <= hi for every row.
//
// Selection (top tail; the bottom tail is the same on -s): if k rows have lo >= T then the k-th
// largest score is >= T, so a row with hi < T cannot be in the top k, whatever the tie rule. Each
// reservoir keeps every row with hi >= its k-th largest lo; rows that remain at the end of an
// add() call are re-scored by score_dense (the float32 engine's kernels, the same fma chain as
// TopKState) while their bytes are still mapped, and the final top k is taken on those exact
// scores in TopKState's order (score, then id). Rows whose norm bound is not finite or large
// (N U >= 2^100, where float32 partial sums could overflow) are re-scored for every query.
#include "bf16_search.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>

#include "thread_pool.h"

namespace ctrak {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kParallelMinWork = int64_t(1) << 24;
constexpr int64_t kTileRows = 240;  // a multiple of every MR of the kernel (6, 8, 12, 16)

inline bool better(const Bf16Entry& a, const Bf16Entry& b) {
  return a.lo > b.lo || (a.lo == b.lo && a.id < b.id);
}

void compact(Bf16Reservoir* r, int32_t k, float* thr, int negate) {
  Bf16Entry* e = r->e;
  std::nth_element(e, e + (k - 1), e + r->count,
                   [](const Bf16Entry& a, const Bf16Entry& b) { return a.lo > b.lo; });
  const float t = e[k - 1].lo;
  int32_t keep = k;
  for (int32_t i = k; i < r->count; ++i)
    if (e[i].hi >= t) e[keep++] = e[i];
  r->count = keep;
  if (keep > r->cap / 4 * 3) {  // many rows within the error of the k-th: grow, or thrash
    if (r->cap > (int32_t(1) << 29)) throw std::length_error("Bf16TopKState: too many candidates");
    const int32_t cap = r->cap * 2;
    void* p = std::realloc(r->e, static_cast<size_t>(cap) * sizeof(Bf16Entry));
    if (!p) throw std::bad_alloc();
    r->e = static_cast<Bf16Entry*>(p);
    r->cap = cap;
  }
  *thr = negate ? -t : t;
}

inline float round_up(double x) { return std::nextafter(static_cast<float>(x), kInf); }

uint16_t bf16_round(float f) {  // round to nearest even; callers pass finite values
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

}  // namespace

bool cpu_has_avx512bf16() {
#if defined(CTRAK_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

struct Bf16TopKState::Slot {
  std::vector<float> thr_top, thr_bot;  // [m_pad]
  std::vector<Bf16Reservoir> res_top, res_bot;
  std::vector<float> norms;
  std::vector<int32_t> flagged;
  Bf16Sel sel;
  ~Slot() {
    for (Bf16Reservoir& r : res_top) std::free(r.e);
    for (Bf16Reservoir& r : res_bot) std::free(r.e);
  }
};

Bf16TopKState::Bf16TopKState(const float* queries, int64_t m, int64_t dim, int64_t k_top,
                             int tails, int num_threads, const std::string& isa,
                             const std::string& path)
    : isa_(isa), m_(m), dim_(dim), k_(k_top), tails_(tails) {
  if (path != "auto" && path != "bf16" && path != "float32")
    throw std::invalid_argument("path must be 'auto', 'bf16' or 'float32', got '" + path + "'");
  if (path == "bf16" && !cpu_has_avx512bf16())
    throw std::invalid_argument("path 'bf16' needs a CPU with AVX512-BF16");
  const IsaKernels* engine = select_isa(isa);  // validates isa now, not at the first add()
  score_lanes_ = engine->lanes;
  const char* env = std::getenv("CTRAK_BF16_SEARCH");
  bool bf16 = path == "bf16" || (path == "auto" && cpu_has_avx512bf16() &&
                                 !(env && std::string(env) == "0"));
  // What the bound covers: finite queries of moderate norm, dim < 2^20.
  double norm_max = 0.0;
  for (int64_t q = 0; q < m && bf16; ++q) {
    double sq = 0.0;
    for (int64_t d = 0; d < dim; ++d) sq += double(queries[q * dim + d]) * queries[q * dim + d];
    if (!std::isfinite(sq) || sq >= 0x1p198) bf16 = false;
    norm_max = std::max(norm_max, std::sqrt(sq));
  }
  if (dim >= (int64_t(1) << 20)) bf16 = false;
#if defined(CTRAK_X86)
  if (bf16) kern_ = bf16_kernels_avx512bf16();
#endif
  if (!kern_) {
    fallback_ = std::make_unique<TopKState>(queries, m, dim, k_top, tails, num_threads, isa);
    num_threads_ = fallback_->num_threads();
    return;
  }
  if (k_top < 1 || k_top > (int64_t(1) << 28))
    throw std::invalid_argument("k_top must be in [1, 2**28]");
  if (tails < kTop || tails > kBoth) throw std::invalid_argument("tails must be 1, 2 or 3");

  queries_.assign(queries, queries + m * dim);
  m_pad_ = (m + kern_->lanes - 1) / kern_->lanes * kern_->lanes;
  query_norm_max_ = round_up(norm_max);
  std::vector<uint16_t> hi(static_cast<size_t>(m * dim));
  err_scale_.assign(m_pad_, 0.0f);
  err_abs_.assign(m_pad_, 0.0f);
  const double n = static_cast<double>(dim), u0 = 0x1p-24, gamma = n * u0 / (1 - n * u0);
  const double g2 = 2 * n * u0 / (1 - 2 * n * u0);  // dim < 2^20: 2 n u0 < 1/8
  for (int64_t q = 0; q < m; ++q) {
    double uu = 0.0, hh = 0.0, ll = 0.0, h1 = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      const float u = queries[q * dim + d];
      const uint16_t b = hi[q * dim + d] = bf16_round(u);
      const double h = bf16_to_float(b), l = double(u) - h;  // exact in double
      uu += double(u) * u, hh += h * h, ll += l * l, h1 += std::fabs(h);
    }
    const double U = std::sqrt(uu), H = std::sqrt(hh), L = std::sqrt(ll);
    const double c = g2 * H + gamma * U + 0x1p-22 * U + L + 0x1p-126 * std::sqrt(n);
    const double e0 = 0x1p-126 * (h1 + 3 * n);
    err_scale_[q] = round_up(c * (1 + 0x1p-18));
    err_abs_[q] = std::max(round_up(e0 * (1 + 0x1p-18)), 0x1p-126f);
  }
  qpack_.assign(kern_->packed_words(m, dim), 0u);
  kern_->pack_queries(hi.data(), m, dim, qpack_.data());

  cap0_ = k_ + std::max<int64_t>(k_ / 2, 64);
  tile_rows_ = kTileRows;
  const int n_tails = (tails & kTop ? 1 : 0) + (tails & kBottom ? 1 : 0);
  const int64_t slot_bytes = m * n_tails * cap0_ * int64_t(sizeof(Bf16Entry)) + 8 * m_pad_;
  const int want = num_threads > 0 ? num_threads : default_threads();
  num_threads_ =
      static_cast<int>(std::clamp<int64_t>(kStateBudgetBytes / slot_bytes, 1, std::max(want, 1)));
  for (int t = 0; t < num_threads_; ++t) {
    auto s = std::make_unique<Slot>();
    s->thr_top.resize(m_pad_);
    s->thr_bot.resize(m_pad_);
    for (int64_t q = 0; q < m_pad_; ++q) {
      s->thr_top[q] = q < m && (tails & kTop) ? -kInf : kInf;
      s->thr_bot[q] = q < m && (tails & kBottom) ? kInf : -kInf;
    }
    auto make = [&](bool on) {
      Bf16Reservoir r{nullptr, 0, on ? static_cast<int32_t>(cap0_) : 0};
      if (on) {
        r.e = static_cast<Bf16Entry*>(std::malloc(sizeof(Bf16Entry) * cap0_));
        if (!r.e) throw std::bad_alloc();
      }
      return r;
    };
    for (int64_t q = 0; q < m; ++q) {
      s->res_top.push_back(make(tails & kTop));
      s->res_bot.push_back(make(tails & kBottom));
    }
    s->norms.resize(tile_rows_);
    s->flagged.resize(tile_rows_);
    s->sel = Bf16Sel{static_cast<int32_t>(k_), s->thr_top.data(), s->thr_bot.data(),
                     s->res_top.data(), s->res_bot.data(), &compact};
    slots_.push_back(std::move(s));
  }
}

Bf16TopKState::~Bf16TopKState() = default;

int64_t Bf16TopKState::rows_seen() const {
  return fallback_ ? fallback_->rows_seen() : rows_seen_;
}

void Bf16TopKState::push_exact(Slot& s, int64_t q, bool top, float v, int64_t id) {
  Bf16Reservoir& r = top ? s.res_top[q] : s.res_bot[q];
  const float key = top ? v : -v;
  r.e[r.count] = Bf16Entry{key, key, id, -1};
  if (++r.count == r.cap) compact(&r, static_cast<int32_t>(k_), top ? &s.thr_top[q] : &s.thr_bot[q],
                                  top ? 0 : 1);
}

void Bf16TopKState::add(const void* feat, int dtype, int64_t n, const int64_t* ids,
                        int64_t base_id) {
  if (fallback_) return fallback_->add(feat, dtype, n, ids, base_id);
  if (n <= 0) return;
  if (dtype == kBF16)
    add_bf16(static_cast<const uint16_t*>(feat), n, ids, base_id);
  else
    add_other(feat, dtype, n, ids, base_id);
  rows_seen_ += n;
}

// float32 / float16 rows: the float32 engine's own top k of these rows, as exact candidates.
void Bf16TopKState::add_other(const void* feat, int dtype, int64_t n, const int64_t* ids,
                              int64_t base_id) {
  const int64_t kk = std::min(k_, n);
  TopKState t(queries_.data(), m_, dim_, kk, tails_, num_threads_, isa_);
  t.add(feat, dtype, n, ids, base_id);
  std::vector<float> tv(m_ * kk), bv(m_ * kk);
  std::vector<int64_t> ti(m_ * kk), bi(m_ * kk);
  t.result(tv.data(), ti.data(), bv.data(), bi.data());
  for (int tail = 0; tail < 2; ++tail) {
    const bool top = tail == 0;
    if (!(tails_ & (top ? kTop : kBottom))) continue;
    for (int64_t q = 0; q < m_; ++q)
      for (int64_t j = 0; j < kk; ++j) {
        const float v = (top ? tv : bv)[q * kk + j];
        if (!std::isnan(v)) push_exact(*slots_[0], q, top, v, (top ? ti : bi)[q * kk + j]);
      }
  }
}

void Bf16TopKState::add_bf16(const uint16_t* feat, int64_t n, const int64_t* ids,
                             int64_t base_id) {
  const int64_t tiles = (n + tile_rows_ - 1) / tile_rows_;
  const int nt = tiles > 1 && n * dim_ * m_pad_ / 2 >= kParallelMinWork ? num_threads_ : 1;
  parallel_for(tiles, nt, [&](int64_t t, int worker) {
    Slot& s = *slots_[worker];
    const int64_t r0 = t * tile_rows_;
    Bf16TileArgs a{};
    a.feat = feat + r0 * dim_;
    a.rows = std::min(tile_rows_, n - r0);
    a.dim = dim_;
    a.row0 = r0;
    a.ids = ids ? ids + r0 : nullptr;
    a.base_id = base_id + r0;
    a.qpack = qpack_.data();
    a.err_scale = err_scale_.data();
    a.err_abs = err_abs_.data();
    a.query_norm_max = query_norm_max_;
    a.m = m_;
    a.norms = s.norms.data();
    a.flagged = s.flagged.data();
    a.sel = &s.sel;
    kern_->score_tile(a);
    for (int32_t f = 0; f < a.n_flagged; ++f) {  // every query re-scores these rows
      const int64_t r = a.flagged[f];
      const int64_t id = a.ids ? a.ids[r] : a.base_id + r;
      for (int64_t q = 0; q < m_; ++q)
        for (int tail = 0; tail < 2; ++tail) {
          const bool top = tail == 0;
          if (!(tails_ & (top ? kTop : kBottom))) continue;
          Bf16Reservoir& res = top ? s.res_top[q] : s.res_bot[q];
          res.e[res.count] = Bf16Entry{-kInf, kInf, id, r0 + r};
          if (++res.count == res.cap)
            compact(&res, static_cast<int32_t>(k_), top ? &s.thr_top[q] : &s.thr_bot[q], !top);
        }
    }
  });
  rescore(feat);
}

// Every candidate of this add() call gets the float32 engine's score, while its row is mapped:
// per block of the engine's query lanes, the union of the block's candidate rows is gathered and
// scored by score_dense (the kernels and fma chain of TopKState).
void Bf16TopKState::rescore(const uint16_t* feat) {
  const int64_t lanes = score_lanes_, blocks = (m_ + lanes - 1) / lanes;
  std::vector<int64_t> counts(blocks, 0);
  parallel_for(blocks, std::min<int64_t>(num_threads_, blocks), [&](int64_t b, int) {
    const int64_t q0 = b * lanes, nq = std::min(lanes, m_ - q0);
    for (auto& s : slots_)  // prune first: a reservoir holds up to twice what it must keep
      for (int64_t q = q0; q < q0 + nq; ++q) {
        if (s->res_top[q].count > k_) compact(&s->res_top[q], int32_t(k_), &s->thr_top[q], 0);
        if (s->res_bot[q].count > k_) compact(&s->res_bot[q], int32_t(k_), &s->thr_bot[q], 1);
      }
    std::vector<int64_t> rows;
    for (const auto& s : slots_)
      for (int64_t q = q0; q < q0 + nq; ++q)
        for (const Bf16Reservoir* r : {&s->res_top[q], &s->res_bot[q]})
          for (int32_t i = 0; i < r->count; ++i)
            if (r->e[i].row >= 0) rows.push_back(r->e[i].row);
    if (rows.empty()) return;
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    const int64_t R = static_cast<int64_t>(rows.size());
    std::vector<uint16_t> gathered(static_cast<size_t>(R * dim_));
    for (int64_t j = 0; j < R; ++j)
      std::memcpy(&gathered[j * dim_], feat + rows[j] * dim_, dim_ * sizeof(uint16_t));
    std::vector<float> sc(static_cast<size_t>(nq * R));
    score_dense(queries_.data() + q0 * dim_, nq, dim_, gathered.data(), kBF16, R, sc.data(), R,
                1, isa_);
    for (auto& s : slots_)
      for (int64_t q = q0; q < q0 + nq; ++q)
        for (int tail = 0; tail < 2; ++tail) {
          const bool top = tail == 0;
          Bf16Reservoir& r = top ? s->res_top[q] : s->res_bot[q];
          int32_t keep = 0;
          for (int32_t i = 0; i < r.count; ++i) {
            Bf16Entry e = r.e[i];
            if (e.row >= 0) {
              ++counts[b];
              const int64_t j = std::lower_bound(rows.begin(), rows.end(), e.row) - rows.begin();
              const float v = sc[(q - q0) * R + j];
              if (std::isnan(v)) continue;  // never selected, as in TopKState
              e.lo = e.hi = top ? v : -v;
              e.row = -1;
            }
            r.e[keep++] = e;
          }
          r.count = keep;
          if (keep > k_)  // exact scores give a tighter threshold
            compact(&r, static_cast<int32_t>(k_), top ? &s->thr_top[q] : &s->thr_bot[q], !top);
        }
  });
  for (int64_t c : counts) rescored_ += c;
}

void Bf16TopKState::result(float* top_v, int64_t* top_i, float* bot_v, int64_t* bot_i) const {
  if (fallback_) return fallback_->result(top_v, top_i, bot_v, bot_i);
  if (rows_seen_ < k_)
    throw std::invalid_argument("k_top=" + std::to_string(k_) + " exceeds the " +
                                std::to_string(rows_seen_) + " rows added");
  for (int tail = 0; tail < 2; ++tail) {
    const bool top = tail == 0;
    float* out_v = top ? top_v : bot_v;
    int64_t* out_i = top ? top_i : bot_i;
    if (!out_v || !(tails_ & (top ? kTop : kBottom))) continue;
    const float sign = top ? 1.0f : -1.0f;
    parallel_for(m_, 1, [&](int64_t q, int) {
      std::vector<Bf16Entry> all;
      for (const auto& s : slots_) {
        const Bf16Reservoir& r = top ? s->res_top[q] : s->res_bot[q];
        all.insert(all.end(), r.e, r.e + r.count);
      }
      const int64_t have = std::min<int64_t>(k_, static_cast<int64_t>(all.size()));
      std::partial_sort(all.begin(), all.begin() + have, all.end(), better);
      for (int64_t j = 0; j < k_; ++j) {
        out_v[q * k_ + j] = j < have ? sign * all[j].lo : std::numeric_limits<float>::quiet_NaN();
        out_i[q * k_ + j] = j < have ? all[j].id : -1;
      }
    });
  }
}

}  // namespace ctrak
