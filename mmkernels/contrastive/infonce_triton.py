"""Triton kernels for the symmetric InfoNCE (CLIP) loss without a B×B logits buffer.

Logits X_ij = scale·<I_i, T_j> + bias for I (M×D) and T (N×D); the positive of row i is column
i + offset (absent when out of range). Two kernels, the primitives of
``mmkernels.contrastive.primitives``:

* ``infonce_lse``: one pass over the tiles gives, for every row and every column, the
  log-sum-exp of the logits *without* the positive, and the positive's logit as the tile
  computed it (2·M·N·D FLOPs).
* ``infonce_grad``: A_I = P·T, A_T = Pᵀ·I and ΣP for P_ij = w_r_i·e^{X_ij − r_i} +
  w_c_j·e^{X_ij − c_j} off the positives (P = 0 there: the host adds the positives' terms).

Forward grid: (row super-block × column super-block) programs. A program walks its row blocks
(BLOCK_M rows each) and, for each, its column tiles (BLOCK_N), computing every logit tile once
(``_triton.logits_tile``, D in pipelined BLOCK_D chunks) and feeding it to both log-sum-exps:
the rows' running (max, sum) stay in registers across the column tiles; the columns' running
log-sum-exp over the program's rows lives in the program's own row of a partial buffer,
updated after each tile (read-modify-write, no other program touches it). Each row then has
one partial per column split and each column one per row split; the host combines them with
``torch.logsumexp`` over the split axis: a fixed order, no atomics, so the forward is
deterministic. Grid: at most ROW_SPLITS = 16 row splits, and column splits up to about
``_triton.PROGRAMS`` = 256 programs, so that a batch of a few row blocks fills the GPU too
(the old forward ran one program per 128 rows: under one wave of an H100 up to B = 16384).
Partial memory: 4·(M·G_c + N·G_r) bytes with G_r ≤ 16 and, once M has 16 row blocks, G_c ≤ 16:
at most 64 bytes per feature row (6% of a bf16 row at D = 512, 1.6% of an fp32 row at
D = 1024, 32 MiB at B = 262144), plus at most 1 MiB when M is smaller (G_c ≤ 256).

Backward: every program keeps a block of rows resident and streams the other side's tiles,
recomputing the logits with the forward's block shape (bit-identical tiles). Two paths:

* deterministic (``torch.use_deterministic_algorithms(True)``): one launch, two program
  roles. Row programs own BLOCK_M rows of I and sweep all of T: A_I += P·T, and ΣP. Column
  programs own BLOCK_N rows of T and sweep all of I: A_T += Pᵀ·I. Each output row has exactly
  one writer, so no atomics; the price is that each tile is computed twice (once per role):
  2·(2 + 2)·M·N·D = 8·M·N·D FLOPs, 10·B²·D for forward + backward, 1.25× the nominal 8·B²·D.
  Launching both roles together also doubles the programs of a small batch.
* atomic (otherwise, torch's default): (row block × column range) programs compute each tile
  once and use it for A_I (resident) and A_T (fp32 atomic adds of Pᵀ·I into the streamed
  rows): 6·M·N·D FLOPs, the nominal 8·B²·D with the forward. The column split (about
  ``_triton.PROGRAMS`` programs) fills the GPU at small B; A_I is then added atomically too.
  ΣP still goes through per-program partials (deterministic).

Why the recomputed logits must equal the forward's bit for bit: P_ij = w·exp(X_ij − lse_i)
compares a logit the backward computes with a log-sum-exp the forward reduced from its own
copy of that logit. When one entry dominates its row (large scales, confident models), the
forward's lse *is* that entry's logit, so P there is w·exp(0) = w exactly, whatever the rounding
of X; but a recomputed logit one ulp away (0.008 at |X| = 1e5) gives w·e^±0.008, 0.8% off on
the entry that carries the whole softmax, ~1000× the fp32 tolerance. No rounding argument
bounds that below "bitwise equal", so every recomputation (row and column programs, both
backward paths, SigLIP's two roles) goes through ``_triton.logits_tile`` with the forward's
operand order (I-block · T-blockᵀ, the column roles transpose P, never the product), tile shape
and tile origins (blocks start at multiples of BLOCK_M/BLOCK_N from 0 in every grid),
D-chunking (BLOCK_D, in the same order), operand rounding (``round_tf32``) and elementwise
formula (``s·scale + bias``, one expression in one helper: the compiler's FMA contraction, a
per-process setting, treats it alike in every kernel).
What it cannot fix: where two logits of a row or column nearly tie (within ~10), P depends on
their difference, and each fp32 logit of 1e5 carries a rounding of eps·|X| ≈ 0.004 whatever
the kernel: a ~0.4% error on the runner-up's P against a float64 oracle, the same for the C++
backend. That is fp32's conditioning, not a recomputation error (the parity tests' floors
scale with eps·|X| for it; tests/contrastive/test_triton_kernels.py's large-logit test draws
one-hot inputs to isolate the bitwise property, where a mismatch shows as errors ~2e-3).

Large D: no logit tile is recomputed per D-slice. The resident gradient block is held in
registers when D fits one BLOCK_DV slice (D ≤ 32); above that the program accumulates into its
output rows in global memory: per tile, P stays in registers and each BLOCK_DV slice of the
output rows is read, updated by P·T_slice and written back (``_triton.accumulate_slices``; a
BLOCK_M × D fp32 block per program, L2-resident: 128 KiB at D = 512). That costs
8·BLOCK_M·D bytes of L2 traffic per tile against its 4·BLOCK_M·BLOCK_N·D FLOPs, BLOCK_N/2 = 32
FLOPs per byte, where the old design recomputed the whole logit tile for every slice (3× the
logit GEMM at D = 768 in bf16, 6× in fp32). Registers hold only one slice of the product
(BLOCK_DV = 32, see CONFIGS), which is what keeps the kernels well under 255 registers.

Precision:

* Products and all softmax arithmetic accumulate in fp32; outputs are fp32.
* fp32 inputs: exact IEEE fp32, or TF32 tensor cores on operands rounded to nearest when the
  caller passes ``tf32=True`` (the package's rule, from torch's float32 matmul precision: see
  ``mmkernels._triton``).
* Log-sum-exps are kept in base e: exp(X − lse) is evaluated as exp2((X − lse)·log2 e), so
  X − lse is exact where X is the row's maximum and the lse is dominated by it (logits of 1e5:
  base-2 logits would round the max itself). The host's r_i then equals the tile's maximum
  bit for bit when one entry dominates, and P there is exactly w·1.
* fp16/bf16 inputs feed ``tl.dot`` directly with fp32 accumulation; P is cast to the input
  dtype for the second product, after scaling the weights by the power of two 2^(14 − e),
  max|w| = m·2^e (``_triton.weight_scale``): entries then stay ≤ 2^15 (fp16 max 65504) and out
  of fp16's subnormal range down to ~4e-9 of the largest weight. Exact, undone on the outputs.

NaN in any input gives NaN outputs: maxima use ``tl.PropagateNan.ALL`` (``tl.max`` drops NaN)
and padding is masked with ``tl.where``, which keeps NaN of valid entries.
"""

