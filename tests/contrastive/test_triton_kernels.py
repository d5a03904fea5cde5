"""The Triton contrastive kernels (infonce_triton.py, siglip_triton.py) at the primitive level,
against the dense float64 primitives of contrastive_cases.DensePrimitives.

Odd shapes with M ≠ N, every offset kind, bias or not, fp32 (exact and TF32), fp16 (the
flash-attention rule), NaN propagation, confident pairs and logits of 1e5; the deterministic
(two-role) and the atomic (one-pass) backward both. Under the interpreter every torch.empty
is NaN-filled (deterministic mode, tests/conftest.py): an output element a kernel forgets to
write fails the comparison.
"""
import pytest
import torch

import mmkernels
from backends import device
from contrastive_cases import DensePrimitives, features
from oracle import (FP32_RTOL, TF32_RTOL, assert_close, low_precision_rtol, rel_err,
                    round_tf32)

_REASONS = mmkernels.unavailable_reasons()
pytestmark = [pytest.mark.skipif("triton" in _REASONS, reason=_REASONS.get("triton", ""))]
if device() == "cpu":
    pytestmark.append(pytest.mark.interpreter)

if "triton" not in _REASONS:
    from mmkernels import _triton
    from mmkernels.contrastive import infonce_triton, siglip_triton
    from mmkernels.contrastive.primitives import TritonPrimitives

DEV = device()
SHAPES = [(1, 1), (7, 33), (65, 129), (130, 70)]
DIMS = [1, 5, 33, 129, 300]
PATHS = ["deterministic", "atomic"]


def _offset(kind: str, m: int, n: int) -> int:
    return {"zero": 0, "positive": min(3, n), "negative": -min(5, m),
            "out of range": n + 7}[kind]


# Every (shape, D) once, with the offset kind and the bias cycling through their values.
KINDS = ["zero", "positive", "negative", "out of range"]
CASES = [pytest.param(m, n, d, KINDS[k % 4], k % 2 == 0, id=f"{m}x{n}x{d}-{KINDS[k % 4]}"
                      f"{'-bias' if k % 2 == 0 else ''}")
         for k, ((m, n), d) in enumerate((s, d) for s in SHAPES for d in DIMS)]
# A few of them for the slower precision checks.
FEW = [pytest.param(65, 129, 33, "positive", True, id="65x129x33"),
       pytest.param(130, 70, 129, "negative", False, id="130x70x129"),
       pytest.param(7, 33, 300, "zero", True, id="7x33x300")]


def _inputs(m, n, d, with_bias, dtype=torch.float32, scale=10.0):
    i = features(m, d, dtype, device=DEV)
    t = features(n, d, dtype, device=DEV)
    s = torch.tensor(scale, device=DEV)
    b = torch.tensor(-1.5, device=DEV) if with_bias else None
    return i, t, s, b


def _weights(m, n):
    # Upstream weights of the size the host passes (½·g/B), not all equal.
    return ((torch.rand(m, device=DEV) + 0.5) / (2 * m),
            (torch.rand(n, device=DEV) + 0.5) / (2 * n))


def _full_lse(row_off, col_off, diag, offset):
    """The host's row and column log-sum-exps: the positives added back (infonce._forward)."""
    m, n = row_off.shape[0], col_off.shape[0]
    rows = torch.arange(m, device=row_off.device)
    has = (rows + offset >= 0) & (rows + offset < n)
    col = col_off.clone()
    col[rows[has] + offset] = torch.logaddexp(col_off[rows[has] + offset], diag[has])
    return torch.logaddexp(row_off, diag), col


def _pipeline(prims, i, t, s, b, offset, row_w, col_w, **grad_kw):
    """lse then grad, each fed the same primitive set's own forward (as the host does)."""
    row_off, col_off, diag, tiles = prims.lse(i, t, s, b, offset, 0)
    row_lse, col_lse = _full_lse(row_off, col_off, diag, offset)
    grad = prims.grad(i, t, s, b, row_lse, col_lse, row_w, col_w, offset, tiles, **grad_kw)
    return (row_off, col_off, diag), grad


