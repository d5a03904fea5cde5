"""Triton kernel for the SigLIP (pairwise sigmoid) loss: loss and gradient in one pass.

Logits X_ij = scale·<Q_i, K_j> + bias for Q (M×D), K (N×D); labels z_ij = +1 where
j == i + diag_offset, else −1. Unlike InfoNCE, no normalizer couples tiles, so one kernel
recomputes each logit tile once and emits, for ``siglip_pass(q, k, scale, bias, diag_offset,
want_grad, tf32)``:

* loss_sum = Σ_ij softplus(−z_ij·X_ij) = −Σ log σ(z_ij·X_ij),
* with ``want_grad``: A_q = G·K and A_k = Gᵀ·Q with G_ij = ∂softplus(−z_ij·X_ij)/∂X_ij =
  −z_ij·σ(−z_ij·X_ij), and gsum = Σ_ij G_ij (the bias gradient before the caller's reduction).

A_k comes from a second launch with the roles of Q and K swapped (the kernel's WANT_LOSS off).

Tiling, D handling, the TF32 rule and the 16-bit cast of G before the second ``tl.dot``
follow :mod:`mmkernels.contrastive.infonce_triton` (see its docstring): fp32 accumulation and
outputs, D in masked BLOCK_D chunks, the gradient accumulator split into BLOCK_DV-wide D-slices
on a second grid axis when D exceeds the cap. G lies in [−1, 1]; it is multiplied by 2^14
(exact, undone on the accumulator) before the cast so fp16 keeps small entries (σ of strongly
separated logits) out of its subnormal range.

softplus and σ are evaluated from e = exp(−|X|) only, which stays finite for any |X| (logits of
1e5 included), and log1p(e) uses an exact-log formulation so tiny terms are not rounded to
zero. NaN inputs give NaN outputs.
"""

import torch
import triton
import triton.language as tl

from .. import _triton
from .._triton import CAST_SCALE, LOG2E, cast_for_dot, dot_rows, load_rows, load_scalar, row_block  # noqa: E501
from .infonce_triton import features

# One config per precision family (see infonce_triton.CONFIGS), sized like infonce_grad: the
# same two tl.dot per tile plus a few more elementwise ops on the logit tile.
CONFIGS = {
    "siglip_pass": {
        "16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=256, num_warps=8, num_stages=3),
        "tf32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=128, num_warps=8, num_stages=3),
        "ieee": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=128, num_warps=8, num_stages=2),
    },
}

INTERPRET_CONFIGS = {
    "siglip_pass": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=64, num_warps=1, num_stages=1),
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
def _siglip_pass_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, acc_ptr, loss_ptr, gsum_ptr,
    M, N, D, stride_q, stride_k, stride_acc, diag_offset,
    HAS_BIAS: tl.constexpr, WANT_LOSS: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    offs_m, mask_m, q_rows = row_block(q_ptr, stride_q, M, BLOCK_M)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_v = offs_v < D
    scale = load_scalar(scale_ptr, True)
    bias = load_scalar(bias_ptr, HAS_BIAS)
    pos_col = offs_m + diag_offset

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    g_rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    loss_rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_rows = k_ptr + offs_n.to(tl.int64) * stride_k
        s = dot_rows(q_rows, k_rows, mask_m, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D,
                     INPUT_PRECISION)
        x = s * scale + bias
        is_pos = offs_n[None, :] == pos_col[:, None]
        # y = −z·X is the softplus argument; everything below needs only e = exp(−|y|) in
        # [0, 1], so huge |X| never overflows: softplus(y) = max(y, 0) + log1p(e),
        # σ(y) = 1/(1 + e) for y ≥ 0 and e/(1 + e) for y < 0.
        y = tl.where(is_pos, -x, x)
        e = tl.exp2(-tl.abs(y) * LOG2E)
        sig = tl.where(y >= 0, 1.0, e) / (1.0 + e)
        valid = mask_m[:, None] & mask_n[None, :]
        # G = −z·σ(−z·X) = −z·σ(y); tl.where keeps NaN of valid entries.
        g = tl.where(valid, tl.where(is_pos, -sig, sig), 0.0)
        g_rowsum += tl.sum(g, 1)
        if WANT_LOSS:
            softplus = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL) + _log1p_small(e)
            loss_rowsum += tl.sum(tl.where(valid, softplus, 0.0), 1)
        if WANT_GRAD:
            k_v = load_rows(k_rows, offs_v, mask_n, mask_v, INPUT_PRECISION)
            acc = tl.dot(cast_for_dot(g * CAST_SCALE, k_v, INPUT_PRECISION), k_v, acc,
                         input_precision=INPUT_PRECISION)

    if WANT_GRAD:
        acc_ptrs = acc_ptr + offs_m.to(tl.int64)[:, None] * stride_acc + offs_v[None, :]
        tl.store(acc_ptrs, acc * (1.0 / CAST_SCALE), mask=mask_m[:, None] & mask_v[None, :])
    # Every D-slice of a row block computes the same G and loss; the first one writes the
    # per-block partial sums, which the host adds in a fixed order (deterministic, no atomics).
    if pid_v == 0:
        tl.store(gsum_ptr + tl.program_id(0), tl.sum(g_rowsum, 0))
        if WANT_LOSS:
            tl.store(loss_ptr + tl.program_id(0), tl.sum(loss_rowsum, 0))


