// Cross-attention on CPU (blocked "flash" forward and backward), shared pieces: argument
// checks and their normalisation to a per-sequence view, the tiling constants, the tile
// GEMM, the dropout hash, the masking rule and the dynamic task queue.
//
// Dense (B, H, L, D) and varlen (T, H, D) calls are normalised to the same picture: a list of
// sequences, each with its own query and key lengths, and strided operands in which row t of
// head h of sequence s sits at base + b*sb + t*st + h*sh (dense: b = s, tokens from 0; varlen:
// b = 0, tokens from cu_seqlens[s]). The kernels only ever see that view, so both call forms
// (and any input strides) go through one code path.
//
// Masking rule (one place, used by both passes): query i of a sequence sees key j iff j is not
// padding and, with causal, j <= i + (Lk - Lq). A row that sees no key gets out = 0,
// lse = +inf and zero gradients.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/blas.h"
#include "common/dropout.h"
#include "common/math.h"

namespace mmk {
namespace attention {

// ---------------------------------------------------------------------------------------
// Tile sizes
// ---------------------------------------------------------------------------------------

// Forward: a task is one (sequence, head, query block); its key blocks are walked in order.
// 64 query rows x 256 keys: the S tile (64 KiB fp32) and the output accumulator stay in L2,
// and the two tile GEMMs (64 x D x 256, 64 x 256 x Dv) run near the single-core BLAS rate.
// Fewer rows would re-read K/V more often per query; more keys per block only save the
// (cheap) accumulator rescales.
constexpr int64_t kFwdQBlock = 64;
constexpr int64_t kFwdKBlock = 256;
// Shorter query blocks take proportionally longer key blocks, the S tile keeping its size:
// fewer tile products and softmax rescales where each product is only a few rows deep.
constexpr int64_t kFwdTile = kFwdQBlock * kFwdKBlock;
inline int64_t fwd_key_block(int64_t rows) {
  return std::max<int64_t>(kFwdTile / rows / 16 * 16, 16);
}
// fp32 query blocks of at most kFwdFewRows rows skip BLAS (forward.cpp): up to kFwdDotRows
// rows with dot products along the head dim (dot_step), more with the rows as vector lanes
// (lanes_step).
constexpr int64_t kFwdFewRows = 16;
constexpr int64_t kFwdDotRows = 5;
// Backward: a task is one (sequence, K/V head); key blocks outer, query blocks inner. The
// key block is the unit whose dK/dV rows are accumulated over all query rows of the group.
constexpr int64_t kBwdQBlock = 64;
constexpr int64_t kBwdKBlock = 128;

// ---------------------------------------------------------------------------------------
// Dropout: the counter-based hash of mmkernels/_rng.py (dropout_uniform)
// ---------------------------------------------------------------------------------------

// The shared hash (common/dropout.h): rows are the query rows' flat lse indices, columns the
// keys, whose hashes (key_hash) are tabulated once per call.
struct Dropout {
  bool on = false;
  uint32_t seed_lo = 0, threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p)
  std::vector<uint32_t> key_hash;

