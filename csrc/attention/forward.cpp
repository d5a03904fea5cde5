// Cross-attention forward on CPU: FlashAttention-2's online softmax over key blocks.
//
// A task is one (sequence, query head, block of up to kFwdQBlock query rows). It walks the
// key blocks of its sequence in order: S = Q K^T (BLAS), one elementwise pass that scales,
// masks, takes the running row maxima and turns S into probabilities P (dropout applied to
// them, the row sums taken before), then acc = acc * e^(m_old - m_new) + P V (BLAS). Only
// an S tile and the accumulator exist per worker; the Lq x Lk probabilities never do. The
// row's log-sum-exp is kept for the backward. Blocks of at most kFwdFewRows fp32 rows use
// loops of their own instead of BLAS (see "Few query rows" below).
//
// Work on padding is skipped: each sequence's key range ends after its last unpadded key,
// key blocks with no unpadded key are skipped outright (blocks without padding run without
// per-key tests), and with causal a query block stops at the last key its last row sees.
//
// Registers mmkernels::attention_cpu_fwd (CPU kernel; fake tensor implementation in
// mmkernels/attention/cpu.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "attention/attention.h"

namespace mmk {
namespace attention {
namespace {

// One tile of raw dot products S (bq x bk, row stride bk) of query rows i0.. and keys k0..,
// folded into the running row state: m (row maxima of the scaled scores seen so far), l (sums
// of e^(score - m), before dropout). Overwrites S with the tile's probabilities relative to
// the new maxima (times keep/(1 - p) with dropout, 0 where a key is not seen) and writes
// alpha = e^(m_old - m_new), by which the caller rescales its accumulator rows.
// masked: per-key padding flags or nullptr; causal: row i sees tile columns < lim0 + i.
// A row whose maximum is still -inf (no key seen yet) uses offset 0, so masked scores give
// e^-inf = 0 and NaN scores stay NaN (and reach l, hence out and lse).
template <typename T>
MMK_INLINE void softmax_tile_impl(T* S, int64_t bq, int64_t bk, T scale, const uint8_t* masked,
                                  bool causal, int64_t lim0, T* m, T* l, T* alpha,
                                  TileDropout dr, T keep_scale) {
  const T ninf = neg_inf<T>();
  for (int64_t i = 0; i < bq; ++i) {
    T* x = S + i * bk;
    const int64_t lim = causal ? std::min(std::max<int64_t>(lim0 + i, 0), bk) : bk;
    T mx = ninf;
    if (masked != nullptr) {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < lim; ++j) {
        const T s = masked[j] ? ninf : x[j] * scale;
        x[j] = s;
        mx = max_of(mx, s);
      }
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < lim; ++j) {
        const T s = x[j] * scale;
        x[j] = s;
        mx = max_of(mx, s);
      }
    }
    const T m_new = max_of(m[i], mx);
    const T off = m_new == ninf ? T(0) : m_new;
    const T a = fast_exp(m[i] - off);
    T sum = 0;
    if (dr.on) {
      const uint32_t row = dr.row0 + static_cast<uint32_t>(i);
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < lim; ++j) {
        const T p = fast_exp(x[j] - off);
        sum += p;
        x[j] = Dropout::keep(dr.key_hash[j], row, dr.seed_lo, dr.threshold) ? p * keep_scale
                                                                            : T(0);
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < lim; ++j) {
        const T p = fast_exp(x[j] - off);
        sum += p;
        x[j] = p;
      }
    }
    for (int64_t j = lim; j < bk; ++j) x[j] = 0;
    l[i] = l[i] * a + sum;
    m[i] = m_new;
    alpha[i] = a;
  }
}

MMK_MULTIVERSION void softmax_tile(float* S, int64_t bq, int64_t bk, float scale,
                                   const uint8_t* masked, bool causal, int64_t lim0, float* m,
                                   float* l, float* alpha, TileDropout dr, float keep_scale) {
  softmax_tile_impl<float>(S, bq, bk, scale, masked, causal, lim0, m, l, alpha, dr, keep_scale);
}

