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
    """Speedup and memory relative to eager in the same case, GFLOP/s and % of GEMM peak."""
    fields = _case_fields(op)
    eager = {tuple(r[f] for f in fields): r for r in rows
             if r["impl"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        flops = op.flops(op.case_type(**{f: r[f] for f in fields}))
        r["nominal_flops"] = flops
        r["gflops"] = flops / r["time_s"] / 1e9
        r["pct_of_gemm_peak"] = 100 * r["gflops"] / probe["gemm_peak"][r["dtype"]]["gflops"]
        ref = eager.get(tuple(r[f] for f in fields))
        r["speedup_vs_eager"] = ref["time_s"] / r["time_s"] if ref else None
        r["extra_vs_eager_pct"] = (100 * r["extra_bytes"] / ref["extra_bytes"]
                                   if ref and ref["extra_bytes"] > 0 else None)


def build(op: BenchOp, rows: list, probe: dict, *, device: str, quick: bool, command: str,
          repeats_policy: str, load_average: dict) -> dict:
    """The JSON record of one op's run (``derive`` has filled the rows)."""
    return {
        "op": op.name, "device": device, "quick": quick, "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "repeats_policy": repeats_policy,
        "nominal_flops": f"{op.flops_formula} ({op.flops_note})",
        "load_average": load_average,
        "machine": {**probe, "memory_method": memory_method(probe["memory_method"], op)},
        "rows": rows,
    }


def markdown(op: BenchOp, report: dict) -> str:
    probe, device = report["machine"], report["device"]
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
        (f"- Time: median wall time of one fwd+bwd ({op.step}) after warm-up; repeats: "
         f"{report['repeats_policy']}."),
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
    lines += [
        "",
        (f"|{lead} implementation | time (ms) | repeats | speedup vs eager "
         "| extra memory (MiB) | memory vs eager | GFLOP/s | % of GEMM peak |"),
        f"|{align}---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        head = "|" + "".join(f" {r[f.name]} |" for f in fields) + f" {r['label']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {status_text(r)} | | | | | | |")
            continue
        speedup = r["speedup_vs_eager"]
        lines.append(
            f"{head} {num(1e3 * r['time_s'])} | {r['repeats']} | "
            f"{num(speedup, '×') if speedup is not None else '–'} | "
            f"{num(r['extra_bytes'] / MiB)} | {num(r['extra_vs_eager_pct'], '%')} | "
            f"{num(r['gflops'])} | {num(r['pct_of_gemm_peak'], '%')} |")
    return "\n".join(lines) + "\n"


# The same implementation has the same colour in every plot; a family's own peers take the
# remaining colours in their order in ``BenchOp.impls``.
_COLORS = {"eager": "tab:gray", COMPILE: "tab:green", "mmkernels": "tab:blue"}
_PEER_COLORS = ("tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
_LINESTYLES = {"fp32": "-", "bf16": "--"}


def plot(op: BenchOp, report: dict, metric: str, path: Path) -> None:
    """Log-log ``metric`` ("time" or "memory") against the op's x field, one line per
    implementation (and per value of the other case fields when the run has several)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, x = report["rows"], op.x_field
    others = {f: sorted({r[f] for r in rows}) for f in _case_fields(op) if f not in (x, "dtype")}
    dtypes = sorted({r["dtype"] for r in rows})
    own = [i for i in op.impls if i not in _COLORS]
    colors = {**_COLORS, **dict(zip(own, _PEER_COLORS))}
    series: dict = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        value = 1e3 * r["time_s"] if metric == "time" else r["extra_bytes"] / MiB
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
    ax.set_ylabel("median fwd+bwd time (ms)" if metric == "time"
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
