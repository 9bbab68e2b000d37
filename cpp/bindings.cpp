// The only pybind11 file: checks every array (dtype, shape, layout), releases the GIL and calls
// a kernel from cpp/ksae. It holds no model logic and makes no copies: a wrongly typed or
// non-contiguous array is an error, never silently converted.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ksae/backward.hpp"
#include "ksae/diagnostics.hpp"
#include "ksae/encode.hpp"
#include "ksae/optim.hpp"
#include "ksae/rows.hpp"

namespace py = pybind11;
using ksae::Index;
using ksae::LatentIndex;

namespace {

constexpr Index kAny = -1;

std::string shape_str(const std::vector<Index>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s << ", ";
    if (shape[i] == kAny) s << "*"; else s << shape[i];
  }
  if (shape.size() == 1) s << ",";
  s << ")";
  return s.str();
}

template <class T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<double>() { return "float64"; }
template <> const char* dtype_name<LatentIndex>() { return "int64"; }
template <> const char* dtype_name<bool>() { return "bool"; }

// Throws TypeError naming `name` unless `obj` is a numpy array.
void require_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy array, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
}

// Returns the data pointer of `obj` after checking that it is a C-contiguous array of T with
// the expected shape (kAny matches any extent). Throws TypeError/ValueError naming `name`.
template <class T>
T* checked(const py::handle& obj, const char* name, const std::vector<Index>& shape,
           bool writable = false) {
  require_array(obj, name);
  auto arr = py::reinterpret_borrow<py::array>(obj);
  std::vector<Index> actual(arr.shape(), arr.shape() + arr.ndim());
  auto describe = [&]() {
    return std::string(name) + ": expected a C-contiguous " + dtype_name<T>() + " array of shape " +
           shape_str(shape) + ", got a " + std::string(py::str(arr.dtype())) + " array of shape " +
           shape_str(actual);
  };
  if (!py::isinstance<py::array_t<T>>(arr)) throw py::type_error(describe());
  bool ok = actual.size() == shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] == kAny || shape[i] == actual[i];
  if (!ok) throw py::value_error(describe());
  if (!(arr.flags() & py::array::c_style)) throw py::value_error(describe() + " (not C-contiguous)");
  if (writable && !arr.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

Index dim(const py::handle& obj, int axis) {
  return py::reinterpret_borrow<py::array>(obj).shape(axis);
}

void check_2d(const py::handle& obj, const char* name) {
  require_array(obj, name);
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.ndim() != 2) {
    throw py::value_error(std::string(name) + ": expected a 2-D array, got " +
                          std::to_string(arr.ndim()) + "-D");
  }
}

const std::vector<std::pair<std::string, ksae::Activation>>& activation_names() {
  static const std::vector<std::pair<std::string, ksae::Activation>> names = {
      {"relu", ksae::Activation::relu},         {"linear", ksae::Activation::linear},
      {"sigmoid", ksae::Activation::sigmoid},   {"tanh", ksae::Activation::tanh},
      {"leaky_relu", ksae::Activation::leaky_relu}, {"elu", ksae::Activation::elu},
      {"swish", ksae::Activation::swish},       {"gelu", ksae::Activation::gelu},
      {"softmax", ksae::Activation::softmax}};
  return names;
}

ksae::Activation parse_activation(const std::string& name) {
  std::string known;
  for (const auto& [key, act] : activation_names()) {
    if (key == name) return act;
    known += (known.empty() ? "'" : ", '") + key + "'";
  }
  throw py::value_error("activation: expected one of " + known + ", got '" + name + "'");
}

// The optional (batch, k) buffer for the kept pre-activations, or null.
template <class T>
T* optional_buffer(const py::object& obj, const char* name, Index batch, Index k, bool writable) {
  return obj.is_none() ? nullptr : checked<T>(obj, name, {batch, k}, writable);
}

void check_k(Index k, Index n_latents) {
  if (k < 1 || k > n_latents) {
    throw py::value_error("k: expected 1 <= k <= n_latents = " + std::to_string(n_latents) +
                          ", got " + std::to_string(k));
  }
}

void check_indices(const LatentIndex* idx, Index count, Index k, Index n_latents) {
  for (Index p = 0; p < count; ++p) {
    if (idx[p] < 0 || idx[p] >= n_latents) {
      throw py::value_error("indices: entry (" + std::to_string(p / k) + ", " +
                            std::to_string(p % k) + ") = " + std::to_string(idx[p]) +
                            " is outside [0, " + std::to_string(n_latents) + ")");
    }
  }
}

bool is_float32(const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) return false;
  return py::isinstance<py::array_t<float>>(obj);
}

