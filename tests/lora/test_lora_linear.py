"""mmkernels.lora_linear on every backend, through the public API: parity with the float64
reference (y and the gradients of x, A, B, and W/b when trained), one and many adapters,
dropout (the same regenerated mask on every backend), the shared contract (low precision,
extremes, gradcheck, double backward, opcheck, compile), NaN, empty shapes and bad input."""
import numpy as np
import pytest
import torch

import mmkernels
from backends import all_backends, device, fast_backends, interpreted
from contract import ContractTests, OpContract
from oracle import FP32_RTOL, FP64_RTOL, as64, assert_close, strided_copy

LORA = mmkernels.lora_linear


def make(T, d_in, d_out, r, N=0, bias=True, dtype=torch.float32, lead=None, noncontig=False,
         train_base=False, scale=1.0):
    """x (T, in) (or lead + (in,)), W, b, A, B with PEFT-like magnitudes: A ~ 1/√in, B ~ 1/√r
    (a trained B, not PEFT's zero init, which would hide every adapter error). N = 0: one
    adapter (A (r, in)); N >= 1: N adapters. x, A, B require grad; W, b when ``train_base``."""
    dev = device()
    x = torch.randn(T, d_in, device=dev) * scale
    if noncontig:
        x = strided_copy(x)
    if lead is not None:
        x = x.reshape(*lead, d_in)
    W = torch.randn(d_out, d_in, device=dev) / d_in ** 0.5
    b = torch.randn(d_out, device=dev) if bias else None
    shape_a = (r, d_in) if N == 0 else (N, r, d_in)
    shape_b = (d_out, r) if N == 0 else (N, d_out, r)
    A = torch.randn(shape_a, device=dev) / d_in ** 0.5
    B = torch.randn(shape_b, device=dev) / r ** 0.5
    out = []
    for t, grad in ((x, True), (W, train_base), (b, train_base), (A, True), (B, True)):
        if t is not None:
            t = t.to(dtype).detach().requires_grad_(grad)
        out.append(t)
    return out


def ids_for(T, N):
    """Adapter ids with −1 rows and adapter N−1 given no rows: (t mod N) − 1."""
    return (torch.arange(T, device=device()) % N - 1).to(torch.int64)


def run(backend, x, W, b, A, B, scaling=0.7, seed=0, **kw):
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's generator
    return LORA(x, W, b, A, B, scaling, backend=backend, **kw)


def _zeros_for_unused(grads, leaves):
    """The reference's graph skips adapters with no rows (None gradients); kernels write 0."""
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _reference(inputs, w, scaling, **kw):
    """y and the gradients of Σ w·y on the float64 reference (None for unused → 0)."""
    ref_inputs = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                  for t in inputs]
    y = run("reference", *ref_inputs, scaling=scaling, **kw)
    leaves = [t for t in ref_inputs if t is not None and t.requires_grad]
    return y, _zeros_for_unused(torch.autograd.grad(y, leaves, w, allow_unused=True), leaves)


