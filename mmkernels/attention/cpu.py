"""The C++ attention ops (``csrc/attention``) as seen from Python: the ``cpu`` backend.

``mmkernels._C`` registers two CPU kernels in the ``mmkernels`` namespace (schemas in
``csrc/attention/forward.cpp`` and ``backward.cpp``):

  attention_cpu_fwd(q, k, v, key_padding_mask?, cu_seqlens_q?, cu_seqlens_k?, causal, scale,
                    dropout_p, seed?) -> out, lse
  attention_cpu_bwd(grad_out, q, k, v, out, lse, key_padding_mask?, cu_seqlens_q?,
                    cu_seqlens_k?, causal, scale, dropout_p, seed?) -> dq, dk, dv

with the semantics of ``mmkernels.attention.reference``: out in q's dtype, lse (B, H, Lq)
dense / (H, Tq) varlen in float64 for float64 inputs, float32 otherwise; dq, dk, dv
contiguous in the shapes and dtypes of q, k, v. Neither op is differentiable by itself.

This module registers their fake (meta) implementations, so that torch.compile and
torch.library.opcheck can trace them (the C++ side names this module with
``m.set_python_module``), and exposes ``forward`` / ``backward`` with the signatures every
attention backend shares. Both need the extension: without it, importing this module does
nothing and they must not be called.
"""
from __future__ import annotations

import torch

from .. import _cpp
from .._validate import compute_dtype
from .reference import output_shapes


def _fwd_fake(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p,
              seed):
    varlen = cu_seqlens_q is not None
    torch._check(q.dim() == (3 if varlen else 4),
                 lambda: f"q must be {'3' if varlen else '4'}-D, got shape {tuple(q.shape)}")
    torch._check(k.dim() == q.dim() and v.dim() == q.dim(),
                 lambda: f"q, k and v must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    out_shape, lse_shape = output_shapes(q, v, varlen)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=compute_dtype(q.dtype))


def _bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal,
              scale, dropout_p, seed):
    torch._check(grad_out.shape == out.shape,
                 lambda: f"grad_out and out must have the same shape, got "
                         f"{tuple(grad_out.shape)} and {tuple(out.shape)}")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


FAKES = {"mmkernels::attention_cpu_fwd": _fwd_fake, "mmkernels::attention_cpu_bwd": _bwd_fake}


def register_fakes() -> bool:
    """Register this module's fakes (see ``_cpp.register_fakes``)."""
    return _cpp.register_fakes(FAKES)


register_fakes()


def forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal: bool, scale: float, dropout_p: float, seed, tf32: bool):
    """(out, lse); max_seqlen_* and tf32 are not needed on CPU (no grid, fp32 math)."""
    return torch.ops.mmkernels.attention_cpu_fwd(q, k, v, key_padding_mask, cu_seqlens_q,
                                                 cu_seqlens_k, causal, scale, dropout_p, seed)


def backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
             max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed, tf32):
    """(dq, dk, dv) for ``forward``'s (out, lse) with the same arguments."""
    return torch.ops.mmkernels.attention_cpu_bwd(grad_out, q, k, v, out, lse, key_padding_mask,
                                                 cu_seqlens_q, cu_seqlens_k, causal, scale,
                                                 dropout_p, seed)
