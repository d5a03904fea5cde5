"""Triton cross-attention kernels, FlashAttention-2 style: the forward never stores the
Lq × Lk probabilities, the backward recomputes them tile by tile from the saved log-sum-exp.

``forward`` / ``backward`` implement the backend contract of ``mmkernels.attention.reference``
(dense and varlen, GQA, Dqk ≠ Dv, key padding mask, bottom-right causal, counter-based dropout).

Kernels (every grid is one flat axis, so no grid dimension limit applies to B·H or to the
number of varlen sequences; the fastest-varying index is the row block, so the programs of
one head, which read the same K/V, run together and share them in L2):

* forward: one program per (query block of BLOCK_M rows, query head, sequence). Dense and
  varlen share the kernel: a sequence's row offset and lengths come from cu_seqlens (varlen,
  IS_VARLEN) or are 0, Lq, Lk with the batch index times the batch stride (dense). The grid
  covers max_seqlen_q, programs past their sequence's length exit. Online softmax over the
  key blocks in base 2: s₂ = q·k·(scale·log₂e), p = exp2(s₂ − m₂), lse = (m₂ + log₂ l)·ln 2.
  With causal, key blocks entirely in the future of the block's last row are not visited,
  and row blocks run last-first (the bottom rows see the most keys).
* backward preprocess (attention_bwd_delta): Δ_i = rowsum(dO_i·O_i) in fp32.
* dK/dV: one program per (key block of BLOCK_N keys, K/V head, sequence) keeps its K and V
  rows (registers or, CHUNKED, cache) and sweeps the query blocks of every query head of its
  GQA group (with causal, only the blocks that see one of its keys), in the transposed
  orientation: Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ₂ − lse₂), dV += Pdᵀ·dO, dPᵀ = V·dOᵀ,
  dSᵀ = Pᵀ∘(dPᵀ − Δ), dK += dSᵀ·Q. SPLIT configs (fp32/TF32 at head dim 256, where the dK and
  dV accumulators together do not fit in registers on sm_80) launch it twice, once per
  output, and compute Sᵀ in both launches.
* dQ: one program per (query block, query head, sequence) sweeps the key blocks as the
  forward does: S, P, dP = dO·Vᵀ, dS, dQ += dS·K.

dQ strategy: deterministic, no atomics. FlashAttention-2 adds dQ from the dK/dV programs with
fp32 atomics (5 GEMMs per tile: the nominal 10·Lq·Lk·D backward FLOPs at Dqk = Dv = D, 2.5 ×
the forward's 4); here every output row has exactly one owner program, so results are bitwise
reproducible, and the price is that the dQ programs recompute S and dP: 7 GEMMs, backward
14·Lq·Lk·D executed, 18 instead of 14 for forward + backward (1.29×; 20, 1.43×, with a SPLIT
dK/dV). The compile specs' FLOP formulas count exactly these products.

Recomputed scores: the backward forms S (dQ) and Sᵀ (dK/dV) with its own tile shapes, operand
order and head-dim chunking, so a recomputed score may differ from the forward's in its last
bits, and P = exp(s − lse) moves by that rounding of s: 6e-8·|s| relative, below fp32 test
tolerances for scores below ~100 (attention logits are scale·q·k with scale = D^-½). The
contrastive kernels, whose logits reach 1e5, recompute bit for bit instead; here that would
tie the backward's tiles to the forward's, which the register budget of the backward (see
CONFIGS) does not allow.

Masks: ``key_padding_mask`` (B, Lk) bool is read per key block (as uint8, any strides); keys
past a sequence's length load as zero and are masked. A query row that sees no key keeps
m₂ = −inf and l = 0: p is formed against a reference of 0 instead of −inf (no −inf − −inf),
its output is 0/1 = 0 and its lse +inf, and in the backward exp2(s₂ − inf) = 0 removes it from
every gradient. Query rows past a sequence's end load lse = +inf: they contribute nothing.
NaN in any input that a row sees propagates to its outputs (a NaN score makes p NaN).

Dropout: kept iff u ≥ p for the contract's counter hash (``mmkernels._rng.dropout_uniform``)
evaluated in uint32 arithmetic (the helpers every op shares, ``mmkernels._triton``); the
comparison is done on integers, (h >> 8) ≥ ⌈p·2²⁴⌉, which equals u = (h >> 8)·2⁻²⁴ ≥ p
exactly. The key half of the hash, fmix32(key ^ seed_hi), is one
vector per key block; each score then costs two fmix32. The backward regenerates the mask.
The lse is that of the undropped probabilities; the kept ones are scaled by 1/(1 − p) on the
accumulator (forward, dV) or on dP.

Precision (the package rule, ``mmkernels._triton``): fp16/bf16 operands go to tensor cores with
fp32 accumulation ("16bit"; P and dS are cast to the input dtype for the second products).
fp32 with ``tf32`` runs TF32 tensor cores on operands rounded to nearest (q, k, v, dO as
loaded, P and dS before their products: ``round_tf32``/``cast_for_dot``). fp32 without it is
exact IEEE fp32 ("ieee") on FMA units. The score products (reductions over the head dim) run
either as one tl.dot of whole-head-dim tiles held in registers, or CHUNKED: BLOCK_D columns at
a time, reloaded from L1/L2 for each block. Exact fp32 always chunks, because an FMA tl.dot
keeps its whole reduction extent in registers (a 256-wide one spills); the tensor-core
families chunk where the resident tiles would not fit (CONFIGS). The second products reduce
over a key or query block, with the head dim whole.

Layout: any input strides are handled by the kernels (strides are arguments; a unit last-dim
stride and 16-divisible strides are specialized by Triton as usual), nothing is copied except
a non-contiguous lse in the backward. Head dims 1..256 are padded to powers of two
BLOCK_DQK/BLOCK_DV ≥ 16 with masked loads. Outputs are contiguous.
"""

