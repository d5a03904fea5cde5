"""Eager, materializing contrastive losses: the oracle every kernel is tested against and the
fallback when no fast backend can run. They build the (b × B) logits, exactly like open_clip,
and let autograd differentiate them.

Math runs in float32 (float64 for float64 inputs) whatever the input dtype, which is what the
fused kernels promise too; the loss is returned in that dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import compute_dtype
from ..distributed import LOCAL, Comm


def _logits(q, k_all, scale, bias):
    logits = scale * (q @ k_all.T)
    return logits if bias is None else logits + bias


def infonce_loss(image, text, scale, bias, label_smoothing=0.0, comm: Comm = LOCAL,
                 local_loss=True, gather_with_grad=True):
    """Symmetric CLIP loss per pair: (CE over the row + CE over the column) / 2.

    One process: shape (b,). Several ranks: open_clip's ClipLoss algorithm with its two
    flags — features gathered with or without gradient (without, a rank's own slot keeps its
    gradient unless ``local_loss``); local rows against all columns, shape (b,), or the whole
    global batch, shape (n,).
    """
    acc = compute_dtype(image.dtype)
    image, text = image.to(acc), text.to(acc)
    scale = scale.to(acc)
    bias = None if bias is None else bias.to(acc)
    if comm.world_size == 1:
        image_all, text_all, labels = image, text, torch.arange(image.shape[0],
                                                                device=image.device)
    else:
        if gather_with_grad:
            image_all, text_all = comm.all_gather_with_grad(image), comm.all_gather_with_grad(text)
        else:
            image_all, text_all = comm.all_gather(image), comm.all_gather(text)
            if not local_loss:
                b = image.shape[0]
                own = slice(comm.rank * b, (comm.rank + 1) * b)
                image_all = torch.cat([image_all[:own.start], image, image_all[own.stop:]])
                text_all = torch.cat([text_all[:own.start], text, text_all[own.stop:]])
        if local_loss:
            labels = torch.arange(image.shape[0], device=image.device) + comm.rank * image.shape[0]
        else:
            image, text = image_all, text_all
            labels = torch.arange(image.shape[0], device=image.device)
    per_row = F.cross_entropy(_logits(image, text_all, scale, bias), labels,
                              label_smoothing=label_smoothing, reduction="none")
    per_col = F.cross_entropy(_logits(text, image_all, scale, bias), labels,
                              label_smoothing=label_smoothing, reduction="none")
    return (per_row + per_col) / 2


def siglip_loss(image, text, scale, bias, comm: Comm = LOCAL):
    """SigLIP: −Σ_ij log σ(z_ij·x_ij) / b with z = +1 for the pair and −1 otherwise.

    With a distributed ``comm`` the local images meet every rank's texts (as open_clip's
    SigLipLoss does with its exchanges); the sum over ranks is the global loss × world size.
    """
    acc = compute_dtype(image.dtype)
    image, text = image.to(acc), text.to(acc)
    scale = scale.to(acc)
    bias = None if bias is None else bias.to(acc)
    text_all = comm.all_gather_with_grad(text)
    logits = _logits(image, text_all, scale, bias)
    b = image.shape[0]
    signs = -torch.ones_like(logits)
    signs[torch.arange(b), torch.arange(b) + comm.rank * b] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b
