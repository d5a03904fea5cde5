"""One op's results: the JSON record, the markdown table and the time/memory plots.

Generic over a family's row schema: the case fields lead every row (``BenchOp.case_type``),
and the op supplies the words (title, what is timed, the FLOP count's formula and basis) and
the plots' x axis.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

from .family import BenchOp
from .harness import MiB, memory_method, num, status_text
from .peers import COMPILE


def _case_fields(op: BenchOp) -> list[str]:
    return [f.name for f in dataclasses.fields(op.case_type)]


def derive(op: BenchOp, rows: list, probe: dict) -> None:
    """Speedup relative to eager and to torch.compile in the same case (interleaved warm
    medians, never the cold run), memory relative to eager, GFLOP/s and % of GEMM peak."""
    fields = _case_fields(op)

    def ok(impl: str) -> dict:
        return {tuple(r[f] for f in fields): r for r in rows
                if r["impl"] == impl and r["status"] == "ok"}

    eager, compiled = ok("eager"), ok(COMPILE)
    for r in rows:
        if r["status"] != "ok":
            continue
        flops = op.flops(op.case_type(**{f: r[f] for f in fields}))
        r["nominal_flops"] = flops
        r["gflops"] = flops / r["time_s"] / 1e9
        r["pct_of_gemm_peak"] = 100 * r["gflops"] / probe["gemm_peak"][r["dtype"]]["gflops"]
        key = tuple(r[f] for f in fields)
        ref, comp = eager.get(key), compiled.get(key)
        r["speedup_vs_eager"] = ref["time_s"] / r["time_s"] if ref else None
        r["speedup_vs_compile"] = comp["time_s"] / r["time_s"] if comp else None
        r["extra_vs_eager_pct"] = (100 * r["extra_bytes"] / ref["extra_bytes"]
                                   if ref and ref["extra_bytes"] > 0 else None)


def build(op: BenchOp, rows: list, probe: dict, *, device: str, quick: bool, command: str,
          repeats_policy: str, load_average: dict, timing_method: str = "") -> dict:
    """The JSON record of one op's run (``derive`` has filled the rows)."""
    return {
        "op": op.name, "device": device, "quick": quick, "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "repeats_policy": repeats_policy,
        "timing_method": timing_method,
        "nominal_flops": f"{op.flops_formula} ({op.flops_note})",
        "load_average": load_average,
        "machine": {**probe, "memory_method": memory_method(probe["memory_method"], op)},
        "rows": rows,
    }


def _ms(seconds: float | None) -> str:
    return num(None if seconds is None else 1e3 * seconds)


def headlines(op: BenchOp, rows: list) -> list[str]:
    """Per case, what the fused op wins: memory first (it is the win wherever the peers
    materialize), time only where it beats the fastest peer on the interleaved medians."""
    fields = _case_fields(op)
    cases: dict = {}
    for r in rows:
        cases.setdefault(tuple(r[f] for f in fields), []).append(r)
    lines = []
    for key, group in cases.items():
        name = ", ".join(f"{f}={v}" for f, v in zip(fields, key))
        fused = next((r for r in group if r["impl"] == "mmkernels" and r["status"] == "ok"),
                     None)
        if fused is None:
            continue
        floors = getattr(op, "floors", ())  # lower bounds, not peers (family.BenchOp)
        peers = [r for r in group if r["impl"] != "mmkernels" and r["impl"] not in floors]
        ran = [r for r in peers if r["status"] == "ok"]
        floor = ", ".join(f"{fused['time_s'] / r['time_s']:.2f}× the time of the floor "
                          f"({r['label']})" for r in group
                          if r["impl"] in floors and r["status"] == "ok")
        mem = fused["extra_bytes"]
        if not ran:
            why = "; ".join(f"{r['label']} {status_text(r)}" for r in peers) or "none run"
            lines.append(f"- **{name} — memory**: only {fused['label']} runs "
                         f"({num(mem / MiB)} MiB extra); {why}.")
            continue
        lean = min(ran, key=lambda r: r["extra_bytes"])
        fast = min(ran, key=lambda r: r["time_s"])
        memory_win = mem < lean["extra_bytes"]
        time_win = fused["time_s"] < fast["time_s"]
        wins = " and ".join(w for w, won in (("memory", memory_win), ("time", time_win)) if won)
        if mem > 0:
            less = f"{num(lean['extra_bytes'] / mem, '×')} less than" if memory_win else \
                f"{num(mem / lean['extra_bytes'], '×')} that of" if lean["extra_bytes"] > 0 \
                else "vs"
        else:
            less = "(below the RSS resolution) vs"
        times = ", ".join(f"{num(fused[k], '×')} {label}"
                          for k, label in (("speedup_vs_eager", "eager"),
                                           ("speedup_vs_compile", "torch.compile"))
                          if fused.get(k) is not None)
        lines.append(
            f"- **{name} — {wins or 'no win at this size'}**: {fused['label']} "
            f"{num(mem / MiB)} MiB extra, {less} the leanest peer ({lean['label']}, "
            f"{num(lean['extra_bytes'] / MiB)} MiB); time {_ms(fused['time_s'])} ms, "
            f"{fast['time_s'] / fused['time_s']:.2f}× the speed of the fastest peer "
            f"({fast['label']}, {_ms(fast['time_s'])} ms)"
            + (f"; speedup {times}" if times else "") + (f"; {floor}" if floor else "") + ".")
    return lines


