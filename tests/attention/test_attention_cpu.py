"""The C++ attention ops (torch.ops.mmkernels.attention_cpu_fwd / attention_cpu_bwd) called
directly: out, lse and dq/dk/dv against the float64 oracle of attention_cases.py (dense, varlen,
masks, causal, grouped heads, layouts, every dtype, dropout), the fully-masked and NaN rules,
determinism, torch.library.opcheck, and bad calls that must raise instead of crashing.

The ops have no autograd of their own (the Python layer wires them), so gradcheck does not
apply here; the gradients are checked against the oracle's autograd instead.
"""
import math

import pytest
import torch

from attention_cases import (DENSE_SHAPES, VARLEN_CASES, cu_seqlens, default_scale, dense,
                             oracle, varlen)
from mmkernels import _cpp
from oracle import FP32_RTOL, FP64_RTOL, assert_close, low_precision_rtol

pytestmark = pytest.mark.skipif(_cpp.load() is None,
                                reason=f"C++ extension not loaded: {_cpp.error()}")

from mmkernels.attention import cpu  # noqa: E402  (registers the fakes)

OPS = torch.ops.mmkernels if _cpp.load() is not None else None
MASKS = ["none", "suffix", "random", "dead"]
INF = float("inf")


def run(q, k, v, grad_out=None, *, mask=None, cq=None, ck=None, causal=False, scale=None,
        dropout_p=0.0, seed=0):
    """The two ops as a backend would call them: (out, lse, (dq, dk, dv) or None)."""
    scale = default_scale(q) if scale is None else scale
    seed_t = torch.tensor(seed, dtype=torch.int64) if dropout_p > 0 else None
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = OPS.attention_cpu_fwd(q, k, v, mask, cq, ck, causal, scale, dropout_p, seed_t)
    if grad_out is None:
        return out, lse, None
    grads = OPS.attention_cpu_bwd(grad_out, q, k, v, out, lse, mask, cq, ck, causal, scale,
                                  dropout_p, seed_t)
    return out, lse, grads


def assert_lse_close(lse, ref, rtol, what="lse"):
    """Dead rows (+inf) exactly where the reference has them; elsewhere |lse - ref| <=
    rtol (1 + |ref|): the log-sum-exp carries the scores' absolute rounding."""
    ref = ref.detach()
    assert lse.shape == ref.shape, (lse.shape, ref.shape)
    dead = torch.isinf(ref)
    assert torch.equal(torch.isinf(lse), dead), f"{what}: dead rows differ"
    assert (lse[dead] == INF).all(), f"{what}: dead rows must have lse = +inf"
    err = (lse[~dead].double() - ref[~dead]).abs()
    bound = rtol * (1 + ref[~dead].abs())
    assert (err <= bound).all(), f"{what}: max error {err.max():.3e}"


def check(q, k, v, *, rtol, grad_rtol=None, lse_rtol=None, **kw):
    """Forward and backward of the ops against the float64 oracle."""
    go = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    out, lse, grads = run(q, k, v, go, **kw)
    ref_kw = {"key_padding_mask": kw.get("mask"), "cu_seqlens_q": kw.get("cq"),
              "cu_seqlens_k": kw.get("ck"), "causal": kw.get("causal", False),
              "scale": kw.get("scale"), "dropout_p": kw.get("dropout_p", 0.0),
              "seed": kw.get("seed", 0)}
    ref_out, ref_lse, ref_grads = oracle(q, k, v, go, **ref_kw)
    assert out.dtype == q.dtype and out.is_contiguous()
    assert lse.is_contiguous() and lse.dtype == (torch.float64 if q.dtype == torch.float64
                                                 else torch.float32)
    assert_close(out, ref_out, rtol, "out")
    assert_lse_close(lse, ref_lse, rtol if lse_rtol is None else lse_rtol)
    # Absolute floor: with a single visible key the gradients of q and k cancel to ~0, and
    # what is left is rounding at the scale of grad_out.
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    for name, g, ref, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape and g.is_contiguous(), name
        assert_close(g, ref, grad_rtol, name, atol=grad_rtol * go.double().norm().item())
    return out, lse, grads


