// ksae's C++ extension module, _core: the build's facts and the threads' helpers here, the
// kernels' bindings by family (encode.cpp, backward.cpp, optim.cpp, rows.cpp), all of them
// checking their arguments with checks.hpp. No binding holds model logic or copies an array:
// a wrongly typed or non-contiguous array is an error, never silently converted.
#include <pybind11/pybind11.h>

#include <string>

#include "families.hpp"
#include "ksae/common.hpp"
#include "ksae/diagnostics.hpp"

namespace py = pybind11;

namespace {

// The vector instruction sets this build was compiled for (Eigen's own string omits AVX2/FMA).
std::string simd_in_use() {
  const char* sets[] = {
#if defined(__AVX512F__)
      "AVX-512F",
#endif
#if defined(__AVX2__)
      "AVX2",
#endif
#if defined(__FMA__)
      "FMA",
#endif
#if defined(__AVX__)
      "AVX",
#endif
#if defined(__SSE4_2__)
      "SSE4.2",
#endif
#if defined(__SSE2__)
      "SSE2",
#endif
#if defined(__ARM_NEON)
      "NEON",
#endif
      nullptr};
  std::string s;
  for (const char** p = sets; *p; ++p) s += (s.empty() ? "" : ", ") + std::string(*p);
  return s.empty() ? std::string("none") : s;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ksae's C++ kernels (private: use the ksae package).";

  m.def("has_openmp", &ksae::has_openmp, "Whether the core was built with OpenMP.");
  m.def("max_threads", [] { return ksae::resolve_threads(0); },
        "Threads a kernel uses when n_threads <= 0.");
  m.def(
      "thread_round_trip_ns",
      [](int trips, int repeats) {
        if (trips < 1) {
          throw py::value_error("trips: expected a positive count, got " + std::to_string(trips));
        }
        if (repeats < 1) {
          throw py::value_error("repeats: expected a positive count, got " + std::to_string(repeats));
        }
        py::gil_scoped_release release;
        return ksae::thread_round_trip_ns(trips, repeats);
      },
      py::arg("trips") = 1000, py::arg("repeats") = 5,
      "Median nanoseconds for a cache line to go between the kernels' first two threads and\n"
      "back (0.0 without OpenMP, a second processor or a second OpenMP thread).");
  m.def("build_info", [] {
    py::dict info;
    info["openmp"] = ksae::has_openmp();
    info["max_threads"] = ksae::resolve_threads(0);
    info["simd"] = simd_in_use();
    info["eigen"] = std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) +
                    "." + std::to_string(EIGEN_MINOR_VERSION);
#ifdef KSAE_ARCH
    info["arch"] = std::string(KSAE_ARCH);
#endif
#ifdef KSAE_BUILD_TYPE
    info["build_type"] = std::string(KSAE_BUILD_TYPE);  // Release for pip install; rounding differs at -O1
#endif
    return info;
  });

  ksae::bindings::bind_encode(m);
  ksae::bindings::bind_backward(m);
  ksae::bindings::bind_optimizers(m);
  ksae::bindings::bind_rows(m);
}
