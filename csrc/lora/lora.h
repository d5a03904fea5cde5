// Fused LoRA linear layer on CPU, shared pieces: argument checks and their normalisation, the
// sorted row order (adapter segments) cut into row blocks, row gathers/scatters and the
// dropout tile loops (tiles.cpp).
//
//   y = x W^T + b + s[id] u B[id]^T,   u = (x o D) A[id]^T     (per row; id -1: no adapter)
//
// Semantics: mmkernels/lora/reference.py. Rows are processed in an order sorted by adapter id
// (a stable counting sort, punica's SGMV segments), so that each adapter's rows form one run
// and its shrink/expand are tile GEMMs with one A and one B. The sorted order is cut into
// blocks of at most kRows rows; a block is the unit of work of a worker: its x and dY rows are
// read from memory once and reused, from cache, by every product of the block. Outputs (y, u,
// dx) are written at the rows' original positions. When a block's rows are consecutive in the
// original order too (always with one adapter, and for most blocks of a batch whose rows are
// grouped by adapter) and the data is already in the compute dtype, the tile GEMMs read and
// write the tensors in place; otherwise rows are gathered into (and scattered from) per-worker
// tiles, converting float16/bfloat16 to fp32 on the way.
//
// The dropout mask is never stored: element (t, i) (t = the row's ORIGINAL flattened index, i
// = the input feature) is kept iff the shared hash says so (common/dropout.h), with the column
// hashes tabulated once per call, and the backward regenerates it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/args.h"
#include "common/blas.h"
#include "common/dropout.h"
#include "common/math.h"

namespace mmk {
namespace lora {

// ---------------------------------------------------------------------------------------
// Tiling
// ---------------------------------------------------------------------------------------

// Rows per block. 256 rows of 1024 fp32 features are 1 MiB, one core's L2: the block's x
// (forward) or dY (backward) is still cached when the shrink/expand (du, dB) read it after the
// base GEMM. Measured on the 2-core Zen 4 machine (T = 8192 and 4096, 1024 -> 1024, r = 16,
// forward + backward): 64 rows cost 20% more than 256 (the base tile GEMM re-packs W for every
// block), 128 rows 5-8% more; 512 rows were no faster with one adapter and 5-10% slower with
// eight (gathered tiles of 2 MiB spill to L3).
constexpr int64_t kRows = 256;
// Blocks are not made shorter than this to give every thread work (below it the tile GEMMs
// lose more to BLAS's per-call packing than a second thread gains).
constexpr int64_t kMinRows = 16;
// Backward groups (blocks that share dA/dB partials) per thread: enough for the dynamic
// hand-out to even out a slowed worker, few enough that the partials stay cheap to reduce.
constexpr int64_t kGroupsPerThread = 4;
// Rows per dropout chunk: x o D (and, in the backward, the mask factors and du A) are made for
// this many rows at a time, so the three tiles (3 x 32 x in) stay in L1/L2 next to the block.
constexpr int64_t kMaskRows = 32;

// A run of sorted positions [start, end) that share one adapter (-1: none).
struct Run {
  int64_t start, end, adapter;
};

struct Block {
  int64_t start, end;  // sorted positions
  int64_t orig;        // original row of `start` when the block's rows are consecutive
                       // there (then row start + i is original row orig + i), else -1
  int64_t run0, run1;  // the runs that overlap the block: runs[run0 .. run1)
};

// Everything about a call except the tensors' data.
struct Problem {
  int64_t T = 0, in = 0, out = 0, r = 0, N = 0;
  int64_t ldx = 0;             // x's row stride
  std::vector<int64_t> order;  // sorted position -> original row; empty: the identity
  std::vector<Run> runs;       // in sorted order; at most one per adapter
  std::vector<Block> blocks;
  int64_t block_rows = 0;  // the longest block's length (scratch tiles are sized by it)
  std::vector<double> scaling;  // (N,)
  DropoutSeed dropout;
  std::vector<uint32_t> column_hash;  // (in,), with dropout

  int64_t orig(int64_t pos) const { return order.empty() ? pos : order[pos]; }
};

// The tile loops' view of the dropout (plain data, passed by value into vectorised loops).
struct TileDropout {
  const uint32_t* column_hash;
  uint32_t seed_lo, threshold;
};

// ---------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_tensor(const at::Tensor& t, int64_t dim, at::ScalarType dtype, const char* fn,
                         const char* name) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, fn, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have x's dtype ", dtype, ", got ",
              t.scalar_type());
}

