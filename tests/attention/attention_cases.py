"""Inputs and the float64 oracle for the attention tests (every backend, every layer).

``dense(...)`` / ``varlen(...)`` build random inputs (never zeros); ``oracle(...)`` runs
mmkernels.attention.reference in float64 and returns out, lse and the gradients of
Σ grad_out·out — random output weights, so a wrong gradient cannot hide in a symmetric sum.
"""
from __future__ import annotations

import itertools
import math

import torch

from mmkernels.attention import reference

# (B, H, Hk, Lq, Lk, Dqk, Dv): odd sizes, Lq = 1, Lk = 1, grouped heads, Dqk != Dv.
DENSE_SHAPES = [
    (2, 1, 1, 1, 7, 16, 16),
    (1, 8, 8, 7, 1, 8, 8),
    (2, 8, 2, 7, 127, 40, 72),
    (1, 8, 1, 127, 33, 64, 32),
    (1, 2, 2, 33, 257, 24, 24),
]
# Smaller for the Triton interpreter (slow on large grids).
DENSE_SHAPES_INTERPRETER = [
    (2, 1, 1, 1, 7, 16, 16),
    (1, 4, 4, 7, 1, 8, 8),
    (2, 4, 2, 7, 37, 40, 24),
    (1, 4, 1, 33, 19, 16, 32),
]
# (query lengths, key lengths) per packed batch: empty sequences on either side.
VARLEN_CASES = [
    ([3, 0, 17, 1], [5, 9, 0, 33]),
    ([1], [1]),
    ([40, 2], [7, 70]),
]


def _rand(shape, dtype, device, layout, scale=1.0):
    """Random normal values; "transposed" gives q/k/v as (B, H, L, D) views of (B, L, H, D)
    memory (the layout of a projection's output), "strided" every other element of the last
    dim."""
    if layout == "transposed" and len(shape) == 4:
        b, h, l, d = shape
        return (torch.randn(b, l, h, d, device=device) * scale).to(dtype).transpose(1, 2)
    if layout == "strided":
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], device=device) * scale).to(dtype)
        return wide[..., ::2]
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def key_padding(B, Lk, kind, device="cpu"):
    """(B, Lk) bool, True = ignore: "suffix" pads each sample at the end to a random length in
    [1, Lk]; "random" drops keys at random; "dead" makes the first sample all padding."""
    if kind is None or kind == "none":
        return None
    j = torch.arange(Lk, device=device)
    if kind == "suffix":
        lengths = torch.randint(1, Lk + 1, (B, 1), device=device)
        return j[None] >= lengths
    if kind == "random":
        return torch.rand(B, Lk, device=device) < 0.4
    if kind == "dead":
        mask = torch.rand(B, Lk, device=device) < 0.3
        mask[0] = True
        return mask
    raise ValueError(kind)


def dense(B, H, Hk, Lq, Lk, Dqk, Dv, dtype=torch.float32, device="cpu", layout="contiguous",
          mask=None, scale=1.0, requires_grad=True):
    q = _rand((B, H, Lq, Dqk), dtype, device, layout, scale)
    k = _rand((B, Hk, Lk, Dqk), dtype, device, layout, scale)
    v = _rand((B, Hk, Lk, Dv), dtype, device, layout)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, key_padding(B, Lk, mask, device)


def cu_seqlens(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def varlen(lens_q, lens_k, H, Hk, Dqk, Dv, dtype=torch.float32, device="cpu",
           layout="contiguous", requires_grad=True):
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = _rand((Tq, H, Dqk), dtype, device, layout)
    k = _rand((Tk, Hk, Dqk), dtype, device, layout)
    v = _rand((Tk, Hk, Dv), dtype, device, layout)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def default_scale(q):
    return 1.0 / math.sqrt(q.shape[-1])


def oracle(q, k, v, grad_out=None, *, key_padding_mask=None, cu_seqlens_q=None,
           cu_seqlens_k=None, causal=False, scale=None, dropout_p=0.0, seed=0):
    """float64 reference: (out, lse, (dq, dk, dv)); the gradients are of Σ grad_out·out
    (zeros where an input does not reach the output)."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    scale = default_scale(q) if scale is None else scale
    out, lse = reference.forward(q64, k64, v64, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                 causal, scale, dropout_p, seed)
    if grad_out is None:
        return out.detach(), lse, None
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double(), allow_unused=True)
    grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip((q64, k64, v64),
                                                                         grads))
    return out.detach(), lse, grads
