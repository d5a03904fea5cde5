"""The C++ LoRA ops (torch.ops.mmkernels.lora_cpu_fwd / lora_cpu_bwd) called directly: y, u and
every gradient against the float64 oracle (mmkernels.lora.reference and its autograd) for one
and many adapters (ids with -1 and an adapter without rows), dropout, bias or none, strided x,
every dtype; the gradients that are not asked for, NaN propagation, determinism,
torch.library.opcheck, and bad calls that must raise instead of crashing.

Outputs are NaN-poisoned (tests/conftest.py's deterministic mode), so an element a kernel
forgets to write fails the finiteness check of assert_close.
"""
import pytest
import torch

from mmkernels import _cpp
from mmkernels.lora import reference
from oracle import FP32_RTOL, FP64_RTOL, assert_close, low_precision_rtol

pytestmark = pytest.mark.skipif(_cpp.load() is None,
                                reason=f"C++ extension not loaded: {_cpp.error()}")

from mmkernels.lora import cpu  # noqa: E402  (registers the fakes)

OPS = torch.ops.mmkernels if _cpp.load() is not None else None
NO_ROWS = 3  # with N = 5 adapters, adapter 3 never gets a row


def make(T, fin, fout, r, *, N=1, bias=True, layout="contiguous", dtype=torch.float32,
         ids="random"):
    """Inputs as the Python layer passes them: x (T, in) (a column slice of a wider tensor
    when strided), weight, bias, lora_A (N, r, in), lora_B (N, out, r), scaling (N,) in the
    compute dtype, adapter_ids (None for N = 1)."""
    if layout == "strided":
        x = torch.randn(T, fin + 7, dtype=dtype)[:, 3:3 + fin]
        assert x.stride(0) == fin + 7
    else:
        x = torch.randn(T, fin, dtype=dtype)
    w = torch.randn(fout, fin, dtype=dtype) / fin ** 0.5
    b = torch.randn(fout, dtype=dtype) if bias else None
    A = torch.randn(N, r, fin, dtype=dtype) / fin ** 0.5
    B = torch.randn(N, fout, r, dtype=dtype) / r ** 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.empty(N, dtype=acc).uniform_(0.5, 2.0)
    adapter_ids = None
    if N > 1:
        if ids == "random":
            adapter_ids = torch.randint(-1, N, (T,))
            adapter_ids[adapter_ids == NO_ROWS] = -1
            if T >= 4:
                adapter_ids[:2] = -1
                adapter_ids[2:4] = N - 1
        elif ids == "sorted":  # runs already in order: blocks are read in place
            adapter_ids = torch.arange(T) * N // T
            adapter_ids[adapter_ids == NO_ROWS] = NO_ROWS - 1
        else:
            raise ValueError(ids)
    return x, w, b, A, B, s, adapter_ids


def seed_of(p):
    """A seed with high bits set (both halves of the hash's seed matter)."""
    if p == 0:
        return None, 0
    s = int(torch.randint(0, 2**62, ()).item()) + 2**62
    return torch.tensor(s, dtype=torch.int64), s


def run(x, w, b, A, B, s, ids, p, seed_t, gy, need=(True, True, True, True, True)):
    y, u = OPS.lora_cpu_fwd(x, w, b, A, B, s, ids, p, seed_t)
    if gy is None:
        return y, u, None
    nx, nW, nb, nA, nB = need
    grads = OPS.lora_cpu_bwd(gy, x, w, A, B, s, ids, u, p, seed_t, nx, nW, nb and b is not None,
                             nA, nB)
    return y, u, grads


def oracle(x, w, b, A, B, s, ids, p, seed, gy):
    """y, u and (dx, dW, db, dA, dB) in float64: the reference's forward and its autograd."""
    x64, w64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, w, A, B))
    b64 = None if b is None else b.detach().double().requires_grad_()
    s64 = s.double()
    if ids is None:
        y = reference.forward(x64, w64, b64, A64[0], B64[0], s64[0], p, seed)
    else:
        y = reference.forward(x64, w64, b64, A64, B64, s64, p, seed, adapter_ids=ids)
    xd = x64.detach()
    if p > 0:
        xd = xd * reference.dropout_mask(seed, x.shape[0], x.shape[1], p, x.device)
    rows = torch.zeros(x.shape[0], dtype=torch.long) if ids is None else ids
    u = torch.einsum("ti,tri->tr", xd, A64.detach()[rows.clamp_min(0)])
    u[rows < 0] = 0
    y.backward(gy.double())
    grads = [t.grad if t.grad is not None else torch.zeros_like(t)
             for t in (x64, w64, b64, A64, B64) if t is not None]
    if b is None:
        grads.insert(2, None)
    return y.detach(), u, grads


