// InfoNCE on CPU: the forward computes row and column log-sum-exp of X = s I T^T + b in one
// sweep over tiles, leaving the positive pairs out (the host adds their terms without
// cancellation); the backward turns each tile into softmax weights and feeds both gradient
// GEMMs. The tiles are either recomputed in the backward (8 M N D FLOPs in all, never more
// than a few bm x bn tiles of X held) or, for the first `keep_rows` rows the caller asks the
// forward to keep (all of them, or whole row blocks within a memory budget), copied by the
// forward into a buffer and only read by the backward (6 M N D FLOPs for a kept row, 8 for a
// recomputed one). See tiles.h for the tiling.
//
// Registers mmkernels::infonce_lse and mmkernels::infonce_grad (CPU kernels; fake tensor
// implementations in mmkernels/contrastive/cpu.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/alloc.h"
#include "contrastive/tiles.h"

namespace mmk {
namespace contrastive {
namespace {

// ---------------------------------------------------------------------------------------
// Forward: online log-sum-exp along both axes, positives left out
// ---------------------------------------------------------------------------------------

// Pass 1 over a run of a tile row: raw dot products x -> X = s x + b in place; returns the
// run's maximum merged into m and merges it into the column maxima tmax.
template <typename T>
MMK_INLINE T scale_max_run(T* x, T* tmax, int64_t n, T s, T b, T m) {
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const T v = s * x[j] + b;
    x[j] = v;
    m = max_of(m, v);
    tmax[j] = max_of(tmax[j], v);
  }
  return m;
}

// Pass 2 over a run of a tile row: sum of e^(X - off) along the row (returned) and
// e^(X - tmax) added to the column sums tsum. With kKeep, X is also copied to `keep` (a row
// of the kept logits): fusing the copy here costs one store per element, where having BLAS
// write the tile into the strided (K x cols) kept buffer directly was measured 15-50% slower
// than into the contiguous scratch tile.
template <bool kKeep, typename T>
MMK_INLINE T exp_sum_run(const T* x, const T* tmax, T* tsum, int64_t n, T off, T* keep) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const T v = x[j];
    acc += fast_exp(v - off);
    tsum[j] += fast_exp(v - tmax[j]);
    if (kKeep) keep[j] = v;
  }
  return acc;
}

// One exponential per logit instead of two. The tile passes need e^(X_ij - a_i) for a row
// offset a_i and e^(X_ij - b_j) for a column offset b_j; the second is the first times a row
// factor e^(a_i - K) and a column factor e^(K - b_j). With every offset of the tile within
// kWindow of the smallest (K), the factors lie in [e^-kWindow, e^kWindow]: no overflow, and
// a term whose first exponential flushes to 0 (X - a_i < -86.5) is below e^(kWindow - 86.5)
// = 6e-21 of its column's largest term, which the sum holds too. The product costs two more
// roundings per term. Tiles whose offsets are further apart (confident rows beside uncertain
// ones), or infinite or NaN, evaluate both exponentials. (Measured on 2 Zen 4 cores, B = 4096:
// two exponentials per logit in both passes cost ~11 ms of a ~300 ms fwd+bwd.)
constexpr double kWindow = 40.0;

// Whether the offsets a (na) and b (nb) are all finite and within kWindow of their minimum,
// which is written to K. `a` may be given through a map (the forward's rows use 0 for -inf).
template <typename T, typename RowOffset>
MMK_INLINE bool within_window(const RowOffset& a, int64_t na, const T* b, int64_t nb, T* K) {
  T lo = std::numeric_limits<T>::infinity(), hi = -lo;
  bool finite = true;
  for (int64_t i = 0; i < na; ++i) {
    const T v = a(i);
    finite = finite && std::isfinite(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  for (int64_t j = 0; j < nb; ++j) {
    finite = finite && std::isfinite(b[j]);
    lo = std::min(lo, b[j]);
    hi = std::max(hi, b[j]);
  }
  *K = lo;
  return finite && hi - lo <= T(kWindow);
}

// exp_sum_run with one exponential: tsum gets e^(X - off) * u, u = e^(off - K); the caller
// scales the tile's column sums by e^(K - tmax_j) afterwards.
template <bool kKeep, typename T>
MMK_INLINE T exp_sum_run_1(const T* x, T* tsum, int64_t n, T off, T u, T* keep) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const T v = x[j];
    const T e = fast_exp(v - off);
    acc += e;
    tsum[j] += e * u;
    if (kKeep) keep[j] = v;
  }
  return acc;
}

