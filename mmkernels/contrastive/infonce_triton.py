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
copied into a zero-padded buffer of width roundup(D, 16) (see ``_features``: it keeps loads
vectorized and the kernels free of register spills); the kernels then cover D in masked
BLOCK_D chunks for the logit products. The gradient accumulator of a program is
BLOCK_M × BLOCK_DV fp32 registers; for D above the BLOCK_DV cap the grid gets a second axis over
D-slices of the output and each slice program recomputes the logit tiles (cost:
ceil(D / BLOCK_DV) × the logit GEMM, e.g. 3× at D = 768 with bf16, 6× with fp32).

Precision:

* Products and all softmax arithmetic accumulate in fp32; outputs are fp32.
* fp32 inputs: ``tl.dot`` runs with ``input_precision="tf32"`` (TF32 tensor cores, Triton's own
  default) when ``allow_tf32`` is true, else ``"ieee"`` (exact fp32 FMA). The module default is
  :data:`ALLOW_TF32`; every wrapper takes an ``allow_tf32`` override. The Triton interpreter
  (CPU) always computes in IEEE fp32.
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

import contextlib
import os

import torch
import triton
import triton.language as tl

#: Default for fp32 inputs: True runs ``tl.dot`` on TF32 tensor cores (10-bit mantissa operands,
#: fp32 accumulation), False uses exact fp32 (``input_precision="ieee"``).
ALLOW_TF32 = True

