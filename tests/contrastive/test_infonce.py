"""InfoNCE: parity against a float64 eager reference on every backend over shapes and options,
the generic op contract (tests/contract.py), bad input, and the ClipLoss module's arguments."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from backends import all_backends, device, fast_backends, interpreted
from contract import ContractTests, OpContract
from contrastive_cases import check_against_float64, check_against_peer, make_inputs
from oracle import FP32_RTOL, as64, assert_close, rel_err

LOSS = mmkernels.infonce_loss

SHAPES = [(1, 1), (2, 7), (7, 33), (127, 64), (257, 129), (1000, 31)]
CONFIGS = {  # label smoothing, bias, reduction, non-contiguous inputs
    "plain": (0.0, False, "mean", False),
    "bias-sum-strided": (0.1, True, "sum", True),
    "smooth-none-strided": (0.3, False, "none", True),
    "full-smoothing-bias": (1.0, True, "mean", False),
}


def make(b, d, dtype, **kw):
    return make_inputs(b, d, dtype, device=device(), **kw)


def eager(image, text, scale, bias):
    """The open_clip formula, all in the input dtype."""
    logits = scale.to(image.dtype) * image @ text.T + bias.to(image.dtype)
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def opcheck_calls(inputs, backend):
    image, text, scale, bias = inputs
    fwd = torch.ops.mmkernels.infonce_fwd.default
    bwd = torch.ops.mmkernels.infonce_bwd.default
    calls = []
    for b in (bias, None):
        for keep in ((0, image.shape[0]) if backend == "cpu" else (0,)):
            calls.append((fwd, (image, text, scale, b, 0.1, backend, keep)))
            # The backward op is differentiated only through the reference: plain tensors.
            with torch.no_grad():
                _, row_lse, col_lse, excess, logits, tf32 = fwd(image, text, scale, b, 0.1,
                                                                backend, keep)
            grad = torch.rand(image.shape[0], device=device())
            calls.append((bwd, (grad, image.detach(), text.detach(), scale.detach(),
                                None if b is None else b.detach(), row_lse, col_lse, excess,
                                logits, 0.1, backend, tf32)))
    return calls


def peer(backend):
    image, text, scale, bias = make(33, 16, torch.float32, bias=True)
    # The bias's gradient is exactly 0 (softmax is shift-invariant): its fp32 rounding has
    # no scale to be relative to, and the float64 contract checks it with its absolute floor.
    for b in (None, bias):
        check_against_peer(mmkernels.nn.ClipLoss(backend=backend), "ClipLoss",
                           (image, text, scale, b), FP32_RTOL, grads=("image", "text", "scale"))


class TestInfoNCEContract(ContractTests):
    contract = OpContract(
        fn=LOSS,
        make=lambda shape, dtype, **kw: make(*shape, dtype, **{"bias": True, **kw}),
        eager=eager,
        check_fp32=lambda inputs, rtol, **kw: check_against_float64(LOSS, inputs, rtol, **kw),
        shapes=dict(lowp=(257, 129), lowp_interpreter=(127, 64), extreme=(64, 48),
                    float64=(127, 33), small=(7, 5), gradcheck=(6, 5), compile=(33, 16)),
        nan_targets={"image": 0, "text": 1, "scale": 2},
        # Unnormalized features of norm 30 with logit_scale 100: logits ~1e5, still finite.
        extreme=dict(norm=30.0, scale=100.0),
        opcheck_calls=opcheck_calls,
        peer=peer,
        kwargs=dict(label_smoothing=0.1),
        gradcheck_kwargs=[dict(label_smoothing=0.0, reduction="mean"),
                          dict(label_smoothing=0.2, reduction="none")],
    )


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_parity_fp32(backend, b, d, config):
    if interpreted(backend) and (b > 257 or (b == 257 and config != "plain")):
        pytest.skip("interpreter: shapes kept small (257 runs in one config)")
    eps, bias, reduction, noncontig = CONFIGS[config]
    inputs = make(b, d, torch.float32, bias=bias, noncontig=noncontig)
    weights = torch.rand(b, device=device()) + 0.5 if reduction == "none" else None
    check_against_float64(LOSS, inputs, FP32_RTOL, weights, label_smoothing=eps,
                          reduction=reduction, backend=backend)


def test_float_scale_and_no_grad():
    """A Python float scale is a constant; under no_grad nothing is saved."""
    image, text, _, _ = make(5, 4, torch.float32, bias=False)
    with torch.no_grad():
        loss = mmkernels.infonce_loss(image, text, 14.3)
    ref = mmkernels.infonce_loss(image.double(), text.double(), 14.3, backend="reference")
    assert not loss.requires_grad
    assert_close(loss, ref, FP32_RTOL)


BAD = [
    ("mismatched B", lambda i, t: (i[:-1], t, 1.0), ValueError, "same shape"),
    ("mismatched D", lambda i, t: (i[:, :-1], t, 1.0), ValueError, "same shape"),
    ("1-D", lambda i, t: (i[0], t[0], 1.0), ValueError, "image_features must have shape (B, D)"),
    ("3-D", lambda i, t: (i[None], t[None], 1.0), ValueError, "(B, D)"),
    ("integer", lambda i, t: (i.long(), t.long(), 1.0), TypeError, "image_features must be"),
    ("mixed dtypes", lambda i, t: (i, t.double(), 1.0), TypeError, "same dtype"),
    ("vector scale", lambda i, t: (i, t, torch.ones(2)), ValueError, "must be a scalar"),
    ("int scale tensor", lambda i, t: (i, t, torch.tensor(2)), TypeError, "logit_scale"),
    ("string scale", lambda i, t: (i, t, "2"), TypeError, "logit_scale"),
    ("devices", lambda i, t: (i, t.to("meta"), 1.0), ValueError, "same device"),
    ("scale device", lambda i, t: (i, t, torch.tensor(1.0, device="meta")), ValueError,
     "logit_scale must be on"),
    ("not a tensor", lambda i, t: (i.tolist(), t, 1.0), TypeError, "torch.Tensor"),
    ("empty", lambda i, t: (i[:0], t[:0], 1.0), ValueError, "B >= 1"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, make, exc, words = case
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(exc, match=re.escape(words)):
        mmkernels.infonce_loss(*make(image, text))


def test_bad_options():
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="reduction"):
        mmkernels.infonce_loss(image, text, 1.0, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        mmkernels.infonce_loss(image, text, 1.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="backend"):
        mmkernels.infonce_loss(image, text, 1.0, backend="cuda")
    # float64 is refused by triton whatever the machine; the error names the dtype and the
    # backends that can run the call.
    with pytest.raises(mmkernels.BackendUnavailableError, match="float64.*backends that can"):
        mmkernels.infonce_loss(image.double(), text.double(), 1.0, backend="triton")


@pytest.mark.parametrize("scale", [np.float32(14.3), np.float64(14.3), np.int64(14), 14, 14.3],
                         ids=["np.float32", "np.float64", "np.int64", "int", "float"])
def test_number_scales(scale):
    """Python and numpy numbers are accepted and held in the features' precision."""
    image, text, _, _ = make(5, 4, torch.float64, bias=False)
    loss = mmkernels.infonce_loss(image, text, scale, backend="reference")
    ref = mmkernels.infonce_loss(image, text, torch.tensor(float(scale), dtype=torch.float64),
                                 backend="reference")
    assert loss.dtype == torch.float64
    assert_close(loss, ref, 1e-15)


