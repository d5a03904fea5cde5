// InfoNCE on CPU: the forward computes row and column log-sum-exp of X = s I T^T + b in one
// sweep over tiles; the backward recomputes each tile once and feeds both gradient GEMMs.
// Neither ever holds more than a few bm x bn tiles of X (see tiles.h for the tiling).
//
// Registers mmkernels::infonce_lse and mmkernels::infonce_grad (CPU kernels; fake tensor
// implementations in mmkernels/contrastive/cpu.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "contrastive/tiles.h"

namespace mmk {
namespace contrastive {
namespace {

// ---------------------------------------------------------------------------------------
// Forward: online log-sum-exp along both axes
// ---------------------------------------------------------------------------------------

// Folds one tile S (bm x bn, raw dot products; overwritten with X) into running row state
// (rmax/rsum, this chunk's view of the row block) and column state (cmax/csum, owned by the
// chunk). tmax/tsum are bn-long scratch. A running state (m, l) represents sum exp(x) =
// l * e^m; a new maximum m' rescales l by e^(m - m'). Two passes over the tile: the first
// finds the tile's row and column maxima so that the second can evaluate each exponential
// only once per axis, already relative to the final offset.
template <typename T>
MMK_INLINE void lse_tile_impl(T* S, int64_t bm, int64_t bn, T s, T b, T* rmax, T* rsum, T* cmax,
                              T* csum, T* tmax, T* tsum) {
  const T ninf = neg_inf<T>();
  for (int64_t j = 0; j < bn; ++j) tmax[j] = ninf;
  for (int64_t i = 0; i < bm; ++i) {
    T* x = S + i * bn;
    T m = ninf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < bn; ++j) {
      const T v = s * x[j] + b;
      x[j] = v;
      m = max_of(m, v);
      tmax[j] = max_of(tmax[j], v);
    }
    const T m_new = max_of(rmax[i], m);
    // A row that is -inf everywhere so far has nothing to rescale (and -inf - -inf is NaN).
    if (m_new != ninf) rsum[i] *= std::exp(rmax[i] - m_new);
    rmax[i] = m_new;
  }
  // New column maxima; tmax becomes the exp offset for pass 2 (0 for all -inf columns).
#pragma omp simd
  for (int64_t j = 0; j < bn; ++j) {
    const T m_new = max_of(cmax[j], tmax[j]);
    const T off = m_new == ninf ? T(0) : m_new;
    csum[j] *= fast_exp(cmax[j] - off);
    cmax[j] = m_new;
    tmax[j] = off;
    tsum[j] = T(0);
  }
  for (int64_t i = 0; i < bm; ++i) {
    const T* x = S + i * bn;
    const T off = rmax[i] == ninf ? T(0) : rmax[i];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < bn; ++j) {
      acc += fast_exp(x[j] - off);
      tsum[j] += fast_exp(x[j] - tmax[j]);
    }
    rsum[i] += acc;
  }
  // Summing the tile's column contributions separately (bm terms) before adding them to the
  // running sums keeps the fp32 rounding error of long columns small.
  for (int64_t j = 0; j < bn; ++j) csum[j] += tsum[j];
}

MMK_MULTIVERSION void lse_tile(float* S, int64_t bm, int64_t bn, float s, float b, float* rmax,
                               float* rsum, float* cmax, float* csum, float* tmax, float* tsum) {
  lse_tile_impl<float>(S, bm, bn, s, b, rmax, rsum, cmax, csum, tmax, tsum);
}

void lse_tile(double* S, int64_t bm, int64_t bn, double s, double b, double* rmax, double* rsum,
              double* cmax, double* csum, double* tmax, double* tsum) {
  lse_tile_impl<double>(S, bm, bn, s, b, rmax, rsum, cmax, csum, tmax, tsum);
}

template <typename T>
void lse_pass(const TilePlan& plan, const at::Tensor& A, const at::Tensor& B, T s, T b,
              T* row_lse, T* col_lse) {
  const T ninf = neg_inf<T>();
  // Per-chunk workspace: the tile, then row max and row sum (bm each), then the column
  // scratch of lse_tile (bn each).
  const int64_t tile_len = plan.bm * plan.bn;
  const int64_t ws_len = tile_len + 2 * plan.bm + 2 * plan.bn;
  const at::Tensor ws = at::empty({plan.chunks, ws_len}, A.options());
  T* const ws0 = ws.data_ptr<T>();
  // Column state lives for the whole pass; each entry is only touched by the chunk that
  // owns its column block.
  std::vector<T> cmax(plan.cols, ninf), csum(plan.cols, T(0));

  // Chunk t's running row max and row sum for the current row block.
  const auto row_max = [&](int64_t t) { return ws0 + t * ws_len + tile_len; };
  const auto row_sum = [&](int64_t t) { return row_max(t) + plan.bm; };

  for (int64_t r0 = 0; r0 < plan.rows; r0 += plan.bm) {
    const int64_t bm = plan.row_len(r0);
    const at::Tensor A_blk = A.narrow(0, r0, bm);
    parallel_chunks(plan, [&](int64_t t) {
      T* const rmax = row_max(t);
      T* const rsum = row_sum(t);
      T* const tmax = rsum + plan.bm;
      T* const tsum = tmax + plan.bn;
      std::fill(rmax, rmax + bm, ninf);
      std::fill(rsum, rsum + bm, T(0));
      for (int64_t cb = plan.first_block(t); cb < plan.first_block(t + 1); ++cb) {
        const int64_t c0 = cb * plan.bn;
        const int64_t bn = plan.col_len(c0);
        const at::Tensor S = tile_logits(ws[t], A_blk, B, c0, bn);
        lse_tile(S.data_ptr<T>(), bm, bn, s, b, rmax, rsum, cmax.data() + c0, csum.data() + c0,
                 tmax, tsum);
      }
    });
    // Merge the chunks' partial row states: lse = m + log(sum_t l_t e^(m_t - m)).
    for (int64_t i = 0; i < bm; ++i) {
      row_lse[r0 + i] = merge_lse<T>(
          plan.chunks, [&](int64_t t) { return row_max(t)[i]; },
          [&](int64_t t) { return row_sum(t)[i]; });
    }
  }
  for (int64_t j = 0; j < plan.cols; ++j) col_lse[j] = cmax[j] + std::log(csum[j]);
}

// ---------------------------------------------------------------------------------------
// Backward: P = rw e^(X - row_lse) + cw e^(X - col_lse), then P T and P^T I
// ---------------------------------------------------------------------------------------

// Overwrites S (bm x bn raw dot products) with P; returns the tile's sum of P. rw/rlse are
// the tile's rows, cw/clse its columns.
template <typename T>
MMK_INLINE double p_tile_impl(T* S, int64_t bm, int64_t bn, T s, T b, const T* rw, const T* rlse,
                              const T* cw, const T* clse) {
  double total = 0;
  for (int64_t i = 0; i < bm; ++i) {
    T* x = S + i * bn;
    const T a = rw[i];
    const T ro = rlse[i];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < bn; ++j) {
      const T v = s * x[j] + b;
      const T p = a * fast_exp(v - ro) + cw[j] * fast_exp(v - clse[j]);
      x[j] = p;
      acc += p;
    }
    total += acc;
  }
  return total;
}

