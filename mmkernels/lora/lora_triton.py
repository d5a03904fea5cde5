"""Triton kernels of the fused LoRA linear layer, one adapter or many per batch.

``forward`` / ``backward`` implement the backend contract of ``mmkernels.lora.reference``
(called by ``mmkernels.lora.lora_linear`` with validated, normalised arguments):

    y = x·Wᵀ + b + s[id]·u·B[id]ᵀ,   u = dropout(x)·A[id]ᵀ       (row t of x uses adapter id[t])
    du = s·dY·B,  dB = s·dYᵀ·u,  dA = duᵀ·(x∘D),  dx = dY·W + (du·A)∘D

Segments (punica's SGMV): rows are sorted by adapter id on the device (a stable sort; rows of
id −1, the base layer only, last) and ``torch.searchsorted`` gives each adapter's segment of the
sorted order, N + 2 offsets, with no host sync. Every kernel walks a list of work items — row
tiles, or chunks of several row tiles — that never straddle two segments, so each product is a
plain GEMM against one adapter's A or B. How many items a segment has depends on its length,
which the host does not know without a sync, so each grid is launched at the upper bound
(Σₙ ⌈len_n / rows⌉ ≤ ⌊T / rows⌋ + number of segments) and a program finds its item in the
per-segment item counts (``_locate``: a cumulative sum over the segment offsets, in
BLOCK_S-wide vector steps); the spare programs at the end return at once. Rows keep their
original index for every global access (x, y, u, dY, dx and the dropout hash): the sort is a
permutation of indices, nothing is gathered or copied. One adapter without ids is the same
code with one segment and no permutation.

Kernels and their fusions:

* ``lora_shrink`` (forward): per row tile of a segment, u = (x∘keep)·Aᵀ · 1/(1−p): dropout is
  applied in the prologue of each x tile (the hash regenerated from the seed, the 0/1 keep
  factor multiplied in x's dtype, exact; 1/(1−p) applied once on the fp32 accumulator), so
  dropout(x) never exists in memory. Writes u (T, r) fp32, zero rows for id −1.
* ``lora_fwd``: y tile = s·u·Bᵀ + x·Wᵀ + b in one accumulator: the expand is extra reduction
  steps of the base GEMM's tile (the concatenated-K GEMM [s·u, x]·[B, W]ᵀ), so y is written
  once. Tiles in grouped (GROUP_M) order for L2 reuse of W.
* ``lora_bwd_dudb``: per chunk of a segment's rows, sweeping the out dimension: each dY tile
  is loaded once and feeds both du += dY·B (BM × r) and the chunk's partial
  dB = s·dYᵀ·u (BN × r per out block), so dY is read once for both (once per 64 ranks: a
  larger r is split over neighbouring programs, whose dY tiles coincide in L2). One row tile
  per chunk (SINGLE) keeps du in registers; several (long batches, to bound the partial
  buffers) loop over their row tiles inside each out block and accumulate du in their own
  rows of the du buffer.
* ``lora_bwd_dx``: dx tile = (s·du·A)∘D + dY·W in one accumulator: the mask factor D
  (0 or 1/(1−p)) multiplies the adapter part, then the base GEMM accumulates onto it; dx is
  written once.
* ``lora_bwd_da``: per (chunk of a segment's rows, column block of in), the partial
  dAᵀ = (x∘keep)ᵀ·du · s/(1−p) with the keep mask regenerated from the seed.
* ``lora_reduce``: the partial dA / dB of each adapter's chunks summed in chunk order.

Determinism: no atomics. Each output element has one owner program; sums over rows (dA, dB)
go through per-chunk fp32 partial buffers reduced in a fixed order, so results are bitwise
repeatable. Chunks are sized (``_chunking``) so that there are about ``_triton.PROGRAMS``
of them, and so that the dB partials stay below ~``PARTIAL_RANKS``·out·4 bytes at large r.
Adapters with no rows have no chunks: their dA, dB are written as zeros. dW = dYᵀ·x and
db = Σ dY (the rare unfrozen base) are one torch matmul / sum.

Precision (the package rule, ``mmkernels._triton``): fp16/bf16 operands on tensor cores with
fp32 accumulation; u and du (fp32) are cast to the input dtype for their products, as an
eager computation in that dtype holds them. fp32 with ``tf32``: TF32 tensor cores on operands
rounded to nearest (``load_rows``/``cast_for_dot``); otherwise exact IEEE fp32 on FMA units.
NaN propagates as in the reference: a dropped element is multiplied by 0, never selected away.

Layout: x may have any row stride (unit column stride), everything else is contiguous.
Row offsets are int64 (T·in can exceed 2³¹ elements). r from 1 to 256 is padded to the power
of two BLOCK_R ≥ 16 with masked loads.
"""

import torch
import triton
import triton.language as tl

from .. import _triton
from .._triton import (cast_for_dot, dropout_column_hash, dropout_kept, load_rows, rows_of,
                       seed_halves)

