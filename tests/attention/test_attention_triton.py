"""The Triton attention kernels (mmkernels/attention/attention_triton.py) called directly:
out, lse and dq/dk/dv against the float64 oracle of attention_cases.py (dense, varlen, masks,
bottom-right causal with Lq < Lk and Lq > Lk, grouped heads, Dqk != Dv, strided layouts), fp32
exact and on TF32, fp16 by the flash-attention rule, dropout against the reference's own mask,
the fully-masked and NaN rules, determinism, every config path (chunked scores, split dK/dV),
and the compile report of the shipped GPU configs.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), with small shapes
and blocks (attention_triton.INTERPRET_CONFIGS); bf16 is skipped there (the interpreter's bf16
is wrong). Every torch.empty is NaN-filled (deterministic mode): an output element a kernel
forgets to write fails the comparison.
"""
import os
import subprocess
import sys

import pytest
import torch

import mmkernels
from attention_cases import (DENSE_SHAPES, DENSE_SHAPES_INTERPRETER, VARLEN_CASES,
                             default_scale, dense, oracle, varlen)
from backends import device
from oracle import FP32_RTOL, TF32_RTOL, assert_close, low_precision_rtol, round_tf32

_REASONS = mmkernels.unavailable_reasons()
pytestmark = [pytest.mark.skipif("triton" in _REASONS, reason=_REASONS.get("triton", ""))]
if device() == "cpu":
    pytestmark.append(pytest.mark.interpreter)

if "triton" not in _REASONS:
    from mmkernels.attention import attention_triton

DEV = device()
SHAPES = DENSE_SHAPES_INTERPRETER if DEV == "cpu" else DENSE_SHAPES
MASKS = ["none", "suffix", "random", "dead"]
LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
INF = float("inf")
# TF32 gradients: the oracle gets the TF32-rounded q, k, v, dO, but not the roundings of P
# and dS before the second products (2^-11 relative at most, ~2.8e-4 RMS, per entry, in a
# P relative to the forward's running maximum: not reproducible by the oracle). A row's
# gradient sums few such terms and cancels (Σ_j dS_ij = 0): ~3e-4 relative for tens of rows
# and keys, up to ~9e-4 for one query over 7 keys (at most 0.55 of this bound, with the
# check's ‖dO‖ floor, over 300 seeds).
TF32_GRAD_RTOL = 1e-3


def _seed(value):
    return torch.tensor(value, dtype=torch.int64, device=DEV)


def run(q, k, v, grad_out=None, *, mask=None, cq=None, ck=None, causal=False, scale=None,
        dropout_p=0.0, seed=0, tf32=False):
    """forward then backward as a backend calls them: (out, lse, (dq, dk, dv) or None)."""
    scale = default_scale(q) if scale is None else scale
    if cq is None:
        lq, lk = q.shape[2], k.shape[2]
    else:
        lq = int((cq[1:] - cq[:-1]).max()) if cq.numel() > 1 else 0
        lk = int((ck[1:] - ck[:-1]).max()) if ck.numel() > 1 else 0
    args = (mask, cq, ck, lq, lk, causal, scale, dropout_p,
            _seed(seed) if dropout_p > 0 else None, tf32)
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = attention_triton.forward(q, k, v, *args)
    if grad_out is None:
        return out, lse, None
    return out, lse, attention_triton.backward(grad_out, q, k, v, out, lse, *args)


def assert_lse_close(lse, ref, rtol, what="lse"):
    """+inf exactly on the reference's dead rows; elsewhere |lse - ref| <= rtol (1 + |ref|)
    (the log-sum-exp carries the scores' absolute rounding)."""
    ref = ref.detach().to(lse.device)
    assert lse.shape == ref.shape and lse.dtype == torch.float32 and lse.is_contiguous()
    dead = torch.isinf(ref)
    assert torch.equal(torch.isinf(lse), dead), f"{what}: dead rows differ"
    assert (lse[dead] == INF).all(), f"{what}: dead rows must have lse = +inf"
    err = (lse[~dead].double() - ref[~dead]).abs()
    bound = rtol * (1 + ref[~dead].abs())
    assert (err <= bound).all(), f"{what}: max error {err.max():.3e}"


