// Cross-attention forward on CPU: FlashAttention-2's online softmax over key blocks.
//
// A task is one (sequence, query head, block of up to kFwdQBlock query rows). It walks the
// key blocks of its sequence in order: S = Q K^T (BLAS), one elementwise pass that scales,
// masks, takes the running row maxima and turns S into probabilities P (dropout applied to
// them, the row sums taken before), then acc = acc * e^(m_old - m_new) + P V (BLAS). Only
// an S tile and the accumulator exist per worker; the Lq x Lk probabilities never do. The
// row's log-sum-exp is kept for the backward.
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
      if (P.causal) kend = std::max<int64_t>(0, std::min(kend, q0 + bq + Problem::causal_shift(sq)));
      for (int64_t h = 0; h < P.H; ++h) tasks.push_back(FwdTask{s, h, q0, bq, kend, bq * (kend + 1)});
    }
  }
  // Most expensive first (run_tasks hands them out in order); stable, so deterministic.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const FwdTask& a, const FwdTask& b) { return a.cost > b.cost; });

  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t Dqk = P.Dqk, Dv = P.Dv;
  const int64_t per_worker = kFwdQBlock * (kFwdKBlock + Dv + 3);
  std::vector<T> scratch(static_cast<size_t>(workers(n) * per_worker));
  const T scale = static_cast<T>(P.scale);
  const T keep_scale = static_cast<T>(P.dropout.keep_scale);

  run_tasks(n, [&](int64_t t, int64_t w) {
    const FwdTask& task = tasks[t];
    const Seq& sq = P.seqs[task.s];
    const int64_t h = task.h, hk = h / P.group, q0 = task.q0, bq = task.bq;
    T* const S = scratch.data() + w * per_worker;
    T* const acc = S + kFwdQBlock * kFwdKBlock;
    T* const m = acc + kFwdQBlock * Dv;
    T* const l = m + kFwdQBlock;
    T* const alpha = l + kFwdQBlock;
    std::fill(m, m + bq, neg_inf<T>());
    std::fill(l, l + bq, T(0));
    std::fill(acc, acc + bq * Dv, T(0));
    const T* const Q = q.row(sq.b, sq.q0 + q0, h);
    const int64_t lim_base = q0 + Problem::causal_shift(sq) + 1;

    for (int64_t k0 = 0; k0 < task.kend; k0 += kFwdKBlock) {
      const int64_t bk = std::min(kFwdKBlock, task.kend - k0);
      if (P.live_keys(sq, k0, k0 + bk) == 0) continue;
      gemm<T>(false, true, bq, bk, Dqk, Q, q.st, k.row(sq.b, sq.k0 + k0, hk), k.st, S, bk,
              false);
      softmax_tile(S, bq, bk, scale, P.key_mask(sq, k0, bk), P.causal, lim_base - k0, m, l,
                   alpha, P.tile_dropout(sq, h, q0, k0), keep_scale);
      for (int64_t i = 0; i < bq; ++i) {
        const T a = alpha[i];
        if (a == T(1)) continue;
        T* r = acc + i * Dv;
        for (int64_t d = 0; d < Dv; ++d) r[d] *= a;
      }
      gemm<T>(false, false, bq, Dv, bk, S, bk, v.row(sq.b, sq.k0 + k0, hk), v.st, acc, Dv,
              true);
    }

    T* const lse_row = lse + P.lse_index(sq, h, q0);
    for (int64_t i = 0; i < bq; ++i) {
      T* o = out.row(sq.b, sq.q0 + q0 + i, h);
      if (l[i] == T(0)) {  // no key seen
        std::fill(o, o + Dv, T(0));
        lse_row[i] = std::numeric_limits<T>::infinity();
        continue;
      }
      const T inv = T(1) / l[i];
      const T* r = acc + i * Dv;
      for (int64_t d = 0; d < Dv; ++d) o[d] = r[d] * inv;
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
  at::Tensor out = P.varlen ? at::empty({P.Lq, P.H, P.Dv}, opts)
                            : at::empty({P.B, P.H, P.Lq, P.Dv}, opts);
  at::Tensor lse = P.varlen ? at::empty({P.H, P.Lq}, opts) : at::empty({P.B, P.H, P.Lq}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_cpu_fwd", [&] {
    forward_kernel<scalar_t>(P, rows_of<const scalar_t>(qc, P.varlen),
                             rows_of<const scalar_t>(kc, P.varlen),
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
