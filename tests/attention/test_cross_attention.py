"""mmkernels.cross_attention / cross_attention_varlen on every backend, through the public API:
parity with the float64 reference (out and the gradients of q, k, v), the shared contract
(low precision, extremes, NaN, gradcheck, double backward, opcheck, compile), dropout, empty
and fully-masked rows, and bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.attention import reference
from attention_cases import (DENSE_SHAPES, DENSE_SHAPES_INTERPRETER, VARLEN_CASES, cu_seqlens,
                             dense, oracle, varlen)
from backends import all_backends, device, fast_backends, interpreted
from contract import ContractTests, OpContract
from oracle import FP32_RTOL, FP64_RTOL, assert_close

ATTN = mmkernels.cross_attention


def _shapes(backend):
    return DENSE_SHAPES_INTERPRETER if interpreted(backend) else DENSE_SHAPES


def check(backend, q, k, v, rtol=FP32_RTOL, **kw):
    """out and the gradients of Σ w·out (random w) against the float64 oracle."""
    out = ATTN(q, k, v, backend=backend, **kw) if q.dim() == 4 else \
        mmkernels.cross_attention_varlen(q, k, v, backend=backend, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + v.shape[-1:]
    w = torch.randn_like(out, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), w.to(out.dtype))
    ref, _, ref_grads = oracle(q, k, v, w, **kw)
    assert_close(out, ref, rtol, "out")
    # dS = P∘(dP − rowsum(dO∘O)) cancels exactly where a row's probabilities are one-hot (Lk = 1,
    # confident rows): the gradient there is ~0 and the error floor is absolute, set by the
    # size of the terms that cancel.
    big = max(x.detach().abs().max().item() for x in (q, k, v)) if q.numel() else 1.0
    scale = abs(kw.get("scale") or 1.0 / math.sqrt(q.shape[-1]))
    atol = rtol * w.norm().item() * big * big * max(scale, 1.0)
    for name, x, g, r in zip("qkv", (q, k, v), grads, ref_grads):
        assert g.dtype == x.dtype
        assert_close(g, r, rtol, f"d{name}", atol=atol if name != "v" else None)
    return out, grads


# ---------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("mask", [None, "suffix", "dead"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_parity_dense(backend, mask, layout):
    for shape in _shapes(backend):
        q, k, v, m = dense(*shape, device=device(), layout=layout, mask=mask)
        check(backend, q, k, v, key_padding_mask=m)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("lq,lk", [(5, 19), (19, 5), (7, 7)])
def test_parity_causal(backend, lq, lk):
    """Bottom-right alignment: with Lq > Lk the first Lq − Lk rows see nothing (zeros)."""
    q, k, v, m = dense(2, 4, 2, lq, lk, 16, 24, device=device(), mask="random")
    out, _ = check(backend, q, k, v, key_padding_mask=m, causal=True)
    if lq > lk:
        assert (out[:, :, :lq - lk] == 0).all()


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("lens", VARLEN_CASES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_parity_varlen(backend, lens, causal):
    q, k, v, cq, ck = varlen(*lens, 4, 2, 24, 40, device=device())
    check(backend, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal)


@pytest.mark.parametrize("backend", all_backends())
def test_varlen_equals_dense_per_sequence(backend):
    """A packed batch gives each sequence what the dense op gives it alone."""
    lens_q, lens_k = [3, 9, 1], [7, 2, 12]
    q, k, v, cq, ck = varlen(lens_q, lens_k, 2, 1, 8, 8, device=device(), requires_grad=False)
    out = mmkernels.cross_attention_varlen(q, k, v, cq, ck, backend=backend)
    for s in range(3):
        a, b, c, d = cq[s].item(), cq[s + 1].item(), ck[s].item(), ck[s + 1].item()
        one = ATTN(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                   v[c:d].transpose(0, 1)[None], backend=backend)
        assert_close(out[a:b], one[0].transpose(0, 1), FP32_RTOL)


@pytest.mark.parametrize("lens", VARLEN_CASES + [([6, 7, 5, 6], [64, 60, 64, 1])], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_varlen_padded_equals_per_sequence(lens, causal, dropout_p):
    """The reference runs a packed batch as one padded dense call (when padding at most
    quadruples the work): the same out, lse, dropout mask and gradients as a dense call per
    sequence, with GQA, empty sequences and per-sequence causal alignment."""
    q, k, v, cq, ck = varlen(*lens, 4, 2, 8, 12, dtype=torch.float64)
    args = (cq, ck, causal, 0.35, dropout_p, 1234)
    out, lse = reference.forward(q, k, v, None, *args)
    loop_out, loop_lse = reference._varlen_loop(q, k, v, *args)
    assert_close(out, loop_out, 1e-13, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(loop_lse))
    finite = torch.isfinite(loop_lse)
    assert_close(lse[finite], loop_lse[finite], 1e-13, "lse")
    w = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad((out * w).sum(), (q, k, v)),
                          torch.autograd.grad((loop_out * w).sum(), (q, k, v))):
        assert_close(a, b, 1e-13, f"grad {name}")


@pytest.mark.parametrize("backend", all_backends())
def test_fully_masked_rows_zero_out_and_grads(backend):
    q, k, v, m = dense(3, 2, 2, 5, 9, 8, 8, device=device(), mask="dead")
    out = ATTN(q, k, v, key_padding_mask=m, backend=backend)
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    assert (gq[0] == 0).all() and (gk[0] == 0).all() and (gv[0] == 0).all()
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all() and torch.isfinite(gv).all()


@pytest.mark.parametrize("backend", all_backends())
def test_empty_and_size_one(backend):
    # Lq = 0, B = 0, Lk = 0 (every row sees nothing), and the size-1 corner.
    for shape in [(1, 1, 1, 0, 3, 4, 4), (0, 2, 2, 3, 3, 4, 4), (2, 1, 1, 3, 0, 4, 5),
                  (1, 1, 1, 1, 1, 1, 1)]:
        q, k, v, _ = dense(*shape, device=device())
        out = ATTN(q, k, v, backend=backend)
        assert out.shape == q.shape[:-1] + v.shape[-1:]
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        if shape[4] == 0:
            assert (out == 0).all()
    q, k, v, cq, ck = varlen([0, 0], [0, 3], 2, 2, 4, 4, device=device())
    assert mmkernels.cross_attention_varlen(q, k, v, cq, ck, backend=backend).shape == (0, 2, 4)


@pytest.mark.parametrize("backend", fast_backends())
def test_scale_and_numpy_scalars(backend):
    q, k, v, _ = dense(1, 2, 2, 7, 9, 16, 16, device=device())
    for scale in (0.3, np.float32(0.3), np.float64(2.0), -1.5):
        check(backend, q, k, v, scale=scale)
    out = ATTN(q, k, v, dropout_p=np.float64(0.0), causal=np.bool_(True), backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", fast_backends())
def test_deterministic(backend):
    q, k, v, m = dense(2, 4, 1, 9, 33, 16, 8, device=device(), mask="suffix")
    a = ATTN(q, k, v, key_padding_mask=m, backend=backend)
    b = ATTN(q, k, v, key_padding_mask=m, backend=backend)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_gradcheck_masked_causal_varlen():
    """float64 gradcheck through the C++ kernels with a mask, causal, GQA and varlen."""
    if "cpu" not in mmkernels.available_backends():
        pytest.skip("the C++ extension is not built")
    q, k, v, m = dense(2, 2, 1, 4, 6, 3, 5, mask="random")
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    torch.autograd.gradcheck(
        lambda q, k, v: ATTN(q, k, v, key_padding_mask=m, causal=True, backend="cpu"), (q, k, v))
    q, k, v, cq, ck = varlen([2, 0, 3], [3, 2, 4], 2, 2, 3, 4)
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    torch.autograd.gradcheck(
        lambda q, k, v: mmkernels.cross_attention_varlen(q, k, v, cq, ck, backend="cpu"),
        (q, k, v))


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", fast_backends())
def test_dropout_matches_reference_mask(backend):
    """The kernels draw the reference's mask from the same seed: out and gradients agree,
    which also checks that the backward regenerates the forward's mask."""
    q, k, v, m = dense(2, 4, 2, 9, 40, 16, 24, device=device(), mask="suffix")
    w = torch.randn(2, 4, 9, 24, device=device())
    results = []
    for name in (backend, "reference"):
        torch.manual_seed(1234)
        out = ATTN(q, k, v, key_padding_mask=m, dropout_p=0.3, backend=name)
        results.append((out, torch.autograd.grad(out, (q, k, v), w)))
    (out, grads), (ref, ref_grads) = results
    assert_close(out, ref, FP32_RTOL, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, FP32_RTOL, "grad")