class _Kernels:
    """TritonPrimitives with an explicit backward path."""

    def __init__(self, tf32=False, path="deterministic"):
        self.prims = TritonPrimitives(tf32)
        self.tf32, self.deterministic = tf32, path == "deterministic"

    def lse(self, *args):
        out = self.prims.lse(*args)
        assert out[3].numel() == 0, "Triton keeps no logits"
        return out

    def grad(self, i, t, s, b, row_lse, col_lse, row_w, col_w, offset, tiles):
        return infonce_triton.infonce_grad(i, t, s, b, row_lse, col_lse, row_w, col_w, offset,
                                           self.tf32, deterministic=self.deterministic)

    def siglip_pass(self, i, t, s, b, offset, want_grad):
        return siglip_triton.siglip_pass(i, t, s, b, offset, want_grad, self.tf32,
                                         deterministic=self.deterministic)


def _check_lse(out, ref, rtol, what=""):
    for name, o, r in zip(("row_lse_off", "col_lse_off", "diag"), out, ref):
        assert o.dtype == torch.float32, f"{what}{name}: dtype {o.dtype}"
        r = r.to(o.device)
        # Rows/columns without any other entry (and absent positives) are exactly -inf.
        assert torch.equal(torch.isneginf(o), torch.isneginf(r)), f"{what}{name}: -inf pattern"
        finite = torch.isfinite(r)
        assert_close(o[finite], r[finite], rtol, f"{what}{name}")


def _check_grad(out, ref, rtol, weight, what=""):
    for name, o, r in zip(("A_I", "A_T"), out[:2], ref[:2]):
        assert o.dtype == torch.float32 and o.is_contiguous(), f"{what}{name}"
        assert_close(o, r.to(o.device), rtol, f"{what}{name}")
    # ΣP is a sum of terms bounded by the weights: they set its absolute floor.
    assert_close(out[2], ref[2].to(out[2].device), rtol, f"{what}psum", rtol * weight)


def _check_siglip(out, ref, rtol, m, n, want_grad=True, what=""):
    assert_close(out[0], ref[0].to(out[0].device), rtol, f"{what}loss")
    if not want_grad:
        assert out[1].numel() == 0 and out[2].numel() == 0
        return
    for name, o, r in zip(("A_I", "A_T"), out[1:3], ref[1:3]):
        assert o.dtype == torch.float32 and o.is_contiguous(), f"{what}{name}"
        assert_close(o, r.to(o.device), rtol, f"{what}{name}")
    assert_close(out[3], ref[3].to(out[3].device), rtol, f"{what}gsum", rtol * m * n)


# ----------------------------------------------------------------------------------------------
# fp32, exact


@pytest.mark.parametrize("m,n,d,kind,with_bias", CASES)
def test_lse_fp32(m, n, d, kind, with_bias):
    i, t, s, b = _inputs(m, n, d, with_bias)
    offset = _offset(kind, m, n)
    _check_lse(_Kernels().lse(i, t, s, b, offset, min(m, n))[:3],  # asked to keep: ignored
               DensePrimitives.lse(i, t, s, b, offset, 0)[:3], FP32_RTOL)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,d,kind,with_bias", CASES)
def test_grad_fp32(m, n, d, kind, with_bias, path):
    i, t, s, b = _inputs(m, n, d, with_bias)
    offset = _offset(kind, m, n)
    row_w, col_w = _weights(m, n)
    _, out = _pipeline(_Kernels(path=path), i, t, s, b, offset, row_w, col_w)
    _, ref = _pipeline(DensePrimitives, i, t, s, b, offset, row_w, col_w)
    _check_grad(out, ref, FP32_RTOL, (row_w.sum() + col_w.sum()).item())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,d,kind,with_bias", CASES)
def test_siglip_fp32(m, n, d, kind, with_bias, path):
    i, t, s, b = _inputs(m, n, d, with_bias)
    offset = _offset(kind, m, n)
    ref = DensePrimitives.siglip_pass(i, t, s, b, offset, True)
    kernels = _Kernels(path=path)
    _check_siglip(kernels.siglip_pass(i, t, s, b, offset, True), ref, FP32_RTOL, m, n)
    if path == "deterministic":
        _check_siglip(kernels.siglip_pass(i, t, s, b, offset, False), ref, FP32_RTOL, m, n,
                      want_grad=False)


