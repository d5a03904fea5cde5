"""InfoNCE parity against a float64 eager reference, on every backend, plus numerics, bad
input, gradcheck, opcheck, open_clip and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from backends import all_backends, device, fast_backends, interpreted
from oracle import (FP32_RTOL, FP64_RTOL, as64, assert_close, check_against_float64,
                    loss_and_grads, low_precision_rtol, make_inputs)

LOSS = mmkernels.infonce_loss

SHAPES = [(1, 1), (2, 7), (7, 33), (127, 64), (257, 129), (1000, 31)]
CONFIGS = {  # label smoothing, bias, reduction, non-contiguous inputs
    "plain": (0.0, False, "mean", False),
    "bias-sum-strided": (0.1, True, "sum", True),
    "smooth-none-strided": (0.3, False, "none", True),
    "full-smoothing-bias": (1.0, True, "mean", False),
}


def make(b, d, dtype, **kw):
    return make_inputs(b, d, dtype, device=device(), **kw)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_parity_fp32(backend, b, d, config):
    if interpreted(backend) and (b > 257 or (b == 257 and config != "plain")):
        pytest.skip("interpreter: shapes kept small (257 runs in one config)")
    eps, bias, reduction, noncontig = CONFIGS[config]
    inputs = make(b, d, torch.float32, bias=bias, noncontig=noncontig)
    weights = torch.rand(b, device=device()) + 0.5 if reduction == "none" else None
    check_against_float64(LOSS, inputs, FP32_RTOL, weights, label_smoothing=eps,
                          reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_low_precision(backend, dtype):
    """fp16/bf16 inputs, fp32 math: within 2× (3× for gradients) the same-dtype eager error."""
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("bf16 is silently wrong in the Triton interpreter")
    b, d = (127, 64) if interpreted(backend) else (257, 129)
    inputs = make(b, d, dtype, bias=True)
    image, text, scale, bias = inputs

    def eager(image, text, scale, bias):  # the open_clip formula, all in the input dtype
        logits = scale.to(image.dtype) * image @ text.T + bias.to(image.dtype)
        labels = torch.arange(b, device=image.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    lowp = eager(*inputs)
    lowp_grads = torch.autograd.grad(lowp, inputs)
    out, grads = loss_and_grads(LOSS, inputs, backend=backend)
    ref, ref_grads = loss_and_grads(LOSS, as64(*inputs), backend="reference")
    assert_close(out, ref, low_precision_rtol(lowp, ref, 2), "loss")
    for name, g, lg, r in zip(["image", "text", "scale", "bias"], grads, lowp_grads, ref_grads):
        assert g.dtype == dtype or name in ("scale", "bias")
        assert_close(g, r, low_precision_rtol(lg, r, 3), f"d_{name}")


@pytest.mark.parametrize("backend", all_backends())
def test_extreme_values(backend):
    """Unnormalized features of norm 30 with logit_scale 100: logits ~1e5, still finite."""
    inputs = make(64, 48, torch.float32, bias=True, norm=30.0, scale=100.0)
    # logits of 1e5 carry fp32 rounding of ~1e-2: softmax weights are exact only to that.
    check_against_float64(LOSS, inputs, FP32_RTOL, grad_rtol=1e-2, backend=backend)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("where", ["image", "text", "scale"])
def test_nan_in_nan_out(backend, where):
    image, text, scale, bias = make(9, 5, torch.float32, bias=True)
    with torch.no_grad():
        {"image": image, "text": text, "scale": scale}[where].view(-1)[-1] = float("nan")
    loss, grads = loss_and_grads(LOSS, (image, text, scale, bias), backend=backend)
    assert torch.isnan(loss)
    assert torch.isnan(grads[0]).any() and torch.isnan(grads[1]).any()


@pytest.mark.parametrize("backend", fast_backends())
def test_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("Triton kernels take fp32/fp16/bf16, not float64")
    image, text, scale, bias = as64(*make(6, 5, torch.float32, bias=True, noncontig=True))
    for eps, reduction in [(0.0, "mean"), (0.2, "none")]:
        torch.autograd.gradcheck(
            lambda i, t, s, b: mmkernels.infonce_loss(i, t, s, b, label_smoothing=eps,
                                                      reduction=reduction, backend=backend),
            (image, text, scale, bias))


@pytest.mark.parametrize("backend", fast_backends())
def test_float64_parity(backend):
    if backend == "triton":
        pytest.skip("Triton kernels take fp32/fp16/bf16, not float64")
    inputs = as64(*make(127, 33, torch.float32, bias=True))
    check_against_float64(LOSS, inputs, FP64_RTOL, label_smoothing=0.1, backend=backend)


@pytest.mark.parametrize("backend", fast_backends())
def test_opcheck(backend):
    dtype = torch.float32
    image, text, scale, bias = make(7, 5, dtype, bias=True)
    fwd = torch.ops.mmkernels.infonce_fwd.default
    bwd = torch.ops.mmkernels.infonce_bwd.default
    for b in (bias, None):
        torch.library.opcheck(fwd, (image, text, scale, b, 0.1, backend))
        # The backward op has no backward of its own: call it on plain tensors.
        with torch.no_grad():
            _, row_lse, col_lse = fwd(image, text, scale, b, 0.1, backend)
        grad = torch.rand(7, device=device())
        torch.library.opcheck(bwd, (grad, image.detach(), text.detach(), scale.detach(),
                                    None if b is None else b.detach(), row_lse, col_lse, 0.1,
                                    backend))


@pytest.mark.parametrize("backend", all_backends())
def test_matches_open_clip(backend, open_clip_loss):
    image, text, scale, bias = make(33, 16, torch.float32, bias=True)
    ours = mmkernels.nn.ClipLoss(backend=backend)
    theirs = open_clip_loss.ClipLoss()
    for b in (None, bias):
        out = ours(image, text, scale, b, output_dict=True)
        ref = theirs(image, text, scale, b, output_dict=True)
        assert out.keys() == ref.keys()
        assert_close(out["contrastive_loss"], ref["contrastive_loss"], FP32_RTOL, "loss")
        g = torch.autograd.grad(out["contrastive_loss"], (image, text, scale))
        rg = torch.autograd.grad(ref["contrastive_loss"], (image, text, scale))
        for x, y in zip(g, rg):
            assert_close(x, y, FP32_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("backend", fast_backends())
def test_torch_compile(backend):
    image, text, scale, bias = make(33, 16, torch.float32, bias=True)

    def step(image, text, scale, bias):
        return mmkernels.infonce_loss(image, text, scale, bias, label_smoothing=0.1,
                                      backend=backend) * 2

    compiled = torch.compile(step)
    out = compiled(image, text, scale, bias)
    grads = torch.autograd.grad(out, (image, text, scale, bias))
    ref = step(image, text, scale, bias)
    ref_grads = torch.autograd.grad(ref, (image, text, scale, bias))
    assert_close(out, ref, FP32_RTOL)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, FP32_RTOL)


def test_float_scale_and_no_grad():
    """A Python float scale is a constant; under no_grad nothing is saved."""
    image, text, _, _ = make(5, 4, torch.float32, bias=False)
    with torch.no_grad():
        loss = mmkernels.infonce_loss(image, text, 14.3)
    ref = mmkernels.infonce_loss(image.double(), text.double(), 14.3, backend="reference")
    assert not loss.requires_grad
    assert_close(loss, ref, FP32_RTOL)


BAD = [
    ("mismatched B", lambda i, t: (i[:-1], t, 1.0), ValueError, "same shape"),
    ("mismatched D", lambda i, t: (i[:, :-1], t, 1.0), ValueError, "same shape"),
    ("1-D", lambda i, t: (i[0], t[0], 1.0), ValueError, "image_features must have shape (B, D)"),
    ("3-D", lambda i, t: (i[None], t[None], 1.0), ValueError, "(B, D)"),
    ("integer", lambda i, t: (i.long(), t.long(), 1.0), TypeError, "image_features must be"),
    ("mixed dtypes", lambda i, t: (i, t.double(), 1.0), TypeError, "same dtype"),
    ("vector scale", lambda i, t: (i, t, torch.ones(2)), ValueError, "must be a scalar"),
    ("int scale tensor", lambda i, t: (i, t, torch.tensor(2)), TypeError, "logit_scale"),
    ("string scale", lambda i, t: (i, t, "2"), TypeError, "logit_scale"),
    ("devices", lambda i, t: (i, t.to("meta"), 1.0), ValueError, "same device"),
    ("scale device", lambda i, t: (i, t, torch.tensor(1.0, device="meta")), ValueError,
     "logit_scale must be on"),
    ("not a tensor", lambda i, t: (i.tolist(), t, 1.0), TypeError, "torch.Tensor"),
    ("empty", lambda i, t: (i[:0], t[:0], 1.0), ValueError, "B >= 1"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, make, exc, words = case
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(exc, match=pytest.importorskip("re").escape(words)):
        mmkernels.infonce_loss(*make(image, text))


def test_bad_options():
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="reduction"):
        mmkernels.infonce_loss(image, text, 1.0, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        mmkernels.infonce_loss(image, text, 1.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="backend"):
        mmkernels.infonce_loss(image, text, 1.0, backend="cuda")
    with pytest.raises(mmkernels.BackendUnavailableError, match="bfloat16"):
        if mmkernels.unavailable_reasons().get("triton"):
            raise mmkernels.BackendUnavailableError("bfloat16 (triton unavailable here)")
        mmkernels.infonce_loss(image.bfloat16(), text.bfloat16(), 1.0, backend="triton")
