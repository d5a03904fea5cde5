// Fused LoRA linear forward on CPU (shared pieces and the row order: lora.h).
//
// Parallel over row blocks of the sorted order. Per block: Y = X W^T (one tile GEMM,
// single-threaded BLAS inside the worker), then for each same-adapter run of the block:
// u = (X o D) A^T (the dropout applied to kMaskRows rows at a time, in cache, never to all of
// x), Y += s u B^T; then the bias, and one write of y (and of u) at the rows' original
// positions. x is read from memory once: the shrink reads the block's rows from cache after
// the base GEMM brought them in. Nothing is reduced across blocks, so the result does not
// depend on the number of threads.
//
// Registers mmkernels::lora_cpu_fwd (CPU kernel; fake tensor implementation in
// mmkernels/lora/cpu.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "lora/lora.h"

namespace mmk {
namespace lora {
namespace {

template <typename S>
void forward_kernel(const Problem& P, const S* x, const compute_t<S>* W,
                    const compute_t<S>* bias, const compute_t<S>* A, const compute_t<S>* B,
                    S* y, compute_t<S>* u) {
  using T = compute_t<S>;
  // In place: the block's x rows are read, and its y rows written, by BLAS directly.
  constexpr bool kSame = std::is_same<S, T>::value;
  const int64_t in = P.in, out = P.out, r = P.r, ldx = P.ldx;
  const int64_t nb = static_cast<int64_t>(P.blocks.size());
  const TileDropout dr = tile_dropout(P);
  const T keep_scale = static_cast<T>(P.dropout.keep_scale);
  const int64_t* order = P.order.empty() ? nullptr : P.order.data();

  struct Scratch {
    std::vector<T> xbuf, ybuf, ubuf, us, xd;
  };
  auto make_scratch = [&] {
    Scratch sc;
    sc.us.resize(static_cast<size_t>(P.block_rows * r));
    if (P.dropout.on) sc.xd.resize(static_cast<size_t>(kMaskRows * in));
    return sc;
  };
  run_tasks(nb, make_scratch, [&](int64_t bi, Scratch& sc) {
    std::vector<T>&xbuf = sc.xbuf, &ybuf = sc.ybuf, &ubuf = sc.ubuf, &us = sc.us, &xd = sc.xd;
    const Block& blk = P.blocks[bi];
    const int64_t rows = blk.end - blk.start;
    const bool direct = blk.orig >= 0;
    const bool inplace = kSame && direct;
    const T* X;
    int64_t ldX;
    if (inplace) {
      X = reinterpret_cast<const T*>(x) + blk.orig * ldx;
      ldX = ldx;
    } else {
      xbuf.resize(static_cast<size_t>(rows * in));
      load_rows(P, x, ldx, blk.start, rows, in, xbuf.data());
      X = xbuf.data();
      ldX = in;
    }
    T* Y;
    if (inplace) {
      Y = reinterpret_cast<T*>(y) + blk.orig * out;
    } else {
      ybuf.resize(static_cast<size_t>(rows * out));
      Y = ybuf.data();
    }
    T* U;
    if (direct) {
      U = u + blk.orig * r;
    } else {
      ubuf.resize(static_cast<size_t>(rows * r));
      U = ubuf.data();
    }

    gemm<T>(false, true, rows, out, in, X, ldX, W, in, Y, out, false);
    for (int64_t k = blk.run0; k < blk.run1; ++k) {
      const Run& run = P.runs[k];
      const int64_t lo = std::max(run.start, blk.start) - blk.start;
      const int64_t hi = std::min(run.end, blk.end) - blk.start;
      const int64_t m = hi - lo;
      T* const Ur = U + lo * r;
      if (run.adapter < 0) {
        std::fill(Ur, Ur + m * r, T(0));
        continue;
      }
      const T* const An = A + run.adapter * r * in;
      const T* const Bn = B + run.adapter * out * r;
      if (P.dropout.on) {
        for (int64_t c = lo; c < hi; c += kMaskRows) {
          const int64_t mc = std::min(kMaskRows, hi - c);
          dropout_rows(X + c * ldX, ldX, mc, in, order, blk.start + c, dr, keep_scale,
                       xd.data(), nullptr);
          gemm<T>(false, true, mc, r, in, xd.data(), in, An, in, U + c * r, r, false);
        }
      } else {
        gemm<T>(false, true, m, r, in, X + lo * ldX, ldX, An, in, Ur, r, false);
      }
      // u is kept unscaled (the backward's dB needs it so); the expand takes s u.
      const T s = static_cast<T>(P.scaling[run.adapter]);
      for (int64_t i = 0; i < m * r; ++i) us[i] = s * Ur[i];
      gemm<T>(false, true, m, out, r, us.data(), r, Bn, r, Y + lo * out, out, true);
    }

    if (inplace) {
      if (bias != nullptr) {
        for (int64_t i = 0; i < rows; ++i) {
          T* yr = Y + i * out;
          for (int64_t j = 0; j < out; ++j) yr[j] += bias[j];
        }
      }
    } else {
      store_rows(P, Y, blk.start, rows, out, bias, y);
    }
    if (!direct) {
      for (int64_t i = 0; i < rows; ++i) {
        std::copy(U + i * r, U + (i + 1) * r, u + P.orig(blk.start + i) * r);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lora_cpu_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    const std::optional<at::Tensor>& adapter_ids, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const char* fn = "lora_cpu_fwd";
  Problem P = make_problem(x, weight, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, fn);
  const at::ScalarType dt = x.scalar_type(), ct = compute_dtype(dt);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_tensor(*bias, 1, dt, fn, "bias");
    TORCH_CHECK(bias->size(0) == P.out, fn, ": bias must have shape (", P.out, ",), got ",
                bias->sizes());
  }
  const at::Tensor xc = prepare_x(x);
  P.ldx = P.T <= 1 ? P.in : xc.stride(0);
  const at::Tensor Wc = prepare_param(weight, ct);
  const at::Tensor Ac = prepare_param(lora_A, ct);
  const at::Tensor Bc = prepare_param(lora_B, ct);
  const at::Tensor bc = has_bias ? prepare_param(*bias, ct) : at::Tensor();
  // Written in full by the kernel (every row of y and u belongs to exactly one block).
  at::Tensor y = empty_huge_pages(P.T, P.out, x.options());
  at::Tensor u = at::empty({P.T, P.r}, x.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "lora_cpu_fwd", [&] {
    using T = compute_t<scalar_t>;
    forward_kernel<scalar_t>(P, xc.data_ptr<scalar_t>(), Wc.data_ptr<T>(),
                             has_bias ? bc.data_ptr<T>() : nullptr, Ac.data_ptr<T>(),
                             Bc.data_ptr<T>(), y.data_ptr<scalar_t>(), u.data_ptr<T>());
  });
  return {y, u};
}

}  // namespace
}  // namespace lora
}  // namespace mmk

// ---------------------------------------------------------------------------------------
// Registration (torch.ops.mmkernels.*), see csrc/contrastive/infonce.cpp.
// ---------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(mmkernels, m) {
  // Fake (meta) implementations are registered from Python, in this module.
  m.set_python_module("mmkernels.lora.cpu");

  // LoRA linear forward (semantics: mmkernels/lora/reference.py). x (T, in) with unit column
  // stride (any row stride), weight (out, in), bias (out,) or None, lora_A (N, r, in), lora_B
  // (N, out, r), all of one dtype; scaling (N,) floating; adapter_ids (T,) int64 in [-1, N)
  // or None (then N = 1); seed: int64 one-element tensor, required when dropout_p > 0.
  // Returns y (T, out) in x's dtype and u (T, r) = dropout(x) A[id]^T, unscaled, float64 for
  // float64 inputs, else float32 (zero rows where id = -1).
  m.def(
      "lora_cpu_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor scaling, Tensor? adapter_ids, float dropout_p, Tensor? seed) "
      "-> (Tensor y, Tensor u)");
}

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("lora_cpu_fwd", TORCH_FN(mmk::lora::lora_cpu_fwd));
}

// Not differentiable here (the Python layer wires forward and backward together): the
// Autograd key falls through, so outputs never require grad, whatever the inputs.
TORCH_LIBRARY_IMPL(mmkernels, Autograd, m) {
  m.impl("lora_cpu_fwd", torch::CppFunction::makeFallthrough());
}
