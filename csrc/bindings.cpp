// The one pybind11 binding file of ctrak_fast._C. Every entry point checks its arguments first
// (shape, dtype, contiguity, writability) and raises ValueError / TypeError naming the argument;
// the engines behind it take raw pointers and trust them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>

#include "bf16_search.h"
#include "checksum.h"
#include "mapped_file.h"
#include "topk_cpu.h"
#ifdef CTRAK_WITH_CUDA
#include "topk_cuda.h"
#endif

#ifndef CTRAK_MODULE_NAME
#define CTRAK_MODULE_NAME _C
#endif

namespace py = pybind11;

namespace {

using ctrak::kBF16;
using ctrak::kF16;
using ctrak::kF32;

// Every entry point names itself in a local `fn` so the message says where it failed.
#define CHECK_ARG(cond, msg)                                          \
  do {                                                                \
    if (!(cond)) throw py::value_error(std::string(fn) + ": " + (msg)); \
  } while (0)

std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

void check_c_contiguous(const py::array& a, const char* fn, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(fn) + ": " + name + " must be C-contiguous");
}

// float32 -> kF32, float16 -> kF16, uint16/int16 (raw bfloat16 bits) -> kBF16.
int feature_dtype(const py::array& a, const char* fn) {
  const char kind = a.dtype().kind();
  const py::ssize_t size = a.dtype().itemsize();
  if (kind == 'f' && size == 4) return kF32;
  if (kind == 'f' && size == 2) return kF16;
  if ((kind == 'u' || kind == 'i') && size == 2) return kBF16;
  throw py::type_error(std::string(fn) +
                       ": features must be float32, float16 or uint16 (bfloat16 bits), got " +
                       std::string(py::str(a.dtype())));
}

int parse_tails(const std::string& tails) {
  if (tails == "top") return ctrak::kTop;
  if (tails == "bottom") return ctrak::kBottom;
  if (tails == "both") return ctrak::kBoth;
  throw py::value_error("tails must be 'top', 'bottom' or 'both', got '" + tails + "'");
}

const float* checked_queries(const py::array& q, const char* fn) {
  if (q.dtype().kind() != 'f' || q.dtype().itemsize() != 4)
    throw py::type_error(std::string(fn) + ": queries must be float32");
  if (q.ndim() != 2 || q.shape(0) < 1 || q.shape(1) < 1)
    throw py::value_error(std::string(fn) + ": queries must be [m >= 1, dim >= 1], got " +
                          shape_str(q));
  check_c_contiguous(q, fn, "queries");
  return static_cast<const float*>(q.data());
}

// ids: None or int64 [n], C-contiguous.
const int64_t* checked_ids(const py::object& ids, int64_t n, const char* fn) {
  if (ids.is_none()) return nullptr;
  if (!py::isinstance<py::array>(ids))
    throw py::type_error(std::string(fn) + ": ids must be a numpy array or None");
  const auto a = py::reinterpret_borrow<py::array>(ids);
  if (a.dtype().kind() != 'i' || a.dtype().itemsize() != 8)
    throw py::type_error(std::string(fn) + ": ids must be int64");
  if (a.ndim() != 1 || a.shape(0) != n)
    throw py::value_error(std::string(fn) + ": ids must be [" + std::to_string(n) + "], got " +
                          shape_str(a));
  check_c_contiguous(a, fn, "ids");
  return static_cast<const int64_t*>(a.data());
}

// features [n, dim] (any row count) of a feature dtype, C-contiguous, matching `dim`.
int checked_features(const py::array& f, int64_t dim, const char* fn) {
  const int dtype = feature_dtype(f, fn);
  if (f.ndim() != 2 || f.shape(1) != dim)
    throw py::value_error(std::string(fn) + ": features must be [n, " + std::to_string(dim) +
                          "], got " + shape_str(f));
  check_c_contiguous(f, fn, "features");
  return dtype;
}

using Result = std::tuple<py::object, py::object, py::object, py::object>;

// The [m, k] output arrays of the requested tails; None for the others.
struct Outputs {
  py::object tv = py::none(), ti = py::none(), bv = py::none(), bi = py::none();
  float *tvp = nullptr, *bvp = nullptr;
  int64_t *tip = nullptr, *bip = nullptr;

