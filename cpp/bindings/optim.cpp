// Bindings of the fused optimizer updates: adam_update (optionally lazy, on given rows),
// sgd_update and rmsprop_update, each in place on one parameter and its state.
#include <string>
#include <vector>

#include "checks.hpp"
#include "families.hpp"
#include "ksae/optim.hpp"

namespace ksae::bindings {
namespace {

// Shape of a parameter as (rows, cols): a vector is one row.
std::vector<Index> param_shape(const py::handle& obj, const char* name) {
  require_array(obj, name);
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.ndim() < 1 || arr.ndim() > 2) {
    throw py::value_error(std::string(name) + ": expected a 1-D or 2-D array, got " +
                          std::to_string(arr.ndim()) + "-D");
  }
  return std::vector<Index>(arr.shape(), arr.shape() + arr.ndim());
}

// A parameter and the arrays an optimizer keeps beside it, all checked to share its shape.
template <class T>
struct OptimizerArrays {
  std::vector<Index> shape;
  Index rows, cols;  // a vector is one row
  T* param;
  const T* grad;

  OptimizerArrays(const py::object& param_obj, const py::object& grad_obj)
      : shape(param_shape(param_obj, "param")),
        rows(shape.size() == 1 ? 1 : shape[0]),
        cols(shape.back()),
        param(checked<T>(param_obj, "param", shape, true)),
        grad(checked<T>(grad_obj, "grad", shape)) {}

  T* state(const py::object& obj, const char* name) const { return checked<T>(obj, name, shape, true); }