# ---------------------------------------------------------------------------------------
# Against the oracle: dense, varlen, layouts, dtypes
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dense(dtype, shape, mask, causal):
    q, k, v, m = dense(*shape, dtype=dtype, mask=mask)
    check(q, k, v, mask=m, causal=causal, rtol=FP32_RTOL if dtype == torch.float32 else FP64_RTOL)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dense_layouts(dtype, shape, layout):
    q, k, v, m = dense(*shape, dtype=dtype, layout=layout, mask="random")
    assert not q.is_contiguous() or shape[1] == 1 or shape[3] == 1
    check(q, k, v, mask=m, causal=True, rtol=FP32_RTOL if dtype == torch.float32 else FP64_RTOL)


def test_expanded_inputs():
    """Stride-0 views: K/V broadcast over batch and heads, and the grad_out of out.sum()."""
    q = torch.randn(3, 4, 9, 16)
    k = torch.randn(1, 1, 70, 16).expand(3, 2, 70, 16)
    v = torch.randn(1, 70, 1, 8).expand(3, 70, 2, 8).transpose(1, 2)
    go = torch.ones(()).expand(3, 4, 9, 8)
    out, lse, grads = run(q, k, v, go, causal=True)
    ref_out, ref_lse, ref_grads = oracle(q, k, v, go, causal=True)
    assert_close(out, ref_out, FP32_RTOL, "out")
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref, FP32_RTOL, name)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("heads", [(1, 1), (4, 4), (6, 2)], ids=lambda h: f"H{h[0]}Hk{h[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", VARLEN_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_varlen(dtype, lens, causal, heads, layout):
    q, k, v, cq, ck = varlen(*lens, *heads, 24, 40, dtype=dtype, layout=layout)
    check(q, k, v, cq=cq, ck=ck, causal=causal,
          rtol=FP32_RTOL if dtype == torch.float32 else FP64_RTOL)


def test_varlen_transposed_heads():
    """(T, H, D) views of (H, T, D) memory: the token stride is D, the head stride T*D."""
    q, k, v, cq, ck = varlen([5, 70], [130, 3], 4, 2, 16, 8, requires_grad=False)
    q, k, v = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    check(q, k, v, cq=cq, ck=ck, causal=True, rtol=FP32_RTOL)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 130, 600, 64, 48), (1, 2, 1, 300, 90, 32, 32),
                                   (3, 2, 2, 65, 257, 16, 16)], ids=str)
def test_many_blocks(shape, causal):
    """Several query and key blocks per task (both passes' tile edges), padding included."""
    q, k, v, m = dense(*shape, mask="suffix")
    check(q, k, v, mask=m, causal=causal, rtol=FP32_RTOL)


@pytest.mark.parametrize("lq", [1, 2, 5, 6, 8, 9, 16, 17, 70])
def test_few_query_rows(lq):
    """fp32 query blocks of up to 16 rows run without BLAS (dot products up to 5 rows, rows as
    vector lanes up to 16; 70 = a BLAS block and a 6-row block): masks, causal with Lq > Lk
    and Lq < Lk, dropout, GQA, odd head dims; 2100 keys = several key blocks of the lanes
    path."""
    q, k, v, m = dense(2, 4, 2, lq, 2100, 19, 13, mask="random")
    check(q, k, v, mask=m, causal=True, dropout_p=0.3, seed=9, rtol=FP32_RTOL)
    q, k, v, m = dense(2, 2, 1, lq, 7, 24, 8, mask="suffix", layout="strided")
    check(q, k, v, mask=m, causal=True, rtol=FP32_RTOL)
    q, k, v, m = dense(1, 2, 2, lq, 300, 8, 40, mask="dead", layout="transposed")
    check(q, k, v, mask=m, rtol=FP32_RTOL)