def check(backend, inputs, rtol=FP32_RTOL, scaling=0.7, **kw):
    """y and the gradients of Σ w·y (random w) against the float64 reference (same seed, so
    the same dropout mask).

    Each result is a sum of products; where the terms cancel (e.g. dA of a single row is
    du·x with du = s·w·B a dot product that can be ~0 by chance) no fp32 computation gets
    a small relative error, so the bound also allows rtol/10 of the same computation on the
    absolute values (the size of the terms that cancel)."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    y = run(backend, *inputs, scaling=scaling, **kw)
    x = inputs[0]
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + inputs[1].shape[:1]
    # w exactly representable in y's dtype: the reference sees the same cotangent.
    w = torch.randn_like(y, dtype=torch.float32).to(y.dtype).double()
    grads = _zeros_for_unused(torch.autograd.grad(y, leaves, w.to(y.dtype), allow_unused=True),
                              leaves)
    ref, ref_grads = _reference(inputs, w, scaling, **kw)
    abs_scaling = scaling.abs() if isinstance(scaling, torch.Tensor) else abs(scaling)
    size, size_grads = _reference(
        [None if t is None else t.detach().abs().requires_grad_(t.requires_grad)
         for t in inputs], w.abs(), abs_scaling, **kw)
    assert_close(y, ref, rtol, "y", atol=rtol / 10 * size.norm().item())
    assert len(leaves) == len(grads) == len(ref_grads) == len(size_grads)
    for i, (t, g, r, a) in enumerate(zip(leaves, grads, ref_grads, size_grads)):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, r, rtol, f"gradient {i}", atol=rtol / 10 * a.norm().item())
    return y, grads


# ---------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------

# (T, in, out, r): every T of {1, 7, 257, 1000}, in/out of {33, 100, 257}, r of {1, 8, 64}.
SHAPES = [(1, 33, 100, 1), (7, 100, 33, 8), (257, 257, 100, 64), (1000, 33, 257, 8),
          (257, 100, 257, 1), (7, 257, 33, 64)]
SHAPES_INTERPRETER = [(1, 33, 100, 1), (7, 100, 33, 8), (257, 33, 100, 64)]


def _shapes(backend):
    return SHAPES_INTERPRETER if interpreted(backend) else SHAPES


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("adapters", [0, 5], ids=["one", "five"])
def test_parity(backend, bias, dropout_p, adapters):
    for T, d_in, d_out, r in _shapes(backend):
        inputs = make(T, d_in, d_out, r, adapters, bias, noncontig=T % 2 == 1)
        ids = ids_for(T, adapters) if adapters else None
        scaling = torch.tensor([0.5, 2.0, -1.0, 0.25, 3.0]) if adapters and T > 7 else 0.7
        check(backend, inputs, scaling=scaling if not isinstance(scaling, torch.Tensor)
              else scaling.to(device()), dropout_p=dropout_p, adapter_ids=ids)


@pytest.mark.parametrize("backend", all_backends())
def test_trained_base_and_leading_dims(backend):
    """W and b require grad (full fine-tuning plus LoRA); x (2, 3, 5, in); one adapter with
    ids (−1 rows skip it)."""
    inputs = make(30, 33, 20, 4, lead=(2, 3, 5), train_base=True)
    check(backend, inputs, dropout_p=0.2)
    ids = torch.tensor([0, -1] * 15, device=device())
    check(backend, inputs, adapter_ids=ids)


@pytest.mark.parametrize("backend", fast_backends())
def test_float64_end_to_end(backend):
    if backend == "triton":
        pytest.skip("Triton kernels take fp32/fp16/bf16, not float64")
    inputs = make(65, 40, 30, 8, 3, dtype=torch.float64, train_base=True)
    check(backend, inputs, rtol=FP64_RTOL, dropout_p=0.1, adapter_ids=ids_for(65, 3))


@pytest.mark.parametrize("backend", all_backends())
def test_many_adapters_equal_one_call_each(backend):
    """A mixed batch gives each row what a single-adapter call gives it, and adapter n's
    gradients come only from its rows (an adapter with no rows gets exact zeros)."""
    T, N = 40, 4
    x, W, b, A, B = make(T, 24, 16, 4, N)
    ids = ids_for(T, N)
    y = run(backend, x, W, b, A, B, adapter_ids=ids)
    gA, gB = torch.autograd.grad(y.square().sum(), (A, B))
    for n in range(-1, N):
        rows = (ids == n).nonzero()[:, 0]
        if n < 0:
            one = torch.nn.functional.linear(x[rows], W, b)
        else:
            one = run(backend, x[rows], W, b, A[n], B[n]) if rows.numel() else None
        if one is not None:
            assert_close(y[rows], one, FP32_RTOL, f"adapter {n}")
        if n >= 0 and rows.numel():
            a, bb = A[n].detach().requires_grad_(), B[n].detach().requires_grad_()
            ga, gb = torch.autograd.grad(run(backend, x[rows], W, b, a, bb).square().sum(),
                                         (a, bb))
            assert_close(gA[n], ga, FP32_RTOL, f"dA[{n}]")
            assert_close(gB[n], gb, FP32_RTOL, f"dB[{n}]")
    assert (gA[N - 1] == 0).all() and (gB[N - 1] == 0).all()


@pytest.mark.parametrize("backend", all_backends())
def test_frozen_base_gets_no_gradient(backend):
    x, W, b, A, B = make(9, 12, 10, 2)
    y = run(backend, x, W, b, A, B)
    y.sum().backward()
    assert W.grad is None and b.grad is None
    assert x.grad is not None and A.grad is not None and B.grad is not None


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", all_backends())
def test_dropout_repeatable_and_seeded(backend):
    x, W, b, A, B = make(33, 40, 20, 8)
    first = run(backend, x, W, b, A, B, seed=3, dropout_p=0.5)
    again = run(backend, x, W, b, A, B, seed=3, dropout_p=0.5)
    other = run(backend, x, W, b, A, B, seed=4, dropout_p=0.5)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("backend", fast_backends())
def test_dropout_mask_statistics(backend):
    """With W = 0, B = I and A = I the output is dropout(x)·s: the kept fraction is 1 − p and
    kept values are x/(1 − p)."""
    p, T, d = 0.3, 64, 32
    x = torch.rand(T, d, device=device()) + 1.0
    W = torch.zeros(d, d, device=device())
    eye = torch.eye(d, device=device())
    y = LORA(x, W, None, eye, eye, 1.0, dropout_p=p, backend=backend)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.03
    assert_close(y[kept], x[kept] / (1 - p), FP32_RTOL)


# ---------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", all_backends())
def test_empty_and_size_one(backend):
    for T, d_in, d_out, r in [(0, 5, 4, 2), (1, 1, 1, 1), (3, 1, 7, 1)]:
        x, W, b, A, B = make(T, d_in, d_out, r)
        y = run(backend, x, W, b, A, B)
        assert y.shape == (T, d_out)
        grads = torch.autograd.grad(y.sum(), (x, A, B))
        assert all(torch.isfinite(g).all() for g in grads)
    x, W, b, A, B = make(4, 6, 5, 2, N=2)
    y = run(backend, x, W, b, A, B, adapter_ids=torch.full((4,), -1, device=device()))
    assert_close(y, torch.nn.functional.linear(x, W, b), FP32_RTOL)


@pytest.mark.parametrize("backend", all_backends())
def test_expanded_transposed_and_sliced_operands(backend):
    """x expanded (row stride 0), W a transposed view, A and B slices of wider tensors, x
    transposed from (in, T): all give the contiguous result."""
    x0, W0, b, A0, B0 = make(1, 20, 12, 3)
    x = x0.detach().expand(9, 20).requires_grad_()
    W = W0.detach().t().contiguous().t()
    A = torch.randn(3, 40, device=device())[:, ::2].requires_grad_()
    B = torch.randn(12, 6, device=device())[:, 1::2].requires_grad_()
    xt = torch.randn(20, 9, device=device()).t().requires_grad_()
    for xx in (x, xt):
        check(backend, [xx, W, b, A, B])


@pytest.mark.parametrize("backend", all_backends())
def test_numpy_and_tensor_scalings(backend):
    inputs = make(9, 12, 10, 3, 2)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0], device=device())
    ref = run(backend, *inputs, scaling=0.5, adapter_ids=ids)
    for s in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5, device=device()),
              torch.tensor([0.5, 0.5], dtype=torch.float64, device=device())):
        assert_close(run(backend, *inputs, scaling=s, adapter_ids=ids), ref, FP32_RTOL)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("where", ["x", "W", "A", "B"])
def test_nan_in_nan_out(backend, where):
    """A NaN reaches exactly what depends on it: y, and the gradients computed from it."""
    x, W, b, A, B = make(6, 8, 7, 3, train_base=True)
    target = {"x": x, "W": W, "A": A, "B": B}[where]
    with torch.no_grad():
        target[-1, -1] = float("nan")
    y = run(backend, x, W, b, A, B, dropout_p=0.0)
    assert torch.isnan(y).any()
    dx, dW, db, dA, dB = torch.autograd.grad(y.sum(), (x, W, b, A, B))
    # x → u → dB, and x → dW, dA; W → dx; A → u → dB, and A → dx; B → du → dA, dx.
    expect = {"x": (dW, dA, dB), "W": (dx,), "A": (dB, dx), "B": (dA, dx)}[where]
    assert all(torch.isnan(g).any() for g in expect)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def _bad_cases():
    x, W, b, A, B = (t.detach() for t in make(6, 8, 5, 2, bias=True))
    A3, B3 = A[None].expand(3, -1, -1), B[None].expand(3, -1, -1)
    ids = torch.zeros(6, dtype=torch.int64, device=device())
    return [
        ((x[:, :7], W, b, A, B), {}, ValueError, "x .* and weight .* must agree on in"),
        ((x, W, b[:4], A, B), {}, ValueError, r"bias must have shape \(out,\)"),
        ((x, W, b, A[:, :7], B), {}, ValueError, "lora_A .* must have in = 8"),
        ((x, W, b, A, B[:, :1]), {}, ValueError, "lora_B must have shape"),
        ((x, W, b, A, B.double()), {}, TypeError, "lora_B must have x's dtype float32"),
        ((x, W.half(), b, A, B), {}, TypeError, "weight must have x's dtype"),
        ((x, W, b, A3, B3), {}, ValueError, "adapter_ids .* must name each row"),
        ((x, W, b, A3, B3), dict(adapter_ids=ids[:5]), ValueError,
         r"adapter_ids must have shape \(T,\) = \(6,\)"),
        ((x, W, b, A3, B3), dict(adapter_ids=ids.int()), TypeError,
         "adapter_ids must be an int64 tensor"),
        ((x, W, b, A3, B3), dict(adapter_ids=ids + 3), ValueError,
         r"adapter_ids must be in \[-1, 3\)"),
        ((x, W, b, A3, B3), dict(adapter_ids=ids - 2), ValueError,
         r"adapter_ids must be in \[-1, 3\)"),
        ((x, W, b, A3, B3, torch.ones(2)), dict(adapter_ids=ids), ValueError,
         r"scaling must be a number or a tensor of shape \(\) or \(N,\) = \(3,\)"),
        ((x, W, b, A, B, "2"), {}, TypeError, "scaling must be a real number"),
        ((x, W, b, A, B, torch.ones((), requires_grad=True)), {}, ValueError,
         "scaling is a constant"),
        ((x, W, b, A, B), dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        ((x, W, b, A, B), dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        ((x, W, b, A, B), dict(dropout_p=None), TypeError, "dropout_p must be a real number"),
        ((x, W, b, A[:0], B[:, :0]), {}, ValueError, r"rank r must be in \[1, 256\]"),
        ((x, W, b, A[None, :, :, None], B), {}, ValueError, "lora_A must have shape"),
        ((x.int(), W, b, A, B), {}, TypeError, "x must be float16, bfloat16"),
        ((x[0, 0], W, b, A, B), {}, TypeError, "x must be a tensor of shape"),
        ((x, W, b, A, B), dict(backend="cuda"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    args, kw, error, words = _bad_cases()[case]
    with pytest.raises(error, match=words):
        LORA(*args, **kw) if len(args) == 6 else LORA(*args, 0.5, **kw)


# ---------------------------------------------------------------------------------------
# The shared contract (one adapter; five adapters where the shape says so)
# ---------------------------------------------------------------------------------------

def _fn(x, W, b, A, B, *, backend, dropout_p=0.0):
    """The op as the contract calls it: ids derived from the row count when A is 3-D, and a
    fixed dropout seed so that gradcheck's repeated calls see one function."""
    ids = ids_for(x.shape[0], A.shape[0]) if A.dim() == 3 else None
    if dropout_p:
        torch.manual_seed(1234)
    return LORA(x, W, b, A, B, 0.7, dropout_p=dropout_p, adapter_ids=ids, backend=backend)