@pytest.mark.parametrize("backend", all_backends())
def test_clip_loss_module_arguments(backend):
    """Every ClipLoss argument that changes the result is honoured (a module that dropped one
    would fail here)."""
    image, text, scale, bias = make(9, 6, torch.float32, bias=True, scale=50.0)
    # Aligned pairs: X_ii well above the row mean, so smoothing moves the loss by ~ε·s.
    text = F.normalize(image.detach() + 0.1 * torch.randn_like(image), dim=-1).requires_grad_()
    smooth = mmkernels.nn.ClipLoss(label_smoothing=0.2, backend=backend)(image, text, scale)
    ref = mmkernels.infonce_loss(image, text, scale, label_smoothing=0.2, backend="reference")
    plain = mmkernels.infonce_loss(image, text, scale, backend="reference")
    assert_close(smooth, ref, FP32_RTOL, "label_smoothing")
    assert (smooth - plain).abs() > 1.0
    out = mmkernels.nn.ClipLoss(backend=backend)(image, text, scale, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    with pytest.raises(ValueError, match="backend"):
        mmkernels.nn.ClipLoss(backend="nope")(image, text, scale)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["infonce_loss", "siglip_loss"])
def test_compile_fullgraph_is_the_first_call_of_a_process(loss):
    """Nothing is imported or looked up lazily while torch.compile traces a first call."""
    import subprocess
    import sys
    code = (
        "import torch, mmkernels\n"
        "i = torch.randn(9, 5, requires_grad=True)\n"
        "t = torch.randn(9, 5, requires_grad=True)\n"
        "s = torch.tensor(10.0, requires_grad=True)\n"
        f"f = torch.compile(lambda i, t, s: mmkernels.{loss}(i, t, s, -1.0), fullgraph=True)\n"
        "out = f(i, t, s)\n"
        "out.backward()\n"
        f"ref = mmkernels.{loss}(i.detach().double(), t.detach().double(), 10.0, -1.0,\n"
        "                        backend='reference')\n"
        "assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item()), (out, ref)\n"
        "assert i.grad is not None and s.grad is not None\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.parametrize("backend", [p for p in fast_backends() if p.id == "triton"])
def test_backward_uses_the_forwards_fp32_precision(backend):
    """The TF32 choice is read once, in the forward: changing torch's switch before the
    backward changes nothing (a forward on TF32 and an exact backward would disagree)."""
    inputs = make(33, 20, torch.float32, bias=True)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        loss = LOSS(*inputs, backend=backend)
        torch.set_float32_matmul_precision("highest")
        grads = torch.autograd.grad(loss, inputs)
        torch.set_float32_matmul_precision("high")
        ref = LOSS(*inputs, backend=backend)
        ref_grads = torch.autograd.grad(ref, inputs)
    finally:
        torch.set_float32_matmul_precision(before)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_aligned_pairs_small_loss(backend, scale):
    """Confident positives (T = normalize(I + 0.05·noise)): the loss is ~1e-3 or far less and
    P_ii → 1, where forming r_i − X_ii or P_ii − 1 by subtraction loses the answer. Loss and
    gradients must stay within 2× the error of the eager fp32 formula (floored at 1e-6)."""
    b, d = (65, 33) if interpreted(backend) else (257, 64)
    image = F.normalize(torch.randn(b, d, dtype=torch.float64, device=device()), dim=-1)
    text = F.normalize(image + 0.05 * torch.randn_like(image), dim=-1)
    inputs = [image.float().requires_grad_(), text.float().requires_grad_(),
              torch.tensor(scale, device=device(), requires_grad=True)]

    def eager_fp32(image, text, scale):
        logits = scale * image @ text.T
        labels = torch.arange(b, device=image.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    lowp = eager_fp32(*inputs)
    lowp_grads = torch.autograd.grad(lowp, inputs)
    out = LOSS(*inputs, backend=backend)
    grads = torch.autograd.grad(out, inputs)
    ref64 = as64(*inputs)
    ref = LOSS(*ref64, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref64)
    assert ref.item() < 0.05
    assert_close(out, ref, max(2 * rel_err(lowp, ref), 1e-6), "loss")
    for name, g, lg, r in zip(["image", "text", "scale"], grads, lowp_grads, ref_grads):
        assert_close(g, r, max(2 * rel_err(lg, r), 1e-6), f"d_{name}")
