// Bindings of the backward kernels: backward, backward_adam (the backward with the step's
// Adam update fused in) and train_step_adam (a whole TopK step with Adam in one call).
#include <cmath>
#include <string>
#include <vector>

#include "checks.hpp"
#include "families.hpp"
#include "ksae/backward.hpp"
#include "ksae/encode.hpp"
#include "ksae/optim.hpp"
#include "ksae/rows.hpp"

namespace ksae::bindings {
namespace {

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
      ksae::advance_counts(fired, n, code.values_ptr, code.indices_ptr, batch * k, batch, false, T(0));
    }
  }
  return py::make_tuple(loss, code.values, code.indices);
}

}  // namespace

void bind_backward(py::module_& m) {
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
}

}  // namespace ksae::bindings
