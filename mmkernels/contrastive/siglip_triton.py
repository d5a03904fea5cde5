"""Triton kernel for the SigLIP (pairwise sigmoid) loss: loss and gradient in one sweep.

Logits X_ij = scale·<I_i, T_j> + bias for I (M×D), T (N×D); labels z_ij = +1 where
j == i + offset, else −1. ``siglip_pass(i, t, scale, bias, offset, want_grad, tf32)`` returns

* loss_sum = Σ_ij softplus(−z_ij·X_ij) = −Σ log σ(z_ij·X_ij),
* with ``want_grad``: A_I = G·T and A_T = Gᵀ·I with G_ij = ∂softplus(−z_ij·X_ij)/∂X_ij =
  −z_ij·σ(−z_ij·X_ij), and gsum = Σ_ij G_ij (the bias gradient before the caller's reduction).

No normalizer couples the tiles, so G is known as soon as a tile's logits are: the kernel is
the sweep of ``infonce_triton``'s backward (see its docstring for the grid, the two paths and
the large-D accumulation) with G in place of P, and it also sums the loss:

* atomic path (torch's default): (row block × column range) programs compute each tile once,
  A_I resident and A_T by fp32 atomic adds: one pass, 6·M·N·D FLOPs, the nominal 6·B²·D.
* deterministic path (``torch.use_deterministic_algorithms(True)``): no atomics, so each
  output side has its own owner programs in the same launch (row programs: loss, gsum, A_I;
  column programs: A_T), and each tile is computed twice: 8·M·N·D FLOPs, 1.33× nominal.
* no gradient wanted (evaluation): the row programs alone, with the column range split as in
  the atomic path to fill the GPU, 2·M·N·D FLOPs; deterministic (no atomics involved).

The loss and gsum always go through per-program partial sums added on the host in a fixed
order. G lies in [−1, 1]; before its cast to a 16-bit dtype for the second ``tl.dot`` it is
multiplied by 2^14 (exact, undone on the outputs) so fp16 keeps small entries (σ of strongly
separated logits) out of its subnormal range.

softplus and σ are evaluated from e = exp(−|X|) only, which stays finite for any |X| (logits of
1e5 included), and log1p(e) uses an exact-log formulation so tiny terms are not rounded to
zero. NaN inputs give NaN outputs.
"""

import torch
import triton
import triton.language as tl

from .. import _triton
from .._triton import (CAST_SCALE, LOG2E, accumulate_slices, cast_for_dot, load_rows,
                       load_scalar, logits_tile, rows_of, store_rows)
from .infonce_triton import clamp_offset, features, sweep_flops, sweep_grid

# One config per precision family (see infonce_triton.CONFIGS): the same sweep as
# infonce_grad with a few more elementwise operations on the logit tile.
CONFIGS = {
    "siglip_pass": {
        "16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=32, num_warps=8,
                      num_stages=3),
        "tf32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=32, num_warps=8,
                     num_stages=3),
        "ieee": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=8, BLOCK_DV=32, num_warps=4,
                     num_stages=2),
    },
}

INTERPRET_CONFIGS = {
    "siglip_pass": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=64, num_warps=1,
                        num_stages=1),
}


@triton.jit
def _log1p_small(e):
    """log(1 + e) for e in [0, 1], accurate to a few ulp also when 1 + e rounds to 1.

    log(w)·e/(w − 1) with w = fl(1 + e) cancels the rounding of w (Goldberg's trick); it needs
    an accurate log, which tl.log is (libdevice logf on NVIDIA, numpy under the interpreter).
    """
    w = 1.0 + e
    w_minus_1 = w - 1.0
    # The guarded denominator only keeps the discarded branch free of 0/0.
    ratio = e / tl.where(w_minus_1 == 0.0, 1.0, w_minus_1)
    return tl.where(w_minus_1 == 0.0, e, tl.log(w) * ratio)