@pytest.mark.parametrize("row_splits,programs", [(2, 8), (1, 1)],
                         ids=["several-blocks-per-program", "one-program"])
def test_grid_splits(monkeypatch, row_splits, programs):
    """Programs that own several row blocks (the forward's column partials are then
    read-modify-written) and several column tiles per column range (atomic backward)."""
    monkeypatch.setattr(infonce_triton, "ROW_SPLITS", row_splits)
    monkeypatch.setattr(_triton, "PROGRAMS", programs)
    m, n, d, offset = 130, 100, 129, -3
    i, t, s, b = _inputs(m, n, d, True)
    row_w, col_w = _weights(m, n)
    fwd_ref, ref = _pipeline(DensePrimitives, i, t, s, b, offset, row_w, col_w)
    sig_ref = DensePrimitives.siglip_pass(i, t, s, b, offset, True)
    for path in PATHS:
        kernels = _Kernels(path=path)
        fwd, out = _pipeline(kernels, i, t, s, b, offset, row_w, col_w)
        _check_lse(fwd, fwd_ref, FP32_RTOL, f"{path}: ")
        _check_grad(out, ref, FP32_RTOL, (row_w.sum() + col_w.sum()).item(), f"{path}: ")
        _check_siglip(kernels.siglip_pass(i, t, s, b, offset, True), sig_ref, FP32_RTOL, m, n,
                      what=f"{path}: ")
    _check_siglip(_Kernels().siglip_pass(i, t, s, b, offset, False), sig_ref, FP32_RTOL, m, n,
                  want_grad=False)


def test_primitives_follow_torch_determinism():
    """TritonPrimitives.grad and siglip_pass take the atomic path outside deterministic mode
    and give the same values."""
    m, n, d = 40, 50, 40
    i, t, s, b = _inputs(m, n, d, True)
    row_w, col_w = _weights(m, n)
    prims = TritonPrimitives(False)
    results = []
    try:
        for det in (True, False):
            torch.use_deterministic_algorithms(det, warn_only=True)
            assert _triton.deterministic() == det
            results.append((_pipeline(prims, i, t, s, b, 1, row_w, col_w)[1],
                            prims.siglip_pass(i, t, s, b, 1, True)))
    finally:
        torch.use_deterministic_algorithms(True, warn_only=True)
    for x, y in zip(sum(results[0], ()), sum(results[1], ())):
        assert_close(x, y, FP32_RTOL)


def test_empty_sides():
    """No columns: every row's off-positive log-sum-exp and positive are -inf."""
    i = features(3, 5, device=DEV)
    row_off, col_off, diag = infonce_triton.infonce_lse(i, i[:0], 1.0, None, 0, False)
    assert torch.isneginf(row_off).all() and torch.isneginf(diag).all()
    assert col_off.shape == (0,)


# ----------------------------------------------------------------------------------------------
# fp32 on TF32 tensor cores: against the float64 oracle fed TF32-rounded features


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,d,kind,with_bias", FEW)
def test_tf32(m, n, d, kind, with_bias, path):
    i, t, s, b = _inputs(m, n, d, with_bias)
    offset = _offset(kind, m, n)
    row_w, col_w = _weights(m, n)
    i_r, t_r = round_tf32(i), round_tf32(t)
    kernels = _Kernels(tf32=True, path=path)
    fwd, out = _pipeline(kernels, i, t, s, b, offset, row_w, col_w)
    fwd_ref, ref = _pipeline(DensePrimitives, i_r, t_r, s, b, offset, row_w, col_w)
    # The logits are exact fp32 sums of TF32 products: the forward keeps fp32's tolerance;
    # the weight tile is rounded to TF32 for the second product.
    _check_lse(fwd, fwd_ref, FP32_RTOL)
    _check_grad(out, ref, TF32_RTOL, (row_w.sum() + col_w.sum()).item())
    sig = kernels.siglip_pass(i, t, s, b, offset, True)
    sig_ref = DensePrimitives.siglip_pass(i_r, t_r, s, b, offset, True)
    assert_close(sig[0], sig_ref[0], FP32_RTOL, "loss")
    _check_siglip(sig, sig_ref, TF32_RTOL, m, n)


# ----------------------------------------------------------------------------------------------
# fp16: within 2× (3× for gradients) the error of the same computation done eagerly in fp16


