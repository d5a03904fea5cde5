"""Fused cross-attention: text queries over image keys/values, padded or packed.

    out = softmax(scale·Q·Kᵀ + mask) · V        (per batch/sequence and head)

Layers: argument checks → the custom ops ``mmkernels::attention_fwd`` / ``attention_bwd``
(one per direction, any backend) with their autograd → the functionals ``cross_attention``
(SDPA's (B, H, L, D) layout) and ``cross_attention_varlen`` (packed, flash_attn_varlen_func's
(T, H, D) layout) → the modules in ``mmkernels.nn.attention``.

The semantics every backend shares (masking, causal alignment, empty rows, the dropout mask)
are written out in ``reference.py``. The forward saves q, k, v, out and an fp32 log-sum-exp per
query row — never the Lq×Lk probabilities; the dropout mask is regenerated from its seed.
Double backward (``create_graph=True``) differentiates the reference formula.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _validate
from .._autograd import double_backward
from .._dispatch import TRITON_DTYPES, Impl
from .._rng import draw_seed
from . import reference

OP = "cross_attention"
OP_VARLEN = "cross_attention_varlen"
DISPATCH = _dispatch.Op(OP, (Impl("reference"), Impl("cpu"), Impl("triton", TRITON_DTYPES)))
DISPATCH_VARLEN = _dispatch.Op(OP_VARLEN, DISPATCH.impls)
MAX_HEAD_DIM = 256
# Dropout row ids (the query row's index in lse) are drawn as uint32 by the kernels.
_MAX_ROWS = 2**31


def _kernels(backend: str):
    return _dispatch.kernel_module(__package__, backend, "attention_triton")


# ---------------------------------------------------------------------------------------
# Custom ops: one kernel call per direction, opaque to torch.compile.
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("mmkernels::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
                  dropout_p: float, seed: Optional[Tensor],
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, tf32): out contiguous in q's dtype, lse in the compute dtype, and whether the
    fp32 products ran on TF32 (a 0-dim bool CPU tensor the backward must follow)."""
    tf32 = _dispatch.uses_tf32(backend, q.dtype)
    out, lse = _kernels(backend).forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                                         seed, tf32)
    return out, lse, torch.tensor(tf32)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      scale, dropout_p, seed, backend):
    out_shape, lse_shape = reference.output_shapes(q, v, cu_seqlens_q is not None)
    # new_empty: the kernels' outputs are contiguous whatever the inputs' strides.
    return (q.new_empty(out_shape), q.new_empty(lse_shape, dtype=_validate.compute_dtype(q.dtype)),
            torch.empty((), dtype=torch.bool))


@torch.library.custom_op("mmkernels::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                  causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor],
                  backend: str, tf32: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    return _kernels(backend).backward(grad_out, q, k, v, out, lse, key_padding_mask,
                                      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      causal, scale, dropout_p, seed, bool(tf32))


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, causal, scale, dropout_p, seed, backend, tf32):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_NON_TENSOR = ("key_padding_mask", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
               "max_seqlen_k", "causal", "scale", "dropout_p", "seed", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, backend = inputs
    out, lse, tf32 = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed, tf32)
    ctx.args = (max_q, max_k, causal, scale, dropout_p, backend)
    ctx.set_materialize_grads(False)  # lse and the tf32 flag are never differentiated


def _autograd_backward(ctx, grad_out, *_unused):
    nones = (None,) * len(_NON_TENSOR)
    if grad_out is None:
        return (None, None, None) + nones
    q, k, v, out, lse, mask, cu_q, cu_k, seed, tf32 = ctx.saved_tensors
    max_q, max_k, causal, scale, dropout_p, backend = ctx.args
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the reference formula (same mask, same dropout).
        seed_int = 0 if seed is None else int(seed)

        def fn(q, k, v):
            return reference.forward(q, k, v, mask, cu_q, cu_k, causal, scale, dropout_p,
                                     seed_int)[0]
        grads = double_backward(fn, grad_out, (q, k, v))
    else:
        grads = attention_bwd(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k,
                              causal, scale, dropout_p, seed, backend, tf32)
    return tuple(grads) + nones


attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _qkv(op, q, k, v, varlen: bool):
    """Checks q, k, v (dense (B, H, L, D) or packed (T, H, D)); returns H, Hk, Dqk, Dv."""
    if varlen:
        names = ("(Tq, H, Dqk)", "(Tk, Hk, Dqk)", "(Tk, Hk, Dv)")
    else:
        names = ("(B, H, Lq, Dqk)", "(B, Hk, Lk, Dqk)", "(B, Hk, Lk, Dv)")
    dim = 3 if varlen else 4
    for name, x, shape in zip("qkv", (q, k, v), names):
        _validate.floating_tensor(op, name, x, shape, dim)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: q, k and v must have the same dtype, got "
                        f"{', '.join(_validate.dtype_name(x.dtype) for x in (q, k, v))}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{op}: q, k and v must be on the same device, got "
                         f"{q.device}, {k.device}, {v.device}")
    if not varlen and not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"{op}: q, k and v must have the same batch size B, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    shared = slice(0, 2) if varlen else slice(1, 3)  # (Tk, Hk) or (Hk, Lk)
    if k.shape[shared] != v.shape[shared]:
        raise ValueError(f"{op}: k {names[1]} and v {names[2]} must agree on all but the last "
                         f"dim, got shapes {tuple(k.shape)} and {tuple(v.shape)}")
    h_dim = -2 if varlen else -3
    H, Hk = q.shape[h_dim], k.shape[h_dim]
    if H < 1 or Hk < 1 or H % Hk:
        raise ValueError(f"{op}: the key/value heads Hk must divide the query heads H "
                         f"(grouped-query attention), got H={H}, Hk={Hk}")
    Dqk, Dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != Dqk:
        raise ValueError(f"{op}: q and k must have the same head dim Dqk, got {Dqk} and "
                         f"{k.shape[-1]}")
    for name, d in (("Dqk", Dqk), ("Dv", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dim {name} must be in [1, {MAX_HEAD_DIM}], got {d}")
    return H, Hk, Dqk, Dv


def _options(op, causal, scale, dropout_p, dqk):
    """causal (bool), scale (float), dropout_p (float) checked; scale defaults to 1/√Dqk."""
    numpy_bool = type(causal).__module__ == "numpy" and type(causal).__name__ in ("bool", "bool_")
    if not isinstance(causal, bool) and not numpy_bool:
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(dqk)
    elif not _validate.is_number(scale) or not math.isfinite(float(scale)):
        raise TypeError(f"{op}: scale must be None or a finite real number, got {scale!r}")
    if not _validate.is_number(dropout_p):
        raise TypeError(f"{op}: dropout_p must be a real number in [0, 1), got "
                        f"{type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    return bool(causal), float(scale), float(dropout_p)


def _cu_seqlens(op, name, cu, total: int, device) -> list[int]:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{op}: {name} must be an int32 torch.Tensor of shape (N + 1,), got "
                        f"{type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32 (as flash_attn_varlen_func), got "
                        f"{_validate.dtype_name(cu.dtype)}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{op}: {name} must have shape (N + 1,) with N >= 0, got "
                         f"{tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: {name} must be on the inputs' device {device}, got {cu.device}")
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{op}: {name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{op}: {name} must be nondecreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{op}: {name} must end at the packed length {total}, got "
                         f"{values[-1]}")
    return values


def _max_seqlen(op, name, given, values) -> int:
    actual = max((b - a for a, b in zip(values, values[1:])), default=0)
    if given is None:
        return actual
    if not isinstance(given, int) or isinstance(given, bool):
        raise TypeError(f"{op}: {name} must be None or an int, got {type(given).__name__}")
    if given < actual:
        raise ValueError(f"{op}: {name}={given} is shorter than the longest sequence ({actual})")
    return given


# ---------------------------------------------------------------------------------------
# Functionals
# ---------------------------------------------------------------------------------------

def _run(name, q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p):
    seed = draw_seed(dropout_p, q.device)
    if name == "reference":
        return reference.forward(q, k, v, mask, cu_q, cu_k, causal, scale, dropout_p,
                                 0 if seed is None else int(seed))[0]
    return attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed,
                         name)[0]


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                    causal: bool = False, scale=None, dropout_p: float = 0.0,
                    backend: str = "auto") -> Tensor:
    """Multi-head attention of q over k, v without materializing the probabilities.

    q (B, H, Lq, Dqk), k (B, Hk, Lk, Dqk), v (B, Hk, Lk, Dv) → (B, H, Lq, Dv) in q's dtype
    (SDPA's layout; any strides). Hk must divide H: query head h reads K/V head h // (H/Hk)
    (SDPA's ``enable_gqa``). Dqk may differ from Dv; head dims 1..256.

    ``key_padding_mask`` (B, Lk) bool: **True = ignore that key** (nn.MultiheadAttention's
    polarity — the opposite of SDPA's boolean ``attn_mask``, where True = attend). A query row
    that sees no key returns zeros and gets zero gradients (SDPA and nn.MultiheadAttention
    give NaN there). ``causal``: query i sees keys j <= i + Lk − Lq (bottom-right aligned, as
    FlashAttention >= 2.1). ``scale`` defaults to 1/√Dqk. ``dropout_p`` drops attention
    probabilities (always, like SDPA: pass 0 in eval) with a counter-based mask seeded from
    torch's generator, so ``torch.manual_seed`` repeats a run.
    """
    H, Hk, Dqk, Dv = _qkv(OP, q, k, v, varlen=False)
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{OP}: key_padding_mask must be a bool tensor of shape (B, Lk) "
                            f"(True = ignore the key), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"{OP}: key_padding_mask must have shape (B, Lk) = {(B, Lk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{OP}: key_padding_mask must be on q's device {q.device}, got "
                             f"{key_padding_mask.device}")
    causal, scale, dropout_p = _options(OP, causal, scale, dropout_p, Dqk)
    if B * H * Lq >= _MAX_ROWS:
        raise ValueError(f"{OP}: B·H·Lq must be below 2³¹, got {B * H * Lq}")
    name = DISPATCH.select(backend, {"q": q, "k": k, "v": v})
    if q.numel() == 0 or Lk == 0 or v.shape[-1] == 0:
        name = "reference"  # nothing to compute: the reference handles empty shapes
    return _run(name, q, k, v, key_padding_mask, None, None, Lq, Lk, causal, scale, dropout_p)


def cross_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, *, max_seqlen_q: Optional[int] = None,
                           max_seqlen_k: Optional[int] = None, causal: bool = False, scale=None,
                           dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Attention over packed sequences (flash_attn_varlen_func / xformers
    ``BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen)`` semantics): q (Tq, H, Dqk),
    k (Tk, Hk, Dqk), v (Tk, Hk, Dv) → (Tq, H, Dv). Sequence i owns query rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1] and attends only to key rows
    cu_seqlens_k[i]:cu_seqlens_k[i+1]; cu_seqlens are int32 (N+1,), start at 0, never decrease
    and end at Tq / Tk. A sequence with no keys gives zeros; one with no queries is fine. No
    work is spent on padding. ``max_seqlen_q/k`` (the longest sequence) are computed from
    cu_seqlens when not given, and checked when given. Other arguments as ``cross_attention``.
    """
    H, Hk, Dqk, Dv = _qkv(OP_VARLEN, q, k, v, varlen=True)
    cq = _cu_seqlens(OP_VARLEN, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _cu_seqlens(OP_VARLEN, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(cq) != len(ck):
        raise ValueError(f"{OP_VARLEN}: cu_seqlens_q and cu_seqlens_k must describe the same "
                         f"number of sequences, got {len(cq) - 1} and {len(ck) - 1}")
    max_q = _max_seqlen(OP_VARLEN, "max_seqlen_q", max_seqlen_q, cq)
    max_k = _max_seqlen(OP_VARLEN, "max_seqlen_k", max_seqlen_k, ck)
    causal, scale, dropout_p = _options(OP_VARLEN, causal, scale, dropout_p, Dqk)
    if H * q.shape[0] >= _MAX_ROWS:
        raise ValueError(f"{OP_VARLEN}: H·Tq must be below 2³¹, got {H * q.shape[0]}")
    name = DISPATCH_VARLEN.select(backend, {"q": q, "k": k, "v": v})
    if q.numel() == 0 or k.shape[0] == 0:
        name = "reference"
    return _run(name, q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale,
                dropout_p)