import math

import torch
import triton
import triton.language as tl

from .. import _triton
from .._triton import (LN2, LOG2E, cast_for_dot, dropout_column_hash, dropout_kept, load_rows,
                       seed_halves)

# Launch configs per kernel, precision family and head-dim bucket (the larger of the padded
# head dims: ≤ 64, 128, 256). BLOCK_M: query rows, BLOCK_N: keys. A config with BLOCK_D runs
# the score products (S, dP: reductions over the head dim) in BLOCK_D-column chunks loaded
# from memory (CHUNKED, see ``_scores``) instead of holding whole-head-dim tiles in registers:
# always for exact fp32 (FMA), and where the registers do not hold the tiles otherwise.
# SPLIT (dK/dV): dV and dK in separate launches (see ``_attention_bwd_dkdv_kernel``).
#
# Chosen for A100 (sm_80) and H100 (sm_90) alike (one table: a call sums in the same order on
# every GPU) as the largest tiles that compile for both without register spills, under 255
# registers, within shared memory, with wgmma on sm_90 for the tensor-core families (BLOCK_M,
# and BLOCK_N for dK/dV, ≥ 64): python -m mmkernels gpu-report. The limit is registers:
# on sm_80 an mma.sync operand is held by every warp for its rows across the whole head dim,
# so the backward's streamed operands (q, dO, twice each) and dK + dV accumulators fill the
# register file at head dim 128-256, and a second pipeline stage of the dK/dV loop at head
# dim 64 tips it into spills (num_stages=1 there). Not timed on hardware.
CONFIGS = {
    "attention_fwd": {
        "16bit": {
            64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
            128: dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
            256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        },
        "tf32": {
            64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
            128: dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, num_warps=8, num_stages=2),
        },
        "ieee": {
            64: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=8, num_warps=4, num_stages=2),
            128: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=8, num_warps=4, num_stages=2),
            256: dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=8, num_warps=4, num_stages=2),
        },
    },
    "attention_bwd_delta": {
        fam: {64: dict(BLOCK_M=64, num_warps=4, num_stages=1),
              128: dict(BLOCK_M=64, num_warps=8, num_stages=1),
              256: dict(BLOCK_M=32, num_warps=8, num_stages=1)}
        for fam in ("16bit", "tf32", "ieee")
    },
    "attention_bwd_dkdv": {
        "16bit": {
            64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=1),
            128: dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=2),
        },
        "tf32": {
            64: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=16, num_warps=8, num_stages=2),
            128: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=16, SPLIT=True, num_warps=8,
                      num_stages=2),
        },
        "ieee": {
            64: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=8, num_warps=8, num_stages=2),
            128: dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=8, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=8, num_warps=8, num_stages=2),
        },
    },
    "attention_bwd_dq": {
        "16bit": {
            64: dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
            128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=64, num_warps=8, num_stages=2),
        },
        "tf32": {
            64: dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=2),
            128: dict(BLOCK_M=64, BLOCK_N=16, BLOCK_D=32, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=64, BLOCK_N=16, BLOCK_D=16, num_warps=8, num_stages=2),
        },
        "ieee": {
            64: dict(BLOCK_M=64, BLOCK_N=16, BLOCK_D=8, num_warps=8, num_stages=2),
            128: dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=8, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=8, num_warps=8, num_stages=2),
        },
    },
}
WIDTHS = (64, 128, 256)

# Interpreter configs (one per kernel and family): small blocks so the tests' short sequences
# cross several query and key blocks; "ieee" chunks head dims of 40 into 3 BLOCK_D chunks.
INTERPRET_CONFIGS = {
    kernel: {
        "16bit": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
        "tf32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
        "ieee": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, num_warps=1, num_stages=1),
    }
    for kernel in CONFIGS
}


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _sequence(cu_q_ptr, cu_k_ptr, seq, Lq, Lk, IS_VARLEN: tl.constexpr):
    """(first query row, query count, first key row, key count) of sequence ``seq``."""
    if IS_VARLEN:
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        k_start = tl.load(cu_k_ptr + seq)
        k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    else:
        q_start = 0
        q_len = Lq
        k_start = 0
        k_len = Lk
    return q_start, q_len, k_start, k_len


