"""CLIP InfoNCE loss without the B×B logits.

    logits X = s·I·Tᵀ + b,  row/column log-sum-exp r_i, c_j,  targets on the diagonal
    pair loss ℓ_i = ½[CE_row_i + CE_col_i],  CE_row_i = r_i − (1−ε)·X_ii − ε·mean_j X_ij
    dX_ij = ½g_i(e^{X_ij−r_i} − (1−ε)δ_ij − ε/n) + ½g_j(e^{X_ij−c_j} − (1−ε)δ_ij − ε/n)

Only the softmax part of dX couples all pairs; it is what the backends' tile primitives
compute (``lse`` forward, ``grad`` backward, 8·B²·D FLOPs in all with O(B·D) memory). The
diagonal and label-smoothing terms are rank-one corrections applied here in O(B·D), once for
every backend.

Double backward (``create_graph=True``) differentiates the reference formula instead: correct,
but it materializes the B×B logits like eager PyTorch.

Layers (Liger-Kernel style): ``_forward``/``_backward`` (host math) → the custom ops
``mmkernels::infonce_fwd`` / ``mmkernels::infonce_bwd`` with their autograd (one process) and
``_DistributedInfoNCE`` (many) → the functional ``infonce_loss`` → ``mmkernels.nn.ClipLoss``.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _validate
from .._dispatch import TRITON_DTYPES, Impl
from ..distributed import LOCAL, Comm, resolve
from . import reference
from .primitives import primitives

OP = "infonce_loss"
DISPATCH = _dispatch.Op(OP, (Impl("reference"), Impl("cpu"), Impl("triton", TRITON_DTYPES)))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a_i, b_i⟩ for every row, without a (B, D) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _forward(prims, comm: Comm, image, text, scale, bias, eps):
    """Per-pair losses (b,), row LSE (b,) and column LSE over the global batch (n,)."""
    acc = _validate.compute_dtype(image.dtype)
    scale = scale.to(acc)
    bias = None if bias is None else bias.to(acc)
    text_all = comm.all_gather(text)
    row_lse, col_lse_part = prims.lse(image, text_all, scale, bias)
    # Each rank saw only its own rows: combine the column partials into the global LSE.
    col_lse = comm.logsumexp_across(col_lse_part)
    b, n = image.shape[0], text_all.shape[0]
    image_a, text_a = image.to(acc), text.to(acc)
    diag = scale * _rowdot(image_a, text_a)
    if bias is not None:
        diag = diag + bias
    own = slice(comm.rank * b, (comm.rank + 1) * b)
    loss = 0.5 * (row_lse + col_lse[own]) - (1.0 - eps) * diag
    if eps:
        # mean_j X_ij = s·⟨I_i, ΣT⟩/n + b: label smoothing needs only the feature sums.
        text_sum = text_all.sum(0, dtype=acc)
        image_sum = comm.all_reduce(image.sum(0, dtype=acc))
        means = scale * (image_a @ text_sum + text_a @ image_sum) / n
        if bias is not None:
            means = means + 2 * bias
        loss = loss - 0.5 * eps * means
    return loss, row_lse, col_lse


def _backward(prims, comm: Comm, grad, image, text, scale, bias, row_lse, col_lse, eps):
    """Gradients of Σ_ranks Σ_i g_i·ℓ_i for this rank's image, text, and its share of the
    scale and bias gradients (the shares sum to the total over ranks)."""
    acc = _validate.compute_dtype(image.dtype)
    scale_a = scale.to(acc)
    bias_a = None if bias is None else bias.to(acc)
    grad = grad.to(acc).contiguous()
    text_all, grad_all = comm.all_gather(text), comm.all_gather(grad)
    a_image, a_text_all, psum = prims.grad(image, text_all, scale_a, bias_a, row_lse, col_lse,
                                           0.5 * grad, 0.5 * grad_all)
    a_text = comm.reduce_scatter(a_text_all)
    image_a, text_a = image.to(acc), text.to(acc)
    # Target terms: dX_ii carries −(1−ε)·g_i.
    a_image.addcmul_(grad[:, None], text_a, value=-(1.0 - eps))
    a_text.addcmul_(grad[:, None], image_a, value=-(1.0 - eps))
    if eps:
        # Smoothing terms: −ε/(2n)·(g_i + g_j) on every entry, a sum of two rank-one matrices.
        n = text_all.shape[0]
        c = eps / (2 * n)
        text_sum = text_all.sum(0, dtype=acc)
        image_sum = comm.all_reduce(image.sum(0, dtype=acc))
        g_text = grad_all @ text_all.to(acc)
        g_image = comm.all_reduce(grad @ image_a)
        a_image.addr_(grad, text_sum, alpha=-c).sub_(c * g_text)
        a_text.addr_(grad, image_sum, alpha=-c).sub_(c * g_image)
    # ∂/∂s = Σ dX_ij·⟨I_i, T_j⟩ = ⟨I, dX·T⟩; ∂/∂b = Σ dX_ij = ΣP − Σg.
    d_scale = _rowdot(image_a, a_image).sum()
    d_bias = psum.to(acc) - grad.sum()
    d_image = a_image.mul_(scale_a).to(image.dtype)
    d_text = a_text.mul_(scale_a).to(text.dtype)
    bias_dtype = scale.dtype if bias is None else bias.dtype
    return d_image, d_text, d_scale.to(scale.dtype), d_bias.to(bias_dtype)


@torch.library.custom_op("mmkernels::infonce_fwd", mutates_args=())
def infonce_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                label_smoothing: float, backend: str,
                tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses, row LSE and column LSE (all shape (B,), float32/float64)."""
    return _forward(primitives(backend, tf32), LOCAL, image, text, scale, bias, label_smoothing)


