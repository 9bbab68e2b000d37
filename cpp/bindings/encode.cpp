// Bindings of the forward kernels: encode, select_topk (a second selection from an encode's
// pre-activations), decode, decode_mse, and the selection's counting primitives for the tests.
#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "checks.hpp"
#include "families.hpp"
#include "ksae/encode.hpp"

namespace ksae::bindings {
namespace {

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

}  // namespace

void bind_encode(py::module_& m) {
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

}  // namespace ksae::bindings