@triton.jit
def _sigmoid_tile(i_rows, t_rows, offs_m, offs_n, mask_m, mask_n, D, scale, bias, offset,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """(G, softplus(−z·X)) of one tile, both 0 on padding."""
    x = logits_tile(i_rows, t_rows, mask_m, mask_n, D, scale, bias, BLOCK_M, BLOCK_N, BLOCK_D,
                    INPUT_PRECISION)
    is_pos = offs_n[None, :] == (offs_m + offset)[:, None]
    # y = −z·X is the softplus argument; everything below needs only e = exp(−|y|) in
    # [0, 1], so huge |X| never overflows: softplus(y) = max(y, 0) + log1p(e),
    # σ(y) = 1/(1 + e) for y ≥ 0 and e/(1 + e) for y < 0.
    y = tl.where(is_pos, -x, x)
    e = tl.exp2(-tl.abs(y) * LOG2E)
    sig = tl.where(y >= 0, 1.0, e) / (1.0 + e)
    valid = mask_m[:, None] & mask_n[None, :]
    # G = −z·σ(−z·X) = −z·σ(y); tl.where keeps NaN of valid entries.
    g = tl.where(valid, tl.where(is_pos, -sig, sig), 0.0)
    softplus = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL) + _log1p_small(e)
    return g, tl.where(valid, softplus, 0.0)