// Checks every argument the forward and the backward share and builds the call's Problem:
// sizes, the sorted order and its blocks, the scalings, the dropout.
inline Problem make_problem(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& scaling,
                            const std::optional<at::Tensor>& adapter_ids, double dropout_p,
                            const std::optional<at::Tensor>& seed, const char* fn) {
  Problem P;
  TORCH_CHECK(x.defined(), fn, ": x must be a tensor");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), fn,
              ": x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const at::ScalarType dt = x.scalar_type();
  check_tensor(x, 2, dt, fn, "x");
  check_tensor(weight, 2, dt, fn, "weight");
  check_tensor(lora_A, 3, dt, fn, "lora_A");
  check_tensor(lora_B, 3, dt, fn, "lora_B");
  P.T = x.size(0);
  P.in = x.size(1);
  P.out = weight.size(0);
  P.N = lora_A.size(0);
  P.r = lora_A.size(1);
  TORCH_CHECK(P.in >= 1 && P.out >= 1, fn, ": in and out features must be >= 1, got x ",
              x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(weight.size(1) == P.in, fn, ": weight must have shape (out, in) with in = ", P.in,
              " (x's last dim), got ", weight.sizes());
  TORCH_CHECK(P.N >= 1 && P.r >= 1, fn,
              ": lora_A must have shape (N, r, in) with N >= 1 and r >= 1, got ", lora_A.sizes());
  TORCH_CHECK(lora_A.size(2) == P.in, fn, ": lora_A must have shape (N, r, in) with in = ", P.in,
              ", got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == P.N && lora_B.size(1) == P.out && lora_B.size(2) == P.r, fn,
              ": lora_B must have shape (N, out, r) = (", P.N, ", ", P.out, ", ", P.r, "), got ",
              lora_B.sizes());
  const at::Tensor sc = vector_arg(scaling, P.N, at::kDouble, fn, "scaling");
  P.scaling.assign(sc.data_ptr<double>(), sc.data_ptr<double>() + P.N);
  // x's layout: unit stride along a row and a row stride >= the row (BLAS's rule); the
  // caller (prepare_x) copies any other layout.
  P.ldx = P.T <= 1 ? P.in : x.stride(0);

  // The sorted order: a stable counting sort of the rows by id (-1 first), so each adapter's
  // rows form one run, in their original order.
  const bool has_ids = adapter_ids.has_value() && adapter_ids->defined();
  if (!has_ids) {
    TORCH_CHECK(P.N == 1, fn, ": adapter_ids is required with N = ", P.N,
                " adapters (None means every row uses the single adapter)");
    if (P.T > 0) P.runs.push_back(Run{0, P.T, 0});
  } else {
    const at::Tensor& ids = *adapter_ids;
    TORCH_CHECK(ids.device().is_cpu(), fn, ": adapter_ids must be a CPU tensor, got ",
                ids.device());
    TORCH_CHECK(ids.scalar_type() == at::kLong, fn, ": adapter_ids must be int64, got ",
                ids.scalar_type());
    TORCH_CHECK(ids.dim() == 1 && ids.size(0) == P.T, fn, ": adapter_ids must have shape (",
                P.T, ",) (one id per row of x), got ", ids.sizes());
    const at::Tensor ic = ids.contiguous();
    const int64_t* id = ic.data_ptr<int64_t>();
    std::vector<int64_t> count(static_cast<size_t>(P.N + 2), 0);
    for (int64_t t = 0; t < P.T; ++t) {
      TORCH_CHECK(id[t] >= -1 && id[t] < P.N, fn, ": adapter_ids must be in [-1, ", P.N,
                  "), got ", id[t], " at row ", t);
      ++count[id[t] + 2];
    }
    // count[k + 1] = first sorted position of id k - 1.
    for (int64_t k = 1; k < P.N + 2; ++k) count[k] += count[k - 1];
    for (int64_t k = 0; k < P.N + 1; ++k) {
      if (count[k + 1] > count[k]) P.runs.push_back(Run{count[k], count[k + 1], k - 1});
    }
    std::vector<int64_t> order(static_cast<size_t>(P.T));
    bool identity = true;
    for (int64_t t = 0; t < P.T; ++t) {
      const int64_t pos = count[id[t] + 1]++;
      order[pos] = t;
      identity = identity && pos == t;
    }
    if (!identity) P.order = std::move(order);
  }

  // Blocks: equal lengths of at most kRows rows, at least one per thread where there are
  // enough rows (kMinRows each).
  if (P.T > 0) {
    const int64_t threads = at::get_num_threads();
    int64_t nb = std::max(ceil_div(P.T, kRows),
                          std::min(threads, std::max<int64_t>(1, P.T / kMinRows)));
    // A multiple of the thread count where rows allow, so the static split is even.
    const int64_t even = ceil_div(nb, threads) * threads;
    if (nb > threads && P.T / even >= kMinRows) nb = even;
    const int64_t len = ceil_div(P.T, nb);
    P.block_rows = len;
    size_t run = 0;
    for (int64_t b0 = 0; b0 < P.T; b0 += len) {
      const int64_t b1 = std::min(P.T, b0 + len);
      while (P.runs[run].end <= b0) ++run;
      size_t run1 = run;
      while (run1 < P.runs.size() && P.runs[run1].start < b1) ++run1;
      int64_t orig = P.orig(b0);
      for (int64_t p = b0 + 1; p < b1 && orig >= 0; ++p) {
        if (P.orig(p) != orig + (p - b0)) orig = -1;
      }
      P.blocks.push_back(Block{b0, b1, orig, static_cast<int64_t>(run),
                               static_cast<int64_t>(run1)});
    }
  }

  P.dropout = dropout_seed_arg(dropout_p, seed, fn);
  if (P.dropout.on) P.column_hash = P.dropout.column_hashes(P.in);
  return P;
}