  MMK_INLINE static bool keep(uint32_t kh, uint32_t row, uint32_t seed_lo, uint32_t threshold) {
    return dropout_keep(kh, row, seed_lo, threshold);
  }
};

// What a tile pass needs to know about dropout (plain data, passed by value to the
// vectorised loops).
struct TileDropout {
  bool on;
  uint32_t seed_lo, threshold;
  const uint32_t* key_hash;  // at the tile's first key
  uint32_t row0;             // dropout row of the tile's first query row; row i is row0 + i
};

// ---------------------------------------------------------------------------------------
// Per-sequence view
// ---------------------------------------------------------------------------------------

// A strided operand in the compute dtype: row t of head h of batch entry b starts at
// base + b*sb + t*st + h*sh and its D elements are contiguous. st >= D (a BLAS row stride).
template <typename T>
struct Rows {
  T* base = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  T* row(int64_t b, int64_t t, int64_t h) const { return base + b * sb + t * st + h * sh; }
};

struct Seq {
  int64_t b;       // batch entry (dense), 0 (varlen)
  int64_t q0, k0;  // first query / key token (varlen), 0 (dense)
  int64_t lq, lk;
  // Keys at and after kend are padding: the key range is trimmed to [0, kend).
  int64_t kend;
};

// Everything about a call except the tensors' data.
struct Problem {
  bool varlen, causal;
  int64_t H, Hk, group, Dqk, Dv;
  int64_t B, Lq, Lk;  // dense sizes (varlen: B = 1, Lq = Tq, Lk = Tk)
  double scale;
  std::vector<Seq> seqs;
  // Key padding (dense only): masked[b * Lk + j] = key j of batch entry b is ignored, and
  // live[b * (Lk + 1) + j] = number of unmasked keys before j, so that a key block is
  // skipped, or run without per-key tests, from two lookups.
  bool has_mask = false;
  std::vector<uint8_t> masked;
  std::vector<int32_t> live;
  Dropout dropout;
  // lse / dropout row index of query token t, head h, batch entry b: b*lse_sb + t + h*lse_sh.
  int64_t lse_sb, lse_sh;

  int64_t lse_index(const Seq& s, int64_t h, int64_t i) const {
    return s.b * lse_sb + s.q0 + i + h * lse_sh;
  }
  // Unmasked keys in [k0, k1) of sequence s (the block length when there is no mask).
  int64_t live_keys(const Seq& s, int64_t k0, int64_t k1) const {
    if (!has_mask) return k1 - k0;
    const int32_t* c = live.data() + s.b * (Lk + 1);
    return c[k1] - c[k0];
  }
  // The per-key mask of keys [k0, ...) of sequence s, or nullptr when none of the n keys
  // there is masked (the tile loops then skip the test).
  const uint8_t* key_mask(const Seq& s, int64_t k0, int64_t n) const {
    if (!has_mask || live_keys(s, k0, k0 + n) == n) return nullptr;
    return masked.data() + s.b * Lk + k0;
  }
  // Causal: query i sees keys j < i + causal_shift + 1 (bottom-right alignment).
  static int64_t causal_shift(const Seq& s) { return s.lk - s.lq; }
  TileDropout tile_dropout(const Seq& s, int64_t h, int64_t i0, int64_t k0) const {
    if (!dropout.on) return TileDropout{false, 0, 0, nullptr, 0};
    return TileDropout{true, dropout.seed_lo, dropout.threshold, dropout.key_hash.data() + k0,
                       static_cast<uint32_t>(lse_index(s, h, i0))};
  }
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// cu_seqlens as int64 offsets (read once), checked: int32, 1-D, CPU, n + 1 entries, starts
// at 0, nondecreasing, ends at `total`.
inline std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, int64_t total, const char* fn,
                                            const char* name) {
  TORCH_CHECK(cu.defined(), fn, ": ", name, " must be a tensor");
  TORCH_CHECK(cu.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt, fn, ": ", name, " must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, fn, ": ", name,
              " must be 1-D with at least one entry, got shape ", cu.sizes());
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  std::vector<int64_t> out(p, p + c.size(0));
  TORCH_CHECK(out.front() == 0, fn, ": ", name, " must start at 0, got ", out.front());
  for (size_t i = 1; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= out[i - 1], fn, ": ", name, " must be nondecreasing, got ",
                out[i - 1], " then ", out[i], " at index ", i);
  }
  TORCH_CHECK(out.back() == total, fn, ": ", name, " must end at ", total,
              " (the number of packed tokens), got ", out.back());
  return out;
}

