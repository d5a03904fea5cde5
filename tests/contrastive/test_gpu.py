"""GPU-only checks of the contrastive losses (``pytest -m gpu``; skipped without CUDA): what the
Triton interpreter cannot show — TF32 against its own oracle, bf16, and large shapes. The
backend-parametrized tests of test_infonce.py / test_siglip.py also run on CUDA tensors there."""
import pytest
import torch

import mmkernels
from contrastive_cases import make_inputs
from oracle import FP32_RTOL, TF32_RTOL, as64, assert_close, loss_and_grads, \
    low_precision_rtol, round_tf32

pytestmark = pytest.mark.gpu
LOSSES = {"infonce": mmkernels.infonce_loss, "siglip": mmkernels.siglip_loss}


def _inputs(b, d, dtype):
    inputs = make_inputs(b, d, dtype, bias=True, device="cuda")
    inputs[3].data.sub_(10.0)  # a SigLIP-like bias; harmless for InfoNCE
    return inputs


@pytest.fixture
def precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("b,d", [(257, 129), (4099, 768)])
def test_fp32_exact_and_tf32(loss, b, d, precision):
    """'highest' (torch's default) is exact fp32; 'high' is TF32 on operands rounded to nearest,
    compared with a float64 reference fed the same rounded operands."""
    fn = LOSSES[loss]
    inputs = _inputs(b, d, torch.float32)
    ref, ref_grads = loss_and_grads(fn, as64(*inputs), backend="reference")
    precision("highest")
    out, grads = loss_and_grads(fn, inputs, backend="triton")
    assert_close(out, ref, FP32_RTOL, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, FP32_RTOL)
    precision("high")
    out, grads = loss_and_grads(fn, inputs, backend="triton")
    rounded = [round_tf32(x) if x.dim() == 2 else x for x in inputs]
    ref, ref_grads = loss_and_grads(fn, as64(*rounded), backend="reference")
    assert_close(out, ref, FP32_RTOL, "tf32 loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, TF32_RTOL, "tf32 gradient")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(257, 129), (16384, 768)])
def test_low_precision(loss, dtype, b, d):
    """bf16/fp16 within 2× (3× for gradients) the same-dtype eager error."""
    fn = LOSSES[loss]
    inputs = _inputs(b, d, dtype)
    image, text, scale, bias = inputs
    logits = scale.to(dtype) * image @ text.T + bias.to(dtype)
    if loss == "infonce":
        labels = torch.arange(b, device="cuda")
        eager = (torch.nn.functional.cross_entropy(logits, labels)
                 + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    else:
        signs = 2 * torch.eye(b, device="cuda", dtype=dtype) - 1
        eager = -torch.nn.functional.logsigmoid(signs * logits).sum() / b
    eager_grads = torch.autograd.grad(eager, inputs)
    out, grads = loss_and_grads(fn, inputs, backend="triton")
    ref, ref_grads = loss_and_grads(fn, as64(*inputs), backend="reference")
    assert_close(out, ref, low_precision_rtol(eager, ref, 2), "loss")
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert_close(g, r, low_precision_rtol(e, r, 3), "gradient")
