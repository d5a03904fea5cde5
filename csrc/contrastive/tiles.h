// Tiling of the contrastive kernels (InfoNCE, SigLIP): the tiling plan, the per-tile GEMM,
// the gradient-pass skeleton, and input preparation. Generic math lives in common/math.h,
// generic argument checks in common/args.h.
//
// Every kernel here works on X = s * A B^T + b one tile at a time: the rows of A are walked in
// blocks of `bm` rows (sequentially), and for each row block the columns (rows of B) are split
// into blocks of `bn` that are handed out to threads in contiguous "chunks". A column block
// belongs to exactly one chunk, so all per-column state (running column max/sum, rows of the
// B-side gradient) is written by one thread without locks; the per-row state of the current
// row block is kept per chunk and merged after the parallel region. Extra memory is
// O(chunks * (bm * bn + bm * D)) plus O(rows + cols), plus the rows of X that a caller asks
// InfoNCE's forward to keep for the backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common/args.h"
#include "common/math.h"

namespace mmk {
namespace contrastive {

// ---------------------------------------------------------------------------------------
// Tile sizes
// ---------------------------------------------------------------------------------------

// Rows per row block. Each chunk keeps a bm x D slice of the A-side gradient and bm running
// row maxima/sums; 256 rows keep those small while the tile GEMMs (256 x D times D x bn)
// still run at the full single-core BLAS rate.
constexpr int64_t kRowBlock = 256;
// Upper bound on columns per tile. A 256 x 512 fp32 tile (512 KiB) stays in L2 between the
// GEMM that writes it and the elementwise passes and GEMMs that read it back. (Measured on
// 2 Zen 3 cores, D = 512: 256/512, 512/256 and 512/512 are within noise of each other;
// 128-row blocks and 1024-column tiles were a few percent slower.)
constexpr int64_t kMaxColBlock = 512;
// Column blocks are multiples of 16 elements (64 B for fp32), so tile rows start on a cache
// line and the vector loops over a row need no scalar remainder except in a last, partial
// block.
constexpr int64_t kColAlign = 16;

// How one call tiles its (rows x cols) logit matrix, rows, cols >= 1. Columns are the
// parallel side: they are cut into `col_blocks` blocks of `bn`, a multiple of the thread
// count when there are enough columns, so that every chunk gets the same amount of work.
// chunks <= col_blocks, so every chunk owns at least one column block.
struct TilePlan {
  int64_t rows, cols;
  int64_t bm, bn;
  int64_t col_blocks, chunks;

  TilePlan(int64_t rows_, int64_t cols_) : rows(rows_), cols(cols_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    bm = std::min(rows, kRowBlock);
    int64_t want = ceil_div(ceil_div(cols, kMaxColBlock), threads) * threads;
    want = std::min(want, ceil_div(cols, kColAlign));
    bn = ceil_div(ceil_div(cols, want), kColAlign) * kColAlign;
    col_blocks = ceil_div(cols, bn);
    chunks = std::min(threads, col_blocks);
  }

  int64_t row_len(int64_t r0) const { return std::min(bm, rows - r0); }
  int64_t col_len(int64_t c0) const { return std::min(bn, cols - c0); }
  // Chunk t owns column blocks [first_block(t), first_block(t + 1)).
  int64_t first_block(int64_t t) const { return t * col_blocks / chunks; }
};

// Both losses are symmetric in (I, rows) <-> (T, columns), and the kernels parallelise over
// columns, so the longer side is made the column side: with M << N the columns of a single
// row block still feed every thread, and with M >> N the roles swap.
inline bool swap_sides(int64_t M, int64_t N) { return M > N; }

// Runs f(chunk) for every chunk of the plan, chunks spread over the intra-op threads. BLAS
// calls made inside run single-threaded (nested parallel regions are serialised), which is
// what we want: the parallelism is already across chunks.
template <typename F>
void parallel_chunks(const TilePlan& plan, const F& f) {
  at::parallel_for(0, plan.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t);
  });
}