inline void check_tensor(const at::Tensor& x, int64_t dim, const char* fn, const char* name) {
  TORCH_CHECK(x.defined(), fn, ": ", name, " must be a tensor");
  TORCH_CHECK(x.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == dim, fn, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
}

// Checks q, k, v, the mask, the cu_seqlens and the scalars, and builds the per-sequence view.
inline Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& cu_seqlens_q,
                            const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
                            double scale, double dropout_p, const std::optional<at::Tensor>& seed,
                            const char* fn) {
  Problem p;
  const bool has_cq = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  const bool has_ck = cu_seqlens_k.has_value() && cu_seqlens_k->defined();
  TORCH_CHECK(has_cq == has_ck, fn,
              ": cu_seqlens_q and cu_seqlens_k must be given together (varlen) or both be None");
  p.varlen = has_cq;
  p.causal = causal;
  p.scale = scale;
  const int64_t dim = p.varlen ? 3 : 4;
  check_tensor(q, dim, fn, "q");
  check_tensor(k, dim, fn, "k");
  check_tensor(v, dim, fn, "v");
  TORCH_CHECK(is_float_dtype(q.scalar_type()), fn,
              ": q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
              ": q, k and v must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", v.scalar_type());
  // Dense (B, H, L, D) / varlen (T, H, D): heads on axis 1, tokens on axis 2 / 0.
  const int64_t hd = 1, td = p.varlen ? 0 : 2;
  p.H = q.size(hd);
  p.Hk = k.size(hd);
  p.Dqk = q.size(-1);
  p.Dv = v.size(-1);
  TORCH_CHECK(p.Hk >= 1 && p.H >= 1 && p.H % p.Hk == 0, fn,
              ": the number of K/V heads must divide the number of query heads (both >= 1), "
              "got q with ", p.H, " and k with ", p.Hk);
  p.group = p.H / p.Hk;
  TORCH_CHECK(v.size(hd) == p.Hk, fn, ": k and v must have the same number of heads, got ", p.Hk,
              " and ", v.size(hd));
  TORCH_CHECK(p.Dqk >= 1 && p.Dv >= 1, fn, ": head dims must be >= 1, got q/k ", p.Dqk,
              " and v ", p.Dv);
  TORCH_CHECK(k.size(-1) == p.Dqk, fn, ": q and k must have the same head dim, got ", p.Dqk,
              " and ", k.size(-1));
  TORCH_CHECK(v.size(td) == k.size(td), fn, ": k and v must have the same number of keys, got ",
              k.size(td), " and ", v.size(td));
  if (!p.varlen) {
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), fn,
                ": q, k and v must have the same batch size, got ", q.size(0), ", ", k.size(0),
                " and ", v.size(0));
  }
  TORCH_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);

  if (p.varlen) {
    TORCH_CHECK(!(key_padding_mask.has_value() && key_padding_mask->defined()), fn,
                ": key_padding_mask must be None with cu_seqlens (varlen)");
    const int64_t Tq = q.size(0), Tk = k.size(0);
    const std::vector<int64_t> cq = read_cu_seqlens(*cu_seqlens_q, Tq, fn, "cu_seqlens_q");
    const std::vector<int64_t> ck = read_cu_seqlens(*cu_seqlens_k, Tk, fn, "cu_seqlens_k");
    TORCH_CHECK(cq.size() == ck.size(), fn,
                ": cu_seqlens_q and cu_seqlens_k must have the same length, got ", cq.size(),
                " and ", ck.size());
    p.B = 1;
    p.Lq = Tq;
    p.Lk = Tk;
    for (size_t s = 0; s + 1 < cq.size(); ++s) {
      const int64_t lk = ck[s + 1] - ck[s];
      p.seqs.push_back(Seq{0, cq[s], ck[s], cq[s + 1] - cq[s], lk, lk});
    }
    p.lse_sb = 0;
    p.lse_sh = Tq;
  } else {
    p.B = q.size(0);
    p.Lq = q.size(2);
    p.Lk = k.size(2);
    for (int64_t b = 0; b < p.B; ++b) p.seqs.push_back(Seq{b, 0, 0, p.Lq, p.Lk, p.Lk});
    p.lse_sb = p.H * p.Lq;
    p.lse_sh = p.Lq;
    if (key_padding_mask.has_value() && key_padding_mask->defined()) {
      const at::Tensor& m = *key_padding_mask;
      TORCH_CHECK(m.device().is_cpu(), fn, ": key_padding_mask must be a CPU tensor, got ",
                  m.device());
      TORCH_CHECK(m.scalar_type() == at::kBool, fn, ": key_padding_mask must be bool, got ",
                  m.scalar_type());
      TORCH_CHECK(m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.Lk, fn,
                  ": key_padding_mask must have shape (B, Lk) = (", p.B, ", ", p.Lk, "), got ",
                  m.sizes());
      p.has_mask = true;
      const at::Tensor mc = m.contiguous();
      const bool* mp = mc.data_ptr<bool>();
      p.masked.resize(p.B * p.Lk);
      p.live.resize(p.B * (p.Lk + 1));
      for (int64_t b = 0; b < p.B; ++b) {
        int32_t* c = p.live.data() + b * (p.Lk + 1);
        c[0] = 0;
        int64_t kend = 0;
        for (int64_t j = 0; j < p.Lk; ++j) {
          const bool x = mp[b * p.Lk + j];
          p.masked[b * p.Lk + j] = x;
          c[j + 1] = c[j] + (x ? 0 : 1);
          if (!x) kend = j + 1;
        }
        p.seqs[b].kend = kend;
      }
    }
  }

  const DropoutSeed ds = dropout_seed_arg(dropout_p, seed, fn);
  if (ds.on) {
    Dropout& d = p.dropout;
    d.on = true;
    d.seed_lo = ds.seed_lo;
    d.threshold = ds.threshold;
    d.keep_scale = ds.keep_scale;
    int64_t max_lk = 0;
    for (const Seq& s2 : p.seqs) max_lk = std::max(max_lk, s2.lk);
    d.key_hash = ds.column_hashes(max_lk);
  }
  return p;
}