@triton.jit
def _siglip_rows(
    pid, i_ptr, t_ptr, scale, bias, a_i_ptr, a_t_ptr, loss_ptr, gsum_ptr, M, N, D, stride_i,
    stride_t, stride_ai, stride_at, offset, cols_per_program,
    WANT_GRAD: tl.constexpr, ATOMIC: tl.constexpr, ACC_IN_REGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """A row program: BLOCK_M rows of I against one column range of T. Loss and G partial
    sums; with WANT_GRAD, A_I += G·T (resident) and, with ATOMIC, A_T += Gᵀ·I (atomic)."""
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
    g_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    loss_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        t_rows = rows_of(t_ptr, offs_n, stride_t)
        g, softplus = _sigmoid_tile(i_rows, t_rows, offs_m, offs_n, mask_m, mask_n, D, scale,
                                    bias, offset, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        g_sum += tl.sum(g, 1)
        loss_sum += tl.sum(softplus, 1)
        if WANT_GRAD:
            g_op = cast_for_dot(g * CAST_SCALE, i_ptr.dtype.element_ty, INPUT_PRECISION)
            if ACC_IN_REGS:
                acc = tl.dot(g_op, load_rows(t_rows, offs_v, mask_n, mask_v, INPUT_PRECISION),
                             acc, input_precision=INPUT_PRECISION)
            else:
                accumulate_slices(a_i_rows, mask_m, g_op, t_rows, mask_n, D, n0 > lo,
                                  n0 + BLOCK_N >= hi, 1.0 / CAST_SCALE, ATOMIC, BLOCK_DV,
                                  INPUT_PRECISION)
            if ATOMIC:
                accumulate_slices(rows_of(a_t_ptr, offs_n, stride_at), mask_n, tl.trans(g_op),
                                  i_rows, mask_m, D, n0 > lo, n0 + BLOCK_N >= hi,
                                  1.0 / CAST_SCALE, True, BLOCK_DV, INPUT_PRECISION)
            elif not ACC_IN_REGS:
                tl.debug_barrier()
    if WANT_GRAD:
        if ACC_IN_REGS:
            store_rows(a_i_rows, mask_m, acc * (1.0 / CAST_SCALE), D, ATOMIC, BLOCK_DV)
    tl.store(gsum_ptr + pid, tl.sum(g_sum, 0))
    tl.store(loss_ptr + pid, tl.sum(loss_sum, 0))


@triton.jit
def _siglip_cols(
    cb, i_ptr, t_ptr, scale, bias, a_t_ptr, M, N, D, stride_i, stride_t, stride_at, offset,
    ACC_IN_REGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """A column program (deterministic path): BLOCK_N rows of T against all of I,
    A_T += Gᵀ·I."""
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
        g, _ = _sigmoid_tile(i_rows, t_rows, offs_m, offs_n, mask_m, mask_n, D, scale, bias,
                             offset, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        g_op = tl.trans(cast_for_dot(g * CAST_SCALE, i_ptr.dtype.element_ty, INPUT_PRECISION))
        if ACC_IN_REGS:
            acc = tl.dot(g_op, load_rows(i_rows, offs_v, mask_m, mask_v, INPUT_PRECISION), acc,
                         input_precision=INPUT_PRECISION)
        else:
            accumulate_slices(a_t_rows, mask_n, g_op, i_rows, mask_m, D, m0 > 0,
                              m0 + BLOCK_M >= M, 1.0 / CAST_SCALE, False, BLOCK_DV,
                              INPUT_PRECISION)
            tl.debug_barrier()
    if ACC_IN_REGS:
        store_rows(a_t_rows, mask_n, acc * (1.0 / CAST_SCALE), D, False, BLOCK_DV)


@triton.jit
def _siglip_pass_kernel(
    i_ptr, t_ptr, scale_ptr, bias_ptr, a_i_ptr, a_t_ptr, loss_ptr, gsum_ptr,
    M, N, D, stride_i, stride_t, stride_ai, stride_at, offset, row_programs, cols_per_program,
    HAS_BIAS: tl.constexpr, WANT_GRAD: tl.constexpr, ATOMIC: tl.constexpr,
    COLUMN_PROGRAMS: tl.constexpr, ACC_IN_REGS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = load_scalar(scale_ptr, True)
    bias = load_scalar(bias_ptr, HAS_BIAS)
    if COLUMN_PROGRAMS:
        if pid < row_programs:
            _siglip_rows(pid, i_ptr, t_ptr, scale, bias, a_i_ptr, a_t_ptr, loss_ptr, gsum_ptr,
                         M, N, D, stride_i, stride_t, stride_ai, stride_at, offset,
                         cols_per_program, WANT_GRAD, False, ACC_IN_REGS, BLOCK_M, BLOCK_N,
                         BLOCK_D, BLOCK_DV, INPUT_PRECISION)
        else:
            _siglip_cols(pid - row_programs, i_ptr, t_ptr, scale, bias, a_t_ptr, M, N, D,
                         stride_i, stride_t, stride_at, offset, ACC_IN_REGS, BLOCK_M, BLOCK_N,
                         BLOCK_D, BLOCK_DV, INPUT_PRECISION)
    else:
        _siglip_rows(pid, i_ptr, t_ptr, scale, bias, a_i_ptr, a_t_ptr, loss_ptr, gsum_ptr, M,
                     N, D, stride_i, stride_t, stride_ai, stride_at, offset, cols_per_program,
                     WANT_GRAD, ATOMIC, ACC_IN_REGS, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
                     INPUT_PRECISION)


def siglip_pass(i, t, scale, bias, offset, want_grad, tf32, deterministic=None):
    """SigLIP loss sum and, with ``want_grad``, its gradient products for
    X = scale·I·Tᵀ + bias, without an M×N buffer.

    Args:
        i: (M, D) features; t: (N, D) features (fp32/fp16/bf16, any row stride).
        scale: 0-dim tensor (or number); bias: 0-dim tensor or None (→ 0).
        offset: positives are (i, i + offset); any int, out-of-range positives are simply
            absent.
        want_grad: also compute A_I, A_T and gsum; otherwise they are empty / 0.
        tf32: fp32 products on TF32 tensor cores (operands rounded to nearest), else exact.
        deterministic: no atomics (each tile computed twice when ``want_grad``); None follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        (loss_sum, A_I, A_T, gsum): loss_sum 0-dim fp32 Σ_ij softplus(−z_ij X_ij); A_I (M, D)
        fp32 = G·T; A_T (N, D) fp32 = Gᵀ·I; gsum 0-dim fp32 Σ_ij G_ij, where
        G_ij = −z_ij·σ(−z_ij X_ij).
    """
    D = i.shape[1]
    i, t = features(i, t)
    M, D_pad = i.shape
    N = t.shape[0]
    device = i.device
    zero = i.new_zeros((), dtype=torch.float32)
    empty = i.new_empty(0, dtype=torch.float32)
    if M == 0 or N == 0:
        if not want_grad:
            return zero, empty, empty.clone(), zero.clone()
        return (zero, i.new_zeros(M, D, dtype=torch.float32),
                i.new_zeros(N, D, dtype=torch.float32), zero.clone())
    atomic = want_grad and not (_triton.deterministic() if deterministic is None
                                else deterministic)
    columns = want_grad and not atomic
    cfg = _triton.config(CONFIGS, INTERPRET_CONFIGS, "siglip_pass",
                         _triton.family(i.dtype, tf32), D_pad)
    # Without a gradient there is nothing to add up across programs but the partial sums:
    # the row programs alone, with the atomic path's column split.
    row_programs, cols_per_program, programs = sweep_grid(M, N, cfg, not columns)
    loss = torch.empty(row_programs, dtype=torch.float32, device=device)
    gsum = torch.empty(row_programs, dtype=torch.float32, device=device)
    if want_grad:
        # Atomic adds need zeroed outputs; owner programs write every element.
        alloc = torch.zeros if atomic else torch.empty
        a_i = alloc(M, D_pad, dtype=torch.float32, device=device)
        a_t = alloc(N, D_pad, dtype=torch.float32, device=device)
    else:
        a_i = a_t = loss  # never dereferenced
    scale = _triton.scalar(scale, device)
    bias_t = scale if bias is None else _triton.scalar(bias, device)
    with _triton.launch_device(device):
        _siglip_pass_kernel[(programs,)](
            i, t, scale, bias_t, a_i, a_t, loss, gsum,
            M, N, D_pad, i.stride(0), t.stride(0), a_i.stride(0), a_t.stride(0),
            clamp_offset(offset, M, N), row_programs, cols_per_program,
            HAS_BIAS=bias is not None, WANT_GRAD=want_grad, ATOMIC=atomic,
            COLUMN_PROGRAMS=columns, ACC_IN_REGS=D_pad <= cfg["BLOCK_DV"], **cfg,
        )
    if not want_grad:
        return loss.sum(), empty, empty.clone(), zero
    return loss.sum(), _triton.unpad(a_i, D), _triton.unpad(a_t, D), gsum.sum()


def compile_specs():
    """The shipped GPU configs for every precision family (format as in
    ``infonce_triton.compile_specs``): both gradient paths with the gradient block in
    registers and in global memory, and the loss-only sweep."""
    signature = {
        "i_ptr": "*features", "t_ptr": "*features", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
        "a_i_ptr": "*fp32", "a_t_ptr": "*fp32", "loss_ptr": "*fp32", "gsum_ptr": "*fp32",
        "M": "i32", "N": "i32", "D": "i32", "stride_i": "i32", "stride_t": "i32",
        "stride_ai": "i32", "stride_at": "i32", "offset": "i32", "row_programs": "i32",
        "cols_per_program": "i32",
    }
    aligned = ["i_ptr", "t_ptr", "a_i_ptr", "a_t_ptr", "D", "stride_i", "stride_t",
               "stride_ai", "stride_at"]
    specs = []
    for fam in _triton.SPEC_DTYPES:
        cfg = CONFIGS["siglip_pass"][fam]
        for atomic in (False, True):
            path = "atomic" if atomic else "deterministic"
            for acc_in_regs in (True, False):
                specs.append(_triton.compile_spec(
                    f"siglip_pass.{'atomic' if atomic else 'det'}"
                    f".{'regs' if acc_in_regs else 'global'}",
                    _siglip_pass_kernel, signature, cfg, fam, aligned, op="siglip", path=path,
                    flops=sweep_flops("siglip_pass", CONFIGS, fam, path, acc_in_regs),
                    HAS_BIAS=True, WANT_GRAD=True, ATOMIC=atomic, COLUMN_PROGRAMS=not atomic,
                    ACC_IN_REGS=acc_in_regs))
        specs.append(_triton.compile_spec(
            "siglip_pass.loss", _siglip_pass_kernel, signature, cfg, fam, aligned, op="siglip",
            path="loss-only",
            flops=sweep_flops("siglip_pass", CONFIGS, fam, "loss-only", None),
            HAS_BIAS=True, WANT_GRAD=False, ATOMIC=False, COLUMN_PROGRAMS=False,
            ACC_IN_REGS=True))
    return specs


_triton.register_specs(compile_specs)