// x with unit stride along its rows and a BLAS row stride (>= in); the contract's layouts
// (contiguous, or a column slice of a wider tensor) pass through without a copy.
inline at::Tensor prepare_x(const at::Tensor& x) {
  at::Tensor y = x.detach();
  const bool unit = y.size(1) <= 1 || y.stride(1) == 1;
  const bool rows_ok = y.size(0) <= 1 || y.stride(0) >= y.size(1);
  if (!(unit && rows_ok)) y = y.contiguous();
  return y;
}

// A parameter (weight, bias, A, B) as a contiguous tensor of the compute dtype: float16 and
// bfloat16 parameters are converted once per call (the tiles are fp32).
inline at::Tensor prepare_param(const at::Tensor& t, at::ScalarType dtype) {
  return t.detach().to(dtype).contiguous();
}

// ---------------------------------------------------------------------------------------
// Row gathers and scatters
// ---------------------------------------------------------------------------------------

template <typename To, typename From>
MMK_INLINE void convert_row(const From* src, int64_t n, To* dst) {
  if constexpr (std::is_same<To, From>::value) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(To));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<To>(src[j]);
  }
}

// dst (rows x cols, row stride cols, compute dtype T) = the source rows of sorted positions
// p0.. (row stride ld, storage dtype S).
template <typename T, typename S>
void load_rows(const Problem& P, const S* src, int64_t ld, int64_t p0, int64_t rows,
               int64_t cols, T* dst) {
  for (int64_t i = 0; i < rows; ++i) convert_row(src + P.orig(p0 + i) * ld, cols, dst + i * cols);
}

// The rows of sorted positions p0.. of dst (contiguous, cols per row) = src (rows x cols,
// row stride cols), plus bias when given.
template <typename T, typename S>
void store_rows(const Problem& P, const T* src, int64_t p0, int64_t rows, int64_t cols,
                const T* bias, S* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * cols;
    S* d = dst + P.orig(p0 + i) * cols;
    if (bias != nullptr) {
      for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<S>(s[j] + bias[j]);
    } else {
      convert_row(s, cols, d);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Dropout tile loops (tiles.cpp; the float versions compiled for several ISAs)
// ---------------------------------------------------------------------------------------

// xd (rows x cols, row stride cols) = x o D for the rows of sorted positions p0.. (x: row
// stride ldx), D = keep_scale where kept, 0 where dropped: a product, never a select, so a
// NaN in x stays NaN (0 NaN = NaN, as in the reference). factors (nullable, like xd) gets D.
void dropout_rows(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                  const int64_t* order, int64_t p0, TileDropout dr, float keep_scale, float* xd,
                  float* factors);
void dropout_rows(const double* x, int64_t ldx, int64_t rows, int64_t cols,
                  const int64_t* order, int64_t p0, TileDropout dr, double keep_scale,
                  double* xd, double* factors);

// dst (rows x cols, row stride ld) += src o factors (both rows x cols, row stride cols).
void add_product(const float* src, const float* factors, int64_t rows, int64_t cols, float* dst,
                 int64_t ld);
void add_product(const double* src, const double* factors, int64_t rows, int64_t cols,
                 double* dst, int64_t ld);

inline TileDropout tile_dropout(const Problem& P) {
  return TileDropout{P.column_hash.data(), P.dropout.seed_lo, P.dropout.threshold};
}

// Runs work(task, scratch) for task = 0..n-1 on the intra-op threads, handed out dynamically
// in index order: this machine's cores are shared, and a worker slowed by another process
// then takes fewer tasks instead of holding up the call, as a static split would. Each worker
// makes its scratch (make_scratch()) once. Which worker runs a task does not change any
// result (every task writes its own outputs). One task runs inline, outside a parallel
// region, so that BLAS may use every thread for it.
template <typename MakeScratch, typename Work>
void run_tasks(int64_t n, const MakeScratch& make_scratch, const Work& work) {
  if (n <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) work(t, scratch);
    }
  });
}

// The storage dtype's compute dtype: double for double, float for everything else.
template <typename S>
using compute_t = std::conditional_t<std::is_same<S, double>::value, double, float>;

}  // namespace lora
}  // namespace mmk