void softmax_tile(double* S, int64_t bq, int64_t bk, double scale, const uint8_t* masked,
                  bool causal, int64_t lim0, double* m, double* l, double* alpha, TileDropout dr,
                  double keep_scale) {
  softmax_tile_impl<double>(S, bq, bk, scale, masked, causal, lim0, m, l, alpha, dr, keep_scale);
}

// ---------------------------------------------------------------------------------------
// Few query rows, without BLAS
// ---------------------------------------------------------------------------------------
//
// A query block of at most kFwdFewRows rows (decoding, short captions, the last block of a
// sequence) makes tile products only a few rows deep, where BLAS runs at a third of its rate
// or less: it packs both operands on every call for very little arithmetic. Such blocks are
// computed by loop nests of their own instead, which read every K and V row once for all
// the block's rows (measured on one Zen 4 core, B = 64, H = 8, Lk = 576, D = 64: BLAS 12, 22
// and 35 ms at Lq = 1, 4 and 16; these loops 8-10, 17 and 24 ms):
//  - up to kFwdDotRows rows (dot_step): scores are dot products along the head dim, and P V
//    adds scaled V rows to the accumulator rows; memory-bound for one row, as decoding is;
//  - up to 16 rows (lanes_step): the rows are the lanes of a vector. Qt holds the block
//    transposed (Dqk x L, zero-padded, L = 8 or 16), the scores tile St is (keys x L), and
//    every loop body is one L-lane operation per key and head dim (St[j] += K[j][d] Qt[d];
//    accT[d] += V[j][d] St[j]): no horizontal sums, and the softmax state of all rows is one
//    vector. Its cost hardly depends on the row count, while dot_step's grows with it; they
//    cross at ~6 rows.

// S (bq x bk, row stride bk) = Q K^T, one dot product per row and key.
MMK_INLINE void dot_scores(const float* Q, int64_t ldq, const float* K, int64_t ldk, int64_t bq,
                           int64_t bk, int64_t D, float* S) {
  for (int64_t j = 0; j < bk; ++j) {
    const float* kr = K + j * ldk;
    for (int64_t i = 0; i < bq; ++i) {
      const float* qr = Q + i * ldq;
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += qr[d] * kr[d];
      S[i * bk + j] = acc;
    }
  }
}

// acc (bq x Dv, row stride Dv) += P V, four keys per pass over an accumulator row.
MMK_INLINE void dot_values(const float* P, int64_t bq, int64_t bk, const float* V, int64_t ldv,
                           int64_t Dv, float* acc) {
  int64_t j = 0;
  for (; j + 4 <= bk; j += 4) {
    const float* v0 = V + j * ldv;
    const float* v1 = v0 + ldv;
    const float* v2 = v1 + ldv;
    const float* v3 = v2 + ldv;
    for (int64_t i = 0; i < bq; ++i) {
      const float* p = P + i * bk + j;
      const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
      float* a = acc + i * Dv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
    }
  }
  for (; j < bk; ++j) {
    const float* vr = V + j * ldv;
    for (int64_t i = 0; i < bq; ++i) {
      const float p = P[i * bk + j];
      float* a = acc + i * Dv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] += p * vr[d];
    }
  }
}

// One key block for up to kFwdDotRows rows: the BLAS path's steps (scores, softmax_tile_impl,
// rescale, P V) with the products above.
MMK_MULTIVERSION void dot_step(const float* Q, int64_t ldq, const float* K, int64_t ldk,
                               const float* V, int64_t ldv, int64_t bq, int64_t bk, int64_t Dqk,
                               int64_t Dv, float scale, const uint8_t* masked, bool causal,
                               int64_t lim0, TileDropout dr, float keep_scale, float* S, float* m,
                               float* l, float* alpha, float* acc) {
  dot_scores(Q, ldq, K, ldk, bq, bk, Dqk, S);
  softmax_tile_impl<float>(S, bq, bk, scale, masked, causal, lim0, m, l, alpha, dr, keep_scale);
  for (int64_t i = 0; i < bq; ++i) {
    float* a = acc + i * Dv;
    const float f = alpha[i];
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) a[d] *= f;
  }
  dot_values(S, bq, bk, V, ldv, Dv, acc);
}