// A code being returned to Python: (values, indices), both (batch, k), allocated before the
// GIL is released so the kernel writes straight into them.
template <class T>
struct CodeArrays {
  py::array_t<T> values;
  py::array_t<LatentIndex> indices;
  T* values_ptr;
  LatentIndex* indices_ptr;
  CodeArrays(Index batch, Index k)
      : values({batch, k}), indices({batch, k}), values_ptr(values.mutable_data()),
        indices_ptr(indices.mutable_data()) {}
  py::tuple tuple() const { return py::make_tuple(values, indices); }
};

// An encode's arguments, checked: a batch X (batch x d) for W_enc_t (n x d, checked by the
// caller as it needs it), k latents kept per row, the activation's name.
template <class T>
struct EncodeArgs {
  Index n, d, batch;
  ksae::Activation act;
  const T* x;

  EncodeArgs(const py::object& X, const py::object& W_enc_t, Index k,
             const std::string& activation) {
    check_2d(W_enc_t, "W_enc_t");
    check_2d(X, "X");
    n = dim(W_enc_t, 0), d = dim(W_enc_t, 1), batch = dim(X, 0);
    act = parse_activation(activation);
    check_k(k, n);
    x = checked<T>(X, "X", {kAny, d});
  }
};

template <class T>
py::tuple encode_impl(const py::object& X, const py::object& W_enc_t, const py::object& b_enc,
                      const py::object& b_dec, Index k, const std::string& activation,
                      int n_threads, const py::object& centered, const py::object& pre,
                      const py::object& selected_pre) {
  const EncodeArgs<T> a(X, W_enc_t, k, activation);
  const Index n = a.n, d = a.d, batch = a.batch;
  const auto act = a.act;
  const T* x = a.x;
  const T* w = checked<T>(W_enc_t, "W_enc_t", {n, d});
  const T* be = checked<T>(b_enc, "b_enc", {n});
  const T* bd = checked<T>(b_dec, "b_dec", {d});
  py::array_t<T> centered_arr;
  T* c = centered.is_none()
             ? (centered_arr = py::array_t<T>({batch, d})).mutable_data()
             : checked<T>(centered, "centered", {batch, d}, true);
  // Without `pre` the kernel selects tile by tile and no (batch, n_latents) array exists.
  T* p = pre.is_none() ? nullptr : checked<T>(pre, "pre", {batch, n}, true);
  T* sp = optional_buffer<T>(selected_pre, "selected_pre", batch, k, true);
  CodeArrays<T> code(batch, k);
  {
    py::gil_scoped_release release;
    ksae::encode_topk<T>(x, batch, d, w, be, bd, n, k, act, n_threads, c, p, code.values_ptr,
                         code.indices_ptr, sp);
  }
  return code.tuple();
}

// decode's and decode_mse's arguments, checked: a code (values, indices: batch x k) of a
// dictionary W_dec (n x d) with its bias b_dec (d).
template <class T>
struct DecodeArgs {
  Index n, d, batch, k;
  const T* values;
  const LatentIndex* indices;
  const T* W_dec;
  const T* b_dec;

  DecodeArgs(const py::object& v, const py::object& ix, const py::object& wd,
             const py::object& bd) {
    check_2d(wd, "W_dec");
    check_2d(v, "values");
    n = dim(wd, 0), d = dim(wd, 1), batch = dim(v, 0), k = dim(v, 1);
    values = checked<T>(v, "values", {batch, k});
    indices = checked<LatentIndex>(ix, "indices", {batch, k});
    W_dec = checked<T>(wd, "W_dec", {n, d});
    b_dec = checked<T>(bd, "b_dec", {d});
    check_indices(indices, batch * k, k, n);
  }
};

// The output buffer `given` (checked: rows x cols, writable), or a new array when it is None.
template <class T>
py::array_t<T> output_array(const py::object& given, const char* name, Index rows, Index cols) {
  if (given.is_none()) return py::array_t<T>({rows, cols});
  checked<T>(given, name, {rows, cols}, true);
  return py::reinterpret_borrow<py::array_t<T>>(given);
}

// Throws ValueError naming `name` when the `count`-element buffer `out` overlaps `in` (named
// `in_name`, `in_count` elements; as many as `out` by default), which is read while `out` is
// written.
template <class T>
void require_apart(const T* out, const T* in, Index count, const char* name,
                   const char* in_name = "X", Index in_count = -1) {
  if (in_count < 0) in_count = count;
  const auto a = reinterpret_cast<std::uintptr_t>(out), b = reinterpret_cast<std::uintptr_t>(in);
  if (count > 0 && in_count > 0 && a < b + std::uintptr_t(in_count) * sizeof(T) &&
      b < a + std::uintptr_t(count) * sizeof(T)) {
    throw py::value_error(std::string(name) + ": must not overlap " + in_name + " (" + in_name +
                          " is read while " + name + " is written)");
  }
}