// Folds one tile S (bm x bn raw dot products, leading dimension bn; overwritten with X) into
// running row state (rmax/rsum, this chunk's view of the row block) and column state
// (cmax/csum, owned by the chunk), leaving out the positives: tile row i has its positive in
// tile column diag0 + i when has_pos and that is in [0, bn); its X goes to diag[dg + i]
// instead of the sums. With keep non-null, X is also copied to keep (leading dimension ldk).
// tmax/tsum are bn-long scratch. A running state (m, l) represents sum exp(x) = l * e^m; a
// new maximum m' rescales l by e^(m - m'). Two passes over the tile: the first finds the
// tile's row and column maxima so that the second can evaluate each exponential only once
// per axis, already relative to the final offset.
template <bool kKeep, typename T>
MMK_INLINE void lse_tile_impl(T* S, int64_t bm, int64_t bn, T s, T b, bool has_pos,
                              int64_t diag0, T* diag, int64_t dg, T* keep, int64_t ldk, T* rmax,
                              T* rsum, T* cmax, T* csum, T* tmax, T* tsum) {
  const T ninf = neg_inf<T>();
  for (int64_t j = 0; j < bn; ++j) tmax[j] = ninf;
  for (int64_t i = 0; i < bm; ++i) {
    T* x = S + i * bn;
    const int64_t d = diag0 + i;
    T m = ninf;
    const Runs r = runs_except(bn, has_pos, d);
    for (int k = 0; k < r.n; ++k) {
      const int64_t j0 = r.begin[k];
      m = scale_max_run(x + j0, tmax + j0, r.end[k] - j0, s, b, m);
    }
    if (has_pos && d >= 0 && d < bn) {
      // The same expression as in the vector loop (no FMA contraction: -std=c++17 implies
      // -ffp-contract=off), so a kept tile holds exactly this value.
      const T v = s * x[d] + b;
      x[d] = v;
      diag[dg + i] = v;
      if (kKeep) keep[i * ldk + d] = v;
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
  const auto row_off = [&](int64_t i) { return rmax[i] == ninf ? T(0) : rmax[i]; };
  T K;
  const bool one_exp = within_window(row_off, bm, tmax, bn, &K);
  for (int64_t i = 0; i < bm; ++i) {
    const T* x = S + i * bn;
    T* const ki = kKeep ? keep + i * ldk : nullptr;
    const T off = row_off(i);
    const T u = one_exp ? std::exp(off - K) : T(0);
    T acc = 0;
    const Runs r = runs_except(bn, has_pos, diag0 + i);
    for (int k = 0; k < r.n; ++k) {
      const int64_t j0 = r.begin[k];
      T* const kj = kKeep ? ki + j0 : nullptr;
      acc += one_exp ? exp_sum_run_1<kKeep>(x + j0, tsum + j0, r.end[k] - j0, off, u, kj)
                     : exp_sum_run<kKeep>(x + j0, tmax + j0, tsum + j0, r.end[k] - j0, off, kj);
    }
    rsum[i] += acc;
  }
  if (one_exp) {
#pragma omp simd
    for (int64_t j = 0; j < bn; ++j) tsum[j] *= fast_exp(K - tmax[j]);
  }
  // Summing the tile's column contributions separately (bm terms) before adding them to the
  // running sums keeps the fp32 rounding error of long columns small.
  for (int64_t j = 0; j < bn; ++j) csum[j] += tsum[j];
}

template <typename T>
MMK_INLINE void lse_tile_any(T* S, int64_t bm, int64_t bn, T s, T b, bool has_pos, int64_t diag0,
                             T* diag, int64_t dg, T* keep, int64_t ldk, T* rmax, T* rsum, T* cmax,
                             T* csum, T* tmax, T* tsum) {
  if (keep != nullptr) {
    lse_tile_impl<true, T>(S, bm, bn, s, b, has_pos, diag0, diag, dg, keep, ldk, rmax, rsum,
                           cmax, csum, tmax, tsum);
  } else {
    lse_tile_impl<false, T>(S, bm, bn, s, b, has_pos, diag0, diag, dg, keep, ldk, rmax, rsum,
                            cmax, csum, tmax, tsum);
  }
}

MMK_MULTIVERSION void lse_tile(float* S, int64_t bm, int64_t bn, float s, float b, bool has_pos,
                               int64_t diag0, float* diag, int64_t dg, float* keep, int64_t ldk,
                               float* rmax, float* rsum, float* cmax, float* csum, float* tmax,
                               float* tsum) {
  lse_tile_any<float>(S, bm, bn, s, b, has_pos, diag0, diag, dg, keep, ldk, rmax, rsum, cmax,
                      csum, tmax, tsum);
}

void lse_tile(double* S, int64_t bm, int64_t bn, double s, double b, bool has_pos, int64_t diag0,
              double* diag, int64_t dg, double* keep, int64_t ldk, double* rmax, double* rsum,
              double* cmax, double* csum, double* tmax, double* tsum) {
  lse_tile_any<double>(S, bm, bn, s, b, has_pos, diag0, diag, dg, keep, ldk, rmax, rsum, cmax,
                       csum, tmax, tsum);
}

// One sweep over the tiles of the kernel frame (rows of A against rows of B). Writes the
// off-positive row and column LSE (kernel frame) and the positives' logits into diag (caller
// frame: indexed by image row, i.e. by kernel column when the sides are swapped; entries
// without a positive are left alone). With X defined ((K x cols) contiguous, K a whole
// number of row blocks or all rows) the logits of the first K rows are also copied there.
template <typename T>
void lse_pass(const TilePlan& plan, const at::Tensor& A, const at::Tensor& B, T s, T b,
              const Positives& pos, bool swap, const at::Tensor& X, T* row_lse, T* col_lse,
              T* diag) {
  const T ninf = neg_inf<T>();
  const int64_t kept_rows = X.defined() ? X.size(0) : 0;
  // Per-chunk workspace: the tile, then row max and row sum (bm each), then the column
  // scratch of lse_tile (bn each).
  const int64_t tile_len = plan.bm * plan.bn;
  const int64_t ws_len = tile_len + 2 * plan.bm + 2 * plan.bn;
  const at::Tensor ws = at::empty({plan.chunks, ws_len}, A.options());
  T* const ws0 = ws.data_ptr<T>();
  T* const x0 = kept_rows > 0 ? X.data_ptr<T>() : nullptr;
  // Column state lives for the whole pass; each entry is only touched by the chunk that
  // owns its column block.
  std::vector<T> cmax(plan.cols, ninf), csum(plan.cols, T(0));

  // Chunk t's running row max and row sum for the current row block.
  const auto row_max = [&](int64_t t) { return ws0 + t * ws_len + tile_len; };
  const auto row_sum = [&](int64_t t) { return row_max(t) + plan.bm; };

  for (int64_t r0 = 0; r0 < plan.rows; r0 += plan.bm) {
    const int64_t bm = plan.row_len(r0);
    const at::Tensor A_blk = A.narrow(0, r0, bm);
    // diag[dg + i] receives the positive of tile row i: indexed by the kernel row, or by the
    // kernel column (row + off) when swapped.
    const int64_t dg = swap ? r0 + pos.off : r0;
    const bool kept = r0 < kept_rows;
    // Whole row blocks only (check_keep_rows; bm == kRowBlock unless one block holds all rows).
    TORCH_INTERNAL_ASSERT(!kept || r0 + bm <= kept_rows);
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
        T* const S = tile_logits(ws[t], A_blk, B, c0, bn).data_ptr<T>();
        lse_tile(S, bm, bn, s, b, pos.any, pos.diag0(r0, c0), diag, dg,
                 kept ? x0 + r0 * plan.cols + c0 : nullptr, plan.cols, rmax, rsum,
                 cmax.data() + c0, csum.data() + c0, tmax, tsum);
      }
    });
    // Merge the chunks' partial row states: lse = m + log(sum_t l_t e^(m_t - m)).
    for (int64_t i = 0; i < bm; ++i) {
      row_lse[r0 + i] = merge_lse<T>(
          plan.chunks, [&](int64_t t) { return row_max(t)[i]; },
          [&](int64_t t) { return row_sum(t)[i]; });
    }
  }
  // An all -inf column (only its positive, or nothing) gives -inf + log 0 = -inf.
  for (int64_t j = 0; j < plan.cols; ++j) col_lse[j] = cmax[j] + std::log(csum[j]);
}

