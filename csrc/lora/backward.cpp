// Fused LoRA linear backward on CPU (shared pieces and the row order: lora.h).
//
// Given dY and the forward's u, with D the dropout factors (regenerated, never stored):
//   du = s dY B            dB[n] = s sum_{id=n} dY^T u        dA[n] = sum_{id=n} du^T (x o D)
//   dx = dY W + (du A) o D                                    dW = dY^T x, db = sum dY
//
// The sorted row blocks are split into groups of consecutive blocks, a few per thread, handed
// out to the threads dynamically. Per block: dX = dY W
// (one tile GEMM), then for each same-adapter run of the block: du (one GEMM), dB += dY^T u
// (the block's dY rows read from cache by all three products: dY is read from memory once;
// dB is accumulated transposed, dB^T += u^T dY, and transposed back at the end),
// and, kMaskRows rows at a time, x o D (the mask regenerated), dA += du^T (x o D) and
// dX += (du A) o D; then one write of dx at the rows' original positions.
//
// dA/dB without atomics, bitwise reproducible: each group accumulates into the gradient of an
// adapter directly when it is the first group with rows of that adapter, into a private
// partial otherwise. Runs are in sorted order, so only a group's first adapter can have rows
// in an earlier group: one partial per group at most. The partials are added after the
// parallel region in group order. The grouping depends on the thread setting only, not on
// which thread runs which group.
//
// dW and db (rare: the base layer is frozen in LoRA training) are one at::mm and one sum.
//
// Registers mmkernels::lora_cpu_bwd (CPU kernel; fake tensor implementation in
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

struct Needs {
  bool dx, dA, dB;
};