// mark_fired's update, on checked arrays: counts (n) grow by n_samples, then the latent of
// each of the `entries` code entries whose value is above `bar` (non-zero without a
// threshold) is set to 0.
template <class T>
void advance_counts(LatentIndex* counts, Index n, const T* values, const LatentIndex* indices,
                    Index entries, Index n_samples, bool threshold, T bar) {
  for (Index j = 0; j < n; ++j) counts[j] += n_samples;
  for (Index p = 0; p < entries; ++p) {
    if (threshold ? values[p] > bar : values[p] != T(0)) counts[indices[p]] = 0;
  }
}

template <class T>
py::array decode_impl(const py::object& values, const py::object& indices,
                      const py::object& W_dec, const py::object& b_dec, int n_threads,
                      const py::object& out) {
  const DecodeArgs<T> a(values, indices, W_dec, b_dec);
  py::array_t<T> out_arr = output_array<T>(out, "out", a.batch, a.d);
  T* o = out_arr.mutable_data();
  {
    py::gil_scoped_release release;
    ksae::decode_sparse<T>(a.values, a.indices, a.batch, a.k, a.W_dec, a.b_dec, a.d, a.n,
                           n_threads, o);
  }
  return out_arr;
}

template <class T>
py::tuple decode_mse_impl(const py::object& values, const py::object& indices,
                          const py::object& W_dec, const py::object& b_dec, const py::object& X,
                          int n_threads, const py::object& grad_out) {
  const DecodeArgs<T> a(values, indices, W_dec, b_dec);
  const T* x = checked<T>(X, "X", {a.batch, a.d});
  py::array_t<T> g = output_array<T>(grad_out, "grad_out", a.batch, a.d);
  T* gp = g.mutable_data();
  require_apart(gp, x, a.batch * a.d, "grad_out");
  double loss;
  {
    py::gil_scoped_release release;
    loss = ksae::decode_mse<T>(a.values, a.indices, a.batch, a.k, a.W_dec, a.b_dec, x, a.d, a.n,
                               n_threads, gp);
  }
  return py::make_tuple(loss, g);
}

// backward's arguments as checked pointers: shapes, dtypes, and the optional code buffers.
template <class T>
struct BackwardArgs {
  Index n, d_in, d_out, batch, k;
  ksae::Activation act;
  const T* grad_out;
  const T* centered;
  const T* values;
  const LatentIndex* indices;
  const T* W_enc_t;
  const T* W_dec;
  const T* selected_pre;
  const T* grad_values;
  T* grad_values_out;

  BackwardArgs(const py::object& go, const py::object& c, const py::object& v,
               const py::object& ix, const py::object& we, const py::object& wd,
               const std::string& activation, const py::object& sp, const py::object& gv,
               const py::object& gvo) {
    check_2d(we, "W_enc_t");
    check_2d(wd, "W_dec");
    check_2d(v, "values");
    n = dim(we, 0), d_in = dim(we, 1), d_out = dim(wd, 1);
    batch = dim(v, 0), k = dim(v, 1);
    act = parse_activation(activation);
    grad_out = checked<T>(go, "grad_out", {batch, d_out});
    centered = checked<T>(c, "centered", {batch, d_in});
    values = checked<T>(v, "values", {batch, k});
    indices = checked<LatentIndex>(ix, "indices", {batch, k});
    W_enc_t = checked<T>(we, "W_enc_t", {n, d_in});
    W_dec = checked<T>(wd, "W_dec", {n, d_out});
    selected_pre = optional_buffer<T>(sp, "selected_pre", batch, k, false);
    if (selected_pre == nullptr && ksae::derivative_needs_pre(act)) {
      throw py::value_error("selected_pre: the " + activation + " derivative needs the kept "
                            "pre-activations (pass the array encode filled)");
    }
    grad_values = optional_buffer<T>(gv, "grad_values", batch, k, false);
    grad_values_out = optional_buffer<T>(gvo, "grad_values_out", batch, k, true);
    check_indices(indices, batch * k, k, n);
  }

  // b_dec's gradient needs d_out == d_in; `what` names the argument, `hint` the way out.
  void require_square(const char* what, const char* hint) const {
    if (d_out != d_in) {
      throw py::value_error(std::string(what) + ": b_dec is both the input centering and the "
                            "output bias, which needs W_dec's width (" + std::to_string(d_out) +
                            ") to equal W_enc_t's (" + std::to_string(d_in) + ")" + hint);
    }
  }
};

