"""The C++ contrastive ops (torch.ops.mmkernels.infonce_lse / infonce_grad / siglip_pass) called
directly: torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch), the
outputs against a dense float64 formula, and bad calls that must raise instead of crashing.

The losses built on these ops are tested in test_infonce.py / test_siglip.py.
"""
import pytest
import torch
import torch.nn.functional as F

from mmkernels import _cpp
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


def dense_lse(i, t, scale, bias):
    x = dense_logits(i, t, scale, bias)
    return x.logsumexp(1), x.logsumexp(0)


def dense_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w):
    x = dense_logits(i, t, scale, bias)
    p = (row_w.double()[:, None] * (x - row_lse.double()[:, None]).exp()
         + col_w.double()[None, :] * (x - col_lse.double()[None, :]).exp())
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


@pytest.mark.parametrize("layout", LAYOUT)
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_infonce_lse(dtype, with_bias, layout):
    i, t = features(7, 9, 5, dtype, layout, requires_grad=True)
    scale, bias = scalars(with_bias, requires_grad=True)
    opcheck(OPS.infonce_lse.default, (i, t, scale, bias))


@pytest.mark.parametrize("layout", LAYOUT)
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_infonce_grad(dtype, with_bias, layout):
    i, t = features(7, 9, 5, dtype, layout, requires_grad=True)
    scale, bias = scalars(with_bias, requires_grad=True)
    row_lse, col_lse = OPS.infonce_lse(i, t, scale, bias)
    cd = compute_dtype(dtype)
    row_w = LAYOUTS[layout](torch.rand(7, 1, dtype=cd))[:, 0]  # a strided vector for "transposed"
    col_w = torch.rand(9, dtype=cd)
    opcheck(OPS.infonce_grad.default, (i, t, scale, bias, row_lse, col_lse, row_w, col_w))


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


def test_ops_compile_fullgraph():
    """The fakes carry the ops through torch.compile with dynamic shapes, no graph break."""
    def f(i, t, scale, bias):
        row_lse, col_lse = CppPrimitives.lse(i, t, scale, bias)
        a_i, a_t, psum = CppPrimitives.grad(i, t, scale, bias, row_lse, col_lse,
                                            torch.ones_like(row_lse), torch.ones_like(col_lse))
        loss, g_i, g_t, gsum = CppPrimitives.siglip_pass(i, t, scale, bias, 0, True)
        return row_lse.sum() + col_lse.sum() + a_i.sum() + a_t.sum() + psum + loss + g_i.sum() \
            + g_t.sum() + gsum

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for m, n in ((7, 9), (12, 4)):
        i, t = features(m, n, 5, torch.float32)
        scale, bias = scalars(True)
        torch.testing.assert_close(compiled(i, t, scale, bias), f(i, t, scale, bias))


# ---------------------------------------------------------------------------------------
# Values against the dense formulas (odd shapes, both side orders: the kernels put the
# longer side on the parallel axis)
# ---------------------------------------------------------------------------------------

SHAPES = [pytest.param((7, 9, 5), id="7x9x5"), pytest.param((9, 7, 5), id="9x7x5")]
ALL_DTYPES = DTYPES + [pytest.param(torch.float16, id="fp16"),
                       pytest.param(torch.bfloat16, id="bf16")]


def rtol_for(dtype):
    return FP64_RTOL if dtype == torch.float64 else FP32_RTOL


def check(outs, refs, dtype, what):
    for k, (out, ref) in enumerate(zip(outs, refs)):
        assert out.dtype == compute_dtype(dtype), f"{what}[{k}]: dtype {out.dtype}"
        assert out.is_contiguous(), f"{what}[{k}]: not contiguous"
        assert not out.requires_grad
        assert_close(out, ref, rtol_for(dtype), f"{what}[{k}]")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_infonce_matches_dense(shape, dtype, with_bias, layout):
    m, n, d = shape
    i, t = features(m, n, d, dtype, layout, requires_grad=True)
    scale, bias = scalars(with_bias)
    row_lse, col_lse = CppPrimitives.lse(i, t, scale, bias)
    check((row_lse, col_lse), dense_lse(i, t, scale, bias), dtype, "infonce_lse")
    cd = compute_dtype(dtype)
    # Positive weights (as in the losses): with mixed signs ΣP cancels and fp32 cannot promise
    # a relative error on it.
    row_w, col_w = torch.rand(m, dtype=cd) + 0.1, torch.rand(n, dtype=cd) + 0.1
    outs = CppPrimitives.grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w)
    assert outs[0].shape == (m, d) and outs[1].shape == (n, d) and outs[2].shape == ()
    check(outs, dense_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w), dtype,
          "infonce_grad")


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


def test_empty_sides():
    i, t = features(0, 4, 3, torch.float32)
    scale, bias = scalars(True)
    row_lse, col_lse = OPS.infonce_lse(i, t, scale, bias)
    assert row_lse.shape == (0,) and torch.equal(col_lse, torch.full((4,), -float("inf")))
    loss, a_i, a_t, gsum = OPS.siglip_pass(i, t, scale, bias, 0, True)
    assert loss.item() == 0 and a_i.shape == (0, 3) and torch.equal(a_t, torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------
# Bad calls raise (RuntimeError from TORCH_CHECK), never crash
# ---------------------------------------------------------------------------------------

def _bad_calls():
    i, t = torch.randn(4, 3), torch.randn(5, 3)
    s = torch.tensor(1.0)
    r, c, rw, cw = torch.zeros(4), torch.zeros(5), torch.ones(4), torch.ones(5)
    return {
        "1-D features": lambda: OPS.infonce_lse(i[0], t, s, None),
        "feature size": lambda: OPS.infonce_lse(i, torch.randn(5, 2), s, None),
        "dtype mismatch": lambda: OPS.siglip_pass(i, t.double(), s, None, 0, True),
        "integer features": lambda: OPS.infonce_lse(i.long(), t.long(), s, None),
        "scale not scalar": lambda: OPS.infonce_lse(i, t, torch.ones(2), None),
        "empty bias": lambda: OPS.siglip_pass(i, t, s, torch.ones(0), 0, False),
        "row_lse length": lambda: OPS.infonce_grad(i, t, s, None, c, c, rw, cw),
        "col_w 2-D": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw, cw[None]),
        "integer weights": lambda: OPS.infonce_grad(i, t, s, None, r, c, rw.long(), cw),
    }


@pytest.mark.parametrize("case", [
    "1-D features", "feature size", "dtype mismatch", "integer features", "scale not scalar",
    "empty bias", "row_lse length", "col_w 2-D", "integer weights"])
def test_bad_calls_raise(case):
    with pytest.raises(RuntimeError):
        _bad_calls()[case]()
