"""GPU-only checks of cross-attention (``pytest -m gpu``; skipped without CUDA): what the Triton
interpreter cannot show — bf16, TF32 against its own oracle, large shapes, and agreement with
SDPA's flash kernel. The backend-parametrized tests of test_cross_attention.py also run on CUDA
tensors there."""
import math

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from attention_cases import dense, oracle, varlen
from oracle import FP32_RTOL, TF32_RTOL, assert_close, low_precision_rtol, round_tf32

pytestmark = pytest.mark.gpu

SHAPES = [(4, 16, 4, 127, 577, 64, 64), (2, 8, 8, 1024, 1024, 128, 128),
          (8, 8, 1, 33, 257, 40, 72), (2, 4, 2, 300, 70, 256, 256)]


def _eager(q, k, v, mask):
    """The same computation in the inputs' dtype (the flash-attention rule's yardstick)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


@pytest.fixture
def precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(shape, dtype):
    q, k, v, m = dense(*shape, dtype=dtype, device="cuda", layout="transposed", mask="suffix")
    w = torch.randn(*shape[:2], shape[3], shape[6], device="cuda")
    out = mmkernels.cross_attention(q, k, v, key_padding_mask=m, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), w.to(dtype))
    eager = _eager(q, k, v, m)
    eager_grads = torch.autograd.grad(eager, (q, k, v), w.to(dtype))
    ref, _, ref_grads = oracle(q, k, v, w, key_padding_mask=m)
    assert_close(out, ref, low_precision_rtol(eager, ref, 2), "out")
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert_close(g, r, low_precision_rtol(e, r, 3), "gradient")


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_fp32_exact_and_tf32(shape, precision):
    q, k, v, m = dense(*shape, device="cuda", mask="random")
    w = torch.randn(*shape[:2], shape[3], shape[6], device="cuda")
    precision("highest")
    out = mmkernels.cross_attention(q, k, v, key_padding_mask=m, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), w)
    ref, _, ref_grads = oracle(q, k, v, w, key_padding_mask=m)
    assert_close(out, ref, FP32_RTOL, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, FP32_RTOL, "gradient")
    # TF32: compared with an oracle fed the TF32-rounded operands the kernels see (q, k, v, dO;
    # P and dS are rounded inside, which the oracle cannot mirror: hence 1e-3 on gradients, as
    # in test_attention_triton.py).
    precision("high")
    out = mmkernels.cross_attention(q, k, v, key_padding_mask=m, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), w)
    rq, rk, rv = (round_tf32(x.detach()) for x in (q, k, v))
    ref, _, ref_grads = oracle(rq, rk, rv, round_tf32(w), key_padding_mask=m)
    assert_close(out, ref, TF32_RTOL, "tf32 out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-3, "tf32 gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_as_accurate_as_sdpa_flash(dtype):
    """Against the kernel users have on a GPU: SDPA's flash backend in the same dtype. Ours is
    within 2× its error (forward) and 3× (gradients), plain and causal (square, where SDPA's
    top-left and our bottom-right alignment agree)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, _ = dense(4, 8, 8, 513, 513, 64, 64, dtype=dtype, device="cuda")
    w = torch.randn(4, 8, 513, 64, device="cuda")
    for causal in (False, True):
        out = mmkernels.cross_attention(q, k, v, causal=causal, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), w.to(dtype))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        their_grads = torch.autograd.grad(theirs, (q, k, v), w.to(dtype))
        ref, _, ref_grads = oracle(q, k, v, w, causal=causal)
        assert_close(out, ref, low_precision_rtol(theirs, ref, 2), f"out causal={causal}")
        for g, t, r in zip(grads, their_grads, ref_grads):
            assert_close(g, r, low_precision_rtol(t, r, 3), f"gradient causal={causal}")


def test_varlen_large():
    """A packed bf16 batch with empty sequences, within 2× (3× for gradients) the error of the
    same computation done eagerly in bf16, sequence by sequence."""
    lens_q = torch.randint(0, 200, (64,)).tolist()
    lens_k = torch.randint(0, 600, (64,)).tolist()
    q, k, v, cq, ck = varlen(lens_q, lens_k, 8, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    out = mmkernels.cross_attention_varlen(q, k, v, cq, ck, backend="triton")
    w = torch.randn(out.shape, device="cuda").to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), w)
    eager = []
    for s in range(64):
        a, b, c, d = cq[s].item(), cq[s + 1].item(), ck[s].item(), ck[s + 1].item()
        if d == c:
            eager.append(out.new_zeros(b - a, 8, 64))
            continue
        one = _eager(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                     v[c:d].transpose(0, 1)[None], None)
        eager.append(one[0].transpose(0, 1))
    eager = torch.cat(eager)
    eager_grads = torch.autograd.grad(eager, (q, k, v), w)
    ref, _, ref_grads = oracle(q, k, v, w, cu_seqlens_q=cq, cu_seqlens_k=ck)
    assert_close(out, ref, low_precision_rtol(eager, ref, 2), "out")
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert_close(g, r, low_precision_rtol(e, r, 3), "gradient")