template <class T>
void backward_impl(const py::object& grad_out, const py::object& centered,
                   const py::object& values, const py::object& indices,
                   const py::object& W_enc_t, const py::object& W_dec,
                   const std::string& activation, bool project_decoder_grad, int n_threads,
                   const py::object& grad_W_enc_t, const py::object& grad_b_enc,
                   const py::object& grad_W_dec, const py::object& grad_b_dec, bool accumulate,
                   const py::object& selected_pre, const py::object& grad_values,
                   const py::object& grad_values_out) {
  const BackwardArgs<T> a(grad_out, centered, values, indices, W_enc_t, W_dec, activation,
                          selected_pre, grad_values, grad_values_out);
  T* gwe = checked<T>(grad_W_enc_t, "grad_W_enc_t", {a.n, a.d_in}, true);
  T* gbe = checked<T>(grad_b_enc, "grad_b_enc", {a.n}, true);
  T* gwd = checked<T>(grad_W_dec, "grad_W_dec", {a.n, a.d_out}, true);
  T* gbd = nullptr;
  if (!grad_b_dec.is_none()) {
    a.require_square("grad_b_dec", "; pass None to leave the centering untrained");
    gbd = checked<T>(grad_b_dec, "grad_b_dec", {a.d_in}, true);
  }
  py::gil_scoped_release release;
  ksae::backward_topk<T>(a.grad_out, a.centered, a.values, a.indices, a.batch, a.k, a.W_enc_t,
                         a.W_dec, a.n, a.d_in, a.d_out, a.act, project_decoder_grad, n_threads,
                         gwe, gbe, gwd, gbd, accumulate, a.selected_pre, a.grad_values,
                         a.grad_values_out, nullptr);
}

// The four parameters' Adam moments, in the order W_enc_t, b_enc, W_dec, b_dec.
constexpr const char* kParameterNames[4] = {"W_enc_t", "b_enc", "W_dec", "b_dec"};

// The fused Adam update of the four parameters (already checked, with their shapes), its
// moments checked against those shapes.
template <class T>
ksae::FusedAdam<T> fused_adam(T* const (&params)[4], const std::vector<Index> (&shapes)[4],
                              const py::sequence& exp_avg, const py::sequence& exp_avg_sq,
                              const ksae::AdamSettings& s, bool unit_norm_decoder) {
  if (py::len(exp_avg) != 4 || py::len(exp_avg_sq) != 4) {
    throw py::value_error("exp_avg, exp_avg_sq: expected 4 arrays each (W_enc_t, b_enc, W_dec, "
                          "b_dec), got " + std::to_string(py::len(exp_avg)) + " and " +
                          std::to_string(py::len(exp_avg_sq)));
  }
  ksae::FusedAdam<T> adam{params[0], params[1], params[2], params[3], {}, {},
                          ksae::AdamCoefficients<T>(s), unit_norm_decoder};
  for (int i = 0; i < 4; ++i) {
    const std::string name = kParameterNames[i];
    adam.m[i] = checked<T>(exp_avg[i], ("exp_avg[" + name + "]").c_str(), shapes[i], true);
    adam.v[i] = checked<T>(exp_avg_sq[i], ("exp_avg_sq[" + name + "]").c_str(), shapes[i], true);
  }
  return adam;
}

template <class T>
void backward_adam_impl(const py::object& grad_out, const py::object& centered,
                        const py::object& values, const py::object& indices,
                        const py::object& W_enc_t, const py::object& b_enc,
                        const py::object& W_dec, const py::object& b_dec,
                        const py::sequence& exp_avg, const py::sequence& exp_avg_sq,
                        const py::object& grad_b_enc, const py::object& grad_b_dec,
                        const std::string& activation, bool project_decoder_grad,
                        bool unit_norm_decoder, int n_threads, const ksae::AdamSettings& s,
                        const py::object& selected_pre, const py::object& grad_values,
                        const py::object& grad_values_out) {
  const BackwardArgs<T> a(grad_out, centered, values, indices, W_enc_t, W_dec, activation,
                          selected_pre, grad_values, grad_values_out);
  a.require_square("backward_adam", "; use backward for a classifier head");
  const std::vector<Index> shapes[4] = {{a.n, a.d_in}, {a.n}, {a.n, a.d_out}, {a.d_in}};
  T* params[4] = {checked<T>(W_enc_t, "W_enc_t", shapes[0], true),
                  checked<T>(b_enc, "b_enc", shapes[1], true),
                  checked<T>(W_dec, "W_dec", shapes[2], true),
                  checked<T>(b_dec, "b_dec", shapes[3], true)};
  const ksae::FusedAdam<T> adam =
      fused_adam<T>(params, shapes, exp_avg, exp_avg_sq, s, unit_norm_decoder);
  T* gbe = checked<T>(grad_b_enc, "grad_b_enc", {a.n}, true);
  T* gbd = checked<T>(grad_b_dec, "grad_b_dec", {a.d_in}, true);
  py::gil_scoped_release release;
  ksae::backward_topk<T>(a.grad_out, a.centered, a.values, a.indices, a.batch, a.k, a.W_enc_t,
                         a.W_dec, a.n, a.d_in, a.d_out, a.act, project_decoder_grad, n_threads,
                         nullptr, gbe, nullptr, gbd, false, a.selected_pre, a.grad_values,
                         a.grad_values_out, &adam);
}

