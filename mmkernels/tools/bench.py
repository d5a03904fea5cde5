"""Benchmark harness: mmkernels' contrastive losses against the implementations users replace.

    python -m mmkernels bench [--op infonce|siglip] [--device cpu|cuda] [--quick] [--out DIR]
                              [--sizes B ...] [--dtypes fp32 bf16] [--impls NAME ...]
                              [--threads N]

One run times forward + backward (``loss.backward()``, features, logit_scale and logit_bias
requiring grad) of every implementation on every case (B, D, dtype) and reports, per row:
median wall time, speedup over eager, peak extra memory (absolute and as % of eager's), and
GFLOP/s on the nominal FLOP count of the fused O(B)-memory algorithm (8·B²·D for InfoNCE,
6·B²·D for SigLIP) with its share of the machine's GEMM peak, measured in the same run.

Implementations ("peers"):
  eager       the open_clip formula written out: logits = s·I·Tᵀ (+b), then the cross-entropies
              (InfoNCE) or −Σ logsigmoid(labels·logits)/B (SigLIP)
  open_clip   open_clip's own ClipLoss / SigLipLoss, loaded from open_clip/loss.py alone
  compile     torch.compile of the eager formula (compilation happens in the warm-up)
  mmkernels   the fused op with backend="auto", labelled with the backend it resolves to

Every (implementation, case) runs in a fresh worker process (``--worker``) so that one
case's allocations, allocator state or OOM cannot leak into another's numbers. Results go
to ``<out>/<op>_<device>.{json,md}`` and ``<op>_<device>_{time,memory}.png``.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import mmkernels

from .info import cpu_model
from mmkernels import _dispatch

MiB = 2**20
GiB = 2**30


# --------------------------------------------------------------------------------------------
# The ops and their peers


def eager_infonce(image, text, scale, bias=None):
    """open_clip's ClipLoss formula, with the text-side logits taken as a transpose."""
    logits = scale * image @ text.T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_siglip(image, text, scale, bias):
    """open_clip's SigLipLoss formula: labels +1 on the diagonal, −1 elsewhere."""
    logits = scale * image @ text.T + bias
    b = logits.shape[0]
    labels = 2 * torch.eye(b, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / b


def fused_infonce(image, text, scale, bias=None):
    return mmkernels.infonce_loss(image, text, scale, bias)


def fused_siglip(image, text, scale, bias):
    return mmkernels.siglip_loss(image, text, scale, bias)


@dataclass(frozen=True)
class Op:
    name: str
    title: str
    api: str                  # the public function's name, as the dispatcher knows it
    flops_per_b2d: int        # nominal FLOPs / (B²·D) of the fused O(B)-memory algorithm
    flops_note: str
    bias: float | None     # logit_bias of the benchmark inputs (None: no bias)
    eager: Callable
    fused: Callable
    open_clip_class: str


OPS = {
    "infonce": Op("infonce", "InfoNCE (CLIP)", "infonce_loss", 8,
                  "forward LSE pass 2·B²·D + backward recompute, dI and dT 2·B²·D each",
                  None, eager_infonce, fused_infonce, "ClipLoss"),
    "siglip": Op("siglip", "SigLIP", "siglip_loss", 6,
                 "one pass emitting the loss and both gradients: logits, dI and dT 2·B²·D each",
                 # SigLIP's initialisation: t' = log 10 and b = −10.
                 -10.0, eager_siglip, fused_siglip, "SigLipLoss"),
}

IMPLS = ("eager", "open_clip", "compile", "mmkernels")
# The eager formula materializes the B×B logits; these hold about four B×B fp32 matrices at
# their peak (logits, the softmax/logsigmoid output, and its gradient pair in backward).
MATERIALIZING_MATRICES = 4

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Unavailable(Exception):
    """This implementation cannot run here; the message says why (reported, never fatal)."""


def _load_open_clip_loss():
    # `import open_clip` runs the package __init__, which imports the models and torchvision
    # (and fails when torchvision does not match torch). loss.py only needs torch, so it is
    # loaded on its own; find_spec locates the package without executing it.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("open_clip is not installed (pip install open_clip_torch)")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    try:
        loss_spec = importlib.util.spec_from_file_location("_mmk_open_clip_loss", path)
        module = importlib.util.module_from_spec(loss_spec)
        loss_spec.loader.exec_module(module)
    except Exception as exc:  # any failure only means this peer is left out, with the reason
        raise Unavailable(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    return module


def build(impl: str, op: str) -> Callable:
    """The callable ``fn(image, text, logit_scale, logit_bias) -> loss`` of one peer."""
    spec = OPS[op]
    if impl == "eager":
        return spec.eager
    if impl == "mmkernels":
        return spec.fused
    if impl == "compile":
        # Static shapes: each worker sees one shape, and the warm-up call compiles it.
        return torch.compile(spec.eager, dynamic=False)
    if impl == "open_clip":
        # ClipLoss and SigLipLoss both take (image, text, logit_scale, logit_bias).
        return getattr(_load_open_clip_loss(), spec.open_clip_class)()
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


# --------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    B: int
    D: int
    dtype: str

    def __str__(self) -> str:
        return f"B={self.B}-D={self.D}-{self.dtype}"


@dataclass(frozen=True)
class Group:
    sizes: tuple
    D: int
    impls: tuple


QUICK_SIZES = (256, 1024, 2048)
# The pytest-benchmark cases (benchmarks/test_bench_contrastive.py): a few ms each.
SMOKE_CASES = (Case(256, 512, "fp32"),)
# Full runs. The large-B groups are the memory cases: only the fused op can hold them.
FULL = {
    ("infonce", "cpu"): (Group((1024, 4096, 8192, 16384, 32768), 512, IMPLS),
                         Group((65536, 131072), 256, ("mmkernels",))),
    ("siglip", "cpu"): (Group((1024, 4096, 8192, 16384), 512, IMPLS),),
    ("infonce", "cuda"): (Group((1024, 4096, 16384, 32768, 65536), 512, IMPLS),
                          Group((131072, 262144), 512, ("mmkernels",))),
    ("siglip", "cuda"): (Group((1024, 4096, 16384, 32768, 65536), 512, IMPLS),
                         Group((131072, 262144), 512, ("mmkernels",))),
}
DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("fp32", "bf16")}
DEFAULT_D = 512


def plan(op: str, device: str, quick: bool, sizes, dtypes, impls) -> list[tuple[Case, tuple]]:
    """(case, implementations) in run order: every peer of a case together, eager first."""
    if sizes:
        groups = (Group(tuple(sizes), DEFAULT_D, IMPLS),)
    elif quick:
        groups = (Group(QUICK_SIZES, DEFAULT_D, IMPLS),)
    else:
        groups = FULL[(op, device)]
    return [(Case(b, g.D, dt), tuple(i for i in g.impls if i in impls))
            for g in groups for dt in dtypes for b in g.sizes]


def repeats(first_run_s: float, quick: bool) -> int:
    """Timed runs after the first run at the case's size (the one whose memory is measured).
    0: a run that long is its own sample; repeating it would double a many-minute case."""
    if quick:
        return 3 if first_run_s < 1 else 0
    return 5 if first_run_s < 1 else 3 if first_run_s < 10 else 0


REPEATS_POLICY = {True: "3 if one run takes < 1 s, else the first run at that size alone",
                  False: "5 if one run takes < 1 s, 3 if < 10 s, else the first run at that "
                         "size alone"}


def make_inputs(op: str, case: Case, device: str, seed: int = 0):
    """(image, text, logit_scale, logit_bias): unit-norm features and CLIP's initial scale
    1/0.07, all leaves requiring grad (logit_bias is None for InfoNCE)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def features():
        x = torch.randn(case.B, case.D, device=device, generator=gen)
        return F.normalize(x, dim=-1).to(dtype).requires_grad_()

    image, text = features(), features()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    bias = OPS[op].bias
    bias = None if bias is None else torch.tensor(bias, device=device, requires_grad=True)
    return image, text, scale, bias


def fwd_bwd(fn: Callable, inputs) -> torch.Tensor:
    """One training step's loss work: forward, backward, and on CUDA the wait for both (the
    callers' timers are host-side)."""
    for t in inputs:
        if t is not None:
            t.grad = None  # every step starts from empty grads: no accumulation add timed
    loss = fn(*inputs)
    loss.backward()
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return loss.detach()


def resolved_backend(op: str, dtype: str, device: str) -> str:
    """The backend ``backend="auto"`` picks for this op on these inputs."""
    probe = torch.empty(1, 1, dtype=DTYPES[dtype], device=device)
    with warnings.catch_warnings():
        # The fallback warning is the dispatcher's business at call time; here we only ask.
        warnings.simplefilter("ignore")
        return _dispatch.select("auto", (probe, probe), OPS[op].api)


def label(impl: str, backend: str | None) -> str:
    return f"mmkernels[{backend}]" if impl == "mmkernels" else impl


def materializes(impl: str, backend: str | None) -> bool:
    return impl != "mmkernels" or backend == "reference"


def estimate_bytes(impl: str, backend: str | None, case: Case) -> int:
    """Rough peak of one fwd+bwd: the B×B matrices of a materializing implementation, plus
    features, their grads and O(B·D) temporaries (about 8 B×D fp32 arrays)."""
    b, d = case.B, case.D
    linear = 8 * b * d * 4
    return linear + (MATERIALIZING_MATRICES * b * b * 4 if materializes(impl, backend) else 0)


# --------------------------------------------------------------------------------------------
# Worker side: one process measures one (implementation, case)

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _mem_available() -> int:
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


MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
            "memory_allocated() with the inputs in place",
    "cpu": "peak RSS (VmHWM, reset through /proc/self/clear_refs) during one fwd+bwd minus "
           "RSS with the inputs allocated, in a fresh process after a B=64 warm-up (the "
           "case's own shape for compile)",
    "cpu-lifetime": "peak RSS since process start (VmHWM, i.e. ru_maxrss: "
                    "/proc/self/clear_refs is not writable here) minus RSS with the inputs "
                    "allocated, in a fresh process: an upper bound",
}


