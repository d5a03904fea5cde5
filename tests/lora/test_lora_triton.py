"""The Triton LoRA kernels (mmkernels/lora/lora_triton.py) called directly, as the Python layer
calls them: y, u and every gradient against the float64 oracle (mmkernels.lora.reference and
autograd through it). Exact fp32 at 1e-5, fp16 by the 2× (3× for gradients) same-dtype eager
rule, TF32 against the oracle fed TF32-rounded operands; one adapter (no ids) and five with
ids including −1 and an adapter without rows; dropout against the reference's own mask; x with
a row stride; the multi-tile chunks of the row-reducing kernels; gradients not asked for;
NaN propagation; determinism.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with small blocks
(lora_triton.INTERPRET_CONFIGS), so T = 257 crosses row tiles, in = 33 / out = 100 cross
column and reduction blocks, and r = 64 crosses rank blocks; bf16 is skipped there (the
interpreter's bf16 is wrong). Every torch.empty is NaN-filled (deterministic mode): an output
element a kernel forgets to write fails the comparison.
"""
import math

import pytest
import torch

import mmkernels
from backends import device
from oracle import FP32_RTOL, assert_close, low_precision_rtol, round_tf32

_REASONS = mmkernels.unavailable_reasons()
pytestmark = [pytest.mark.skipif("triton" in _REASONS, reason=_REASONS.get("triton", ""))]
if device() == "cpu":
    pytestmark.append(pytest.mark.interpreter)

if "triton" not in _REASONS:
    from mmkernels.lora import lora_triton, reference

DEV = device()
LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SEED = 2**62 - 977  # exercises the seed's high word
GRADS = ("dx", "dW", "db", "dA", "dB")
# TF32: the oracle gets the TF32-rounded x, W, A, B and dY, but not the kernels' roundings of
# s·u (expand) and du (dx, dA) before their products: 2⁻¹¹ relative at most per entry, ~3e-4
# RMS, which a sum over rows does not average away.
TF32_RTOL = 1e-3


def make(T, r, N, bias=True, fin=33, fout=100, dtype=torch.float32, ids="mixed"):
    """Inputs as the Python layer passes them: x (T, fin) with a row stride (a column slice
    of a wider buffer, not 16-aligned), N adapters, scaling (N,) fp32, ids or None (N = 1)."""
    x = torch.randn(T, fin + 5, device=DEV).to(dtype)[:, 2:fin + 2]
    assert x.stride() == (fin + 5, 1)
    w = (torch.randn(fout, fin, device=DEV) / math.sqrt(fin)).to(dtype)
    b = torch.randn(fout, device=DEV).to(dtype) if bias else None
    A = (torch.randn(N, r, fin, device=DEV) / math.sqrt(fin)).to(dtype)
    B = (torch.randn(N, fout, r, device=DEV) / math.sqrt(r)).to(dtype)
    s = torch.rand(N, device=DEV) + 0.5
    adapter_ids = None
    if N > 1:
        adapter_ids = torch.randint(-1, N, (T,), device=DEV)
        adapter_ids[adapter_ids == 3] = 4  # adapter 3 gets no rows
        adapter_ids[0] = -1 if T > 1 else 2
        adapter_ids[-1] = 1 if T > 1 else 2
    gy = torch.randn(T, fout, device=DEV).to(dtype)
    return x, w, b, A, B, s, adapter_ids, gy


def run(x, w, b, A, B, s, adapter_ids, gy, p=0.0, seed=SEED, tf32=False, need=None):
    """forward then backward as the Python layer calls them: (y, u, (dx, dW, db, dA, dB))."""
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEV) if p > 0 else None
    y, u = lora_triton.forward(x, w, b, A, B, s, adapter_ids, p, seed_t, tf32)
    if need is None:
        need = (True, True, b is not None, True, True)
    grads = lora_triton.backward(gy, x, w, A, B, s, adapter_ids, u, p, seed_t, *need, tf32)
    return y, u, grads


def _ids(adapter_ids, T):
    return torch.zeros(T, dtype=torch.long, device=DEV) if adapter_ids is None else adapter_ids


