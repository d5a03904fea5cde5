"""The host-side math shared by the fast backends (diagonal terms, label smoothing, scale and
bias gradients), checked with dense float64 primitives so that no kernel is involved."""
import pytest
import torch

from mmkernels.contrastive import infonce, reference, siglip
from mmkernels.distributed import LOCAL
from contrastive_cases import DensePrimitives, features
from oracle import FP64_RTOL, assert_close, log_uniform


@pytest.mark.parametrize("b,d", [(1, 1), (2, 7), (7, 3), (33, 16)])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("keep", ["none", "half", "all"])
def test_infonce_host_math(b, d, eps, with_bias, keep):
    image = features(b, d, torch.float64, norm=None).requires_grad_()
    text = features(b, d, torch.float64, norm=None).requires_grad_()
    scale = torch.tensor(log_uniform(1, 100), dtype=torch.float64, requires_grad=True)
    bias = torch.randn((), dtype=torch.float64, requires_grad=True) if with_bias else None
    weights = torch.rand(b, dtype=torch.float64) + 0.5

    loss, row_lse, col_lse, excess, tiles = infonce._forward(
        DensePrimitives, LOCAL, image, text, scale, bias, eps,
        {"none": 0, "half": b // 2, "all": b}[keep])
    grads = infonce._backward(DensePrimitives, LOCAL, weights, image, text, scale, bias,
                              row_lse, col_lse, excess, eps, tiles)

    inputs = [image, text, scale] + ([bias] if with_bias else [])
    ref = reference.infonce_loss(image, text, scale, bias, eps)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    assert_close(loss, ref, FP64_RTOL, "loss")
    for name, g, r in zip(["image", "text", "scale", "bias"], grads, ref_grads):
        # InfoNCE's d_bias is analytically 0: a sum of O(Σ|w|) terms that cancel, so its floor
        # is a few float64 roundings of that size.
        atol = 64 * torch.finfo(torch.float64).eps * weights.abs().sum().item() \
            if name == "bias" else None
        assert_close(g, r, FP64_RTOL, f"d_{name}", atol)


@pytest.mark.parametrize("b,d", [(1, 1), (2, 7), (7, 3), (33, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_siglip_host_math(b, d, with_bias):
    image = features(b, d, torch.float64, norm=None).requires_grad_()
    text = features(b, d, torch.float64, norm=None).requires_grad_()
    scale = torch.tensor(log_uniform(1, 100), dtype=torch.float64, requires_grad=True)
    bias = torch.randn((), dtype=torch.float64, requires_grad=True) if with_bias else None

    loss, *grads = siglip._forward(DensePrimitives, LOCAL, image, text, scale, bias, True)

    inputs = [image, text, scale] + ([bias] if with_bias else [])
    ref = reference.siglip_loss(image, text, scale, bias)
    ref_grads = torch.autograd.grad(ref, inputs)
    assert_close(loss, ref, FP64_RTOL, "loss")
    for name, g, r in zip(["image", "text", "scale", "bias"], grads, ref_grads):
        assert_close(g, r, FP64_RTOL, f"d_{name}")
