"""Triton kernels for the symmetric InfoNCE (CLIP) loss without a B×B logits buffer.

Logits are X_ij = scale·<Q_i, K_j> + bias for Q (M×D) and K (N×D). Two kernels:

* ``infonce_lse(q, k, scale, bias)``: lse_i = log Σ_j exp(X_ij), one program per BLOCK_M rows of
  ``q`` streaming K in BLOCK_N tiles with an online (running max) log-sum-exp. Row LSEs are
  ``infonce_lse(I, T)``, column LSEs ``infonce_lse(T, I)``: the transposed logits are the same
  products with the roles swapped.
* ``infonce_grad(q, k, scale, bias, lse_q, lse_k, w_q, w_k)``: recomputes the logit tiles and
  forms P_ij = w_q_i·exp(X_ij − lse_q_i) + w_k_j·exp(X_ij − lse_k_j) on the fly, returning
  acc_i = Σ_j P_ij K_j (M×D fp32) and psum = Σ_ij P_ij (0-dim fp32). With weights 1/(2B), P
  is ∂loss/∂X of the mean symmetric loss without its diagonal target term, so the caller turns
  acc into dI (and, called with the roles swapped, dT) and psum into d(bias).

Any M, N, D ≥ 1. Features whose width, row stride or address is not a multiple of 16 are first
copied into a zero-padded buffer of width roundup(D, 16) (``mmkernels._triton.aligned_rows``:
it keeps loads vectorized and the kernels free of register spills); the kernels then cover D in masked
BLOCK_D chunks for the logit products. The gradient accumulator of a program is
BLOCK_M × BLOCK_DV fp32 registers; for D above the BLOCK_DV cap the grid gets a second axis over
D-slices of the output and each slice program recomputes the logit tiles (cost:
ceil(D / BLOCK_DV) × the logit GEMM, e.g. 3× at D = 768 with bf16, 6× with fp32).

Precision:

* Products and all softmax arithmetic accumulate in fp32; outputs are fp32.
* fp32 inputs: exact IEEE fp32, or TF32 tensor cores on operands rounded to nearest when the
  caller passes ``tf32=True`` (the package's rule, from torch's float32 matmul precision: see
  ``mmkernels._triton``).
* fp16/bf16 inputs feed ``tl.dot`` directly with fp32 accumulation. As in flash-attention, the
  fp32 probability tile P is cast to the input dtype before the second product P·K. Weights
  like 1/(2B) times small probabilities would land in fp16's subnormal range (< 6e-5) and lose
  their precision, so P is formed with the weights multiplied by 2^14/max|w|: entries are then
  at most ~2^15 (fp16 max 65504) and keep full precision down to ~4e-9 of max|w|. The
  accumulator and psum are scaled back at the end. The power-of-two scaling is exact, so it
  changes nothing for bf16 and fp32.

NaN in any input gives NaN outputs: the running max uses ``tl.PropagateNan.ALL`` (the default
``tl.max`` reduction drops NaN).
"""

import torch
import triton
import triton.language as tl

from .. import _triton
from .._triton import (CAST_SCALE, LN2, LOG2E, cast_for_dot, dot_rows, load_rows, load_scalar,
                       max_propagate_nan, row_block)

# One tile configuration per kernel per precision family (see mmkernels._triton), sized for A100
# (163 KB shared memory per block) and H100 (227 KB) without register spills:
#   "16bit": fp16/bf16 inputs (tensor cores; mma.sync on sm_80, wgmma on sm_90),
#   "tf32":  fp32 inputs on TF32 tensor cores (operands twice as wide: half BLOCK_D),
#   "ieee":  exact fp32; tl.dot becomes FMA loops whose operands live in registers, so tiles
#            are smaller and pipelining shallower.
# BLOCK_D is the D-chunk of the logit products, BLOCK_DV the cap on the D-slice of the gradient
# accumulator held in registers; both shrink to next_pow2(D) for small D.
CONFIGS = {
    "infonce_lse": {
        "16bit": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3),
        "tf32": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=3),
        "ieee": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=2),
    },
    "infonce_grad": {
        "16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=256, num_warps=8, num_stages=3),
        "tf32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=128, num_warps=8, num_stages=3),
        "ieee": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=128, num_warps=8, num_stages=2),
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


@triton.jit
def _infonce_lse_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, lse_ptr,
    M, N, D, stride_q, stride_k,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    offs_m, mask_m, q_rows = row_block(q_ptr, stride_q, M, BLOCK_M)
    # Base 2 throughout: exp2/log2 are the native special-function instructions, so the
    # change of base is folded into scale and bias once.
    scale2 = load_scalar(scale_ptr, True) * LOG2E
    bias2 = load_scalar(bias_ptr, HAS_BIAS) * LOG2E

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_rows = k_ptr + offs_n.to(tl.int64) * stride_k
        s = dot_rows(q_rows, k_rows, mask_m, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D,
                     INPUT_PRECISION)
        x2 = tl.where(mask_n[None, :], s * scale2 + bias2, float("-inf"))
        # Every tile holds at least one valid column, so m_new is finite for finite inputs and
        # exp2(m_i - m_new) is 0 (not NaN) on the first tile.
        tile_max = tl.reduce(x2, 1, max_propagate_nan)
        m_new = tl.maximum(m_i, tile_max, propagate_nan=tl.PropagateNan.ALL)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x2 - m_new[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=mask_m)