// A whole TopK training step with Adam in one call (model.py's default step): encode,
// decode_mse, and, when the loss is finite, backward_adam and mark_fired, with the GIL
// released throughout: the four calls from Python cost 38-62 us more a step at
// (256, 784, 1000, 25), alternated in one process. Returns (loss, values, indices); when
// the loss is not finite, only the scratch buffers (centered, grad_out, selected_pre) have
// been written.
template <class T>
py::tuple train_step_adam_impl(const py::object& X, const py::object& W_enc_t,
                               const py::object& b_enc, const py::object& W_dec,
                               const py::object& b_dec, const py::sequence& exp_avg,
                               const py::sequence& exp_avg_sq, const py::object& grad_b_enc,
                               const py::object& grad_b_dec, const py::object& counts, Index k,
                               const std::string& activation, bool normalize_decoder,
                               int n_threads, const ksae::AdamSettings& s,
                               const py::object& centered, const py::object& grad_out,
                               const py::object& selected_pre) {
  const EncodeArgs<T> a(X, W_enc_t, k, activation);
  const Index n = a.n, d = a.d, batch = a.batch;
  const auto act = a.act;
  const T* x = a.x;
  const std::vector<Index> shapes[4] = {{n, d}, {n}, {n, d}, {d}};
  T* params[4] = {checked<T>(W_enc_t, "W_enc_t", shapes[0], true),
                  checked<T>(b_enc, "b_enc", shapes[1], true),
                  checked<T>(W_dec, "W_dec", shapes[2], true),
                  checked<T>(b_dec, "b_dec", shapes[3], true)};
  const ksae::FusedAdam<T> adam =
      fused_adam<T>(params, shapes, exp_avg, exp_avg_sq, s, normalize_decoder);
  T* gbe = checked<T>(grad_b_enc, "grad_b_enc", {n}, true);
  T* gbd = checked<T>(grad_b_dec, "grad_b_dec", {d}, true);
  LatentIndex* fired = checked<LatentIndex>(counts, "counts", {n}, true);
  T* c = checked<T>(centered, "centered", {batch, d}, true);
  T* go = checked<T>(grad_out, "grad_out", {batch, d}, true);
  require_apart(c, x, batch * d, "centered");
  require_apart(go, x, batch * d, "grad_out");
  require_apart(go, c, batch * d, "grad_out", "centered");
  T* sp = optional_buffer<T>(selected_pre, "selected_pre", batch, k, true);
  if (sp == nullptr && ksae::derivative_needs_pre(act)) {
    throw py::value_error("selected_pre: the " + activation + " derivative needs room for the "
                          "kept pre-activations");
  }
  CodeArrays<T> code(batch, k);
  double loss;
  {
    py::gil_scoped_release release;
    ksae::encode_topk<T>(x, batch, d, params[0], params[1], params[3], n, k, act, n_threads, c,
                         nullptr, code.values_ptr, code.indices_ptr, sp);
    loss = ksae::decode_mse<T>(code.values_ptr, code.indices_ptr, batch, k, params[2], params[3],
                               x, d, n, n_threads, go);
    if (std::isfinite(loss)) {
      ksae::backward_topk<T>(go, c, code.values_ptr, code.indices_ptr, batch, k, params[0],
                             params[2], n, d, d, act, normalize_decoder, n_threads, nullptr, gbe,
                             nullptr, gbd, false, sp, nullptr, nullptr, &adam);
      advance_counts(fired, n, code.values_ptr, code.indices_ptr, batch * k, batch, false, T(0));
    }
  }
  return py::make_tuple(loss, code.values, code.indices);
}

template <class T>
py::tuple select_impl(const py::object& pre, const py::object& bias, Index k,
                      const std::string& activation, int n_threads,
                      const py::object& selected_pre) {
  check_2d(pre, "pre");
  const Index batch = dim(pre, 0), n = dim(pre, 1);
  const auto act = parse_activation(activation);
  check_k(k, n);
  const T* p = checked<T>(pre, "pre", {batch, n});
  const T* b = checked<T>(bias, "bias", {n});
  T* sp = optional_buffer<T>(selected_pre, "selected_pre", batch, k, true);
  CodeArrays<T> code(batch, k);
  {
    py::gil_scoped_release release;
    ksae::select_topk<T>(p, b, batch, n, k, act, n_threads, code.values_ptr, code.indices_ptr, sp);
  }
  return code.tuple();
}

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
  advance_counts(c, n, v, idx, batch * k, n_samples, threshold, bar);
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

