// Bindings of the training loop's passes over arrays and codes: squared_norm, all_finite,
// sums_and_squares, take_rows (a shuffled batch's rows), and the firing records note_fired
// and mark_fired.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "checks.hpp"
#include "families.hpp"
#include "ksae/optim.hpp"
#include "ksae/rows.hpp"

namespace ksae::bindings {
namespace {

// `kernel(x, n, n_threads)` on the values of a C-contiguous T array of any shape (checked:
// named "array"), without the GIL.
template <class T, class Kernel>
auto on_flat_array(const py::object& array, int n_threads, Kernel kernel) {
  auto arr = py::reinterpret_borrow<py::array>(array);
  const std::vector<Index> shape(arr.shape(), arr.shape() + arr.ndim());
  const T* x = checked<T>(array, "array", shape);
  const Index n = static_cast<Index>(arr.size());
  py::gil_scoped_release release;
  return kernel(x, n, n_threads);
}

template <class T>
double squared_norm_impl(const py::object& array, int n_threads) {
  return on_flat_array<T>(array, n_threads, ksae::squared_norm<T>);
}

template <class T>
bool all_finite_impl(const py::object& array, int n_threads) {
  return on_flat_array<T>(array, n_threads, ksae::all_finite<T>);
}

// X[rows] into `out` (allocated when None): X (n x d) C-contiguous, rows int64 (m,) in
// [0, n), out (m x d) in X's dtype, apart from X. Checked in full before anything is written.
template <class T>
py::array take_rows_impl(const py::object& X, const py::object& rows, int n_threads,
                         const py::object& out) {
  check_2d(X, "X");
  const Index n = dim(X, 0), d = dim(X, 1);
  const T* x = checked<T>(X, "X", {n, d});
  const LatentIndex* r = checked<LatentIndex>(rows, "rows", {kAny});
  const Index m = dim(rows, 0);
  for (Index i = 0; i < m; ++i) {
    if (r[i] < 0 || r[i] >= n) {
      throw py::index_error("rows: entry " + std::to_string(i) + " = " + std::to_string(r[i]) +
                            " is outside [0, " + std::to_string(n) + ")");
    }
  }
  py::array_t<T> result = output_array<T>(out, "out", m, d);
  T* o = result.mutable_data();
  require_apart(o, x, m * d, "out", "X", n * d);
  py::gil_scoped_release release;
  ksae::take_rows<T>(x, d, r, m, n_threads, o);
  return std::move(result);
}

// (column sums, sum of all squares) of a C-contiguous (n x d) X, both in double.
template <class T>
py::tuple sums_and_squares_impl(const py::object& X, int n_threads) {
  check_2d(X, "X");
  const Index n = dim(X, 0), d = dim(X, 1);
  const T* x = checked<T>(X, "X", {n, d});
  py::array_t<double> sums(d);
  double* s = sums.mutable_data();
  double squares;
  {
    py::gil_scoped_release release;
    squares = ksae::sums_and_squares<T>(x, n, d, n_threads, s);
  }
  return py::make_tuple(sums, squares);
}

// `above` (None or a number) as (whether there is a threshold, the threshold in T).
template <class T>
std::pair<bool, T> activity_bar(const py::object& above) {
  if (above.is_none()) return {false, T(0)};
  if (!py::isinstance<py::float_>(above) && !py::isinstance<py::int_>(above)) {
    throw py::type_error("above: expected a number or None, got " +
                         std::string(py::str(py::type::handle_of(above).attr("__name__"))));
  }
  return {true, T(above.cast<double>())};
}

// The firing counts after a step on `n_samples` samples: every latent's count grows by
// n_samples, then each latent that a code entry holds actively (value > above; value != 0
// where `above` is None) is set to 0. Checked in full before anything is written.
template <class T>
void mark_fired_impl(const py::object& counts, const py::object& values, const py::object& indices,
                     Index n_samples, const py::object& above) {
  check_2d(values, "values");
  const Index batch = dim(values, 0), k = dim(values, 1);
  const T* v = checked<T>(values, "values", {batch, k});
  const LatentIndex* idx = checked<LatentIndex>(indices, "indices", {batch, k});
  LatentIndex* c = checked<LatentIndex>(counts, "counts", {kAny}, true);
  const Index n = dim(counts, 0);
  if (n_samples < 0) {
    throw py::value_error("n_samples: expected a value >= 0, got " + std::to_string(n_samples));
  }
  check_indices(idx, batch * k, std::max<Index>(k, 1), n);
  const auto [threshold, bar] = activity_bar<T>(above);
  py::gil_scoped_release release;
  ksae::advance_counts(c, n, v, idx, batch * k, n_samples, threshold, bar);
}

// A training span's firing record (fit's RunningStats): fired (bool, n_latents) is set for
// the latent of each code entry (values, indices: batch x k) whose value is above `above`
// (non-zero where None), and the number of such entries is returned. One call for what took
// an active mask, a boolean index, a scatter and a sum in NumPy: 90 us of a fit step at
// (256, 784, 1000, 25), from caches the kernels had just filled (13 us in a loop).
template <class T>
Index note_fired_impl(const py::object& fired, const py::object& values,
                      const py::object& indices, const py::object& above) {
  check_2d(values, "values");
  const Index batch = dim(values, 0), k = dim(values, 1);
  const T* v = checked<T>(values, "values", {batch, k});
  const LatentIndex* idx = checked<LatentIndex>(indices, "indices", {batch, k});
  bool* f = checked<bool>(fired, "fired", {kAny}, true);
  check_indices(idx, batch * k, std::max<Index>(k, 1), dim(fired, 0));
  const auto [threshold, bar] = activity_bar<T>(above);
  Index active = 0;
  for (Index p = 0; p < batch * k; ++p) {
    if (threshold ? v[p] > bar : v[p] != T(0)) {
      f[idx[p]] = true;
      ++active;
    }
  }
  return active;
}

}  // namespace

void bind_rows(py::module_& m) {
  m.def(
      "squared_norm",
      [](const py::object& array, int n_threads) {
        require_array(array, "array");
        return is_float32(array) ? squared_norm_impl<float>(array, n_threads)
                                 : squared_norm_impl<double>(array, n_threads);
      },
      py::arg("array"), py::arg("n_threads") = 0,
      "Sum of the squares of a C-contiguous float32/float64 array of any shape, accumulated\n"
      "in double. Fixed-size chunks summed in order: bitwise the same for any n_threads.");

  m.def(
      "all_finite",
      [](const py::object& array, int n_threads) {
        require_array(array, "array");
        return is_float32(array) ? all_finite_impl<float>(array, n_threads)
                                 : all_finite_impl<double>(array, n_threads);
      },
      py::arg("array"), py::arg("n_threads") = 0,
      "Whether a C-contiguous float32/float64 array of any shape holds no NaN and no\n"
      "infinity (np.isfinite(array).all() without its temporary bool array).");

  m.def(
      "note_fired",
      [](const py::object& fired, const py::object& values, const py::object& indices,
         const py::object& above) {
        require_array(values, "values");
        return is_float32(values) ? note_fired_impl<float>(fired, values, indices, above)
                                  : note_fired_impl<double>(fired, values, indices, above);
      },
      py::arg("fired"), py::arg("values"), py::arg("indices"), py::arg("above") = py::none(),
      "Note which latents a code fired, in place: fired (bool, n_latents) is set for the latent\n"
      "of each code entry (values, indices: batch x k) whose value is above `above` (non-zero\n"
      "where above is None). Returns the number of such entries. Checked in full before\n"
      "anything is written.");

  m.def(
      "sums_and_squares",
      [](const py::object& X, int n_threads) {
        require_array(X, "X");
        return is_float32(X) ? sums_and_squares_impl<float>(X, n_threads)
                             : sums_and_squares_impl<double>(X, n_threads);
      },
      py::arg("X"), py::arg("n_threads") = 0,
      "(column sums, sum of all squares) of a C-contiguous float32/float64 matrix X, both in\n"
      "float64, in one pass over X; bitwise the same for any thread count.");

  m.def(
      "take_rows",
      [](const py::object& X, const py::object& rows, int n_threads, const py::object& out) {
        require_array(X, "X");
        return is_float32(X) ? take_rows_impl<float>(X, rows, n_threads, out)
                             : take_rows_impl<double>(X, rows, n_threads, out);
      },
      py::arg("X"), py::arg("rows"), py::arg("n_threads") = 0, py::arg("out") = py::none(),
      "X[rows] for a C-contiguous float32/float64 matrix X and int64 row numbers (m,), as a new\n"
      "(m, d) array or into `out`: the rows a shuffled batch takes, copied on n_threads with\n"
      "several rows in flight per thread (NumPy's fancy indexing fetches one at a time).");

  m.def(
      "mark_fired",
      [](const py::object& counts, const py::object& values, const py::object& indices,
         Index n_samples, const py::object& above) {
        require_array(values, "values");
        is_float32(values) ? mark_fired_impl<float>(counts, values, indices, n_samples, above)
                           : mark_fired_impl<double>(counts, values, indices, n_samples, above);
      },
      py::arg("counts"), py::arg("values"), py::arg("indices"), py::arg("n_samples"),
      py::arg("above") = py::none(),
      "Advance the samples-since-fired counts (int64, n_latents) by one step of n_samples\n"
      "samples, in place: every count grows by n_samples, then the latent of each code entry\n"
      "(values, indices: batch x k) whose value is above `above` (non-zero where above is\n"
      "None) is set to 0. One call for what took an active mask, a boolean index and a\n"
      "scatter in NumPy.");
}

}  // namespace ksae::bindings
