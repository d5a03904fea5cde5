"""The contrastive family's test inputs and oracles: features, dense float64 tile primitives,
and the float64 parity check with the absolute floors of exactly-cancelling losses."""
import pytest
import torch

from oracle import (as64, assert_close, assert_close_like_peer, log_uniform, loss_and_grads,
                    strided_copy, transposed_copy)

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


class DensePrimitives:
    """The tile primitives of mmkernels.contrastive.primitives written densely in float64:
    an oracle for the host-side math (diagonal, smoothing, collectives) independent of any
    kernel."""

    @staticmethod
    def _x(i, t, scale, bias):
        x = scale.double() * (i.double() @ t.double().T)
        return x if bias is None else x + bias.double()

    @staticmethod
    def _positives(x, offset):
        """Row and column indices of the positives (i, i + offset) inside x."""
        rows = torch.arange(x.shape[0])
        keep = (rows + offset >= 0) & (rows + offset < x.shape[1])
        return rows[keep], rows[keep] + offset

    @classmethod
    def lse(cls, i, t, scale, bias, offset, keep_rows):
        x = cls._x(i, t, scale, bias)
        rows, cols = cls._positives(x, offset)
        diag = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype)
        diag[rows] = x[rows, cols]
        off = x.clone()
        off[rows, cols] = float("-inf")
        # The kept rows, as the C++ kernels keep them (rows of X when M <= N, the only case the
        # host math uses).
        assert keep_rows == 0 or x.shape[0] <= x.shape[1]
        return off.logsumexp(1), off.logsumexp(0), diag, x[:keep_rows] if keep_rows else x[:0, 0]

    @classmethod
    def grad(cls, i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset, tiles):
        x = cls._x(i, t, scale, bias)
        if tiles.numel():
            x[:tiles.shape[0]] = tiles  # the kept rows, as kept
        p = row_w.double()[:, None] * (x - row_lse.double()[:, None]).exp() \
            + col_w.double()[None, :] * (x - col_lse.double()[None, :]).exp()
        p[cls._positives(x, offset)] = 0.0
        return p @ t.double(), p.T @ i.double(), p.sum()

    @classmethod
    def siglip_pass(cls, i, t, scale, bias, offset, want_grad):
        x = cls._x(i, t, scale, bias)
        z = -torch.ones_like(x)
        z[cls._positives(x, offset)] = 1.0
        loss = torch.nn.functional.softplus(-z * x).sum()
        g = -z * torch.sigmoid(-z * x)
        return loss, g @ t.double(), g.T @ i.double(), g.sum()


def make_inputs(b, d, dtype, *, bias, device="cpu", noncontig=False, norm=1.0, scale=None,
                layout="contiguous"):
    """image, text (b, d), a scale in [1, 100] (log-uniform) and an optional bias, all leaves
    requiring grad. ``layout="transposed"`` gives column-major features."""
    image = features(b, d, dtype, device=device, noncontig=noncontig, norm=norm)
    text = features(b, d, dtype, device=device, noncontig=noncontig, norm=norm)
    if layout == "transposed":
        image, text = transposed_copy(image), transposed_copy(text)
    scale = log_uniform(1.0, 100.0) if scale is None else scale
    scale = torch.tensor(scale, device=device)
    bias = torch.randn((), device=device).mul(5) if bias else None
    return tuple(None if x is None else x.requires_grad_() for x in (image, text, scale, bias))


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


def check_against_peer(ours, peer_name, inputs, rtol, grads=("image", "text", "scale", "bias")):
    """``ours`` and open_clip's loss module ``peer_name`` (skipped where open_clip is not
    installed) on the same (image, text, scale, bias) inputs (bias may be None): the same
    output keys, and the loss and the gradients named in ``grads`` held to the peer run in
    float64 (``assert_close_like_peer``)."""
    from mmkernels.tools.bench.peers import PeerUnavailable, load_open_clip_loss
    try:
        theirs = getattr(load_open_clip_loss(), peer_name)()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    results = []
    for loss, x in ((ours, inputs), (theirs, inputs), (theirs, as64(*inputs))):
        out = loss(*x, output_dict=True)
        leaves = [t for t in x if t is not None]
        results.append((out, torch.autograd.grad(out["contrastive_loss"], leaves)))
    (out, out_grads), (ref, ref_grads), (exact, exact_grads) = results
    assert out.keys() == ref.keys()
    assert_close_like_peer(out["contrastive_loss"], ref["contrastive_loss"],
                           exact["contrastive_loss"], rtol, "loss")
    for name, g, r, e in zip(("image", "text", "scale", "bias"), out_grads, ref_grads,
                             exact_grads):
        if name in grads:
            assert_close_like_peer(g, r, e, rtol, f"grad {name}")