// An input (q, k, v, out, grad_out) in the compute dtype with contiguous head dims and BLAS-
// usable row strides. Copies only when it must: to convert float16/bfloat16 (the tiles are
// computed in fp32), or when the head dim is strided or rows overlap (BLAS needs unit stride
// along a row and a row stride >= the row length). Transposed (B, H, L, D) views of (B, L, H,
// D) memory are used in place.
inline at::Tensor prepare_operand(const at::Tensor& x, at::ScalarType dtype, int64_t token_dim) {
  at::Tensor y = x.detach();
  if (y.scalar_type() != dtype) y = y.to(dtype);
  const int64_t D = y.size(-1);
  const bool unit = D <= 1 || y.stride(-1) == 1;
  const bool rows_ok = y.size(token_dim) <= 1 || y.stride(token_dim) >= D;
  if (!(unit && rows_ok)) y = y.contiguous();
  return y;
}

// A contiguous output of `shape`, uninitialised, on huge pages when large (common/alloc.h).
// The gradients of K and V are as large as K and V; faulting them in 4 KiB pages from two
// threads at once (the kernels' first touch) contended on the kernel's page-table lock and
// took a third of a packed backward's time (64 sequences, 8 heads, 19k keys: 100 ms -> 55 ms
// on 2 cores).
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  return empty_huge_pages(1, c10::multiply_integers(shape), options).view(shape);
}

template <typename T>
Rows<T> rows_of(const at::Tensor& x, bool varlen) {
  Rows<T> r;
  r.base = static_cast<T*>(x.data_ptr());
  const int64_t D = x.size(-1);
  if (varlen) {
    r.sb = 0;
    r.st = x.size(0) <= 1 ? D : x.stride(0);
    r.sh = x.stride(1);
  } else {
    r.sb = x.stride(0);
    r.st = x.size(2) <= 1 ? D : x.stride(2);
    r.sh = x.stride(1);
  }
  return r;
}

// ---------------------------------------------------------------------------------------
// Task queue
// ---------------------------------------------------------------------------------------

// Runs work(task, worker) for task = 0..n-1 on the intra-op threads, handing tasks out
// dynamically in index order (callers list the most expensive first): varlen tasks differ in
// cost by orders of magnitude, which a static split would leave unbalanced. Every task
// writes its own outputs in a fixed order, so the result does not depend on which worker ran
// it. `worker` < workers(n) indexes per-worker scratch. BLAS calls inside run single-threaded
// (nested parallel regions are serialised).
inline int64_t workers(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
}

template <typename Work>
void run_tasks(int64_t n, const Work& work) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) work(t, w);
    }
  });
}

}  // namespace attention
}  // namespace mmk