@triton.jit
def _row_ptrs(ptr, seq, head, rows, stride_b, stride_h, stride_m):
    """Base pointers of rows ``rows`` (absolute: sequence start + position) of ``head`` in
    sequence ``seq`` (stride_b = 0 for varlen); int64, offsets can exceed 2^31 elements."""
    base = seq.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    return ptr + base + rows.to(tl.int64) * stride_m


@triton.jit
def _tile(rows, stride_d, mask_rows, D, BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A (rows × BLOCK) operand tile of a D-wide matrix, zero past D and on masked rows."""
    offs = tl.arange(0, BLOCK)
    return load_rows(rows, offs * stride_d, mask_rows, offs < D, INPUT_PRECISION)


@triton.jit
def _scores(a, b, a_rows, stride_ad, mask_a, b_rows, stride_bd, mask_b, D,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
            CHUNKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a·bᵀ (BLOCK_A × BLOCK_B, fp32) over the head dim D: one tl.dot of the whole-head-dim
    tiles ``a``, ``b`` held by the caller, or (CHUNKED) D in BLOCK_D chunks loaded from the row
    pointers (cache hits after a program's first block), the caller's tiles unused (0.0).
    Chunks keep the registers an FMA tl.dot (exact fp32) spends on its whole reduction extent,
    and the tensor-core operands of large head dims, out of the register file."""
    if CHUNKED:
        offs_d = tl.arange(0, BLOCK_D)
        s = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            a_c = load_rows(a_rows, cols * stride_ad, mask_a, cols < D, INPUT_PRECISION)
            b_c = load_rows(b_rows, cols * stride_bd, mask_b, cols < D, INPUT_PRECISION)
            s = tl.dot(a_c, tl.trans(b_c), s, input_precision=INPUT_PRECISION)
    else:
        s = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
    return s


@triton.jit
def _key_allowed(mask_ptr, seq, offs_n, k_len, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """Keys of the block that exist and are not padding (key_padding_mask True = ignore)."""
    allowed = offs_n < k_len
    if HAS_MASK:
        ignore = tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + offs_n.to(tl.int64) * stride_mn,
                         mask=allowed, other=1)
        allowed = allowed & (ignore == 0)
    return allowed


@triton.jit
def _row_ids(seq, head, rows, rows_b, rows_h):
    """Flat lse index of query rows (absolute positions): dense (b·H + h)·Lq + i with
    rows_b = H·Lq, rows_h = Lq; varlen h·Tq + t with rows_b = 0, rows_h = Tq. It is also the
    dropout row id."""
    return seq.to(tl.int64) * rows_b + head.to(tl.int64) * rows_h + rows.to(tl.int64)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, cu_q_ptr, cu_k_ptr, seed_ptr, out_ptr, lse_ptr,
    Lq, Lk, H, group, m_blocks, Dqk, Dv, qk_scale, inv_keep, threshold, rows_b, rows_h,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    m_block = m_blocks - 1 - pid % m_blocks
    head = (pid // m_blocks) % H
    seq = pid // (m_blocks * H)
    q_start, q_len, k_start, k_len = _sequence(cu_q_ptr, cu_k_ptr, seq, Lq, Lk, IS_VARLEN)
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
        return
    kv_head = head // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    q_rows = _row_ptrs(q_ptr, seq, head, q_start + offs_m, stride_qb, stride_qh, stride_qm)
    if CHUNKED:
        q = 0.0
    else:
        q = _tile(q_rows, stride_qd, mask_m, Dqk, BLOCK_DQK, INPUT_PRECISION)
    row_ids = _row_ids(seq, head, q_start + offs_m, rows_b, rows_h)
    seed_lo, seed_hi = seed_halves(seed_ptr, HAS_DROPOUT)
    diag = k_len - q_len  # query i sees key j iff j <= i + diag (causal, bottom-right)
    n_end = k_len
    if CAUSAL:
        n_end = tl.minimum(k_len, tl.minimum(m0 + BLOCK_M, q_len) + diag)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_rows = _row_ptrs(k_ptr, seq, kv_head, k_start + offs_n, stride_kb, stride_kh,
                           stride_kn)
        if CHUNKED:
            k = 0.0
        else:
            k = _tile(k_rows, stride_kd, offs_n < k_len, Dqk, BLOCK_DQK, INPUT_PRECISION)
        s = _scores(q, k, q_rows, stride_qd, mask_m, k_rows, stride_kd, offs_n < k_len, Dqk,
                    BLOCK_M, BLOCK_N, BLOCK_D, CHUNKED, INPUT_PRECISION) * qk_scale
        allowed = _key_allowed(mask_ptr, seq, offs_n, k_len, stride_mb, stride_mn,
                               HAS_MASK)[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far keeps m = -inf; 0 as its reference keeps
        # exp2(-inf - -inf) = NaN out (p = 0, l = 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_kept(dropout_column_hash(offs_n, seed_hi)[None, :],
                                row_ids.to(tl.uint32)[:, None], seed_lo, threshold)
            p = tl.where(keep, p, 0.0)
        v_rows = _row_ptrs(v_ptr, seq, kv_head, k_start + offs_n, stride_vb, stride_vh,
                           stride_vn)
        v = _tile(v_rows, stride_vd, offs_n < k_len, Dv, BLOCK_DV, INPUT_PRECISION)
        acc = acc * alpha[:, None]
        acc = tl.dot(cast_for_dot(p, v_ptr.dtype.element_ty, INPUT_PRECISION), v, acc,
                     input_precision=INPUT_PRECISION)
        m_i = m_new

    # Dead rows (l = 0): out = 0/1 = 0, lse = +inf; NaN rows stay NaN.
    dead = l_i == 0.0
    acc = acc * (inv_keep / tl.where(dead, 1.0, l_i))[:, None]
    lse = tl.where(dead, float("inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * LN2)
    offs_dv = tl.arange(0, BLOCK_DV)
    out_rows = _row_ptrs(out_ptr, seq, head, q_start + offs_m, stride_ob, stride_oh, stride_om)
    tl.store(out_rows[:, None] + offs_dv[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_dv < Dv)[None, :])
    tl.store(lse_ptr + row_ids, lse, mask=mask_m)


@triton.jit
def _attention_bwd_delta_kernel(
    out_ptr, do_ptr, delta_ptr, L, H, m_blocks, Dv,
    stride_ob, stride_oh, stride_om, stride_od, stride_gb, stride_gh, stride_gm, stride_gd,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Δ = rowsum(dO∘O) in fp32 into the lse-shaped (contiguous) delta; varlen runs as one
    sequence of Tq rows (L = Tq, stride_b = 0): Δ needs no sequence boundaries."""
    pid = tl.program_id(0)
    head = (pid // m_blocks) % H
    seq = pid // (m_blocks * H)
    offs_m = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    offs_d = tl.arange(0, BLOCK_DV)
    mask = mask_m[:, None] & (offs_d < Dv)[None, :]
    o_rows = _row_ptrs(out_ptr, seq, head, offs_m, stride_ob, stride_oh, stride_om)
    g_rows = _row_ptrs(do_ptr, seq, head, offs_m, stride_gb, stride_gh, stride_gm)
    o = tl.load(o_rows[:, None] + (offs_d * stride_od)[None, :], mask=mask, other=0.0)
    g = tl.load(g_rows[:, None] + (offs_d * stride_gd)[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
    tl.store(delta_ptr + _row_ids(seq, head, offs_m, H * L, L), delta, mask=mask_m)


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, mask_ptr, cu_q_ptr, cu_k_ptr, seed_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr,
    Lq, Lk, Hk, group, n_blocks, Dqk, Dv, scale, qk_scale, inv_keep, threshold, rows_b, rows_h,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
    stride_dvn,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, CHUNKED: tl.constexpr, WANT_DK: tl.constexpr,
    WANT_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """WANT_DK/WANT_DV select the outputs: both, or (configs with SPLIT, where the two
    accumulators together would not fit in registers) one per launch, Sᵀ computed in each."""
    pid = tl.program_id(0)
    n_block = pid % n_blocks
    kv_head = (pid // n_blocks) % Hk
    seq = pid // (n_blocks * Hk)
    q_start, q_len, k_start, k_len = _sequence(cu_q_ptr, cu_k_ptr, seq, Lq, Lk, IS_VARLEN)
    n0 = n_block * BLOCK_N
    if n0 >= k_len:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < k_len
    k_rows = _row_ptrs(k_ptr, seq, kv_head, k_start + offs_n, stride_kb, stride_kh, stride_kn)
    v_rows = _row_ptrs(v_ptr, seq, kv_head, k_start + offs_n, stride_vb, stride_vh, stride_vn)
    k = 0.0
    v = 0.0
    if not CHUNKED:
        k = _tile(k_rows, stride_kd, mask_n, Dqk, BLOCK_DQK, INPUT_PRECISION)
        if WANT_DK:
            v = _tile(v_rows, stride_vd, mask_n, Dv, BLOCK_DV, INPUT_PRECISION)
    allowed_n = _key_allowed(mask_ptr, seq, offs_n, k_len, stride_mb, stride_mn, HAS_MASK)
    seed_lo, seed_hi = seed_halves(seed_ptr, HAS_DROPOUT)
    key_hash = 0
    if HAS_DROPOUT:
        key_hash = dropout_column_hash(offs_n, seed_hi)
    diag = k_len - q_len
    # Causal: the first query that sees key n0 is n0 - diag; earlier row blocks are skipped
    # (row blocks keep the forward's origins, multiples of BLOCK_M).
    m_lo = 0
    if CAUSAL:
        m_lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M

    dk = 0.0
    dv = 0.0
    if WANT_DK:
        dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
    if WANT_DV:
        dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for g in range(0, group):
        head = kv_head * group + g
        for m0 in range(m_lo, q_len, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < q_len
            q_rows = _row_ptrs(q_ptr, seq, head, q_start + offs_m, stride_qb, stride_qh,
                               stride_qm)
            g_rows = _row_ptrs(do_ptr, seq, head, q_start + offs_m, stride_gb, stride_gh,
                               stride_gm)
            q = _tile(q_rows, stride_qd, mask_m, Dqk, BLOCK_DQK, INPUT_PRECISION)
            do = _tile(g_rows, stride_gd, mask_m, Dv, BLOCK_DV, INPUT_PRECISION)
            row_ids = _row_ids(seq, head, q_start + offs_m, rows_b, rows_h)
            # Rows past the sequence read lse = +inf: P = 0, no contribution.
            lse2 = tl.load(lse_ptr + row_ids, mask=mask_m, other=float("inf")) * LOG2E
            delta = tl.load(delta_ptr + row_ids, mask=mask_m, other=0.0)
            s_t = _scores(k, q, k_rows, stride_kd, mask_n, q_rows, stride_qd, mask_m, Dqk,
                          BLOCK_N, BLOCK_M, BLOCK_D, CHUNKED, INPUT_PRECISION)
            p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
            allowed = allowed_n[:, None]
            if CAUSAL:
                allowed = allowed & (offs_n[:, None] <= offs_m[None, :] + diag)
            p_t = tl.where(allowed, p_t, 0.0)
            keep = True
            if HAS_DROPOUT:
                keep = dropout_kept(key_hash[:, None], row_ids.to(tl.uint32)[None, :], seed_lo,
                                    threshold)
            if WANT_DV:
                pd_t = p_t
                if HAS_DROPOUT:
                    pd_t = tl.where(keep, p_t, 0.0)
                dv = tl.dot(cast_for_dot(pd_t, do_ptr.dtype.element_ty, INPUT_PRECISION), do,
                            dv, input_precision=INPUT_PRECISION)
            if WANT_DK:
                dp_t = _scores(v, do, v_rows, stride_vd, mask_n, g_rows, stride_gd, mask_m, Dv,
                               BLOCK_N, BLOCK_M, BLOCK_D, CHUNKED, INPUT_PRECISION)
                if HAS_DROPOUT:
                    dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(cast_for_dot(ds_t, q_ptr.dtype.element_ty, INPUT_PRECISION), q, dk,
                            input_precision=INPUT_PRECISION)

    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_rows = _row_ptrs(dk_ptr, seq, kv_head, k_start + offs_n, stride_dkb, stride_dkh,
                        stride_dkn)
    dv_rows = _row_ptrs(dv_ptr, seq, kv_head, k_start + offs_n, stride_dvb, stride_dvh,
                        stride_dvn)
    if WANT_DK:
        tl.store(dk_rows[:, None] + offs_dqk[None, :],
                 (dk * scale).to(dk_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_dqk < Dqk)[None, :])
    if WANT_DV:
        tl.store(dv_rows[:, None] + offs_dv[None, :],
                 (dv * inv_keep).to(dv_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_dv < Dv)[None, :])


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, mask_ptr, cu_q_ptr, cu_k_ptr, seed_ptr, lse_ptr, delta_ptr,
    dq_ptr,
    Lq, Lk, H, group, m_blocks, Dqk, Dv, scale, qk_scale, inv_keep, threshold, rows_b, rows_h,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mn, stride_dqb, stride_dqh, stride_dqm,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    m_block = m_blocks - 1 - pid % m_blocks
    head = (pid // m_blocks) % H
    seq = pid // (m_blocks * H)
    q_start, q_len, k_start, k_len = _sequence(cu_q_ptr, cu_k_ptr, seq, Lq, Lk, IS_VARLEN)
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
        return
    kv_head = head // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    q_rows = _row_ptrs(q_ptr, seq, head, q_start + offs_m, stride_qb, stride_qh, stride_qm)
    g_rows = _row_ptrs(do_ptr, seq, head, q_start + offs_m, stride_gb, stride_gh, stride_gm)
    if CHUNKED:
        q = 0.0
        do = 0.0
    else:
        q = _tile(q_rows, stride_qd, mask_m, Dqk, BLOCK_DQK, INPUT_PRECISION)
        do = _tile(g_rows, stride_gd, mask_m, Dv, BLOCK_DV, INPUT_PRECISION)
    row_ids = _row_ids(seq, head, q_start + offs_m, rows_b, rows_h)
    lse2 = tl.load(lse_ptr + row_ids, mask=mask_m, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + row_ids, mask=mask_m, other=0.0)
    seed_lo, seed_hi = seed_halves(seed_ptr, HAS_DROPOUT)
    diag = k_len - q_len
    n_end = k_len
    if CAUSAL:
        n_end = tl.minimum(k_len, tl.minimum(m0 + BLOCK_M, q_len) + diag)

    dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < k_len
        k_rows = _row_ptrs(k_ptr, seq, kv_head, k_start + offs_n, stride_kb, stride_kh,
                           stride_kn)
        v_rows = _row_ptrs(v_ptr, seq, kv_head, k_start + offs_n, stride_vb, stride_vh,
                           stride_vn)
        k = _tile(k_rows, stride_kd, mask_n, Dqk, BLOCK_DQK, INPUT_PRECISION)
        if CHUNKED:
            v = 0.0
        else:
            v = _tile(v_rows, stride_vd, mask_n, Dv, BLOCK_DV, INPUT_PRECISION)
        s = _scores(q, k, q_rows, stride_qd, mask_m, k_rows, stride_kd, mask_n, Dqk,
                    BLOCK_M, BLOCK_N, BLOCK_D, CHUNKED, INPUT_PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        allowed = _key_allowed(mask_ptr, seq, offs_n, k_len, stride_mb, stride_mn,
                               HAS_MASK)[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(allowed, p, 0.0)
        dp = _scores(do, v, g_rows, stride_gd, mask_m, v_rows, stride_vd, mask_n, Dv,
                     BLOCK_M, BLOCK_N, BLOCK_D, CHUNKED, INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_kept(dropout_column_hash(offs_n, seed_hi)[None, :],
                                row_ids.to(tl.uint32)[:, None], seed_lo, threshold)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(cast_for_dot(ds, k_ptr.dtype.element_ty, INPUT_PRECISION), k, dq,
                    input_precision=INPUT_PRECISION)

    offs_dqk = tl.arange(0, BLOCK_DQK)
    dq_rows = _row_ptrs(dq_ptr, seq, head, q_start + offs_m, stride_dqb, stride_dqh,
                        stride_dqm)
    tl.store(dq_rows[:, None] + offs_dqk[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_dqk < Dqk)[None, :])


# ----------------------------------------------------------------------------------------------
# Host side


def _width(d: int) -> int:
    """A head dim padded to the power of two (≥ 16, the smallest tl.dot) its tiles use."""
    return max(16, triton.next_power_of_2(d))


def _bucket(dqk: int, dv: int) -> int:
    width = max(_width(dqk), _width(dv))
    return next(w for w in WIDTHS if width <= w)


def gpu_config(kernel: str, fam: str, dqk: int, dv: int) -> dict:
    """The GPU launch config of ``kernel`` for family ``fam`` and head dims (dqk, dv)."""
    return _finish(kernel, CONFIGS[kernel][fam][_bucket(dqk, dv)], fam, dqk, dv)


def _config(kernel: str, fam: str, dqk: int, dv: int) -> dict:
    if _triton.INTERPRET:
        return _finish(kernel, INTERPRET_CONFIGS[kernel][fam], fam, dqk, dv)
    return gpu_config(kernel, fam, dqk, dv)


def _finish(kernel: str, cfg: dict, fam: str, dqk: int, dv: int) -> dict:
    cfg = dict(cfg, BLOCK_DQK=_width(dqk), BLOCK_DV=_width(dv),
               INPUT_PRECISION=_triton.input_precision(fam))
    cfg["CHUNKED"] = "BLOCK_D" in cfg
    cfg.setdefault("BLOCK_D", 16)  # unused unless CHUNKED
    if kernel == "attention_bwd_dkdv":
        cfg.setdefault("SPLIT", False)
    return cfg


def _layout(x: torch.Tensor, varlen: bool) -> tuple:
    """(batch, head, row, column) strides of a (B, H, L, D) dense or (T, H, D) varlen tensor;
    varlen rows carry their absolute index, so the batch stride is 0."""
    if varlen:
        return 0, x.stride(1), x.stride(0), x.stride(2)
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


class _Problem:
    """Sizes and launch arguments shared by the forward and backward kernels."""

    def __init__(self, q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, causal, scale, dropout_p, seed, tf32):
        self.varlen = cu_seqlens_q is not None
        if q.dtype not in _triton.DOT_DTYPES or not q.dtype == k.dtype == v.dtype:
            raise TypeError("Triton attention takes q, k, v of one dtype among float32, "
                            f"float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
        if self.varlen:
            self.T, self.H, self.Dqk = q.shape
            self.Hk, self.Dv = k.shape[1], v.shape[2]
            self.B = cu_seqlens_q.numel() - 1
            self.Lq, self.Lk = int(max_seqlen_q), int(max_seqlen_k)
            self.rows_b, self.rows_h = 0, self.T
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
            self.lse_shape = (self.H, self.T)
        else:
            self.B, self.H, self.Lq, self.Dqk = q.shape
            self.Hk, self.Lk, self.Dv = k.shape[1], k.shape[2], v.shape[3]
            self.rows_b, self.rows_h = self.H * self.Lq, self.Lq
            # Never dereferenced (IS_VARLEN is off); any tensor does as a pointer.
            self.cu_q = self.cu_k = q
            self.lse_shape = (self.B, self.H, self.Lq)
        self.group = self.H // self.Hk
        self.fam = _triton.family(q.dtype, tf32)
        self.causal = bool(causal)
        self.scale = float(scale)
        # Base-2 scores: s₂ = q·k·(scale·log₂e), so exp2 needs no further multiply.
        self.qk_scale = self.scale * math.log2(math.e)
        self.dropout_p = float(dropout_p)
        self.has_dropout = self.dropout_p > 0.0
        self.inv_keep = 1.0 / (1.0 - self.dropout_p)
        self.threshold = _triton.dropout_threshold(self.dropout_p)
        self.seed = seed if self.has_dropout else q
        self.has_mask = key_padding_mask is not None
        if self.has_mask:
            # Same bytes read as uint8 (a view, any strides).
            self.mask = key_padding_mask.view(torch.uint8)
            self.mask_strides = (self.mask.stride(0), self.mask.stride(1))
        else:
            self.mask, self.mask_strides = q, (0, 0)
        self.device = q.device

    def empty(self) -> bool:
        """No query rows, or no keys anywhere (every row dead)."""
        return self.Lq == 0 or self.Lk == 0 or self.B == 0

    def flags(self, cfg: dict) -> dict:
        return dict(IS_VARLEN=self.varlen, HAS_MASK=self.has_mask, CAUSAL=self.causal,
                    HAS_DROPOUT=self.has_dropout, **cfg)

    def config(self, kernel: str) -> dict:
        return _config(kernel, self.fam, self.Dqk, self.Dv)


def forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal: bool, scale: float, dropout_p: float, seed, tf32: bool):
    """(out, lse) of the attention contract (``mmkernels.attention.reference``): out
    contiguous in q's dtype, (B, H, Lq, Dv) / (Tq, H, Dv); lse fp32 (B, H, Lq) / (H, Tq)."""
    p = _Problem(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, causal, scale, dropout_p, seed, tf32)
    out_shape = (*q.shape[:-1], p.Dv)
    if p.empty():
        return (q.new_zeros(out_shape),
                torch.full(p.lse_shape, float("inf"), dtype=torch.float32, device=p.device))
    out = q.new_empty(out_shape)
    lse = torch.empty(p.lse_shape, dtype=torch.float32, device=p.device)
    cfg = p.config("attention_fwd")
    m_blocks = triton.cdiv(p.Lq, cfg["BLOCK_M"])
    with _triton.launch_device(p.device):
        _attention_fwd_kernel[(m_blocks * p.H * p.B,)](
            q, k, v, p.mask, p.cu_q, p.cu_k, p.seed, out, lse,
            p.Lq, p.Lk, p.H, p.group, m_blocks, p.Dqk, p.Dv, p.qk_scale, p.inv_keep,
            p.threshold, p.rows_b, p.rows_h,
            *_layout(q, p.varlen), *_layout(k, p.varlen), *_layout(v, p.varlen),
            *p.mask_strides, *_layout(out, p.varlen)[:3],
            **p.flags(cfg),
        )
    return out, lse


def backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
             max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed, tf32):
    """(dq, dk, dv): contiguous, shapes and dtypes of q, k, v; deterministic (no atomics)."""
    p = _Problem(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, causal, scale, dropout_p, seed, tf32)
    if p.empty():
        return torch.zeros_like(q, memory_format=torch.contiguous_format), \
            torch.zeros_like(k, memory_format=torch.contiguous_format), \
            torch.zeros_like(v, memory_format=torch.contiguous_format)
    # The dot products take dO with q's dtype (autograd passes it so; a caller might not).
    grad_out = grad_out.to(q.dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=p.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=p.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=p.device)
    # The kernels index lse and delta by the row's flat index (its dropout row id).
    lse = lse.contiguous()
    delta = torch.empty(p.lse_shape, dtype=torch.float32, device=p.device)
    varlen = p.varlen
    with _triton.launch_device(p.device):
        cfg = p.config("attention_bwd_delta")
        rows, seqs = (p.T, 1) if varlen else (p.Lq, p.B)
        m_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
        if m_blocks:
            _attention_bwd_delta_kernel[(m_blocks * p.H * seqs,)](
                out, grad_out, delta, rows, p.H, m_blocks, p.Dv,
                *_layout(out, varlen), *_layout(grad_out, varlen),
                BLOCK_M=cfg["BLOCK_M"], BLOCK_DV=cfg["BLOCK_DV"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
        common = (p.Dqk, p.Dv, p.scale, p.qk_scale, p.inv_keep, p.threshold, p.rows_b,
                  p.rows_h, *_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen),
                  *_layout(grad_out, varlen), *p.mask_strides)
        cfg = p.config("attention_bwd_dkdv")
        split = cfg.pop("SPLIT")
        n_blocks = triton.cdiv(p.Lk, cfg["BLOCK_N"])
        for want_dk, want_dv in ((False, True), (True, False)) if split else ((True, True),):
            _attention_bwd_dkdv_kernel[(n_blocks * p.Hk * p.B,)](
                q, k, v, grad_out, p.mask, p.cu_q, p.cu_k, p.seed, lse, delta, dk, dv,
                p.Lq, p.Lk, p.Hk, p.group, n_blocks, *common,
                *_layout(dk, varlen)[:3], *_layout(dv, varlen)[:3],
                WANT_DK=want_dk, WANT_DV=want_dv, **p.flags(cfg),
            )
        cfg = p.config("attention_bwd_dq")
        m_blocks = triton.cdiv(p.Lq, cfg["BLOCK_M"])
        _attention_bwd_dq_kernel[(m_blocks * p.H * p.B,)](
            q, k, v, grad_out, p.mask, p.cu_q, p.cu_k, p.seed, lse, delta, dq,
            p.Lq, p.Lk, p.H, p.group, m_blocks, *common, *_layout(dq, varlen)[:3],
            **p.flags(cfg),
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# gpu-report

_FEATURE_ARGS = ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "out_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
# Extra arguments per kernel beyond their pointers (Triton types for the compile specs).
_POINTERS = {"mask_ptr": "*u8", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "seed_ptr": "*i64",
             "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
_FLOATS = ("qk_scale", "scale", "inv_keep")
# Products (each 2·Lq·Lk·D FLOPs at Dqk = Dv = D) per kernel launch: the forward's S and P·V;
# dK/dV's Sᵀ, dPᵀ, dV, dK (a SPLIT config: Sᵀ, dV in one launch and Sᵀ, dPᵀ, dK in the other);
# dQ's S, dP (both recomputed, the price of no atomics) and dQ.
_PRODUCTS = {"attention_fwd": 2, "attention_bwd_dkdv": 4, "attention_bwd_dkdv.dv": 2,
             "attention_bwd_dkdv.dk": 3, "attention_bwd_dq": 3}
KERNELS = {"attention_fwd": _attention_fwd_kernel,
           "attention_bwd_delta": _attention_bwd_delta_kernel,
           "attention_bwd_dkdv": _attention_bwd_dkdv_kernel,
           "attention_bwd_dq": _attention_bwd_dq_kernel}


def _flops(kernel: str, launch: str, fam: str, width: int):
    """flops(B, D) of one launch of ``kernel`` for one head with Lq = Lk = B and Dqk = Dv = D
    (padding included), when the host launches this head-dim bucket at D, else None."""
    def flops(b, d):
        if d > WIDTHS[-1] or _bucket(d, d) != width:
            return None
        cfg = gpu_config(kernel, fam, d, d)
        if kernel == "attention_bwd_delta":
            return 2 * b * d  # rowsum(dO∘O): no tile product
        return _PRODUCTS[launch] * _triton.tile_flops(b, b, d, cfg["BLOCK_M"], cfg["BLOCK_N"],
                                                      cfg["BLOCK_DQK"])
    return flops


def compile_specs():
    """Every shipped config (kernel × family × head-dim bucket; both launches of a SPLIT
    dK/dV config), compiled at the bucket's width with the costliest flags on (key padding
    mask, causal, dropout)."""
    specs = []
    for kernel, fn in KERNELS.items():
        signature = _triton.kernel_signature(fn, _FEATURE_ARGS, _POINTERS, _FLOATS,
                                              unit_strides=True)
        # What the JIT marks 16-divisible at run time for the tuned layout (head dims of 64,
        # 128, 256; tensors from PyTorch's allocator): every pointer but the bool mask's, the
        # head dims and the tensor strides; not the mask's strides (multiples of 1 and Lk).
        aligned = [name for name, ty in signature.items()
                   if (ty.startswith("*") and name != "mask_ptr") or name in ("Dqk", "Dv")
                   or (ty == "i32" and name.startswith("stride_")
                       and name not in ("stride_mb", "stride_mn"))]
        for fam in _triton.SPEC_DTYPES:
            for width in WIDTHS:
                cfg = gpu_config(kernel, fam, width, width)
                flags = {name: 1 for name, ty in signature.items() if ty == "constexpr"}
                launches = {kernel: {}}
                if kernel == "attention_bwd_delta":
                    cfg = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_DV", "num_warps",
                                                     "num_stages")}
                else:
                    flags.update(IS_VARLEN=False, HAS_MASK=True, CAUSAL=True, HAS_DROPOUT=True,
                                 CHUNKED=cfg["CHUNKED"])
                if kernel == "attention_bwd_dkdv":
                    launches = ({f"{kernel}.dv": dict(WANT_DK=False, WANT_DV=True),
                                 f"{kernel}.dk": dict(WANT_DK=True, WANT_DV=False)}
                                if cfg["SPLIT"] else {kernel: dict(WANT_DK=True, WANT_DV=True)})
                for launch, wants in launches.items():
                    spec = _triton.compile_spec(
                        f"{launch}.d{width}", fn, signature, cfg, fam, aligned, op="attention",
                        path="forward" if kernel == "attention_fwd" else "deterministic",
                        flops=_flops(kernel, launch, fam, width), **flags, **wants)
                    if kernel == "attention_bwd_delta":
                        # No products: compile_spec's INPUT_PRECISION is not a parameter.
                        del spec["signature"]["INPUT_PRECISION"]
                        del spec["constexprs"]["INPUT_PRECISION"]
                    specs.append(spec)
    return specs


_triton.register_specs(compile_specs)