// ---------------------------------------------------------------------------------------
// Backward: P = rw e^(X - row_lse) + cw e^(X - col_lse) off the positives, then P B, P^T A
// ---------------------------------------------------------------------------------------

// A run of one tile row: w = P from x (X = s x + b), returns the run's sum of P.
template <typename T>
MMK_INLINE T p_run(const T* x, T* w, int64_t n, T s, T b, T a, T ro, const T* cw,
                   const T* clse) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const T v = s * x[j] + b;
    const T p = a * fast_exp(v - ro) + cw[j] * fast_exp(v - clse[j]);
    w[j] = p;
    acc += p;
  }
  return acc;
}

// p_run with one exponential (see kWindow): P = e^(X - ro) * (a + u * cf[j]) with
// u = e^(ro - K) and cf[j] = cw[j] e^(K - clse[j]).
template <typename T>
MMK_INLINE T p_run_1(const T* x, T* w, int64_t n, T s, T b, T a, T ro, T u, const T* cf) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const T v = s * x[j] + b;
    const T p = fast_exp(v - ro) * (a + u * cf[j]);
    w[j] = p;
    acc += p;
  }
  return acc;
}

// Writes the tile of P (bm x bn, leading dimension bn) into W from the tile's logits x
// (leading dimension ld; raw dot products with s, b, or the kept X with s = 1, b = 0; x may
// be W itself) and returns the tile's sum of P. P is 0 at the positives (tile column
// diag0 + i of row i), which are left out of the sum. rw/rlse are the tile's rows, cw/clse
// its columns.
template <typename T>
MMK_INLINE double p_tile_impl(const T* x, int64_t ld, T* W, int64_t bm, int64_t bn, T s, T b,
                              bool has_pos, int64_t diag0, const T* rw, const T* rlse,
                              const T* cw, const T* clse) {
  T K;
  const bool one_exp =
      bn <= kMaxColBlock && within_window([&](int64_t i) { return rlse[i]; }, bm, clse, bn, &K);
  alignas(64) T cf[kMaxColBlock];  // the column factors cw[j] e^(K - clse[j])
  if (one_exp) {
#pragma omp simd
    for (int64_t j = 0; j < bn; ++j) cf[j] = cw[j] * fast_exp(K - clse[j]);
  }
  double total = 0;
  for (int64_t i = 0; i < bm; ++i) {
    const T* xi = x + i * ld;
    T* wi = W + i * bn;
    const int64_t d = diag0 + i;
    const T u = one_exp ? std::exp(rlse[i] - K) : T(0);
    T acc = 0;
    const Runs r = runs_except(bn, has_pos, d);
    for (int k = 0; k < r.n; ++k) {
      const int64_t j0 = r.begin[k];
      acc += one_exp
                 ? p_run_1(xi + j0, wi + j0, r.end[k] - j0, s, b, rw[i], rlse[i], u, cf + j0)
                 : p_run(xi + j0, wi + j0, r.end[k] - j0, s, b, rw[i], rlse[i], cw + j0,
                         clse + j0);
    }
    if (has_pos && d >= 0 && d < bn) wi[d] = T(0);
    total += acc;
  }
  return total;
}

