// The shared argument checks of checks.hpp that are not templates.
#include "checks.hpp"

#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ksae/optim.hpp"

namespace ksae::bindings {

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

void require_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy array, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
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

namespace {

const std::vector<std::pair<std::string, ksae::Activation>>& activation_names() {
  static const std::vector<std::pair<std::string, ksae::Activation>> names = {
      {"relu", ksae::Activation::relu},         {"linear", ksae::Activation::linear},
      {"sigmoid", ksae::Activation::sigmoid},   {"tanh", ksae::Activation::tanh},
      {"leaky_relu", ksae::Activation::leaky_relu}, {"elu", ksae::Activation::elu},
      {"swish", ksae::Activation::swish},       {"gelu", ksae::Activation::gelu},
      {"softmax", ksae::Activation::softmax}};
  return names;
}

}  // namespace

ksae::Activation parse_activation(const std::string& name) {
  std::string known;
  for (const auto& [key, act] : activation_names()) {
    if (key == name) return act;
    known += (known.empty() ? "'" : ", '") + key + "'";
  }
  throw py::value_error("activation: expected one of " + known + ", got '" + name + "'");
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

void check_adam(const ksae::AdamSettings& s) {
  if (!(s.lr >= 0)) throw py::value_error("lr: expected a value >= 0, got " + std::to_string(s.lr));
  if (!(s.beta1 >= 0 && s.beta1 < 1)) throw py::value_error("beta1: expected 0 <= beta1 < 1");
  if (!(s.beta2 >= 0 && s.beta2 < 1)) throw py::value_error("beta2: expected 0 <= beta2 < 1");
  if (!(s.eps > 0)) throw py::value_error("eps: expected a value > 0");
  if (s.step < 1) throw py::value_error("step: expected an update count >= 1");
}

}  // namespace ksae::bindings
