"""The harness's cases as pytest-benchmark tests: every op × implementation of every family.

    pytest benchmarks -q                       # each once (pytest.ini disables timing): CI
    pytest benchmarks -q --benchmark-enable    # timed: pytest-benchmark's table

Cases, peers and the timed step come from ``mmkernels.tools.bench`` (each family's
``smoke_cases`` and the harness), so these time exactly what ``python -m mmkernels bench``
does, at a small size. torch.compile (and FlexAttention, compiled) costs ~30 s per op on a
cold cache, more than this suite's whole budget, so those run only with MMK_BENCH_COMPILE=1.
"""
import os
import statistics

import pytest
import torch

from mmkernels.tools.bench import OPS, contrastive, harness, peers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = (peers.COMPILE, "flex")
CASES = [pytest.param(name, impl, case, id=f"{name}-{impl}-{case}")
         for name, op in OPS.items() for case in op.smoke_cases for impl in op.impls]


@pytest.mark.parametrize("name,impl,case", CASES)
def test_step(benchmark, name, impl, case):
    if impl in COMPILED and os.environ.get("MMK_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile takes ~30 s cold; set MMK_BENCH_COMPILE=1 to run it")
    op = OPS[name]
    grads = getattr(case, "mode", "fwd+bwd") == "fwd+bwd"
    if impl == "flex" and grads and DEVICE == "cpu":
        pytest.skip("FlexAttention has no backward on CPU")
    try:
        fn = op.build(impl)
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    inputs = op.make_inputs(case, DEVICE)
    backend = op.resolved_backend(case.dtype, DEVICE) if impl == "mmkernels" else None
    benchmark.group = f"{name} {case}"
    benchmark.extra_info["implementation"] = harness.label(impl, backend)

    result = benchmark(harness.fwd_bwd, fn, inputs)

    # Every implementation computes the eager value: a wrongly wired one would time something
    # else. (Triton's fp32 dot uses TF32 on GPU, hence the looser CUDA tolerance.)
    # A floor (e.g. LoRA's frozen Linear alone) computes less than the op by design.
    if impl not in getattr(op, "floors", ()):
        expected = op.build("eager")(*(t.detach() if isinstance(t, torch.Tensor) else t
                                       for t in inputs))
        tol = 1e-4 if DEVICE == "cpu" else 1e-2
        torch.testing.assert_close(result.float(), expected.float(), rtol=tol, atol=tol)
    if grads:
        assert any(isinstance(t, torch.Tensor) and t.grad is not None for t in inputs)


# The timing machinery itself: every implementation of a case timed alike.


def test_rotation_puts_every_name_first_in_turn():
    names = ["eager", "open_clip", "compile", "mmkernels"]
    orders = [harness.rotation(names, k) for k in range(len(names))]
    assert [o[0] for o in orders] == names
    assert all(sorted(o) == sorted(names) for o in orders)


def test_rounds_are_clamped_and_never_one():
    budget = harness.ROUNDS_BUDGET_S[False]
    assert harness.rounds(10 * budget, quick=False) == harness.ROUNDS_MIN >= 3
    assert harness.rounds(1e-6, quick=False) == harness.ROUNDS_MAX
    assert harness.rounds(0.0, quick=True) == harness.ROUNDS_MAX
    assert harness.ROUNDS_MIN <= harness.rounds(budget / 5, quick=False) <= harness.ROUNDS_MAX


def test_interleave_same_rounds_rotating_order_and_isolated_failures():
    calls = []

    def step(name, fail_at=None):
        def run():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
            return 0.001
        return run

    steps = {"a": step("a"), "b": step("b", fail_at=2), "c": step("c")}
    times, errors = harness.interleave(steps, 4)
    assert set(times) == {"a", "c"} and all(len(t) == 4 for t in times.values())
    assert list(errors) == ["b"] and "b broke" in str(errors["b"])
    # round k starts with the k-th name; b is dropped after its failing call in round 1
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "a", "c"]


def test_bench_case_rows_time_every_implementation_alike():
    """One real case through the harness's workers: memory and cold time per implementation,
    then one interleaved timing worker with the same rounds for all (or a status row, e.g.
    while the C++ backend is broken: never a crash)."""
    op = contrastive.OPS["infonce"]
    case = contrastive.SMOKE_CASES[0]
    impls = ("eager", "mmkernels")
    probe = {"resolved": {op.name: {case.dtype: op.resolved_backend(case.dtype, DEVICE)}},
             "gpu_free_bytes": torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else None}
    seen = []
    rows = harness.bench_case(op, case, impls, DEVICE, True, None, probe,
                              lambda row, case, phase: seen.append((row["impl"], phase)))
    assert [r["impl"] for r in rows] == list(impls)
    assert [p for p in seen if p[1] == "memory"] == [(i, "memory") for i in impls]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, [harness.status_text(r) for r in rows]
    for r in rows:
        assert r["status"] in ("ok", "skipped", "error", "oom"), r
        if r["status"] != "ok":
            assert r["reason"]
    for r in ok:
        assert r["timing_method"] == "interleaved" and r["cold_s"] > 0 and r["time_s"] > 0
        assert r["rounds"] >= harness.ROUNDS_MIN and len(r["times_s"]) == r["rounds"]
        assert r["repeats"] == r["rounds"] and r["time_s"] == statistics.median(r["times_s"])
    assert len({r["rounds"] for r in ok}) == 1


def test_a_dying_timing_worker_costs_only_the_implementation_it_was_running(monkeypatch):
    answers = iter([
        {"status": "error", "reason": "worker killed by SIGSEGV", "running": "open_clip"},
        {"status": "ok", "rounds": 3, "order": ["eager", "mmkernels"], "warm_round_s": 0.1,
         "rounds_budget_s": 10.0,
         "impls": {i: {"status": "ok", "backend": None, "warm_s": 0.05,
                       "times_s": [0.1, 0.2, 0.3], "time_s": 0.2}
                   for i in ("eager", "mmkernels")}},
    ])
    specs = []
    monkeypatch.setattr(harness, "spawn", lambda spec: specs.append(spec) or next(answers))
    results, facts = harness._time_impls(contrastive.OPS["infonce"],
                                         ["eager", "open_clip", "mmkernels"],
                                         contrastive.SMOKE_CASES[0], "cpu", True, None)
    assert [s["impls"] for s in specs] == [["eager", "open_clip", "mmkernels"],
                                           ["eager", "mmkernels"]]
    assert results["open_clip"]["status"] == "error"
    assert "SIGSEGV" in results["open_clip"]["reason"]
    assert results["eager"]["status"] == results["mmkernels"]["status"] == "ok"
    assert facts["rounds"] == 3 and facts["timing_workers"] == 2