MMK_MULTIVERSION double p_tile(float* S, int64_t bm, int64_t bn, float s, float b, const float* rw,
                               const float* rlse, const float* cw, const float* clse) {
  return p_tile_impl<float>(S, bm, bn, s, b, rw, rlse, cw, clse);
}

double p_tile(double* S, int64_t bm, int64_t bn, double s, double b, const double* rw,
              const double* rlse, const double* cw, const double* clse) {
  return p_tile_impl<double>(S, bm, bn, s, b, rw, rlse, cw, clse);
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> infonce_lse(const at::Tensor& I, const at::Tensor& T,
                                               const at::Tensor& scale,
                                               const std::optional<at::Tensor>& bias) {
  const Features f = prepare_features(I, T, scale, bias, "infonce_lse");
  const int64_t M = f.I.size(0), N = f.T.size(0);
  at::Tensor row_lse = at::empty({M}, f.I.options());
  at::Tensor col_lse = at::empty({N}, f.I.options());
  if (M == 0 || N == 0) {
    // log of an empty sum.
    row_lse.fill_(-std::numeric_limits<double>::infinity());
    col_lse.fill_(-std::numeric_limits<double>::infinity());
    return {row_lse, col_lse};
  }
  const bool swap = swap_sides(M, N);
  const at::Tensor& A = swap ? f.T : f.I;
  const at::Tensor& B = swap ? f.I : f.T;
  at::Tensor& lse_A = swap ? col_lse : row_lse;
  at::Tensor& lse_B = swap ? row_lse : col_lse;
  const TilePlan plan(A.size(0), B.size(0));
  AT_DISPATCH_FLOATING_TYPES(f.dtype, "infonce_lse", [&] {
    lse_pass<scalar_t>(plan, A, B, static_cast<scalar_t>(f.scale), static_cast<scalar_t>(f.bias),
                       lse_A.data_ptr<scalar_t>(), lse_B.data_ptr<scalar_t>());
  });
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_grad(
    const at::Tensor& I, const at::Tensor& T, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_w, const at::Tensor& col_w) {
  const char* fn = "infonce_grad";
  const Features f = prepare_features(I, T, scale, bias, fn);
  const int64_t M = f.I.size(0), N = f.T.size(0);
  const at::Tensor rlse = vector_arg(row_lse, M, f.dtype, fn, "row_lse");
  const at::Tensor clse = vector_arg(col_lse, N, f.dtype, fn, "col_lse");
  const at::Tensor rw = vector_arg(row_w, M, f.dtype, fn, "row_w");
  const at::Tensor cw = vector_arg(col_w, N, f.dtype, fn, "col_w");
  at::Tensor A_I = at::zeros_like(f.I);
  at::Tensor A_T = at::zeros_like(f.T);
  double psum = 0;
  if (M > 0 && N > 0) {
    const bool swap = swap_sides(M, N);
    const at::Tensor& A = swap ? f.T : f.I;
    const at::Tensor& B = swap ? f.I : f.T;
    const at::Tensor& lse_A = swap ? clse : rlse;
    const at::Tensor& lse_B = swap ? rlse : clse;
    const at::Tensor& w_A = swap ? cw : rw;
    const at::Tensor& w_B = swap ? rw : cw;
    const TilePlan plan(A.size(0), B.size(0));
    std::vector<double> chunk_psum(plan.chunks, 0.0);
    AT_DISPATCH_FLOATING_TYPES(f.dtype, "infonce_grad", [&] {
      const scalar_t s = static_cast<scalar_t>(f.scale);
      const scalar_t b = static_cast<scalar_t>(f.bias);
      const scalar_t* la = lse_A.data_ptr<scalar_t>();
      const scalar_t* lb = lse_B.data_ptr<scalar_t>();
      const scalar_t* wa = w_A.data_ptr<scalar_t>();
      const scalar_t* wb = w_B.data_ptr<scalar_t>();
      weighted_pass<scalar_t>(
          plan, A, B, swap ? A_T : A_I, swap ? A_I : A_T,
          [&](scalar_t* S, int64_t r0, int64_t bm, int64_t c0, int64_t bn, int64_t t) {
            chunk_psum[t] += p_tile(S, bm, bn, s, b, wa + r0, la + r0, wb + c0, lb + c0);
          });
    });
    for (const double p : chunk_psum) psum += p;
  }
  return {A_I, A_T, at::scalar_tensor(psum, f.I.options())};
}

}  // namespace
}  // namespace contrastive
}  // namespace mmk

