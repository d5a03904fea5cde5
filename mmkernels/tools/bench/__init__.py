"""Benchmark harness: mmkernels' ops against the implementations users replace.

    python -m mmkernels bench [--op NAME] [--device cpu|cuda] [--quick] [--out DIR]
                              [--sizes N ...] [--dtypes fp32 bf16] [--impls NAME ...]
                              [--threads N]

One run times forward + backward of every implementation of each op on every case and
reports, per row: the median warm wall time over interleaved rounds (every implementation of
a case in one process, the same number of rounds each, a rotating order per round), the cold
first run's time, speedup over eager and over torch.compile, peak extra memory (absolute and
as % of eager's, in a fresh process per implementation and case), and GFLOP/s on the op's
nominal FLOP count with its share of the machine's GEMM peak, measured in the same run.
Results go to ``<out>/<op>_<device>.{json,md}`` and ``<op>_<device>_{time,memory}.png``
(``_quick`` before the suffixes for --quick runs).

Layout: ``harness`` measures (worker processes: memory and cold time per implementation and
case, interleaved warm time per case, GEMM peak), ``report`` writes, ``peers`` loads the
implementations compared with, and one module per op family says what to
run (``contrastive``, ``attention``); ``family.BenchOp`` is the interface between them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import harness, report

# The op families: modules of this package, each defining OPS (name -> family.BenchOp).
FAMILIES = ("contrastive", "attention", "lora")
OPS = {name: op for family in FAMILIES
       for name, op in importlib.import_module(f"{__name__}.{family}").OPS.items()}
IMPLS = tuple(dict.fromkeys(impl for op in OPS.values() for impl in op.impls))


def _help(attribute: str) -> str:
    """One --help text from the ops' own, each distinct one once."""
    return "; ".join(dict.fromkeys(getattr(op, attribute) for op in OPS.values()))


def _parse(argv: list) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmkernels bench",
        description="Time and memory of forward+backward of mmkernels' ops against eager "
                    "PyTorch, torch.compile and the libraries they replace.")
    p.add_argument("--op", choices=sorted(OPS), help="one op (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true",
                   help=f"{_help('quick_help')}, a smaller timing budget per case "
                        "(a few minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="where to write <op>_<device>.{json,md} and the plots "
                        "(default: benchmarks/results)")
    p.add_argument("--sizes", type=int, nargs="+", metavar="N", help=_help("sizes_help"))
    p.add_argument("--dtypes", nargs="+", choices=sorted(harness.DTYPES),
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
        return harness.worker(OPS, args.worker)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = args.dtypes or list(harness.DEFAULT_DTYPES[device])
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
    probe = harness.spawn({"mode": "probe", "device": device, "dtypes": dtypes,
                           "quick": args.quick, "threads": args.threads})
    if probe["status"] != "ok":
        print(f"bench: the probe worker failed: {probe['reason']}", file=sys.stderr)
        return 1
    print(f"mmkernels backends available: {', '.join(probe['available_backends'])}", flush=True)
    for name, why in probe["unavailable_reasons"].items():
        print(f"  {name} unavailable: {why}", flush=True)
    for dt, peak in probe["gemm_peak"].items():
        print(f"GEMM peak {dt}: {peak['gflops']:.1f} GFLOP/s", flush=True)
    policy = harness.rounds_policy(args.quick)
    print(f"timing: {policy}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    errors = 0
    for name in ops:
        op, rows = OPS[name], []
        for case, impls in op.plan(device, args.quick, args.sizes, dtypes, args.impls):
            rows += harness.bench_case(op, case, impls, device, args.quick, args.threads,
                                       probe, harness.progress(started))
        report.derive(op, rows, probe)
        errors += sum(r["status"] == "error" for r in rows)
        record = report.build(op, rows, probe, device=device, quick=args.quick,
                              command=command, repeats_policy=policy,
                              timing_method=harness.timing_method(args.quick),
                              load_average={"start": load_at_start, "end": os.getloadavg()[0]})
        # Quick runs (the README's main job) must not overwrite the committed full results.
        stem = args.out / (f"{name}_{device}" + ("_quick" if args.quick else ""))
        table = report.markdown(op, record)
        print("\n" + table, flush=True)
        report.write(op, record, table, stem)
        print(f"wrote {stem}.json, .md, _time.png, _memory.png", flush=True)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    return 1 if errors else 0
