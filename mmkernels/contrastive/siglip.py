"""SigLIP sigmoid loss without the B×B logits.

    loss = −Σ_ij log σ(z_ij·X_ij) / b,  X = s·I·Tᵀ + b,  z = +1 on the pairs, −1 elsewhere

No normalizer couples the tiles, so one pass over them yields the loss *and* its gradients
(6·B²·D FLOPs): when a gradient will be needed the forward computes it and keeps it (O(B·D)),
and the backward only scales it by the incoming gradient. Double backward
(``create_graph=True``) differentiates the reference formula instead (materializing B×B).

Layers: ``_forward`` (host math over the backend primitive) → the custom op
``mmkernels::siglip_fwd`` with its autograd (one process) and ``_DistributedSigLIP`` (many) →
the functional ``siglip_loss`` → ``mmkernels.nn.SigLipLoss``.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _validate
from .._autograd import double_backward
from .._dispatch import TRITON_DTYPES, Impl
from ..distributed import LOCAL, Comm, resolve
from . import reference
from .primitives import primitives

OP = "siglip_loss"
DISPATCH = _dispatch.Op(OP, (Impl("reference"), Impl("cpu"), Impl("triton", TRITON_DTYPES)))


def _forward(prims, comm: Comm, image, text, scale, bias, want_grad: bool):
    """Loss of this rank's images against every rank's texts, and (if ``want_grad``) its
    gradients: image (b, D), text for the global batch (n, D, still to be reduce-scattered),
    scale and bias. Gradients are in the compute dtype."""
    acc = _validate.compute_dtype(image.dtype)
    scale_a = scale.to(acc)
    bias_a = None if bias is None else bias.to(acc)
    text_all = comm.all_gather(text)
    b = image.shape[0]
    loss_sum, a_image, a_text_all, gsum = prims.siglip_pass(image, text_all, scale_a, bias_a,
                                                       comm.rank * b, want_grad)
    loss = loss_sum.to(acc) / b
    if not want_grad:
        empty = image.new_empty(0, dtype=acc)
        return loss, empty, empty.clone(), empty.clone(), empty.clone()
    d_scale = torch.dot(image.to(acc).reshape(-1), a_image.reshape(-1)) / b
    d_bias = gsum.to(acc) / b
    return loss, a_image.mul_(scale_a / b), a_text_all.mul_(scale_a / b), d_scale, d_bias


@torch.library.custom_op("mmkernels::siglip_fwd", mutates_args=())
def siglip_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
               want_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss and, when ``want_grad``, d loss / d(image, text, scale, bias) (contiguous);
    otherwise the four gradients are empty."""
    tf32 = _dispatch.uses_tf32(backend, image.dtype)
    return _forward(primitives(backend, tf32), LOCAL, image, text, scale, bias,
                    want_grad)


@siglip_fwd.register_fake
def _(image, text, scale, bias, want_grad, backend):
    acc = _validate.compute_dtype(image.dtype)
    loss = image.new_empty((), dtype=acc)
    if not want_grad:
        return (loss,) + tuple(image.new_empty(0, dtype=acc) for _ in range(4))
    # new_empty: the gradients are contiguous whatever the features' strides.
    return (loss, image.new_empty(image.shape, dtype=acc), text.new_empty(text.shape, dtype=acc),
            image.new_empty((), dtype=acc), image.new_empty((), dtype=acc))


def _scaled_grads(grad, image, text, scale, bias, d_image, d_text, d_scale, d_bias, comm):
    """Chain rule for a loss whose gradients the forward already computed."""
    grad = grad.to(d_image.dtype)
    d_image = (d_image * grad).to(image.dtype)
    d_text = comm.reduce_scatter(d_text * grad).to(text.dtype)
    d_bias = None if bias is None else (d_bias * grad).to(bias.dtype)
    return d_image, d_text, (d_scale * grad).to(scale.dtype), d_bias


def _setup_context(ctx, inputs, output):
    image, text, scale, bias, want_grad, backend = inputs
    ctx.save_for_backward(image, text, scale, bias, *output[1:])
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated


def _autograd_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # the loss itself was not differentiated
        return None, None, None, None, None, None
    image, text, scale, bias, *grads = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradients are constants; differentiate the formula.
        grads = double_backward(reference.siglip_loss, grad_loss,
                                          (image, text, scale, bias))
    else:
        grads = _scaled_grads(grad_loss, image, text, scale, bias, *grads, LOCAL)
    return tuple(grads) + (None, None)


siglip_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


class _DistributedSigLIP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, prims, comm):
        loss, *grads = _forward(prims, comm, image, text, scale, bias, True)
        ctx.save_for_backward(image, text, scale, bias, *grads)
        ctx.comm = comm
        return loss

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise NotImplementedError(f"{OP}: double backward (create_graph=True) is not "
                                      "supported with several ranks")
        image, text, scale, bias, *grads = ctx.saved_tensors
        # Every rank's loss touches our texts: scale by *its* incoming gradient, then sum.
        return _scaled_grads(grad, image, text, scale, bias, *grads, ctx.comm) + (None, None)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                *, backend: str = "auto", distributed: Optional[bool] = None,
                group=None) -> Tensor:
    """SigLIP sigmoid loss −Σ_ij log σ(z_ij·(s·x_i·y_j + b)) / B, never building the B×B logits.

    Arguments as in ``infonce_loss``; ``logit_bias`` is SigLIP's learned bias (None for none).
    With several ranks the loss is this rank's images against the global batch of texts
    (open_clip's SigLipLoss convention); DDP's averaging gives the single-process gradient.
    """
    _validate.feature_pair(OP, image_features, text_features)
    device = image_features.device
    acc = _validate.compute_dtype(image_features.dtype)
    scale = _validate.scalar(OP, "logit_scale", logit_scale, device, acc)
    bias = _validate.scalar(OP, "logit_bias", logit_bias, device, acc, optional=True)
    name = DISPATCH.select(backend, {"image_features": image_features,
                                     "text_features": text_features})
    comm = resolve(OP, distributed, group, image_features)
    if name == "reference":
        return reference.siglip_loss(image_features, text_features, scale, bias, comm)
    if comm is not LOCAL:
        tf32 = _dispatch.uses_tf32(name, image_features.dtype)
        return _DistributedSigLIP.apply(image_features, text_features, scale, bias,
                                        primitives(name, tf32), comm)
    want_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (image_features, text_features, scale, bias))
    return siglip_fwd(image_features, text_features, scale, bias, want_grad, name)[0]
