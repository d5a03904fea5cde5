"""SigLIP: parity against a float64 eager reference on every backend, the generic op contract
(tests/contract.py), bad input, and the SigLipLoss module."""
import re

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from backends import all_backends, device, interpreted
from contract import ContractTests, OpContract
from contrastive_cases import check_against_float64, check_against_peer, make_inputs
from oracle import FP32_RTOL, as64, assert_close

LOSS = mmkernels.siglip_loss
SHAPES = [(1, 1), (2, 7), (7, 33), (127, 64), (257, 129), (1000, 31)]


def make(b, d, dtype, **kw):
    inputs = make_inputs(b, d, dtype, device=device(), **kw)
    if inputs[3] is not None:  # SigLIP's bias starts near −10: keep it in that regime
        inputs[3].data.sub_(10.0)
    return inputs


def eager(image, text, scale, bias):
    """open_clip's formula in the input dtype."""
    dtype = image.dtype
    logits = scale.to(dtype) * image @ text.T + bias.to(dtype)
    labels = 2 * torch.eye(image.shape[0], dtype=dtype, device=image.device) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def opcheck_calls(inputs, backend):
    image, text, scale, bias = inputs
    op = torch.ops.mmkernels.siglip_fwd.default
    calls = []
    for b in (bias, None):
        calls.append((op, (image, text, scale, b, True, backend)))
        plain = [None if x is None else x.detach() for x in (image, text, scale, b)]
        calls.append((op, (*plain, False, backend)))
    return calls


def peer(backend):
    check_against_peer(mmkernels.nn.SigLipLoss(backend=backend), "SigLipLoss",
                       make(33, 16, torch.float32, bias=True), FP32_RTOL)


class TestSigLIPContract(ContractTests):
    contract = OpContract(
        fn=LOSS,
        make=lambda shape, dtype, **kw: make(*shape, dtype, **{"bias": True, **kw}),
        eager=eager,
        check_fp32=lambda inputs, rtol, **kw: check_against_float64(LOSS, inputs, rtol, **kw),
        shapes=dict(lowp=(257, 129), lowp_interpreter=(127, 64), extreme=(64, 48),
                    float64=(127, 33), small=(9, 5), gradcheck=(6, 5), compile=(33, 16)),
        nan_targets={"image": 0, "text": 1, "bias": 3},
        extreme=dict(norm=30.0, scale=100.0),
        opcheck_calls=opcheck_calls,
        peer=peer,
    )


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("bias,noncontig", [(True, False), (False, True)], ids=["bias", "strided"])
def test_parity_fp32(backend, b, d, bias, noncontig):
    if interpreted(backend) and (b > 257 or (b == 257 and noncontig)):
        pytest.skip("interpreter: shapes kept small (257 runs in one config)")
    inputs = make(b, d, torch.float32, bias=bias, noncontig=noncontig)
    check_against_float64(LOSS, inputs, FP32_RTOL, backend=backend)


@pytest.mark.parametrize("backend", all_backends())
def test_no_grad_forward(backend):
    """Without autograd the forward skips the gradient work and still gives the loss."""
    image, text, scale, bias = make(33, 16, torch.float32, bias=True)
    with torch.no_grad():
        loss = LOSS(image, text, scale, bias, backend=backend)
    ref = LOSS(*as64(image, text, scale, bias), backend="reference")
    assert not loss.requires_grad
    assert_close(loss, ref, FP32_RTOL)


@pytest.mark.parametrize("bad,exc,words", [
    (lambda i, t: (i[:-1], t, 1.0, 0.0), ValueError, "same shape"),
    (lambda i, t: (i[0], t[0], 1.0, 0.0), ValueError, "(B, D)"),
    (lambda i, t: (i.int(), t.int(), 1.0, 0.0), TypeError, "image_features must be"),
    (lambda i, t: (i, t, 1.0, torch.zeros(3)), ValueError, "logit_bias must be a scalar"),
    (lambda i, t: (i, t, torch.ones(1, 2), 0.0), ValueError, "logit_scale must be a scalar"),
    (lambda i, t: (i.to("meta"), t, 1.0, 0.0), ValueError, "same device"),
], ids=["B", "1-D", "int", "bias-vector", "scale-matrix", "devices"])
def test_bad_input(bad, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        LOSS(*bad(torch.randn(4, 3), torch.randn(4, 3)))