// S = A_blk * B[c0 : c0+bn]^T written into the front of a chunk's tile buffer (contiguous,
// leading dimension bn). Returns the bm x bn view.
inline at::Tensor tile_logits(const at::Tensor& buf, const at::Tensor& A_blk, const at::Tensor& B,
                              int64_t c0, int64_t bn) {
  const int64_t bm = A_blk.size(0);
  at::Tensor S = buf.narrow(0, 0, bm * bn).view({bm, bn});
  at::mm_out(S, A_blk, B.narrow(0, c0, bn).t());
  return S;
}

// The skeleton shared by the gradient passes (InfoNCE backward, SigLIP). For each tile,
// weight_tile(src, ld, W, r0, bm, c0, bn, chunk) writes the matching tile of a weight matrix
// W (bm x bn, leading dimension bn, in a per-chunk buffer) from the tile's logits `src`
// (leading dimension ld), its own row/column data, and whatever per-chunk scalars it
// accumulates. The logits come from one of two places:
//   - recomputed (X undefined, or a row block at or past K): S = A_blk B_blk^T is written
//     into the chunk's buffer, so src holds the raw dot products, src == W and ld == bn (W
//     may overwrite S in place);
//   - kept (X defined, (K x cols) contiguous: the forward's X = s A B^T + b for the first K
//     rows, K a whole number of row blocks or all rows; the row blocks below K): src points
//     into X, ld == cols. X is only read (it may be saved for another backward).
// If gA is defined the same W tile then feeds both products: the block's rows of gA = W B
// (chunk 0 accumulates straight into gA, the other chunks in private bm x D buffers that are
// added after the parallel region, in chunk order) and gB = sum over row blocks of W^T A
// (rows c0..c0+bn, owned by this chunk, so written in place; the first row block overwrites
// them). gA and gB need no initialisation. Without gA only weight_tile runs.
template <typename scalar_t, typename WeightTile>
void weighted_pass(const TilePlan& plan, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& X, const at::Tensor& gA, const at::Tensor& gB,
                   const WeightTile& weight_tile) {
  const bool accumulate = gA.defined();
  const int64_t kept_rows = X.defined() ? X.size(0) : 0;
  const int64_t D = A.size(1);
  const at::Tensor tiles = at::empty({plan.chunks, plan.bm * plan.bn}, A.options());
  const at::Tensor parts = accumulate && plan.chunks > 1
                               ? at::empty({plan.chunks - 1, plan.bm, D}, A.options())
                               : at::Tensor();
  const scalar_t* const x0 = kept_rows > 0 ? X.data_ptr<scalar_t>() : nullptr;
  for (int64_t r0 = 0; r0 < plan.rows; r0 += plan.bm) {
    const int64_t bm = plan.row_len(r0);
    const bool kept = r0 < kept_rows;
    TORCH_INTERNAL_ASSERT(!kept || r0 + bm <= kept_rows, "a kept row block past the kept rows");
    const at::Tensor A_blk = A.narrow(0, r0, bm);
    parallel_chunks(plan, [&](int64_t t) {
      at::Tensor part = !accumulate ? at::Tensor()
                        : t == 0    ? gA.narrow(0, r0, bm)
                                    : parts[t - 1].narrow(0, 0, bm);
      for (int64_t cb = plan.first_block(t); cb < plan.first_block(t + 1); ++cb) {
        const int64_t c0 = cb * plan.bn;
        const int64_t bn = plan.col_len(c0);
        const at::Tensor W = kept ? tiles[t].narrow(0, 0, bm * bn).view({bm, bn})
                                  : tile_logits(tiles[t], A_blk, B, c0, bn);
        scalar_t* const w = W.data_ptr<scalar_t>();
        if (kept) {
          weight_tile(x0 + r0 * plan.cols + c0, plan.cols, w, r0, bm, c0, bn, t);
        } else {
          weight_tile(static_cast<const scalar_t*>(w), bn, w, r0, bm, c0, bn, t);
        }
        if (!accumulate) continue;
        const at::Tensor B_blk = B.narrow(0, c0, bn);
        // The first tile of the chunk overwrites the partial (beta = 0), so it needs no zeroing.
        if (cb == plan.first_block(t)) {
          at::mm_out(part, W, B_blk);
        } else {
          part.addmm_(W, B_blk);
        }
        at::Tensor gB_blk = gB.narrow(0, c0, bn);
        if (r0 == 0) {
          at::mm_out(gB_blk, W.t(), A_blk);
        } else {
          gB_blk.addmm_(W.t(), A_blk);
        }
      }
    });
    if (accumulate) {
      // Fixed chunk order: the result does not depend on thread scheduling.
      at::Tensor dst = gA.narrow(0, r0, bm);
      for (int64_t t = 1; t < plan.chunks; ++t) dst.add_(parts[t - 1].narrow(0, 0, bm));
    }
  }
}

