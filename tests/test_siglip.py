"""SigLIP parity against a float64 eager reference on every backend, plus numerics, bad
input, gradcheck, opcheck and open_clip."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from backends import all_backends, device, fast_backends, interpreted
from oracle import (FP32_RTOL, FP64_RTOL, as64, assert_close, check_against_float64,
                    loss_and_grads, low_precision_rtol, make_inputs)

LOSS = mmkernels.siglip_loss
SHAPES = [(1, 1), (2, 7), (7, 33), (127, 64), (257, 129), (1000, 31)]


def make(b, d, dtype, **kw):
    inputs = make_inputs(b, d, dtype, device=device(), **kw)
    if inputs[3] is not None:  # SigLIP's bias starts near −10: keep it in that regime
        inputs[3].data.sub_(10.0)
    return inputs


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("bias,noncontig", [(True, False), (False, True)], ids=["bias", "strided"])
def test_parity_fp32(backend, b, d, bias, noncontig):
    if interpreted(backend) and (b > 257 or (b == 257 and noncontig)):
        pytest.skip("interpreter: shapes kept small (257 runs in one config)")
    inputs = make(b, d, torch.float32, bias=bias, noncontig=noncontig)
    check_against_float64(LOSS, inputs, FP32_RTOL, backend=backend)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_low_precision(backend, dtype):
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("bf16 is silently wrong in the Triton interpreter")
    b, d = (127, 64) if interpreted(backend) else (257, 129)
    inputs = make(b, d, dtype, bias=True)

    def eager(image, text, scale, bias):  # open_clip's formula in the input dtype
        logits = scale.to(dtype) * image @ text.T + bias.to(dtype)
        labels = 2 * torch.eye(b, dtype=dtype, device=image.device) - 1
        return -F.logsigmoid(labels * logits).sum() / b

    lowp = eager(*inputs)
    lowp_grads = torch.autograd.grad(lowp, inputs)
    out, grads = loss_and_grads(LOSS, inputs, backend=backend)
    ref, ref_grads = loss_and_grads(LOSS, as64(*inputs), backend="reference")
    assert_close(out, ref, low_precision_rtol(lowp, ref, 2), "loss")
    for name, g, lg, r in zip(["image", "text", "scale", "bias"], grads, lowp_grads, ref_grads):
        assert_close(g, r, low_precision_rtol(lg, r, 3), f"d_{name}")


@pytest.mark.parametrize("backend", all_backends())
def test_extreme_values(backend):
    inputs = make(64, 48, torch.float32, bias=True, norm=30.0, scale=100.0)
    check_against_float64(LOSS, inputs, FP32_RTOL, grad_rtol=1e-2, backend=backend)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("where", ["image", "text", "bias"])
def test_nan_in_nan_out(backend, where):
    image, text, scale, bias = make(9, 5, torch.float32, bias=True)
    with torch.no_grad():
        {"image": image, "text": text, "bias": bias}[where].view(-1)[-1] = float("nan")
    loss, grads = loss_and_grads(LOSS, (image, text, scale, bias), backend=backend)
    assert torch.isnan(loss)
    assert torch.isnan(grads[0]).any() and torch.isnan(grads[1]).any()


@pytest.mark.parametrize("backend", all_backends())
def test_no_grad_forward(backend):
    """Without autograd the forward skips the gradient work and still gives the loss."""
    image, text, scale, bias = make(33, 16, torch.float32, bias=True)
    with torch.no_grad():
        loss = LOSS(image, text, scale, bias, backend=backend)
    ref = LOSS(*as64(image, text, scale, bias), backend="reference")
    assert not loss.requires_grad
    assert_close(loss, ref, FP32_RTOL)


@pytest.mark.parametrize("backend", fast_backends())
def test_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("Triton kernels take fp32/fp16/bf16, not float64")
    inputs = as64(*make(6, 5, torch.float32, bias=True, noncontig=True))
    torch.autograd.gradcheck(lambda *x: LOSS(*x, backend=backend), inputs)


@pytest.mark.parametrize("backend", fast_backends())
def test_float64_parity(backend):
    if backend == "triton":
        pytest.skip("Triton kernels take fp32/fp16/bf16, not float64")
    check_against_float64(LOSS, as64(*make(127, 33, torch.float32, bias=True)), FP64_RTOL,
                          backend=backend)


@pytest.mark.parametrize("backend", fast_backends())
def test_opcheck(backend):
    image, text, scale, bias = make(7, 5, torch.float32, bias=True)
    op = torch.ops.mmkernels.siglip_fwd.default
    for b in (bias, None):
        torch.library.opcheck(op, (image, text, scale, b, True, backend))
        with torch.no_grad():
            torch.library.opcheck(op, (image.detach(), text.detach(), scale.detach(),
                                       None if b is None else b.detach(), False, backend))


@pytest.mark.parametrize("backend", all_backends())
def test_matches_open_clip(backend, open_clip_loss):
    image, text, scale, bias = make(33, 16, torch.float32, bias=True)
    out = mmkernels.nn.SigLipLoss(backend=backend)(image, text, scale, bias, output_dict=True)
    ref = open_clip_loss.SigLipLoss()(image, text, scale, bias, output_dict=True)
    assert out.keys() == ref.keys()
    assert_close(out["contrastive_loss"], ref["contrastive_loss"], FP32_RTOL, "loss")
    grads = torch.autograd.grad(out["contrastive_loss"], (image, text, scale, bias))
    ref_grads = torch.autograd.grad(ref["contrastive_loss"], (image, text, scale, bias))
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, FP32_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("backend", fast_backends())
def test_torch_compile(backend):
    inputs = make(33, 16, torch.float32, bias=True)
    compiled = torch.compile(lambda *x: LOSS(*x, backend=backend) * 2)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs)
    ref = LOSS(*inputs, backend=backend) * 2
    ref_grads = torch.autograd.grad(ref, inputs)
    assert_close(out, ref, FP32_RTOL)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, FP32_RTOL)


@pytest.mark.parametrize("bad,exc,words", [
    (lambda i, t: (i[:-1], t, 1.0, 0.0), ValueError, "same shape"),
    (lambda i, t: (i[0], t[0], 1.0, 0.0), ValueError, "(B, D)"),
    (lambda i, t: (i.int(), t.int(), 1.0, 0.0), TypeError, "image_features must be"),
    (lambda i, t: (i, t, 1.0, torch.zeros(3)), ValueError, "logit_bias must be a scalar"),
    (lambda i, t: (i, t, torch.ones(1, 2), 0.0), ValueError, "logit_scale must be a scalar"),
    (lambda i, t: (i.to("meta"), t, 1.0, 0.0), ValueError, "same device"),
], ids=["B", "1-D", "int", "bias-vector", "scale-matrix", "devices"])
def test_bad_input(bad, exc, words):
    import re
    with pytest.raises(exc, match=re.escape(words)):
        LOSS(*bad(torch.randn(4, 3), torch.randn(4, 3)))