def _grad_out(q, v):
    return torch.randn(*q.shape[:-1], v.shape[-1], device=DEV).to(q.dtype)


def check(q, k, v, *, rtol, grad_rtol=None, lse_rtol=FP32_RTOL, oracle_inputs=None, **kw):
    """Forward and backward against the float64 oracle (fed ``oracle_inputs`` (q, k, v, dO)
    when given: the TF32-rounded operands)."""
    go = _grad_out(q, v)
    out, lse, grads = run(q, k, v, go, **kw)
    ref_kw = dict(key_padding_mask=kw.get("mask"), cu_seqlens_q=kw.get("cq"),
                  cu_seqlens_k=kw.get("ck"), causal=kw.get("causal", False),
                  scale=kw.get("scale"), dropout_p=kw.get("dropout_p", 0.0),
                  seed=kw.get("seed", 0))
    ref_out, ref_lse, ref_grads = oracle(*(oracle_inputs or (q, k, v, go)), **ref_kw)
    assert out.dtype == q.dtype and out.is_contiguous() and out.shape == ref_out.shape
    assert_close(out, ref_out.to(DEV), rtol, "out")
    assert_lse_close(lse, ref_lse, lse_rtol)
    # Absolute floor: with a single visible key the gradients of q and k cancel to ~0, and
    # what is left is rounding at the scale of grad_out.
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    for name, g, ref, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape and g.is_contiguous(), name
        assert_close(g, ref.to(DEV), grad_rtol, name, atol=grad_rtol * go.double().norm().item())
    return out, lse, grads


# ----------------------------------------------------------------------------------------------
# fp32, exact: dense, varlen, layouts


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense(shape, mask, causal):
    q, k, v, m = dense(*shape, mask=mask, device=DEV)
    check(q, k, v, mask=m, causal=causal, rtol=FP32_RTOL)


@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=lambda h: f"H{h[0]}Hk{h[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", VARLEN_CASES, ids=str)
def test_varlen(lens, causal, heads):
    q, k, v, cq, ck = varlen(*lens, *heads, 40, 24, device=DEV)
    check(q, k, v, cq=cq, ck=ck, causal=causal, rtol=FP32_RTOL)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("shape", SHAPES[2:], ids=str)
def test_dense_layouts(shape, layout):
    """(B, H, L, D) views of (B, L, H, D) memory, and every other element of the last dim;
    the mask a transposed view too."""
    q, k, v, m = dense(*shape, layout=layout, mask="random", device=DEV)
    assert not q.is_contiguous()
    m = m.t().contiguous().t()
    check(q, k, v, mask=m, causal=True, rtol=FP32_RTOL)


@pytest.mark.parametrize("layout", ["strided", "transposed heads"])
def test_varlen_layouts(layout):
    q, k, v, cq, ck = varlen([5, 0, 20], [30, 3, 17], 4, 2, 16, 8, device=DEV,
                             layout="strided" if layout == "strided" else "contiguous")
    if layout == "transposed heads":  # (T, H, D) views of (H, T, D) memory
        q, k, v = (x.detach().transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    check(q, k, v, cq=cq, ck=ck, causal=True, rtol=FP32_RTOL)


def test_grad_out_and_out_layouts():
    """The backward reads any strides of grad_out and out (e.g. a non-contiguous dO)."""
    q, k, v, m = dense(2, 4, 2, 9, 21, 16, 24, mask="suffix", device=DEV)
    go = _grad_out(q, v)
    out, lse, ref = run(q, k, v, go, mask=m)
    wide = torch.zeros(*go.shape[:-1], 2 * go.shape[-1], device=DEV)
    wide[..., ::2] = go
    out_t = out.transpose(1, 2).contiguous().transpose(1, 2)
    grads = attention_triton.backward(wide[..., ::2], q.detach(), k.detach(), v.detach(), out_t,
                                      lse, m, None, None, 9, 21, False, default_scale(q), 0.0,
                                      None, False)
    for g, r in zip(grads, ref):
        assert torch.equal(g, r)


# ----------------------------------------------------------------------------------------------
# Reduced precision


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tf32(shape, causal):
    """TF32 tensor cores against the oracle fed the TF32-rounded q, k, v and dO: the scores
    are exact fp32 sums of TF32 products, so the lse keeps fp32's tolerance; out and the
    gradients also carry the roundings of P and dS (see TF32_GRAD_RTOL)."""
    q, k, v, m = dense(*shape, mask="suffix", device=DEV)
    go = _grad_out(q, v)
    out, lse, grads = run(q, k, v, go, mask=m, causal=causal, tf32=True)
    ref_out, ref_lse, ref_grads = oracle(round_tf32(q), round_tf32(k), round_tf32(v),
                                         round_tf32(go), key_padding_mask=m, causal=causal)
    assert_close(out, ref_out.to(DEV), TF32_RTOL, "out")
    assert_lse_close(lse, ref_lse, FP32_RTOL)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref.to(DEV), TF32_GRAD_RTOL, name,
                     atol=TF32_GRAD_RTOL * go.double().norm().item())


