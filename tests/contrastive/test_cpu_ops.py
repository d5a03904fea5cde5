"""The C++ contrastive ops (torch.ops.mmkernels.infonce_lse / infonce_grad / siglip_pass) called
directly: torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch), the
outputs against a dense float64 formula, and bad calls that must raise instead of crashing.

The losses built on these ops are tested in test_infonce.py / test_siglip.py.
"""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import _cpp
from mmkernels.contrastive import infonce, reference
from oracle import FP32_RTOL, FP64_RTOL, assert_close, strided_copy, transposed_copy

pytestmark = pytest.mark.skipif(_cpp.load() is None,
                                reason=f"C++ extension not loaded: {_cpp.error()}")

from mmkernels.contrastive.cpu import CppPrimitives, register_fakes  # noqa: E402

OPS = torch.ops.mmkernels if _cpp.load() is not None else None
LAYOUTS = {"contiguous": lambda x: x, "transposed": transposed_copy, "strided": strided_copy}


def features(m, n, d, dtype, layout="contiguous", requires_grad=False):
    i = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype)
    t = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    i, t = LAYOUTS[layout](i), LAYOUTS[layout](t)
    return i.requires_grad_(requires_grad), t.requires_grad_(requires_grad)


def scalars(with_bias, requires_grad=False):
    scale = torch.tensor(7.5, requires_grad=requires_grad)
    bias = torch.tensor(-2.25, requires_grad=requires_grad) if with_bias else None
    return scale, bias


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Dense float64 formulas
# ---------------------------------------------------------------------------------------

def dense_logits(i, t, scale, bias):
    x = scale.double() * i.detach().double() @ t.detach().double().T
    return x if bias is None else x + bias.double()


def positives(m, n, offset):
    """Row and column indices of the positives (i, i + offset) inside an m x n matrix."""
    rows = torch.arange(m)
    keep = (rows + offset >= 0) & (rows + offset < n)
    return rows[keep], rows[keep] + offset


def dense_lse(i, t, scale, bias, offset):
    """(row_lse_off, col_lse_off, diag, X): the LSEs without the positives, their logits."""
    x = dense_logits(i, t, scale, bias)
    rows, cols = positives(*x.shape, offset)
    diag = torch.full((x.shape[0],), -float("inf"), dtype=x.dtype)
    diag[rows] = x[rows, cols]
    off = x.clone()
    off[rows, cols] = -float("inf")
    return off.logsumexp(1), off.logsumexp(0), diag, x


def dense_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset):
    x = dense_logits(i, t, scale, bias)
    p = (row_w.double()[:, None] * (x - row_lse.double()[:, None]).exp()
         + col_w.double()[None, :] * (x - col_lse.double()[None, :]).exp())
    p[positives(*x.shape, offset)] = 0.0
    return p @ t.detach().double(), p.T @ i.detach().double(), p.sum()


def dense_siglip(i, t, scale, bias, offset, want_grad):
    x = dense_logits(i, t, scale, bias)
    m, n = x.shape
    rows = torch.arange(m)[:, None]
    cols = torch.arange(n)[None, :]
    z = torch.where(cols == rows + offset, 1.0, -1.0).double()
    loss = F.softplus(-z * x).sum()
    g = -z * torch.sigmoid(-z * x)
    if not want_grad:
        empty = x.new_empty(0)
        return loss, empty, empty, x.new_zeros(())
    return loss, g @ t.detach().double(), g.T @ i.detach().double(), g.sum()


# ---------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
BIAS = [pytest.param(False, id="nobias"), pytest.param(True, id="bias")]
LAYOUT = [pytest.param("contiguous", id="contig"), pytest.param("transposed", id="transposed")]


