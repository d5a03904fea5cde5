"""The C++ contrastive ops (``csrc/contrastive``) as seen from Python.

``mmkernels._C`` registers three CPU kernels in the ``mmkernels`` namespace (schemas in
``csrc/contrastive/infonce.cpp`` and ``siglip.cpp``):

  infonce_lse(image, text, scale, bias?, offset, keep_rows)
      -> row_lse_off (M,), col_lse_off (N,), diag (M,), tiles ((keep_rows, max(M, N)), or (0,))
  infonce_grad(image, text, scale, bias?, row_lse, col_lse, row_w, col_w, offset, tiles)
      -> A_I (M, D), A_T (N, D), psum ()
  siglip_pass(image, text, scale, bias?, diag_offset, want_grad)
      -> loss_sum (), A_I, A_T, gsum ()

The positive pairs are (i, i + offset) (any integer; positives outside the matrix are absent).
``infonce_lse`` leaves them out of its log-sum-exps and reports their logits; ``infonce_grad``
gives them zero weight. When M > N the kernels work on the transposed problem; the "kernel
frame" is X when M ≤ N and Xᵀ otherwise, with min(M, N) rows. ``infonce_lse`` keeps the first
``keep_rows`` rows of the kernel-frame logits (0, all, or a multiple of 256, the row block:
see ``infonce.kept_rows``), and ``infonce_grad`` reads those rows and recomputes the rest. It never
modifies them, so a graph kept with ``retain_graph=True`` may run its backward again.
Kept logits of 4 MiB or more are written into the one buffer the extension holds between
calls (csrc/common/alloc.h), which a later call reuses once no tensor references it;
``mmkernels.empty_cache()`` frees it.

This module registers their fake (meta) implementations, so that torch.compile and
torch.library.opcheck can trace them (the C++ side names this module with
``m.set_python_module``), and wraps them as ``CppPrimitives``. Both need the extension:
without it, importing this module does nothing and ``CppPrimitives`` must not be called (the
dispatcher never picks the ``cpu`` backend then).

Outputs are contiguous and computed in float64 for float64 inputs, float32 for every other
floating dtype (float32, float16, bfloat16).
"""
from __future__ import annotations

import torch

from .. import _cpp
from .._validate import compute_dtype

def _check_features(image, text):
    torch._check(image.dim() == 2 and text.dim() == 2,
                 lambda: f"image and text must be 2-D, got {image.shape} and {text.shape}")
    torch._check(image.dtype == text.dtype,
                 lambda: f"image and text must have the same dtype, got {image.dtype}, {text.dtype}")
    torch._check(image.shape[1] == text.shape[1],
                 lambda: f"image and text must have the same feature size, got "
                         f"{image.shape[1]} and {text.shape[1]}")
    return compute_dtype(image.dtype)


def _infonce_lse_fake(image, text, scale, bias, offset, keep_rows):
    dtype = _check_features(image, text)
    m, n = image.shape[0], text.shape[0]
    rows, cols = min(m, n), max(m, n)  # the kernel frame (swap_sides in csrc/contrastive/tiles.h)
    torch._check(0 <= keep_rows <= rows,
                 lambda: f"keep_rows must be in [0, {rows}], got {keep_rows}")
    torch._check(keep_rows == rows or keep_rows % 256 == 0,  # whole row blocks (tiles.h)
                 lambda: f"keep_rows must be {rows} or a multiple of 256, got {keep_rows}")
    tiles = image.new_empty((keep_rows, cols) if keep_rows else (0,), dtype=dtype)
    return (image.new_empty((m,), dtype=dtype), image.new_empty((n,), dtype=dtype),
            image.new_empty((m,), dtype=dtype), tiles)


def _infonce_grad_fake(image, text, scale, bias, row_lse, col_lse, row_w, col_w, offset, tiles):
    dtype = _check_features(image, text)
    rows, cols = min(image.shape[0], text.shape[0]), max(image.shape[0], text.shape[0])
    torch._check(tiles.numel() == 0 and tiles.dim() == 1
                 or tiles.dim() == 2 and 0 < tiles.shape[0] <= rows and tiles.shape[1] == cols
                 and (tiles.shape[0] == rows or tiles.shape[0] % 256 == 0),
                 lambda: f"tiles must be empty or of shape (K, {cols}) with K = {rows} or a "
                         f"multiple of 256 below it, got {tuple(tiles.shape)}")
    return (image.new_empty(image.shape, dtype=dtype),
            image.new_empty(text.shape, dtype=dtype),
            image.new_empty((), dtype=dtype))


def _siglip_pass_fake(image, text, scale, bias, diag_offset, want_grad):
    dtype = _check_features(image, text)
    a_i = image.new_empty(image.shape if want_grad else (0,), dtype=dtype)
    a_t = image.new_empty(text.shape if want_grad else (0,), dtype=dtype)
    return (image.new_empty((), dtype=dtype), a_i, a_t, image.new_empty((), dtype=dtype))


FAKES = {"mmkernels::infonce_lse": _infonce_lse_fake,
         "mmkernels::infonce_grad": _infonce_grad_fake,
         "mmkernels::siglip_pass": _siglip_pass_fake}


def register_fakes() -> bool:
    """Register this module's fakes (see ``_cpp.register_fakes``)."""
    return _cpp.register_fakes(FAKES)


register_fakes()


class CppPrimitives:
    """The tile primitives (see primitives.py) on the C++ kernels. Needs the extension."""

    @staticmethod
    def lse(i, t, scale, bias, offset, keep_rows):
        return torch.ops.mmkernels.infonce_lse(i, t, scale, bias, offset, keep_rows)

    @staticmethod
    def grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset, tiles):
        return torch.ops.mmkernels.infonce_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w,
                                                offset, tiles)

    @staticmethod
    def siglip_pass(i, t, scale, bias, offset, want_grad):
        return torch.ops.mmkernels.siglip_pass(i, t, scale, bias, offset, want_grad)
