// The kernel families' bindings, each defined in its own file and added to the module by
// module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace ksae::bindings {

// encode, select_topk, decode, decode_mse, _kth_largest, _rank_top_k (encode.cpp).
void bind_encode(pybind11::module_& m);
// backward, backward_adam, train_step_adam (backward.cpp).
void bind_backward(pybind11::module_& m);
// adam_update, sgd_update, rmsprop_update (optim.cpp).
void bind_optimizers(pybind11::module_& m);
// squared_norm, all_finite, note_fired, sums_and_squares, take_rows, mark_fired (rows.cpp).
void bind_rows(pybind11::module_& m);

}  // namespace ksae::bindings