@infonce_fwd.register_fake
def _(image, text, scale, bias, label_smoothing, backend, tf32):
    acc = _validate.compute_dtype(image.dtype)
    b = image.shape[0]
    return tuple(image.new_empty(b, dtype=acc) for _ in range(3))


@torch.library.custom_op("mmkernels::infonce_bwd", mutates_args=())
def infonce_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                row_lse: Tensor, col_lse: Tensor, label_smoothing: float, backend: str,
                tf32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. image, text, scale and bias (bias gradient returned even if unused);
    all contiguous."""
    return _backward(primitives(backend, tf32), LOCAL, grad, image, text, scale, bias, row_lse,
                     col_lse, label_smoothing)


@infonce_bwd.register_fake
def _(grad, image, text, scale, bias, row_lse, col_lse, label_smoothing, backend, tf32):
    # new_empty, not empty_like: the kernels return contiguous gradients whatever the strides
    # of the features (a transposed input must not get a transposed fake).
    return (image.new_empty(image.shape), text.new_empty(text.shape),
            scale.new_empty(()), (scale if bias is None else bias).new_empty(()))


def _setup_context(ctx, inputs, output):
    image, text, scale, bias, label_smoothing, backend, tf32 = inputs
    ctx.save_for_backward(image, text, scale, bias, output[1], output[2])
    ctx.label_smoothing, ctx.backend, ctx.tf32 = label_smoothing, backend, tf32


def _autograd_backward(ctx, grad_loss, _grad_row_lse, _grad_col_lse):
    image, text, scale, bias, row_lse, col_lse = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the gradient must itself be differentiable.
        grads = reference.double_backward(reference.infonce_loss, grad_loss,
                                          (image, text, scale, bias), ctx.label_smoothing)
    else:
        grads = infonce_bwd(grad_loss, image, text, scale, bias, row_lse, col_lse,
                            ctx.label_smoothing, ctx.backend, ctx.tf32)
    d_image, d_text, d_scale, d_bias = grads
    return d_image, d_text, d_scale, (None if bias is None else d_bias), None, None, None


infonce_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


class _DistributedInfoNCE(torch.autograd.Function):
    """The multi-rank loss: local rows against every rank's columns, collectives inside."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, eps, prims, comm):
        loss, row_lse, col_lse = _forward(prims, comm, image, text, scale, bias, eps)
        ctx.save_for_backward(image, text, scale, bias, row_lse, col_lse)
        ctx.eps, ctx.prims, ctx.comm = eps, prims, comm
        return loss

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise NotImplementedError(f"{OP}: double backward (create_graph=True) is not "
                                      "supported with several ranks")
        image, text, scale, bias, row_lse, col_lse = ctx.saved_tensors
        d_image, d_text, d_scale, d_bias = _backward(ctx.prims, ctx.comm, grad, image, text,
                                                     scale, bias, row_lse, col_lse, ctx.eps)
        return d_image, d_text, d_scale, (None if bias is None else d_bias), None, None, None


def _reduce(per_pair: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def infonce_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                 logit_bias=None, *, label_smoothing: float = 0.0, reduction: str = "mean",
                 backend: str = "auto", distributed: Optional[bool] = None,
                 group=None) -> Tensor:
    """Symmetric CLIP (InfoNCE) loss of paired features, never building the B×B logits.

    Args:
        image_features, text_features: (B, D) float16/bfloat16/float32/float64, used as given
            (normalize them yourself, as open_clip does).
        logit_scale: the multiplier s (open_clip passes ``logit_scale.exp()``): a float or a
            0-dim tensor, which then receives a gradient.
        logit_bias: optional additive b (float or 0-dim tensor).
        label_smoothing: ε in [0, 1], F.cross_entropy's semantics, for both directions.
        reduction: "mean" | "sum" | "none" (the (B,) per-pair losses).
        backend: "auto" | "reference" | "cpu" | "triton" (see ``mmkernels.available_backends``).
        distributed: None uses every rank's negatives when torch.distributed is initialised
            with more than one process; False keeps the loss local; True requires it.
        group: the process group (default: the world).

    Returns a float32 loss (float64 for float64 inputs). With several ranks the loss covers
    this rank's pairs against the global batch; DDP's averaging then gives the gradient of
    the mean loss over the global batch.
    """
    _validate.feature_pair(OP, image_features, text_features)
    device = image_features.device
    acc = _validate.compute_dtype(image_features.dtype)
    scale = _validate.scalar(OP, "logit_scale", logit_scale, device, acc)
    bias = _validate.scalar(OP, "logit_bias", logit_bias, device, acc, optional=True)
    if not _validate.is_number(label_smoothing):
        raise TypeError(f"{OP}: label_smoothing must be a real number in [0, 1], "
                        f"got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    _validate.choice(OP, "reduction", reduction, ("mean", "sum", "none"))
    name = DISPATCH.select(backend, {"image_features": image_features,
                                     "text_features": text_features})
    comm = resolve(OP, distributed, group, image_features)
    eps = float(label_smoothing)
    tf32 = name == "triton" and _dispatch.fp32_uses_tf32()
    if name == "reference":
        per_pair = reference.infonce_loss(image_features, text_features, scale, bias, eps, comm)
    elif comm is LOCAL:
        per_pair = infonce_fwd(image_features, text_features, scale, bias, eps, name, tf32)[0]
    else:
        per_pair = _DistributedInfoNCE.apply(image_features, text_features, scale, bias, eps,
                                             primitives(name, tf32), comm)
    return _reduce(per_pair, reduction)
