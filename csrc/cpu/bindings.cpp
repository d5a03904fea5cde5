// Python bindings of the CPU kernels (module mmkernels._C). The GIL is released for the
// whole call: the kernels touch no Python objects once the arguments are converted.
#include <torch/extension.h>

#include "cpu/tiles.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels CPU kernels: fused InfoNCE and SigLIP over tiles of X = s * I @ T.T + b";

  m.def("infonce_lse", &mmk::infonce_lse, py::arg("I"), py::arg("T"), py::arg("scale"),
        py::arg("bias"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Row and column log-sum-exp of X = scale * I @ T.T + bias in one pass.

I: (M, D), T: (N, D); scale, bias: one-element tensors (bias may be None).
Returns (row_lse (M,), col_lse (N,)): row_lse[i] = log sum_j exp(X[i, j]),
col_lse[j] = log sum_i exp(X[i, j]). float64 inputs give float64 outputs; float32,
float16 and bfloat16 inputs are computed and returned in float32.)doc");

  m.def("infonce_grad", &mmk::infonce_grad, py::arg("I"), py::arg("T"), py::arg("scale"),
        py::arg("bias"), py::arg("row_lse"), py::arg("col_lse"), py::arg("row_w"),
        py::arg("col_w"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Softmax-gradient accumulation for InfoNCE, recomputing X tile by tile.

With P[i, j] = row_w[i] * exp(X[i, j] - row_lse[i]) + col_w[j] * exp(X[i, j] - col_lse[j])
returns (A_I = P @ T (M, D), A_T = P.T @ I (N, D), psum = P.sum() (0-dim)).)doc");

  m.def("siglip_fwd_bwd", &mmk::siglip_fwd_bwd, py::arg("I"), py::arg("T"), py::arg("scale"),
        py::arg("bias"), py::arg("diag_offset"), py::arg("compute_grad"),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(SigLIP loss and gradient weights in one pass.

Labels z[i, j] = +1 where j == i + diag_offset, else -1. Returns
(loss_sum = sum softplus(-z * X) (0-dim), A_I = G @ T, A_T = G.T @ I, gsum = G.sum())
with G = -z * sigmoid(-z * X) = d loss_sum / dX. With compute_grad=False, A_I and A_T
are empty tensors and gsum is 0.)doc");
}