def test_tf32_varlen_dropout():
    q, k, v, cq, ck = varlen(*VARLEN_CASES[2], 4, 2, 40, 24, device=DEV)
    go = _grad_out(q, v)
    out, lse, grads = run(q, k, v, go, cq=cq, ck=ck, causal=True, dropout_p=0.25, seed=11,
                          tf32=True)
    ref_out, ref_lse, ref_grads = oracle(round_tf32(q), round_tf32(k), round_tf32(v),
                                         round_tf32(go), cu_seqlens_q=cq, cu_seqlens_k=ck,
                                         causal=True, dropout_p=0.25, seed=11)
    assert_close(out, ref_out.to(DEV), TF32_RTOL, "out")
    assert_lse_close(lse, ref_lse, FP32_RTOL)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref.to(DEV), TF32_GRAD_RTOL, name,
                     atol=TF32_GRAD_RTOL * go.double().norm().item())


def _eager_lowp(q, k, v, go, mask, causal, scale):
    """The same attention done eagerly in the inputs' dtype (the flash-attention rule's yard
    stick); the cases here have at least one visible key per row."""
    qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    ke, ve = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd @ ke.transpose(-1, -2)) * scale
    lq, lk = q.shape[2], k.shape[2]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        j, i = torch.arange(lk, device=q.device), torch.arange(lq, device=q.device)
        allowed = j[None] <= i[:, None] + (lk - lq)
    allowed = allowed[None, None] & ~mask[:, None, None, :]
    out = torch.softmax(s.masked_fill(~allowed, -INF), -1) @ ve
    return out, torch.autograd.grad(out, (qd, kd, vd), go)


# Rows that see tens of keys (every row sees one with causal only where Lq <= Lk). Not rows of
# a few keys: as in FlashAttention, Δ = rowsum(dO·O) comes from the output rounded to fp16,
# while eager fp16 forms it from its own P, so where a row's dq cancels (Σ_j dS_ij = 0 over 4
# keys) that rounding can reach ~20x eager's dq error (1 query × 7 keys: 1 seed in 150); with
# 16+ keys per row the worst measured error is 0.36 of its bound (100+ seeds).
LOW_PRECISION_CASES = [(shape, causal) for shape in SHAPES if shape[4] >= 16
                       for causal in (False, True) if not causal or shape[3] <= shape[4]]


@pytest.mark.parametrize("shape,causal", LOW_PRECISION_CASES, ids=str)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision(dtype, shape, causal):
    """fp16 (and bf16 on GPU): within 2x (3x for gradients) the same-dtype eager error; lse
    (fp32 from the same rounded inputs) at fp32's tolerance."""
    q, k, v, _ = dense(*shape, dtype=dtype, requires_grad=False, device=DEV)
    m = torch.zeros(shape[0], shape[4], dtype=torch.bool, device=DEV)
    m[:, -3:] = True  # padding, but never a dead row
    scale = default_scale(q)
    go = _grad_out(q, v)
    out, lse, grads = run(q, k, v, go, mask=m, causal=causal)
    ref_out, ref_lse, ref_grads = oracle(q, k, v, go, key_padding_mask=m, causal=causal)
    eager_out, eager_grads = _eager_lowp(q, k, v, go, m, causal, scale)
    assert out.dtype == dtype
    assert_close(out, ref_out.to(DEV), low_precision_rtol(eager_out, ref_out.to(DEV), 2), "out")
    assert_lse_close(lse, ref_lse, FP32_RTOL)
    for name, g, ref, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert g.dtype == dtype, name
        ref = ref.to(DEV)
        assert_close(g, ref, low_precision_rtol(eg, ref, 3), name)