# Launch configs per kernel and precision family; shrink and dA, whose register tiles have r
# columns, also per rank bucket (BLOCK_R ≤ 64, 128, 256). BLOCK_M: rows of x / dY, BLOCK_N:
# output columns (out for y, in for dx and dA, the out blocks du/dB sweep), BLOCK_K: the
# reduction step of the tile GEMMs, BLOCK_RK: their steps through r (the expand, the adapter
# part of dx), BLOCK_R of du/dB: the most rank columns one program takes (more are split).
#
# Chosen for A100 (sm_80) and H100 (sm_90) alike (one table: a call sums in the same order on
# every GPU) as tiles that compile for both without spills, within shared memory, with wgmma
# on sm_90 for the tensor-core families: python -m mmkernels gpu-report. The two tile GEMMs
# (forward, dx) carry the FLOPs (the base layer is ~97% of the work at r = 16) and use the
# usual 128 × 128 × 64 bf16 tile (TF32: the same output tile, BLOCK_K 16-32); the
# skinny products (r columns) use BLOCK_M ≤ 64 so that a 4096-token batch still has 64+
# programs. Register pressure comes from the dropout hash of whole tiles (dx: ~60 registers
# over the same kernel without dropout) and, at large r, the r-wide tiles. Not timed on
# hardware.
CONFIGS = {
    "lora_fwd": {
        "16bit": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_RK=16, GROUP_M=8,
                      num_warps=8, num_stages=3),
        "tf32": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, BLOCK_RK=16, GROUP_M=8,
                     num_warps=8, num_stages=3),
        "ieee": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=8, BLOCK_RK=8, GROUP_M=8, num_warps=4,
                     num_stages=2),
    },
    "lora_shrink": {
        "16bit": {64: dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
                  128: dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3),
                  256: dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3)},
        "tf32": {64: dict(BLOCK_M=128, BLOCK_K=32, num_warps=8, num_stages=3),
                 128: dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
                 256: dict(BLOCK_M=64, BLOCK_K=16, num_warps=8, num_stages=3)},
        "ieee": {64: dict(BLOCK_M=32, BLOCK_K=8, num_warps=4, num_stages=2),
                 128: dict(BLOCK_M=32, BLOCK_K=8, num_warps=4, num_stages=2),
                 256: dict(BLOCK_M=32, BLOCK_K=8, num_warps=8, num_stages=2)},
    },
    "lora_bwd_dudb": {
        "16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=64, num_warps=4, num_stages=3),
        "tf32": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_R=64, num_warps=8, num_stages=3),
        "ieee": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=64, num_warps=4, num_stages=2),
    },
    "lora_bwd_dx": {
        "16bit": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_RK=16, GROUP_M=8,
                      num_warps=8, num_stages=3),
        "tf32": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, BLOCK_RK=16, GROUP_M=8,
                     num_warps=8, num_stages=2),
        "ieee": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=8, BLOCK_RK=8, GROUP_M=8, num_warps=4,
                     num_stages=2),
    },
    "lora_bwd_da": {
        "16bit": {64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
                  128: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
                  256: dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)},
        "tf32": {64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3),
                 128: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
                 256: dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3)},
        "ieee": {64: dict(BLOCK_M=8, BLOCK_N=64, num_warps=4, num_stages=2),
                 128: dict(BLOCK_M=8, BLOCK_N=32, num_warps=4, num_stages=2),
                 256: dict(BLOCK_M=8, BLOCK_N=32, num_warps=8, num_stages=2)},
    },
    "lora_reduce": {fam: dict(BLOCK_E=1024, num_warps=4, num_stages=1)
                    for fam in ("16bit", "tf32", "ieee")},
}
# Kernels whose configs depend on the rank bucket.
RANKED = ("lora_shrink", "lora_bwd_da")
RANKS = (64, 128, 256)

# Interpreter configs (one per kernel and family): blocks small enough that the tests' shapes
# (T up to 257, in/out 33 and 100, r up to 64) cross several row, column, reduction and rank
# blocks, large enough to keep the interpreter's per-program cost affordable.
_SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
INTERPRET_CONFIGS = {
    kernel: {fam: cfg for fam in ("16bit", "tf32", "ieee")}
    for kernel, cfg in {
        "lora_fwd": dict(_SMALL, BLOCK_M=32, BLOCK_N=32, BLOCK_RK=16, GROUP_M=2),
        "lora_shrink": _SMALL,
        "lora_bwd_dudb": dict(_SMALL, BLOCK_N=32, BLOCK_R=32),
        "lora_bwd_dx": dict(_SMALL, BLOCK_M=32, BLOCK_N=32, BLOCK_RK=16, GROUP_M=2),
        "lora_bwd_da": _SMALL,
        "lora_reduce": dict(BLOCK_E=256, num_warps=1, num_stages=1),
    }.items()
}

# Row chunks of the row-reducing kernels (du/dB, dA): about this many chunks in all, so the
# partial-sum buffers stay small while the GPU has enough programs.
CHUNKS = _triton.PROGRAMS
# ...and at most PARTIAL_RANKS / r chunks (r padded to a power of two ≥ 16) for du/dB, whose
# partials are (out × r) each: CHUNKS of them up to r = 64, 64 at r = 256 (256 MiB at
# out = 4096, an eighth of dY's size at T = 65,536 in bf16).
PARTIAL_RANKS = 16384


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _locate(seg_ptr, item, NSEG, rows, BLOCK_S: tl.constexpr):
    """(segment, items before it) of work item ``item``, where segment n (rows
    [seg[n], seg[n+1]) of the sorted order, n < NSEG) is cut into ⌈len_n / rows⌉ items, in
    segment order. segment == NSEG for a spare program past the last item."""
    seg = 0
    before = 0
    total = 0
    offs = tl.arange(0, BLOCK_S)
    for s0 in range(0, NSEG, BLOCK_S):
        idx = s0 + offs
        valid = idx < NSEG
        lo = tl.load(seg_ptr + idx, mask=valid, other=0)
        hi = tl.load(seg_ptr + idx + 1, mask=valid, other=0)
        items = (hi - lo + rows - 1) // rows
        passed = ((total + tl.cumsum(items, 0)) <= item) & valid
        seg += tl.sum(passed.to(tl.int32), 0)
        before += tl.sum(tl.where(passed, items, 0), 0)
        total += tl.sum(items, 0)
    return seg, before