MMK_MULTIVERSION double p_tile(const float* x, int64_t ld, float* W, int64_t bm, int64_t bn,
                               float s, float b, bool has_pos, int64_t diag0, const float* rw,
                               const float* rlse, const float* cw, const float* clse) {
  return p_tile_impl<float>(x, ld, W, bm, bn, s, b, has_pos, diag0, rw, rlse, cw, clse);
}

double p_tile(const double* x, int64_t ld, double* W, int64_t bm, int64_t bn, double s, double b,
              bool has_pos, int64_t diag0, const double* rw, const double* rlse, const double* cw,
              const double* clse) {
  return p_tile_impl<double>(x, ld, W, bm, bn, s, b, has_pos, diag0, rw, rlse, cw, clse);
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

// Kept logits are in the kernel frame: rows of X when M <= N, rows of X^T when the sides are
// swapped. keep_rows must be 0, all rows, or a multiple of the row block (partial keeps cover
// whole row blocks, so that every tile is either kept or recomputed).
void check_keep_rows(int64_t keep_rows, int64_t rows, const char* fn) {
  TORCH_CHECK(keep_rows >= 0 && keep_rows <= rows, fn, ": keep_rows must be in [0, ", rows,
              "] (min(M, N)), got ", keep_rows);
  TORCH_CHECK(keep_rows == rows || keep_rows % kRowBlock == 0, fn, ": keep_rows must be ", rows,
              " (all rows) or a multiple of ", kRowBlock, ", got ", keep_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_lse(
    const at::Tensor& I, const at::Tensor& T, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, int64_t offset, int64_t keep_rows) {
  const Features f = prepare_features(I, T, scale, bias, "infonce_lse");
  const int64_t M = f.I.size(0), N = f.T.size(0);
  const bool swap = swap_sides(M, N);
  const int64_t rows = swap ? N : M, cols = swap ? M : N;
  check_keep_rows(keep_rows, rows, "infonce_lse");
  const double ninf = -std::numeric_limits<double>::infinity();
  // log of an empty sum, and "no positive", until the pass says otherwise.
  at::Tensor row_lse = at::full({M}, ninf, f.I.options());
  at::Tensor col_lse = at::full({N}, ninf, f.I.options());
  at::Tensor diag = at::full({M}, ninf, f.I.options());
  // The kept rows, (keep_rows x cols) contiguous; held between calls (common/alloc.h), so
  // the next step's forward reuses this memory.
  at::Tensor tiles = keep_rows > 0 ? cached_huge_pages(keep_rows, cols, f.I.options())
                                   : at::empty({0}, f.I.options());
  if (M == 0 || N == 0) return {row_lse, col_lse, diag, tiles};
  const at::Tensor& A = swap ? f.T : f.I;
  const at::Tensor& B = swap ? f.I : f.T;
  at::Tensor& lse_A = swap ? col_lse : row_lse;
  at::Tensor& lse_B = swap ? row_lse : col_lse;
  const TilePlan plan(A.size(0), B.size(0));
  const Positives pos(offset, M, N, swap);
  AT_DISPATCH_FLOATING_TYPES(f.dtype, "infonce_lse", [&] {
    lse_pass<scalar_t>(plan, A, B, static_cast<scalar_t>(f.scale), static_cast<scalar_t>(f.bias),
                       pos, swap, keep_rows > 0 ? tiles : at::Tensor(), lse_A.data_ptr<scalar_t>(),
                       lse_B.data_ptr<scalar_t>(), diag.data_ptr<scalar_t>());
  });
  return {row_lse, col_lse, diag, tiles};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_grad(
    const at::Tensor& I, const at::Tensor& T, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_w, const at::Tensor& col_w, int64_t offset, const at::Tensor& tiles) {
  const char* fn = "infonce_grad";
  const Features f = prepare_features(I, T, scale, bias, fn);
  const int64_t M = f.I.size(0), N = f.T.size(0);
  const at::Tensor rlse = vector_arg(row_lse, M, f.dtype, fn, "row_lse");
  const at::Tensor clse = vector_arg(col_lse, N, f.dtype, fn, "col_lse");
  const at::Tensor rw = vector_arg(row_w, M, f.dtype, fn, "row_w");
  const at::Tensor cw = vector_arg(col_w, N, f.dtype, fn, "col_w");
  TORCH_CHECK(tiles.defined(), fn, ": tiles must be a tensor (empty to recompute the logits)");
  TORCH_CHECK(tiles.device().is_cpu(), fn, ": tiles must be a CPU tensor, got ", tiles.device());
  const bool kept = !(tiles.dim() == 1 && tiles.size(0) == 0);
  const bool swap = swap_sides(M, N);
  const int64_t rows = swap ? N : M, cols = swap ? M : N;
  if (kept) {
    TORCH_CHECK(tiles.dim() == 2 && tiles.size(0) > 0 && tiles.size(1) == cols, fn,
                ": tiles must be empty (shape (0,)) or the kept rows of the logits, of shape (K, ",
                cols, ") with K as infonce_lse's keep_rows, got ", tiles.sizes());
    check_keep_rows(tiles.size(0), rows, fn);
    TORCH_CHECK(tiles.scalar_type() == f.dtype, fn, ": tiles must have the compute dtype ",
                f.dtype, ", got ", tiles.scalar_type());
  }
  // Written in full by the pass (zeros when the other side is empty).
  at::Tensor A_I = M > 0 && N > 0 ? at::empty_like(f.I) : at::zeros_like(f.I);
  at::Tensor A_T = M > 0 && N > 0 ? at::empty_like(f.T) : at::zeros_like(f.T);
  double psum = 0;
  if (M > 0 && N > 0) {
    const at::Tensor& A = swap ? f.T : f.I;
    const at::Tensor& B = swap ? f.I : f.T;
    const at::Tensor& lse_A = swap ? clse : rlse;
    const at::Tensor& lse_B = swap ? rlse : clse;
    const at::Tensor& w_A = swap ? cw : rw;
    const at::Tensor& w_B = swap ? rw : cw;
    // The kept rows: what infonce_lse returned is already contiguous (no copy); any other
    // layout is copied. Only read: the tensor may be reused.
    const at::Tensor X = kept ? tiles.detach().contiguous() : at::Tensor();
    const int64_t kept_rows = kept ? X.size(0) : 0;
    const TilePlan plan(A.size(0), B.size(0));
    const Positives pos(offset, M, N, swap);
    std::vector<double> chunk_psum(plan.chunks, 0.0);
    AT_DISPATCH_FLOATING_TYPES(f.dtype, "infonce_grad", [&] {
      const scalar_t s = static_cast<scalar_t>(f.scale);
      const scalar_t b = static_cast<scalar_t>(f.bias);
      const scalar_t* la = lse_A.data_ptr<scalar_t>();
      const scalar_t* lb = lse_B.data_ptr<scalar_t>();
      const scalar_t* wa = w_A.data_ptr<scalar_t>();
      const scalar_t* wb = w_B.data_ptr<scalar_t>();
      weighted_pass<scalar_t>(
          plan, A, B, X, swap ? A_T : A_I, swap ? A_I : A_T,
          [&](const scalar_t* x, int64_t ld, scalar_t* W, int64_t r0, int64_t bm, int64_t c0,
              int64_t bn, int64_t t) {
            // Kept tiles already hold X: s = 1, b = 0 leave them unchanged.
            const bool k = r0 < kept_rows;
            chunk_psum[t] += p_tile(x, ld, W, bm, bn, k ? scalar_t(1) : s, k ? scalar_t(0) : b,
                                    pos.any, pos.diag0(r0, c0), wa + r0, la + r0, wb + c0,
                                    lb + c0);
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

  // Row and column log-sum-exp of X = scale * image @ text.T + bias in one pass, the
  // positive pairs (i, i + offset) left out.
  //
  // image: (M, D), text: (N, D); scale, bias: one-element tensors (bias may be None); offset:
  // any integer (positives outside the matrix are simply absent); keep_rows: how many rows of
  // the logits to keep for infonce_grad, in the kernel frame (X when M <= N, X^T when M > N,
  // rows = min(M, N)): 0, all rows, or a multiple of 256 (whole row blocks). Returns
  //   row_lse_off (M,): log sum_{j != i + offset} exp(X[i, j])  (-inf when nothing is left),
  //   col_lse_off (N,): log sum_{i : i + offset != j} exp(X[i, j]),
  //   diag (M,): X[i, i + offset] exactly as the pass computed it (-inf where absent),
  //   tiles: the first keep_rows rows of the kernel-frame logits, (keep_rows, max(M, N))
  //          contiguous, for infonce_grad; an empty (0,) tensor when keep_rows is 0.
  // float64 inputs give float64 outputs; float32, float16 and bfloat16 inputs are computed
  // and returned in float32.
  m.def(
      "infonce_lse(Tensor image, Tensor text, Tensor scale, Tensor? bias, int offset, "
      "int keep_rows) -> (Tensor, Tensor, Tensor, Tensor)");

  // Softmax-gradient accumulation for InfoNCE, off the positives.
  //
  // With P[i, j] = row_w[i] * exp(X[i, j] - row_lse[i]) + col_w[j] * exp(X[i, j] - col_lse[j])
  // for j != i + offset and P[i, i + offset] = 0, returns (A_I = P @ text (M, D),
  // A_T = P.T @ image (N, D), psum = P.sum() (0-dim)), in the compute dtype of infonce_lse.
  // row_lse/col_lse are the full LSEs. tiles: the rows kept by infonce_lse (compute dtype;
  // read, never modified; the rest are recomputed), or an empty (0,) tensor to recompute all.
  m.def(
      "infonce_grad(Tensor image, Tensor text, Tensor scale, Tensor? bias, Tensor row_lse, "
      "Tensor col_lse, Tensor row_w, Tensor col_w, int offset, Tensor tiles) -> "
      "(Tensor, Tensor, Tensor)");
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