# ----------------------------------------------------------------------------------------------
# Dropout: the reference's mask, exactly


SEEDS = [0, 2**62 - 977]  # the second one exercises the seed's high word


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_dense(p, seed):
    q, k, v, m = dense(*SHAPES[2], mask="random", device=DEV)
    check(q, k, v, mask=m, causal=True, dropout_p=p, seed=seed, rtol=FP32_RTOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_dropout_varlen(seed):
    q, k, v, cq, ck = varlen(*VARLEN_CASES[0], 4, 2, 16, 24, device=DEV)
    check(q, k, v, cq=cq, ck=ck, dropout_p=0.3, seed=seed, rtol=FP32_RTOL)


def test_dropout_seed_matters():
    q, k, v, m = dense(1, 2, 2, 9, 40, 8, 8, mask="suffix", device=DEV)
    a = run(q, k, v, mask=m, dropout_p=0.4, seed=7)[0]
    b = run(q, k, v, mask=m, dropout_p=0.4, seed=7 + 2**32)[0]
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Fully masked rows, empty inputs, NaN, determinism


def test_dead_rows_exact_zeros():
    """No visible key: out = 0, lse = +inf, and exactly zero gradient contributions."""
    # Batch entry 0 is all padding; with causal and Lq > Lk the first Lq - Lk rows see nothing.
    q, k, v, m = dense(2, 4, 2, 33, 19, 16, 8, mask="dead", device=DEV)
    go = _grad_out(q, v)
    out, lse, (dq, dk, dv) = run(q, k, v, go, mask=m, causal=True)
    assert (out[0] == 0).all() and (lse[0] == INF).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (out[1, :, :14] == 0).all() and (lse[1, :, :14] == INF).all()
    assert (dq[1, :, :14] == 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (dk[1][:, m[1]] == 0).all() and (dv[1][:, m[1]] == 0).all()  # padded keys


def test_empty_and_keyless_sequences():
    # Every query sequence empty (Tq = 0), and a packed batch with no sequence at all.
    for lens_q, lens_k in (([0, 0], [3, 5]), ([], [])):
        q, k, v, cq, ck = varlen(lens_q, lens_k, 2, 1, 8, 4, device=DEV)
        out, lse, (dq, dk, dv) = run(q, k, v, torch.zeros(0, 2, 4, device=DEV), cq=cq, ck=ck)
        assert out.shape == (0, 2, 4) and lse.shape == (2, 0) and dq.shape == q.shape
        assert (dk == 0).all() and (dv == 0).all()
    # Sequences with queries but no keys.
    q, k, v, cq, ck = varlen([4, 2], [0, 0], 2, 2, 8, 4, device=DEV)
    out, lse, (dq, dk, dv) = run(q, k, v, torch.randn(6, 2, 4, device=DEV), cq=cq, ck=ck)
    assert (out == 0).all() and (lse == INF).all() and (dq == 0).all() and dk.shape == (0, 2, 8)
    # Dense: B = 0, Lq = 0, Lk = 0.
    for shape in ((0, 2, 2, 3, 4, 8, 8), (2, 2, 2, 0, 4, 8, 8), (2, 2, 1, 3, 0, 8, 4)):
        q, k, v, _ = dense(*shape, device=DEV)
        out, lse, (dq, dk, dv) = run(q, k, v, _grad_out(q, v))
        assert out.shape == (*q.shape[:-1], shape[-1]) and lse.shape == q.shape[:-1]
        assert (out == 0).all() and (lse == INF).all() and (dq == 0).all()


def test_nan_in_nan_out():
    q, k, v, _ = dense(1, 2, 2, 20, 37, 16, 16, requires_grad=False, device=DEV)
    q[0, 1, 5, 3] = float("nan")
    out, lse, (dq, dk, dv) = run(q, k, v, _grad_out(q, v))
    assert out[0, 1, 5].isnan().all() and lse[0, 1, 5].isnan()
    assert dq[0, 1, 5].isnan().any() and dk[0, 1].isnan().any()
    others = torch.ones(2, 20, dtype=torch.bool, device=DEV)
    others[1, 5] = False
    assert torch.isfinite(out[0][others]).all() and torch.isfinite(lse[0][others]).all()
    # A NaN key that every query sees poisons every row of its head; a padded one none.
    q, k, v, _ = dense(2, 2, 1, 9, 37, 16, 16, requires_grad=False, device=DEV)
    k[:, 0, 30, 0] = float("nan")
    m = torch.zeros(2, 37, dtype=torch.bool, device=DEV)
    m[1, 25:] = True
    out, lse, _ = run(q, k, v, mask=m)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


def test_deterministic():
    """No atomics, fixed summation order: two calls are bitwise identical."""
    q, k, v, cq, ck = varlen([20, 3, 33], [37, 16, 21], 4, 2, 16, 16, device=DEV)
    go = _grad_out(q, v)
    a = run(q, k, v, go, cq=cq, ck=ck, causal=True, dropout_p=0.2, seed=3)
    b = run(q, k, v, go, cq=cq, ck=ck, causal=True, dropout_p=0.2, seed=3)
    for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# Every config path: chunked and whole-head-dim scores, split and joint dK/dV, block shapes


VARIANTS = {
    "whole-D": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
    "chunked-split": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=8, SPLIT=True, num_warps=1,
                          num_stages=1),
    "tall": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16, num_warps=1, num_stages=1),
}


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_config_paths(monkeypatch, variant, tf32):
    """The shipped tables mix these paths by family and head dim; each is checked here on
    one case with every feature on (GQA, mask, causal, dropout, Dqk != Dv)."""
    cfg = VARIANTS[variant]

    def config(kernel, fam, dqk, dv):
        chosen = dict(cfg)
        if kernel != "attention_bwd_dkdv":
            chosen.pop("SPLIT", None)
        return attention_triton._finish(kernel, chosen, fam, dqk, dv)

    monkeypatch.setattr(attention_triton, "_config", config)
    q, k, v, m = dense(2, 4, 2, 21, 37, 40, 24, mask="random", device=DEV)
    if tf32:
        q, k, v = round_tf32(q), round_tf32(k), round_tf32(v)
    go = _grad_out(q, v)
    out, lse, grads = run(q, k, v, go, mask=m, causal=True, dropout_p=0.3, seed=5, tf32=tf32)
    ref_out, ref_lse, ref_grads = oracle(q, k, v, round_tf32(go) if tf32 else go,
                                         key_padding_mask=m, causal=True, dropout_p=0.3,
                                         seed=5)
    rtol, grad_rtol = (TF32_RTOL, TF32_GRAD_RTOL) if tf32 else (FP32_RTOL, FP32_RTOL)
    assert_close(out, ref_out.to(DEV), rtol, "out")
    assert_lse_close(lse, ref_lse, FP32_RTOL)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref.to(DEV), grad_rtol, name, atol=grad_rtol * go.double().norm().item())