@pytest.mark.slow
def test_one_row_many_key_blocks():
    """One query row walks keys in blocks of 16384: three of them here."""
    q, k, v, m = dense(1, 2, 1, 1, 40000, 8, 8, mask="random")
    check(q, k, v, mask=m, dropout_p=0.2, seed=4, rtol=FP32_RTOL)


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_split_key_ranges(four_threads, causal):
    """Fewer (sequence, K/V head) units than threads: the backward splits each unit's keys into
    ranges whose dQ partials are summed afterwards (still reproducible)."""
    q, k, v, m = dense(1, 3, 1, 70, 700, 16, 24, mask="random")
    m[0, 300:520] = True  # a skipped block inside a range
    out, lse, grads = check(q, k, v, mask=m, causal=causal, dropout_p=0.2, seed=1,
                            rtol=FP32_RTOL)
    q, k, v, cq, ck = varlen([50], [900], 2, 1, 8, 8)
    check(q, k, v, cq=cq, ck=ck, causal=causal, rtol=FP32_RTOL)
    go = torch.randn(q.shape[0], 2, 8)
    a, b = run(q, k, v, go, cq=cq, ck=ck)[2], run(q, k, v, go, cq=cq, ck=ck)[2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_skipped_key_blocks():
    """Whole key blocks of padding (skipped) at the start, middle and end of the key range."""
    q, k, v, _ = dense(3, 2, 2, 20, 700, 32, 32)
    m = torch.zeros(3, 700, dtype=torch.bool)
    m[0, :400] = True
    m[1, 130:530] = True
    m[2, 5:] = True
    check(q, k, v, mask=m, rtol=FP32_RTOL)
    check(q, k, v, mask=m, causal=True, rtol=FP32_RTOL)


def test_varlen_many_sequences():
    lq = torch.randint(0, 90, (12,)).tolist()
    lk = torch.randint(0, 300, (12,)).tolist()
    q, k, v, cq, ck = varlen(lq, lk, 4, 2, 32, 16)
    check(q, k, v, cq=cq, ck=ck, causal=True, rtol=FP32_RTOL)


def _eager_lowp(q, k, v, go, mask, causal, scale):
    """The same attention done eagerly in the inputs' dtype (the flash-attention rule's yard
    stick); every test case here has at least one visible key per row."""
    qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    ke, ve = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd @ ke.transpose(-1, -2)) * scale
    lq, lk = q.shape[2], k.shape[2]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(lk)[None] <= torch.arange(lq)[:, None] + (lk - lq)
    allowed = allowed[None, None] & ~mask[:, None, None, :] if mask is not None else allowed
    out = torch.softmax(s.masked_fill(~allowed, -INF), -1) @ ve
    return out, torch.autograd.grad(out, (qd, kd, vd), go)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 127, 40, 40), (1, 2, 2, 90, 300, 64, 64)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(dtype, shape, causal):
    """fp16/bf16 computed in fp32 tiles: within 2x the eager same-dtype error; lse (fp32,
    from the same rounded inputs) at fp32's tolerance."""
    q, k, v, _ = dense(*shape, dtype=dtype, requires_grad=False)
    m = torch.zeros(shape[0], shape[4], dtype=torch.bool)
    m[:, -5:] = True  # padding, but never a dead row
    scale = default_scale(q)
    go = torch.randn(*q.shape[:-1], v.shape[-1]).to(dtype)
    out, lse, grads = run(q, k, v, go, mask=m, causal=causal, scale=scale)
    ref_out, ref_lse, ref_grads = oracle(q, k, v, go, key_padding_mask=m, causal=causal,
                                         scale=scale)
    eager_out, eager_grads = _eager_lowp(q, k, v, go, m, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, low_precision_rtol(eager_out, ref_out, 2), "out")
    assert_lse_close(lse, ref_lse, FP32_RTOL)
    for name, g, ref, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert g.dtype == dtype, name
        assert_close(g, ref, low_precision_rtol(eg, ref, 2), name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_varlen_strided(dtype):
    q, k, v, cq, ck = varlen([3, 40], [50, 9], 4, 2, 16, 24, dtype=dtype, layout="strided")
    go = torch.randn(q.shape[0], 4, 24).to(dtype)
    out, lse, grads = run(q, k, v, go, cq=cq, ck=ck)
    ref_out, ref_lse, ref_grads = oracle(q, k, v, go, cu_seqlens_q=cq, cu_seqlens_k=ck)
    # The per-sequence eager computation would need its own varlen loop; the inputs' own
    # rounding is exact here, so the only errors are fp32 math and the final rounding.
    eps = torch.finfo(dtype).eps
    assert_close(out, ref_out, 2 * eps, "out")
    assert_lse_close(lse, ref_lse, FP32_RTOL)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref, 2 * eps, name)


