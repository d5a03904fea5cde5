"""The checks every op passes on every backend, written once.

A family's test file describes its op with an ``OpContract`` and subclasses ``ContractTests``
(a class named ``Test...``) to get these tests:

  low precision  fp16/bf16 within 2× (3× for gradients) the same-dtype eager error
  extreme values large-magnitude inputs stay finite and accurate
  NaN in         → NaN out, for each poisoned input
  gradcheck      float64, on backends that take float64
  float64        parity at 1e-10 on backends that take float64
  opcheck        torch.library.opcheck on every custom op, including non-contiguous inputs
  compile        torch.compile(fullgraph=True) gives the eager values and gradients
  double backward differentiable gradients (create_graph=True) match the reference's
  peer           the module drop-in equals the library users replace (when installed)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from backends import all_backends, fast_backends, interpreted
from oracle import (FP32_RTOL, FP64_RTOL, as64, assert_close, loss_and_grads,
                    low_precision_rtol)


@dataclass
class OpContract:
    """What the generic checks need to know about one op."""

    fn: Callable                 # the public op: fn(*inputs, backend=..., **kwargs)
    make: Callable               # make(shape, dtype, **opts) -> inputs, leaves requiring grad
    eager: Callable              # the users' eager formula, run in the inputs' dtype
    check_fp32: Callable         # check_fp32(inputs, rtol, grad_rtol=None, **kwargs): vs float64
    # Shapes of the single-shape checks: "lowp" (low precision; "lowp_interpreter" for the
    # slow Triton interpreter), "extreme", "float64", "small" (NaN, opcheck, double backward),
    # "gradcheck", "compile".
    shapes: dict
    nan_targets: dict            # name -> index into inputs of a tensor to poison
    extreme: dict                # make() options for large-magnitude inputs
    opcheck_calls: Callable      # opcheck_calls(inputs, backend) -> [(op, args)]
    peer: Callable | None = None  # peer(backend, make) -> (ours(), theirs()) outputs, or skips
    kwargs: dict = field(default_factory=dict)   # op options the checks run with
    gradcheck_kwargs: list = field(default_factory=lambda: [{}])


def _cases(backend, dtype):
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("bf16 is silently wrong in the Triton interpreter")


class ContractTests:
    contract: OpContract

    @pytest.mark.parametrize("backend", all_backends())
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_parity_low_precision(self, backend, dtype):
        _cases(backend, dtype)
        c = self.contract
        shape = c.shapes["lowp_interpreter" if interpreted(backend) else "lowp"]
        inputs = c.make(shape, dtype)
        diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        lowp = c.eager(*inputs)
        lowp_grads = torch.autograd.grad(lowp.sum(), diff)
        out, grads = loss_and_grads(c.fn, inputs, backend=backend)
        ref, ref_grads = loss_and_grads(c.fn, as64(*inputs), backend="reference")
        assert_close(out, ref, low_precision_rtol(lowp, ref, 2), "output")
        for i, (x, g, lg, r) in enumerate(zip(diff, grads, lowp_grads, ref_grads)):
            assert g.dtype == x.dtype, f"gradient {i}: dtype {g.dtype}, input {x.dtype}"
            assert_close(g, r, low_precision_rtol(lg, r, 3), f"gradient {i}")

    @pytest.mark.parametrize("backend", all_backends())
    def test_extreme_values(self, backend):
        c = self.contract
        inputs = c.make(c.shapes["extreme"], torch.float32, **c.extreme)
        c.check_fp32(inputs, FP32_RTOL, backend=backend, **c.kwargs)

    @pytest.mark.parametrize("backend", all_backends())
    def test_nan_in_nan_out(self, backend):
        c = self.contract
        for where, index in c.nan_targets.items():
            inputs = c.make(c.shapes["small"], torch.float32)
            with torch.no_grad():
                inputs[index].view(-1)[-1] = float("nan")
            out, grads = loss_and_grads(c.fn, inputs, backend=backend, **c.kwargs)
            assert torch.isnan(out).any(), f"NaN in {where}: output has no NaN"
            assert all(torch.isnan(g).any() for g in grads[:2]), f"NaN in {where}: gradients"

    @pytest.mark.parametrize("backend", fast_backends())
    def test_gradcheck_float64(self, backend):
        if backend == "triton":
            pytest.skip("Triton kernels take fp32/fp16/bf16, not float64")
        c = self.contract
        inputs = as64(*c.make(c.shapes["gradcheck"], torch.float32, noncontig=True))
        for kw in c.gradcheck_kwargs:
            torch.autograd.gradcheck(lambda *x: c.fn(*x, backend=backend, **kw), inputs)

    @pytest.mark.parametrize("backend", fast_backends())
    def test_double_backward(self, backend):
        """create_graph=True gives differentiable gradients equal to the reference's."""
        c = self.contract
        inputs = c.make(c.shapes["small"], torch.float32)
        if backend != "triton":
            inputs = as64(*inputs)
        diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        results = []
        for name in (backend, "reference"):
            out = c.fn(*inputs, backend=name, **c.kwargs).sum()
            grads = torch.autograd.grad(out, diff, create_graph=True)
            penalty = sum((g * g).sum() for g in grads)
            # An input the first gradients do not depend on (a linear layer's bias) gets 0.
            results.append(torch.autograd.grad(penalty, diff, materialize_grads=True))
        rtol = FP32_RTOL if backend == "triton" else FP64_RTOL
        for g, r in zip(*results):
            assert_close(g, r, rtol, "second derivative")

    @pytest.mark.parametrize("backend", fast_backends())
    def test_float64_parity(self, backend):
        if backend == "triton":
            pytest.skip("Triton kernels take fp32/fp16/bf16, not float64")
        c = self.contract
        inputs = as64(*c.make(c.shapes["float64"], torch.float32))
        c.check_fp32(inputs, FP64_RTOL, backend=backend, **c.kwargs)

    @pytest.mark.parametrize("backend", fast_backends())
    @pytest.mark.parametrize("layout", ["contiguous", "transposed"])
    def test_opcheck(self, backend, layout):
        c = self.contract
        inputs = c.make(c.shapes["small"], torch.float32, layout=layout)
        for op, args in c.opcheck_calls(inputs, backend):
            torch.library.opcheck(op, args)

    @pytest.mark.slow
    @pytest.mark.parametrize("backend", fast_backends())
    @pytest.mark.parametrize("layout", ["contiguous", "transposed"])
    def test_torch_compile(self, backend, layout):
        c = self.contract
        inputs = c.make(c.shapes["compile"], torch.float32, layout=layout)
        diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

        def step(*x):
            return c.fn(*x, backend=backend, **c.kwargs) * 2

        torch._dynamo.reset()
        out = torch.compile(step, fullgraph=True)(*inputs)
        grads = torch.autograd.grad(out.sum(), diff)
        ref = step(*inputs)
        ref_grads = torch.autograd.grad(ref.sum(), diff)
        assert_close(out, ref, FP32_RTOL)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, FP32_RTOL)

    @pytest.mark.parametrize("backend", all_backends())
    def test_matches_peer(self, backend):
        c = self.contract
        if c.peer is None:
            pytest.skip("no peer library for this op")
        c.peer(backend)
