"""Comparison helpers: everything is judged against a float64 eager reference.

Tolerances (relative Frobenius error ‖out − ref‖ / ‖ref‖):
  float64          1e-10
  float32          1e-5  (exact fp32 arithmetic)
  tf32             3e-4  (Triton's default for fp32 tl.dot on GPUs)
  float16/bfloat16 the flash-attention rule: at most 2× (3× for gradients) the error of the
                   same computation done eagerly in that dtype, measured in the same test.
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
    reference is itself ~0 (e.g. every gradient of a one-pair InfoNCE loss)."""
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


def features(b: int, d: int, dtype=torch.float32, *, device="cpu", noncontig=False,
             norm: float | None = 1.0) -> torch.Tensor:
    """Random (b, d) features with rows of the given norm (None: raw N(0, 1)).

    ``noncontig`` returns a strided view (every other column of a wider buffer), the layout a
    slice of a projection output has.
    """
    x = torch.randn(b, d, dtype=torch.float64, device=device)
    if norm is not None:
        x = x * (norm / x.norm(dim=1, keepdim=True))
    x = x.to(dtype)
    return strided_copy(x) if noncontig else x


def strided_copy(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
    wide = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    view = wide[:, ::2]
    view.copy_(x)
    return view


def log_uniform(lo: float, hi: float) -> float:
    return math.exp(torch.empty(()).uniform_(math.log(lo), math.log(hi)).item())


class DensePrimitives:
    """The tile primitives of mmkernels.contrastive.primitives written densely in float64:
    an oracle for the host-side math (diagonal, smoothing, collectives) independent of any
    kernel."""

    name = "dense"

    @staticmethod
    def _x(i, t, scale, bias):
        x = scale.double() * (i.double() @ t.double().T)
        return x if bias is None else x + bias.double()

    @classmethod
    def lse(cls, i, t, scale, bias):
        x = cls._x(i, t, scale, bias)
        return x.logsumexp(1), x.logsumexp(0)

    @classmethod
    def grad(cls, i, t, scale, bias, row_lse, col_lse, row_w, col_w):
        x = cls._x(i, t, scale, bias)
        p = row_w.double()[:, None] * (x - row_lse.double()[:, None]).exp() \
            + col_w.double()[None, :] * (x - col_lse.double()[None, :]).exp()
        return p @ t.double(), p.T @ i.double(), p.sum()

    @classmethod
    def siglip(cls, i, t, scale, bias, offset, want_grad):
        x = cls._x(i, t, scale, bias)
        z = -torch.ones_like(x)
        rows = torch.arange(x.shape[0])
        keep = (rows + offset >= 0) & (rows + offset < x.shape[1])
        z[rows[keep], rows[keep] + offset] = 1.0
        loss = torch.nn.functional.softplus(-z * x).sum()
        g = -z * torch.sigmoid(-z * x)
        return loss, g @ t.double(), g.T @ i.double(), g.sum()


def make_inputs(b, d, dtype, *, bias, device="cpu", noncontig=False, norm=1.0, scale=None):
    """image, text (b, d), a scale in [1, 100] (log-uniform) and an optional bias, all leaves
    requiring grad."""
    image = features(b, d, dtype, device=device, noncontig=noncontig, norm=norm)
    text = features(b, d, dtype, device=device, noncontig=noncontig, norm=norm)
    scale = log_uniform(1.0, 100.0) if scale is None else scale
    scale = torch.tensor(scale, device=device)
    bias = torch.randn((), device=device).mul(5) if bias else None
    return tuple(None if x is None else x.requires_grad_() for x in (image, text, scale, bias))


def as64(*xs):
    return [None if x is None else x.detach().double().requires_grad_() for x in xs]


def loss_and_grads(loss_fn, inputs, weights=None, **kw):
    """The loss and the gradients of Σ weights·loss w.r.t. every differentiable input."""
    loss = loss_fn(*inputs, **kw)
    leaves = [x for x in inputs if x is not None]
    target = loss.sum() if weights is None else (loss * weights).sum()
    return loss.detach(), torch.autograd.grad(target, leaves)


def logit_magnitude(image, text, scale, bias):
    """|s|·max‖x‖·max‖y‖ + |b|: the size of the largest logit, which sets fp32's absolute
    rounding error in the losses (used as the absolute floor where the reference is ~0)."""
    m = scale.abs() * image.double().norm(dim=1).max() * text.double().norm(dim=1).max()
    return (m + (0 if bias is None else bias.abs())).item()


NAMES = ("image", "text", "scale", "bias")


def check_against_float64(loss_fn, inputs, rtol, weights=None, grad_rtol=None, **kw):
    """Run ``loss_fn`` on ``inputs`` and the reference backend on float64 copies; compare the
    loss and every gradient (each in the dtype of its input)."""
    m = logit_magnitude(*inputs)
    atol = rtol * 1e-2 * m
    out, grads = loss_and_grads(loss_fn, inputs, weights, **kw)
    ref, ref_grads = loss_and_grads(loss_fn, as64(*inputs), weights,
                                    **dict(kw, backend="reference"))
    assert out.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    # A loss that cancels exactly (B = 1) keeps the rounding of a few fp32 operations on
    # logits of size m (LSE in base 2, its log and rescale): ~8·eps·m.
    eps = torch.finfo(out.dtype).eps
    assert_close(out, ref, rtol, "loss", max(atol, 8 * eps * m) * out.numel() ** 0.5)
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    b = inputs[0].shape[0]
    weight = b if kw.get("reduction") == "sum" else \
        (weights.abs().sum().item() if weights is not None else 1.0)
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == inputs[NAMES.index(name)].dtype, f"d_{name} dtype"
        # Analytically zero gradients (d_bias of InfoNCE, everything at B=1) are sums of
        # terms whose size is set by the total upstream weight: that sets their floor.
        # Tensor gradients: each row is a difference of O(|s|·weight/b) terms whose fp32
        # rounding is eps·|X|, so an exactly-cancelling row (every row at B = 1) keeps about
        # eps·m·|s|·weight/b of noise in any fp32 implementation.
        floor = rtol * weight * max(m, 1.0) if g.dim() == 0 else \
            max(atol, eps * m * abs(inputs[2].item())) * weight / b
        assert_close(g, r, grad_rtol or rtol, f"d_{name}", floor * g.numel() ** 0.5)
