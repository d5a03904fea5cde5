// SigLIP on CPU: loss and gradient weights in one sweep over tiles of X = s I T^T + b.
// Each tile is computed once; its elementwise pass produces the loss terms and overwrites
// the tile with G = dloss/dX, which then feeds both gradient GEMMs (see tiles.h).
//
// Registers mmkernels::siglip_pass (CPU kernel; fake tensor implementation in
// mmkernels/contrastive/cpu.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "contrastive/tiles.h"

namespace mmk {
namespace contrastive {
namespace {

// For one pair with label z and logit x, with t = -z x:
//   loss = -log sigmoid(z x) = softplus(t) = max(t, 0) + log1p(e),   e = exp(-|t|)
//   G    = dloss/dx = -z sigmoid(t),  sigmoid(t) = (t >= 0 ? 1 : e) / (1 + e)
// Only exp(-|t|) <= 1 is ever formed, so neither term overflows for |x| ~ 1e5. e keeps
// subnormal values: when every pair is confidently separated, these tiny terms are the
// whole loss and gradient.
template <typename T>
MMK_INLINE void softplus_sigmoid(T t, T& softplus, T& sigmoid) {
  const T e = fast_exp_subnormal(-std::abs(t));
  softplus = (t > T(0) ? t : T(0)) + log1p_unit(e);
  sigmoid = (t >= T(0) ? T(1) : e) / (T(1) + e);
}

// A run of negative pairs (z = -1, so t = x and G = sigmoid(x)) within one tile row:
// scales the raw dot products, adds their loss to `loss`, and with kGrad overwrites them
// with G and adds G to `gsum`.
template <typename T, bool kGrad>
MMK_INLINE void negatives(T* x, int64_t n, T s, T b, T& loss, T& gsum) {
  T l = 0, g = 0;
#pragma omp simd reduction(+ : l, g)
  for (int64_t j = 0; j < n; ++j) {
    const T v = s * x[j] + b;
    T sp, sg;
    softplus_sigmoid(v, sp, sg);
    l += sp;
    if (kGrad) {
      x[j] = sg;
      g += sg;
    }
  }
  loss += l;
  gsum += g;
}

template <typename T>
MMK_INLINE void negatives(T* x, int64_t n, T s, T b, bool grad, T& loss, T& gsum) {
  if (grad) {
    negatives<T, true>(x, n, s, b, loss, gsum);
  } else {
    negatives<T, false>(x, n, s, b, loss, gsum);
  }
}

// One tile (bm x bn raw dot products); adds its loss and sum of G to loss/gsum. The
// positive pair of tile row i, if any, sits in tile column diag0 + i; it splits the row
// into two runs of negatives and is handled on its own, so the vector loops carry no label.
template <typename T>
MMK_INLINE void siglip_tile_impl(T* S, int64_t bm, int64_t bn, T s, T b, bool has_pos,
                                 int64_t diag0, bool grad, double& loss, double& gsum) {
  for (int64_t i = 0; i < bm; ++i) {
    T* x = S + i * bn;
    const int64_t d = diag0 + i;
    T l = 0, g = 0;
    if (has_pos && d >= 0 && d < bn) {
      negatives(x, d, s, b, grad, l, g);
      T sp, sg;
      softplus_sigmoid(-(s * x[d] + b), sp, sg);  // z = +1: t = -x, G = -sigmoid(-x)
      l += sp;
      if (grad) {
        x[d] = -sg;
        g -= sg;
      }
      negatives(x + d + 1, bn - d - 1, s, b, grad, l, g);
    } else {
      negatives(x, bn, s, b, grad, l, g);
    }
    loss += l;
    gsum += g;
  }
}

MMK_MULTIVERSION void siglip_tile(float* S, int64_t bm, int64_t bn, float s, float b, bool has_pos,
                                  int64_t diag0, bool grad, double& loss, double& gsum) {
  siglip_tile_impl<float>(S, bm, bn, s, b, has_pos, diag0, grad, loss, gsum);
}

void siglip_tile(double* S, int64_t bm, int64_t bn, double s, double b, bool has_pos,
                 int64_t diag0, bool grad, double& loss, double& gsum) {
  siglip_tile_impl<double>(S, bm, bn, s, b, has_pos, diag0, grad, loss, gsum);
}

// ---------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_pass(
    const at::Tensor& I, const at::Tensor& T, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, int64_t diag_offset, bool want_grad) {
  const Features f = prepare_features(I, T, scale, bias, "siglip_pass");
  const int64_t M = f.I.size(0), N = f.T.size(0);
  // Written in full by the pass (zeros when the other side is empty).
  const bool fill = M > 0 && N > 0;
  at::Tensor A_I = !want_grad ? at::empty({0}, f.I.options())
                   : fill     ? at::empty_like(f.I)
                              : at::zeros_like(f.I);
  at::Tensor A_T = !want_grad ? at::empty({0}, f.I.options())
                   : fill     ? at::empty_like(f.T)
                              : at::zeros_like(f.T);
  double loss = 0, gsum = 0;
  if (M > 0 && N > 0) {
    const bool swap = swap_sides(M, N);
    const at::Tensor& A = swap ? f.T : f.I;
    const at::Tensor& B = swap ? f.I : f.T;
    const TilePlan plan(A.size(0), B.size(0));
    const Positives pos(diag_offset, M, N, swap);
    std::vector<double> chunk_loss(plan.chunks, 0.0), chunk_gsum(plan.chunks, 0.0);
    AT_DISPATCH_FLOATING_TYPES(f.dtype, "siglip_pass", [&] {
      const scalar_t s = static_cast<scalar_t>(f.scale);
      const scalar_t b = static_cast<scalar_t>(f.bias);
      // Tiles are always recomputed here (no kept X): src is the chunk's tile buffer W, which
      // siglip_tile overwrites in place.
      weighted_pass<scalar_t>(
          plan, A, B, at::Tensor(), want_grad ? (swap ? A_T : A_I) : at::Tensor(),
          want_grad ? (swap ? A_I : A_T) : at::Tensor(),
          [&](const scalar_t*, int64_t, scalar_t* S, int64_t r0, int64_t bm, int64_t c0,
              int64_t bn, int64_t t) {
            siglip_tile(S, bm, bn, s, b, pos.any, pos.diag0(r0, c0), want_grad, chunk_loss[t],
                        chunk_gsum[t]);
          });
    });
    for (int64_t t = 0; t < plan.chunks; ++t) {
      loss += chunk_loss[t];
      gsum += chunk_gsum[t];
    }
  }
  return {at::scalar_tensor(loss, f.I.options()), A_I, A_T,
          at::scalar_tensor(want_grad ? gsum : 0.0, f.I.options())};
}

}  // namespace
}  // namespace contrastive
}  // namespace mmk