# ----------------------------------------------------------------------------------------------
# The shipped GPU configs compile for sm_80 and sm_90 (no GPU needed)

_COMPILE = """
from mmkernels import _triton
from mmkernels.attention import attention_triton
from mmkernels.tools import gpu_report
_triton.all_specs = attention_triton.compile_specs
for row in gpu_report.compile_all():
    print(row["kernel"], row["arch"], row["registers"], row["shared_bytes"], row["wgmma"],
          row["mma"], ",".join(row["problems"]) or "ok", flush=True)
"""


@pytest.mark.slow
def test_gpu_configs_compile():
    """Every config of the attention kernels (gpu-report's compile path, interpreter off):
    no spills, shared memory within the architecture's limit, under 255 registers, and tensor
    cores (mma.sync on sm_80, wgmma on sm_90) except for exact fp32."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run_ = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                          env=env)
    assert run_.returncode == 0, run_.stderr
    rows = [line.split() for line in run_.stdout.splitlines()]
    print(run_.stdout)
    assert len(rows) == 2 * len(attention_triton.compile_specs())
    for name, arch, regs, _shared, wgmma, mma, status in rows:
        assert status == "ok", (name, arch, status)
        assert int(regs) < 255, (name, arch, regs)
        if "ieee" not in name and "delta" not in name:
            assert (wgmma if arch == "sm_90" else mma) == "True", (name, arch)