// One key block of bk keys for a block of lanes: St = K Qt, the online softmax of
// softmax_tile per lane (lane i is the query row i of the block, lim0 + i its causal limit),
// and accT (Dv x L) = accT * alpha + V^T P. m, l: the lanes' running maxima and sums.
template <int L>
MMK_INLINE void lanes_step_impl(const float* Qt, const float* K, int64_t ldk, const float* V,
                                int64_t ldv, int64_t bk, int64_t Dqk, int64_t Dv, float scale,
                                const uint8_t* masked, bool causal, int64_t lim0, TileDropout dr,
                                float keep_scale, float* St, float* m, float* l, float* accT) {
  // St = K Qt, eight keys at a time: eight independent vector accumulators hide the FMA
  // latency.
  constexpr int kKeys = 8;
  int64_t j0 = 0;
  for (; j0 + kKeys <= bk; j0 += kKeys) {
    float acc[kKeys][L] = {};
    for (int64_t d = 0; d < Dqk; ++d) {
      const float* qt = Qt + d * L;
      for (int jj = 0; jj < kKeys; ++jj) {
        const float kd = K[(j0 + jj) * ldk + d];
#pragma omp simd
        for (int i = 0; i < L; ++i) acc[jj][i] += kd * qt[i];
      }
    }
    for (int jj = 0; jj < kKeys; ++jj) {
      for (int i = 0; i < L; ++i) St[(j0 + jj) * L + i] = acc[jj][i];
    }
  }
  for (; j0 < bk; ++j0) {
    float acc[L] = {};
    for (int64_t d = 0; d < Dqk; ++d) {
      const float kd = K[j0 * ldk + d];
#pragma omp simd
      for (int i = 0; i < L; ++i) acc[i] += kd * Qt[d * L + i];
    }
    for (int i = 0; i < L; ++i) St[j0 * L + i] = acc[i];
  }

  // Scale and mask (key j is seen by lane i iff unmasked and, with causal, j < lim0 + i),
  // lane maxima.
  const float ninf = neg_inf<float>();
  const int32_t lim = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(lim0, -L), bk));
  float mx[L];
  for (int i = 0; i < L; ++i) mx[i] = ninf;
  for (int64_t j = 0; j < bk; ++j) {
    float* x = St + j * L;
    const bool dead = masked != nullptr && masked[j];
    const int32_t jj = static_cast<int32_t>(j);
#pragma omp simd
    for (int i = 0; i < L; ++i) {
      const bool seen = !dead && (!causal || jj < lim + i);
      const float s = seen ? x[i] * scale : ninf;
      x[i] = s;
      mx[i] = max_of(mx[i], s);
    }
  }
  float off[L], alpha[L], sum[L];
  for (int i = 0; i < L; ++i) {
    const float m_new = max_of(m[i], mx[i]);
    off[i] = m_new == ninf ? 0.0f : m_new;
    alpha[i] = fast_exp(m[i] - off[i]);
    m[i] = m_new;
    sum[i] = 0.0f;
  }
  // Probabilities (row sums before dropout, as in softmax_tile).
  for (int64_t j = 0; j < bk; ++j) {
    float* x = St + j * L;
    if (dr.on) {
      const uint32_t kh = dr.key_hash[j];
#pragma omp simd
      for (int i = 0; i < L; ++i) {
        const float p = fast_exp(x[i] - off[i]);
        sum[i] += p;
        const uint32_t row = dr.row0 + static_cast<uint32_t>(i);
        x[i] = Dropout::keep(kh, row, dr.seed_lo, dr.threshold) ? p * keep_scale : 0.0f;
      }
    } else {
#pragma omp simd
      for (int i = 0; i < L; ++i) {
        const float p = fast_exp(x[i] - off[i]);
        sum[i] += p;
        x[i] = p;
      }
    }
  }
  for (int i = 0; i < L; ++i) l[i] = l[i] * alpha[i] + sum[i];

  // accT = accT * alpha + V^T P, eight head dims at a time (eight vector accumulators), over
  // runs of 32 keys: a run's V rows (8 KiB at Dv = 64) stay in L1 while every group of head
  // dims passes over them, so V is streamed from memory once.
  for (int64_t d = 0; d < Dv; ++d) {
#pragma omp simd
    for (int i = 0; i < L; ++i) accT[d * L + i] *= alpha[i];
  }
  constexpr int kDims = 8;
  constexpr int64_t kRun = 32;
  for (int64_t r0 = 0; r0 < bk; r0 += kRun) {
    const int64_t r1 = std::min(bk, r0 + kRun);
    int64_t d0 = 0;
    for (; d0 + kDims <= Dv; d0 += kDims) {
      float acc[kDims][L];
      for (int dd = 0; dd < kDims; ++dd) {
        for (int i = 0; i < L; ++i) acc[dd][i] = accT[(d0 + dd) * L + i];
      }
      for (int64_t j = r0; j < r1; ++j) {
        const float* p = St + j * L;
        const float* vr = V + j * ldv + d0;
        for (int dd = 0; dd < kDims; ++dd) {
          const float vd = vr[dd];
#pragma omp simd
          for (int i = 0; i < L; ++i) acc[dd][i] += vd * p[i];
        }
      }
      for (int dd = 0; dd < kDims; ++dd) {
        for (int i = 0; i < L; ++i) accT[(d0 + dd) * L + i] = acc[dd][i];
      }
    }
    for (; d0 < Dv; ++d0) {
      float acc[L];
      for (int i = 0; i < L; ++i) acc[i] = accT[d0 * L + i];
      for (int64_t j = r0; j < r1; ++j) {
        const float vd = V[j * ldv + d0];
#pragma omp simd
        for (int i = 0; i < L; ++i) acc[i] += vd * St[j * L + i];
      }
      for (int i = 0; i < L; ++i) accT[d0 * L + i] = acc[i];
    }
  }
}