// ---------------------------------------------------------------------------------------
// Registration (torch.ops.mmkernels.*), see infonce.cpp.
// ---------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(mmkernels, m) {
  // Fake (meta) implementations are registered from Python, in this module.
  m.set_python_module("mmkernels.contrastive.cpu");

  // SigLIP loss and gradient weights in one pass over X = scale * image @ text.T + bias.
  //
  // Labels z[i, j] = +1 where j == i + diag_offset, else -1. Returns
  // (loss_sum = sum softplus(-z * X) (0-dim), A_I = G @ text (M, D), A_T = G.T @ image (N, D),
  // gsum = G.sum() (0-dim)) with G = -z * sigmoid(-z * X) = d loss_sum / dX. With
  // want_grad=False, A_I and A_T are empty tensors (shape (0,)) and gsum is 0. Outputs are
  // float64 for float64 inputs and float32 otherwise.
  m.def(
      "siglip_pass(Tensor image, Tensor text, Tensor scale, Tensor? bias, int diag_offset, "
      "bool want_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("siglip_pass", TORCH_FN(mmk::contrastive::siglip_pass));
}

// Not differentiable (see infonce.cpp): outputs never require grad.
TORCH_LIBRARY_IMPL(mmkernels, Autograd, m) {
  m.impl("siglip_pass", torch::CppFunction::makeFallthrough());
}