def check(x, w, b, A, B, s, ids, p, *, rtol):
    """Every output against the oracle: ‖out − ref‖ ≤ rtol‖ref‖ + rtol/10‖size‖, where size is
    the same computation on absolute values. Each result is a sum of products, and where the
    terms cancel (u of one row with r = 1 is a single dot product that can be ~0 by chance)
    no fp32 computation has a small relative error; the size of the terms bounds it."""
    seed_t, seed = seed_of(p)
    gy = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype)
    y, u, grads = run(x, w, b, A, B, s, ids, p, seed_t, gy)
    ref_y, ref_u, ref_grads = oracle(x, w, b, A, B, s, ids, p, seed, gy)
    absolute = [None if t is None else t.abs() for t in (x, w, b, A, B, s)]
    size_y, size_u, size_grads = oracle(*absolute, ids, p, seed, gy.abs())
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0]) and y.is_contiguous()
    assert u.dtype == acc and u.shape == (x.shape[0], A.shape[1]) and u.is_contiguous()
    assert_close(y, ref_y, rtol, "y", atol=rtol / 10 * size_y.norm().item())
    assert_close(u, ref_u, rtol, "u", atol=rtol / 10 * size_u.norm().item())
    if ids is not None:
        assert (u[ids < 0] == 0).all(), "u must be zero for rows without an adapter"
    for name, g, ref, size, t in zip(("dx", "dW", "db", "dA", "dB"), grads, ref_grads,
                                     size_grads, (x, w, b, A, B)):
        if t is None:
            assert g.shape == (0,), name
            continue
        assert g.dtype == t.dtype and g.shape == t.shape and g.is_contiguous(), name
        assert_close(g, ref, rtol, name, atol=rtol / 10 * size.norm().item())
    if ids is not None and A.shape[0] > NO_ROWS:
        assert (grads[3][NO_ROWS] == 0).all() and (grads[4][NO_ROWS] == 0).all()
    return y, u, grads


# ---------------------------------------------------------------------------------------
# Against the oracle
# ---------------------------------------------------------------------------------------