@pytest.mark.parametrize("backend", fast_backends())
def test_dropout_same_seed_same_result(backend):
    q, k, v, _ = dense(1, 2, 2, 8, 16, 8, 8, device=device())
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out = ATTN(q, k, v, dropout_p=0.5, backend=backend)
        runs.append((out, torch.autograd.grad(out.sum(), (q, k, v))))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    torch.manual_seed(8)
    assert not torch.equal(ATTN(q, k, v, dropout_p=0.5, backend=backend), runs[0][0])


@pytest.mark.slow
def test_dropout_under_compile_is_repeatable():
    """Compiled, the seed comes from Inductor's RNG (as for torch's dropout): the same
    manual_seed repeats the compiled result, another seed changes it."""
    q, k, v, _ = dense(2, 4, 2, 5, 7, 8, 6, device=device(), requires_grad=False)
    torch._dynamo.reset()
    step = torch.compile(lambda q, k, v: ATTN(q, k, v, dropout_p=0.2), fullgraph=True)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(step(q, k, v))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", fast_backends())
def test_dropout_keep_fraction_and_unbiased(backend):
    """With v = identity rows the output is the kept, rescaled probabilities: the kept
    fraction is 1 − p, and the mean over seeds approaches the dropout-free output."""
    p, lk = 0.25, 64
    q = torch.randn(1, 1, 32, 8, device=device())
    k = torch.randn(1, 1, lk, 8, device=device())
    v = torch.eye(lk, device=device())[None, None]
    plain = ATTN(q, k, v, backend=backend)
    outs = torch.stack([ATTN(q, k, v, dropout_p=p, backend=backend) for _ in range(200)])
    kept = (outs != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.01, kept
    # E[out] = plain; the mean of 200 draws has a standard error of ~√(p/(1−p)/200)·plain.
    err = (outs.double().mean(0) - plain).norm() / plain.norm()
    assert err < 4 * math.sqrt(p / (1 - p) / 200), err.item()


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def _good():
    return dense(2, 4, 2, 3, 5, 8, 8, requires_grad=False)


@pytest.mark.parametrize("mutate,error,words", [
    (lambda q, k, v, m: (q[0], k, v, m), ValueError, "q must have shape (B, H, Lq, Dqk)"),
    (lambda q, k, v, m: (q, k[:1], v[:1], m), ValueError, "same batch size"),
    (lambda q, k, v, m: (q[:, :3], k, v, m), ValueError, "must divide the query heads"),
    (lambda q, k, v, m: (q, k, v[:, :, :4], m), ValueError, "agree on all but the last"),
    (lambda q, k, v, m: (q[..., :4], k, v, m), ValueError, "same head dim Dqk"),
    (lambda q, k, v, m: (q.double(), k, v, m), TypeError, "same dtype"),
    (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), TypeError, "q must be float16"),
    (lambda q, k, v, m: ("q", k, v, m), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v, m: (q, k, v, torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool"),
    (lambda q, k, v, m: (q, k, v, torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     "key_padding_mask must have shape (B, Lk)"),
])
def test_bad_input_dense(mutate, error, words):
    q, k, v, m = mutate(*_good())
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        ATTN(q, k, v, key_padding_mask=m)


@pytest.mark.parametrize("kw,error,words", [
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    (dict(scale="x"), TypeError, "scale must be None or a finite"),
    (dict(scale=float("nan")), TypeError, "scale must be None or a finite"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(backend="gpu"), ValueError, "backend must be"),
])
def test_bad_options(kw, error, words):
    q, k, v, _ = _good()
    with pytest.raises(error, match=words):
        ATTN(q, k, v, **kw)


def test_head_dim_limit():
    q, k, v, _ = dense(1, 1, 1, 2, 2, 257, 8, requires_grad=False)
    with pytest.raises(ValueError, match=r"Dqk must be in \[1, 256\]"):
        ATTN(q, k, v)


@pytest.mark.parametrize("cq,error,words", [
    (torch.tensor([0, 2, 5], dtype=torch.int64), TypeError, "must be int32"),
    (torch.tensor([1, 2, 5], dtype=torch.int32), ValueError, "must start at 0"),
    (torch.tensor([0, 3, 2, 5], dtype=torch.int32), ValueError, "nondecreasing"),
    (torch.tensor([0, 2, 4], dtype=torch.int32), ValueError, "must end at the packed length 5"),
    (torch.tensor([[0, 2, 5]], dtype=torch.int32), ValueError, r"shape \(N \+ 1,\)"),
    (torch.tensor([0, 5], dtype=torch.int32), ValueError, "same number of sequences"),
])
def test_bad_cu_seqlens(cq, error, words):
    q, k, v, _, ck = varlen([2, 3], [4, 1], 2, 2, 8, 8, requires_grad=False)
    with pytest.raises(error, match=words):
        mmkernels.cross_attention_varlen(q, k, v, cq, ck)


def test_bad_max_seqlen_and_rank():
    q, k, v, cq, ck = varlen([2, 3], [4, 1], 2, 2, 8, 8, requires_grad=False)
    with pytest.raises(ValueError, match="max_seqlen_q=2 is shorter than the longest"):
        mmkernels.cross_attention_varlen(q, k, v, cq, ck, max_seqlen_q=2)
    with pytest.raises(ValueError, match=r"q must have shape \(Tq, H, Dqk\)"):
        mmkernels.cross_attention_varlen(q[None], k, v, cq, ck)


# ---------------------------------------------------------------------------------------
# The shared contract
# ---------------------------------------------------------------------------------------

def _make(shape, dtype, noncontig=False, layout="contiguous", scale=1.0):
    layout = "strided" if noncontig else layout
    return dense(*shape, dtype=dtype, device=device(), layout=layout, scale=scale)[:3]


def _eager(q, k, v):
    """What users write today, in the inputs' dtype."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v


def _check_fp32(inputs, rtol, backend="auto", **kw):
    check(backend, *inputs, rtol=rtol, **kw)


def _opcheck_calls(inputs, backend):
    q, k, v = inputs
    fwd, bwd = torch.ops.mmkernels.attention_fwd.default, torch.ops.mmkernels.attention_bwd.default
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    mask = torch.rand(B, Lk, device=q.device) < 0.3
    seed = torch.tensor(99, device=q.device)
    calls = []
    for m, causal, p in ((None, False, 0.0), (mask, True, 0.2)):
        args = (q, k, v, m, None, None, Lq, Lk, causal, 0.5, p, seed if p else None, backend)
        calls.append((fwd, args))
        with torch.no_grad():
            out, lse, tf32 = fwd(*args)
        calls.append((bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                            m, None, None, Lq, Lk, causal, 0.5, p, seed if p else None, backend,
                            tf32)))
    return calls


def _peer(backend):
    """SDPA (users' current call) with the mask in its polarity and enable_gqa."""
    q, k, v, m = dense(2, 8, 2, 9, 40, 16, 16, device=device(), mask="suffix")
    ours = ATTN(q, k, v, key_padding_mask=m, backend=backend)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=~m[:, None, None, :],
                                            enable_gqa=True)
    assert_close(ours, theirs, FP32_RTOL)


class TestCrossAttentionContract(ContractTests):
    contract = OpContract(
        fn=ATTN,
        make=_make,
        eager=_eager,
        check_fp32=_check_fp32,
        shapes=dict(lowp=(2, 8, 2, 127, 257, 64, 64), lowp_interpreter=(1, 4, 2, 33, 40, 32, 16),
                    extreme=(2, 4, 2, 17, 65, 32, 16), float64=(2, 4, 2, 33, 65, 40, 24),
                    small=(1, 2, 1, 5, 7, 8, 4), gradcheck=(1, 2, 1, 3, 5, 4, 3),
                    compile=(2, 4, 2, 9, 17, 16, 8)),
        nan_targets={"q": 0, "k": 1, "v": 2},
        # Inputs ×5: scores with a standard deviation of ~25, softmax rows nearly one-hot.
        extreme=dict(scale=5.0),
        opcheck_calls=_opcheck_calls,
        peer=_peer,
        gradcheck_kwargs=[dict(), dict(causal=True, scale=0.7)],
    )


def test_cu_seqlens_helper():
    assert cu_seqlens([2, 0, 3]).tolist() == [0, 2, 2, 5]


def test_float64_end_to_end_varlen():
    if "cpu" not in mmkernels.available_backends():
        pytest.skip("the C++ extension is not built")
    q, k, v, cq, ck = varlen([5, 0, 9], [3, 4, 11], 4, 2, 8, 16, dtype=torch.float64)
    check("cpu", q, k, v, rtol=FP64_RTOL, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True)
