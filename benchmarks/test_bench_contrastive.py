"""The harness's cases as pytest-benchmark tests: every op × implementation, forward+backward.

    pytest benchmarks -q                       # each once (pytest.ini disables timing): CI
    pytest benchmarks -q --benchmark-enable    # timed: pytest-benchmark's table

Cases, peers and the timed step come from ``mmkernels.tools.bench`` (its contrastive family
and harness), so these time exactly what ``python -m mmkernels bench`` does, at a small size.
torch.compile costs ~30 s per op on a cold cache, more than this suite's whole budget, so its
tests run only with MMK_BENCH_COMPILE=1.
"""
import os

import pytest
import torch

from mmkernels.tools.bench import contrastive, harness, peers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", contrastive.SMOKE_CASES, ids=str)
@pytest.mark.parametrize("impl", contrastive.IMPLS)
@pytest.mark.parametrize("op", list(contrastive.OPS))
def test_fwd_bwd(benchmark, op, impl, case):
    if impl == peers.COMPILE and os.environ.get("MMK_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile takes ~30 s cold; set MMK_BENCH_COMPILE=1 to run it")
    spec = contrastive.OPS[op]
    try:
        fn = spec.build(impl)
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    inputs = spec.make_inputs(case, DEVICE)
    backend = spec.resolved_backend(case.dtype, DEVICE) if impl == "mmkernels" else None
    benchmark.group = f"{op} {case}"
    benchmark.extra_info["implementation"] = harness.label(impl, backend)

    loss = benchmark(harness.fwd_bwd, fn, inputs)

    # Every peer computes the same loss: a wrongly wired one would time something else.
    # (Triton's fp32 dot uses TF32 on GPU, hence the looser CUDA tolerance.)
    expected = spec.eager(*(t.detach() if t is not None else None for t in inputs))
    tol = 1e-4 if DEVICE == "cpu" else 1e-2
    torch.testing.assert_close(loss.float(), expected.float(), rtol=tol, atol=tol)
    assert inputs[0].grad is not None and inputs[2].grad is not None
