"""Triton kernel for the SigLIP (pairwise sigmoid) loss: loss and gradient in one pass.

Logits X_ij = scale·<Q_i, K_j> + bias for Q (M×D), K (N×D); labels z_ij = +1 where
j == i + diag_offset, else −1. Unlike InfoNCE, no normalizer couples tiles, so one kernel
recomputes each logit tile once and emits, for ``siglip_grad(q, k, scale, bias, diag_offset,
compute_loss)``:

* loss_sum = Σ_ij softplus(−z_ij·X_ij) = −Σ log σ(z_ij·X_ij) (skipped when compute_loss=False),
* acc_i = Σ_j G_ij K_j with G_ij = ∂softplus(−z_ij·X_ij)/∂X_ij = −z_ij·σ(−z_ij·X_ij),
* gsum = Σ_ij G_ij (the bias gradient before the caller's reduction factor).

The caller gets dI from (I, T, offset) and dT from (T, I, −offset, compute_loss=False).

Tiling, D handling, TF32/``allow_tf32`` and the 16-bit cast of G before the second ``tl.dot``
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

from .infonce_triton import (
    _CAST_SCALE,
    _LOG2E,
    _SPEC_DTYPES,
    _compile_spec,
    _config,
    _family,
    _features,
    _launch_device,
    _qk_tile,
    _scalar,
    _unpad,
)

# One config per precision family (see infonce_triton.CONFIGS), sized like infonce_grad: the
# same two tl.dot per tile plus a few more elementwise ops on the logit tile.
CONFIGS = {
    "siglip_grad": {
        "16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=256, num_warps=8, num_stages=3),
        "tf32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=128, num_warps=8, num_stages=3),
        "ieee": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=128, num_warps=8, num_stages=2),
    },
}

INTERPRET_CONFIGS = {
    "siglip_grad": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=64, num_warps=1, num_stages=1),
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
def _siglip_grad_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, acc_ptr, loss_ptr, gsum_ptr,
    M, N, D, stride_q, stride_k, stride_acc, diag_offset,
    HAS_BIAS: tl.constexpr, COMPUTE_LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_v = offs_v < D
    q_rows = q_ptr + offs_m.to(tl.int64) * stride_q
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    pos_col = offs_m + diag_offset

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    g_rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    loss_rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_rows = k_ptr + offs_n.to(tl.int64) * stride_k
        s = _qk_tile(q_rows, k_rows, mask_m, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        x = s * scale + bias
        is_pos = offs_n[None, :] == pos_col[:, None]
        # y = −z·X is the softplus argument; everything below needs only e = exp(−|y|) in
        # [0, 1], so huge |X| never overflows: softplus(y) = max(y, 0) + log1p(e),
        # σ(y) = 1/(1 + e) for y ≥ 0 and e/(1 + e) for y < 0.
        y = tl.where(is_pos, -x, x)
        e = tl.exp2(-tl.abs(y) * _LOG2E)
        sig = tl.where(y >= 0, 1.0, e) / (1.0 + e)
        valid = mask_m[:, None] & mask_n[None, :]
        # G = −z·σ(−z·X) = −z·σ(y); tl.where keeps NaN of valid entries.
        g = tl.where(valid, tl.where(is_pos, -sig, sig), 0.0)
        g_rowsum += tl.sum(g, 1)
        if COMPUTE_LOSS:
            softplus = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL) + _log1p_small(e)
            loss_rowsum += tl.sum(tl.where(valid, softplus, 0.0), 1)
        k_v = tl.load(k_rows[:, None] + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :],
                      other=0.0)
        acc = tl.dot((g * _CAST_SCALE).to(k_v.dtype), k_v, acc, input_precision=INPUT_PRECISION)

    acc_ptrs = acc_ptr + offs_m.to(tl.int64)[:, None] * stride_acc + offs_v[None, :]
    tl.store(acc_ptrs, acc * (1.0 / _CAST_SCALE), mask=mask_m[:, None] & mask_v[None, :])
    # Every D-slice of a row block computes the same G and loss; the first one writes the
    # per-block partial sums, which the host adds in a fixed order (deterministic, no atomics).
    if pid_v == 0:
        tl.store(gsum_ptr + pid_m, tl.sum(g_rowsum, 0))
        if COMPUTE_LOSS:
            tl.store(loss_ptr + pid_m, tl.sum(loss_rowsum, 0))


def siglip_grad(q, k, scale, bias, diag_offset=0, compute_loss=True, *, allow_tf32=None):
    """SigLIP loss sum and gradient products for X = scale·q·kᵀ + bias, without an M×N buffer.

    Args:
        q: (M, D) features; k: (N, D) features (fp32/fp16/bf16, any row stride).
        scale: 0-dim tensor (or number); bias: 0-dim tensor or None (→ 0).
        diag_offset: positives are (i, i + diag_offset); any int, out-of-range positives are
            simply absent.
        compute_loss: when False the loss is not evaluated and ``None`` is returned for it.
        allow_tf32: fp32 products on TF32 tensor cores; None → ``infonce_triton.ALLOW_TF32``.

    Returns:
        (loss_sum, acc, gsum): loss_sum 0-dim fp32 Σ_ij softplus(−z_ij X_ij) (or None),
        acc (M, D) fp32 with acc_i = Σ_j G_ij k_j, gsum 0-dim fp32 Σ_ij G_ij, where
        G_ij = −z_ij·σ(−z_ij X_ij).
    """
    D = q.shape[1]
    q, k = _features(q, k)
    M, D_pad = q.shape
    N = k.shape[0]
    device = q.device
    if M == 0 or N == 0:
        loss = q.new_zeros((), dtype=torch.float32) if compute_loss else None
        return loss, q.new_zeros(M, D, dtype=torch.float32), q.new_zeros((), dtype=torch.float32)
    acc = torch.empty(M, D_pad, dtype=torch.float32, device=device)
    scale = _scalar(scale, device)
    bias_t = scale if bias is None else _scalar(bias, device)
    # Offsets beyond the matrix behave like ±(M + N); clamping keeps them in int32.
    diag_offset = max(-M, min(N, int(diag_offset)))
    cfg = _config("siglip_grad", _family(q.dtype, allow_tf32), D_pad, CONFIGS, INTERPRET_CONFIGS)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D_pad, cfg["BLOCK_DV"]))
    gsum = torch.empty(grid[0], dtype=torch.float32, device=device)
    loss = torch.empty(grid[0], dtype=torch.float32, device=device) if compute_loss else gsum
    with _launch_device(device):
        _siglip_grad_kernel[grid](
            q, k, scale, bias_t, acc, loss, gsum,
            M, N, D_pad, q.stride(0), k.stride(0), acc.stride(0), diag_offset,
            HAS_BIAS=bias is not None, COMPUTE_LOSS=compute_loss, **cfg,
        )
    return (loss.sum() if compute_loss else None), _unpad(acc, D), gsum.sum()


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
        _compile_spec("siglip_grad", _siglip_grad_kernel, signature, CONFIGS, family, aligned,
                      HAS_BIAS=True, COMPUTE_LOSS=True)
        for family in _SPEC_DTYPES
    ]