# Triton decides interpreter vs. compiled mode from this variable when the kernels are decorated,
# so block sizes follow the same switch (INTERPRET_CONFIGS below).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# One tile configuration per kernel per precision family, sized for A100 (163 KB shared memory
# per block) and H100 (227 KB) without register spills:
#   "16bit": fp16/bf16 inputs (tensor cores; mma.sync on sm_80, wgmma on sm_90),
#   "tf32":  fp32 inputs with allow_tf32 (tensor cores, operands twice as wide: half BLOCK_D),
#   "ieee":  fp32 inputs without TF32; tl.dot becomes FMA loops whose operands live in
#            registers, so tiles are smaller and pipelining shallower.
# BLOCK_D is the D-chunk of the logit products, BLOCK_DV the cap on the D-slice of the gradient
# accumulator held in registers; both shrink to next_pow2(D) for small D (D is already padded to
# a multiple of 16, the smallest tl.dot size).
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

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Power-of-two factor applied to the P/G tile before its cast to the input dtype for the second
# tl.dot (exact, undone on the accumulator): moves tile entries ≤ 2 out of fp16's subnormal range.
_CAST_SCALE = tl.constexpr(16384.0)


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _qk_tile(q_rows, k_rows, mask_m, mask_n, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """S = Q_blk·K_blkᵀ (BLOCK_M × BLOCK_N, fp32) for row base pointers ``q_rows``/``k_rows``.

    Loops over D in BLOCK_D chunks; out-of-range rows and the D tail load as 0 so they add
    nothing to the products.
    """
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        q = tl.load(q_rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0)
        k = tl.load(k_rows[:, None] + cols[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), s, input_precision=INPUT_PRECISION)
    return s


@triton.jit
def _load_scale_bias_log2(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """scale·log2(e) and bias·log2(e): the kernels work in base 2 because exp2/log2 are the
    native special-function instructions, so the change of base is folded in once here."""
    scale2 = tl.load(scale_ptr).to(tl.float32) * _LOG2E
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr).to(tl.float32) * _LOG2E
    else:
        bias2 = 0.0
    return scale2, bias2


@triton.jit
def _infonce_lse_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, lse_ptr,
    M, N, D, stride_q, stride_k,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # int64 row offsets: M·D can exceed 2^31 elements at large batch × width.
    q_rows = q_ptr + offs_m.to(tl.int64) * stride_q
    scale2, bias2 = _load_scale_bias_log2(scale_ptr, bias_ptr, HAS_BIAS)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_rows = k_ptr + offs_n.to(tl.int64) * stride_k
        s = _qk_tile(q_rows, k_rows, mask_m, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        x2 = tl.where(mask_n[None, :], s * scale2 + bias2, float("-inf"))
        # Every tile holds at least one valid column, so m_new is finite for finite inputs and
        # exp2(m_i - m_new) is 0 (not NaN) on the first tile.
        tile_max = tl.reduce(x2, 1, _max_propagate_nan)
        m_new = tl.maximum(m_i, tile_max, propagate_nan=tl.PropagateNan.ALL)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x2 - m_new[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=mask_m)


@triton.jit
def _infonce_grad_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, lse_q_ptr, lse_k_ptr, w_q_ptr, w_k_ptr, w_max_ptr,
    acc_ptr, psum_ptr,
    M, N, D, stride_q, stride_k, stride_acc,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_v = offs_v < D
    q_rows = q_ptr + offs_m.to(tl.int64) * stride_q
    scale2, bias2 = _load_scale_bias_log2(scale_ptr, bias_ptr, HAS_BIAS)

    # Weights are rescaled by _CAST_SCALE / max|w| (max|w| host-computed, > 0), so that
    # P ≤ 2·_CAST_SCALE survives its cast to fp16 for the second tl.dot with full precision;
    # undone at the end.
    unscale = tl.load(w_max_ptr) / _CAST_SCALE
    w_scale = 1.0 / unscale
    lse_q2 = tl.load(lse_q_ptr + offs_m, mask=mask_m, other=0.0) * _LOG2E
    w_q = tl.load(w_q_ptr + offs_m, mask=mask_m, other=0.0) * w_scale

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    p_rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_rows = k_ptr + offs_n.to(tl.int64) * stride_k
        s = _qk_tile(q_rows, k_rows, mask_m, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        # Padding rows/columns get x = -inf, so both exponentials are exactly 0 there (a finite
        # padding logit minus a valid row's LSE could overflow) and nothing leaks into psum;
        # tl.where keeps NaN of valid entries.
        x2 = tl.where(mask_m[:, None] & mask_n[None, :], s * scale2 + bias2, float("-inf"))
        lse_k2 = tl.load(lse_k_ptr + offs_n, mask=mask_n, other=0.0) * _LOG2E
        w_k = tl.load(w_k_ptr + offs_n, mask=mask_n, other=0.0) * w_scale
        p = (w_q[:, None] * tl.exp2(x2 - lse_q2[:, None])
             + w_k[None, :] * tl.exp2(x2 - lse_k2[None, :]))
        p_rowsum += tl.sum(p, 1)
        k_v = tl.load(k_rows[:, None] + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :],
                      other=0.0)
        acc = tl.dot(p.to(k_v.dtype), k_v, acc, input_precision=INPUT_PRECISION)

    acc_ptrs = acc_ptr + offs_m.to(tl.int64)[:, None] * stride_acc + offs_v[None, :]
    tl.store(acc_ptrs, acc * unscale, mask=mask_m[:, None] & mask_v[None, :])
    # All D-slices of a row block see the same P; the first one reports the partial sum, which
    # the host adds up in a fixed order (deterministic, no atomics).
    if pid_v == 0:
        tl.store(psum_ptr + pid_m, tl.sum(p_rowsum, 0) * unscale)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _features(q, k):
    """Validate Q/K and bring them to one dot dtype in the layout the kernels compile best for.

    Triton specializes each launch on whether pointers, row strides and D are multiples of 16;
    without that, loads cannot be vectorized (no cp.async) and the gradient kernels spill
    registers. Rows that already qualify are used in place (row slices of a larger buffer need
    no copy); otherwise they are copied into a zero-padded buffer of width roundup(D, 16), an
    O((M+N)·D) copy next to O(M·N·D) kernel work. The zero columns add nothing to the products
    and their accumulator columns are dropped by the caller.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError("expected q (M×D) and k (N×D) with the same D, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: {q.device} and {k.device}")
    dtype = torch.promote_types(q.dtype, k.dtype)
    if dtype not in _DOT_DTYPES:
        raise TypeError("Triton contrastive kernels take float32/float16/bfloat16 features, "
                        f"got {dtype}")
    width = triton.cdiv(q.shape[1], 16) * 16
    return _aligned_rows(q.to(dtype), width), _aligned_rows(k.to(dtype), width)


def _aligned_rows(x, width):
    aligned = x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0
    if x.shape[1] == width and x.stride(1) == 1 and aligned:
        return x
    out = x.new_zeros(x.shape[0], width)
    out[:, : x.shape[1]] = x
    return out


def _scalar(value, device):
    """A 0-dim fp32 tensor on ``device`` for the kernels to read through a pointer (no .item():
    that would synchronize the GPU)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())


def _vector(value, n, device, name):
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(value.shape)}")
    return value.contiguous()


