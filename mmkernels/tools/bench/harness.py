"""Measurement, generic over ops: one fresh worker process per (implementation, case) times
fwd+bwd and measures its peak extra memory; the probe worker measures the GEMM peak.

Every (implementation, case) runs in its own process so that one case's allocations, allocator
state or OOM cannot leak into another's numbers. The parent talks to the ops only through
``family.BenchOp``.
"""
from __future__ import annotations

import ctypes
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
from collections.abc import Callable, Mapping
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
    """One training step's work: forward, backward, and on CUDA the wait for both (the
    callers' timers are host-side)."""
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None  # every step starts from empty grads: no accumulation add timed
    loss = fn(*inputs)
    loss.backward()
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return loss.detach()


def repeats(first_run_s: float, quick: bool) -> int:
    """Timed runs after the first run at the case's size (the one whose memory is measured).
    0: a run that long is its own sample; repeating it would double a many-minute case."""
    if quick:
        return 3 if first_run_s < 1 else 0
    return 5 if first_run_s < 1 else 3 if first_run_s < 10 else 0


REPEATS_POLICY = {True: "3 if one run takes < 1 s, else the first run at that size alone",
                  False: "5 if one run takes < 1 s, 3 if < 10 s, else the first run at that "
                         "size alone"}


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
# Worker side: one process measures one (implementation, case), or probes the machine


def _measure(op: BenchOp, spec: dict) -> dict:
    impl, device, quick = spec["impl"], spec["device"], spec["quick"]
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
        # Warm the process (libraries, BLAS buffers, thread pools) on a small problem so the
        # measured run is the first one at the case's size; compile must warm at that size.
        warm = case if impl == COMPILE else op.small_case(case)
        try:
            fwd_bwd(fn, op.make_inputs(warm, device, seed=1))
        except Exception as exc:
            if impl == COMPILE and not _is_oom(exc):
                return {"status": "skipped", "backend": backend,
                        "reason": f"torch.compile failed: {_one_line(exc)}"}
            raise
        inputs = op.make_inputs(case, device)
        memory = PeakMemory(device)
        memory.start()
        t0 = time.perf_counter()
        fwd_bwd(fn, inputs)
        first = time.perf_counter() - t0
        extra = memory.extra()
        more = repeats(first, quick)
        times = [] if more else [first]
        for _ in range(more):
            t0 = time.perf_counter()
            fwd_bwd(fn, inputs)
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - whatever breaks becomes this row's status
        return {"status": "oom" if _is_oom(exc) else "error", "reason": _one_line(exc),
                "backend": backend}
    return {"status": "ok", "backend": backend, "times_s": times,
            "time_s": statistics.median(times), "repeats": len(times), "extra_bytes": extra,
            "memory_method": memory.method}


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
    result = _probe(ops, spec) if spec["mode"] == "probe" else _measure(ops[spec["op"]], spec)
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Parent side: spawn workers, one row per (implementation, case), progress lines


def spawn(spec: dict) -> dict:
    """Run one worker; its crash (signal, OOM kill, traceback) becomes a result row."""
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
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        if proc.returncode == -signal.SIGKILL:
            return {"status": "oom", "reason": f"worker killed by {sig} (out of memory?)"}
        return {"status": "error", "reason": f"worker killed by {sig}"}
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"status": "error", "reason": f"worker exited with {proc.returncode}: {tail}"[:300]}


def bench_one(op: BenchOp, impl: str, case, device: str, quick: bool, threads: int | None,
              probe: dict) -> dict:
    """The row of one (implementation, case): skipped up front when it cannot fit."""
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
    result = spawn({"mode": "measure", "op": op.name, "impl": impl, "device": device,
                    "quick": quick, "threads": threads, "case": asdict(case)})
    row.update(result, worker_wall_s=time.perf_counter() - t0)
    if result.get("backend"):
        row["label"] = label(impl, result["backend"])
    return row


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


def progress(row: dict, case, started: float) -> None:
    if row["status"] == "ok":
        runs = f"median of {row['repeats']}" if row["repeats"] > 1 else "1 run"
        what = (f"{num(1e3 * row['time_s'])} ms ({runs}), "
                f"extra {num(row['extra_bytes'] / MiB)} MiB")
    else:
        what = status_text(row)
    print(f"[{time.perf_counter() - started:7.1f} s] {row['op']:<8} {case.aligned()}  "
          f"{row['label']:<20} {what}", flush=True)