template <typename S>
void backward_kernel(const Problem& P, const S* dy, const S* x, const compute_t<S>* W,
                     const compute_t<S>* A, const compute_t<S>* B, const compute_t<S>* u,
                     Needs need, S* dx, compute_t<S>* dA, compute_t<S>* dBt,
                     compute_t<S>* dB) {
  using T = compute_t<S>;
  constexpr bool kSame = std::is_same<S, T>::value;
  const int64_t in = P.in, out = P.out, r = P.r, N = P.N, ldx = P.ldx;
  const int64_t nb = static_cast<int64_t>(P.blocks.size());
  // Groups of consecutive blocks, a few per thread, handed out dynamically (run_tasks). Their
  // number depends on the thread setting only, so the partials do not depend on scheduling.
  const int64_t groups = std::min<int64_t>(kGroupsPerThread * at::get_num_threads(), nb);
  const bool adapters = need.dx || need.dA || need.dB;
  const TileDropout dr = tile_dropout(P);
  const T keep_scale = static_cast<T>(P.dropout.keep_scale);
  const int64_t* order = P.order.empty() ? nullptr : P.order.data();
  auto group_blocks = [&](int64_t g) {
    return std::make_pair(g * nb / groups, (g + 1) * nb / groups);
  };

  // Which group writes each adapter's gradients in place (first[n], -1: no rows), and the
  // adapter of each group's partial (-1: none).
  std::vector<int64_t> first(static_cast<size_t>(N), -1), part(static_cast<size_t>(groups), -1);
  for (int64_t g = 0; g < groups; ++g) {
    const auto [b0, b1] = group_blocks(g);
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& blk = P.blocks[bi];
      for (int64_t k = blk.run0; k < blk.run1; ++k) {
        const int64_t n = P.runs[k].adapter;
        if (n < 0) continue;
        if (first[n] < 0) {
          first[n] = g;
        } else if (first[n] != g) {
          TORCH_INTERNAL_ASSERT(part[g] < 0 || part[g] == n);
          part[g] = n;
        }
      }
    }
  }
  const int64_t ga = need.dA ? r * in : 0, gb = need.dB ? out * r : 0;
  std::vector<T> parts(static_cast<size_t>(groups * (ga + gb)));

  struct Scratch {
    std::vector<T> gbuf, dxbuf, xbuf, ubuf, du, xd, dm, tmp;
  };
  auto make_scratch = [&] {
    Scratch sc;
    sc.du.resize(static_cast<size_t>(P.block_rows * r));
    if (P.dropout.on) {
      sc.xd.resize(static_cast<size_t>(kMaskRows * in));
      if (need.dx) {
        sc.dm.resize(static_cast<size_t>(kMaskRows * in));
        sc.tmp.resize(static_cast<size_t>(kMaskRows * in));
      }
    }
    return sc;
  };
  run_tasks(groups, make_scratch, [&](int64_t g, Scratch& sc) {
    std::vector<T>&gbuf = sc.gbuf, &dxbuf = sc.dxbuf, &xbuf = sc.xbuf, &ubuf = sc.ubuf,
    &du = sc.du, &xd = sc.xd, &dm = sc.dm, &tmp = sc.tmp;
    const auto [b0, b1] = group_blocks(g);
    int64_t cur = -1;  // the adapter whose gradients tA/tB point at
    T *tA = nullptr, *tB = nullptr;
    bool freshA = false, freshB = false;  // the next product overwrites (first touch)
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& blk = P.blocks[bi];
      const int64_t rows = blk.end - blk.start;
      const bool direct = blk.orig >= 0;
      const bool inplace = kSame && direct;
      const T* G;
      if (inplace) {
        G = reinterpret_cast<const T*>(dy) + blk.orig * out;
      } else {
        gbuf.resize(static_cast<size_t>(rows * out));
        load_rows(P, dy, out, blk.start, rows, out, gbuf.data());
        G = gbuf.data();
      }
      T* dX = nullptr;
      if (need.dx) {
        if (inplace) {
          dX = reinterpret_cast<T*>(dx) + blk.orig * in;
        } else {
          dxbuf.resize(static_cast<size_t>(rows * in));
          dX = dxbuf.data();
        }
        gemm<T>(false, false, rows, in, out, G, out, W, in, dX, in, false);
      }

      for (int64_t k = blk.run0; k < blk.run1 && adapters; ++k) {
        const Run& run = P.runs[k];
        const int64_t n = run.adapter;
        if (n < 0) continue;
        const int64_t lo = std::max(run.start, blk.start) - blk.start;
        const int64_t hi = std::min(run.end, blk.end) - blk.start;
        const int64_t m = hi - lo;
        const T* const An = A + n * r * in;
        const T* const Bn = B + n * out * r;
        const T* const Gr = G + lo * out;
        if (n != cur) {
          cur = n;
          const bool own = first[n] == g;
          T* const pa = parts.data() + g * (ga + gb);
          tA = own ? dA + n * r * in : pa;
          tB = own ? dBt + n * r * out : pa + ga;
          freshA = freshB = true;
        }

        // du = s dY B (rows of the run), for dx and dA.
        T* const dur = du.data() + lo * r;
        if (need.dx || need.dA) {
          gemm<T>(false, false, m, r, out, Gr, out, Bn, r, dur, r, false);
          const T s = static_cast<T>(P.scaling[n]);
          for (int64_t i = 0; i < m * r; ++i) dur[i] *= s;
        }

        // dB^T += u^T dY (unscaled; s is applied once per adapter after the reduction).
        // Transposed: BLAS makes the (r x out) product with out as the long dimension at
        // twice the rate of the (out x r) one (a 1024 x 128 x 16 tile: 65 vs 31 GFLOP/s
        // on one Zen 4 core).
        if (need.dB) {
          const T* Ur;
          if (direct) {
            Ur = u + (blk.orig + lo) * r;
          } else {
            ubuf.resize(static_cast<size_t>(m * r));
            for (int64_t i = 0; i < m; ++i) {
              const T* src = u + P.orig(blk.start + lo + i) * r;
              std::copy(src, src + r, ubuf.data() + i * r);
            }
            Ur = ubuf.data();
          }
          gemm<T>(true, false, r, out, m, Ur, r, Gr, out, tB, out, !freshB);
          freshB = false;
        }

        if (need.dA || (need.dx && P.dropout.on)) {
          const T* Xr;
          int64_t ldXr;
          if (inplace) {
            Xr = reinterpret_cast<const T*>(x) + (blk.orig + lo) * ldx;
            ldXr = ldx;
          } else {
            xbuf.resize(static_cast<size_t>(m * in));
            load_rows(P, x, ldx, blk.start + lo, m, in, xbuf.data());
            Xr = xbuf.data();
            ldXr = in;
          }
          if (P.dropout.on) {
            for (int64_t c = 0; c < m; c += kMaskRows) {
              const int64_t mc = std::min(kMaskRows, m - c);
              dropout_rows(Xr + c * ldXr, ldXr, mc, in, order, blk.start + lo + c, dr,
                           keep_scale, xd.data(), need.dx ? dm.data() : nullptr);
              if (need.dA) {
                gemm<T>(true, false, r, in, mc, dur + c * r, r, xd.data(), in, tA, in,
                        !freshA);
                freshA = false;
              }
              if (need.dx) {
                gemm<T>(false, false, mc, in, r, dur + c * r, r, An, in, tmp.data(), in,
                        false);
                add_product(tmp.data(), dm.data(), mc, in, dX + (lo + c) * in, in);
              }
            }
          } else {
            gemm<T>(true, false, r, in, m, dur, r, Xr, ldXr, tA, in, !freshA);
            freshA = false;
          }
        }
        if (need.dx && !P.dropout.on) {
          gemm<T>(false, false, m, in, r, dur, r, An, in, dX + lo * in, in, true);
        }
      }

      if (need.dx && !inplace) store_rows<T, S>(P, dX, blk.start, rows, in, nullptr, dx);
    }
  });

  // Partials in group order; adapters without rows get zeros; dB takes its scaling.
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n = part[g];
    if (n < 0) continue;
    const T* pa = parts.data() + g * (ga + gb);
    if (need.dA) {
      T* d = dA + n * r * in;
      for (int64_t i = 0; i < ga; ++i) d[i] += pa[i];
    }
    if (need.dB) {
      T* d = dBt + n * r * out;
      for (int64_t i = 0; i < gb; ++i) d[i] += pa[ga + i];
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    if (first[n] < 0) {
      if (need.dA) std::fill(dA + n * r * in, dA + (n + 1) * r * in, T(0));
      if (need.dB) std::fill(dB + n * out * r, dB + (n + 1) * out * r, T(0));
    } else if (need.dB) {
      const T s = static_cast<T>(P.scaling[n]);
      const T* src = dBt + n * r * out;
      T* d = dB + n * out * r;
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t j = 0; j < r; ++j) d[o * r + j] = s * src[j * out + o];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_cpu_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    const std::optional<at::Tensor>& adapter_ids, const at::Tensor& u, double dropout_p,
    const std::optional<at::Tensor>& seed, bool need_dx, bool need_dW, bool need_db,
    bool need_dA, bool need_dB) {
  const char* fn = "lora_cpu_bwd";
  Problem P = make_problem(x, weight, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, fn);
  const at::ScalarType dt = x.scalar_type(), ct = compute_dtype(dt);
  check_tensor(grad_y, 2, dt, fn, "grad_y");
  TORCH_CHECK(grad_y.size(0) == P.T && grad_y.size(1) == P.out, fn,
              ": grad_y must have shape (T, out) = (", P.T, ", ", P.out, "), got ",
              grad_y.sizes());
  TORCH_CHECK(u.defined() && u.device().is_cpu(), fn, ": u must be a CPU tensor");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == P.T && u.size(1) == P.r, fn,
              ": u must have shape (T, r) = (", P.T, ", ", P.r, "), got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == ct, fn, ": u must be ", ct, " (the forward's u), got ",
              u.scalar_type());

  const at::Tensor xc = prepare_x(x);
  P.ldx = P.T <= 1 ? P.in : xc.stride(0);
  const at::Tensor dyc = grad_y.detach().contiguous();
  const at::Tensor uc = u.detach().contiguous();
  const at::Tensor Wc = prepare_param(weight, ct);
  const at::Tensor Ac = prepare_param(lora_A, ct);
  const at::Tensor Bc = prepare_param(lora_B, ct);
  const at::TensorOptions copts = x.options().dtype(ct);
  // A gradient not asked for is an empty (0,) tensor and costs nothing. dx is written in full
  // by the kernel; dA/dB (compute dtype, converted at the end) too, zeros for adapters
  // without rows.
  // (Each its own tensor: outputs must not alias one another.)
  auto none = [&] { return x.new_empty({0}); };
  at::Tensor dx = need_dx ? empty_huge_pages(P.T, P.in, x.options()) : none();
  at::Tensor dA = need_dA ? at::empty({P.N, P.r, P.in}, copts) : none();
  at::Tensor dB = need_dB ? at::empty({P.N, P.out, P.r}, copts) : none();
  at::Tensor dBt = need_dB ? at::empty({P.N, P.r, P.out}, copts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "lora_cpu_bwd", [&] {
    using T = compute_t<scalar_t>;
    backward_kernel<scalar_t>(P, dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                              Wc.data_ptr<T>(), Ac.data_ptr<T>(), Bc.data_ptr<T>(),
                              uc.data_ptr<T>(), Needs{need_dx, need_dA, need_dB},
                              need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                              need_dA ? dA.data_ptr<T>() : nullptr,
                              need_dB ? dBt.data_ptr<T>() : nullptr,
                              need_dB ? dB.data_ptr<T>() : nullptr);
  });
  if (need_dA && dt != ct) dA = dA.to(dt);
  if (need_dB && dt != ct) dB = dB.to(dt);
  at::Tensor dW = none(), db = none();
  if (need_dW || need_db) {
    const at::Tensor g = dyc.to(ct);
    if (need_dW) dW = at::mm(g.t(), xc.to(ct)).to(dt);
    if (need_db) db = g.sum(0).to(dt);
  }
  return {dx, dW, db, dA, dB};
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

  // LoRA linear backward: the gradients of sum(grad_y * y) for lora_cpu_fwd with the same
  // arguments, given its u. Returns (dx, dW, db, dA, dB), contiguous, in x's dtype, shaped like
  // x, weight, bias (out,), lora_A, lora_B; a gradient whose need_* is false is an empty (0,)
  // tensor and no work is done for it.
  m.def(
      "lora_cpu_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor scaling, Tensor? adapter_ids, Tensor u, float dropout_p, Tensor? seed, "
      "bool need_dx, bool need_dW, bool need_db, bool need_dA, bool need_dB) "
      "-> (Tensor dx, Tensor dW, Tensor db, Tensor dA, Tensor dB)");
}

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("lora_cpu_bwd", TORCH_FN(mmk::lora::lora_cpu_bwd));
}

// Not differentiable (see forward.cpp): outputs never require grad.
TORCH_LIBRARY_IMPL(mmkernels, Autograd, m) {
  m.impl("lora_cpu_bwd", torch::CppFunction::makeFallthrough());
}