def _eager_lowp(i, t, s, b, offset, row_w, col_w):
    """The dense primitives in the features' dtype (what a user's eager code would do)."""
    dt = i.dtype
    x = s.to(dt) * (i @ t.T)
    if b is not None:
        x = x + b.to(dt)
    rows, cols = DensePrimitives._positives(x, offset)
    diag = torch.full((x.shape[0],), float("-inf"), dtype=dt, device=x.device)
    diag[rows] = x[rows, cols]
    off = x.clone()
    off[rows, cols] = float("-inf")
    row_off, col_off = off.logsumexp(1), off.logsumexp(0)
    row_lse, col_lse = _full_lse(row_off, col_off, diag, offset)
    p = row_w.to(dt)[:, None] * (x - row_lse[:, None]).exp() \
        + col_w.to(dt)[None, :] * (x - col_lse[None, :]).exp()
    p[rows, cols] = 0
    z = -torch.ones_like(x)
    z[rows, cols] = 1
    g = -z * torch.sigmoid(-z * x)
    return ((row_off, col_off, diag), (p @ t, p.T @ i, p.sum()),
            (torch.nn.functional.softplus(-z * x).sum(), g @ t, g.T @ i, g.sum()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,d,kind,with_bias", FEW)
def test_fp16(m, n, d, kind, with_bias, path):
    i, t, s, b = _inputs(m, n, d, with_bias, torch.float16)
    offset = _offset(kind, m, n)
    row_w, col_w = _weights(m, n)
    kernels = _Kernels(path=path)
    fwd, out = _pipeline(kernels, i, t, s, b, offset, row_w, col_w)
    sig = kernels.siglip_pass(i, t, s, b, offset, True)
    fwd_ref, ref = _pipeline(DensePrimitives, i, t, s, b, offset, row_w, col_w)
    sig_ref = DensePrimitives.siglip_pass(i, t, s, b, offset, True)
    eager = _eager_lowp(i, t, s, b, offset, row_w, col_w)
    groups = [(fwd, fwd_ref, eager[0], 2), (out, ref, eager[1], 3), (sig[:1], sig_ref[:1],
              eager[2][:1], 2), (sig[1:], sig_ref[1:], eager[2][1:], 3)]
    for got, want, lowp, factor in groups:
        for o, r, e in zip(got, want, lowp):
            r, e = r.to(o.device), e.to(o.device)
            finite = torch.isfinite(r)
            assert torch.equal(torch.isneginf(o), torch.isneginf(r))
            o, r, e = o[finite], r[finite], e[finite]
            assert rel_err(o, r) <= low_precision_rtol(e, r, factor), \
                f"fp16 error {rel_err(o, r):.2e}, eager fp16 {rel_err(e, r):.2e}"


# ----------------------------------------------------------------------------------------------
# NaN in → NaN out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where", ["image", "text", "scale", "bias"])
def test_nan_propagates(where, path):
    m, n, d = 40, 33, 20
    i, t, s, b = _inputs(m, n, d, True)
    if where == "image":
        i[m // 2, 3] = float("nan")
    elif where == "text":
        t[n - 1, 0] = float("nan")
    elif where == "scale":
        s = torch.tensor(float("nan"), device=DEV)
    else:
        b = torch.tensor(float("nan"), device=DEV)
    row_w, col_w = _weights(m, n)
    kernels = _Kernels(path=path)
    row_off, col_off, diag, _ = kernels.lse(i, t, s, b, 0, 0)
    assert torch.isnan(row_off).any() and torch.isnan(col_off).any()
    row_lse, col_lse = _full_lse(row_off, col_off, diag, 0)
    a_i, a_t, psum = kernels.grad(i, t, s, b, row_lse, col_lse, row_w, col_w, 0, None)
    assert torch.isnan(a_i).any() and torch.isnan(a_t).any() and torch.isnan(psum)
    loss, g_i, g_t, gsum = kernels.siglip_pass(i, t, s, b, 0, True)
    assert torch.isnan(loss) and torch.isnan(g_i).any() and torch.isnan(g_t).any()
    assert torch.isnan(gsum)


# ----------------------------------------------------------------------------------------------
# Hard regimes at the fp32 tolerance


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_confident_pairs(scale, path):
    """T = normalize(I + 0.05·noise): each positive dominates its row and column (P_ii → 1),
    the off-positive probabilities are tiny and must keep their relative accuracy."""
    m, d = 70, 33
    i = features(m, d, device=DEV)
    t = torch.nn.functional.normalize(i + 0.05 * torch.randn_like(i), dim=1)
    s = torch.tensor(scale, device=DEV)
    b = torch.tensor(0.5, device=DEV)
    row_w, col_w = _weights(m, m)
    kernels = _Kernels(path=path)
    fwd, out = _pipeline(kernels, i, t, s, b, 0, row_w, col_w)
    fwd_ref, ref = _pipeline(DensePrimitives, i, t, s, b, 0, row_w, col_w)
    row_lse, _ = _full_lse(*fwd_ref, 0)
    assert ((fwd_ref[2] - row_lse).exp() > 0.5).all(), "positives should dominate"
    _check_lse(fwd, fwd_ref, FP32_RTOL)
    _check_grad(out, ref, FP32_RTOL, (row_w.sum() + col_w.sum()).item())
    _check_siglip(kernels.siglip_pass(i, t, s, b, 0, True),
                  DensePrimitives.siglip_pass(i, t, s, b, 0, True), FP32_RTOL, m, m)


# Logit margin of the large-logit test: every row's and every column's largest logit is at
# least this far above the next one (positives included), so each softmax is one-hot. An entry
# MARGIN below its maximum has P ≤ e^-20 ≈ 2e-9, and its fp32 rounding (relative ~eps·|X| ≈ 1e-2
# at |X| = 1e5) is then invisible at 1e-5.
MARGIN = 20.0


def _one_hot_features(m, n, d, s, b, norm=30.0, tries=100):
    """Features of the given norm whose float64 logits are one-hot in every row and column
    (largest ≥ MARGIN above the next), redrawn until they are (about half the draws are).

    Near ties are left out on purpose: there P depends on differences of logits of 1e5, each
    carrying fp32's rounding eps·|X| ≈ 0.004..0.008, a 0.4%..0.8% error on the runner-up's
    P that no fp32 implementation avoids (the C++ backend gives A_I errors of 2e-5..7e-5 on the
    same inputs): that regime is the contract's extreme-value test, whose floor scales with
    eps·|X| (contrastive_cases.check_against_float64)."""
    for _ in range(tries):
        i = features(m, d, device=DEV, norm=norm)
        t = features(n, d, device=DEV, norm=norm)
        x = DensePrimitives._x(i, t, s, b)
        rows, cols = x.topk(2, 1).values, x.topk(2, 0).values
        gap = torch.minimum((rows[:, 0] - rows[:, 1]).min(), (cols[0] - cols[1]).min())
        if gap >= MARGIN:
            return i, t
    pytest.fail(f"no one-hot draw in {tries} tries")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,d", [(64, 64, 48), (65, 129, 33)])
def test_large_logits(m, n, d, path):
    """Features of norm 30 with scale 100 (logits ~1e5) at the fp32 tolerance, every softmax
    one-hot (``_one_hot_features``): the backward must recompute the forward's maximum bit for
    bit so that exp(X − lse) is exactly 1 there. A recomputation one ulp off (0.008 at 1e5)
    makes that P wrong by 0.8%: dI errors of 6e-4 to 3e-3 (the old kernels; a backward with
    another D-chunking). A_T covers the deterministic path's column programs."""
    s = torch.tensor(100.0, device=DEV)
    b = torch.tensor(3.0, device=DEV)
    i, t = _one_hot_features(m, n, d, s, b)
    row_w, col_w = _weights(m, n)
    kernels = _Kernels(path=path)
    fwd, out = _pipeline(kernels, i, t, s, b, 1, row_w, col_w)
    fwd_ref, ref = _pipeline(DensePrimitives, i, t, s, b, 1, row_w, col_w)
    _check_lse(fwd, fwd_ref, FP32_RTOL)
    _check_grad(out, ref, FP32_RTOL, (row_w.sum() + col_w.sum()).item())
    _check_siglip(kernels.siglip_pass(i, t, s, b, 1, True),
                  DensePrimitives.siglip_pass(i, t, s, b, 1, True), FP32_RTOL, m, n)