@triton.jit
def _segment_items(seg_ptr, n, rows, BLOCK_S: tl.constexpr):
    """(first item, item count) of segment n cut into ``rows``-row items (see ``_locate``)."""
    first = 0
    offs = tl.arange(0, BLOCK_S)
    for s0 in range(0, n, BLOCK_S):
        idx = s0 + offs
        valid = idx < n
        lo = tl.load(seg_ptr + idx, mask=valid, other=0)
        hi = tl.load(seg_ptr + idx + 1, mask=valid, other=0)
        first += tl.sum((hi - lo + rows - 1) // rows, 0)
    count = (tl.load(seg_ptr + n + 1) - tl.load(seg_ptr + n) + rows - 1) // rows
    return first, count


@triton.jit
def _item_rows(seg_ptr, seg, item, before, rows):
    """[start, end) in the sorted order of the segment's item ``item`` (``before`` items of
    earlier segments)."""
    start = tl.load(seg_ptr + seg) + (item - before) * rows
    end = tl.minimum(tl.load(seg_ptr + seg + 1), start + rows)
    return start, end


@triton.jit
def _original(perm_ptr, offs, mask, HAS_PERM: tl.constexpr):
    """Original row indices (of x, y, u, dY, dx and the dropout hash) of sorted positions."""
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs, mask=mask, other=0)
    else:
        rows = offs
    return rows


