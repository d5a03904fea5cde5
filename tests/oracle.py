"""Comparison helpers for every op: outputs are judged against a float64 eager reference.

Tolerances (relative Frobenius error ‖out − ref‖ / ‖ref‖):
  float64          1e-10
  float32          1e-5  (exact fp32 arithmetic)
  tf32             checked against a reference fed TF32-rounded operands (``round_tf32``), at
                   fp32's tolerance; against the plain reference TF32 is ~3e-4 (TF32_RTOL)
  float16/bfloat16 the flash-attention rule: at most 2× (3× for gradients) the error of the
                   same computation done eagerly in that dtype, measured in the same test.

Family-specific pieces (input makers, absolute floors where a reference is analytically ~0)
live beside each family's tests (e.g. tests/contrastive/contrastive_cases.py).
"""
import math

import torch

FP32_RTOL = 1e-5
FP64_RTOL = 1e-10
TF32_RTOL = 3e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "",
                 atol: float | None = None) -> None:
    """‖out − ref‖ ≤ rtol·‖ref‖ + atol. ``atol`` (default rtol·1e-3·√n) only matters when the
    reference is itself ~0."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the output"
    if atol is None:
        atol = rtol * 1e-3 * max(ref.numel(), 1) ** 0.5
    diff = (out.detach().double() - ref.detach().double()).norm().item()
    bound = rtol * ref.detach().double().norm().item() + atol
    assert diff <= bound, f"{what}: relative error {rel_err(out, ref):.3e} > {rtol:.1e} " \
                          f"(max abs {max_abs(out, ref):.3e}, ‖ref‖ {ref.double().norm():.3e})"


def low_precision_rtol(eager_lowp: torch.Tensor, ref: torch.Tensor, factor: float) -> float:
    """The flash-attention rule: ``factor`` × the same-dtype eager error (floored at fp32's)."""
    return factor * max(rel_err(eager_lowp, ref), FP32_RTOL)


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to the nearest TF32 (10-bit mantissa, ties to even): the operands a
    TF32 tensor core sees from mmkernels' Triton kernels."""
    bits = x.detach().float().contiguous().view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    out = bits.to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x.float()).to(x.dtype)


def strided_copy(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other column of a wider buffer)."""
    wide = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    view = wide[:, ::2]
    view.copy_(x)
    return view


def transposed_copy(x: torch.Tensor) -> torch.Tensor:
    """The same values, column-major (the layout of a transposed view)."""
    return x.t().contiguous().t()


def log_uniform(lo: float, hi: float) -> float:
    return math.exp(torch.empty(()).uniform_(math.log(lo), math.log(hi)).item())


def assert_close_like_peer(out: torch.Tensor, peer: torch.Tensor, exact: torch.Tensor,
                           rtol: float, what: str = "") -> None:
    """``out`` against a peer library's result in the same dtype. The peer is no oracle: both
    carry rounding error, and a cancelling sum (a scale or bias gradient, a sum of ± terms)
    makes it large relative to the result. So ``out`` is held to the float64 ``exact`` within
    rtol, or within 2× the peer's own error where that is larger (flash-attention's rule)."""
    assert_close(out, exact, max(rtol, 2 * rel_err(peer, exact)), what)

def as64(*xs):
    return [None if x is None else x.detach().double().requires_grad_() for x in xs]


def loss_and_grads(fn, inputs, weights=None, **kw):
    """The output and the gradients of Σ weights·output w.r.t. every differentiable input."""
    out = fn(*inputs, **kw)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    target = out.sum() if weights is None else (out * weights).sum()
    return out.detach(), torch.autograd.grad(target, leaves)