def _launch_device(device):
    """Make ``device`` current for the launch: Triton launches on the current CUDA device and
    stream, which need not be the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _family(dtype, allow_tf32):
    """Precision family of CONFIGS: "16bit", "tf32" or "ieee"."""
    if dtype != torch.float32:
        return "16bit"
    if allow_tf32 is None:
        allow_tf32 = ALLOW_TF32
    return "tf32" if allow_tf32 else "ieee"


def _input_precision(family):
    # tl.dot's input_precision only changes fp32 products; 16-bit operands use the tensor cores.
    return "tf32" if family == "tf32" else "ieee"


def _config(kernel, family, D, configs=CONFIGS, interpret_configs=INTERPRET_CONFIGS):
    """Launch config (block sizes, warps, stages, INPUT_PRECISION) for ``kernel``."""
    cfg = dict(interpret_configs[kernel] if _INTERPRET else configs[kernel][family])
    d_pow2 = max(16, triton.next_power_of_2(D))
    for key in ("BLOCK_D", "BLOCK_DV"):
        if key in cfg:
            cfg[key] = min(cfg[key], d_pow2)
    cfg["INPUT_PRECISION"] = _input_precision(family)
    return cfg


def infonce_lse(q, k, scale, bias=None, *, allow_tf32=None):
    """Row log-sum-exp of X = scale·q·kᵀ + bias without materializing X.

    Args:
        q: (M, D) features, fp32/fp16/bf16; any row stride.
        k: (N, D) features.
        scale: 0-dim tensor (or number) multiplying the products.
        bias: optional 0-dim tensor added to every logit (None → 0).
        allow_tf32: fp32 products on TF32 tensor cores; None → :data:`ALLOW_TF32`.

    Returns:
        (M,) fp32 tensor lse_i = log Σ_j exp(X_ij).
    """
    q, k = _features(q, k)
    M, D = q.shape
    N = k.shape[0]
    lse = torch.empty(M, dtype=torch.float32, device=q.device)
    if M == 0:
        return lse
    if N == 0:
        return lse.fill_(float("-inf"))
    scale = _scalar(scale, q.device)
    bias_t = scale if bias is None else _scalar(bias, q.device)
    cfg = _config("infonce_lse", _family(q.dtype, allow_tf32), D)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    with _launch_device(q.device):
        _infonce_lse_kernel[grid](
            q, k, scale, bias_t, lse,
            M, N, D, q.stride(0), k.stride(0),
            HAS_BIAS=bias is not None, **cfg,
        )
    return lse


def infonce_grad(q, k, scale, bias, lse_q, lse_k, w_q, w_k, *, allow_tf32=None):
    """acc = P·k and psum = ΣP, P_ij = w_q_i·exp(X_ij − lse_q_i) + w_k_j·exp(X_ij − lse_k_j).

    X = scale·q·kᵀ + bias is recomputed tile by tile; no M×N buffer exists.

    Args:
        q: (M, D) features; k: (N, D) features (fp32/fp16/bf16, any row stride).
        scale: 0-dim tensor; bias: 0-dim tensor or None.
        lse_q: (M,) log-sum-exp over each row of X (``infonce_lse(q, k, ...)``).
        lse_k: (N,) log-sum-exp over each column of X (``infonce_lse(k, q, ...)``).
        w_q: (M,) row weights; w_k: (N,) column weights.
        allow_tf32: fp32 products on TF32 tensor cores; None → :data:`ALLOW_TF32`.

    Returns:
        (acc, psum): acc (M, D) fp32 with acc_i = Σ_j P_ij k_j, psum 0-dim fp32 = Σ_ij P_ij.
    """
    D = q.shape[1]
    q, k = _features(q, k)
    M, D_pad = q.shape
    N = k.shape[0]
    device = q.device
    lse_q = _vector(lse_q, M, device, "lse_q")
    lse_k = _vector(lse_k, N, device, "lse_k")
    w_q = _vector(w_q, M, device, "w_q")
    w_k = _vector(w_k, N, device, "w_k")
    if M == 0 or N == 0:
        return q.new_zeros(M, D, dtype=torch.float32), q.new_zeros((), dtype=torch.float32)
    acc = torch.empty(M, D_pad, dtype=torch.float32, device=device)
    scale = _scalar(scale, device)
    bias_t = scale if bias is None else _scalar(bias, device)
    # max|w| as a device tensor (no sync); all-zero weights fall back to 1 (P is then 0 anyway).
    w_max = torch.maximum(w_q.abs().amax(), w_k.abs().amax())
    w_max = torch.where(w_max > 0, w_max, torch.ones_like(w_max))
    cfg = _config("infonce_grad", _family(q.dtype, allow_tf32), D_pad)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D_pad, cfg["BLOCK_DV"]))
    partials = torch.empty(grid[0], dtype=torch.float32, device=device)
    with _launch_device(device):
        _infonce_grad_kernel[grid](
            q, k, scale, bias_t, lse_q, lse_k, w_q, w_k, w_max, acc, partials,
            M, N, D_pad, q.stride(0), k.stride(0), acc.stride(0),
            HAS_BIAS=bias is not None, **cfg,
        )
    return _unpad(acc, D), partials.sum()


def _unpad(acc, D):
    """Drop the accumulator columns of zero padding (see :func:`_features`)."""
    return acc if acc.shape[1] == D else acc[:, :D].contiguous()


# ----------------------------------------------------------------------------------------------
# GPU compile report
# ----------------------------------------------------------------------------------------------

# Each family is compiled with the dtype it serves (bf16 stands for both 16-bit types).
_SPEC_DTYPES = {"16bit": "bf16", "tf32": "fp32", "ieee": "fp32"}


def _compile_spec(kernel, fn, signature, configs, family, aligned, **constexprs):
    """One compile_specs() entry: the shipped config of ``kernel`` for ``family`` at full block
    sizes (large D), with ``attrs`` marking the ``aligned`` arguments 16-divisible, as the JIT
    specializes them at runtime (``_features`` guarantees it for features, strides and D)."""
    cfg = configs[kernel][family]
    t = _SPEC_DTYPES[family]
    constexprs = dict(constexprs, INPUT_PRECISION=_input_precision(family),
                      **{key: value for key, value in cfg.items() if key.startswith("BLOCK_")})
    signature = {name: f"*{t}" if ty == "*features" else ty for name, ty in signature.items()}
    return dict(
        name=f"{kernel}[{t}]" if family == "16bit" else f"{kernel}[fp32,{family}]",
        fn=fn,
        signature={**signature, **{name: "constexpr" for name in constexprs}},
        constexprs=constexprs,
        attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def compile_specs():
    """Specs for compiling every shipped GPU config ahead of time (no GPU needed): one per
    kernel × precision family (bf16, fp32 with TF32, fp32 IEEE). Each dict has ``name``, ``fn``,
    ``signature``, ``constexprs``, ``num_warps``, ``num_stages`` and ``attrs`` (divisibility
    hints for ``ASTSource(..., attrs=...)``; without them the compile models unaligned tensors,
    which the wrappers never launch with)."""
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
    for family in _SPEC_DTYPES:
        specs.append(_compile_spec(
            "infonce_lse", _infonce_lse_kernel, lse_signature, CONFIGS, family,
            ["q_ptr", "k_ptr", "lse_ptr", "D", "stride_q", "stride_k"], HAS_BIAS=True))
        specs.append(_compile_spec(
            "infonce_grad", _infonce_grad_kernel, grad_signature, CONFIGS, family,
            ["q_ptr", "k_ptr", "lse_q_ptr", "lse_k_ptr", "w_q_ptr", "w_k_ptr", "acc_ptr", "D",
             "stride_q", "stride_k", "stride_acc"], HAS_BIAS=True))
    return specs
