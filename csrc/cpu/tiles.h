// Shared pieces of the CPU contrastive-loss kernels: input preparation, the tiling plan,
// the per-tile GEMM, and branch-free exp/log1p that GCC can vectorise.
//
// Every kernel here works on X = s * A B^T + b without ever holding the full X: the rows of
// A are walked in blocks of `bm` rows (sequentially), and for each row block the columns
// (rows of B) are split into blocks of `bn` that are handed out to threads in contiguous
// "chunks". A column block belongs to exactly one chunk, so all per-column state (running
// column max/sum, rows of the B-side gradient) is written by one thread without locks; the
// per-row state of the current row block is kept per chunk and merged after the parallel
// region. Extra memory is O(chunks * (bm * bn + bm * D)) plus O(rows + cols).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

namespace mmk {

// ---------------------------------------------------------------------------------------
// Code generation helpers
// ---------------------------------------------------------------------------------------

#define MMK_INLINE inline __attribute__((always_inline))

// The wheel must run on any x86-64, so there is no global -mavx2. Hot elementwise loops are
// instead compiled twice (x86-64-v3 = AVX2+FMA, and the baseline) and the dynamic loader
// picks one through an ifunc. The always-inline helpers below are inlined into each clone,
// so each copy of the loop is auto-vectorised for its own ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MMK_MULTIVERSION
#endif

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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
// S = A_blk B_blk^T is computed once and weight_tile(S, r0, bm, c0, bn, chunk) overwrites it
// in place with the matching tile of a weight matrix W (from S, its own row/column data, and
// whatever per-chunk scalars it accumulates). If gA is defined the same W tile then feeds
// both products: the block's rows of gA = W B (summed per chunk in a private bm x D buffer,
// the chunks merged after the parallel region) and gB += W^T A (rows c0..c0+bn, owned by
// this chunk, so updated in place). gB must start zeroed; gA is overwritten. Without gA
// only weight_tile runs.
template <typename scalar_t, typename WeightTile>
void weighted_pass(const TilePlan& plan, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& gA, const at::Tensor& gB, const WeightTile& weight_tile) {
  const bool accumulate = gA.defined();
  const int64_t D = A.size(1);
  const at::Tensor tiles = at::empty({plan.chunks, plan.bm * plan.bn}, A.options());
  const at::Tensor parts =
      accumulate ? at::empty({plan.chunks, plan.bm, D}, A.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < plan.rows; r0 += plan.bm) {
    const int64_t bm = plan.row_len(r0);
    const at::Tensor A_blk = A.narrow(0, r0, bm);
    parallel_chunks(plan, [&](int64_t t) {
      at::Tensor part = accumulate ? parts[t].narrow(0, 0, bm) : at::Tensor();
      for (int64_t cb = plan.first_block(t); cb < plan.first_block(t + 1); ++cb) {
        const int64_t c0 = cb * plan.bn;
        const int64_t bn = plan.col_len(c0);
        const at::Tensor W = tile_logits(tiles[t], A_blk, B, c0, bn);
        weight_tile(W.data_ptr<scalar_t>(), r0, bm, c0, bn, t);
        if (!accumulate) continue;
        const at::Tensor B_blk = B.narrow(0, c0, bn);
        // The first tile of the chunk overwrites the partial (beta = 0), so it needs no zeroing.
        if (cb == plan.first_block(t)) {
          at::mm_out(part, W, B_blk);
        } else {
          part.addmm_(W, B_blk);
        }
        gB.narrow(0, c0, bn).addmm_(W.t(), A_blk);
      }
    });
    if (accumulate) {
      // Fixed chunk order: the result does not depend on thread scheduling.
      at::Tensor dst = gA.narrow(0, r0, bm);
      dst.copy_(parts[0].narrow(0, 0, bm));
      for (int64_t t = 1; t < plan.chunks; ++t) dst.add_(parts[t].narrow(0, 0, bm));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Elementwise math
// ---------------------------------------------------------------------------------------

template <typename T>
MMK_INLINE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max that never turns a finite running maximum into NaN: NaN reaches the results through
// the sums (exp(NaN - m) = NaN), which keeps the maxima usable as exp offsets.
template <typename T>
MMK_INLINE T max_of(T a, T b) {
  return b > a ? b : a;
}

MMK_INLINE float bits_float(uint32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

MMK_INLINE uint32_t float_bits(float f) {
  uint32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// e^x in fp32 without branches or table lookups, so a loop around it vectorises.
// x = n ln2 + r with |r| <= ln2/2 (Cody-Waite: ln2 split into a high part with trailing
// zero bits, so n * ln2_hi is exact, and a small low part), e^r from a degree-6 polynomial
// fitted for minimax relative error (2e-9, below fp32 rounding, so ~1 ulp overall) with the
// constant term pinned to 1 so e^0 == 1 exactly, and 2^n assembled in exponent fields.
// x > ln(FLT_MAX) gives +inf; NaN stays NaN (every comparison with NaN is false, so it flows
// through the polynomial untouched).
// kSubnormal selects the underflow behaviour. false: results below ~2^-125 (x < -86.5)
// flush to 0, which is all a term added to a sum of order 1 needs, and never creates
// subnormals (slow on some CPUs). true: gradual underflow down to 2^-149, for values that
// can be the whole answer (SigLIP loss and sigmoid of a confidently separated pair).
template <bool kSubnormal>
MMK_INLINE float exp_f32(float x) {
  constexpr float kLo = kSubnormal ? -103.972077083991796f : -86.5f;  // ln 2^-150 or ~ln 2^-124.8
  constexpr float kHi = 88.72283935546875f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682030941723e-06f;
  // Adding 1.5 * 2^23 pushes the fraction bits out of the mantissa, so the FPU rounds
  // x * log2(e) to the nearest integer n and the low mantissa bits of the sum hold n.
  constexpr float kShifter = 12582912.0f;
  constexpr uint32_t kShifterBits = 0x4B400000u;

  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const float t = xc * kLog2e + kShifter;
  const float n = t - kShifter;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 0.0013843653651749751f;
  p = p * r + 0.008374155421350976f;
  p = p * r + 0.041668002039231294f;
  p = p * r + 0.16666431261330666f;
  p = p * r + 0.4999999420900921f;
  p = p * r + 1.000000032165329f;
  p = p * r + 1.0f;
  // n is in [-150, 128], outside the normal exponent range at both ends, so 2^n is applied
  // as two normal factors 2^(n/2) (rounded down) and 2^(n - n/2); the last product rounds
  // once into the subnormal range or to FLT_MAX..inf. For NaN input the bits of t are
  // garbage (harmless, p is NaN); integer steps are kept free of signed overflow for it.
  const int32_t n_int = static_cast<int32_t>(float_bits(t) - kShifterBits);
  const int32_t n_lo = n_int >> 1;
  const int32_t n_hi = n_int - n_lo;
  const float two_lo = bits_float((static_cast<uint32_t>(n_lo) + 127u) << 23);
  const float two_hi = bits_float((static_cast<uint32_t>(n_hi) + 127u) << 23);
  float y = (p * two_lo) * two_hi;
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// log(1 + e) for e in [0, 1] (the softplus tail, e = exp(-|x|)), vectorisable.
// log1p(e) = 2 atanh(w) with w = e / (2 + e) in [0, 1/3]; the odd atanh series in w needs
// terms up to w^13 for ~1e-8 relative error at w = 1/3, and for tiny e it returns ~e with
// full relative accuracy (no 1 + e rounding).
MMK_INLINE float log1p_unit_f32(float e) {
  const float w = e / (2.0f + e);
  const float w2 = w * w;
  float q = 1.0f / 13.0f;
  q = q * w2 + 1.0f / 11.0f;
  q = q * w2 + 1.0f / 9.0f;
  q = q * w2 + 1.0f / 7.0f;
  q = q * w2 + 1.0f / 5.0f;
  q = q * w2 + 1.0f / 3.0f;
  q = q * w2 + 1.0f;
  return 2.0f * w * q;
}

// Kernels are written once as templates; float uses the vectorisable forms above and double
// (the gradcheck path, where exactness matters and speed does not) uses libm.
MMK_INLINE float fast_exp(float x) { return exp_f32<false>(x); }
MMK_INLINE double fast_exp(double x) { return std::exp(x); }
MMK_INLINE float fast_exp_subnormal(float x) { return exp_f32<true>(x); }
MMK_INLINE double fast_exp_subnormal(double x) { return std::exp(x); }
MMK_INLINE float log1p_unit(float e) { return log1p_unit_f32(e); }
MMK_INLINE double log1p_unit(double e) { return std::log1p(e); }

// ---------------------------------------------------------------------------------------
// Input preparation (the Python layer validates too, but these must never crash on bad calls)
// ---------------------------------------------------------------------------------------

struct Features {
  at::Tensor I, T;           // contiguous, in the compute dtype, detached
  at::ScalarType dtype;      // kFloat or kDouble
  double scale, bias;
};

inline double scalar_arg(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() == 1, fn, ": ", name,
              " must be a tensor with exactly one element, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  return t.item<double>();
}

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
  f.bias = bias.has_value() && bias->defined() ? scalar_arg(*bias, fn, "bias") : 0.0;
  return f;
}

// A per-row or per-column vector argument (lse, weights) as a contiguous compute-dtype tensor.
inline at::Tensor vector_arg(const at::Tensor& v, int64_t len, at::ScalarType dtype, const char* fn,
                             const char* name) {
  TORCH_CHECK(v.defined(), fn, ": ", name, " must be a tensor");
  TORCH_CHECK(v.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len, fn, ": ", name, " must have shape (", len,
              ",), got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), fn, ": ", name,
              " must be floating point, got ", v.scalar_type());
  return v.detach().to(dtype).contiguous();
}

// ---------------------------------------------------------------------------------------
// Entry points (defined in infonce.cpp / siglip.cpp, exposed by bindings.cpp)
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> infonce_lse(const at::Tensor& I, const at::Tensor& T,
                                               const at::Tensor& scale,
                                               const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_grad(
    const at::Tensor& I, const at::Tensor& T, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_w, const at::Tensor& col_w);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fwd_bwd(
    const at::Tensor& I, const at::Tensor& T, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, int64_t diag_offset, bool compute_grad);

}  // namespace mmk
