"""The harness's cases as pytest-benchmark tests: every op × implementation, forward+backward.

    pytest benchmarks -q                       # each once (pytest.ini disables timing): CI
    pytest benchmarks -q --benchmark-enable    # timed: pytest-benchmark's table

Cases, peers and the timed step come from ``mmkernels.tools.bench``, so these time exactly
what ``python -m mmkernels bench`` does, at a small size. torch.compile costs ~30 s per op
on a cold cache, more than this suite's whole budget, so its tests run only with
MMK_BENCH_COMPILE=1.
"""
import os

import pytest
import torch

from mmkernels.tools import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", bench.SMOKE_CASES, ids=str)
@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("op", list(bench.OPS))
def test_fwd_bwd(benchmark, op, impl, case):
    if impl == "compile" and os.environ.get("MMK_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile takes ~30 s cold; set MMK_BENCH_COMPILE=1 to run it")
    try:
        fn = bench.build(impl, op)
    except bench.Unavailable as exc:
        pytest.skip(str(exc))
    inputs = bench.make_inputs(op, case, DEVICE)
    backend = bench.resolved_backend(op, case.dtype, DEVICE) if impl == "mmkernels" else None
    benchmark.group = f"{op} {case}"
    benchmark.extra_info["implementation"] = bench.label(impl, backend)

    loss = benchmark(bench.fwd_bwd, fn, inputs)

    # Every peer computes the same loss: a wrongly wired one would time something else.
    # (Triton's fp32 dot uses TF32 on GPU, hence the looser CUDA tolerance.)
    expected = bench.OPS[op].eager(*(t.detach() if t is not None else None for t in inputs))
    tol = 1e-4 if DEVICE == "cpu" else 1e-2
    torch.testing.assert_close(loss.float(), expected.float(), rtol=tol, atol=tol)
    assert inputs[0].grad is not None and inputs[2].grad is not None
