"""Measurement, generic over ops: memory in one fresh worker process per (implementation,
case), time in one worker process per case holding all of its implementations; the probe
worker measures the GEMM peak.

Memory: every (implementation, case) runs in its own process so that one case's allocations,
allocator state or OOM cannot leak into another's numbers. That process's first full-size
fwd+bwd is the one measured; its wall time is reported as the *cold* time (it pays first-touch
page faults, allocator growth, BLAS buffers: the materializing implementations' gigabytes show
there).

Time: one process per case builds and warms every implementation (a small warm-up, the
compile peer at the case's own shape, then one full-size warm run each), then runs R rounds,
each running every implementation once in a rotating order, so that drift, thermal and
neighbours' noise hit all of them alike; the reported time is each implementation's median
over the same R rounds (``rounds``). An implementation that fails there gets its own error
row; the others keep their timings (a worker that dies is restarted without the one it was
running).

The parent talks to the ops only through ``family.BenchOp``.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

import mmkernels

from ..info import cpu_model
from .family import BenchOp
from .peers import COMPILE, PeerUnavailable

MiB = 2**20
GiB = 2**30

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("fp32", "bf16")}


def fwd_bwd(fn: Callable, inputs) -> torch.Tensor:
    """One step's work: forward, backward (when the result requires grad: inputs made without
    grad time a forward-only, inference case), and on CUDA the wait for both (the callers'
    timers are host-side)."""
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None  # every step starts from empty grads: no accumulation add timed
    loss = fn(*inputs)
    if loss.requires_grad:
        loss.backward()
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return loss.detach()


def timed(fn: Callable, inputs) -> float:
    """Wall seconds of one ``fwd_bwd``; on CUDA the device is idle when the clock starts and
    ``fwd_bwd`` waits for it before the clock stops."""
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fwd_bwd(fn, inputs)
    return time.perf_counter() - t0


# Interleaved rounds: R = clamp(budget / one warm round, ROUNDS_MIN, ROUNDS_MAX), the same R
# for every implementation of a case. Never one: a single sample is no median.
ROUNDS_MIN, ROUNDS_MAX = 3, 7
ROUNDS_BUDGET_S = {True: 10.0, False: 60.0}  # per case, by --quick


def rounds(warm_round_s: float, quick: bool) -> int:
    """Timed rounds of a case whose warm round (every implementation once) took
    ``warm_round_s``."""
    if warm_round_s <= 0:
        return ROUNDS_MAX
    return max(ROUNDS_MIN, min(ROUNDS_MAX, int(ROUNDS_BUDGET_S[quick] // warm_round_s)))


def rounds_policy(quick: bool) -> str:
    return (f"R = clamp({ROUNDS_BUDGET_S[quick]:g} s / one warm round of all implementations, "
            f"{ROUNDS_MIN}, {ROUNDS_MAX}) rounds per case, the same R for every implementation "
            "of the case")


def timing_method(quick: bool) -> str:
    """How the time column was measured, in words (the JSON's ``timing_method``)."""
    return ("median of R interleaved warm rounds in one worker process per case: every "
            "implementation is built and warmed there (a small warm-up; torch.compile compiles "
            "at the case's own shape), runs one full-size warm fwd+bwd, then R rounds each run "
            "every implementation once in a rotating order, so drift and noise hit all alike; "
            f"{rounds_policy(quick)}. The cold column is the first full-size fwd+bwd in the "
            "fresh memory-measuring process (first-touch page faults included), not used "
            "for any ratio")


def rotation(names: Sequence[str], k: int) -> list[str]:
    """Round ``k``'s order: ``names`` rotated left by ``k``."""
    n = len(names)
    return [names[(k + j) % n] for j in range(n)]


def interleave(steps: Mapping[str, Callable[[], float]], n_rounds: int,
               on_start: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Run ``n_rounds`` rounds; round k calls each step once in ``rotation(names, k)`` order,
    each call returning its own elapsed seconds. A step that raises is dropped from the
    later rounds. Returns ({name: [seconds per round]}, {name: the exception})."""
    names = list(steps)
    times: dict = {name: [] for name in names}
    errors: dict = {}
    for k in range(n_rounds):
        for name in rotation(names, k):
            if name in errors:
                continue
            if on_start:
                on_start(name)
            try:
                times[name].append(steps[name]())
            except Exception as exc:  # noqa: BLE001 - one implementation's failure is its row
                errors[name] = exc
    return {n: t for n, t in times.items() if n not in errors}, errors


def label(impl: str, backend: str | None) -> str:
    return f"mmkernels[{backend}]" if impl == "mmkernels" else impl


# --------------------------------------------------------------------------------------------
# Peak memory in a fresh process

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    # glibc keeps freed heap pages mapped; hand them back so the base RSS counts only live
    # memory and the measured run's re-use of them shows up as extra.
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# Keyed by PeakMemory.method; {warmup} is the op's small warm-up case (BenchOp.warmup).
_MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
            "memory_allocated() with the inputs in place",
    "cpu": "peak RSS (VmHWM, reset through /proc/self/clear_refs) during one fwd+bwd minus "
           "RSS with the inputs allocated, in a fresh process after {warmup} (the case's own "
           "shape for compile)",
    "cpu-lifetime": "peak RSS since process start (VmHWM, i.e. ru_maxrss: "
                    "/proc/self/clear_refs is not writable here) minus RSS with the inputs "
                    "allocated, in a fresh process: an upper bound",
}


def memory_method(method: str, op: BenchOp) -> str:
    """How the extra memory of ``op``'s rows was measured, in words."""
    return _MEMORY_METHODS[method].format(warmup=op.warmup)


class PeakMemory:
    """Extra memory at the peak of the code run between ``start`` and ``extra``."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda"
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            self.method = "cpu" if _reset_peak_rss() else "cpu-lifetime"
            with open("/proc/self/statm") as f:
                self.base = int(f.read().split()[1]) * _PAGE

    def extra(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def _limit_address_space() -> None:
    # A case that outgrows memory should fail here with an allocation error, not wake the
    # kernel's OOM killer, which on a shared machine may kill someone else's process.
    cap = _proc_status_kib("VmSize") * 1024 + int(0.9 * mem_available())
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "can't allocate memory" in text \
        or "out of memory" in text


def _one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


# --------------------------------------------------------------------------------------------
# Worker side: one process measures the memory (and cold time) of one (implementation, case),
# times every implementation of one case, or probes the machine


def _warm_up(op: BenchOp, impl: str, fn: Callable, case, device: str) -> dict | None:
    """Warm the process (libraries, BLAS buffers, thread pools) on a small problem, or at
    the case's own size for compile (which compiles in this call). A failed compile (not an
    OOM) is a skip: returned as the row's result. Other failures raise."""
    warm = case if impl == COMPILE else op.small_case(case)
    try:
        fwd_bwd(fn, op.make_inputs(warm, device, seed=1))
    except Exception as exc:
        if impl == COMPILE and not _is_oom(exc):
            return {"status": "skipped", "reason": f"torch.compile failed: {_one_line(exc)}"}
        raise
    return None


def _failed(exc: BaseException) -> dict:
    return {"status": "oom" if _is_oom(exc) else "error", "reason": _one_line(exc)}


def _memory(op: BenchOp, spec: dict) -> dict:
    """Peak extra memory of the first full-size fwd+bwd in this fresh process, and its wall
    time (``cold_s``)."""
    impl, device = spec["impl"], spec["device"]
    case = op.case_type(**spec["case"])
    # Resolved here, where it runs: the C++ extension may have been built since the probe.
    backend = op.resolved_backend(case.dtype, device) if impl == "mmkernels" else None
    try:
        fn = op.build(impl)
    except PeerUnavailable as exc:
        return {"status": "skipped", "reason": str(exc), "backend": backend}
    if device == "cpu":
        _limit_address_space()
    try:
        skipped = _warm_up(op, impl, fn, case, device)
        if skipped:
            return {**skipped, "backend": backend}
        inputs = op.make_inputs(case, device)
        memory = PeakMemory(device)
        memory.start()
        cold = timed(fn, inputs)
        extra = memory.extra()
    except Exception as exc:  # noqa: BLE001 - whatever breaks becomes this row's status
        return {**_failed(exc), "backend": backend}
    return {"status": "ok", "backend": backend, "cold_s": cold, "extra_bytes": extra,
            "memory_method": memory.method}


_RUNNING_MARK = "@@mmkernels-bench-running "


def _running(impl: str) -> None:
    # Tells the parent which implementation a worker that dies was running.
    print(_RUNNING_MARK + impl, flush=True)


def _time_case(op: BenchOp, spec: dict) -> dict:
    """Every implementation of one case in this process: build, warm, one full-size warm run
    each, then ``rounds()`` interleaved rounds (``interleave``)."""
    impls, device, quick = spec["impls"], spec["device"], spec["quick"]
    case = op.case_type(**spec["case"])
    if device == "cpu":
        _limit_address_space()
    results: dict = {}
    steps: dict = {}
    inputs = None
    for impl in impls:
        _running(impl)
        backend = None
        try:
            if impl == "mmkernels":
                backend = op.resolved_backend(case.dtype, device)
            fn = op.build(impl)
        except PeerUnavailable as exc:
            results[impl] = {"status": "skipped", "reason": str(exc), "backend": backend}
            continue
        except Exception as exc:  # noqa: BLE001
            results[impl] = {**_failed(exc), "backend": backend}
            continue
        try:
            skipped = _warm_up(op, impl, fn, case, device)
            if skipped:
                results[impl] = {**skipped, "backend": backend}
                continue
            if inputs is None:  # one set of inputs, shared: fwd_bwd clears the grads
                inputs = op.make_inputs(case, device)
            warm = timed(fn, inputs)  # the full-size warm run
        except Exception as exc:  # noqa: BLE001 - this implementation's row, not the case's
            results[impl] = {**_failed(exc), "backend": backend}
            continue
        results[impl] = {"status": "ok", "backend": backend, "warm_s": warm}
        steps[impl] = functools.partial(timed, fn, inputs)
    warm_round = sum(results[i]["warm_s"] for i in steps)
    n_rounds = rounds(warm_round, quick)
    times, errors = interleave(steps, n_rounds, on_start=_running)
    for impl, exc in errors.items():
        results[impl] = {**_failed(exc), "backend": results[impl]["backend"],
                         "reason": f"in the timed rounds: {_one_line(exc)}"}
    for impl, ts in times.items():
        results[impl].update(times_s=ts, time_s=statistics.median(ts))
    return {"status": "ok", "impls": results, "rounds": n_rounds, "order": list(steps),
            "warm_round_s": warm_round, "rounds_budget_s": ROUNDS_BUDGET_S[quick]}


def _gemm_peak(device: str, dtype: str, quick: bool) -> dict:
    """Median GFLOP/s of one large square torch.mm: the ceiling the % column refers to."""
    n = 4096 if device == "cpu" else 8192
    reps = (3 if quick else 5) if device == "cpu" else 20
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    # A small product starts the BLAS thread pool / cuBLAS handle; a full-size warm-up
    # would cost a whole extra GEMM.
    torch.mm(a[:1024, :1024], b[:1024, :1024])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"gflops": 2 * n**3 / median / 1e9, "n": n, "median_s": median, "repeats": reps}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe(ops: Mapping[str, BenchOp], spec: dict) -> dict:
    """Machine facts, the backends "auto" resolves to, and the GEMM peak per dtype.
    ``memory_method`` is PeakMemory's method; ``memory_method()`` words it per op."""
    device, dtypes = spec["device"], spec["dtypes"]
    info = {
        "status": "ok",
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mmkernels": mmkernels.__version__,
        "available_backends": mmkernels.available_backends(),
        "unavailable_reasons": mmkernels.unavailable_reasons(),
        "resolved": {name: {dt: op.resolved_backend(dt, device) for dt in dtypes}
                     for name, op in ops.items()},
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_free_bytes"], info["gpu_total_bytes"] = torch.cuda.mem_get_info()
        info["memory_method"] = "cuda"
    else:
        info["memory_method"] = "cpu" if _reset_peak_rss() else "cpu-lifetime"
    info["gemm_peak"] = {dt: _gemm_peak(device, dt, spec["quick"]) for dt in dtypes}
    return info


_RESULT_MARK = "@@mmkernels-bench-result "


def worker(ops: Mapping[str, BenchOp], spec_json: str) -> int:
    """The ``--worker`` entry point: run one spec, print its result on a marked line."""
    spec = json.loads(spec_json)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["mode"] == "probe":
        result = _probe(ops, spec)
    else:
        measure = {"memory": _memory, "time": _time_case}[spec["mode"]]
        result = measure(ops[spec["op"]], spec)
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Parent side: spawn workers, one row per (implementation, case), progress lines


def spawn(spec: dict) -> dict:
    """Run one worker; its crash (signal, OOM kill, traceback) becomes a result row, with
    ``running``: the implementation it had last announced (``_running``), if any."""
    env = dict(os.environ)
    # The worker imports this package from where the parent did, installed or not.
    root = str(Path(mmkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # One small graph per worker: inductor's pool of compile processes costs more to start
    # (~10 s on 2 cores) than it saves.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    # The worker is this package's own command line (__main__.py), in --worker mode.
    proc = subprocess.run(
        [sys.executable, "-m", __package__, "--worker", json.dumps(spec)],
        check=False, capture_output=True, text=True, env=env)
    running = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
        if running is None and line.startswith(_RUNNING_MARK):
            running = line[len(_RUNNING_MARK):].strip()
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        if proc.returncode == -signal.SIGKILL:
            return {"status": "oom", "reason": f"worker killed by {sig} (out of memory?)",
                    "running": running}
        return {"status": "error", "reason": f"worker killed by {sig}", "running": running}
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"status": "error", "reason": f"worker exited with {proc.returncode}: {tail}"[:300],
            "running": running}


def _memory_row(op: BenchOp, impl: str, case, device: str, quick: bool, threads: int | None,
                probe: dict) -> dict:
    """Memory and cold time of one (implementation, case) in a fresh worker: skipped up front
    when it cannot fit."""
    backend = probe["resolved"][op.name][case.dtype] if impl == "mmkernels" else None
    row = {"op": op.name, "impl": impl, "label": label(impl, backend), "backend": backend,
           **asdict(case)}
    need = op.estimate_bytes(impl, backend, case)
    available = probe["gpu_free_bytes"] if device == "cuda" else mem_available()
    if need > 0.8 * available:
        return {**row, "status": "skipped",
                "reason": f"skipped (est. {need / GiB:.1f} GiB > 80% of "
                          f"{available / GiB:.1f} GiB available)"}
    t0 = time.perf_counter()
    result = spawn({"mode": "memory", "op": op.name, "impl": impl, "device": device,
                    "quick": quick, "threads": threads, "case": asdict(case)})
    result.pop("running", None)
    row.update(result, worker_wall_s=time.perf_counter() - t0)
    if result.get("backend"):
        row["label"] = label(impl, result["backend"])
    return row


def _time_impls(op: BenchOp, impls: list, case, device: str, quick: bool,
                threads: int | None) -> tuple[dict, dict]:
    """Interleaved timings of ``impls`` on one case: ({impl: result}, the run's facts). A
    worker that dies is run again without the implementation it was running, which gets the
    crash as its result."""
    results: dict = {}
    remaining = list(impls)
    facts: dict = {"timing_workers": 0, "timing_worker_wall_s": 0.0}
    while remaining:
        t0 = time.perf_counter()
        out = spawn({"mode": "time", "op": op.name, "impls": list(remaining), "device": device,
                     "quick": quick, "threads": threads, "case": asdict(case)})
        facts["timing_workers"] += 1
        facts["timing_worker_wall_s"] += time.perf_counter() - t0
        if out["status"] == "ok":
            results.update(out.pop("impls"))
            facts.update(out)
            break
        crash = {"status": out["status"], "reason": f"timing worker: {out['reason']}"}
        culprit = out.get("running")
        if culprit not in remaining:  # died before naming one: nothing to retry without
            results.update({impl: crash for impl in remaining})
            break
        results[culprit] = crash
        remaining.remove(culprit)
    facts.pop("status", None)
    return results, facts


def bench_case(op: BenchOp, case, impls: Sequence[str], device: str, quick: bool,
               threads: int | None, probe: dict,
               report: Callable[[dict, object, str], None] | None = None) -> list[dict]:
    """The rows of one case, in ``impls`` order: memory and cold time per implementation in
    fresh workers (``_memory_row``), then the interleaved timing of those that ran
    (``_time_impls``). ``report(row, case, phase)`` is called as results come ("memory", "time")."""
    rows = {}
    for impl in impls:
        rows[impl] = _memory_row(op, impl, case, device, quick, threads, probe)
        if report:
            report(rows[impl], case, "memory")
    ran = [impl for impl in impls if rows[impl]["status"] == "ok"]
    if not ran:
        return [rows[impl] for impl in impls]
    timings, facts = _time_impls(op, ran, case, device, quick, threads)
    for impl in ran:
        row, t = rows[impl], timings.get(impl, {"status": "error",
                                               "reason": "no timing result"})
        row.update(timing_method="interleaved", rounds=facts.get("rounds"),
                   rounds_budget_s=facts.get("rounds_budget_s"),
                   warm_round_s=facts.get("warm_round_s"), round_order=facts.get("order"),
                   timing_workers=facts["timing_workers"],
                   timing_worker_wall_s=facts["timing_worker_wall_s"])
        if t.get("backend") and t["backend"] != row["backend"]:
            # The C++ extension was rebuilt (or broke) between the two workers: a row mixing
            # two backends' numbers would be wrong.
            t = {"status": "error",
                 "reason": f"backend changed between the memory worker ({row['backend']}) "
                           f"and the timing worker ({t['backend']})"}
        if t["status"] == "ok":
            row.update(times_s=t["times_s"], time_s=t["time_s"], repeats=len(t["times_s"]),
                       warm_s=t["warm_s"])
        else:
            reason = t["reason"]
            row.update(status=t["status"],
                       reason=reason if reason.startswith("timing") else f"timing: {reason}")
        if report:
            report(row, case, "time")
    return [rows[impl] for impl in impls]


def num(x: float | None, unit: str = "") -> str:
    """A measurement with 3 significant digits or fewer, "–" when there is none."""
    if x is None:
        return "–"
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:.{digits}f}{unit}"


def status_text(row: dict) -> str:
    """Why a row has no numbers (the up-front skips already start with "skipped")."""
    if row["status"] == "skipped":
        reason = row["reason"]
        return reason if reason.startswith("skipped") else f"skipped: {reason}"
    return f"{row['status']}: {row['reason']}"


def progress(started: float) -> Callable[[dict, object, str], None]:
    """``bench_case``'s ``report``: one line per (row, phase)."""
    def report(row: dict, case, phase: str) -> None:
        if row["status"] != "ok":
            what = status_text(row)
        elif phase == "memory":
            what = (f"extra {num(row['extra_bytes'] / MiB)} MiB, cold (first run) "
                    f"{num(1e3 * row['cold_s'])} ms")
        else:
            what = (f"{num(1e3 * row['time_s'])} ms (median of {row['repeats']} interleaved "
                    f"rounds)")
        print(f"[{time.perf_counter() - started:7.1f} s] {row['op']:<8} {case.aligned()}  "
              f"{phase:<6} {row['label']:<20} {what}", flush=True)
    return report
