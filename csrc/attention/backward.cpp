// Cross-attention backward on CPU: FlashAttention-2's recomputation from the saved lse.
//
// dQ strategy: a task is one (sequence, K/V head) and owns every gradient row it touches:
// the dK/dV rows of its keys and the dQ rows of its group's H/Hk query heads, so no two
// tasks write the same row and nothing needs atomics. It walks key blocks (outer) and, for
// each of its query heads, the query blocks that see the key block (inner): S = Q K^T and
// dP = dO V^T (BLAS), one elementwise pass that recomputes P = exp(scale S - lse) and forms
// dS = scale P (dP Z/(1-p) - D), then dV += Pd^T dO, dK += dS^T Q and dQ += dS K (BLAS,
// accumulated in place). Five tile GEMMs: 2.5x the forward's FLOPs, nothing recomputed
// beyond S (a separate dQ pass would recompute S and dP: 7 GEMMs, 40% more). The price is
// parallelism, N x Hk units: when there are fewer units than threads, each unit's key range
// is split and the extra dQ partials are summed after (backward_kernel). Every row
// accumulates in a fixed order (key blocks, then heads, then query blocks), so results are
// bitwise reproducible.
//
// D = rowsum(dO * O) is computed per task for its query rows. The dropout mask is
// regenerated from the hash (attention.h), never stored. Padding is skipped as in the
// forward (trimmed key range, skipped blocks), and with causal each key block starts at the
// first query row that sees it.
//
// Registers mmkernels::attention_cpu_bwd (CPU kernel; fake tensor implementation in
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

// One tile: S (bq x bk raw Q K^T) and G (bq x bk raw dO V^T), both with row stride bk, of
// query rows with log-sum-exps lse[i] and D[i]. Overwrites S with Pd (the probabilities
// after dropout, what multiplied V in the forward) and G with dS * scale, so that the three
// gradient GEMMs read them directly. Keys a row does not see get P = 0 by selection (a
// masked key's score may be NaN and must not leak); rows with lse = +inf (no key seen) get
// P = e^-inf = 0.
template <typename T>
MMK_INLINE void grad_tile_impl(T* S, T* G, int64_t bq, int64_t bk, T scale, const uint8_t* masked,
                               bool causal, int64_t lim0, const T* lse, const T* D,
                               TileDropout dr, T keep_scale) {
  for (int64_t i = 0; i < bq; ++i) {
    T* x = S + i * bk;
    T* g = G + i * bk;
    const int64_t lim = causal ? std::min(std::max<int64_t>(lim0 + i, 0), bk) : bk;
    const T L = lse[i], Di = D[i];
    if (dr.on) {
      const uint32_t row = dr.row0 + static_cast<uint32_t>(i);
#pragma omp simd
      for (int64_t j = 0; j < lim; ++j) {
        T p = fast_exp(x[j] * scale - L);
        if (masked != nullptr) p = masked[j] ? T(0) : p;
        const T z =
            Dropout::keep(dr.key_hash[j], row, dr.seed_lo, dr.threshold) ? keep_scale : T(0);
        g[j] = scale * p * (g[j] * z - Di);
        x[j] = p * z;
      }
    } else if (masked != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < lim; ++j) {
        T p = fast_exp(x[j] * scale - L);
        p = masked[j] ? T(0) : p;
        g[j] = scale * p * (g[j] - Di);
        x[j] = p;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < lim; ++j) {
        const T p = fast_exp(x[j] * scale - L);
        g[j] = scale * p * (g[j] - Di);
        x[j] = p;
      }
    }
    for (int64_t j = lim; j < bk; ++j) {
      x[j] = 0;
      g[j] = 0;
    }
  }
}