@triton.jit
def _infonce_grad_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, lse_q_ptr, lse_k_ptr, w_q_ptr, w_k_ptr, w_max_ptr,
    acc_ptr, psum_ptr,
    M, N, D, stride_q, stride_k, stride_acc,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs_m, mask_m, q_rows = row_block(q_ptr, stride_q, M, BLOCK_M)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_v = offs_v < D
    scale2 = load_scalar(scale_ptr, True) * LOG2E
    bias2 = load_scalar(bias_ptr, HAS_BIAS) * LOG2E

    # Weights are rescaled by CAST_SCALE / max|w| (max|w| host-computed, > 0), so that
    # P ≤ 2·CAST_SCALE survives its cast to fp16 for the second tl.dot with full precision;
    # undone at the end.
    unscale = tl.load(w_max_ptr) / CAST_SCALE
    w_scale = 1.0 / unscale
    lse_q2 = tl.load(lse_q_ptr + offs_m, mask=mask_m, other=0.0) * LOG2E
    w_q = tl.load(w_q_ptr + offs_m, mask=mask_m, other=0.0) * w_scale

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    p_rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_rows = k_ptr + offs_n.to(tl.int64) * stride_k
        s = dot_rows(q_rows, k_rows, mask_m, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D,
                     INPUT_PRECISION)
        # Padding rows/columns get x = -inf, so both exponentials are exactly 0 there (a finite
        # padding logit minus a valid row's LSE could overflow) and nothing leaks into psum;
        # tl.where keeps NaN of valid entries.
        x2 = tl.where(mask_m[:, None] & mask_n[None, :], s * scale2 + bias2, float("-inf"))
        lse_k2 = tl.load(lse_k_ptr + offs_n, mask=mask_n, other=0.0) * LOG2E
        w_k = tl.load(w_k_ptr + offs_n, mask=mask_n, other=0.0) * w_scale
        p = (w_q[:, None] * tl.exp2(x2 - lse_q2[:, None])
             + w_k[None, :] * tl.exp2(x2 - lse_k2[None, :]))
        p_rowsum += tl.sum(p, 1)
        k_v = load_rows(k_rows, offs_v, mask_n, mask_v, INPUT_PRECISION)
        acc = tl.dot(cast_for_dot(p, k_v, INPUT_PRECISION), k_v, acc,
                     input_precision=INPUT_PRECISION)

    acc_ptrs = acc_ptr + offs_m.to(tl.int64)[:, None] * stride_acc + offs_v[None, :]
    tl.store(acc_ptrs, acc * unscale, mask=mask_m[:, None] & mask_v[None, :])
    # All D-slices of a row block see the same P; the first one reports the partial sum, which
    # the host adds up in a fixed order (deterministic, no atomics).
    if pid_v == 0:
        tl.store(psum_ptr + tl.program_id(0), tl.sum(p_rowsum, 0) * unscale)


# ----------------------------------------------------------------------------------------------
# Host side