def oracle(x, w, b, A, B, s, adapter_ids, gy, p=0.0, seed=SEED):
    """float64 y, u and (dx, dW, db, dA, dB) (db None without bias) from the reference."""
    x, w, A, B = (t.detach().double().requires_grad_() for t in (x, w, A, B))
    b = None if b is None else b.detach().double().requires_grad_()
    s = s.double()
    if adapter_ids is None:
        y = reference.forward(x, w, b, A[0], B[0], s[0], dropout_p=p, seed=seed)
    else:
        y = reference.forward(x, w, b, A, B, s, dropout_p=p, seed=seed, adapter_ids=adapter_ids)
    leaves = [x, w] + ([b] if b is not None else []) + [A, B]
    grads = [torch.zeros_like(leaf) if g is None else g
             for g, leaf in zip(torch.autograd.grad(y, leaves, gy.double(), allow_unused=True),
                                leaves)]
    if b is None:
        grads.insert(2, None)
    xd = x.detach()
    if p > 0:
        xd = xd * reference.dropout_mask(seed, *x.shape, p, x.device)
    ids = _ids(adapter_ids, x.shape[0])
    u = torch.einsum("ti,tri->tr", xd, A.detach()[ids.clamp_min(0)]) * (ids >= 0)[:, None]
    return y.detach(), u, grads


def eager_lowp(x, w, b, A, B, s, adapter_ids, gy, p=0.0, seed=SEED):
    """The same layer done eagerly in the inputs' dtype: the low-precision rule's yardstick."""
    x, w, A, B = (t.detach().clone().requires_grad_() for t in (x, w, A, B))
    b = None if b is None else b.detach().clone().requires_grad_()
    y = x @ w.T + (0 if b is None else b)
    xd = x
    if p > 0:
        xd = x * reference.dropout_mask(seed, *x.shape, p, x.device).to(x.dtype)
    ids = _ids(adapter_ids, x.shape[0])
    for n in range(A.shape[0]):
        rows = (ids == n).nonzero()[:, 0]
        if rows.numel():
            y = y.index_add(0, rows, s[n].to(x.dtype) * ((xd[rows] @ A[n].T) @ B[n].T))
    leaves = [x, w] + ([b] if b is not None else []) + [A, B]
    grads = list(torch.autograd.grad(y, leaves, gy))
    if b is None:
        grads.insert(2, None)
    return y.detach(), grads


def check(inputs, y, u, grads, ref, rtol):
    """Outputs against the oracle (``rtol``: one tolerance, or one per output name); u exactly
    0 on id −1 rows, dA/dB exactly 0 for adapters without rows; the contract's layouts."""
    x, w, b, A, B, s, adapter_ids, gy = inputs
    ref_y, ref_u, ref_grads = ref
    tol = rtol if isinstance(rtol, dict) else dict.fromkeys(("y", "u") + GRADS, rtol)
    assert y.dtype == x.dtype and y.is_contiguous() and y.shape == (x.shape[0], w.shape[0])
    assert u.dtype == torch.float32 and u.is_contiguous() and u.shape == (x.shape[0], A.shape[1])
    assert_close(y, ref_y, tol["y"], "y")
    assert_close(u, ref_u, tol["u"], "u")
    ids = _ids(adapter_ids, x.shape[0])
    assert (u[ids < 0] == 0).all()
    for name, g, r, like in zip(GRADS, grads, ref_grads, (x, w, b, A, B)):
        if r is None:
            assert g.shape == (0,), name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape and g.is_contiguous(), name
        assert_close(g, r, tol[name], name)
    empty = [n for n in range(A.shape[0]) if not (ids == n).any()]
    for name, g in (("dA", grads[3]), ("dB", grads[4])):
        assert (g[empty] == 0).all(), f"{name} of adapters without rows"


# ----------------------------------------------------------------------------------------------
# Exact fp32 against the oracle

# (T, r, N, bias, dropout_p, in, out): T ∈ {1, 7, 257}, r ∈ {1, 8, 64}, one adapter (no ids)
# and five (ids with −1, adapter 3 without rows), bias or not, dropout 0 and 0.3, each value
# paired with the others at least once (the interpreter is too slow for the full product).
CASES = [
    (1, 1, 1, True, 0.0, 33, 100),
    (1, 8, 5, True, 0.3, 33, 100),
    (7, 8, 5, False, 0.3, 100, 33),
    (7, 64, 1, False, 0.0, 33, 100),
    (257, 64, 1, True, 0.3, 33, 100),
    (257, 8, 5, True, 0.0, 33, 100),
    (257, 1, 5, False, 0.3, 33, 100),
]


@pytest.mark.parametrize("T,r,N,bias,p,fin,fout", CASES, ids=str)
def test_fp32(T, r, N, bias, p, fin, fout):
    inputs = make(T, r, N, bias, fin, fout)
    y, u, grads = run(*inputs, p=p)
    check(inputs, y, u, grads, oracle(*inputs, p=p), FP32_RTOL)


def test_many_adapters():
    """More adapters than one step of the kernels' scan of the segment offsets (N = 20: two
    16-wide steps in the interpreter), most of them without rows."""
    inputs = make(30, 8, 20, bias=False)
    y, u, grads = run(*inputs, p=0.3)
    check(inputs, y, u, grads, oracle(*inputs, p=0.3), FP32_RTOL)