def opcheck(op, args):
    # requires_grad inputs: test_autograd_registration needs them (the ops are not
    # differentiable, so their outputs must not require grad).
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# How many rows of logits the forward keeps: none, all (min(M, N): the kernel frame), or one
# 256-row block (shapes with more rows only), the others recomputed.
KEEP = [pytest.param("recompute", id="recompute"), pytest.param("all", id="keep")]
KEEP_PARTIAL = KEEP + [pytest.param("partial", id="keep-partial")]


def keep_rows(keep, m, n):
    return {"recompute": 0, "all": min(m, n), "partial": 256}[keep]


def kernel_frame(x):
    """The logits as the kernels lay them out: X when M <= N, Xᵀ when M > N."""
    return x.T if x.shape[0] > x.shape[1] else x


# (M, N, offset): both side orders (the kernels swap sides when M > N, and keep rows of Xᵀ
# then), offsets inside and outside the matrix.
OP_SHAPES = [pytest.param((7, 9, 0), id="7x9+0"), pytest.param((9, 7, -2), id="9x7-2"),
             pytest.param((9, 7, 20), id="9x7+20")]


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize("layout", LAYOUT)
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_infonce_lse(dtype, with_bias, layout, shape, keep):
    m, n, offset = shape
    i, t = features(m, n, 5, dtype, layout, requires_grad=True)
    scale, bias = scalars(with_bias, requires_grad=True)
    opcheck(OPS.infonce_lse.default, (i, t, scale, bias, offset, keep_rows(keep, m, n)))


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize("layout", LAYOUT)
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_infonce_grad(dtype, with_bias, layout, shape, keep):
    m, n, offset = shape
    i, t = features(m, n, 5, dtype, layout, requires_grad=True)
    scale, bias = scalars(with_bias, requires_grad=True)
    row_off, col_off, diag, tiles = OPS.infonce_lse(i, t, scale, bias, offset,
                                                    keep_rows(keep, m, n))
    cd = compute_dtype(dtype)
    row_w = LAYOUTS[layout](torch.rand(m, 1, dtype=cd))[:, 0]  # a strided vector for "transposed"
    col_w = torch.rand(n, dtype=cd)
    opcheck(OPS.infonce_grad.default,
            (i, t, scale, bias, row_off, col_off, row_w, col_w, offset, tiles))