  // The momentum buffer: may be None only when momentum is 0.
  T* momentum_buffer(const py::object& obj, double momentum) const {
    if (!obj.is_none()) return state(obj, "momentum_buffer");
    if (momentum != 0.0) throw py::value_error("momentum_buffer: required when momentum != 0");
    return nullptr;
  }
};

// The rows a lazy update touches: a 1-D int64 array of strictly increasing indices into the
// parameter's rows (a vector's elements count as rows of one).
struct OnlyRows {
  const ksae::LatentIndex* data = nullptr;
  Index size = 0;
  OnlyRows(const py::object& obj, Index n_rows) {
    if (obj.is_none()) return;
    if (!py::isinstance<py::array_t<ksae::LatentIndex>>(obj)) {
      throw py::type_error("rows: expected a 1-D int64 array or None, got " +
                           std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() != 1) throw py::value_error("rows: expected a 1-D array");
    size = static_cast<Index>(arr.shape(0));
    data = checked<ksae::LatentIndex>(obj, "rows", {size});
    for (Index i = 0; i < size; ++i) {
      if (data[i] < 0 || data[i] >= n_rows || (i > 0 && data[i] <= data[i - 1])) {
        throw py::value_error("rows: expected strictly increasing indices in [0, " +
                              std::to_string(n_rows) + "), got " + std::to_string(data[i]) +
                              " at position " + std::to_string(i));
      }
    }
  }
};

template <class T>
void adam_impl(const py::object& param, const py::object& grad, const py::object& m,
               const py::object& v, const ksae::AdamSettings& s, bool unit_norm_rows,
               int n_threads, const py::object& rows) {
  const OptimizerArrays<T> a(param, grad);
  T* mm = a.state(m, "exp_avg");
  T* vv = a.state(v, "exp_avg_sq");
  const bool vector = a.shape.size() == 1;
  const Index n_rows = vector ? a.cols : a.rows, n_cols = vector ? 1 : a.cols;
  const OnlyRows only(rows, n_rows);
  if (vector && unit_norm_rows && !rows.is_none()) {
    throw py::value_error("unit_norm_rows: a vector has no rows to normalise");
  }
  py::gil_scoped_release release;
  if (rows.is_none()) {
    ksae::adam_update<T>(a.param, a.grad, mm, vv, a.rows, a.cols, s, unit_norm_rows, n_threads);
  } else {
    ksae::adam_update<T>(a.param, a.grad, mm, vv, n_rows, n_cols, s, unit_norm_rows, n_threads,
                         only.data, only.size);
  }
}

template <class T>
void sgd_impl(const py::object& param, const py::object& grad, const py::object& buf,
              const ksae::SgdSettings& s, bool unit_norm_rows, int n_threads) {
  const OptimizerArrays<T> a(param, grad);
  T* b = a.momentum_buffer(buf, s.momentum);
  py::gil_scoped_release release;
  ksae::sgd_update<T>(a.param, a.grad, b, a.rows, a.cols, s, unit_norm_rows, n_threads);
}

template <class T>
void rmsprop_impl(const py::object& param, const py::object& grad, const py::object& square_avg,
                  const py::object& buf, const ksae::RmspropSettings& s, bool unit_norm_rows,
                  int n_threads) {
  const OptimizerArrays<T> a(param, grad);
  T* sq = a.state(square_avg, "square_avg");
  T* b = a.momentum_buffer(buf, s.momentum);
  py::gil_scoped_release release;
  ksae::rmsprop_update<T>(a.param, a.grad, sq, b, a.rows, a.cols, s, unit_norm_rows, n_threads);
}

void check_rmsprop(const ksae::RmspropSettings& s) {
  if (!(s.lr >= 0)) throw py::value_error("lr: expected a value >= 0, got " + std::to_string(s.lr));
  if (!(s.alpha >= 0 && s.alpha < 1)) throw py::value_error("alpha: expected 0 <= alpha < 1");
  if (!(s.eps > 0)) throw py::value_error("eps: expected a value > 0");
  if (!(s.momentum >= 0 && s.momentum < 1)) {
    throw py::value_error("momentum: expected 0 <= momentum < 1");
  }
  if (!(s.weight_decay >= 0)) throw py::value_error("weight_decay: expected a value >= 0");
}

}  // namespace

void bind_optimizers(py::module_& m) {
  m.def(
      "adam_update",
      [](const py::object& param, const py::object& grad, const py::object& exp_avg,
         const py::object& exp_avg_sq, double lr, double beta1, double beta2, double eps,
         double weight_decay, long long step, bool unit_norm_rows, int n_threads,
         const py::object& rows) {
        const ksae::AdamSettings s{lr, beta1, beta2, eps, weight_decay, step};
        check_adam(s);
        if (is_float32(param)) adam_impl<float>(param, grad, exp_avg, exp_avg_sq, s, unit_norm_rows, n_threads, rows);
        else adam_impl<double>(param, grad, exp_avg, exp_avg_sq, s, unit_norm_rows, n_threads, rows);
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("step"), py::arg("unit_norm_rows") = false,
      py::arg("n_threads") = 0, py::arg("rows") = py::none(),
      "One fused Adam/AdamW update in place (PyTorch's formulation); `step` counts from 1.\n"
      "With `rows` (strictly increasing int64 indices), only those rows (elements of a vector)\n"
      "are updated; the rest, moments included, are left as they are (lazy Adam).");

  m.def(
      "sgd_update",
      [](const py::object& param, const py::object& grad, const py::object& momentum_buffer,
         double lr, double momentum, bool nesterov, double weight_decay, bool unit_norm_rows,
         int n_threads) {
        if (!(lr >= 0)) throw py::value_error("lr: expected a value >= 0");
        const ksae::SgdSettings s{lr, momentum, weight_decay, nesterov};
        if (is_float32(param)) sgd_impl<float>(param, grad, momentum_buffer, s, unit_norm_rows, n_threads);
        else sgd_impl<double>(param, grad, momentum_buffer, s, unit_norm_rows, n_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("lr"),
      py::arg("momentum"), py::arg("nesterov"), py::arg("weight_decay"),
      py::arg("unit_norm_rows") = false, py::arg("n_threads") = 0,
      "One fused SGD (momentum, Nesterov) update in place (PyTorch's formulation).");

  m.def(
      "rmsprop_update",
      [](const py::object& param, const py::object& grad, const py::object& square_avg,
         const py::object& momentum_buffer, double lr, double alpha, double eps, double momentum,
         double weight_decay, bool unit_norm_rows, int n_threads) {
        const ksae::RmspropSettings s{lr, alpha, eps, momentum, weight_decay};
        check_rmsprop(s);
        if (is_float32(param)) {
          rmsprop_impl<float>(param, grad, square_avg, momentum_buffer, s, unit_norm_rows, n_threads);
        } else {
          rmsprop_impl<double>(param, grad, square_avg, momentum_buffer, s, unit_norm_rows, n_threads);
        }
      },
      py::arg("param"), py::arg("grad"), py::arg("square_avg"), py::arg("momentum_buffer"),
      py::arg("lr"), py::arg("alpha"), py::arg("eps"), py::arg("momentum"),
      py::arg("weight_decay"), py::arg("unit_norm_rows") = false, py::arg("n_threads") = 0,
      "One fused RMSprop update in place (PyTorch's formulation, not centered; weight_decay is\n"
      "an L2 term added to the gradient). momentum_buffer may be None when momentum == 0.");
}

}  // namespace ksae::bindings