MMK_MULTIVERSION void grad_tile(float* S, float* G, int64_t bq, int64_t bk, float scale,
                                const uint8_t* masked, bool causal, int64_t lim0, const float* lse,
                                const float* D, TileDropout dr, float keep_scale) {
  grad_tile_impl<float>(S, G, bq, bk, scale, masked, causal, lim0, lse, D, dr, keep_scale);
}

void grad_tile(double* S, double* G, int64_t bq, int64_t bk, double scale, const uint8_t* masked,
               bool causal, int64_t lim0, const double* lse, const double* D, TileDropout dr,
               double keep_scale) {
  grad_tile_impl<double>(S, G, bq, bk, scale, masked, causal, lim0, lse, D, dr, keep_scale);
}

template <typename T>
void zero_rows(const Rows<T>& x, const Seq& sq, int64_t t0, int64_t n, int64_t h, int64_t d) {
  for (int64_t i = 0; i < n; ++i) {
    T* r = x.row(sq.b, t0 + i, h);
    std::fill(r, r + d, T(0));
  }
}

// A task: the (sequence, K/V head) unit, or one key range of it (see backward_kernel).
struct BwdTask {
  int64_t s, g;
  int64_t key0, key1;  // owns (zeroes and accumulates) the dK/dV rows of keys [key0, key1)
  int64_t part;        // -1: accumulates dQ in place (zeroing it first); else its private
                       // dQ partial starts at parts[part]
  int64_t cost;
};