  Outputs(int64_t m, int64_t k, int tails) {
    if (tails & ctrak::kTop) {
      auto v = py::array_t<float>({m, k});
      auto i = py::array_t<int64_t>({m, k});
      tvp = v.mutable_data(), tip = i.mutable_data(), tv = v, ti = i;
    }
    if (tails & ctrak::kBottom) {
      auto v = py::array_t<float>({m, k});
      auto i = py::array_t<int64_t>({m, k});
      bvp = v.mutable_data(), bip = i.mutable_data(), bv = v, bi = i;
    }
  }
  Result tuple() const { return {tv, ti, bv, bi}; }
};

template <class State>  // TopKState or Bf16TopKState
Result cpu_result(const State& s) {
  Outputs out(s.m(), s.k_top(), s.tails());
  {
    py::gil_scoped_release nogil;
    s.result(out.tvp, out.tip, out.bvp, out.bip);
  }
  return out.tuple();
}

template <class State>
void state_add(State& s, const py::array& features, const py::object& ids, int64_t base_id,
               const char* fn) {
  const int dtype = checked_features(features, s.dim(), fn);
  const int64_t n = features.shape(0);
  const int64_t* idp = checked_ids(ids, n, fn);
  CHECK_ARG(idp || n == 0 || base_id <= INT64_MAX - n, "base_id + n overflows int64");
  py::gil_scoped_release nogil;
  s.add(features.data(), dtype, n, idp, base_id);
}

void cpu_add(ctrak::TopKState& s, const py::array& features, const py::object& ids,
             int64_t base_id) {
  state_add(s, features, ids, base_id, "TopKState.add");
}

}  // namespace