class PeakMemory:
    """Extra memory at the peak of the code run between ``start`` and ``extra``."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
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
    cap = _proc_status_kib("VmSize") * 1024 + int(0.9 * _mem_available())
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


def _measure(spec: dict) -> dict:
    op, impl, device, quick = spec["op"], spec["impl"], spec["device"], spec["quick"]
    case = Case(**spec["case"])
    # Resolved here, where it runs: the C++ extension may have been built since the probe.
    backend = resolved_backend(op, case.dtype, device) if impl == "mmkernels" else None
    try:
        fn = build(impl, op)
    except Unavailable as exc:
        return {"status": "skipped", "reason": str(exc), "backend": backend}
    if device == "cpu":
        _limit_address_space()
    try:
        # Warm the process (libraries, BLAS buffers, thread pools) on a small problem so the
        # measured run is the first one at the case's size; compile must warm at that size.
        warm = case if impl == "compile" else Case(min(case.B, 64), case.D, case.dtype)
        try:
            fwd_bwd(fn, make_inputs(op, warm, device, seed=1))
        except Exception as exc:
            if impl == "compile" and not _is_oom(exc):
                return {"status": "skipped", "backend": backend,
                        "reason": f"torch.compile failed: {_one_line(exc)}"}
            raise
        inputs = make_inputs(op, case, device)
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
            "memory_method": memory.method if device == "cpu" else "cuda"}


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


def _probe(spec: dict) -> dict:
    """Machine facts, the backends "auto" resolves to, and the GEMM peak per dtype."""
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
        "resolved": {op: {dt: resolved_backend(op, dt, device) for dt in dtypes} for op in OPS},
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_free_bytes"], info["gpu_total_bytes"] = torch.cuda.mem_get_info()
        info["memory_method"] = MEMORY_METHODS["cuda"]
    else:
        info["memory_method"] = MEMORY_METHODS["cpu" if _reset_peak_rss() else "cpu-lifetime"]
    info["gemm_peak"] = {dt: _gemm_peak(device, dt, spec["quick"]) for dt in dtypes}
    return info


_RESULT_MARK = "@@mmkernels-bench-result "


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    result = _probe(spec) if spec["mode"] == "probe" else _measure(spec)
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Parent side: plan, spawn workers, tabulate, plot


def _spawn(spec: dict) -> dict:
    """Run one worker; its crash (signal, OOM kill, traceback) becomes a result row."""
    env = dict(os.environ)
    # The worker imports this package from where the parent did, installed or not.
    root = str(Path(mmkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # One small graph per worker: inductor's pool of compile processes costs more to start
    # (~10 s on 2 cores) than it saves.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "mmkernels.tools.bench", "--worker", json.dumps(spec)],
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


def _bench_one(op: str, impl: str, case: Case, device: str, quick: bool,
               threads: int | None, probe: dict) -> dict:
    backend = probe["resolved"][op][case.dtype] if impl == "mmkernels" else None
    row = {"op": op, "impl": impl, "label": label(impl, backend), "backend": backend,
           **asdict(case)}
    need = estimate_bytes(impl, backend, case)
    available = probe["gpu_free_bytes"] if device == "cuda" else _mem_available()
    if need > 0.8 * available:
        return {**row, "status": "skipped",
                "reason": f"skipped (est. {need / GiB:.1f} GiB > 80% of "
                          f"{available / GiB:.1f} GiB available)"}
    t0 = time.perf_counter()
    result = _spawn({"mode": "measure", "op": op, "impl": impl, "device": device,
                     "quick": quick, "threads": threads, "case": asdict(case)})
    row.update(result, worker_wall_s=time.perf_counter() - t0)
    if result.get("backend"):
        row["label"] = label(impl, result["backend"])
    return row


def _derive(rows: list, probe: dict) -> None:
    """Speedup and memory relative to eager in the same case, GFLOP/s and % of GEMM peak."""
    eager = {(r["B"], r["D"], r["dtype"]): r for r in rows
             if r["impl"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        flops = OPS[r["op"]].flops_per_b2d * r["B"] ** 2 * r["D"]
        r["nominal_flops"] = flops
        r["gflops"] = flops / r["time_s"] / 1e9
        r["pct_of_gemm_peak"] = 100 * r["gflops"] / probe["gemm_peak"][r["dtype"]]["gflops"]
        ref = eager.get((r["B"], r["D"], r["dtype"]))
        r["speedup_vs_eager"] = ref["time_s"] / r["time_s"] if ref else None
        r["extra_vs_eager_pct"] = (100 * r["extra_bytes"] / ref["extra_bytes"]
                                   if ref and ref["extra_bytes"] > 0 else None)


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:.{digits}f}{unit}"


def _status_text(r: dict) -> str:
    if r["status"] == "skipped":
        return r["reason"] if r["reason"].startswith("skipped") else f"skipped: {r['reason']}"
    return f"{r['status']}: {r['reason']}"


def markdown(report: dict) -> str:
    op, probe, device = OPS[report["op"]], report["machine"], report["device"]
    where = probe.get("gpu") or f"{probe['cpu_model']}, {probe['logical_cpus']} logical CPUs " \
                                f"({probe['torch_threads']} torch thread" \
                                f"{'s' if probe['torch_threads'] != 1 else ''})"
    peaks = "; ".join(f"{dt} {p['gflops']:.1f} GFLOP/s (torch.mm {p['n']}×{p['n']}, median "
                      f"of {p['repeats']})" for dt, p in probe["gemm_peak"].items())
    lines = [
        f"## {op.title} forward + backward, {device}",
        "",
        (f"{where}; torch {probe['torch']}, triton {probe['triton']}; {report['date']}; "
         f"load average {report['load_average']['start']:.1f} at the start, "
         f"{report['load_average']['end']:.1f} at the end.  "),
        f"Command: `{report['command']}`",
        "",
        (f"- Time: median wall time of one fwd+bwd (`loss.backward()` with the features, "
         f"logit_scale{' and logit_bias' if op.bias is not None else ''} requiring grad) "
         f"after warm-up; repeats: {report['repeats_policy']}."),
        (f"- GFLOP/s count the nominal **{op.flops_per_b2d}·B²·D** FLOPs for every "
         f"implementation: the minimum work of the fused O(B)-memory algorithm "
         f"({op.flops_note}). Materializing implementations do less arithmetic but hold B×B "
         f"matrices, so this column compares times on one scale. GEMM peak: {peaks}."),
        f"- Extra memory: {probe['memory_method']}.",
    ]
    if device == "cuda":
        lines.append("- The fp32 GEMM peak is measured with TF32 off (torch's default); Triton's "
                     "fp32 `tl.dot` uses TF32, so more than 100% is possible.")
    lines += [
        "",
        ("| B | D | dtype | implementation | time (ms) | repeats | speedup vs eager "
         "| extra memory (MiB) | memory vs eager | GFLOP/s | % of GEMM peak |"),
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        head = f"| {r['B']} | {r['D']} | {r['dtype']} | {r['label']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {_status_text(r)} | | | | | | |")
            continue
        speedup = r["speedup_vs_eager"]
        lines.append(
            f"{head} {_num(1e3 * r['time_s'])} | {r['repeats']} | "
            f"{_num(speedup, '×') if speedup is not None else '–'} | "
            f"{_num(r['extra_bytes'] / MiB)} | {_num(r['extra_vs_eager_pct'], '%')} | "
            f"{_num(r['gflops'])} | {_num(r['pct_of_gemm_peak'], '%')} |")
    return "\n".join(lines) + "\n"


_COLORS = {"eager": "tab:gray", "open_clip": "tab:orange", "compile": "tab:green",
           "mmkernels": "tab:blue"}
_LINESTYLES = {"fp32": "-", "bf16": "--"}


def plot(report: dict, metric: str, path: Path) -> None:
    """Log-log ``metric`` ("time" or "memory") against B, one line per implementation (and
    per D / dtype when the run has several)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["rows"]
    dims = sorted({r["D"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    series: dict = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        value = 1e3 * r["time_s"] if metric == "time" else r["extra_bytes"] / MiB
        if value <= 0:  # a log axis cannot show it (a few-KiB RSS change reads as 0 or less)
            continue
        name = r["label"] + (f" D={r['D']}" if len(dims) > 1 else "") + \
            (f" {r['dtype']}" if len(dtypes) > 1 else "")
        series.setdefault((r["impl"], name, r["dtype"]), []).append((r["B"], value))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (impl, name, dtype), points in series.items():
        points.sort()
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=name,
                color=_COLORS[impl], linestyle=_LINESTYLES.get(dtype, ":"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({b for points in series.values() for b, _ in points})
    ax.set_xticks(sizes, [str(b) for b in sizes])  # the batch sizes run, not powers of 2
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("batch size B")
    ax.set_ylabel("median fwd+bwd time (ms)" if metric == "time"
                  else "peak extra memory (MiB)")
    ax.set_title(f"{OPS[report['op']].title} fwd+bwd — D={'/'.join(map(str, dims))}, "
                 f"{'/'.join(dtypes)}, {report['device']}")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no successful runs", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _progress(row: dict, started: float) -> None:
    case = f"B={row['B']:<6} D={row['D']:<4} {row['dtype']}"
    if row["status"] == "ok":
        runs = f"median of {row['repeats']}" if row["repeats"] > 1 else "1 run"
        what = (f"{_num(1e3 * row['time_s'])} ms ({runs}), "
                f"extra {_num(row['extra_bytes'] / MiB)} MiB")
    else:
        what = _status_text(row)
    print(f"[{time.perf_counter() - started:7.1f} s] {row['op']:<8} {case}  {row['label']:<20} "
          f"{what}", flush=True)


def _parse(argv: list) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmkernels bench",
        description="Time and memory of forward+backward of the contrastive losses: "
                    "mmkernels against eager, open_clip and torch.compile.")
    p.add_argument("--op", choices=sorted(OPS), help="one op (default: both)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true",
                   help=f"B in {QUICK_SIZES} at D={DEFAULT_D}, fewer repeats (1-2 minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="where to write <op>_<device>.{json,md} and the plots "
                        "(default: benchmarks/results)")
    p.add_argument("--sizes", type=int, nargs="+", metavar="B",
                   help=f"batch sizes to run instead of the default list (D={DEFAULT_D})")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                   help="default: fp32 on cpu, fp32 and bf16 on cuda")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations to run (default: all)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per worker (default: torch's default); on a machine "
                        "shared with other jobs, fewer threads than cores avoids OpenMP "
                        "stalls that inflate times tenfold")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.worker:
        return _worker(args.worker)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = args.dtypes or list(DEFAULT_DTYPES[device])
    ops = [args.op] if args.op else list(OPS)
    command = shlex.join(["python", "-m", "mmkernels", "bench", *argv])
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    if load_at_start >= 0.5 * os.cpu_count():
        hint = "" if args.threads == 1 else " (consider --threads 1)"
        print(f"warning: load average {load_at_start:.1f} on {os.cpu_count()} CPUs before "
              f"the run: other jobs compete for the cores and timings will be inflated{hint}",
              flush=True)

    print(f"measuring the GEMM peak and probing backends ({device})...", flush=True)
    probe = _spawn({"mode": "probe", "device": device, "dtypes": dtypes, "quick": args.quick,
                    "threads": args.threads})
    if probe["status"] != "ok":
        print(f"bench: the probe worker failed: {probe['reason']}", file=sys.stderr)
        return 1
    print(f"mmkernels backends available: {', '.join(probe['available_backends'])}", flush=True)
    for name, why in probe["unavailable_reasons"].items():
        print(f"  {name} unavailable: {why}", flush=True)
    for dt, peak in probe["gemm_peak"].items():
        print(f"GEMM peak {dt}: {peak['gflops']:.1f} GFLOP/s", flush=True)
    print(f"repeats: {REPEATS_POLICY[args.quick]}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    errors = 0
    for op in ops:
        rows = []
        for case, impls in plan(op, device, args.quick, args.sizes, dtypes, args.impls):
            for impl in impls:
                row = _bench_one(op, impl, case, device, args.quick, args.threads, probe)
                rows.append(row)
                _progress(row, started)
        _derive(rows, probe)
        errors += sum(r["status"] == "error" for r in rows)
        report = {
            "op": op, "device": device, "quick": args.quick, "command": command,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "repeats_policy": REPEATS_POLICY[args.quick],
            "nominal_flops": f"{OPS[op].flops_per_b2d}·B²·D ({OPS[op].flops_note})",
            "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
            "machine": probe, "rows": rows,
        }
        # Quick runs (the README's main job) must not overwrite the committed full results.
        stem = args.out / (f"{op}_{device}" + ("_quick" if args.quick else ""))
        table = markdown(report)
        print("\n" + table, flush=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(table)
        for metric in ("time", "memory"):
            plot(report, metric, Path(f"{stem}_{metric}.png"))
        print(f"wrote {stem}.json, .md, _time.png, _memory.png", flush=True)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