template <typename T>
void backward_kernel(const Problem& P, const Rows<const T>& q, const Rows<const T>& k,
                     const Rows<const T>& v, const Rows<const T>& dout, const Rows<const T>& out,
                     const T* lse, const Rows<T>& dq, const Rows<T>& dk, const Rows<T>& dv) {
  const int64_t Dqk = P.Dqk, Dv = P.Dv, group = P.group;
  // With fewer (sequence, K/V head) units than threads (one sample with one K/V head, say),
  // each unit's key blocks are split into contiguous ranges, one task each. Only the first
  // range accumulates dQ in place; the others into private partials, added to dQ after the
  // parallel region in range order. The split depends on the thread count only, so a given
  // call is still bitwise reproducible.
  const int64_t units = static_cast<int64_t>(P.seqs.size()) * P.Hk;
  const int64_t threads = at::get_num_threads();
  const int64_t split = units >= threads ? 1 : ceil_div(threads, std::max<int64_t>(units, 1));
  std::vector<BwdTask> tasks;
  int64_t parts_size = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(P.seqs.size()); ++s) {
    const Seq& sq = P.seqs[s];
    const int64_t blocks = ceil_div(sq.kend, kBwdKBlock);
    const int64_t ranges = std::max<int64_t>(1, std::min(split, blocks));
    for (int64_t g = 0; g < P.Hk; ++g) {
      for (int64_t c = 0; c < ranges; ++c) {
        const int64_t key0 = c == 0 ? 0 : c * blocks / ranges * kBwdKBlock;
        const int64_t key1 = c == ranges - 1 ? sq.lk : (c + 1) * blocks / ranges * kBwdKBlock;
        int64_t part = -1;
        if (c > 0) {
          part = parts_size;
          parts_size += group * sq.lq * Dqk;
        }
        const int64_t keys = std::max<int64_t>(0, std::min(key1, sq.kend) - key0);
        tasks.push_back(BwdTask{s, g, key0, key1, part, (sq.lq + 1) * (keys + 1)});
      }
    }
  }
  // Summation order of the partials: the order they were created in.
  std::vector<BwdTask> partials;
  for (const BwdTask& task : tasks) {
    if (task.part >= 0) partials.push_back(task);
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const BwdTask& a, const BwdTask& b) { return a.cost > b.cost; });

  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t tile = kBwdQBlock * kBwdKBlock;
  std::vector<std::vector<T>> scratch(static_cast<size_t>(workers(n)));
  std::vector<T> parts(static_cast<size_t>(parts_size));
  const T scale = static_cast<T>(P.scale);
  const T keep_scale = static_cast<T>(P.dropout.keep_scale);

  run_tasks(n, [&](int64_t t, int64_t w) {
    const BwdTask& task = tasks[t];
    const Seq& sq = P.seqs[task.s];
    const int64_t g = task.g, lq = sq.lq;
    std::vector<T>& buf = scratch[w];
    buf.resize(std::max<size_t>(buf.size(), static_cast<size_t>(2 * tile + group * lq)));
    T* const S = buf.data();
    T* const G = S + tile;
    T* const D = G + tile;
    T* const part = task.part >= 0 ? parts.data() + task.part : nullptr;

    zero_rows(dk, sq, sq.k0 + task.key0, task.key1 - task.key0, g, Dqk);
    zero_rows(dv, sq, sq.k0 + task.key0, task.key1 - task.key0, g, Dv);
    if (part != nullptr) std::fill(part, part + group * lq * Dqk, T(0));
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t h = g * group + hh;
      if (part == nullptr) zero_rows(dq, sq, sq.q0, lq, h, Dqk);
      for (int64_t i = 0; i < lq; ++i) {
        const T* o = out.row(sq.b, sq.q0 + i, h);
        const T* go = dout.row(sq.b, sq.q0 + i, h);
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < Dv; ++d) acc += o[d] * go[d];
        D[hh * lq + i] = acc;
      }
    }

    const int64_t shift = Problem::causal_shift(sq);
    const int64_t key_end = std::min(task.key1, sq.kend);
    for (int64_t k0 = task.key0; k0 < key_end; k0 += kBwdKBlock) {
      const int64_t bk = std::min(kBwdKBlock, key_end - k0);
      if (P.live_keys(sq, k0, k0 + bk) == 0) continue;
      const uint8_t* masked = P.key_mask(sq, k0, bk);
      const T* const K = k.row(sq.b, sq.k0 + k0, g);
      const T* const V = v.row(sq.b, sq.k0 + k0, g);
      T* const dK = dk.row(sq.b, sq.k0 + k0, g);
      T* const dV = dv.row(sq.b, sq.k0 + k0, g);
      // The first query row that sees key k0 (query i sees keys j <= i + shift).
      const int64_t first = P.causal ? std::max<int64_t>(0, k0 - shift) : 0;
      for (int64_t hh = 0; hh < group; ++hh) {
        const int64_t h = g * group + hh;
        for (int64_t q0 = first; q0 < lq; q0 += kBwdQBlock) {
          const int64_t bq = std::min(kBwdQBlock, lq - q0);
          const T* const Q = q.row(sq.b, sq.q0 + q0, h);
          const T* const dO = dout.row(sq.b, sq.q0 + q0, h);
          T* const dQ = part != nullptr ? part + (hh * lq + q0) * Dqk : dq.row(sq.b, sq.q0 + q0, h);
          const int64_t ldq = part != nullptr ? Dqk : dq.st;
          gemm<T>(false, true, bq, bk, Dqk, Q, q.st, K, k.st, S, bk, false);
          gemm<T>(false, true, bq, bk, Dv, dO, dout.st, V, v.st, G, bk, false);
          grad_tile(S, G, bq, bk, scale, masked, P.causal, q0 + shift + 1 - k0,
                    lse + P.lse_index(sq, h, q0), D + hh * lq + q0,
                    P.tile_dropout(sq, h, q0, k0), keep_scale);
          gemm<T>(true, false, bk, Dv, bq, S, bk, dO, dout.st, dV, dv.st, true);
          gemm<T>(true, false, bk, Dqk, bq, G, bk, Q, q.st, dK, dk.st, true);
          gemm<T>(false, false, bq, Dqk, bk, G, bk, K, k.st, dQ, ldq, true);
        }
      }
    }
  });

  for (const BwdTask& task : partials) {
    const Seq& sq = P.seqs[task.s];
    const T* src = parts.data() + task.part;
    for (int64_t hh = 0; hh < group; ++hh) {
      for (int64_t i = 0; i < sq.lq; ++i, src += Dqk) {
        T* dst = dq.row(sq.b, sq.q0 + i, task.g * group + hh);
        for (int64_t d = 0; d < Dqk; ++d) dst[d] += src[d];
      }
    }
  }
}