PYBIND11_MODULE(CTRAK_MODULE_NAME, m) {
  // MappedFile raises std::system_error: surface it as OSError with its errno.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::system_error& e) {
      py::object err = py::module_::import("builtins").attr("OSError")(e.code().value(), e.what());
      PyErr_SetObject(PyExc_OSError, err.ptr());
    }
  });

  m.doc() = "ctrak_fast native engine: exact inner-product top-k (CPU, optional CUDA) and the "
            "Rademacher projection tile.";

  m.def("cpu_isas", &ctrak::cpu_isas,
        "ISA variants of the CPU kernels this machine can run, best first.");
  m.def(
      "cpu_isa", [] { return std::string(ctrak::select_isa("auto")->name); },
      "The variant 'auto' selects (honours $CTRAK_CPU_ISA).");
  m.def(
      "has_cuda",
      [] {
#ifdef CTRAK_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA engine was compiled in.");

  m.def(
      "cpu_fma_peak",
      [](double seconds, int num_threads, const std::string& isa) {
        const char* fn = "cpu_fma_peak";
        CHECK_ARG(seconds > 0 && seconds <= 60, "seconds must be in (0, 60]");
        py::gil_scoped_release nogil;
        return ctrak::fma_peak_flops(seconds, num_threads, isa);
      },
      py::arg("seconds") = 0.25, py::arg("num_threads") = 0, py::arg("isa") = "auto",
      "Peak float32 FLOP/s of independent fma chains on num_threads threads (0: default) of the\n"
      "ISA variant, measured for about `seconds`: the compute ceiling of the CPU kernels.");

  m.def(
      "rademacher_tile",
      [](const py::object& seed, int64_t row_start, int64_t n_rows, int64_t k, py::array out,
         int num_threads, const std::string& isa) {
        const char* fn = "rademacher_tile";
        CHECK_ARG(row_start >= 0, "row_start must be >= 0");
        CHECK_ARG(n_rows >= 0, "n_rows must be >= 0");
        CHECK_ARG(k >= 1, "k must be >= 1");
        if (out.dtype().kind() != 'f' || out.dtype().itemsize() != 4)
          throw py::type_error("rademacher_tile: out must be float32");
        CHECK_ARG(out.ndim() == 2 && out.shape(0) == n_rows && out.shape(1) == k,
                  "out must be [" + std::to_string(n_rows) + ", " + std::to_string(k) +
                      "], got " + shape_str(out));
        check_c_contiguous(out, fn, "out");
        CHECK_ARG(out.writeable(), "out must be writeable");
        // hashing.py reduces the seed modulo 2**32 (Python ints of any size and sign).
        const py::object index = py::module_::import("operator").attr("index");
        const auto seed32 = index(seed).attr("__and__")(0xFFFFFFFFu).cast<uint32_t>();
        float* dst = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release nogil;
        ctrak::rademacher_tile(seed32, static_cast<uint64_t>(row_start), n_rows, k, dst,
                               num_threads, isa);
      },
      py::arg("seed"), py::arg("row_start"), py::arg("n_rows"), py::arg("k"), py::arg("out"),
      py::arg("num_threads") = 0, py::arg("isa") = "auto",
      "Fill out [n_rows, k] float32 with rows row_start.. of the projection matrix: +-1/sqrt(k),\n"
      "bit-identical to ctrak_fast.hashing.rademacher_block(seed, row_start, n_rows, k).");

  m.def(
      "rademacher_project",
      [](const py::object& seed, int64_t row_start, const py::array& x, int64_t k, py::array out,
         int num_threads, const std::string& isa) {
        const char* fn = "rademacher_project";
        CHECK_ARG(row_start >= 0, "row_start must be >= 0");
        CHECK_ARG(k >= 1, "k must be >= 1");
        if (x.dtype().kind() != 'f' || x.dtype().itemsize() != 4)
          throw py::type_error("rademacher_project: x must be float32");
        if (out.dtype().kind() != 'f' || out.dtype().itemsize() != 4)
          throw py::type_error("rademacher_project: out must be float32");
        CHECK_ARG(x.ndim() == 2, "x must be [batch, n], got " + shape_str(x));
        CHECK_ARG(x.shape(1) <= 1 || x.strides(1) == 4, "x rows must be contiguous");
        CHECK_ARG(x.shape(0) <= 1 || (x.strides(0) > 0 && x.strides(0) % 4 == 0),
                  "x must have a positive row stride");
        CHECK_ARG(out.ndim() == 2 && out.shape(0) == x.shape(0) && out.shape(1) == k,
                  "out must be [" + std::to_string(x.shape(0)) + ", " + std::to_string(k) +
                      "], got " + shape_str(out));
        check_c_contiguous(out, fn, "out");
        CHECK_ARG(out.writeable(), "out must be writeable");
        const py::object index = py::module_::import("operator").attr("index");
        const auto seed32 = index(seed).attr("__and__")(0xFFFFFFFFu).cast<uint32_t>();
        const auto* src = static_cast<const float*>(x.data());
        const int64_t ldx = x.shape(0) > 1 ? x.strides(0) / 4 : x.shape(1);
        float* dst = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release nogil;
        ctrak::rademacher_project(seed32, static_cast<uint64_t>(row_start), src, ldx, x.shape(0),
                                  x.shape(1), k, dst, num_threads, isa);
      },
      py::arg("seed"), py::arg("row_start"), py::arg("x"), py::arg("k"), py::arg("out"),
      py::arg("num_threads") = 0, py::arg("isa") = "auto",
      "out [batch, k] += x [batch, n] . rows row_start.. of the projection matrix of\n"
      "ctrak_fast.hashing (+-1/sqrt(k)), the signs generated in registers, never stored. x: float32\n"
      "with contiguous rows (any row stride). Sums run per chunk of a global grid of\n"
      "PROJECT_GRID_ROWS rows: the bits do not depend on num_threads or other batch rows.");
  m.attr("PROJECT_GRID_ROWS") = py::int_(ctrak::kProjectGridRows);

  // A contiguous byte view of any buffer (bytes, numpy arrays, a MappedFile).
  const auto bytes_of = [](const py::buffer& b, const char* fn) {
    py::buffer_info info = b.request();
    py::ssize_t expect = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
      CHECK_ARG(info.shape[d] <= 1 || info.strides[d] == expect, "the buffer must be contiguous");
      expect *= info.shape[d];
    }
    return std::make_pair(static_cast<const uint8_t*>(info.ptr),
                          static_cast<size_t>(info.size * info.itemsize));
  };
  m.def(
      "crc32c",
      [bytes_of](const py::buffer& data, uint32_t crc) {
        const auto [ptr, n] = bytes_of(data, "crc32c");
        py::gil_scoped_release nogil;
        return ctrak::crc32c(ptr, n, crc);
      },
      py::arg("data"), py::arg("crc") = 0,
      "CRC-32C (Castagnoli) of a contiguous buffer; crc continues a previous value. Runs\n"
      "without the GIL (SSE4.2 instruction where the CPU has it).");
  m.def(
      "block_crc32c",
      [bytes_of](const py::buffer& data, int64_t block) {
        const char* fn = "block_crc32c";
        CHECK_ARG(block > 0, "block must be > 0");
        const auto [ptr, n] = bytes_of(data, fn);
        py::gil_scoped_release nogil;
        return ctrak::block_crc32c(ptr, n, static_cast<size_t>(block));
      },
      py::arg("data"), py::arg("block"),
      "CRC-32C of the little-endian uint32 CRC-32C values of consecutive block-byte blocks\n"
      "(three blocks interleaved per thread): the shard checksum of engine/checksum.py.");
  m.def("crc32c_hardware", &ctrak::crc32c_hardware,
        "True when the SSE4.2 CRC instruction is used (else a slice-by-8 table).");

  py::class_<ctrak::MappedFile>(
      m, "MappedFile", py::buffer_protocol(),
      "Read-only shared memory map of a whole file, exposed as a read-only uint8 buffer\n"
      "(np.frombuffer(mf, np.uint8) is a zero-copy view that keeps the mapping alive).")
      .def(py::init([](const std::string& path, bool populate, bool sequential) {
             py::gil_scoped_release nogil;  // populate reads the whole file
             return new ctrak::MappedFile(path, populate, sequential);
           }),
           py::arg("path"), py::arg("populate") = false, py::arg("sequential") = true,
           "populate: read every page into the page cache and map it before returning (the\n"
           "read-ahead of the next shard); sequential: MADV_SEQUENTIAL. OSError on failure.")
      .def_buffer([](ctrak::MappedFile& f) {
        return py::buffer_info(const_cast<uint8_t*>(f.data()), 1,
                               py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {py::ssize_t(1)},
                               /*readonly=*/true);
      })
      .def(
          "will_need",
          [](const ctrak::MappedFile& f, int64_t offset, int64_t length) {
            const char* fn = "MappedFile.will_need";
            CHECK_ARG(offset >= 0 && length >= 0, "offset and length must be >= 0");
            py::gil_scoped_release nogil;
            f.will_need(static_cast<size_t>(offset), static_cast<size_t>(length));
          },
          py::arg("offset") = 0, py::arg("length") = INT64_MAX,
          "Start asynchronous read-ahead of a byte range (MADV_WILLNEED); does not wait.")
      .def_property_readonly("size", &ctrak::MappedFile::size)
      .def_property_readonly("path", &ctrak::MappedFile::path);

  m.def(
      "score_cpu",
      [](const py::array& features, const py::array& queries, const py::object& out,
         int num_threads, const std::string& isa) {
        const char* fn = "score_cpu";
        const float* q = checked_queries(queries, fn);
        const int64_t m = queries.shape(0), dim = queries.shape(1);
        const int dtype = checked_features(features, dim, fn);
        const int64_t n = features.shape(0);
        py::array_t<float> dst;
        if (out.is_none()) {
          dst = py::array_t<float>({m, n});
        } else {
          if (!py::isinstance<py::array>(out))
            throw py::type_error("score_cpu: out must be a numpy array or None");
          const auto o = py::reinterpret_borrow<py::array>(out);
          if (o.dtype().kind() != 'f' || o.dtype().itemsize() != 4)
            throw py::type_error("score_cpu: out must be float32");
          CHECK_ARG(o.ndim() == 2 && o.shape(0) == m && o.shape(1) == n,
                    "out must be [" + std::to_string(m) + ", " + std::to_string(n) + "], got " +
                        shape_str(o));
          CHECK_ARG(o.strides(1) == 4 && o.strides(0) % 4 == 0 && o.strides(0) / 4 >= n,
                    "out rows must be contiguous and not overlap (strides [>= 4n, 4])");
          CHECK_ARG(o.writeable(), "out must be writeable");
          dst = py::reinterpret_borrow<py::array_t<float>>(o);
        }
        const int64_t ldo = m > 1 ? dst.strides(0) / 4 : n;
        float* outp = dst.mutable_data();
        const void* fp = features.data();
        {
          py::gil_scoped_release nogil;
          ctrak::score_dense(q, m, dim, fp, dtype, n, outp, ldo, num_threads, isa);
        }
        return dst;
      },
      py::arg("features"), py::arg("queries"), py::arg("out") = py::none(),
      py::arg("num_threads") = 0, py::arg("isa") = "auto",
      "Dense scores out[q, i] = features[i] . queries[q] as float32 [m, n] (allocated when out\n"
      "is None; else a float32 [m, n] array with contiguous rows, e.g. a column block of a wider\n"
      "one): bit-identical to the values TopKState selects.");

  py::class_<ctrak::TopKState>(m, "TopKState",
                               "Running exact top-k of m queries over rows streamed by add().")
      .def(py::init([](const py::array& queries, int64_t k_top, const std::string& tails,
                       int num_threads, const std::string& isa) {
             const char* fn = "TopKState";
             const float* q = checked_queries(queries, "TopKState");
             CHECK_ARG(k_top >= 1, "k_top must be >= 1");
             const int t = parse_tails(tails);
             py::gil_scoped_release nogil;
             return new ctrak::TopKState(q, queries.shape(0), queries.shape(1), k_top, t,
                                         num_threads, isa);
           }),
           py::arg("queries"), py::arg("k_top"), py::arg("tails") = "both",
           py::arg("num_threads") = 0, py::arg("isa") = "auto",
           "queries: float32 [m, dim] (copied); tails: 'top' | 'bottom' | 'both'.")
      .def("add", &cpu_add, py::arg("features"), py::arg("ids") = py::none(),
           py::arg("base_id") = 0,
           "features: [n, dim] float32 / float16 / uint16 (bfloat16 bits), C-contiguous;\n"
           "ids: int64 [n], or None for ids base_id, base_id + 1, ...")
      .def("result", &cpu_result<ctrak::TopKState>,
           "(top_values, top_ids, bottom_values, bottom_ids): float32 / int64 [m, k_top], best\n"
           "first (ties: smaller id first); None for a tail not requested.")
      .def_property_readonly("m", &ctrak::TopKState::m)
      .def_property_readonly("dim", &ctrak::TopKState::dim)
      .def_property_readonly("k_top", &ctrak::TopKState::k_top)
      .def_property_readonly("rows_seen", &ctrak::TopKState::rows_seen)
      .def_property_readonly("num_threads", &ctrak::TopKState::num_threads)
      .def_property_readonly("tile_rows", &ctrak::TopKState::tile_rows)
      .def_property_readonly("isa", [](const ctrak::TopKState& s) { return std::string(s.isa()); })
      .def_property_readonly("tails", [](const ctrak::TopKState& s) {
        return std::string(s.tails() == ctrak::kBoth ? "both"
                           : s.tails() == ctrak::kTop ? "top"
                                                      : "bottom");
      });

  m.def("has_avx512bf16", &ctrak::cpu_has_avx512bf16,
        "True when this CPU runs the exact bfloat16 search's AVX512-BF16 kernel.");
  py::class_<ctrak::Bf16TopKState>(
      m, "Bf16TopKState",
      "TopKState for bfloat16 rows: vdpbf16ps scores, a bound on their error, float32 re-scoring\n"
      "of every row that can still reach the k-th. Same ids and values as TopKState.")
      .def(py::init([](const py::array& queries, int64_t k_top, const std::string& tails,
                       int num_threads, const std::string& isa, const std::string& path) {
             const char* fn = "Bf16TopKState";
             const float* q = checked_queries(queries, fn);
             CHECK_ARG(k_top >= 1, "k_top must be >= 1");
             const int t = parse_tails(tails);
             py::gil_scoped_release nogil;
             return new ctrak::Bf16TopKState(q, queries.shape(0), queries.shape(1), k_top, t,
                                             num_threads, isa, path);
           }),
           py::arg("queries"), py::arg("k_top"), py::arg("tails") = "both",
           py::arg("num_threads") = 0, py::arg("isa") = "auto", py::arg("path") = "auto",
           "isa: the float32 engine's variant (re-scoring, fallback); path: 'auto' (bfloat16\n"
           "where the CPU has AVX512-BF16 and $CTRAK_BF16_SEARCH != '0'), 'bf16' or 'float32'.")
      .def(
          "add",
          [](ctrak::Bf16TopKState& s, const py::array& features, const py::object& ids,
             int64_t base_id) { state_add(s, features, ids, base_id, "Bf16TopKState.add"); },
          py::arg("features"), py::arg("ids") = py::none(), py::arg("base_id") = 0,
          "As TopKState.add; uint16 (bfloat16 bits) rows take the bfloat16 path.")
      .def("result", &cpu_result<ctrak::Bf16TopKState>, "As TopKState.result.")
      .def_property_readonly("m", &ctrak::Bf16TopKState::m)
      .def_property_readonly("dim", &ctrak::Bf16TopKState::dim)
      .def_property_readonly("k_top", &ctrak::Bf16TopKState::k_top)
      .def_property_readonly("rows_seen", &ctrak::Bf16TopKState::rows_seen)
      .def_property_readonly("num_threads", &ctrak::Bf16TopKState::num_threads)
      .def_property_readonly("rescored", &ctrak::Bf16TopKState::rescored)
      .def_property_readonly("path",
                             [](const ctrak::Bf16TopKState& s) { return std::string(s.path()); });

  m.def(
      "topk_cpu",
      [](const py::array& features, const py::array& queries, int64_t k_top,
         const std::string& tails, const py::object& ids, int64_t base_id, int num_threads,
         const std::string& isa) {
        const char* fn = "topk_cpu";
        const float* q = checked_queries(queries, fn);
        CHECK_ARG(k_top >= 1, "k_top must be >= 1");
        CHECK_ARG(features.ndim() == 2 && k_top <= features.shape(0),
                  "k_top=" + std::to_string(k_top) + " exceeds the rows of features " +
                      shape_str(features));
        const int t = parse_tails(tails);
        ctrak::TopKState s(q, queries.shape(0), queries.shape(1), k_top, t, num_threads, isa);
        cpu_add(s, features, ids, base_id);
        return cpu_result(s);
      },
      py::arg("features"), py::arg("queries"), py::arg("k_top"), py::arg("tails") = "both",
      py::arg("ids") = py::none(), py::arg("base_id") = 0, py::arg("num_threads") = 0,
      py::arg("isa") = "auto",
      "One-shot TopKState(queries, k_top, tails).add(features, ids, base_id).result().");

#ifdef CTRAK_WITH_CUDA
  py::class_<ctrak::CudaTopK>(
      m, "CudaTopKState",
      "Running exact top-k on a CUDA device. Pointers are device addresses (int), streams are\n"
      "cudaStream_t values (int, 0 = legacy default); the caller keeps buffers alive until the\n"
      "stream has consumed them.")
      .def(py::init([](uintptr_t queries, int64_t m, int64_t dim, int64_t k_top,
                       const std::string& tails, int device, uintptr_t stream,
                       const std::string& engine) {
             const char* fn = "CudaTopKState";
             CHECK_ARG(queries != 0, "queries pointer is null");
             CHECK_ARG(m >= 1 && dim >= 1, "queries must be [m >= 1, dim >= 1]");
             CHECK_ARG(k_top >= 1, "k_top must be >= 1");
             CHECK_ARG(device >= 0, "device must be >= 0");
             CHECK_ARG(engine == "auto" || engine == "mma" || engine == "simt",
                       "engine must be 'auto', 'mma' or 'simt', got '" + engine + "'");
             const int t = parse_tails(tails);
             py::gil_scoped_release nogil;
             return new ctrak::CudaTopK(queries, m, dim, k_top, t, device, stream, engine);
           }),
           py::arg("queries"), py::arg("m"), py::arg("dim"), py::arg("k_top"),
           py::arg("tails"), py::arg("device"), py::arg("stream"), py::arg("engine") = "auto",
           "queries: device pointer to float32 [m, dim], C-contiguous (copied on `stream`);\n"
           "engine: 'mma' (tensor cores, float16 / bfloat16 features with dim % 8 == 0), 'simt'\n"
           "(float32 fma chains) or 'auto' (mma where it applies; $CTRAK_CUDA_ENGINE overrides).")
      .def(
          "add",
          [](ctrak::CudaTopK& s, uintptr_t features, int64_t n, const std::string& dtype,
             uintptr_t ids, int64_t base_id, uintptr_t stream) {
            const char* fn = "CudaTopKState.add";
            CHECK_ARG(n >= 0, "n must be >= 0");
            CHECK_ARG(n == 0 || features != 0, "features pointer is null");
            const int dt = dtype == "float32"    ? kF32
                           : dtype == "float16"  ? kF16
                           : dtype == "bfloat16" ? kBF16
                                                 : -1;
            if (dt < 0)
              throw py::type_error(std::string(fn) +
                                   ": dtype must be float32, float16 or bfloat16");
            py::gil_scoped_release nogil;
            s.add(features, dt, n, ids, base_id, stream);
          },
          py::arg("features"), py::arg("n"), py::arg("dtype"), py::arg("ids"), py::arg("base_id"),
          py::arg("stream"),
          "features: device pointer to [n, dim] C-contiguous; ids: device pointer to int64 [n]\n"
          "or 0 for ids base_id, base_id + 1, ...")
      .def(
          "add_host",
          [](ctrak::CudaTopK& s, const py::array& features, const py::object& ids,
             int64_t base_id, uintptr_t stream) {
            const char* fn = "CudaTopKState.add_host";
            const int dtype = checked_features(features, s.dim(), fn);
            const int64_t n = features.shape(0);
            const int64_t* idp = checked_ids(ids, n, fn);
            CHECK_ARG(idp || n == 0 || base_id <= INT64_MAX - n, "base_id + n overflows int64");
            const void* fp = features.data();
            py::gil_scoped_release nogil;
            s.add_host(fp, dtype, n, idp, base_id, stream);
          },
          py::arg("features"), py::arg("ids") = py::none(), py::arg("base_id") = 0,
          py::arg("stream") = 0,
          "features: host numpy [n, dim] float32 / float16 / uint16 (bfloat16 bits),\n"
          "C-contiguous (e.g. a memory-mapped shard); ids: int64 [n] or None. Streams through\n"
          "pinned double buffers; returns once the host arrays have been read.")
      .def(
          "engine_for",
          [](const ctrak::CudaTopK& s, const std::string& dtype) {
            const int dt = dtype == "float32"    ? kF32
                           : dtype == "float16"  ? kF16
                           : dtype == "bfloat16" ? kBF16
                                                 : -1;
            if (dt < 0)
              throw py::type_error("engine_for: dtype must be float32, float16 or bfloat16");
            return std::string(s.engine_for(dt));
          },
          py::arg("dtype"), "The score kernel ('mma' or 'simt') for aligned features of dtype.")
      .def(
          "result",
          [](ctrak::CudaTopK& s, uintptr_t stream) {
            Outputs out(s.m(), s.k_top(), s.tails());
            {
              py::gil_scoped_release nogil;
              s.result(out.tvp, out.tip, out.bvp, out.bip, stream);
            }
            return out.tuple();
          },
          py::arg("stream"),
          "Synchronises `stream`; returns host arrays like TopKState.result().")
      .def_property_readonly("m", &ctrak::CudaTopK::m)
      .def_property_readonly("dim", &ctrak::CudaTopK::dim)
      .def_property_readonly("k_top", &ctrak::CudaTopK::k_top)
      .def_property_readonly("rows_seen", &ctrak::CudaTopK::rows_seen);
#endif
}