import torch
import triton
import triton.language as tl

from .. import _triton
from .._triton import (LN2, LOG2E, accumulate_slices, cast_for_dot, load_rows, load_scalar,
                       logits_tile, max_propagate_nan, rows_of, store_rows)

# One tile shape per precision family (see mmkernels._triton), shared by the forward and the
# backward so that the backward recomputes the forward's logits bit for bit:
#   "16bit": fp16/bf16 inputs (tensor cores; mma.sync on sm_80, wgmma on sm_90),
#   "tf32":  fp32 inputs on TF32 tensor cores (operands twice as wide: half BLOCK_D),
#   "ieee":  exact fp32; tl.dot becomes FMA loops whose operands (a BLOCK_D-long row and
#            column per output) live in registers, so tiles and D-chunks are small.
# BLOCK_D is the D-chunk of the logit products, BLOCK_DV the D-slice of the second product
# (and the largest D whose gradient block is held in registers); both shrink to next_pow2(D)
# for small D. Sized for A100 (163 KB shared memory per block) and H100 (227 KB) without
# register spills (python -m mmkernels gpu-report).
TILES = {
    "16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64),
    "tf32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32),
    "ieee": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=8),
}
# BLOCK_DV = 32: the second product's output slice (mma/wgmma results plus, on the atomic
# path, one fp32 atomic per element) is what sets the register count; 32 keeps every
# gradient kernel under ~210 registers (gpu-report) where 128-wide slices reached 255 + spills.
CONFIGS = {
    "infonce_lse": {
        "16bit": dict(TILES["16bit"], num_warps=8, num_stages=3),
        "tf32": dict(TILES["tf32"], num_warps=8, num_stages=3),
        "ieee": dict(TILES["ieee"], num_warps=4, num_stages=2),
    },
    "infonce_grad": {
        "16bit": dict(TILES["16bit"], BLOCK_DV=32, num_warps=8, num_stages=3),
        "tf32": dict(TILES["tf32"], BLOCK_DV=32, num_warps=8, num_stages=3),
        "ieee": dict(TILES["ieee"], BLOCK_DV=32, num_warps=4, num_stages=2),
    },
}