def _launch(q, k, scale, bias, diag_offset, want_loss, want_grad, tf32):
    """One launch over the rows of ``q`` (both already through ``features``): the partial sums
    of the loss (or None) and of G, and A_q = G·k (or None)."""
    M, D_pad = q.shape
    N = k.shape[0]
    device = q.device
    # Offsets beyond the matrix behave like ±(M + N); clamping keeps them in int32.
    diag_offset = max(-M, min(N, int(diag_offset)))
    cfg = _triton.config(CONFIGS, INTERPRET_CONFIGS, "siglip_pass",
                         _triton.family(q.dtype, tf32), D_pad)
    slices = triton.cdiv(D_pad, cfg["BLOCK_DV"]) if want_grad else 1
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), slices)
    acc = torch.empty(M, D_pad, dtype=torch.float32, device=device) if want_grad else None
    gsum = torch.empty(grid[0], dtype=torch.float32, device=device)
    loss = torch.empty(grid[0], dtype=torch.float32, device=device) if want_loss else None
    with _triton.launch_device(device):
        _siglip_pass_kernel[grid](
            q, k, scale, scale if bias is None else bias, gsum if acc is None else acc, gsum if loss is None else loss, gsum,
            M, N, D_pad, q.stride(0), k.stride(0), 0 if acc is None else acc.stride(0),
            diag_offset, HAS_BIAS=bias is not None, WANT_LOSS=want_loss, WANT_GRAD=want_grad,
            **cfg,
        )
    return (None if loss is None else loss.sum()), gsum.sum(), acc


def siglip_pass(q, k, scale, bias, diag_offset, want_grad, tf32):
    """SigLIP loss sum and, with ``want_grad``, its gradient products for X = scale·q·kᵀ + bias,
    without an M×N buffer.

    Args:
        q: (M, D) features; k: (N, D) features (fp32/fp16/bf16, any row stride).
        scale: 0-dim tensor (or number); bias: 0-dim tensor or None (→ 0).
        diag_offset: positives are (i, i + diag_offset); any int, out-of-range positives are
            simply absent.
        want_grad: also compute A_q, A_k and gsum; otherwise they are empty / 0.
        tf32: fp32 products on TF32 tensor cores (operands rounded to nearest), else exact.

    Returns:
        (loss_sum, A_q, A_k, gsum): loss_sum 0-dim fp32 Σ_ij softplus(−z_ij X_ij); A_q (M, D)
        fp32 = G·k; A_k (N, D) fp32 = Gᵀ·q; gsum 0-dim fp32 Σ_ij G_ij, where
        G_ij = −z_ij·σ(−z_ij X_ij).
    """
    D = q.shape[1]
    q, k = features(q, k)
    M, N = q.shape[0], k.shape[0]
    zero = q.new_zeros((), dtype=torch.float32)
    empty = q.new_empty(0, dtype=torch.float32)
    if M == 0 or N == 0:
        if not want_grad:
            return zero, empty, empty.clone(), zero.clone()
        return (zero, q.new_zeros(M, D, dtype=torch.float32),
                q.new_zeros(N, D, dtype=torch.float32), zero.clone())
    scale = _triton.scalar(scale, q.device)
    bias = None if bias is None else _triton.scalar(bias, q.device)
    loss, gsum, a_q = _launch(q, k, scale, bias, diag_offset, True, want_grad, tf32)
    if not want_grad:
        return loss, empty, empty.clone(), zero
    _, _, a_k = _launch(k, q, scale, bias, -diag_offset, False, True, tf32)
    return loss, _triton.unpad(a_q, D), _triton.unpad(a_k, D), gsum


def compile_specs():
    """Specs for compiling the shipped GPU configs ahead of time, loss enabled (format as in
    ``infonce_triton.compile_specs``): one per precision family (bf16, fp32 TF32, fp32 IEEE)."""
    signature = {
        "q_ptr": "*features", "k_ptr": "*features", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
        "acc_ptr": "*fp32", "loss_ptr": "*fp32", "gsum_ptr": "*fp32",
        "M": "i32", "N": "i32", "D": "i32",
        "stride_q": "i32", "stride_k": "i32", "stride_acc": "i32", "diag_offset": "i32",
    }
    aligned = ["q_ptr", "k_ptr", "acc_ptr", "D", "stride_q", "stride_k", "stride_acc"]
    return [
        _triton.compile_spec("siglip_pass", _siglip_pass_kernel, signature, CONFIGS, fam,
                             aligned, HAS_BIAS=True, WANT_LOSS=True, WANT_GRAD=True)
        for fam in _triton.SPEC_DTYPES
    ]


_triton.register_specs(compile_specs)