// ---------------------------------------------------------------------------------------
// Registration (torch.ops.mmkernels.*). Other files add their own ops to the same namespace
// with TORCH_LIBRARY_FRAGMENT; the Python package defines ops there too (torch.library).
// ---------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(mmkernels, m) {
  // Fake (meta) implementations are registered from Python, in this module.
  m.set_python_module("mmkernels.contrastive.cpu");

  // Row and column log-sum-exp of X = scale * image @ text.T + bias in one pass.
  //
  // image: (M, D), text: (N, D); scale, bias: one-element tensors (bias may be None).
  // Returns (row_lse (M,), col_lse (N,)): row_lse[i] = log sum_j exp(X[i, j]),
  // col_lse[j] = log sum_i exp(X[i, j]). float64 inputs give float64 outputs; float32,
  // float16 and bfloat16 inputs are computed and returned in float32.
  m.def("infonce_lse(Tensor image, Tensor text, Tensor scale, Tensor? bias) -> (Tensor, Tensor)");

  // Softmax-gradient accumulation for InfoNCE, recomputing X tile by tile.
  //
  // With P[i, j] = row_w[i] * exp(X[i, j] - row_lse[i]) + col_w[j] * exp(X[i, j] - col_lse[j])
  // returns (A_I = P @ text (M, D), A_T = P.T @ image (N, D), psum = P.sum() (0-dim)), in the
  // compute dtype of infonce_lse.
  m.def(
      "infonce_grad(Tensor image, Tensor text, Tensor scale, Tensor? bias, Tensor row_lse, "
      "Tensor col_lse, Tensor row_w, Tensor col_w) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("infonce_lse", TORCH_FN(mmk::contrastive::infonce_lse));
  m.impl("infonce_grad", TORCH_FN(mmk::contrastive::infonce_grad));
}

// Not differentiable (the Python ops that call these register their own autograd): the
// Autograd key falls through, so outputs never require grad, whatever the inputs.
TORCH_LIBRARY_IMPL(mmkernels, Autograd, m) {
  m.impl("infonce_lse", torch::CppFunction::makeFallthrough());
  m.impl("infonce_grad", torch::CppFunction::makeFallthrough());
}