DIMS = [(33, 100), (257, 33), (100, 257)]
VARIANTS = [("bias", "contiguous"), ("nobias", "strided")]


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
@pytest.mark.parametrize("adapters", [1, 5], ids=["one", "five"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("dims", DIMS, ids=[f"{i}x{o}" for i, o in DIMS])
@pytest.mark.parametrize("T", [1, 7, 257, 1000])
def test_fp32(T, dims, r, p, adapters, variant):
    fin, fout = dims
    x, w, b, A, B, s, ids = make(T, fin, fout, r, N=adapters, bias=variant[0] == "bias",
                                 layout=variant[1])
    check(x, w, b, A, B, s, ids, p, rtol=FP32_RTOL)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("adapters", [1, 5], ids=["one", "five"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("T", [1, 7, 257, 1000])
def test_fp64(T, p, adapters, layout):
    x, w, b, A, B, s, ids = make(T, 33, 100, 8, N=adapters, layout=layout, dtype=torch.float64)
    check(x, w, b, A, B, s, ids, p, rtol=FP64_RTOL)


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_sorted_ids_in_place(p):
    """Ids already grouped by adapter: blocks whose rows are consecutive are read and written
    in place, others (a run boundary inside a block) too; strided x."""
    x, w, b, A, B, s, ids = make(3000, 100, 33, 8, N=5, layout="strided", ids="sorted")
    check(x, w, b, A, B, s, ids, p, rtol=FP32_RTOL)
    ids = torch.full((3000,), 2)
    check(x, w, b, A, B, s, ids, p, rtol=FP32_RTOL)


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("adapters", [1, 5], ids=["one", "five"])
@pytest.mark.parametrize("T", [1000, 3000])
def test_many_blocks(T, adapters):
    """Many row blocks and backward groups: an adapter's rows span several groups, whose dA/dB
    partials are summed after the parallel region."""
    x, w, b, A, B, s, ids = make(T, 100, 33, 8, N=adapters, layout="strided")
    check(x, w, b, A, B, s, ids, 0.3, rtol=FP32_RTOL)


@pytest.mark.parametrize("adapters", [1, 5], ids=["one", "five"])
def test_more_threads(four_threads, adapters):
    """More threads than cores: more blocks and groups, still correct and reproducible."""
    x, w, b, A, B, s, ids = make(3000, 100, 33, 8, N=adapters)
    check(x, w, b, A, B, s, ids, 0.3, rtol=FP32_RTOL)
    seed_t, _ = seed_of(0.3)
    gy = torch.randn(3000, 33)
    a = run(x, w, b, A, B, s, ids, 0.3, seed_t, gy)
    c = run(x, w, b, A, B, s, ids, 0.3, seed_t, gy)
    for t, v in zip((a[0], a[1], *a[2]), (c[0], c[1], *c[2])):
        assert torch.equal(t, v)


def test_all_rows_without_adapter():
    x, w, b, A, B, s, _ = make(300, 33, 100, 8, N=5)
    ids = torch.full((300,), -1)
    y, u, grads = check(x, w, b, A, B, s, ids, 0.3, rtol=FP32_RTOL)
    assert (u == 0).all() and (grads[3] == 0).all() and (grads[4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("adapters", [1, 5], ids=["one", "five"])
def test_low_precision(dtype, adapters):
    """fp32 math on fp16/bf16 data: at most 2x (3x for gradients) the error of the same
    computation done eagerly in that dtype."""
    p = 0.3
    x, w, b, A, B, s, ids = make(257, 100, 257, 8, N=adapters, layout="strided", dtype=dtype)
    seed_t, seed = seed_of(p)
    gy = torch.randn(x.shape[0], w.shape[0], dtype=dtype)
    y, u, grads = run(x, w, b, A, B, s, ids, p, seed_t, gy)
    ref_y, _, ref_grads = oracle(x, w, b, A, B, s, ids, p, seed, gy)
    # The same formula eagerly in the low-precision dtype.
    xl, wl, bl, Al, Bl = (t.detach().clone().requires_grad_() for t in (x, w, b, A, B))
    mask = reference.dropout_mask(seed, *x.shape, p, x.device).to(dtype)
    rows = torch.zeros(x.shape[0], dtype=torch.long) if ids is None else ids
    u_l = torch.einsum("ti,tri->tr", xl * mask, Al[rows.clamp_min(0)])
    delta = torch.einsum("tr,tor->to", u_l * s.to(dtype)[rows.clamp_min(0)][:, None],
                         Bl[rows.clamp_min(0)])
    yl = torch.nn.functional.linear(xl, wl, bl) + delta * (rows >= 0)[:, None].to(dtype)
    yl.backward(gy)
    assert y.dtype == dtype
    assert_close(y, ref_y, low_precision_rtol(yl, ref_y, 2.0), "y")
    for name, g, ref, t in zip(("dx", "dW", "db", "dA", "dB"), grads, ref_grads,
                               (xl, wl, bl, Al, Bl)):
        assert g.dtype == dtype, name
        assert_close(g, ref, low_precision_rtol(t.grad, ref, 3.0), name)


# ---------------------------------------------------------------------------------------
# Outputs: gradients not asked for, NaN, determinism, the backend functions
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("need", [(True, False, False, True, True), (False, False, False, True,
                                                                     False),
                                  (False, False, False, False, True), (True, False, False, False,
                                                                       False),
                                  (False, True, True, False, False)],
                         ids=["frozen-base", "dA", "dB", "dx", "base"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_only_asked_gradients(need, p):
    x, w, b, A, B, s, ids = make(300, 33, 100, 8, N=5, layout="strided")
    seed_t, _ = seed_of(p)
    gy = torch.randn(300, 100)
    _, _, full = run(x, w, b, A, B, s, ids, p, seed_t, gy)
    _, _, part = run(x, w, b, A, B, s, ids, p, seed_t, gy, need=need)
    for name, asked, g, g_full, t in zip(("dx", "dW", "db", "dA", "dB"), need, part, full,
                                         (x, w, b, A, B)):
        if asked:
            assert torch.equal(g, g_full), name
        else:
            assert g.shape == (0,) and g.dtype == t.dtype, name


def test_nan_in_nan_out():
    x, w, b, A, B, s, _ = make(300, 33, 100, 8, N=5)
    ids = torch.randint(0, 5, (300,))
    ids[7] = -1
    x[5, 3] = float("nan")
    x[7, 3] = float("nan")
    # p close to 1: element (5, 3) is most likely dropped, and 0 * NaN must stay NaN.
    seed_t, _ = seed_of(0.9)
    y, u, (dx, dW, db, dA, dB) = run(x, w, b, A, B, s, ids, 0.9, seed_t, torch.randn(300, 100))
    assert y[5].isnan().all() and u[5].isnan().all() and y[7].isnan().all()
    assert (u[7] == 0).all()  # no adapter: nothing of x reaches u
    others = torch.ones(300, dtype=torch.bool)
    others[[5, 7]] = False
    assert torch.isfinite(y[others]).all() and torch.isfinite(u[others]).all()
    assert dA[ids[5]].isnan().any() and dB[ids[5]].isnan().any()
    assert torch.isfinite(dx).all()  # dx does not depend on x


def test_deterministic():
    """No atomics, a fixed summation order: two calls are bitwise identical."""
    x, w, b, A, B, s, ids = make(3000, 100, 257, 8, N=5, layout="strided")
    seed_t, _ = seed_of(0.3)
    gy = torch.randn(3000, 257)
    a = run(x, w, b, A, B, s, ids, 0.3, seed_t, gy)
    c = run(x, w, b, A, B, s, ids, 0.3, seed_t, gy)
    for t, v in zip((a[0], a[1], *a[2]), (c[0], c[1], *c[2])):
        assert torch.equal(t, v)


def test_seed_matters_and_dropout_zero_ignores_it():
    x, w, b, A, B, s, ids = make(64, 33, 33, 8)
    y1, _, _ = run(x, w, b, A, B, s, ids, 0.3, torch.tensor(1), None)
    y2, _, _ = run(x, w, b, A, B, s, ids, 0.3, torch.tensor(2), None)
    assert not torch.equal(y1, y2)
    y3, _, _ = run(x, w, b, A, B, s, ids, 0.0, torch.tensor(1), None)
    y4, _, _ = run(x, w, b, A, B, s, ids, 0.0, None, None)
    assert torch.equal(y3, y4)


def test_empty_batch():
    x, w, b, A, B, s, _ = make(0, 33, 100, 8, N=5)
    ids = torch.zeros(0, dtype=torch.long)
    y, u, (dx, dW, db, dA, dB) = run(x, w, b, A, B, s, ids, 0.3, torch.tensor(3),
                                     torch.randn(0, 100))
    assert y.shape == (0, 100) and u.shape == (0, 8) and dx.shape == (0, 33)
    assert (dA == 0).all() and (dB == 0).all() and (dW == 0).all() and (db == 0).all()


def test_backend_functions():
    """cpu.forward / cpu.backward: the signatures every LoRA backend shares."""
    x, w, b, A, B, s, ids = make(257, 33, 100, 8, N=5, layout="strided")
    seed_t, seed = seed_of(0.3)
    y, u = cpu.forward(x, w, b, A, B, s, ids, 0.3, seed_t, False)
    gy = torch.randn_like(y)
    grads = cpu.backward(gy, x, w, A, B, s, ids, u, 0.3, seed_t, True, False, False, True, True,
                         False)
    ref_y, ref_u, ref_grads = oracle(x, w, b, A, B, s, ids, 0.3, seed, gy)
    assert_close(y, ref_y, FP32_RTOL, "y")
    assert_close(u, ref_u, FP32_RTOL, "u")
    for name, i in (("dx", 0), ("dA", 3), ("dB", 4)):
        assert_close(grads[i], ref_grads[i], FP32_RTOL, name)
    assert grads[1].shape == (0,) and grads[2].shape == (0,)


# ---------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensors, AOT dispatch)
# ---------------------------------------------------------------------------------------

def opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("adapters", [1, 5], ids=["one", "five"])
def test_opcheck(dtype, adapters):
    x, w, b, A, B, s, ids = make(40, 33, 20, 4, N=adapters, layout="strided", dtype=dtype)
    # requires_grad inputs: test_autograd_registration needs them.
    x, w, b, A, B = (t.requires_grad_() for t in (x, w, b, A, B))
    seed = torch.tensor(7)
    opcheck(OPS.lora_cpu_fwd.default, (x, w, b, A, B, s, ids, 0.25, seed))
    y, u = OPS.lora_cpu_fwd(x, w, b, A, B, s, ids, 0.25, seed)
    gy = torch.randn_like(y)
    opcheck(OPS.lora_cpu_bwd.default,
            (gy, x, w, A, B, s, ids, u, 0.25, seed, True, True, True, True, True))
    opcheck(OPS.lora_cpu_bwd.default,
            (gy, x, w, A, B, s, ids, u, 0.0, None, True, False, False, True, False))


# ---------------------------------------------------------------------------------------
# Bad calls raise (RuntimeError from TORCH_CHECK), never crash
# ---------------------------------------------------------------------------------------

def _bad_calls():
    x, w, b, A, B, s, ids = make(6, 8, 5, 2, N=3)
    y, u = OPS.lora_cpu_fwd(x, w, b, A, B, s, ids, 0.0, None)
    gy = torch.randn_like(y)
    seed = torch.tensor(1)

    def fwd(x=x, w=w, b=b, A=A, B=B, s=s, ids=ids, p=0.0, seed=None):
        return lambda: OPS.lora_cpu_fwd(x, w, b, A, B, s, ids, p, seed)

    def bwd(gy=gy, x=x, A=A, s=s, ids=ids, u=u, p=0.0, seed=None):
        return lambda: OPS.lora_cpu_bwd(gy, x, w, A, B, s, ids, u, p, seed, True, True, True,
                                        True, True)

    return {
        "x 1-D": fwd(x=x[0]),
        "x 3-D": fwd(x=x[None]),
        "x integer": fwd(x=x.long()),
        "weight in mismatch": fwd(w=torch.randn(5, 9)),
        "weight 1-D": fwd(w=torch.randn(5)),
        "bias shape": fwd(b=torch.randn(4)),
        "bias dtype": fwd(b=b.double()),
        "A 2-D": fwd(A=A[0]),
        "A in mismatch": fwd(A=torch.randn(3, 2, 9)),
        "B out mismatch": fwd(B=torch.randn(3, 4, 2)),
        "B rank mismatch": fwd(B=torch.randn(3, 5, 3)),
        "B adapters mismatch": fwd(B=torch.randn(2, 5, 2)),
        "rank 0": fwd(A=torch.randn(3, 0, 8), B=torch.randn(3, 5, 0)),
        "no adapters": fwd(A=torch.randn(0, 2, 8), B=torch.randn(0, 5, 2), s=s[:0]),
        "dtype mismatch": fwd(w=w.double()),
        "A dtype mismatch": fwd(A=A.double()),
        "scaling shape": fwd(s=s[:2]),
        "scaling integer": fwd(s=torch.ones(3, dtype=torch.long)),
        "ids missing with N > 1": fwd(ids=None),
        "ids too large": fwd(ids=torch.tensor([0, 1, 2, 3, 0, 0])),
        "ids below -1": fwd(ids=torch.tensor([0, 1, 2, -2, 0, 0])),
        "ids int32": fwd(ids=ids.int()),
        "ids length": fwd(ids=ids[:5]),
        "ids 2-D": fwd(ids=ids[None]),
        "dropout_p 1": fwd(p=1.0, seed=seed),
        "dropout_p negative": fwd(p=-0.1, seed=seed),
        "dropout without seed": fwd(p=0.1),
        "seed float": fwd(p=0.1, seed=torch.tensor(1.0)),
        "seed two elements": fwd(p=0.1, seed=torch.tensor([1, 2])),
        "bwd grad_y shape": bwd(gy=gy[:, :4]),
        "bwd grad_y dtype": bwd(gy=gy.double()),
        "bwd u shape": bwd(u=u[:, :1]),
        "bwd u dtype": bwd(u=u.double()),
        "bwd ids too large": bwd(ids=torch.tensor([0, 1, 2, 3, 0, 0])),
        "bwd x shape": bwd(x=torch.randn(7, 8)),
        "bwd dropout without seed": bwd(p=0.5),
    }


BAD_CALLS = list(_bad_calls()) if OPS is not None else []


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_raise(case):
    with pytest.raises(RuntimeError):
        _bad_calls()[case]()