@pytest.mark.parametrize("shape", [pytest.param((300, 520, 5), id="300x520+5"),
                                   pytest.param((520, 300, -3), id="520x300-3")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_partial_keep(dtype, shape):
    """One kept 256-row block of two (both side orders) through opcheck, both ops."""
    m, n, offset = shape
    i, t = features(m, n, 5, dtype, "transposed", requires_grad=True)
    scale, bias = scalars(True, requires_grad=True)
    opcheck(OPS.infonce_lse.default, (i, t, scale, bias, offset, 256))
    row_off, col_off, diag, tiles = OPS.infonce_lse(i, t, scale, bias, offset, 256)
    assert tiles.shape == (256, max(m, n))
    cd = compute_dtype(dtype)
    opcheck(OPS.infonce_grad.default, (i, t, scale, bias, row_off, col_off,
                                       torch.rand(m, dtype=cd), torch.rand(n, dtype=cd), offset,
                                       tiles))


def test_keep_row_block_matches_the_kernels():
    """The host's KEEP_ROW_BLOCK is the kernels' row block: they accept a multiple of it as a
    partial keep and refuse half of it."""
    k = infonce.KEEP_ROW_BLOCK
    i, t = features(k + 1, k + 9, 4, torch.float32)
    scale, bias = scalars(False)
    assert OPS.infonce_lse(i, t, scale, bias, 0, k)[3].shape == (k, k + 9)
    with pytest.raises(RuntimeError, match="multiple of"):
        OPS.infonce_lse(i, t, scale, bias, 0, k // 2)


@pytest.mark.parametrize("want_grad", [pytest.param(True, id="grad"),
                                       pytest.param(False, id="nograd")])
@pytest.mark.parametrize("layout", LAYOUT)
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_siglip_pass(dtype, with_bias, layout, want_grad):
    i, t = features(7, 9, 5, dtype, layout, requires_grad=True)
    scale, bias = scalars(with_bias, requires_grad=True)
    opcheck(OPS.siglip_pass.default, (i, t, scale, bias, 2, want_grad))


def test_register_fakes_is_idempotent():
    assert register_fakes() and register_fakes()


@pytest.mark.parametrize("keep", KEEP)
def test_ops_compile_fullgraph(keep):
    """The fakes carry the ops through torch.compile with dynamic shapes, no graph break."""
    def f(i, t, scale, bias):
        row_off, col_off, diag, tiles = CppPrimitives.lse(
            i, t, scale, bias, 1, keep_rows(keep, i.shape[0], t.shape[0]))
        a_i, a_t, psum = CppPrimitives.grad(i, t, scale, bias, row_off, col_off,
                                            torch.ones_like(row_off), torch.ones_like(col_off),
                                            1, tiles)
        loss, g_i, g_t, gsum = CppPrimitives.siglip_pass(i, t, scale, bias, 0, True)
        return row_off.sum() + col_off.sum() + diag.clamp_min(-1e3).sum() + tiles.sum() \
            + a_i.sum() + a_t.sum() + psum + loss + g_i.sum() + g_t.sum() + gsum

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for m, n in ((7, 9), (12, 4)):
        i, t = features(m, n, 5, torch.float32)
        scale, bias = scalars(True)
        torch.testing.assert_close(compiled(i, t, scale, bias), f(i, t, scale, bias))


def test_ops_compile_partial_keep():
    """A partial keep (one 256-row block) through torch.compile with dynamic shapes."""
    def f(i, t, scale):
        row_off, col_off, diag, tiles = CppPrimitives.lse(i, t, scale, None, 0, 256)
        a_i, a_t, psum = CppPrimitives.grad(i, t, scale, None, row_off, col_off,
                                            torch.ones_like(row_off), torch.ones_like(col_off),
                                            0, tiles)
        return tiles.sum() + a_i.sum() + a_t.sum() + psum

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for m, n in ((300, 520), (530, 290)):
        i, t = features(m, n, 5, torch.float32)
        scale, _ = scalars(False)
        torch.testing.assert_close(compiled(i, t, scale), f(i, t, scale))


# ---------------------------------------------------------------------------------------
# Values against the dense formulas (odd shapes, both side orders: the kernels put the
# longer side on the parallel axis)
# ---------------------------------------------------------------------------------------

SHAPES = [pytest.param((7, 9, 5), id="7x9x5"), pytest.param((9, 7, 5), id="9x7x5")]
ALL_DTYPES = DTYPES + [pytest.param(torch.float16, id="fp16"),
                       pytest.param(torch.bfloat16, id="bf16")]
# Inside the matrix (0, positive, negative) and outside it at both ends.
OFFSETS = [0, 2, -3, 100, -100]


def rtol_for(dtype):
    return FP64_RTOL if dtype == torch.float64 else FP32_RTOL


def check(outs, refs, dtype, what):
    for k, (out, ref) in enumerate(zip(outs, refs)):
        assert out.dtype == compute_dtype(dtype), f"{what}[{k}]: dtype {out.dtype}"
        assert out.is_contiguous(), f"{what}[{k}]: not contiguous"
        assert not out.requires_grad
        assert_close(out, ref, rtol_for(dtype), f"{what}[{k}]")


def check_lse(outs, refs, dtype, what, magnitude):
    """Like check(), for outputs that are -inf where the reference is (no positive, or nothing
    left once the positive is out). An LSE or a logit carries the absolute rounding of logits
    of size ``magnitude`` (max |X|), which matters where it is itself near 0."""
    eps = torch.finfo(compute_dtype(dtype)).eps
    for k, (out, ref) in enumerate(zip(outs, refs)):
        assert out.dtype == compute_dtype(dtype), f"{what}[{k}]: dtype {out.dtype}"
        assert out.is_contiguous() and not out.requires_grad, f"{what}[{k}]"
        finite = torch.isfinite(ref)
        assert torch.equal(out == -float("inf"), ref == -float("inf")), f"{what}[{k}]: -inf"
        if finite.any():
            atol = 8 * eps * (magnitude + 1) * finite.sum().item() ** 0.5
            assert_close(out[finite], ref[finite], rtol_for(dtype), f"{what}[{k}]", atol)


def lse_and_grad(i, t, scale, bias, offset, keep, dtype):
    """Both ops against the dense formulas; returns the kernels' lse outputs."""
    m, n = i.shape[0], t.shape[0]
    k = keep_rows(keep, m, n)
    outs = CppPrimitives.lse(i, t, scale, bias, offset, k)
    refs = dense_lse(i, t, scale, bias, offset)
    check_lse(outs[:3], refs[:3], dtype, "infonce_lse", refs[3].abs().max().item())
    tiles = outs[3]
    if k:
        assert tiles.shape == (k, max(m, n)) and tiles.dtype == compute_dtype(dtype)
        assert tiles.is_contiguous()
        assert_close(tiles, kernel_frame(refs[3])[:k], rtol_for(dtype), "tiles")
        # The positives' logits are the kept tiles' values, bit for bit.
        rows, cols = positives(m, n, offset)
        kept = (rows if m <= n else cols) < k
        x = torch.full((m, n), float("nan"), dtype=tiles.dtype)
        kernel_frame(x)[:k] = tiles
        assert torch.equal(x[rows[kept], cols[kept]], outs[2][rows[kept]])
    else:
        assert tiles.shape == (0,)
    # The backward takes the full LSEs (the host adds the positives back).
    cd = compute_dtype(dtype)
    x = dense_logits(i, t, scale, bias)
    row_lse, col_lse = x.logsumexp(1).to(cd), x.logsumexp(0).to(cd)
    # Positive weights (as in the losses): with mixed signs ΣP cancels and fp32 cannot promise
    # a relative error on it.
    row_w, col_w = torch.rand(m, dtype=cd) + 0.1, torch.rand(n, dtype=cd) + 0.1
    before = tiles.clone()
    grads = CppPrimitives.grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset, tiles)
    assert grads[0].shape == (m, i.shape[1]) and grads[1].shape == (n, i.shape[1])
    assert grads[2].shape == ()
    # Only read: a graph kept with retain_graph=True can run its backward again.
    assert torch.equal(tiles, before)
    ref_grads = dense_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset)
    check(grads, ref_grads, dtype, "infonce_grad")
    return outs


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_infonce_matches_dense(shape, dtype, with_bias, layout, offset, keep):
    m, n, d = shape
    i, t = features(m, n, d, dtype, layout, requires_grad=True)
    scale, bias = scalars(with_bias)
    lse_and_grad(i, t, scale, bias, offset, keep, dtype)


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("offset", [0, 1, -1])
@pytest.mark.parametrize("shape", [pytest.param((1, 1), id="1x1"), pytest.param((1, 3), id="1x3"),
                                   pytest.param((3, 1), id="3x1")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_infonce_single_rows(dtype, shape, offset, keep):
    """B = 1 and single rows/columns: a row whose only entry is its positive has an empty
    off-positive sum (-inf), and its gradient weights are all zero."""
    i, t = features(*shape, 4, dtype)
    scale, bias = scalars(True)
    lse_and_grad(i, t, scale, bias, offset, keep, dtype)


@pytest.mark.parametrize("keep", KEEP_PARTIAL)
@pytest.mark.parametrize("shape,offset", [
    pytest.param((300, 700), 0, id="300x700+0"), pytest.param((300, 700), 257, id="300x700+257"),
    pytest.param((700, 300), -300, id="700x300-300"), pytest.param((700, 300), 5, id="700x300+5"),
    pytest.param((600, 600), -1, id="600x600-1")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_infonce_many_tiles(dtype, shape, offset, keep):
    """Several row blocks and column blocks (and chunks), positives crossing tile borders; a
    partial keep reads its first row block and recomputes the others."""
    i, t = features(*shape, 16, dtype)
    scale, bias = scalars(True)
    lse_and_grad(i, t, scale, bias, offset, keep, dtype)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
@pytest.mark.parametrize("top", [2.0, 4.9, 5.1, 12.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_infonce_offsets_spread(dtype, top, order):
    """Row norms from 0.05 to ``top`` at scale 10 spread the tiles' row and column offsets
    (maxima, LSEs) from a few units to ~100: the kernels evaluate one exponential per logit
    where a tile's offsets lie within kWindow (40) of each other and two elsewhere; both, and
    tiles on either side of the bound, must match the dense formulas."""
    m, n = 600, 700
    i, t = features(m, n, 16, dtype)
    norms = torch.linspace(0.05, top, m, dtype=torch.float64)
    if order == "shuffled":
        norms = norms[torch.randperm(m)]
    i = (i.double() * norms[:, None]).to(dtype)
    scale = torch.tensor(10.0)
    for keep in ("recompute", "all"):
        lse_and_grad(i, t, scale, None, 3, keep, dtype)
        lse_and_grad(t, i, scale, None, -3, keep, dtype)  # swapped sides


@pytest.mark.parametrize("keep", KEEP)
def test_infonce_confident_pairs(keep):
    """Aligned pairs with a large scale: the positives dominate every row and column, yet the
    off-positive LSEs (all the loss there is) keep fp32's relative accuracy."""
    i, _ = features(64, 64, 256, torch.float32)
    t = (i + 1e-3 * torch.randn_like(i)).div(1 + 1e-3)
    scale = torch.tensor(100.0)
    outs = lse_and_grad(i, t, scale, None, 0, keep, torch.float32)
    assert (outs[2] > outs[0] + 50).all()  # the positive exceeds the rest by e^50


def test_grad_accepts_tiles_of_any_layout():
    """Kept logits passed in a layout infonce_lse does not produce (column-major) give the
    same result as the kept ones, and as recomputing them."""
    i, t = features(9, 7, 5, torch.float64)
    scale, bias = scalars(True)
    row_off, col_off, diag, kept = CppPrimitives.lse(i, t, scale, bias, 1, 7)
    assert kept.shape == (7, 9) and kept.is_contiguous()  # swapped sides: rows of X^T
    w_r, w_c = torch.rand(9, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    args = (i, t, scale, bias, row_off, col_off, w_r, w_c, 1)
    a = CppPrimitives.grad(*args, kept)
    b = CppPrimitives.grad(*args, transposed_copy(kept))
    c = CppPrimitives.grad(*args, kept.new_empty(0))
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-12)


def test_kept_rows_budget():
    """All rows while the logits fit KEEP_LOGITS_BYTES, whole 256-row blocks beyond it."""
    f32, f64 = torch.float32, torch.float64
    assert infonce.kept_rows("cpu", 8192, 8192, f32, True) == 8192  # 256 MiB: all
    assert infonce.kept_rows("cpu", 16384, 16384, f32, True) == 4096  # a quarter
    assert infonce.kept_rows("cpu", 8193, 8193, f32, True) == 7936
    assert infonce.kept_rows("cpu", 8192, 8192, torch.bfloat16, True) == 8192  # fp32 math
    assert infonce.kept_rows("cpu", 8192, 8192, f64, True) == 4096
    assert infonce.kept_rows("cpu", 10**6, 10**6, f32, True) == 0  # not one block fits
    assert infonce.kept_rows("cpu", 64, 10**6, f32, True) == 64
    assert infonce.kept_rows("cpu", 8192, 8192, f32, False) == 0  # no backward
    assert infonce.kept_rows("triton", 64, 64, f32, True) == 0
    assert infonce.kept_rows("cpu", 0, 64, f32, True) == 0


def test_partial_keep_end_to_end(monkeypatch):
    """A budget for one 256-row block of a 600-pair batch: the loss keeps those rows and
    recomputes the others, and its value and gradients match the float64 formula."""
    monkeypatch.setattr(infonce, "KEEP_LOGITS_BYTES", 300 * 600 * 4)
    assert infonce.kept_rows("cpu", 600, 600, torch.float32, True) == 256
    i, t = features(600, 600, 16, torch.float32, requires_grad=True)
    scale = torch.tensor(12.0, requires_grad=True)
    loss = mmkernels.infonce_loss(i, t, scale, backend="cpu")
    loss.backward()
    inputs = [x.detach().double().requires_grad_() for x in (i, t, scale)]
    ref = reference.infonce_loss(*inputs, None).mean()
    ref.backward()
    assert_close(loss, ref.float(), FP32_RTOL, "loss")
    for x, r, name in zip((i, t, scale), inputs, ("image", "text", "scale")):
        assert_close(x.grad, r.grad.float(), FP32_RTOL, f"d_{name}")


# (1100 x 1100 fp32: 4.6 MiB, over the 4 MiB from which the extension holds the buffer.)
HELD = 1100


def test_held_buffer_is_reused_only_when_free():
    """Kept logits of >= 4 MiB live in the one buffer the extension holds between calls
    (csrc/common/alloc.h): the next call reuses it once nothing references it; a call made
    while it is in use gets its own memory and leaves the first call's logits intact."""
    mmkernels.empty_cache()
    scale, bias = scalars(True)
    i, t = features(HELD, HELD, 8, torch.float32)
    first = CppPrimitives.lse(i, t, scale, bias, 0, HELD)[3]
    held, snapshot = first.data_ptr(), first.clone()
    view = first[1:]
    del first
    i2, t2 = features(HELD, HELD, 8, torch.float32)
    busy = CppPrimitives.lse(i2, t2, scale, bias, 0, HELD)[3]  # a view still uses the buffer
    assert busy.data_ptr() != held
    assert torch.equal(view, snapshot[1:])
    del view
    again = CppPrimitives.lse(i2, t2, scale, bias, 0, HELD)[3]
    assert again.data_ptr() == held and torch.equal(again, busy)
    del again
    # A partial keep of a swapped call (rows of X^T) is held the same way.
    part = CppPrimitives.lse(t2[:HELD - 1], i2[:512], scale, bias, 0, 512)[3]
    assert part.shape == (512, HELD - 1)
    assert_close(part, dense_logits(t2[:HELD - 1], i2[:512], scale, bias).T, FP32_RTOL, "tiles")
    del part
    # Another size replaces the held buffer.
    other = CppPrimitives.lse(i[:-1], t, scale, bias, 0, HELD - 1)[3]
    assert other.shape == (HELD - 1, HELD)
    assert_close(other, dense_logits(i[:-1], t, scale, bias), FP32_RTOL, "tiles")
    del other
    mmkernels.empty_cache()


def test_held_buffer_under_retained_graphs():
    """Training-loop use of the held buffer: two losses in one graph, the graph retained
    across a later step, and its backward run again: every gradient still matches the float64
    formula, so no step ever writes into logits that a live graph keeps."""
    mmkernels.empty_cache()

    def step(seed):
        torch.manual_seed(seed)
        i, t = features(HELD, HELD, 8, torch.float32, requires_grad=True)
        return i, t, mmkernels.infonce_loss(i, t, 5.0, backend="cpu")

    def expected(i, t):
        i64, t64 = i.detach().double().requires_grad_(), t.detach().double().requires_grad_()
        reference.infonce_loss(i64, t64, torch.tensor(5.0, dtype=torch.float64), None).mean() \
            .backward()
        return i64.grad, t64.grad

    a_i, a_t, loss_a = step(1)
    b_i, b_t, loss_b = step(2)  # a's logits are in use: b gets its own buffer
    (loss_a + loss_b).backward(retain_graph=True)
    first = [x.grad.clone() for x in (a_i, a_t, b_i, b_t)]
    for x, ref in zip(first, [*expected(a_i, a_t), *expected(b_i, b_t)]):
        assert_close(x, ref.float(), FP32_RTOL, "gradient")
    c_i, c_t, loss_c = step(3)  # the graph above still holds its logits
    loss_c.backward()
    for x, ref in zip((c_i.grad, c_t.grad), expected(c_i, c_t)):
        assert_close(x, ref.float(), FP32_RTOL, "gradient")
    for x in (a_i, a_t, b_i, b_t):
        x.grad = None
    (loss_a + loss_b).backward()
    for x, y in zip((a_i.grad, a_t.grad, b_i.grad, b_t.grad), first):
        assert torch.equal(x, y)
    mmkernels.empty_cache()


@pytest.mark.parametrize("keep", KEEP)
def test_nan_in_nan_out(keep):
    i, t = features(6, 8, 4, torch.float32)
    scale, bias = scalars(False)
    i[2, 1] = float("nan")
    row_off, col_off, diag, tiles = CppPrimitives.lse(i, t, scale, bias, 0, keep_rows(keep, 6, 8))
    assert row_off[2].isnan() and diag[2].isnan()
    assert not row_off[[0, 1, 3, 4, 5]].isnan().any()
    others = torch.tensor([j for j in range(8) if j != 2])  # column 2 holds row 2's positive
    assert col_off[others].isnan().all() and not col_off[2].isnan()
    ones_r, ones_c = torch.ones(6), torch.ones(8)
    a_i, a_t, psum = CppPrimitives.grad(i, t, scale, bias, torch.zeros(6), torch.zeros(8),
                                        ones_r, ones_c, 0, tiles)
    assert a_i[2].isnan().all() and a_t[others].isnan().all() and psum.isnan()
    # A NaN scale poisons everything.
    outs = CppPrimitives.lse(i, t, torch.tensor(float("nan")), None, 0, keep_rows(keep, 6, 8))
    assert all(o.isnan().all() for o in outs[:3])


@pytest.mark.parametrize("want_grad", [pytest.param(True, id="grad"),
                                       pytest.param(False, id="nograd")])
@pytest.mark.parametrize("offset", [0, 2, -3, 100])
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_siglip_pass_matches_dense(shape, dtype, with_bias, offset, want_grad):
    m, n, d = shape
    i, t = features(m, n, d, dtype, "transposed")
    scale, bias = scalars(with_bias)
    outs = CppPrimitives.siglip_pass(i, t, scale, bias, offset, want_grad)
    refs = dense_siglip(i, t, scale, bias, offset, want_grad)
    if want_grad:
        assert outs[1].shape == (m, d) and outs[2].shape == (n, d)
        check(outs, refs, dtype, "siglip_pass")
    else:
        assert outs[1].shape == (0,) and outs[2].shape == (0,)
        assert outs[1].dtype == outs[2].dtype == outs[3].dtype == compute_dtype(dtype)
        assert outs[3].item() == 0
        check(outs[:1], refs[:1], dtype, "siglip_pass")


@pytest.mark.parametrize("keep", KEEP)
def test_empty_sides(keep):
    i, t = features(0, 4, 3, torch.float32)
    scale, bias = scalars(True)
    row_off, col_off, diag, tiles = OPS.infonce_lse(i, t, scale, bias, 0, keep_rows(keep, 0, 4))
    assert row_off.shape == (0,) and diag.shape == (0,)
    assert torch.equal(col_off, torch.full((4,), -float("inf")))
    assert tiles.shape == (0,)  # min(M, N) = 0 rows: nothing to keep
    a_i, a_t, psum = OPS.infonce_grad(i, t, scale, bias, row_off, torch.zeros(4), row_off,
                                      torch.ones(4), 0, tiles)
    assert a_i.shape == (0, 3) and torch.equal(a_t, torch.zeros(4, 3)) and psum.item() == 0
    loss, a_i, a_t, gsum = OPS.siglip_pass(i, t, scale, bias, 0, True)
    assert loss.item() == 0 and a_i.shape == (0, 3) and torch.equal(a_t, torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------
# Bad calls raise (RuntimeError from TORCH_CHECK), never crash
# ---------------------------------------------------------------------------------------

def _bad_calls():
    i, t = torch.randn(4, 3), torch.randn(5, 3)
    s = torch.tensor(1.0)
    r, c, rw, cw = torch.zeros(4), torch.zeros(5), torch.ones(4), torch.ones(5)
    e = torch.empty(0)
    return {
        "1-D features": lambda: OPS.infonce_lse(i[0], t, s, None, 0, 0),
        "feature size": lambda: OPS.infonce_lse(i, torch.randn(5, 2), s, None, 0, 4),
        "dtype mismatch": lambda: OPS.siglip_pass(i, t.double(), s, None, 0, True),
        "integer features": lambda: OPS.infonce_lse(i.long(), t.long(), s, None, 0, 0),
        "scale not scalar": lambda: OPS.infonce_lse(i, t, torch.ones(2), None, 0, 0),
        "empty bias": lambda: OPS.siglip_pass(i, t, s, torch.ones(0), 0, False),
        "row_lse length": lambda: OPS.infonce_grad(i, t, s, None, c, c, rw, cw, 0, e),
        "col_w 2-D": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw[None], 0, e),
        "integer weights": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw.long(), cw, 0, e),
        "tiles shape": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw, 0, torch.zeros(5, 4)),
        "tiles 0x0": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw, 0, torch.zeros(0, 0)),
        "tiles 1-D": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw, 0, torch.zeros(20)),
        "tiles dtype": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw, 0,
                                                torch.zeros(4, 5, dtype=torch.float64)),
        "tiles integer": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw, 0,
                                                  torch.zeros(4, 5, dtype=torch.int32)),
        "tiles rows": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw, 0, torch.zeros(3, 5)),
        "tiles too many rows": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw, 0,
                                                        torch.zeros(5, 5)),
        "keep_rows negative": lambda: OPS.infonce_lse(i, t, s, None, 0, -1),
        "keep_rows too many": lambda: OPS.infonce_lse(i, t, s, None, 0, 5),
        "keep_rows partial block": lambda: OPS.infonce_lse(torch.randn(300, 3), torch.randn(700, 3),
                                                           s, None, 0, 100),
    }


BAD_CALLS = ["1-D features", "feature size", "dtype mismatch", "integer features",
             "scale not scalar", "empty bias", "row_lse length", "col_w 2-D", "integer weights",
             "tiles shape", "tiles 0x0", "tiles 1-D", "tiles dtype", "tiles integer", "tiles rows",
             "tiles too many rows", "keep_rows negative", "keep_rows too many",
             "keep_rows partial block"]


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_raise(case):
    with pytest.raises(RuntimeError):
        _bad_calls()[case]()


def test_extreme_offsets():
    """Offsets near the int64 limits mean "no positive" and must not overflow."""
    i, t = features(5, 6, 3, torch.float64)
    scale, bias = scalars(False)
    for offset in (2**63 - 1, -2**63):
        row_off, col_off, diag, tiles = OPS.infonce_lse(i, t, scale, bias, offset, 5)
        x = dense_logits(i, t, scale, bias)
        assert (diag == -float("inf")).all()
        torch.testing.assert_close(row_off, x.logsumexp(1))
        torch.testing.assert_close(col_off, x.logsumexp(0))