MMK_MULTIVERSION void lanes_step8(const float* Qt, const float* K, int64_t ldk, const float* V,
                                  int64_t ldv, int64_t bk, int64_t Dqk, int64_t Dv, float scale,
                                  const uint8_t* masked, bool causal, int64_t lim0,
                                  TileDropout dr, float keep_scale, float* St, float* m, float* l,
                                  float* accT) {
  lanes_step_impl<8>(Qt, K, ldk, V, ldv, bk, Dqk, Dv, scale, masked, causal, lim0, dr,
                     keep_scale, St, m, l, accT);
}

MMK_MULTIVERSION void lanes_step16(const float* Qt, const float* K, int64_t ldk, const float* V,
                                   int64_t ldv, int64_t bk, int64_t Dqk, int64_t Dv, float scale,
                                   const uint8_t* masked, bool causal, int64_t lim0,
                                   TileDropout dr, float keep_scale, float* St, float* m,
                                   float* l, float* accT) {
  lanes_step_impl<16>(Qt, K, ldk, V, ldv, bk, Dqk, Dv, scale, masked, causal, lim0, dr,
                      keep_scale, St, m, l, accT);
}

struct FwdTask {
  int64_t s, h, q0, bq, kend, cost;
};

template <typename T>
void forward_kernel(const Problem& P, const Rows<const T>& q, const Rows<const T>& k,
                    const Rows<const T>& v, const Rows<T>& out, T* lse) {
  std::vector<FwdTask> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(P.seqs.size()); ++s) {
    const Seq& sq = P.seqs[s];
    for (int64_t q0 = 0; q0 < sq.lq; q0 += kFwdQBlock) {
      const int64_t bq = std::min(kFwdQBlock, sq.lq - q0);
      int64_t kend = sq.kend;
      // The block's last row sees keys j <= q0 + bq - 1 + shift.
      if (P.causal) {
        kend = std::max<int64_t>(0, std::min(kend, q0 + bq + Problem::causal_shift(sq)));
      }
      for (int64_t h = 0; h < P.H; ++h) {
        tasks.push_back(FwdTask{s, h, q0, bq, kend, bq * (kend + 1)});
      }
    }
  }
  // Most expensive first (run_tasks hands them out in order); stable, so deterministic.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const FwdTask& a, const FwdTask& b) { return a.cost > b.cost; });

  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t Dqk = P.Dqk, Dv = P.Dv;
  // Per worker: the S tile, the output accumulator (bq x Dv, or Dv x lanes), the transposed
  // query block of the lanes path, and the rows' m, l, alpha.
  const int64_t per_worker = kFwdTile + kFwdQBlock * Dv + kFwdFewRows * Dqk + 3 * kFwdQBlock;
  std::vector<T> scratch(static_cast<size_t>(workers(n) * per_worker));
  const T scale = static_cast<T>(P.scale);
  const T keep_scale = static_cast<T>(P.dropout.keep_scale);

  run_tasks(n, [&](int64_t t, int64_t w) {
    const FwdTask& task = tasks[t];
    const Seq& sq = P.seqs[task.s];
    const int64_t h = task.h, hk = h / P.group, q0 = task.q0, bq = task.bq;
    T* const S = scratch.data() + w * per_worker;
    T* const acc = S + kFwdTile;
    T* const Qt = acc + kFwdQBlock * Dv;
    T* const m = Qt + kFwdFewRows * Dqk;
    T* const l = m + kFwdQBlock;
    T* const alpha = l + kFwdQBlock;
    const T* const Q = q.row(sq.b, sq.q0 + q0, h);
    const int64_t lim_base = q0 + Problem::causal_shift(sq) + 1;
    // The paths without BLAS are fp32 only (float64 is the exactness path). Lanes: 8 or 16,
    // the block's rows first and zeros after them.
    bool dots = false;
    int64_t lanes = 0;
    if constexpr (std::is_same<T, float>::value) {
      dots = bq <= kFwdDotRows;
      if (!dots && bq <= kFwdFewRows) lanes = bq <= 8 ? 8 : 16;
    }
    const int64_t rows = lanes > 0 ? lanes : bq;
    std::fill(m, m + rows, neg_inf<T>());
    std::fill(l, l + rows, T(0));
    std::fill(acc, acc + rows * Dv, T(0));
    if (lanes > 0) {
      std::fill(Qt, Qt + lanes * Dqk, T(0));
      for (int64_t i = 0; i < bq; ++i) {
        for (int64_t d = 0; d < Dqk; ++d) Qt[d * lanes + i] = Q[i * q.st + d];
      }
    }

    const int64_t kb = fwd_key_block(rows);
    for (int64_t k0 = 0; k0 < task.kend; k0 += kb) {
      const int64_t bk = std::min(kb, task.kend - k0);
      if (P.live_keys(sq, k0, k0 + bk) == 0) continue;
      const T* const K = k.row(sq.b, sq.k0 + k0, hk);
      const T* const V = v.row(sq.b, sq.k0 + k0, hk);
      const uint8_t* const masked = P.key_mask(sq, k0, bk);
      const TileDropout dr = P.tile_dropout(sq, h, q0, k0);
      if constexpr (std::is_same<T, float>::value) {
        if (dots) {
          dot_step(Q, q.st, K, k.st, V, v.st, bq, bk, Dqk, Dv, scale, masked, P.causal,
                   lim_base - k0, dr, keep_scale, S, m, l, alpha, acc);
          continue;
        }
        if (lanes > 0) {
          (lanes == 8 ? lanes_step8 : lanes_step16)(Qt, K, k.st, V, v.st, bk, Dqk, Dv, scale,
                                                    masked, P.causal, lim_base - k0, dr,
                                                    keep_scale, S, m, l, acc);
          continue;
        }
      }
      gemm<T>(false, true, bq, bk, Dqk, Q, q.st, K, k.st, S, bk, false);
      softmax_tile(S, bq, bk, scale, masked, P.causal, lim_base - k0, m, l, alpha, dr,
                   keep_scale);
      for (int64_t i = 0; i < bq; ++i) {
        const T a = alpha[i];
        if (a == T(1)) continue;
        T* r = acc + i * Dv;
        for (int64_t d = 0; d < Dv; ++d) r[d] *= a;
      }
      gemm<T>(false, false, bq, Dv, bk, S, bk, V, v.st, acc, Dv, true);
    }

    // Normalise; rows that saw no key get zeros and lse = +inf. Accumulator element (i, d)
    // sits at i * Dv + d, or d * lanes + i in the lanes path.
    const int64_t si = lanes > 0 ? 1 : Dv, sd = lanes > 0 ? lanes : 1;
    T* const lse_row = lse + P.lse_index(sq, h, q0);
    for (int64_t i = 0; i < bq; ++i) {
      T* o = out.row(sq.b, sq.q0 + q0 + i, h);
      if (l[i] == T(0)) {
        std::fill(o, o + Dv, T(0));
        lse_row[i] = std::numeric_limits<T>::infinity();
        continue;
      }
      const T inv = T(1) / l[i];
      const T* r = acc + i * si;
      for (int64_t d = 0; d < Dv; ++d) o[d] = r[d * sd] * inv;
      lse_row[i] = m[i] + std::log(l[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_cpu_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    bool causal, double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* fn = "attention_cpu_fwd";
  const Problem P = make_problem(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal,
                                 scale, dropout_p, seed, fn);
  const at::ScalarType dtype = compute_dtype(q.scalar_type());
  const int64_t token_dim = P.varlen ? 0 : 2;
  const at::Tensor qc = prepare_operand(q, dtype, token_dim);
  const at::Tensor kc = prepare_operand(k, dtype, token_dim);
  const at::Tensor vc = prepare_operand(v, dtype, token_dim);
  const at::TensorOptions opts = q.options().dtype(dtype);
  // Outputs in the compute dtype, written in full by the kernel (float16/bfloat16 rounded
  // once at the end).
  at::Tensor out = P.varlen ? empty_output({P.Lq, P.H, P.Dv}, opts)
                            : empty_output({P.B, P.H, P.Lq, P.Dv}, opts);
  at::Tensor lse = P.varlen ? at::empty({P.H, P.Lq}, opts) : at::empty({P.B, P.H, P.Lq}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_cpu_fwd", [&] {
    forward_kernel<scalar_t>(
        P, rows_of<const scalar_t>(qc, P.varlen), rows_of<const scalar_t>(kc, P.varlen),
        rows_of<const scalar_t>(vc, P.varlen), rows_of<scalar_t>(out, P.varlen),
        lse.data_ptr<scalar_t>());
  });
  if (q.scalar_type() != dtype) out = out.to(q.scalar_type());
  return {out, lse};
}

}  // namespace
}  // namespace attention
}  // namespace mmk