def _make(shape, dtype, noncontig=False, layout="contiguous", scale=1.0):
    T, d_in, d_out, r, N = shape
    x, W, b, A, B = make(T, d_in, d_out, r, N, dtype=dtype, scale=scale,
                         noncontig=noncontig or layout == "transposed", train_base=True)
    return [x, W, b, A, B]


def _eager(x, W, b, A, B):
    """PEFT's formula in the inputs' dtype (what users run today)."""
    ids = ids_for(x.shape[0], A.shape[0]) if A.dim() == 3 else None
    y = torch.nn.functional.linear(x, W, b)
    if ids is None:
        return y + 0.7 * ((x @ A.T) @ B.T)
    for n in range(A.shape[0]):
        rows = (ids == n).nonzero()[:, 0]
        y = y.index_add(0, rows, 0.7 * ((x[rows] @ A[n].T) @ B[n].T))
    return y


def _check_fp32(inputs, rtol, backend="auto", **kw):
    x, W, b, A, B = inputs
    ids = ids_for(x.shape[0], A.shape[0]) if A.dim() == 3 else None
    check(backend, inputs, rtol=rtol, adapter_ids=ids, **kw)


def _opcheck_calls(inputs, backend):
    x, W, b, A, B = inputs
    fwd, bwd = torch.ops.mmkernels.lora_fwd.default, torch.ops.mmkernels.lora_bwd.default
    A3, B3 = (A, B) if A.dim() == 3 else (A[None], B[None])
    N = A3.shape[0]
    scaling = torch.linspace(0.5, 1.5, N, device=x.device)
    ids = ids_for(x.shape[0], N) if A.dim() == 3 else None
    calls = []
    for p in (0.0, 0.25):
        seed = torch.tensor(77, device=x.device) if p else None
        args = (x, W, b, A3, B3, scaling, ids, p, seed, backend)
        calls.append((fwd, args))
        with torch.no_grad():
            y, u, tf32 = fwd(*args)
        for needs in ([True] * 5, [True, False, False, True, True]):
            calls.append((bwd, (torch.randn_like(y), x.detach(), W.detach(), A3.detach(),
                                B3.detach(), scaling, ids, u, p, seed, needs, backend, tf32)))
    return calls