// Where the positive pairs (i, i + offset) of a call fall in its tiles. `offset` is in the
// caller's frame (image rows, text columns); with swapped sides the kernel's rows are text
// rows and a positive sits at column = row - offset. Offsets outside (-M, N) leave no positive
// in the matrix; checking that once also keeps row + offset from overflowing.
struct Positives {
  bool any;
  int64_t off;  // kernel frame: the positive of kernel row r is kernel column r + off

  Positives(int64_t offset, int64_t M, int64_t N, bool swap)
      : any(offset > -M && offset < N), off(any ? (swap ? -offset : offset) : 0) {}

  // Tile column of the positive of tile row 0 of the tile at (r0, c0); tile row i has its
  // positive in tile column diag0 + i when that is in [0, bn).
  int64_t diag0(int64_t r0, int64_t c0) const { return r0 + off - c0; }
};

// The columns [0, bn) of a tile row without column d (the row's positive) when has_pos and
// 0 <= d < bn: at most two runs [begin[k], end[k]), so that the vector loops over them carry
// no label test. (Plain data rather than a callback: the loops are inlined into the
// target_clones copies of their callers, which a lambda is not guaranteed to be.)
struct Runs {
  int n;
  int64_t begin[2], end[2];
};

MMK_INLINE Runs runs_except(int64_t bn, bool has_pos, int64_t d) {
  if (has_pos && d >= 0 && d < bn) return Runs{2, {0, d + 1}, {d, bn}};
  return Runs{1, {0, 0}, {bn, 0}};
}

// ---------------------------------------------------------------------------------------
// Input preparation (the Python layer validates too, but these must never crash on bad calls)
// ---------------------------------------------------------------------------------------

struct Features {
  at::Tensor I, T;           // contiguous, in the compute dtype, detached
  at::ScalarType dtype;      // kFloat or kDouble
  double scale, bias;
};

inline Features prepare_features(const at::Tensor& I, const at::Tensor& T, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& bias, const char* fn) {
  TORCH_CHECK(I.defined() && T.defined(), fn, ": I and T must be tensors");
  TORCH_CHECK(I.dim() == 2 && T.dim() == 2, fn, ": I and T must be 2-D, got shapes ", I.sizes(),
              " and ", T.sizes());
  TORCH_CHECK(I.device().is_cpu() && T.device().is_cpu(), fn,
              ": I and T must be CPU tensors, got ", I.device(), " and ", T.device());
  TORCH_CHECK(I.scalar_type() == T.scalar_type(), fn, ": I and T must have the same dtype, got ",
              I.scalar_type(), " and ", T.scalar_type());
  TORCH_CHECK(I.size(1) == T.size(1), fn, ": I and T must have the same feature size, got ",
              I.size(1), " and ", T.size(1));
  const at::ScalarType in = I.scalar_type();
  TORCH_CHECK(in == at::kFloat || in == at::kDouble || in == at::kHalf || in == at::kBFloat16, fn,
              ": unsupported dtype ", in, " (expected float32, float64, float16 or bfloat16)");
  Features f;
  f.dtype = in == at::kDouble ? at::kDouble : at::kFloat;
  // detach(): the kernels call out= BLAS ops from worker threads, where grad mode is on
  // regardless of the caller's guard, and those refuse inputs that require grad.
  f.I = I.detach().to(f.dtype).contiguous();
  f.T = T.detach().to(f.dtype).contiguous();
  f.scale = scalar_arg(scale, fn, "scale");
  f.bias = optional_scalar_arg(bias, 0.0, fn, "bias");
  return f;
}

}  // namespace contrastive
}  // namespace mmk