// ---------------------------------------------------------------------------------------
// Registration (torch.ops.mmkernels.*), see csrc/contrastive/infonce.cpp.
// ---------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(mmkernels, m) {
  // Fake (meta) implementations are registered from Python, in this module.
  m.set_python_module("mmkernels.attention.cpu");

  // Cross-attention forward (semantics: mmkernels/attention/reference.py). Dense: q (B, H,
  // Lq, Dqk), k (B, Hk, Lk, Dqk), v (B, Hk, Lk, Dv), key_padding_mask (B, Lk) bool (True =
  // ignore) or None; varlen (cu_seqlens_q/k int32 (N + 1,)): q (Tq, H, Dqk), k/v (Tk, Hk, .).
  // Returns out (q's shape with Dv, q's dtype, contiguous) and lse ((B, H, Lq) dense,
  // (H, Tq) varlen; float64 for float64 inputs, else float32). seed: int64 one-element
  // tensor, required when dropout_p > 0.
  m.def(
      "attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, bool causal, float scale, float dropout_p, "
      "Tensor? seed) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("attention_cpu_fwd", TORCH_FN(mmk::attention::attention_cpu_fwd));
}

// Not differentiable here (the Python layer wires forward and backward together): the
// Autograd key falls through, so outputs never require grad, whatever the inputs.
TORCH_LIBRARY_IMPL(mmkernels, Autograd, m) {
  m.impl("attention_cpu_fwd", torch::CppFunction::makeFallthrough());
}
