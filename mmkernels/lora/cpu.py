"""The C++ LoRA ops (``csrc/lora``) as seen from Python: the ``cpu`` backend.

``mmkernels._C`` registers two CPU kernels in the ``mmkernels`` namespace (schemas in
``csrc/lora/forward.cpp`` and ``backward.cpp``):

  lora_cpu_fwd(x, weight, bias?, lora_A, lora_B, scaling, adapter_ids?, dropout_p, seed?)
      -> y, u
  lora_cpu_bwd(grad_y, x, weight, lora_A, lora_B, scaling, adapter_ids?, u, dropout_p, seed?,
               need_dx, need_dW, need_db, need_dA, need_dB) -> dx, dW, db, dA, dB

with the semantics of ``mmkernels.lora.reference``: x (T, in) with any row stride, weight
(out, in), lora_A (N, r, in), lora_B (N, out, r), scaling (N,), adapter_ids (T,) int64 in
[-1, N) or None (N = 1). y (T, out) in x's dtype; u (T, r) the unscaled shrink output
dropout(x)·A[id]ᵀ in float32 (float64 for float64 inputs). The gradients are contiguous in
the shapes and dtypes of x, weight, bias (out,), lora_A, lora_B; one not asked for is an empty
(0,) tensor. Neither op is differentiable by itself.

This module registers their fake (meta) implementations, so that torch.compile and
torch.library.opcheck can trace them (the C++ side names this module with
``m.set_python_module``), and exposes ``forward`` / ``backward`` with the signatures every
LoRA backend shares. Both need the extension: without it, importing this module does nothing
and they must not be called.
"""
from __future__ import annotations

import torch

from .. import _cpp
from .._validate import compute_dtype


def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (T, in), got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 2 and lora_A.dim() == 3,
                 lambda: f"weight must be (out, in) and lora_A (N, r, in), got "
                         f"{tuple(weight.shape)} and {tuple(lora_A.shape)}")
    T, out, r = x.shape[0], weight.shape[0], lora_A.shape[1]
    return x.new_empty((T, out)), x.new_empty((T, r), dtype=compute_dtype(x.dtype))


def _bwd_fake(grad_y, x, weight, lora_A, lora_B, scaling, adapter_ids, u, dropout_p, seed,
              need_dx, need_dW, need_db, need_dA, need_dB):
    torch._check(grad_y.dim() == 2 and grad_y.shape[0] == x.shape[0]
                 and grad_y.shape[1] == weight.shape[0],
                 lambda: f"grad_y must have shape (T, out), got {tuple(grad_y.shape)}")

    def grad(need, like, shape):
        return like.new_empty(shape) if need else x.new_empty(0)

    return (grad(need_dx, x, x.shape), grad(need_dW, weight, weight.shape),
            grad(need_db, weight, (weight.shape[0],)), grad(need_dA, lora_A, lora_A.shape),
            grad(need_dB, lora_B, lora_B.shape))


FAKES = {"mmkernels::lora_cpu_fwd": _fwd_fake, "mmkernels::lora_cpu_bwd": _bwd_fake}


def register_fakes() -> bool:
    """Register this module's fakes (see ``_cpp.register_fakes``)."""
    return _cpp.register_fakes(FAKES)


register_fakes()


def forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p: float, seed,
            tf32: bool):
    """(y, u); tf32 is not used on CPU (exact fp32 math)."""
    return torch.ops.mmkernels.lora_cpu_fwd(x, weight, bias, lora_A, lora_B, scaling,
                                            adapter_ids, dropout_p, seed)


def backward(grad_y, x, weight, lora_A, lora_B, scaling, adapter_ids, u, dropout_p: float, seed,
             need_dx: bool, need_dW: bool, need_db: bool, need_dA: bool, need_dB: bool,
             tf32: bool):
    """(dx, dW, db, dA, dB) for ``forward``'s u with the same arguments."""
    return torch.ops.mmkernels.lora_cpu_bwd(grad_y, x, weight, lora_A, lora_B, scaling,
                                            adapter_ids, u, dropout_p, seed, need_dx, need_dW,
                                            need_db, need_dA, need_dB)
