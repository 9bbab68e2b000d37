// The argument checks every binding shares, in one place: an array's type, dtype, shape and
// layout, the activation's name, k, a code's indices, output buffers and their overlap with
// inputs, Adam's settings, and the checked arguments of an encode. Each throws TypeError or
// ValueError naming the argument; none copies or converts an array.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ksae/common.hpp"
#include "ksae/optim.hpp"

namespace py = pybind11;

namespace ksae::bindings {

constexpr Index kAny = -1;

// `shape` as NumPy prints it, kAny as "*".
inline std::string shape_str(const std::vector<Index>& shape) {
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
template <> inline const char* dtype_name<float>() { return "float32"; }
template <> inline const char* dtype_name<double>() { return "float64"; }
template <> inline const char* dtype_name<LatentIndex>() { return "int64"; }
template <> inline const char* dtype_name<bool>() { return "bool"; }

// Throws TypeError naming `name` unless `obj` is a numpy array.
inline void require_array(const py::handle& obj, const char* name) {
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

// Extent `axis` of the numpy array `obj` (checked by the caller).
inline Index dim(const py::handle& obj, int axis) {
  return py::reinterpret_borrow<py::array>(obj).shape(axis);
}

// Throws unless `obj` is a 2-D numpy array.
inline void check_2d(const py::handle& obj, const char* name) {
  require_array(obj, name);
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.ndim() != 2) {
    throw py::value_error(std::string(name) + ": expected a 2-D array, got " +
                          std::to_string(arr.ndim()) + "-D");
  }
}

// The activations by name, in the order parse_activation's error message lists them.
inline const std::vector<std::pair<std::string, ksae::Activation>>& activation_names() {
  static const std::vector<std::pair<std::string, ksae::Activation>> names = {
      {"relu", ksae::Activation::relu},         {"linear", ksae::Activation::linear},
      {"sigmoid", ksae::Activation::sigmoid},   {"tanh", ksae::Activation::tanh},
      {"leaky_relu", ksae::Activation::leaky_relu}, {"elu", ksae::Activation::elu},
      {"swish", ksae::Activation::swish},       {"gelu", ksae::Activation::gelu},
      {"softmax", ksae::Activation::softmax}};
  return names;
}

// The activation named `name` ('relu', 'linear', ...); ValueError listing the names otherwise.
inline ksae::Activation parse_activation(const std::string& name) {
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

// Throws unless 1 <= k <= n_latents.
inline void check_k(Index k, Index n_latents) {
  if (k < 1 || k > n_latents) {
    throw py::value_error("k: expected 1 <= k <= n_latents = " + std::to_string(n_latents) +
                          ", got " + std::to_string(k));
  }
}

// Throws unless each of the `count` indices of a code (k per row) lies in [0, n_latents),
// naming the first that does not by its (row, slot).
inline void check_indices(const LatentIndex* idx, Index count, Index k, Index n_latents) {
  for (Index p = 0; p < count; ++p) {
    if (idx[p] < 0 || idx[p] >= n_latents) {
      throw py::value_error("indices: entry (" + std::to_string(p / k) + ", " +
                            std::to_string(p % k) + ") = " + std::to_string(idx[p]) +
                            " is outside [0, " + std::to_string(n_latents) + ")");
    }
  }
}

// Whether `obj` is a float32 numpy array: the bindings run their float kernel then, the
// double one otherwise (whose checks then name any wrong dtype).
inline bool is_float32(const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) return false;
  return py::isinstance<py::array_t<float>>(obj);
}

// Throws unless lr >= 0, 0 <= beta1 < 1, 0 <= beta2 < 1, eps > 0 and step >= 1.
inline void check_adam(const ksae::AdamSettings& s) {
  if (!(s.lr >= 0)) throw py::value_error("lr: expected a value >= 0, got " + std::to_string(s.lr));
  if (!(s.beta1 >= 0 && s.beta1 < 1)) throw py::value_error("beta1: expected 0 <= beta1 < 1");
  if (!(s.beta2 >= 0 && s.beta2 < 1)) throw py::value_error("beta2: expected 0 <= beta2 < 1");
  if (!(s.eps > 0)) throw py::value_error("eps: expected a value > 0");
  if (s.step < 1) throw py::value_error("step: expected an update count >= 1");
}

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

}  // namespace ksae::bindings