def features(q, k):
    """Q and K in one dot dtype, 16-aligned (see mmkernels._triton.aligned_rows)."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError("expected q (M×D) and k (N×D) with the same D, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: {q.device} and {k.device}")
    dtype = torch.promote_types(q.dtype, k.dtype)
    if dtype not in _triton.DOT_DTYPES:
        raise TypeError("Triton contrastive kernels take float32/float16/bfloat16 features, "
                        f"got {dtype}")
    width = _triton.padded_width(q.shape[1])
    return _triton.aligned_rows(q.to(dtype), width), _triton.aligned_rows(k.to(dtype), width)


def infonce_lse(q, k, scale, bias, tf32):
    """Row log-sum-exp of X = scale·q·kᵀ + bias without materializing X.

    Args:
        q: (M, D) features, fp32/fp16/bf16; any row stride. k: (N, D) features.
        scale: 0-dim tensor (or number) multiplying the products.
        bias: optional 0-dim tensor added to every logit (None → 0).
        tf32: fp32 products on TF32 tensor cores (operands rounded to nearest), else exact.

    Returns:
        (M,) fp32 tensor lse_i = log Σ_j exp(X_ij).
    """
    q, k = features(q, k)
    M, D = q.shape
    N = k.shape[0]
    lse = torch.empty(M, dtype=torch.float32, device=q.device)
    if M == 0:
        return lse
    if N == 0:
        return lse.fill_(float("-inf"))
    scale = _triton.scalar(scale, q.device)
    bias_t = scale if bias is None else _triton.scalar(bias, q.device)
    cfg = _triton.config(CONFIGS, INTERPRET_CONFIGS, "infonce_lse",
                         _triton.family(q.dtype, tf32), D)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    with _triton.launch_device(q.device):
        _infonce_lse_kernel[grid](
            q, k, scale, bias_t, lse,
            M, N, D, q.stride(0), k.stride(0),
            HAS_BIAS=bias is not None, **cfg,
        )
    return lse


def infonce_grad(q, k, scale, bias, lse_q, lse_k, w_q, w_k, tf32):
    """acc = P·k and psum = ΣP, P_ij = w_q_i·exp(X_ij − lse_q_i) + w_k_j·exp(X_ij − lse_k_j).

    X = scale·q·kᵀ + bias is recomputed tile by tile; no M×N buffer exists.

    Args:
        q: (M, D) features; k: (N, D) features (fp32/fp16/bf16, any row stride).
        scale: 0-dim tensor; bias: 0-dim tensor or None.
        lse_q: (M,) log-sum-exp over each row of X (``infonce_lse(q, k, ...)``).
        lse_k: (N,) log-sum-exp over each column of X (``infonce_lse(k, q, ...)``).
        w_q: (M,) row weights; w_k: (N,) column weights.
        tf32: as in :func:`infonce_lse`.

    Returns:
        (acc, psum): acc (M, D) fp32 with acc_i = Σ_j P_ij k_j, psum 0-dim fp32 = Σ_ij P_ij.
    """
    D = q.shape[1]
    q, k = features(q, k)
    M, D_pad = q.shape
    N = k.shape[0]
    device = q.device
    lse_q = _triton.vector(lse_q, M, device, "lse_q")
    lse_k = _triton.vector(lse_k, N, device, "lse_k")
    w_q = _triton.vector(w_q, M, device, "w_q")
    w_k = _triton.vector(w_k, N, device, "w_k")
    if M == 0 or N == 0:
        return q.new_zeros(M, D, dtype=torch.float32), q.new_zeros((), dtype=torch.float32)
    acc = torch.empty(M, D_pad, dtype=torch.float32, device=device)
    scale = _triton.scalar(scale, device)
    bias_t = scale if bias is None else _triton.scalar(bias, device)
    # max|w| as a device tensor (no sync); all-zero weights fall back to 1 (P is then 0 anyway).
    w_max = torch.maximum(w_q.abs().amax(), w_k.abs().amax())
    w_max = torch.where(w_max > 0, w_max, torch.ones_like(w_max))
    cfg = _triton.config(CONFIGS, INTERPRET_CONFIGS, "infonce_grad",
                         _triton.family(q.dtype, tf32), D_pad)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D_pad, cfg["BLOCK_DV"]))
    partials = torch.empty(grid[0], dtype=torch.float32, device=device)
    with _triton.launch_device(device):
        _infonce_grad_kernel[grid](
            q, k, scale, bias_t, lse_q, lse_k, w_q, w_k, w_max, acc, partials,
            M, N, D_pad, q.stride(0), k.stride(0), acc.stride(0),
            HAS_BIAS=bias is not None, **cfg,
        )
    return _triton.unpad(acc, D), partials.sum()


def compile_specs():
    """The shipped GPU configs of both kernels for every precision family (gpu-report)."""
    lse_signature = {
        "q_ptr": "*features", "k_ptr": "*features", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "M": "i32", "N": "i32", "D": "i32", "stride_q": "i32", "stride_k": "i32",
    }
    grad_signature = {
        "q_ptr": "*features", "k_ptr": "*features", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
        "lse_q_ptr": "*fp32", "lse_k_ptr": "*fp32", "w_q_ptr": "*fp32", "w_k_ptr": "*fp32",
        "w_max_ptr": "*fp32", "acc_ptr": "*fp32", "psum_ptr": "*fp32",
        "M": "i32", "N": "i32", "D": "i32",
        "stride_q": "i32", "stride_k": "i32", "stride_acc": "i32",
    }
    specs = []
    for fam in _triton.SPEC_DTYPES:
        specs.append(_triton.compile_spec(
            "infonce_lse", _infonce_lse_kernel, lse_signature, CONFIGS, fam,
            ["q_ptr", "k_ptr", "lse_ptr", "D", "stride_q", "stride_k"], HAS_BIAS=True))
        specs.append(_triton.compile_spec(
            "infonce_grad", _infonce_grad_kernel, grad_signature, CONFIGS, fam,
            ["q_ptr", "k_ptr", "lse_q_ptr", "lse_k_ptr", "w_q_ptr", "w_k_ptr", "acc_ptr", "D",
             "stride_q", "stride_k", "stride_acc"], HAS_BIAS=True))
    return specs


_triton.register_specs(compile_specs)