def test_multi_tile_chunks(monkeypatch):
    """Few chunks (long batches on a GPU): each du/dB chunk loops over several row tiles (du
    accumulated in the du buffer), dA/dB partials of a segment come from several chunks, and
    r = 64 is split over two rank blocks of the interpreter's BLOCK_R = 32."""
    monkeypatch.setattr(lora_triton, "CHUNKS", 2)
    for T, r, N, p in ((257, 64, 1, 0.3), (257, 8, 5, 0.3)):
        inputs = make(T, r, N)
        y, u, grads = run(*inputs, p=p)
        check(inputs, y, u, grads, oracle(*inputs, p=p), FP32_RTOL)


def test_tf32():
    """TF32 tensor cores (exact fp32 products of rounded operands in the interpreter) against
    the oracle fed the TF32-rounded x, W, A, B and dY."""
    x, w, b, A, B, s, ids, gy = make(257, 8, 5)
    p = 0.3
    y, u, grads = run(x, w, b, A, B, s, ids, gy, p=p, tf32=True)
    rounded = [round_tf32(t) for t in (x, w, b, A, B)] + [s, ids, round_tf32(gy)]
    check((x, w, b, A, B, s, ids, gy), y, u, grads, oracle(*rounded, p=p), TF32_RTOL)


# ----------------------------------------------------------------------------------------------
# Reduced precision


@pytest.mark.parametrize("T,r,N,p", [(257, 8, 5, 0.3), (7, 64, 1, 0.0)], ids=str)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision(dtype, T, r, N, p):
    """fp16 (and bf16 on GPU): within 2× (3× for gradients) the same-dtype eager error; u
    (fp32 from the same fp16 operands) at fp32's tolerance."""
    inputs = make(T, r, N, dtype=dtype)
    y, u, grads = run(*inputs, p=p)
    ref = oracle(*inputs, p=p)
    eager_y, eager_grads = eager_lowp(*inputs, p=p)
    tol = {"y": low_precision_rtol(eager_y, ref[0], 2), "u": FP32_RTOL}
    for name, eager, exact in zip(GRADS, eager_grads, ref[2]):
        tol[name] = None if exact is None else low_precision_rtol(eager, exact, 3)
    check(inputs, y, u, grads, ref, tol)


# ----------------------------------------------------------------------------------------------
# Contract details


def test_gradients_not_asked_for():
    """A gradient not asked for is an empty tensor of its dtype; each asked-for one equals the
    full call's bit for bit (the same kernels run)."""
    inputs = make(7, 8, 5)
    x, w, b, A, B = inputs[:5]
    y, u, full = run(*inputs, p=0.3)
    for k in range(5):
        need = tuple(i == k for i in range(5))
        _, _, grads = run(*inputs, p=0.3, need=need)
        for i, (g, like) in enumerate(zip(grads, (x, w, b, A, B))):
            if i == k:
                assert torch.equal(g, full[i]), GRADS[i]
            else:
                assert g.shape == (0,) and g.dtype == like.dtype, GRADS[i]


def test_deterministic():
    """No atomics: two calls give bitwise equal results."""
    inputs = make(40, 8, 5)
    first = run(*inputs, p=0.3)
    second = run(*inputs, p=0.3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


def test_nan_propagates_through_dropped_elements():
    """NaN in x where dropout drops the element: the base output and u of that row, the row's
    adapter's dA and dB, and dW turn NaN exactly where the reference's do (0·NaN = NaN: the
    mask multiplies, it does not select)."""
    x, w, b, A, B, s, ids, gy = make(7, 8, 5)
    p = 0.5
    mask = reference.dropout_mask(SEED, *x.shape, p, DEV)
    t, i = map(int, (mask[2:] == 0).nonzero()[0])  # a dropped element of a row with an adapter
    t += 2
    ids[t] = 2
    x[t, i] = float("nan")
    y, u, grads = run(x, w, b, A, B, s, ids, gy, p=p)
    ref_y, ref_u, ref_grads = oracle(x, w, b, A, B, s, ids, gy, p=p)
    assert torch.isnan(y[t]).all()
    for name, out, ref in zip(("y", "u") + GRADS, (y, u) + tuple(grads),
                              (ref_y, ref_u) + tuple(ref_grads)):
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), name
        finite = ~torch.isnan(ref)
        assert_close(out[finite], ref[finite], FP32_RTOL, name)
    assert torch.isnan(grads[3][2]).any() and torch.isnan(grads[4][2]).any()


def test_seed_matters():
    inputs = make(7, 8, 1)
    a = run(*inputs, p=0.4, seed=7)[1]
    b = run(*inputs, p=0.4, seed=7 + 2**32)[1]
    assert not torch.equal(a, b)