@triton.jit
def _grouped_tile(pid, n_tiles, n_cols, GROUP_M: tl.constexpr):
    """(row tile, column block) of program ``pid``: GROUP_M row tiles sweep the column blocks
    together, so the weight blocks they read are reused from L2."""
    group = GROUP_M * n_cols
    first = (pid // group) * GROUP_M
    size = tl.minimum(n_tiles - first, GROUP_M)
    tile = first + (pid % group) % size
    col = (pid % group) // size
    return tile, col


@triton.jit
def _keep_factor(rows, col_hash, seed_lo, threshold, dtype):
    """The 0/1 keep factors of (rows × columns) elements in ``dtype`` (exact), for a
    multiplication: a dropped NaN stays NaN, as in the reference."""
    return dropout_kept(col_hash[None, :], rows.to(tl.uint32)[:, None], seed_lo,
                        threshold).to(dtype)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, perm_ptr, seg_ptr, seed_ptr, u_ptr,
    IN, r, N, stride_x, inv_keep, threshold,
    HAS_PERM: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """u[rows] = (x∘keep)[rows]·A[n]ᵀ / (1 − p) for one row tile of segment n (0 for the
    id −1 segment n = N)."""
    tile = tl.program_id(0)
    seg, before = _locate(seg_ptr, tile, N + 1, BLOCK_M, BLOCK_S)
    if seg > N:
        return
    start, end = _item_rows(seg_ptr, seg, tile, before, BLOCK_M)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = _original(perm_ptr, offs_m, mask_m, HAS_PERM)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if seg < N:
        seed_lo, seed_hi = seed_halves(seed_ptr, HAS_DROPOUT)
        x_rows = rows_of(x_ptr, rows, stride_x)
        a_rows = rows_of(a_ptr + seg.to(tl.int64) * r * IN, offs_r, IN)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, IN, BLOCK_K):
            cols = k0 + offs_k
            mask_k = cols < IN
            x = load_rows(x_rows, cols, mask_m, mask_k, INPUT_PRECISION)
            if HAS_DROPOUT:
                x = x * _keep_factor(rows, dropout_column_hash(cols, seed_hi), seed_lo,
                                     threshold, x.dtype)
            a = load_rows(a_rows, cols, mask_r, mask_k, INPUT_PRECISION)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            acc = acc * inv_keep
    u_rows = rows_of(u_ptr, rows, r)
    tl.store(u_rows[:, None] + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, b_ptr, u_ptr, perm_ptr, seg_ptr, scale_ptr, y_ptr,
    IN, OUT, r, N, n_tiles, n_cols, stride_x,
    HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RK: tl.constexpr,
    BLOCK_S: tl.constexpr, GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """y tile = s·u·B[n]ᵀ + x·Wᵀ + b: the expand first (r/BLOCK_RK reduction steps), then the
    base GEMM's steps onto the same accumulator, one write of y."""
    tile, col = _grouped_tile(tl.program_id(0), n_tiles, n_cols, GROUP_M)
    seg, before = _locate(seg_ptr, tile, N + 1, BLOCK_M, BLOCK_S)
    if seg > N:
        return
    start, end = _item_rows(seg_ptr, seg, tile, before, BLOCK_M)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = _original(perm_ptr, offs_m, mask_m, HAS_PERM)
    offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if seg < N:
        s = tl.load(scale_ptr + seg).to(tl.float32)
        u_rows = rows_of(u_ptr, rows, r)
        b_rows = rows_of(b_ptr + seg.to(tl.int64) * OUT * r, offs_n, r)
        offs_rk = tl.arange(0, BLOCK_RK)
        for r0 in range(0, r, BLOCK_RK):
            cols = r0 + offs_rk
            mask_k = cols < r
            u = tl.load(u_rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            u = cast_for_dot(u * s, b_ptr.dtype.element_ty, INPUT_PRECISION)
            b = load_rows(b_rows, cols, mask_n, mask_k, INPUT_PRECISION)
            acc = tl.dot(u, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    x_rows = rows_of(x_ptr, rows, stride_x)
    w_rows = rows_of(w_ptr, offs_n, IN)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, IN, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < IN
        x = load_rows(x_rows, cols, mask_m, mask_k, INPUT_PRECISION)
        w = load_rows(w_rows, cols, mask_n, mask_k, INPUT_PRECISION)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_rows = rows_of(y_ptr, rows, OUT)
    tl.store(y_rows[:, None] + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_bwd_dudb_kernel(
    dy_ptr, u_ptr, b_ptr, perm_ptr, seg_ptr, scale_ptr, du_ptr, dbp_ptr,
    OUT, r, N, chunk_rows, r_blocks,
    HAS_PERM: tl.constexpr, WANT_DU: tl.constexpr, WANT_DB: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """For one chunk of segment n's rows and BLOCK_R of the r columns: du = dY·B[n] (unscaled,
    into the chunk's rows of the sorted-order du buffer) and the chunk's partial
    dB = s·dYᵀ·u (out × r, fp32), from each dY tile loaded once. SINGLE (chunk_rows ==
    BLOCK_M): du stays in registers across the out sweep; otherwise it accumulates in the du
    buffer, which only this program touches. Ranks above BLOCK_R (64) are split over
    neighbouring programs, which read the same dY tiles at about the same time (L2)."""
    pid = tl.program_id(0)
    chunk = pid // r_blocks
    seg, before = _locate(seg_ptr, chunk, N, chunk_rows, BLOCK_S)
    if seg >= N:
        return
    start, end = _item_rows(seg_ptr, seg, chunk, before, chunk_rows)
    s = tl.load(scale_ptr + seg).to(tl.float32)
    offs_r = (pid % r_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    b_base = b_ptr + seg.to(tl.int64) * OUT * r
    dbp_base = dbp_ptr + chunk.to(tl.int64) * OUT * r
    dtype = dy_ptr.dtype.element_ty
    if SINGLE:
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = _original(perm_ptr, offs_m, mask_m, HAS_PERM)
        dy_rows = rows_of(dy_ptr, rows, OUT)
        u = 0.0
        if WANT_DB:
            u = tl.load(rows_of(u_ptr, rows, r)[:, None] + offs_r[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            u = cast_for_dot(u, dtype, INPUT_PRECISION)
        du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for o0 in range(0, OUT, BLOCK_N):
            offs_o = o0 + tl.arange(0, BLOCK_N)
            mask_o = offs_o < OUT
            dy = load_rows(dy_rows, offs_o, mask_m, mask_o, INPUT_PRECISION)
            if WANT_DU:
                b = load_rows(rows_of(b_base, offs_o, r), offs_r, mask_o, mask_r,
                              INPUT_PRECISION)
                du = tl.dot(dy, b, du, input_precision=INPUT_PRECISION)
            if WANT_DB:
                db = tl.dot(tl.trans(dy), u, input_precision=INPUT_PRECISION)
                tl.store(rows_of(dbp_base, offs_o, r)[:, None] + offs_r[None, :], db * s,
                         mask=mask_o[:, None] & mask_r[None, :])
        if WANT_DU:
            tl.store(rows_of(du_ptr, offs_m, r)[:, None] + offs_r[None, :], du,
                     mask=mask_m[:, None] & mask_r[None, :])
    else:
        for o0 in range(0, OUT, BLOCK_N):
            offs_o = o0 + tl.arange(0, BLOCK_N)
            mask_o = offs_o < OUT
            b = 0.0
            if WANT_DU:
                b = load_rows(rows_of(b_base, offs_o, r), offs_r, mask_o, mask_r,
                              INPUT_PRECISION)
            db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            for m0 in range(start, end, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_m < end
                rows = _original(perm_ptr, offs_m, mask_m, HAS_PERM)
                dy = load_rows(rows_of(dy_ptr, rows, OUT), offs_o, mask_m, mask_o,
                               INPUT_PRECISION)
                mask_mr = mask_m[:, None] & mask_r[None, :]
                if WANT_DB:
                    u = tl.load(rows_of(u_ptr, rows, r)[:, None] + offs_r[None, :],
                                mask=mask_mr, other=0.0)
                    db = tl.dot(tl.trans(dy), cast_for_dot(u, dtype, INPUT_PRECISION), db,
                                input_precision=INPUT_PRECISION)
                if WANT_DU:
                    # Read-modify-write of this program's own rows; the first out block
                    # finds the buffer uninitialised. (A vector & scalar mask goes through
                    # tl.where: the interpreter rejects integer masks.)
                    ptrs = rows_of(du_ptr, offs_m, r)[:, None] + offs_r[None, :]
                    du = tl.load(ptrs, mask=tl.where(o0 > 0, mask_mr, False), other=0.0)
                    du = tl.dot(dy, b, du, input_precision=INPUT_PRECISION)
                    tl.store(ptrs, du, mask=mask_mr)
            if WANT_DB:
                tl.store(rows_of(dbp_base, offs_o, r)[:, None] + offs_r[None, :], db * s,
                         mask=mask_o[:, None] & mask_r[None, :])
            # The next out block's loads of du rows may come from other threads than this
            # block's stores.
            tl.debug_barrier()


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, a_ptr, du_ptr, perm_ptr, seg_ptr, scale_ptr, seed_ptr, dx_ptr,
    IN, OUT, r, N, n_tiles, n_cols, inv_keep, threshold,
    HAS_PERM: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RK: tl.constexpr,
    BLOCK_S: tl.constexpr, GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx tile = (s·du·A[n])∘D + dY·W: the adapter part first, multiplied by the mask factors
    (0 or 1/(1 − p)), then the base GEMM's steps onto the same accumulator; one write of dx."""
    tile, col = _grouped_tile(tl.program_id(0), n_tiles, n_cols, GROUP_M)
    seg, before = _locate(seg_ptr, tile, N + 1, BLOCK_M, BLOCK_S)
    if seg > N:
        return
    start, end = _item_rows(seg_ptr, seg, tile, before, BLOCK_M)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = _original(perm_ptr, offs_m, mask_m, HAS_PERM)
    offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if seg < N:
        du_rows = rows_of(du_ptr, offs_m, r)
        a_base = a_ptr + seg.to(tl.int64) * r * IN
        offs_rk = tl.arange(0, BLOCK_RK)
        for r0 in range(0, r, BLOCK_RK):
            ks = r0 + offs_rk
            mask_k = ks < r
            du = tl.load(du_rows[:, None] + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)
            du = cast_for_dot(du, a_ptr.dtype.element_ty, INPUT_PRECISION)
            a = load_rows(rows_of(a_base, ks, IN), offs_n, mask_k, mask_n, INPUT_PRECISION)
            acc = tl.dot(du, a, acc, input_precision=INPUT_PRECISION)
        s = tl.load(scale_ptr + seg).to(tl.float32)
        if HAS_DROPOUT:
            seed_lo, seed_hi = seed_halves(seed_ptr, HAS_DROPOUT)
            keep = _keep_factor(rows, dropout_column_hash(offs_n, seed_hi), seed_lo, threshold,
                                tl.float32)
            acc = acc * (keep * (s * inv_keep))
        else:
            acc = acc * s
    dy_rows = rows_of(dy_ptr, rows, OUT)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, OUT, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < OUT
        dy = load_rows(dy_rows, ks, mask_m, mask_k, INPUT_PRECISION)
        w = load_rows(rows_of(w_ptr, ks, IN), offs_n, mask_k, mask_n, INPUT_PRECISION)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    dx_rows = rows_of(dx_ptr, rows, IN)
    tl.store(dx_rows[:, None] + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_bwd_da_kernel(
    x_ptr, du_ptr, perm_ptr, seg_ptr, scale_ptr, seed_ptr, dap_ptr,
    IN, r, N, chunk_rows, n_cols, stride_x, inv_keep, threshold,
    HAS_PERM: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The partial dA[n][:, cols] = s/(1 − p)·duᵀ·(x∘keep) of one chunk of segment n's rows,
    formed transposed, (x∘keep)ᵀ·du (BLOCK_N × r: the long side is the tile's M), with the
    keep mask regenerated from the seed."""
    pid = tl.program_id(0)
    chunk = pid // n_cols
    col = pid % n_cols
    seg, before = _locate(seg_ptr, chunk, N, chunk_rows, BLOCK_S)
    if seg >= N:
        return
    start, end = _item_rows(seg_ptr, seg, chunk, before, chunk_rows)
    offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < IN
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    seed_lo, seed_hi = seed_halves(seed_ptr, HAS_DROPOUT)
    col_hash = 0
    if HAS_DROPOUT:
        col_hash = dropout_column_hash(offs_n, seed_hi)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = _original(perm_ptr, offs_m, mask_m, HAS_PERM)
        x = load_rows(rows_of(x_ptr, rows, stride_x), offs_n, mask_m, mask_n, INPUT_PRECISION)
        if HAS_DROPOUT:
            x = x * _keep_factor(rows, col_hash, seed_lo, threshold, x.dtype)
        du = tl.load(rows_of(du_ptr, offs_m, r)[:, None] + offs_r[None, :],
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        du = cast_for_dot(du, x_ptr.dtype.element_ty, INPUT_PRECISION)
        acc = tl.dot(tl.trans(x), du, acc, input_precision=INPUT_PRECISION)
    acc = acc * (tl.load(scale_ptr + seg).to(tl.float32) * inv_keep)
    # Partial (chunk, r, IN), fp32.
    dap = dap_ptr + chunk.to(tl.int64) * r * IN
    tl.store(dap + offs_r[None, :].to(tl.int64) * IN + offs_n[:, None], acc,
             mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _lora_reduce_kernel(
    part_ptr, seg_ptr, out_ptr, N, numel, chunk_rows, n_blocks,
    BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[n] = Σ of adapter n's chunk partials (``numel`` fp32 each), in chunk order; zeros
    for an adapter without rows."""
    pid = tl.program_id(0)
    n = pid // n_blocks
    offs = (pid % n_blocks).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = offs < numel
    first, count = _segment_items(seg_ptr, n, chunk_rows, BLOCK_S)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for c in range(first, first + count):
        acc += tl.load(part_ptr + tl.cast(c, tl.int64) * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + n.to(tl.int64) * numel + offs, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side


def _width(r: int) -> int:
    """r padded to the power of two (≥ 16, the smallest tl.dot) its tiles use."""
    return max(16, triton.next_power_of_2(r))


def _bucket(r: int) -> int:
    return next(w for w in RANKS if _width(r) <= w)


def gpu_config(kernel: str, fam: str, r: int, nseg: int = 2) -> dict:
    """The GPU launch config of ``kernel`` for family ``fam`` at rank r with ``nseg`` segment
    offsets' worth of adapters (N + 1)."""
    cfg = CONFIGS[kernel][fam]
    if kernel in RANKED:
        cfg = cfg[_bucket(r)]
    return _finish(kernel, cfg, fam, r, nseg)


def _config(kernel: str, fam: str, r: int, nseg: int) -> dict:
    if _triton.INTERPRET:
        return _finish(kernel, _interpret_config(kernel, fam), fam, r, nseg)
    return gpu_config(kernel, fam, r, nseg)


def _interpret_config(kernel: str, fam: str) -> dict:
    """The interpreter config restricted to the block names the kernel takes."""
    shipped = CONFIGS[kernel][fam]
    if kernel in RANKED:
        shipped = shipped[RANKS[0]]
    return {key: value for key, value in INTERPRET_CONFIGS[kernel][fam].items()
            if key in shipped}


def _finish(kernel: str, cfg: dict, fam: str, r: int, nseg: int) -> dict:
    cfg = dict(cfg)
    if kernel != "lora_reduce":
        cfg["INPUT_PRECISION"] = _triton.input_precision(fam)
        if kernel in RANKED:
            cfg["BLOCK_R"] = _width(r)
        elif "BLOCK_R" in cfg:  # du/dB: at most BLOCK_R rank columns per program
            cfg["BLOCK_R"] = min(_width(r), cfg["BLOCK_R"])
        else:
            cfg["BLOCK_RK"] = min(_width(r), cfg["BLOCK_RK"])
    # Segment offsets are scanned BLOCK_S at a time: one step for up to 15 adapters (the
    # interpreter always takes 16-wide steps, so that tests with more adapters cross steps).
    cfg["BLOCK_S"] = 16 if nseg <= 16 or _triton.INTERPRET else 128
    return cfg


def _chunking(T: int, block_m: int, parallel: int, cap: int | None = None) -> tuple[int, int]:
    """(chunks, rows per chunk) of a T-row segment for a row-reducing kernel: whole row tiles
    per chunk, about CHUNKS / ``parallel`` chunks (``parallel`` programs per chunk), at most
    ``cap``. Shapes alone decide it, so a call sums in the same order on every GPU."""
    tiles = triton.cdiv(T, block_m)
    chunks = max(1, CHUNKS // parallel)
    if cap is not None:
        chunks = min(chunks, max(1, cap))
    per_chunk = triton.cdiv(tiles, chunks)
    return triton.cdiv(tiles, per_chunk), per_chunk * block_m


class _Problem:
    """Sizes, segments and launch arguments shared by the forward and backward kernels."""

    def __init__(self, x, weight, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, tf32):
        dtypes = {t.dtype for t in (x, weight, lora_A, lora_B)}
        if x.dtype not in _triton.DOT_DTYPES or len(dtypes) != 1:
            raise TypeError("Triton LoRA takes x, weight, lora_A, lora_B of one dtype among "
                            f"float32, float16, bfloat16; got {sorted(map(str, dtypes))}")
        self.T, self.IN = x.shape
        self.OUT = weight.shape[0]
        self.N, self.r = lora_A.shape[0], lora_A.shape[1]
        self.fam = _triton.family(x.dtype, tf32)
        self.device = x.device
        self.scaling = scaling
        if adapter_ids is None:
            # One segment of every row, an empty id −1 segment; no permutation.
            self.seg = torch.full((3,), self.T, dtype=torch.int32, device=self.device)
            self.seg[0] = 0
            self.perm, self.has_perm = self.seg, False
        else:
            # Stable sort by id with −1 last; segment n = [seg[n], seg[n+1]), all on device.
            key = torch.where(adapter_ids < 0, self.N, adapter_ids)
            sorted_key, perm = torch.sort(key, stable=True)
            bounds = torch.arange(self.N + 2, dtype=key.dtype, device=self.device)
            self.seg = torch.searchsorted(sorted_key, bounds, out_int32=True)
            self.perm, self.has_perm = perm.to(torch.int32), True
        self.dropout_p = float(dropout_p)
        self.has_dropout = self.dropout_p > 0.0
        self.inv_keep = 1.0 / (1.0 - self.dropout_p)
        self.threshold = _triton.dropout_threshold(self.dropout_p)
        self.seed = seed if self.has_dropout else self.seg

    def config(self, kernel: str) -> dict:
        return _config(kernel, self.fam, self.r, self.N + 1)

    def row_tiles(self, block_m: int) -> int:
        """Upper bound of the row tiles of all N + 1 segments."""
        return self.T // block_m + self.N + 1


def _split(cfg: dict) -> tuple[dict, dict]:
    """(constexpr block arguments, launch options) of a config."""
    opts = {key: cfg[key] for key in ("num_warps", "num_stages")}
    return {key: value for key, value in cfg.items() if key not in opts}, opts


def forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, tf32):
    """(y, u): y (T, out) in x's dtype, u = dropout(x)·A[id]ᵀ (T, r) fp32, zero rows for
    id −1."""
    p = _Problem(x, weight, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, tf32)
    y = torch.empty(p.T, p.OUT, dtype=x.dtype, device=p.device)
    u = torch.empty(p.T, p.r, dtype=torch.float32, device=p.device)
    with _triton.launch_device(p.device):
        blocks, opts = _split(p.config("lora_shrink"))
        _lora_shrink_kernel[(p.row_tiles(blocks["BLOCK_M"]),)](
            x, lora_A, p.perm, p.seg, p.seed, u,
            p.IN, p.r, p.N, x.stride(0), p.inv_keep, p.threshold,
            HAS_PERM=p.has_perm, HAS_DROPOUT=p.has_dropout, **blocks, **opts,
        )
        blocks, opts = _split(p.config("lora_fwd"))
        n_tiles, n_cols = p.row_tiles(blocks["BLOCK_M"]), triton.cdiv(p.OUT, blocks["BLOCK_N"])
        _lora_fwd_kernel[(n_tiles * n_cols,)](
            x, weight, x if bias is None else bias, lora_B, u, p.perm, p.seg, scaling, y,
            p.IN, p.OUT, p.r, p.N, n_tiles, n_cols, x.stride(0),
            HAS_BIAS=bias is not None, HAS_PERM=p.has_perm, **blocks, **opts,
        )
    return y, u


def _reduce(p: _Problem, partials: torch.Tensor, chunk_rows: int, out: torch.Tensor) -> None:
    """out[n] = Σ over adapter n's chunks of ``partials`` (chunks, ...) in chunk order."""
    blocks, opts = _split(p.config("lora_reduce"))
    numel = out[0].numel()
    n_blocks = triton.cdiv(numel, blocks["BLOCK_E"])
    _lora_reduce_kernel[(p.N * n_blocks,)](
        partials, p.seg, out, p.N, numel, chunk_rows, n_blocks, **blocks, **opts,
    )


def backward(grad_y, x, weight, lora_A, lora_B, scaling, adapter_ids, u, dropout_p, seed,
             need_dx, need_dW, need_db, need_dA, need_dB, tf32):
    """(dx, dW, db, dA, dB); a gradient not asked for is an empty tensor and costs nothing.
    Deterministic (no atomics)."""
    p = _Problem(x, weight, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, tf32)
    grad_y = grad_y.to(x.dtype)
    # One fresh empty tensor per gradient not asked for: a custom op's outputs may not alias.
    dx, dW, db = x.new_empty(0), weight.new_empty(0), x.new_empty(0)
    dA = lora_A.new_empty(0)
    dB = lora_B.new_empty(0)
    f32 = dict(dtype=torch.float32, device=p.device)
    want_du = need_dx or need_dA
    du = torch.empty(p.T, p.r, **f32) if want_du else u
    with _triton.launch_device(p.device):
        if want_du or need_dB:
            blocks, opts = _split(p.config("lora_bwd_dudb"))
            _, chunk_rows = _chunking(p.T, blocks["BLOCK_M"], 1, PARTIAL_RANKS // _width(p.r))
            n_chunks = p.T // chunk_rows + p.N
            dbp = torch.empty(n_chunks, p.OUT, p.r, **f32) if need_dB else u
            r_blocks = triton.cdiv(p.r, blocks["BLOCK_R"])
            _lora_bwd_dudb_kernel[(n_chunks * r_blocks,)](
                grad_y, u, lora_B, p.perm, p.seg, scaling, du, dbp,
                p.OUT, p.r, p.N, chunk_rows, r_blocks,
                HAS_PERM=p.has_perm, WANT_DU=want_du, WANT_DB=need_dB,
                SINGLE=chunk_rows == blocks["BLOCK_M"],
                **blocks, **opts,
            )
            if need_dB:
                dB = torch.empty_like(lora_B)
                _reduce(p, dbp, chunk_rows, dB)
        if need_dx:
            dx = torch.empty(p.T, p.IN, dtype=x.dtype, device=p.device)
            blocks, opts = _split(p.config("lora_bwd_dx"))
            n_tiles, n_cols = p.row_tiles(blocks["BLOCK_M"]), triton.cdiv(p.IN,
                                                                          blocks["BLOCK_N"])
            _lora_bwd_dx_kernel[(n_tiles * n_cols,)](
                grad_y, weight, lora_A, du, p.perm, p.seg, scaling, p.seed, dx,
                p.IN, p.OUT, p.r, p.N, n_tiles, n_cols, p.inv_keep, p.threshold,
                HAS_PERM=p.has_perm, HAS_DROPOUT=p.has_dropout, **blocks, **opts,
            )
        if need_dA:
            blocks, opts = _split(p.config("lora_bwd_da"))
            n_cols = triton.cdiv(p.IN, blocks["BLOCK_N"])
            _, chunk_rows = _chunking(p.T, blocks["BLOCK_M"], n_cols)
            n_chunks = p.T // chunk_rows + p.N
            dap = torch.empty(n_chunks, p.r, p.IN, **f32)
            _lora_bwd_da_kernel[(n_chunks * n_cols,)](
                x, du, p.perm, p.seg, scaling, p.seed, dap,
                p.IN, p.r, p.N, chunk_rows, n_cols, x.stride(0), p.inv_keep, p.threshold,
                HAS_PERM=p.has_perm, HAS_DROPOUT=p.has_dropout, **blocks, **opts,
            )
            dA = torch.empty_like(lora_A)
            _reduce(p, dap, chunk_rows, dA)
    if need_dW:
        # The rare unfrozen base: one GEMM (cuBLAS / the CPU BLAS), fp32 accumulation.
        dW = (grad_y.t() @ x).to(weight.dtype)
    if need_db:
        db = grad_y.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dW, db, dA, dB


# ----------------------------------------------------------------------------------------------
# gpu-report

KERNELS = {"lora_shrink": _lora_shrink_kernel, "lora_fwd": _lora_fwd_kernel,
           "lora_bwd_dudb": _lora_bwd_dudb_kernel, "lora_bwd_dx": _lora_bwd_dx_kernel,
           "lora_bwd_da": _lora_bwd_da_kernel, "lora_reduce": _lora_reduce_kernel}
_FEATURE_ARGS = ("x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr", "dy_ptr", "dx_ptr",
                 "out_ptr")
_POINTERS = {"u_ptr": "*fp32", "du_ptr": "*fp32", "dbp_ptr": "*fp32", "dap_ptr": "*fp32",
             "part_ptr": "*fp32", "scale_ptr": "*fp32", "perm_ptr": "*i32", "seg_ptr": "*i32",
             "seed_ptr": "*i64"}
# Arguments that are not 16-divisible in the tuned layout (r = 16, in/out multiples of 16,
# tensors from PyTorch's allocator): counts and indices.
_UNALIGNED = ("N", "n_tiles", "n_cols", "n_blocks", "r_blocks", "threshold", "chunk_rows")


def _work(kernel: str, fam: str, r: int, T: int, D: int) -> int:
    """FLOPs one launch of ``kernel`` executes (padding included) for T rows, in = out = D,
    rank r, one adapter without ids (lora_reduce: its additions, for dB and dA)."""
    cfg = gpu_config(kernel, fam, r)
    R = _width(r)
    if kernel in ("lora_fwd", "lora_bwd_dx"):
        # The base GEMM, then the expand / the adapter part of dx (r in BLOCK_RK steps).
        return (_triton.tile_flops(T, D, D, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
                + _triton.tile_flops(T, D, r, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_RK"]))
    if kernel == "lora_shrink":
        return _triton.tile_flops(T, R, D, cfg["BLOCK_M"], R, cfg["BLOCK_K"])
    if kernel == "lora_bwd_dudb":
        # du = dY·B and the dB partials dYᵀ·u: two products of T × r × out.
        return 2 * _triton.tile_flops(T, r, D, cfg["BLOCK_M"], cfg["BLOCK_R"], cfg["BLOCK_N"])
    if kernel == "lora_bwd_da":
        return _triton.tile_flops(D, R, T, cfg["BLOCK_N"], R, cfg["BLOCK_M"])
    dudb, da = gpu_config("lora_bwd_dudb", fam, r), gpu_config("lora_bwd_da", fam, r)
    dudb_chunks = _chunking(T, dudb["BLOCK_M"], 1, PARTIAL_RANKS // R)[0]
    da_chunks = _chunking(T, da["BLOCK_M"], triton.cdiv(D, da["BLOCK_N"]))[0]
    return (dudb_chunks + da_chunks) * D * r


def compile_specs():
    """Every shipped config (kernel × family, × rank bucket for the rank-sized tiles; both
    du/dB variants), compiled at the largest rank it serves (BLOCK_R, BLOCK_RK full) with every
    flag on (ids, dropout, bias, all gradients). FLOPs are those of gpu_report's LoRA problem
    (r = LORA_RANK) where the host launches that config for it."""
    from ..tools.gpu_report import LORA_RANK

    specs = []
    for kernel, fn in KERNELS.items():
        signature = _triton.kernel_signature(fn, _FEATURE_ARGS, _POINTERS, ("inv_keep",))
        aligned = [name for name, ty in signature.items()
                   if ty.startswith("*") or (ty == "i32" and name not in _UNALIGNED)]
        flags = {name: True for name in ("HAS_PERM", "HAS_DROPOUT", "HAS_BIAS", "WANT_DU",
                                          "WANT_DB") if name in fn.arg_names}
        for fam in _triton.SPEC_DTYPES:
            for rank in RANKS if kernel in RANKED else (RANKS[-1],):
                cfg = gpu_config(kernel, fam, rank)
                # GROUP_M (the tile GEMMs' raster) is a constexpr compile_spec does not take
                # from the config.
                extra = {key: cfg[key] for key in ("GROUP_M",) if key in cfg}
                variants = {"": extra}
                if kernel == "lora_bwd_dudb":
                    variants = {".single": dict(SINGLE=True), ".chunked": dict(SINGLE=False)}
                for suffix, extra in variants.items():
                    name = kernel + suffix + (f".r{rank}" if kernel in RANKED else "")

                    def flops(b, d, kernel=kernel, fam=fam, rank=rank, extra=extra):
                        if kernel in RANKED and _bucket(LORA_RANK) != rank:
                            return None
                        if "SINGLE" in extra:
                            block_m = gpu_config(kernel, fam, LORA_RANK)["BLOCK_M"]
                            rows = _chunking(b, block_m, 1,
                                             PARTIAL_RANKS // _width(LORA_RANK))[1]
                            if extra["SINGLE"] != (rows == block_m):
                                return None
                        return _work(kernel, fam, LORA_RANK, b, d)

                    spec = _triton.compile_spec(
                        name, fn, signature, cfg, fam, aligned, op="lora",
                        path="forward" if kernel in ("lora_shrink", "lora_fwd")
                        else "deterministic",
                        flops=flops, **flags, **extra)
                    if kernel == "lora_reduce":
                        # No products: compile_spec's INPUT_PRECISION is not a parameter.
                        del spec["signature"]["INPUT_PRECISION"]
                        del spec["constexprs"]["INPUT_PRECISION"]
                    specs.append(spec)
    return specs


_triton.register_specs(compile_specs)