# Interpreter tiles: the interpreter's cost is per numpy op, so fewer, larger tiles are faster;
# still small enough that test shapes cross every tile, D-chunk and D-slice boundary
# (D = 129: 5 chunks, 3 slices).
INTERPRET_CONFIGS = {
    "infonce_lse": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, num_warps=1, num_stages=1),
    "infonce_grad": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=64, num_warps=1,
                         num_stages=1),
}

# Forward row splits: at most 16 row super-blocks, which bounds the column partials to 16
# values per column (see the module docstring).
ROW_SPLITS = 16


@triton.jit
def _infonce_lse_kernel(
    i_ptr, t_ptr, scale_ptr, bias_ptr, row_part_ptr, col_part_ptr, diag_ptr,
    M, N, D, stride_i, stride_t, offset, rows_per_program, cols_per_program,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = load_scalar(scale_ptr, True)
    bias = load_scalar(bias_ptr, HAS_BIAS)
    row_lo = pid_r * rows_per_program
    row_hi = tl.minimum(M, row_lo + rows_per_program)
    col_lo = pid_c * cols_per_program
    col_hi = tl.minimum(N, col_lo + cols_per_program)
    # This program's row of the column partials: the log-sum-exp over its rows so far.
    col_part = col_part_ptr + pid_r.to(tl.int64) * N
    for m0 in range(row_lo, row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_hi
        i_rows = rows_of(i_ptr, offs_m, stride_i)
        pos = offs_m + offset
        m_row = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(col_lo, col_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < col_hi
            x = logits_tile(i_rows, rows_of(t_ptr, offs_n, stride_t), mask_m, mask_n, D, scale,
                            bias, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
            is_pos = offs_n[None, :] == pos[:, None]
            here = mask_m & (pos >= n0) & (pos < tl.minimum(n0 + BLOCK_N, col_hi))
            tl.store(diag_ptr + offs_m, tl.sum(tl.where(is_pos, x, 0.0), 1), mask=here)
            # Padding and the positives drop out as -inf; tl.where keeps NaN of valid entries.
            x = tl.where(mask_m[:, None] & mask_n[None, :] & (offs_n[None, :] != pos[:, None]),
                         x, float("-inf"))
            # Online log-sum-exp in base e (see the module docstring); a reference of 0 where
            # everything so far is -inf keeps exp2(-inf - -inf) = NaN out.
            m_new = max_propagate_nan(m_row, tl.reduce(x, 1, max_propagate_nan))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_row = (l_row * tl.exp2((m_row - m_ref) * LOG2E)
                     + tl.sum(tl.exp2((x - m_ref[:, None]) * LOG2E), 1))
            m_row = m_new
            c_max = tl.reduce(x, 0, max_propagate_nan)
            c_ref = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp2((x - c_ref[None, :]) * LOG2E), 0)
            # Nothing to read on the program's first row block (tl.where: see accumulate_slices).
            prev = tl.load(col_part + offs_n, mask=tl.where(m0 > row_lo, mask_n, False),
                           other=float("-inf"))
            c_new = max_propagate_nan(prev, c_max)
            c_new_ref = tl.where(c_new == float("-inf"), 0.0, c_new)
            total = (tl.exp2((prev - c_new_ref) * LOG2E)
                     + c_sum * tl.exp2((c_max - c_new_ref) * LOG2E))
            tl.store(col_part + offs_n, c_new + tl.log2(total) * LN2, mask=mask_n)
        row_part = row_part_ptr + pid_c.to(tl.int64) * M
        tl.store(row_part + offs_m, m_row + tl.log2(l_row) * LN2, mask=mask_m)
        absent = (pos < 0) | (pos >= N)
        tl.store(diag_ptr + offs_m, tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32),
                 mask=tl.where(pid_c == 0, mask_m & absent, False))
        # The next row block reads the column partials this one wrote, possibly from other
        # threads of the block.
        tl.debug_barrier()


@triton.jit
def _probabilities(i_rows, t_rows, offs_m, offs_n, mask_m, mask_n, D, scale, bias,
                   row_lse_ptr, col_lse_ptr, row_w_ptr, col_w_ptr, w_scale, offset,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """The P tile (BLOCK_M × BLOCK_N, weights scaled by ``w_scale``), 0 on the positives and
    on padding (whose exponentials could overflow: 0·inf is masked, not multiplied)."""
    x = logits_tile(i_rows, t_rows, mask_m, mask_n, D, scale, bias, BLOCK_M, BLOCK_N, BLOCK_D,
                    INPUT_PRECISION)
    r = tl.load(row_lse_ptr + offs_m, mask=mask_m, other=0.0)
    c = tl.load(col_lse_ptr + offs_n, mask=mask_n, other=0.0)
    w_r = tl.load(row_w_ptr + offs_m, mask=mask_m, other=0.0) * w_scale
    w_c = tl.load(col_w_ptr + offs_n, mask=mask_n, other=0.0) * w_scale
    p = (w_r[:, None] * tl.exp2((x - r[:, None]) * LOG2E)
         + w_c[None, :] * tl.exp2((x - c[None, :]) * LOG2E))
    keep = mask_m[:, None] & mask_n[None, :] & (offs_n[None, :] != (offs_m + offset)[:, None])
    return tl.where(keep, p, 0.0)


@triton.jit
def _grad_rows(
    pid, i_ptr, t_ptr, scale, bias, row_lse_ptr, col_lse_ptr, row_w_ptr, col_w_ptr, w_scale,
    unscale, a_i_ptr, a_t_ptr, psum_ptr, M, N, D, stride_i, stride_t, stride_ai, stride_at,
    offset, cols_per_program,
    ATOMIC: tl.constexpr, ACC_IN_REGS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """A row program: BLOCK_M rows of I against one column range of T. A_I += P·T (resident),
    ΣP; with ATOMIC also A_T += Pᵀ·I (atomic adds into the streamed rows)."""
    row_blocks = tl.cdiv(M, BLOCK_M)
    offs_m = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    i_rows = rows_of(i_ptr, offs_m, stride_i)
    a_i_rows = rows_of(a_i_ptr, offs_m, stride_ai)
    lo = (pid // row_blocks) * cols_per_program
    hi = tl.minimum(N, lo + cols_per_program)
    offs_v = tl.arange(0, BLOCK_DV)
    mask_v = offs_v < D
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    p_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        t_rows = rows_of(t_ptr, offs_n, stride_t)
        p = _probabilities(i_rows, t_rows, offs_m, offs_n, mask_m, mask_n, D, scale, bias,
                           row_lse_ptr, col_lse_ptr, row_w_ptr, col_w_ptr, w_scale, offset,
                           BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        p_sum += tl.sum(p, 1)
        p_op = cast_for_dot(p, i_ptr.dtype.element_ty, INPUT_PRECISION)
        if ACC_IN_REGS:
            acc = tl.dot(p_op, load_rows(t_rows, offs_v, mask_n, mask_v, INPUT_PRECISION), acc,
                         input_precision=INPUT_PRECISION)
        else:
            accumulate_slices(a_i_rows, mask_m, p_op, t_rows, mask_n, D, n0 > lo,
                              n0 + BLOCK_N >= hi, unscale, ATOMIC, BLOCK_DV, INPUT_PRECISION)
        if ATOMIC:
            accumulate_slices(rows_of(a_t_ptr, offs_n, stride_at), mask_n, tl.trans(p_op),
                              i_rows, mask_m, D, n0 > lo, n0 + BLOCK_N >= hi, unscale, True,
                              BLOCK_DV, INPUT_PRECISION)
        elif not ACC_IN_REGS:
            tl.debug_barrier()
    if ACC_IN_REGS:
        store_rows(a_i_rows, mask_m, acc * unscale, D, ATOMIC, BLOCK_DV)
    tl.store(psum_ptr + pid, tl.sum(p_sum, 0) * unscale)


@triton.jit
def _grad_cols(
    cb, i_ptr, t_ptr, scale, bias, row_lse_ptr, col_lse_ptr, row_w_ptr, col_w_ptr, w_scale,
    unscale, a_t_ptr, M, N, D, stride_i, stride_t, stride_at, offset,
    ACC_IN_REGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """A column program (deterministic path): BLOCK_N rows of T against all of I,
    A_T += Pᵀ·I, with the logit tiles in the row programs' orientation."""
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t_rows = rows_of(t_ptr, offs_n, stride_t)
    a_t_rows = rows_of(a_t_ptr, offs_n, stride_at)
    offs_v = tl.arange(0, BLOCK_DV)
    mask_v = offs_v < D
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        i_rows = rows_of(i_ptr, offs_m, stride_i)
        p = _probabilities(i_rows, t_rows, offs_m, offs_n, mask_m, mask_n, D, scale, bias,
                           row_lse_ptr, col_lse_ptr, row_w_ptr, col_w_ptr, w_scale, offset,
                           BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        p_op = tl.trans(cast_for_dot(p, i_ptr.dtype.element_ty, INPUT_PRECISION))
        if ACC_IN_REGS:
            acc = tl.dot(p_op, load_rows(i_rows, offs_v, mask_m, mask_v, INPUT_PRECISION), acc,
                         input_precision=INPUT_PRECISION)
        else:
            accumulate_slices(a_t_rows, mask_n, p_op, i_rows, mask_m, D, m0 > 0,
                              m0 + BLOCK_M >= M, unscale, False, BLOCK_DV, INPUT_PRECISION)
            tl.debug_barrier()
    if ACC_IN_REGS:
        store_rows(a_t_rows, mask_n, acc * unscale, D, False, BLOCK_DV)


@triton.jit
def _infonce_grad_kernel(
    i_ptr, t_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, row_w_ptr, col_w_ptr,
    w_scale_ptr, a_i_ptr, a_t_ptr, psum_ptr,
    M, N, D, stride_i, stride_t, stride_ai, stride_at, offset, row_programs, cols_per_program,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, ACC_IN_REGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = load_scalar(scale_ptr, True)
    bias = load_scalar(bias_ptr, HAS_BIAS)
    w_scale = tl.load(w_scale_ptr)
    unscale = tl.load(w_scale_ptr + 1)
    if ATOMIC:
        _grad_rows(pid, i_ptr, t_ptr, scale, bias, row_lse_ptr, col_lse_ptr, row_w_ptr,
                   col_w_ptr, w_scale, unscale, a_i_ptr, a_t_ptr, psum_ptr, M, N, D, stride_i,
                   stride_t, stride_ai, stride_at, offset, cols_per_program, True, ACC_IN_REGS,
                   BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, INPUT_PRECISION)
    else:
        if pid < row_programs:
            _grad_rows(pid, i_ptr, t_ptr, scale, bias, row_lse_ptr, col_lse_ptr, row_w_ptr,
                       col_w_ptr, w_scale, unscale, a_i_ptr, a_t_ptr, psum_ptr, M, N, D,
                       stride_i, stride_t, stride_ai, stride_at, offset, cols_per_program,
                       False, ACC_IN_REGS, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, INPUT_PRECISION)
        else:
            _grad_cols(pid - row_programs, i_ptr, t_ptr, scale, bias, row_lse_ptr, col_lse_ptr,
                       row_w_ptr, col_w_ptr, w_scale, unscale, a_t_ptr, M, N, D, stride_i,
                       stride_t, stride_at, offset, ACC_IN_REGS, BLOCK_M, BLOCK_N, BLOCK_D,
                       BLOCK_DV, INPUT_PRECISION)


# ----------------------------------------------------------------------------------------------
# Host side


def features(i, t):
    """I and T in one dot dtype, 16-aligned (see mmkernels._triton.aligned_rows)."""
    if i.dim() != 2 or t.dim() != 2 or i.shape[1] != t.shape[1]:
        raise ValueError("expected I (M×D) and T (N×D) with the same D, "
                         f"got {tuple(i.shape)} and {tuple(t.shape)}")
    if i.device != t.device:
        raise ValueError(f"I and T are on different devices: {i.device} and {t.device}")
    dtype = torch.promote_types(i.dtype, t.dtype)
    if dtype not in _triton.DOT_DTYPES:
        raise TypeError("Triton contrastive kernels take float32/float16/bfloat16 features, "
                        f"got {dtype}")
    width = _triton.padded_width(i.shape[1])
    return _triton.aligned_rows(i.to(dtype), width), _triton.aligned_rows(t.to(dtype), width)


def clamp_offset(offset, m: int, n: int) -> int:
    """Offsets beyond the matrix behave like ±(M + N) (no positive at all); clamping keeps
    them in int32."""
    return max(-m, min(n, int(offset)))


def _forward_grid(m: int, n: int, cfg: dict):
    """(row splits, rows per program, column splits, columns per program) of the forward."""
    row_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    per_split = triton.cdiv(row_blocks, min(row_blocks, ROW_SPLITS))
    row_splits = triton.cdiv(row_blocks, per_split)
    col_splits, col_per_split = _triton.column_splits(row_splits,
                                                      triton.cdiv(n, cfg["BLOCK_N"]))
    return (row_splits, per_split * cfg["BLOCK_M"], col_splits, col_per_split * cfg["BLOCK_N"])


def infonce_lse(i, t, scale, bias, offset, tf32):
    """Off-positive log-sum-exps of X = scale·I·Tᵀ + bias and the positives' logits, without
    materializing X.

    Args:
        i: (M, D) features, fp32/fp16/bf16; any row stride. t: (N, D) features.
        scale: 0-dim tensor (or number) multiplying the products.
        bias: optional 0-dim tensor added to every logit (None → 0).
        offset: the positive of row i is column i + offset (any int; absent when out of range).
        tf32: fp32 products on TF32 tensor cores (operands rounded to nearest), else exact.

    Returns:
        fp32 (row_lse_off (M,), col_lse_off (N,), diag (M,)): log Σ_{j ≠ i+offset} e^{X_ij}
        (−inf when no other column), log Σ_{i: i+offset ≠ j} e^{X_ij}, and X_{i,i+offset}
        as the kernel computed it (−inf when absent).
    """
    i, t = features(i, t)
    M, D = i.shape
    N = t.shape[0]
    device = i.device
    if M == 0 or N == 0:
        def empty(n):
            return torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
        return empty(M), empty(N), empty(M)
    scale = _triton.scalar(scale, device)
    bias_t = scale if bias is None else _triton.scalar(bias, device)
    cfg = _triton.config(CONFIGS, INTERPRET_CONFIGS, "infonce_lse",
                         _triton.family(i.dtype, tf32), D)
    row_splits, rows_per_program, col_splits, cols_per_program = _forward_grid(M, N, cfg)
    row_part = torch.empty(col_splits, M, dtype=torch.float32, device=device)
    col_part = torch.empty(row_splits, N, dtype=torch.float32, device=device)
    diag = torch.empty(M, dtype=torch.float32, device=device)
    with _triton.launch_device(device):
        _infonce_lse_kernel[(row_splits, col_splits)](
            i, t, scale, bias_t, row_part, col_part, diag,
            M, N, D, i.stride(0), t.stride(0), clamp_offset(offset, M, N), rows_per_program,
            cols_per_program, HAS_BIAS=bias is not None, **cfg,
        )
    return torch.logsumexp(row_part, 0), torch.logsumexp(col_part, 0), diag


def sweep_grid(m: int, n: int, cfg: dict, atomic: bool):
    """(row programs, columns per row program, programs) of a backward-style sweep: with
    atomics, row blocks × column splits; without, row blocks over all columns followed by
    one column program per BLOCK_N rows of T."""
    row_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    col_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    if atomic:
        splits, per_split = _triton.column_splits(row_blocks, col_tiles)
        return row_blocks * splits, per_split * cfg["BLOCK_N"], row_blocks * splits
    return row_blocks, col_tiles * cfg["BLOCK_N"], row_blocks + col_tiles


def infonce_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset, tf32,
                 deterministic=None):
    """A_I = P·T, A_T = Pᵀ·I and ΣP for P_ij = row_w_i·e^{X_ij − row_lse_i} +
    col_w_j·e^{X_ij − col_lse_j} off the positives (P_{i,i+offset} = 0), X = scale·I·Tᵀ + bias
    recomputed tile by tile; no M×N buffer exists.

    Args:
        i: (M, D) features; t: (N, D) features (fp32/fp16/bf16, any row stride).
        scale: 0-dim tensor; bias: 0-dim tensor or None.
        row_lse: (M,), col_lse: (N,) the full log-sum-exps of X's rows and columns.
        row_w: (M,) row weights; col_w: (N,) column weights.
        offset: as in :func:`infonce_lse`. tf32: as in :func:`infonce_lse`.
        deterministic: no atomics (each tile computed twice); None follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        (A_I (M, D) fp32, A_T (N, D) fp32, ΣP 0-dim fp32).
    """
    D = i.shape[1]
    i, t = features(i, t)
    M, D_pad = i.shape
    N = t.shape[0]
    device = i.device
    row_lse = _triton.vector(row_lse, M, device, "row_lse")
    col_lse = _triton.vector(col_lse, N, device, "col_lse")
    row_w = _triton.vector(row_w, M, device, "row_w")
    col_w = _triton.vector(col_w, N, device, "col_w")
    if M == 0 or N == 0:
        return (i.new_zeros(M, D, dtype=torch.float32), i.new_zeros(N, D, dtype=torch.float32),
                i.new_zeros((), dtype=torch.float32))
    atomic = not (_triton.deterministic() if deterministic is None else deterministic)
    cfg = _triton.config(CONFIGS, INTERPRET_CONFIGS, "infonce_grad",
                         _triton.family(i.dtype, tf32), D_pad)
    row_programs, cols_per_program, programs = sweep_grid(M, N, cfg, atomic)
    # Atomic adds need zeroed outputs; owner programs write every element.
    alloc = torch.zeros if atomic else torch.empty
    a_i = alloc(M, D_pad, dtype=torch.float32, device=device)
    a_t = alloc(N, D_pad, dtype=torch.float32, device=device)
    partials = torch.empty(row_programs, dtype=torch.float32, device=device)
    scale = _triton.scalar(scale, device)
    bias_t = scale if bias is None else _triton.scalar(bias, device)
    with _triton.launch_device(device):
        _infonce_grad_kernel[(programs,)](
            i, t, scale, bias_t, row_lse, col_lse, row_w, col_w,
            _triton.weight_scale(row_w, col_w), a_i, a_t, partials,
            M, N, D_pad, i.stride(0), t.stride(0), a_i.stride(0), a_t.stride(0),
            clamp_offset(offset, M, N), row_programs, cols_per_program,
            HAS_BIAS=bias is not None, ATOMIC=atomic, ACC_IN_REGS=D_pad <= cfg["BLOCK_DV"],
            **cfg,
        )
    return _triton.unpad(a_i, D), _triton.unpad(a_t, D), partials.sum()


# ----------------------------------------------------------------------------------------------
# gpu-report


def sweep_flops(kernel: str, configs: dict, fam: str, path: str, acc_in_regs: bool):
    """flops(B, D) of one compiled variant of a backward-style sweep kernel for M = N = B (see
    ``_triton.compile_spec``): the logit tiles once per program role (twice on the
    deterministic path), plus one product with the weight tile per gradient side ("loss-only":
    the logits only); None when the host launches the other variant (gradient block in
    registers vs in global memory) at that D."""
    def flops(b, d):
        d_pad = _triton.padded_width(d)
        cfg = _triton.gpu_config(configs, kernel, fam, d_pad)
        block = (cfg["BLOCK_M"], cfg["BLOCK_N"])
        logits = _triton.tile_flops(b, b, d_pad, *block, cfg["BLOCK_D"])
        if path == "loss-only":
            return logits
        if (d_pad <= cfg["BLOCK_DV"]) != acc_in_regs:
            return None
        product = _triton.tile_flops(b, b, d_pad, *block, cfg["BLOCK_DV"])
        return 2 * (logits + product) if path == "deterministic" else logits + 2 * product
    return flops


def compile_specs():
    """The shipped GPU configs of both kernels for every precision family (gpu-report): the
    forward, and the backward on both paths with the gradient block in registers (compiled
    at the largest such D) and in global memory."""
    lse_signature = {
        "i_ptr": "*features", "t_ptr": "*features", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
        "row_part_ptr": "*fp32", "col_part_ptr": "*fp32", "diag_ptr": "*fp32",
        "M": "i32", "N": "i32", "D": "i32", "stride_i": "i32", "stride_t": "i32",
        "offset": "i32", "rows_per_program": "i32", "cols_per_program": "i32",
    }
    grad_signature = {
        "i_ptr": "*features", "t_ptr": "*features", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
        "row_lse_ptr": "*fp32", "col_lse_ptr": "*fp32", "row_w_ptr": "*fp32",
        "col_w_ptr": "*fp32", "w_scale_ptr": "*fp32", "a_i_ptr": "*fp32", "a_t_ptr": "*fp32",
        "psum_ptr": "*fp32",
        "M": "i32", "N": "i32", "D": "i32", "stride_i": "i32", "stride_t": "i32",
        "stride_ai": "i32", "stride_at": "i32", "offset": "i32", "row_programs": "i32",
        "cols_per_program": "i32",
    }
    specs = []
    for fam in _triton.SPEC_DTYPES:
        cfg = CONFIGS["infonce_lse"][fam]

        def lse_flops(b, d, fam=fam):
            c = _triton.gpu_config(CONFIGS, "infonce_lse", fam, _triton.padded_width(d))
            return _triton.tile_flops(b, b, _triton.padded_width(d), c["BLOCK_M"], c["BLOCK_N"],
                                      c["BLOCK_D"])

        specs.append(_triton.compile_spec(
            "infonce_lse", _infonce_lse_kernel, lse_signature, cfg, fam,
            ["i_ptr", "t_ptr", "row_part_ptr", "col_part_ptr", "diag_ptr", "D", "stride_i",
             "stride_t"], op="infonce", path="forward", flops=lse_flops, HAS_BIAS=True))
        for atomic in (False, True):
            path = "atomic" if atomic else "deterministic"
            for acc_in_regs in (True, False):
                specs.append(_triton.compile_spec(
                    f"infonce_grad.{'atomic' if atomic else 'det'}"
                    f".{'regs' if acc_in_regs else 'global'}",
                    _infonce_grad_kernel, grad_signature, CONFIGS["infonce_grad"][fam], fam,
                    ["i_ptr", "t_ptr", "row_lse_ptr", "col_lse_ptr", "row_w_ptr", "col_w_ptr",
                     "a_i_ptr", "a_t_ptr", "D", "stride_i", "stride_t", "stride_ai",
                     "stride_at"],
                    op="infonce", path=path,
                    flops=sweep_flops("infonce_grad", CONFIGS, fam, path, acc_in_regs),
                    HAS_BIAS=True, ATOMIC=atomic, ACC_IN_REGS=acc_in_regs))
    return specs


_triton.register_specs(compile_specs)