void check_like(const at::Tensor& x, at::IntArrayRef shape, at::ScalarType dtype, const char* fn,
                const char* name) {
  TORCH_CHECK(x.defined(), fn, ": ", name, " must be a tensor");
  TORCH_CHECK(x.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ",
              x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    bool causal, double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* fn = "attention_cpu_bwd";
  const Problem P = make_problem(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal,
                                 scale, dropout_p, seed, fn);
  const at::ScalarType dtype = compute_dtype(q.scalar_type());
  const std::vector<int64_t> out_shape =
      P.varlen ? std::vector<int64_t>{P.Lq, P.H, P.Dv} : std::vector<int64_t>{P.B, P.H, P.Lq, P.Dv};
  const std::vector<int64_t> lse_shape =
      P.varlen ? std::vector<int64_t>{P.H, P.Lq} : std::vector<int64_t>{P.B, P.H, P.Lq};
  check_like(grad_out, out_shape, q.scalar_type(), fn, "grad_out");
  check_like(out, out_shape, q.scalar_type(), fn, "out");
  check_like(lse, lse_shape, dtype, fn, "lse");

  const int64_t token_dim = P.varlen ? 0 : 2;
  const at::Tensor qc = prepare_operand(q, dtype, token_dim);
  const at::Tensor kc = prepare_operand(k, dtype, token_dim);
  const at::Tensor vc = prepare_operand(v, dtype, token_dim);
  const at::Tensor doc = prepare_operand(grad_out, dtype, token_dim);
  const at::Tensor oc = prepare_operand(out, dtype, token_dim);
  const at::Tensor lc = lse.detach().contiguous();
  // Gradients accumulate in the compute dtype (float16/bfloat16 rounded once at the end);
  // every row is zeroed by the task that owns it.
  const at::TensorOptions opts = q.options().dtype(dtype);
  at::Tensor dq = empty_output(q.sizes(), opts);
  at::Tensor dk = empty_output(k.sizes(), opts);
  at::Tensor dv = empty_output(v.sizes(), opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_cpu_bwd", [&] {
    backward_kernel<scalar_t>(
        P, rows_of<const scalar_t>(qc, P.varlen), rows_of<const scalar_t>(kc, P.varlen),
        rows_of<const scalar_t>(vc, P.varlen), rows_of<const scalar_t>(doc, P.varlen),
        rows_of<const scalar_t>(oc, P.varlen), lc.data_ptr<scalar_t>(),
        rows_of<scalar_t>(dq, P.varlen), rows_of<scalar_t>(dk, P.varlen),
        rows_of<scalar_t>(dv, P.varlen));
  });
  if (q.scalar_type() != dtype) {
    dq = dq.to(q.scalar_type());
    dk = dk.to(q.scalar_type());
    dv = dv.to(q.scalar_type());
  }
  return {dq, dk, dv};
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

  // Cross-attention backward: (dq, dk, dv) of sum(grad_out * out) for the forward of
  // attention_cpu_fwd with the same arguments, given its out and lse. Contiguous, shapes and
  // dtypes of q, k, v.
  m.def(
      "attention_cpu_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, bool causal, "
      "float scale, float dropout_p, Tensor? seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("attention_cpu_bwd", TORCH_FN(mmk::attention::attention_cpu_bwd));
}

// Not differentiable (see forward.cpp): outputs never require grad.
TORCH_LIBRARY_IMPL(mmkernels, Autograd, m) {
  m.impl("attention_cpu_bwd", torch::CppFunction::makeFallthrough());
}