def _peer(backend):
    """PEFT's lora.Linear (the layer users run today) on the same weights."""
    peft = pytest.importorskip("peft", reason="PEFT is not installed")
    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(40, 24)),
                                peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.to(device())
    x = torch.randn(3, 9, 40, device=device())
    ours = LORA(x, layer.base_layer.weight, layer.base_layer.bias,
                layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                layer.scaling["default"], backend=backend)
    assert_close(ours, layer(x), FP32_RTOL)


class TestLoRAContract(ContractTests):
    contract = OpContract(
        fn=_fn,
        make=_make,
        eager=_eager,
        check_fp32=_check_fp32,
        shapes=dict(lowp=(257, 256, 200, 16, 5), lowp_interpreter=(33, 64, 48, 16, 3),
                    extreme=(65, 100, 33, 8, 3), float64=(127, 65, 33, 8, 5),
                    small=(7, 9, 5, 3, 0), gradcheck=(5, 6, 4, 2, 3), compile=(17, 24, 12, 4, 3)),
        nan_targets={},  # LoRA's own NaN test (test_nan_in_nan_out) checks each gradient
        extreme=dict(scale=1e3),
        opcheck_calls=_opcheck_calls,
        peer=_peer,
        gradcheck_kwargs=[dict(), dict(dropout_p=0.3)],
    )
    test_nan_in_nan_out = None  # replaced by this file's test_nan_in_nan_out (per gradient)


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_fullgraph_is_the_first_call_of_a_process():
    """Nothing is imported or looked up lazily while torch.compile traces a first call: a
    compiled training step of a LoRA model with a mixed batch, dropout and adapter ids."""
    import subprocess
    import sys
    code = (
        "import torch, mmkernels\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(6, 5, 24, requires_grad=True)\n"
        "W, b = torch.randn(16, 24), torch.randn(16)\n"
        "A = torch.randn(3, 4, 24, requires_grad=True)\n"
        "B = torch.randn(3, 16, 4, requires_grad=True)\n"
        "ids = torch.tensor([0, 2, -1, 1, 0, 2]).repeat_interleave(5)\n"
        "f = torch.compile(lambda x, A, B: mmkernels.lora_linear(x, W, b, A, B, 0.5,\n"
        "                  adapter_ids=ids), fullgraph=True)\n"
        "out = f(x, A, B)\n"
        "out.square().sum().backward()\n"
        "ref = mmkernels.lora_linear(x.detach().double(), W.double(), b.double(), A.detach()\n"
        "    .double(), B.detach().double(), 0.5, adapter_ids=ids, backend='reference')\n"
        "err = ((out.double() - ref).norm() / ref.norm()).item()\n"
        "assert err < 1e-5, err\n"
        "assert x.grad is not None and A.grad is not None and B.grad is not None\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.slow
def test_compiled_module_mixed_batch_training_and_dropout_repeatable():
    """A compiled LoRALinear trains with a mixed batch (the same gradients as eager); with
    dropout the seed comes from Inductor's RNG (as for torch's dropout): the same manual_seed
    repeats the compiled result, another seed changes it."""
    torch.manual_seed(0)
    layer = mmkernels.nn.LoRALinear(torch.nn.Linear(24, 16), 4, 8.0)
    layer.add_adapter("b", 4, 4.0)
    for name in ("default", "b"):
        torch.nn.init.normal_(layer.lora_B[name].weight)
    names = ["b", "__base__", "default", "b"]
    x = torch.randn(4, 3, 24)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: layer(x, adapter_names=names), fullgraph=True)
    grads = []
    for fn in (compiled, lambda x: layer(x, adapter_names=names)):
        layer.zero_grad()
        fn(x).square().sum().backward()
        grads.append([p.grad.clone() for p in (layer.lora_A["b"].weight,
                                               layer.lora_B["default"].weight)])
    for g, r in zip(*grads):
        assert_close(g, r, FP32_RTOL)
    torch._dynamo.reset()
    step = torch.compile(lambda x: LORA(x, layer.weight, layer.bias,
                                        layer.lora_A["b"].weight, layer.lora_B["b"].weight, 0.5,
                                        dropout_p=0.3), fullgraph=True)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(step(x).detach())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