// The selection's counting primitives (topk.hpp), bound for the tests: their results are
// bounds and orders the encode relies on, and a looser bound or a wrong rank there would
// only cost time or reorder ties, which the encode's own tests need not notice.
template <class T>
void require_no_nan(const T* v, Index n, const char* name) {
  if (std::any_of(v, v + n, [](T x) { return std::isnan(x); })) {
    throw py::value_error(std::string(name) + ": expected no NaN");
  }
}

template <class T>
double kth_largest_impl(const py::object& values, Index k) {
  const T* v = checked<T>(values, "values", {kAny});
  const Index n = dim(values, 0);
  if (k < 1 || k > n) {
    throw py::value_error("k: expected 1 <= k <= " + std::to_string(n) + ", got " + std::to_string(k));
  }
  require_no_nan(v, n, "values");
  std::vector<T> order(static_cast<size_t>(n));
  return double(ksae::kth_largest(v, n, k, order.data()));
}

template <class T>
py::object rank_top_k_impl(const py::object& keys, const py::object& indices, Index k) {
  const T* key = checked<T>(keys, "keys", {kAny});
  const Index m = dim(keys, 0);
  const LatentIndex* index = checked<LatentIndex>(indices, "indices", {m});
  if (k < 1 || k > m) {
    throw py::value_error("k: expected 1 <= k <= " + std::to_string(m) + ", got " + std::to_string(k));
  }
  require_no_nan(key, m, "keys");
  std::vector<LatentIndex> sorted(index, index + m);
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    throw py::value_error("indices: expected distinct values");
  }
  std::vector<Index> out(static_cast<size_t>(k));
  if (!ksae::rank_top_k(key, index, m, k, out.data())) return py::none();
  py::array_t<LatentIndex> result(k);
  std::copy(out.begin(), out.end(), result.mutable_data());
  return std::move(result);
}