def markdown(op: BenchOp, report: dict) -> str:
    probe, device = report["machine"], report["device"]
    where = probe.get("gpu") or f"{probe['cpu_model']}, {probe['logical_cpus']} logical CPUs " \
                                f"({probe['torch_threads']} torch thread" \
                                f"{'s' if probe['torch_threads'] != 1 else ''})"
    peaks = "; ".join(f"{dt} {p['gflops']:.1f} GFLOP/s (torch.mm {p['n']}×{p['n']}, median "
                      f"of {p['repeats']})" for dt, p in probe["gemm_peak"].items())
    method = report.get("timing_method") or f"repeats: {report['repeats_policy']}"
    lines = [
        f"## {op.title} forward + backward, {device}",
        "",
        (f"{where}; torch {probe['torch']}, triton {probe['triton']}; {report['date']}; "
         f"load average {report['load_average']['start']:.1f} at the start, "
         f"{report['load_average']['end']:.1f} at the end.  "),
        f"Command: `{report['command']}`",
        "",
        f"- Time: wall time of one fwd+bwd ({op.step}), {method}.",
        "- Speedups and GFLOP/s use the warm interleaved medians (the time column).",
        (f"- GFLOP/s count the nominal **{op.flops_formula}** FLOPs for every implementation: "
         f"{op.flops_basis}. GEMM peak: {peaks}."),
        f"- Extra memory: {probe['memory_method']}.",
    ]
    if device == "cuda":
        lines.append("- The fp32 GEMM peak is measured with TF32 off (torch's default); Triton's "
                     "fp32 `tl.dot` uses TF32, so more than 100% is possible.")
    fields = dataclasses.fields(op.case_type)
    lead = "".join(f" {f.name} |" for f in fields)
    align = "".join("---:|" if f.type in (int, "int") else "---|" for f in fields)
    summary = headlines(op, report["rows"])
    if summary:
        lines += ["", "What the fused op wins, per case:", "", *summary]
    lines += [
        "",
        (f"|{lead} implementation | time (ms) | rounds | cold (first run, ms) "
         "| speedup vs eager | speedup vs compile | extra memory (MiB) | memory vs eager "
         "| GFLOP/s | % of GEMM peak |"),
        f"|{align}---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        head = "|" + "".join(f" {r[f.name]} |" for f in fields) + f" {r['label']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {status_text(r)} | | | | | | | | |")
            continue
        speedup, vs_compile = r["speedup_vs_eager"], r.get("speedup_vs_compile")
        lines.append(
            f"{head} {_ms(r['time_s'])} | {r.get('rounds', r['repeats'])} | "
            f"{_ms(r.get('cold_s'))} | "
            f"{num(speedup, '×') if speedup is not None else '–'} | "
            f"{num(vs_compile, '×') if vs_compile is not None else '–'} | "
            f"{num(r['extra_bytes'] / MiB)} | {num(r['extra_vs_eager_pct'], '%')} | "
            f"{num(r['gflops'])} | {num(r['pct_of_gemm_peak'], '%')} |")
    return "\n".join(lines) + "\n"


# The same implementation has the same colour in every plot; a family's own peers take the
# remaining colours in their order in ``BenchOp.impls``.
_COLORS = {"eager": "tab:gray", COMPILE: "tab:green", "mmkernels": "tab:blue"}
_PEER_COLORS = ("tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
_LINESTYLES = {"fp32": "-", "bf16": "--"}


def _value(r: dict, metric: str) -> float:
    return 1e3 * r["time_s"] if metric == "time" else r["extra_bytes"] / MiB


def _bars(op: BenchOp, report: dict, metric: str, path: Path, plt) -> None:
    """Grouped bars on a log axis: one group per case, one bar per implementation (families
    whose cases are distinct scenarios rather than points on one size axis)."""
    fields = [f for f in _case_fields(op) if len({r[f] for r in report["rows"]}) > 1]
    cases: dict = {}
    for r in report["rows"]:
        cases.setdefault("\n".join(str(r[f]) for f in fields), {})[r["impl"]] = r
    own = [i for i in op.impls if i not in _COLORS]
    colors = {**_COLORS, **dict(zip(own, _PEER_COLORS))}
    width = 0.8 / len(op.impls)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(cases)), 4.8))
    for k, impl in enumerate(op.impls):
        xs, ys = [], []
        for c, by_impl in enumerate(cases.values()):
            r = by_impl.get(impl)
            if r and r["status"] == "ok" and _value(r, metric) > 0:
                xs.append(c + (k - (len(op.impls) - 1) / 2) * width)
                ys.append(_value(r, metric))
        label = next((r["label"] for by in cases.values() for i, r in by.items() if i == impl),
                     impl)
        ax.bar(xs, ys, width, label=label, color=colors[impl])
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), list(cases), fontsize=8)
    ax.set_ylabel("median warm time per step (ms), interleaved" if metric == "time"
                  else "peak extra memory (MiB)")
    ax.set_title(f"{op.title} — {' / '.join(fields)}, {report['device']}")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(op: BenchOp, report: dict, metric: str, path: Path) -> None:
    """Log-log ``metric`` ("time" or "memory") against the op's x field, one line per
    implementation (and per value of the other case fields when the run has several); grouped
    bars per case when the op has no x field (``x_field = None``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if op.x_field is None:
        _bars(op, report, metric, path, plt)
        return
    rows, x = report["rows"], op.x_field
    others = {f: sorted({r[f] for r in rows}) for f in _case_fields(op) if f not in (x, "dtype")}
    dtypes = sorted({r["dtype"] for r in rows})
    own = [i for i in op.impls if i not in _COLORS]
    colors = {**_COLORS, **dict(zip(own, _PEER_COLORS))}
    series: dict = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        value = _value(r, metric)
        if value <= 0:  # a log axis cannot show it (a few-KiB RSS change reads as 0 or less)
            continue
        name = r["label"] + "".join(f" {f}={r[f]}" for f, vs in others.items() if len(vs) > 1) \
            + (f" {r['dtype']}" if len(dtypes) > 1 else "")
        series.setdefault((r["impl"], name, r["dtype"]), []).append((r[x], value))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (impl, name, dtype), points in series.items():
        points.sort()
        ax.plot([v for v, _ in points], [y for _, y in points], marker="o", label=name,
                color=colors[impl], linestyle=_LINESTYLES.get(dtype, ":"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({v for points in series.values() for v, _ in points})
    ax.set_xticks(ticks, [str(v) for v in ticks])  # the sizes run, not powers of 2
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(op.x_label)
    ax.set_ylabel("median warm fwd+bwd time (ms), interleaved" if metric == "time"
                  else "peak extra memory (MiB)")
    fixed = [f"{f}={'/'.join(map(str, vs))}" for f, vs in others.items()]
    ax.set_title(f"{op.title} fwd+bwd — {', '.join(fixed + ['/'.join(dtypes)])}, "
                 f"{report['device']}")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no successful runs", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(op: BenchOp, report: dict, table: str, stem: Path) -> None:
    """``<stem>.json``, ``<stem>.md`` (``table``, from ``markdown``) and the two plots."""
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    for metric in ("time", "memory"):
        plot(op, report, metric, Path(f"{stem}_{metric}.png"))