# ---------------------------------------------------------------------------------------
# Dropout: the same mask as the reference, exactly
# ---------------------------------------------------------------------------------------

SEEDS = [0, 12345, 2**62 - 977]  # the last one exercises the seed's high word


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_dense(p, seed):
    q, k, v, m = dense(2, 4, 2, 70, 300, 32, 16, mask="random")
    check(q, k, v, mask=m, causal=True, dropout_p=p, seed=seed, rtol=FP32_RTOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_dropout_varlen(seed):
    q, k, v, cq, ck = varlen([3, 0, 70, 1], [300, 9, 0, 33], 4, 2, 16, 24)
    check(q, k, v, cq=cq, ck=ck, dropout_p=0.3, seed=seed, rtol=FP32_RTOL)


def test_dropout_fp64_and_seed_matters():
    q, k, v, m = dense(1, 2, 2, 9, 40, 8, 8, dtype=torch.float64, mask="suffix")
    check(q, k, v, mask=m, dropout_p=0.4, seed=7, rtol=FP64_RTOL)
    a = run(q, k, v, mask=m, dropout_p=0.4, seed=7)[0]
    b = run(q, k, v, mask=m, dropout_p=0.4, seed=8)[0]
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Fully masked rows, empty inputs, NaN, determinism
# ---------------------------------------------------------------------------------------

def test_dead_rows_exact_zeros():
    """No visible key: out = 0, lse = +inf, and exactly zero gradient contributions."""
    # Batch entry 0 is all padding; with causal and Lq > Lk the first Lq - Lk rows see nothing.
    q, k, v, m = dense(2, 4, 2, 40, 25, 16, 8, mask="dead")
    go = torch.randn(2, 4, 40, 8)
    out, lse, (dq, dk, dv) = run(q, k, v, go, mask=m, causal=True)
    assert (out[0] == 0).all() and (lse[0] == INF).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (out[1, :, :15] == 0).all() and (lse[1, :, :15] == INF).all()
    assert (dq[1, :, :15] == 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (dk[1][:, m[1]] == 0).all() and (dv[1][:, m[1]] == 0).all()  # padded keys


def test_empty_and_keyless_sequences():
    # Every query sequence empty (Tq = 0), and a packed batch with no sequence at all.
    for lens_q, lens_k in (([0, 0], [3, 5]), ([], [])):
        q, k, v, cq, ck = varlen(lens_q, lens_k, 2, 1, 8, 4)
        out, lse, (dq, dk, dv) = run(q, k, v, torch.zeros(0, 2, 4), cq=cq, ck=ck)
        assert out.shape == (0, 2, 4) and lse.shape == (2, 0) and dq.shape == q.shape
        assert (dk == 0).all() and (dv == 0).all()
    # Sequences with queries but no keys.
    q, k, v, cq, ck = varlen([4, 2], [0, 0], 2, 2, 8, 4)
    out, lse, (dq, dk, dv) = run(q, k, v, torch.randn(6, 2, 4), cq=cq, ck=ck)
    assert (out == 0).all() and (lse == INF).all() and (dq == 0).all() and dk.shape == (0, 2, 8)
    # Dense: B = 0, Lq = 0, Lk = 0.
    for shape in ((0, 2, 2, 3, 4, 8, 8), (2, 2, 2, 0, 4, 8, 8), (2, 2, 1, 3, 0, 8, 4)):
        q, k, v, _ = dense(*shape)
        out, lse, (dq, dk, dv) = run(q, k, v, torch.randn(*q.shape[:-1], shape[-1]))
        assert out.shape == (*q.shape[:-1], shape[-1]) and lse.shape == q.shape[:-1]
        assert (out == 0).all() and (lse == INF).all() and (dq == 0).all()


def test_nan_in_nan_out():
    q, k, v, _ = dense(1, 2, 2, 70, 300, 16, 16, requires_grad=False)
    q[0, 1, 5, 3] = float("nan")
    go = torch.randn(1, 2, 70, 16)
    out, lse, (dq, dk, dv) = run(q, k, v, go)
    assert out[0, 1, 5].isnan().all() and lse[0, 1, 5].isnan()
    assert dq[0, 1, 5].isnan().any()
    others = torch.ones(2, 70, dtype=torch.bool)
    others[1, 5] = False
    assert torch.isfinite(out[0][others]).all() and torch.isfinite(lse[0][others]).all()
    # A NaN key that every query sees poisons every row of its head; a padded one none.
    q, k, v, _ = dense(2, 2, 1, 9, 300, 16, 16, requires_grad=False)
    k[:, 0, 280, 0] = float("nan")
    m = torch.zeros(2, 300, dtype=torch.bool)
    m[1, 270:] = True
    out, lse, _ = run(q, k, v, mask=m)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


def test_deterministic():
    """No atomics, fixed summation order: two calls are bitwise identical."""
    q, k, v, cq, ck = varlen([70, 3, 130], [300, 40, 129], 8, 2, 32, 32)
    go = torch.randn(q.shape[0], 8, 32)
    a = run(q, k, v, go, cq=cq, ck=ck, causal=True, dropout_p=0.2, seed=3)
    b = run(q, k, v, go, cq=cq, ck=ck, causal=True, dropout_p=0.2, seed=3)
    for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
        assert torch.equal(x, y)


def test_backend_functions():
    """cpu.forward / cpu.backward: the signatures every attention backend shares."""
    q, k, v, m = dense(2, 4, 2, 9, 33, 16, 8, mask="suffix")
    s = default_scale(q)
    seed = torch.tensor(5)
    out, lse = cpu.forward(q.detach(), k.detach(), v.detach(), m, None, None, 9, 33, True, s, 0.2,
                           seed, False)
    go = torch.randn_like(out)
    grads = cpu.backward(go, q.detach(), k.detach(), v.detach(), out, lse, m, None, None, 9, 33,
                         True, s, 0.2, seed, False)
    ref_out, ref_lse, ref_grads = oracle(q, k, v, go, key_padding_mask=m, causal=True, scale=s,
                                         dropout_p=0.2, seed=5)
    assert_close(out, ref_out, FP32_RTOL, "out")
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, FP32_RTOL, "grad")


# ---------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensors, AOT dispatch)
# ---------------------------------------------------------------------------------------

def opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_dense(dtype, layout):
    # requires_grad inputs: test_autograd_registration needs them.
    q, k, v, m = dense(2, 4, 2, 9, 33, 16, 8, dtype=dtype, layout=layout, mask="suffix")
    seed = torch.tensor(11)
    opcheck(OPS.attention_cpu_fwd.default, (q, k, v, m, None, None, True, 0.3, 0.25, seed))
    out, lse = OPS.attention_cpu_fwd(q, k, v, m, None, None, True, 0.3, 0.25, seed)
    go = torch.randn_like(out)
    opcheck(OPS.attention_cpu_bwd.default,
            (go, q, k, v, out, lse, m, None, None, True, 0.3, 0.25, seed))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_opcheck_varlen(layout):
    q, k, v, cq, ck = varlen([3, 0, 17], [5, 9, 0], 4, 2, 16, 8, layout=layout)
    opcheck(OPS.attention_cpu_fwd.default, (q, k, v, None, cq, ck, False, 0.25, 0.0, None))
    out, lse = OPS.attention_cpu_fwd(q, k, v, None, cq, ck, False, 0.25, 0.0, None)
    opcheck(OPS.attention_cpu_bwd.default,
            (torch.randn_like(out), q, k, v, out, lse, None, cq, ck, False, 0.25, 0.0, None))


# ---------------------------------------------------------------------------------------
# Bad calls raise (RuntimeError from TORCH_CHECK), never crash
# ---------------------------------------------------------------------------------------

def _bad_calls():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    qv, kv, vv = torch.randn(6, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 6)
    cq, ck = cu_seqlens([2, 4]), cu_seqlens([4, 5])
    m = torch.zeros(2, 7, dtype=torch.bool)
    out, lse = OPS.attention_cpu_fwd(q, k, v, None, None, None, False, 1.0, 0.0, None)
    go = torch.randn_like(out)
    seed = torch.tensor(1)

    def fwd(q=q, k=k, v=v, m=None, cq=None, ck=None, p=0.0, seed=None, scale=1.0):
        return lambda: OPS.attention_cpu_fwd(q, k, v, m, cq, ck, False, scale, p, seed)

    def bwd(go=go, out=out, lse=lse, q=q, m=None, p=0.0, seed=None):
        return lambda: OPS.attention_cpu_bwd(go, q, k, v, out, lse, m, None, None, False, 1.0, p,
                                             seed)

    return {
        "q 3-D dense": fwd(q=q[0]),
        "k 5-D": fwd(k=k[None]),
        "batch mismatch": fwd(k=k[:1], v=v[:1]),
        "head dim mismatch": fwd(k=torch.randn(2, 2, 7, 5)),
        "k/v length mismatch": fwd(v=torch.randn(2, 2, 6, 6)),
        "k/v heads mismatch": fwd(v=torch.randn(2, 1, 7, 6)),
        "Hk does not divide H": fwd(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 6)),
        "zero K/V heads": fwd(k=torch.randn(2, 0, 7, 8), v=torch.randn(2, 0, 7, 6)),
        "zero head dim": fwd(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 7, 0)),
        "dtype mismatch": fwd(v=v.double()),
        "integer inputs": fwd(q=q.long(), k=k.long(), v=v.long()),
        "mask shape": fwd(m=torch.zeros(2, 6, dtype=torch.bool)),
        "mask dtype": fwd(m=torch.zeros(2, 7)),
        "mask with varlen": fwd(qv, kv, vv, m=torch.zeros(1, 9, dtype=torch.bool), cq=cq, ck=ck),
        "only cu_seqlens_q": fwd(qv, kv, vv, cq=cq),
        "cu_seqlens int64": fwd(qv, kv, vv, cq=cq.long(), ck=ck),
        "cu_seqlens 2-D": fwd(qv, kv, vv, cq=cq[None], ck=ck),
        "cu_seqlens not starting at 0": fwd(qv, kv, vv, cq=torch.tensor([1, 2, 6]).int(), ck=ck),
        "cu_seqlens decreasing": fwd(qv, kv, vv, cq=torch.tensor([0, 4, 2, 6]).int(),
                                     ck=cu_seqlens([3, 3, 3])),
        "cu_seqlens past the end": fwd(qv, kv, vv, cq=cu_seqlens([2, 5]), ck=ck),
        "cu_seqlens short of the end": fwd(qv, kv, vv, cq=cq, ck=cu_seqlens([4, 4])),
        "cu_seqlens lengths differ": fwd(qv, kv, vv, cq=cq, ck=cu_seqlens([4, 4, 1])),
        "cu_seqlens empty": fwd(qv[:0], kv[:0], vv[:0], cq=cq[:0], ck=ck[:0]),
        "varlen 4-D": fwd(q, k, v, cq=cq, ck=ck),
        "dropout_p 1": fwd(p=1.0, seed=seed),
        "dropout_p negative": fwd(p=-0.1, seed=seed),
        "dropout without seed": fwd(p=0.1),
        "seed float": fwd(p=0.1, seed=torch.tensor(1.0)),
        "seed two elements": fwd(p=0.1, seed=torch.tensor([1, 2])),
        "scale nan": fwd(scale=float("nan")),
        "bwd grad_out shape": bwd(go=go[:, :, :4]),
        "bwd out dtype": bwd(out=out.double()),
        "bwd lse shape": bwd(lse=lse[0]),
        "bwd lse dtype": bwd(lse=lse.double()),
        "bwd q shape": bwd(q=torch.randn(2, 4, 6, 8)),
        "bwd dropout without seed": bwd(p=0.5),
    }


BAD_CALLS = list(_bad_calls()) if OPS is not None else []


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_raise(case):
    with pytest.raises(RuntimeError):
        _bad_calls()[case]()


def test_scale_is_applied():
    q, k, v, _ = dense(1, 2, 2, 5, 9, 8, 8)
    check(q, k, v, scale=0.7, rtol=FP32_RTOL)
    check(q, k, v, scale=-2.0, rtol=FP32_RTOL)
    assert math.isfinite(run(q, k, v, scale=0.0)[1].sum().item())