void check_adam(const ksae::AdamSettings& s) {
  if (!(s.lr >= 0)) throw py::value_error("lr: expected a value >= 0, got " + std::to_string(s.lr));
  if (!(s.beta1 >= 0 && s.beta1 < 1)) throw py::value_error("beta1: expected 0 <= beta1 < 1");
  if (!(s.beta2 >= 0 && s.beta2 < 1)) throw py::value_error("beta2: expected 0 <= beta2 < 1");
  if (!(s.eps > 0)) throw py::value_error("eps: expected a value > 0");
  if (s.step < 1) throw py::value_error("step: expected an update count >= 1");
}

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
    return info;
  });

  m.def(
      "encode",
      [](const py::object& X, const py::object& W_enc_t, const py::object& b_enc,
         const py::object& b_dec, Index k, const std::string& activation, int n_threads,
         const py::object& centered, const py::object& pre, const py::object& selected_pre) {
        return is_float32(X) ? encode_impl<float>(X, W_enc_t, b_enc, b_dec, k, activation,
                                                  n_threads, centered, pre, selected_pre)
                             : encode_impl<double>(X, W_enc_t, b_enc, b_dec, k, activation,
                                                   n_threads, centered, pre, selected_pre);
      },
      py::arg("X"), py::arg("W_enc_t"), py::arg("b_enc"), py::arg("b_dec"), py::arg("k"),
      py::arg("activation") = "relu", py::arg("n_threads") = 0,
      py::arg("centered") = py::none(), py::arg("pre") = py::none(),
      py::arg("selected_pre") = py::none(),
      "TopK encode: (values, indices) of the k largest entries per row of\n"
      "(X - b_dec) @ W_enc_t.T + b_enc, values passed through the activation, ordered by\n"
      "decreasing pre-activation (the lower index first on ties). `centered` (batch x d_in)\n"
      "receives X - b_dec (allocated when None). `pre` (batch x n_latents), if given,\n"
      "receives the pre-activations without b_enc (for a second selection, as AuxK makes);\n"
      "when None the selection is fused with the product, tile by tile, and no batch x\n"
      "n_latents array is made. Both give the same result, bit for bit. `selected_pre`\n"
      "(batch x k), if given, receives the kept pre-activations.");

  m.def(
      "decode",
      [](const py::object& values, const py::object& indices, const py::object& W_dec,
         const py::object& b_dec, int n_threads, const py::object& out) {
        return is_float32(values) ? decode_impl<float>(values, indices, W_dec, b_dec, n_threads, out)
                                  : decode_impl<double>(values, indices, W_dec, b_dec, n_threads, out);
      },
      py::arg("values"), py::arg("indices"), py::arg("W_dec"), py::arg("b_dec"),
      py::arg("n_threads") = 0, py::arg("out") = py::none(),
      "Sparse decode: dense(values, indices) @ W_dec + b_dec at batch*k*d_in cost.");

  m.def(
      "decode_mse",
      [](const py::object& values, const py::object& indices, const py::object& W_dec,
         const py::object& b_dec, const py::object& X, int n_threads,
         const py::object& grad_out) {
        return is_float32(values)
                   ? decode_mse_impl<float>(values, indices, W_dec, b_dec, X, n_threads, grad_out)
                   : decode_mse_impl<double>(values, indices, W_dec, b_dec, X, n_threads, grad_out);
      },
      py::arg("values"), py::arg("indices"), py::arg("W_dec"), py::arg("b_dec"), py::arg("X"),
      py::arg("n_threads") = 0, py::arg("grad_out") = py::none(),
      "decode and the mean squared error against X: returns (loss, grad_out) with\n"
      "loss = mean((X_hat - X)**2) and grad_out = 2 (X_hat - X) / X.size (rounded as NumPy\n"
      "rounds it), X_hat bitwise what decode returns. grad_out may be given as an output\n"
      "buffer.");

  m.def(
      "backward",
      [](const py::object& grad_out, const py::object& centered, const py::object& values,
         const py::object& indices, const py::object& W_enc_t, const py::object& W_dec,
         const std::string& activation, bool project_decoder_grad, int n_threads,
         const py::object& gwe, const py::object& gbe, const py::object& gwd,
         const py::object& gbd, bool accumulate, const py::object& selected_pre,
         const py::object& grad_values, const py::object& grad_values_out) {
        if (is_float32(values)) {
          backward_impl<float>(grad_out, centered, values, indices, W_enc_t, W_dec, activation,
                               project_decoder_grad, n_threads, gwe, gbe, gwd, gbd, accumulate,
                               selected_pre, grad_values, grad_values_out);
        } else {
          backward_impl<double>(grad_out, centered, values, indices, W_enc_t, W_dec, activation,
                                project_decoder_grad, n_threads, gwe, gbe, gwd, gbd, accumulate,
                                selected_pre, grad_values, grad_values_out);
        }
      },
      py::arg("grad_out"), py::arg("centered"), py::arg("values"), py::arg("indices"),
      py::arg("W_enc_t"), py::arg("W_dec"), py::arg("activation"),
      py::arg("project_decoder_grad"), py::arg("n_threads"), py::arg("grad_W_enc_t"),
      py::arg("grad_b_enc"), py::arg("grad_W_dec"), py::arg("grad_b_dec"),
      py::arg("accumulate") = false, py::arg("selected_pre") = py::none(),
      py::arg("grad_values") = py::none(), py::arg("grad_values_out") = py::none(),
      "TopK backward: writes (or, with accumulate, adds) the gradients of W_enc (transposed),\n"
      "b_enc, W_dec and b_dec given grad_out = dL/dX_hat, touching only the selected entries.\n"
      "grad_values (batch x k) adds a penalty's gradient with respect to the code values;\n"
      "grad_values_out (batch x k) receives the whole gradient with respect to them. W_dec may\n"
      "be (n_latents x d_out) with d_out != d_in (a classifier head) when grad_b_dec is None\n"
      "(the input centering is then not trained).");

  m.def(
      "backward_adam",
      [](const py::object& grad_out, const py::object& centered, const py::object& values,
         const py::object& indices, const py::object& W_enc_t, const py::object& b_enc,
         const py::object& W_dec, const py::object& b_dec, const py::sequence& exp_avg,
         const py::sequence& exp_avg_sq, const py::object& grad_b_enc,
         const py::object& grad_b_dec, const std::string& activation,
         bool project_decoder_grad, bool unit_norm_decoder, int n_threads, double lr,
         double beta1, double beta2, double eps, double weight_decay, long long step,
         const py::object& selected_pre, const py::object& grad_values,
         const py::object& grad_values_out) {
        const ksae::AdamSettings s{lr, beta1, beta2, eps, weight_decay, step};
        check_adam(s);
        auto run = [&](auto zero) {
          using T = decltype(zero);
          backward_adam_impl<T>(grad_out, centered, values, indices, W_enc_t, b_enc, W_dec,
                                b_dec, exp_avg, exp_avg_sq, grad_b_enc, grad_b_dec, activation,
                                project_decoder_grad, unit_norm_decoder, n_threads, s,
                                selected_pre, grad_values, grad_values_out);
        };
        if (is_float32(values)) run(0.0f);
        else run(0.0);
      },
      py::arg("grad_out"), py::arg("centered"), py::arg("values"), py::arg("indices"),
      py::arg("W_enc_t"), py::arg("b_enc"), py::arg("W_dec"), py::arg("b_dec"),
      py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad_b_enc"), py::arg("grad_b_dec"),
      py::arg("activation"), py::arg("project_decoder_grad"), py::arg("unit_norm_decoder"),
      py::arg("n_threads"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("step"), py::arg("selected_pre") = py::none(),
      py::arg("grad_values") = py::none(), py::arg("grad_values_out") = py::none(),
      "backward with the step's Adam update fused in: each latent's rows of W_enc (transposed)\n"
      "and W_dec are updated as soon as their block of up to 32 latents' gradient rows is\n"
      "formed, and the whole weight gradients are never stored; b_enc and\n"
      "b_dec too (their gradients are written to grad_b_enc and grad_b_dec). Every parameter\n"
      "and moment ends bitwise as backward followed by adam_update on each would leave it.\n"
      "exp_avg and exp_avg_sq hold the moments of W_enc_t, b_enc, W_dec, b_dec in that order.");

  m.def(
      "train_step_adam",
      [](const py::object& X, const py::object& W_enc_t, const py::object& b_enc,
         const py::object& W_dec, const py::object& b_dec, const py::sequence& exp_avg,
         const py::sequence& exp_avg_sq, const py::object& grad_b_enc,
         const py::object& grad_b_dec, const py::object& counts, Index k,
         const std::string& activation, bool normalize_decoder, int n_threads, double lr,
         double beta1, double beta2, double eps, double weight_decay, long long step,
         const py::object& centered, const py::object& grad_out,
         const py::object& selected_pre) {
        const ksae::AdamSettings s{lr, beta1, beta2, eps, weight_decay, step};
        check_adam(s);
        require_array(X, "X");
        auto run = [&](auto zero) {
          using T = decltype(zero);
          return train_step_adam_impl<T>(X, W_enc_t, b_enc, W_dec, b_dec, exp_avg, exp_avg_sq,
                                         grad_b_enc, grad_b_dec, counts, k, activation,
                                         normalize_decoder, n_threads, s, centered, grad_out,
                                         selected_pre);
        };
        return is_float32(X) ? run(0.0f) : run(0.0);
      },
      py::arg("X"), py::arg("W_enc_t"), py::arg("b_enc"), py::arg("W_dec"), py::arg("b_dec"),
      py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad_b_enc"), py::arg("grad_b_dec"),
      py::arg("counts"), py::arg("k"), py::arg("activation"), py::arg("normalize_decoder"),
      py::arg("n_threads"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("step"), py::arg("centered"), py::arg("grad_out"),
      py::arg("selected_pre") = py::none(),
      "One TopK training step with Adam on the batch X, in one call: encode (k latents per\n"
      "row), decode_mse against X, then, if the loss is finite, backward_adam (Adam update\n"
      "number `step`; normalize_decoder both projects W_dec's gradient and renormalises its\n"
      "rows) and mark_fired (counts advance by the batch's rows; a latent fires where its value\n"
      "is non-zero). Returns (loss, values, indices), each bitwise what those calls in turn give\n"
      "and leave. When the loss is not finite nothing but the buffers centered, grad_out\n"
      "(batch x d_in, apart from X) and selected_pre is written. grad_b_enc and grad_b_dec\n"
      "receive the biases' gradients.");

  m.def(
      "select_topk",
      [](const py::object& pre, const py::object& bias, Index k, const std::string& activation,
         int n_threads, const py::object& selected_pre) {
        return is_float32(pre) ? select_impl<float>(pre, bias, k, activation, n_threads, selected_pre)
                               : select_impl<double>(pre, bias, k, activation, n_threads, selected_pre);
      },
      py::arg("pre"), py::arg("bias"), py::arg("k"), py::arg("activation") = "relu",
      py::arg("n_threads") = 0, py::arg("selected_pre") = py::none(),
      "(values, indices) of the k largest entries per row of pre + bias (values through the\n"
      "activation), as encode selects; a -inf bias excludes a latent.");

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

  m.def(
      "_kth_largest",
      [](const py::object& values, Index k) {
        require_array(values, "values");
        return is_float32(values) ? kth_largest_impl<float>(values, k)
                                  : kth_largest_impl<double>(values, k);
      },
      py::arg("values"), py::arg("k"),
      "Internal (for tests): the k-th largest of a 1-D float32/float64 array without NaN, by\n"
      "the selection's branch-free count (up to 8 packets of values) or nth_element.");
  m.def(
      "_rank_top_k",
      [](const py::object& keys, const py::object& indices, Index k) {
        require_array(keys, "keys");
        return is_float32(keys) ? rank_top_k_impl<float>(keys, indices, k)
                                : rank_top_k_impl<double>(keys, indices, k);
      },
      py::arg("keys"), py::arg("indices"), py::arg("k"),
      "Internal (for tests): the positions of the k best of m candidates (larger key first,\n"
      "the lower index on ties) by the selection's branch-free ranks; None where m exceeds\n"
      "its 8 packets (the encode then sorts).");
}
