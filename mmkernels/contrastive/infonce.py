"""CLIP InfoNCE loss without materializing the B×B logits (the C++ backend keeps up to
``KEEP_LOGITS_BYTES`` of them for speed).

    logits X = s·I·Tᵀ + b,  row/column log-sum-exp r_i, c_j,  targets on the diagonal
    pair loss ℓ_i = ½[CE_row_i + CE_col_i],  CE_row_i = r_i − (1−ε)·X_ii − ε·mean_j X_ij
    dX_ij = ½g_i(e^{X_ij−r_i} − (1−ε)δ_ij − ε/n) + ½g_j(e^{X_ij−c_j} − (1−ε)δ_ij − ε/n)

Only the softmax part of dX couples all pairs; it is what the backends' tile primitives
compute (``lse`` forward, ``grad`` backward, 8·B²·D FLOPs in all with O(B·D) memory, or
6·B²·D for the rows whose logits the forward keeps). The
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
import torch.nn.functional as F
from torch import Tensor

from .. import _dispatch, _validate
from .._autograd import double_backward
from .._dispatch import TRITON_DTYPES, Impl
from ..distributed import LOCAL, Comm, resolve
from . import reference
from .primitives import primitives

OP = "infonce_loss"
DISPATCH = _dispatch.Op(OP, (Impl("reference"), Impl("cpu"), Impl("triton", TRITON_DTYPES)))


#: The C++ backend keeps up to this many bytes of the forward's logits for the backward instead
#: of recomputing them: 6·B²·D FLOPs for the kept rows instead of 8·B²·D. Up to B = 8192 in
#: fp32 that is all of them, one B×B buffer (the eager formula holds about four); above, whole
#: 256-row blocks within the budget (a quarter of the rows at B = 16384), the rest recomputed.
KEEP_LOGITS_BYTES = 256 * 2**20
#: Rows per row block of the C++ kernels (kRowBlock in csrc/contrastive/tiles.h): a partial
#: keep covers a whole number of them (the kernels check it).
KEEP_ROW_BLOCK = 256


def kept_rows(backend: str, m: int, n: int, dtype: torch.dtype, want_grad: bool) -> int:
    """How many rows of logits the forward keeps for the backward: the C++ backend's kernel
    frame has min(m, n) rows of max(m, n) logits; all of them when they fit the budget, else
    as many whole row blocks as fit (the Triton kernels recompute)."""
    if not want_grad or backend != "cpu" or min(m, n) == 0:
        return 0
    rows, row_bytes = min(m, n), max(m, n) * torch.finfo(_validate.compute_dtype(dtype)).bits // 8
    fit = KEEP_LOGITS_BYTES // row_bytes
    return rows if fit >= rows else fit // KEEP_ROW_BLOCK * KEEP_ROW_BLOCK


def _forward(prims, comm: Comm, image, text, scale, bias, eps, keep_rows=0):
    """Per-pair losses (b,), the row LSE (b,) and column LSE over the global batch (n,), each
    pair's excesses r_i − X_ii and c_i − X_ii (b, 2), and the kept rows of logits (or empty).

    The primitive leaves the positive pair out of its sums and reports its logit X_ii as the
    tile computed it, so r_i − X_ii = softplus(lse_off_i − X_ii) is formed without
    cancellation: accurate also when the loss is tiny (aligned pairs, confident model)."""
    acc = _validate.compute_dtype(image.dtype)
    scale = scale.to(acc)
    bias = None if bias is None else bias.to(acc)
    text_all = comm.all_gather(text)
    b, n = image.shape[0], text_all.shape[0]
    offset = comm.rank * b
    row_off, col_off_part, diag, tiles = prims.lse(image, text_all, scale, bias, offset,
                                                   keep_rows)
    row_off, diag = row_off.to(acc), diag.to(acc)
    # Each rank saw only its own rows: combine the column partials (disjoint sums) globally.
    col_off = comm.logsumexp_across(col_off_part.to(acc))
    own = slice(offset, offset + b)
    excess = torch.stack([F.softplus(row_off - diag), F.softplus(col_off[own] - diag)], 1)
    loss = 0.5 * excess.sum(1)
    if eps:
        # CE with smoothing = (r_i − X_ii) + ε·(X_ii − mean_j X_ij); mean_j X_ij = s·⟨I_i, ΣT⟩/n
        # + b needs only the feature sums.
        image_a, text_a = image.to(acc), text.to(acc)
        text_sum = text_all.sum(0, dtype=acc)
        image_sum = comm.all_reduce(image.sum(0, dtype=acc))
        means = scale * (image_a @ text_sum + text_a @ image_sum) / n
        if bias is not None:
            means = means + 2 * bias
        loss = loss + eps * diag - 0.5 * eps * means
    row_lse = torch.logaddexp(row_off, diag)
    col_lse = torch.logaddexp(col_off, comm.all_gather(diag))
    return loss, row_lse, col_lse, excess, tiles


def _backward(prims, comm: Comm, grad, image, text, scale, bias, row_lse, col_lse, excess, eps,
              tiles, query_only=False):
    """Gradients of Σ_ranks Σ_i g_i·ℓ_i for this rank's image, text, and its share of the
    scale and bias gradients (the shares sum to the total over ranks).

    ``query_only`` (open_clip's local_loss=True, gather_with_grad=False): a feature gets the
    gradient of its own cross-entropy only (image i of row i, text i of column i), not of its
    appearances as another pair's negative; the scale and bias gradients are then this rank's
    full ones. It costs a second pass over the tiles."""
    acc = _validate.compute_dtype(image.dtype)
    scale_a = scale.to(acc)
    bias_a = None if bias is None else bias.to(acc)
    grad = grad.to(acc).contiguous()
    text_all, grad_all = comm.all_gather(text), comm.all_gather(grad)
    b = image.shape[0]
    # The primitive covers every pair but the positives: P_ij = ½g_i·e^{X_ij−r_i} + ½g_j·e^{X_ij−c_j}.
    row_w, col_w = 0.5 * grad, 0.5 * grad_all
    offset = comm.rank * b
    if query_only:
        a_image, _, psum = prims.grad(image, text_all, scale_a, bias_a, row_lse, col_lse, row_w,
                                      torch.zeros_like(col_w), offset, tiles)
        _, a_text_all, psum_col = prims.grad(image, text_all, scale_a, bias_a, row_lse, col_lse,
                                             torch.zeros_like(row_w), col_w, offset, tiles)
        psum = psum + psum_col
    else:
        a_image, a_text_all, psum = prims.grad(image, text_all, scale_a, bias_a, row_lse,
                                               col_lse, row_w, col_w, offset, tiles)
    a_text = comm.reduce_scatter(a_text_all)
    image_a, text_a = image.to(acc), text.to(acc)
    # The positives, in the compute dtype: dX_ii = ½g_i·[(e^{X_ii−r_i} − 1) + (e^{X_ii−c_i} − 1)]
    # + ε·g_i, with e^{−x} − 1 = expm1(−x) exact for the tiny excesses of confident pairs.
    diag_rc = 0.5 * grad[:, None] * (torch.expm1(-excess) + eps)
    diag_w = diag_rc.sum(1)
    a_image.addcmul_((diag_rc[:, 0] if query_only else diag_w)[:, None], text_a)
    a_text.addcmul_((diag_rc[:, 1] if query_only else diag_w)[:, None], image_a)
    if eps:
        # Smoothing terms: −ε/(2n)·(g_i + g_j) on every entry, a sum of two rank-one matrices.
        n = text_all.shape[0]
        c = eps / (2 * n)
        text_sum = text_all.sum(0, dtype=acc)
        image_sum = comm.all_reduce(image.sum(0, dtype=acc))
        g_text = grad_all @ text_all.to(acc)
        g_image = comm.all_reduce(grad @ image_a)
        a_image.addr_(grad, text_sum, alpha=-c)
        a_text.addr_(grad, image_sum, alpha=-c)
        if not query_only:
            a_image.sub_(c * g_text)
            a_text.sub_(c * g_image)
    # ∂/∂s = Σ dX_ij·⟨I_i, T_j⟩ = ⟨I, dX·T⟩ (+ ⟨T, dXᵀ·I⟩ over our columns when the two paths
    # are apart); ∂/∂b = Σ dX_ij (analytically 0: each softmax sums to one).
    d_scale = torch.dot(image_a.reshape(-1), a_image.reshape(-1))
    if query_only:
        d_scale = d_scale + torch.dot(text_a.reshape(-1), a_text.reshape(-1))
    d_bias = psum.to(acc) + diag_w.sum() - eps * grad.sum()
    d_image = a_image.mul_(scale_a).to(image.dtype)
    d_text = a_text.mul_(scale_a).to(text.dtype)
    bias_dtype = scale.dtype if bias is None else bias.dtype
    return d_image, d_text, d_scale.to(scale.dtype), d_bias.to(bias_dtype)


@torch.library.custom_op("mmkernels::infonce_fwd", mutates_args=())
def infonce_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                label_smoothing: float, backend: str,
                keep_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-pair losses, row and column LSE (B,), the pairs' excesses (B, 2) (float32/float64),
    the first ``keep_rows`` rows of the logits (keep_rows, B) (empty when 0; see
    ``kept_rows``), and whether fp32 products ran on TF32 (a 0-dim bool CPU tensor, handed to
    the backward so that both agree)."""
    tf32 = _dispatch.uses_tf32(backend, image.dtype)
    out = _forward(primitives(backend, tf32), LOCAL, image, text, scale, bias, label_smoothing,
                   keep_rows)
    return (*out, torch.tensor(tf32))


@infonce_fwd.register_fake
def _(image, text, scale, bias, label_smoothing, backend, keep_rows):
    acc = _validate.compute_dtype(image.dtype)
    b = image.shape[0]
    torch._check(0 <= keep_rows <= b, lambda: f"keep_rows must be in [0, {b}], got {keep_rows}")
    # Only the C++ primitives keep logits (primitives.py).
    kept = keep_rows if backend == "cpu" else 0
    tiles = image.new_empty((kept, b) if kept else (0,), dtype=acc)
    return (*(image.new_empty(b, dtype=acc) for _ in range(3)), image.new_empty(b, 2, dtype=acc),
            tiles, torch.empty((), dtype=torch.bool))


@torch.library.custom_op("mmkernels::infonce_bwd", mutates_args=())
def infonce_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                row_lse: Tensor, col_lse: Tensor, excess: Tensor, logits: Tensor,
                label_smoothing: float, backend: str,
                tf32: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. image, text, scale and bias (bias gradient returned even if unused);
    all contiguous. ``tf32`` is the forward's choice (a 0-dim bool CPU tensor)."""
    return _backward(primitives(backend, bool(tf32)), LOCAL, grad, image, text, scale, bias,
                     row_lse, col_lse, excess, label_smoothing, logits)


@infonce_bwd.register_fake
def _(grad, image, text, scale, bias, row_lse, col_lse, excess, logits, label_smoothing,
      backend, tf32):
    # new_empty, not empty_like: the kernels return contiguous gradients whatever the strides
    # of the features (a transposed input must not get a transposed fake).
    return (image.new_empty(image.shape), text.new_empty(text.shape),
            scale.new_empty(()), (scale if bias is None else bias).new_empty(()))


def _setup_context(ctx, inputs, output):
    image, text, scale, bias, label_smoothing, backend, keep_rows = inputs
    ctx.save_for_backward(image, text, scale, bias, *output[1:])
    # Only the loss output is differentiated: without this autograd would build a zero B×B
    # gradient for the kept logits on every backward.
    ctx.set_materialize_grads(False)
    ctx.label_smoothing, ctx.backend = label_smoothing, backend


def _autograd_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # the loss itself was not differentiated
        return None, None, None, None, None, None, None
    image, text, scale, bias, row_lse, col_lse, excess, logits, tf32 = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the gradient must itself be differentiable.
        grads = double_backward(reference.infonce_loss, grad_loss,
                                          (image, text, scale, bias), ctx.label_smoothing)
    else:
        grads = infonce_bwd(grad_loss, image, text, scale, bias, row_lse, col_lse, excess,
                            logits, ctx.label_smoothing, ctx.backend, tf32)
    d_image, d_text, d_scale, d_bias = grads
    return d_image, d_text, d_scale, (None if bias is None else d_bias), None, None, None


infonce_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


class _DistributedInfoNCE(torch.autograd.Function):
    """The multi-rank loss: local rows against every rank's columns, collectives inside, with
    open_clip's two flags (see ``infonce_loss``):

      local_loss  gather_with_grad  returns                   a rank's feature gradient
      True        True              own pairs' losses (b,)    ∂(Σ_ranks loss)/∂(own features)
      True        False             own pairs' losses (b,)    own pairs' query terms only
      False       True              all pairs' losses (n,)    ∂(Σ_ranks loss)/∂(own features)
      False       False             all pairs' losses (n,)    ∂(own loss)/∂(own features)
    """

    @staticmethod
    def forward(ctx, image, text, scale, bias, eps, prims, comm, local_loss, gather_with_grad):
        loss, row_lse, col_lse, excess, _ = _forward(prims, comm, image, text, scale, bias, eps)
        ctx.save_for_backward(image, text, scale, bias, row_lse, col_lse, excess)
        ctx.eps, ctx.prims, ctx.comm = eps, prims, comm
        ctx.local_loss, ctx.gather_with_grad = local_loss, gather_with_grad
        return loss if local_loss else comm.all_gather(loss)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise NotImplementedError(f"{OP}: double backward (create_graph=True) is not "
                                      "supported with several ranks")
        image, text, scale, bias, row_lse, col_lse, excess = ctx.saved_tensors
        comm, b = ctx.comm, image.shape[0]
        own = slice(comm.rank * b, (comm.rank + 1) * b)
        detached = not ctx.gather_with_grad
        if ctx.local_loss:
            own_grad = grad
        elif ctx.gather_with_grad:
            # Every rank's loss covers every pair and every rank differentiates it through the
            # gathered features: the pairs' weights add up over ranks.
            own_grad = comm.all_reduce(grad)[own]
        else:
            # Each rank differentiates only its own copy of the global loss, through its own
            # features: exact with one weight vector, so every rank must send the same one.
            if not torch.equal(comm.all_reduce(grad) / comm.world_size, grad):
                raise ValueError(f"{OP}: with local_loss=False and gather_with_grad=False every "
                                 "rank must back-propagate the same gradient into the loss")
            own_grad = grad[own]
        d_image, d_text, d_scale, d_bias = _backward(
            ctx.prims, comm, own_grad.contiguous(), image, text, scale, bias, row_lse, col_lse,
            excess, ctx.eps, image.new_empty(0), query_only=ctx.local_loss and detached)
        if not ctx.local_loss and detached:
            # Shares of the scalar gradients, made whole: each rank owns its full copy.
            d_scale, d_bias = comm.all_reduce(d_scale), comm.all_reduce(d_bias)
        return (d_image, d_text, d_scale, None if bias is None else d_bias,
                None, None, None, None, None)


def _reduce(per_pair: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def infonce_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                 logit_bias=None, *, label_smoothing: float = 0.0, reduction: str = "mean",
                 backend: str = "auto", distributed: Optional[bool] = None,
                 group=None, local_loss: bool = True, gather_with_grad: bool = True) -> Tensor:
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
        local_loss, gather_with_grad: open_clip's flags, used with several ranks. The
            defaults (True, True) return this rank's pairs' loss against the global batch, and
            DDP's averaging gives exactly the gradient of the mean loss over the global batch.
            local_loss=False returns the loss over the whole global batch (every rank the
            same); gather_with_grad=False differentiates a rank's loss through its own features
            only, as open_clip does (with local_loss=False the encoders then get 1/world_size
            of the gradient, open_clip's default behaviour).

    Returns a float32 loss (float64 for float64 inputs).
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
    local_loss, gather_with_grad = bool(local_loss), bool(gather_with_grad)
    if name == "reference":
        per_pair = reference.infonce_loss(image_features, text_features, scale, bias, eps, comm,
                                          local_loss, gather_with_grad)
    elif comm is LOCAL:
        want_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (image_features, text_features, scale, bias))
        keep = kept_rows(name, image_features.shape[0], text_features.shape[0],
                         image_features.dtype, want_grad)
        per_pair = infonce_fwd(image_features, text_features, scale, bias, eps, name, keep)[0]
    else:
        tf32 = _dispatch.uses_tf32(name, image_features.dtype)
        per_pair = _DistributedInfoNCE.apply(image_features, text_features, scale, bias, eps,
                                             primitives(name, tf32),
                                             comm, local_loss,
                                             gather_with_grad)
    return _reduce(per_pair, reduction)
