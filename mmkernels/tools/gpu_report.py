"""``python -m mmkernels gpu-report``: compile every shipped Triton kernel config for sm_80
and sm_90 without a GPU and print what the hardware would see.

One row per kernel × config × arch: registers, shared memory, stack and local memory (spills)
from the cubin (triton's bundled ``cuobjdump --dump-resource-usage``), whether the PTX uses
tensor-core instructions (mma / wgmma), and the FLOPs the kernel executes per B²·D at
B = 16384 for D = 64 ... 1024 ("-" where the host launches another variant of the kernel at
that D, or the op does not take it: attention's head dims stop at 256). Exits non-zero on spills or on shared memory over the architecture's per-block limit,
so CI catches a config that would fail or crawl on a GPU.

A second table adds the kernels of one forward + backward per op, precision and path and
divides by the nominal work (8·B²·D InfoNCE, 6·B²·D SigLIP, 14·Lq·Lk·D attention per head,
LoRA 4·T·D² + 12·T·D·r): the FLOPs a design spends beyond the minimum (e.g. the second
computation of each tile that a deterministic backward pays instead of atomics, or the padding
of a small layer to the tile size).

LoRA is a layer, not a B × B product: its problem is T = B tokens through a D → D layer with a
rank-16 adapter (LORA_RANK), so its FLOP columns are per T·D² (the base GEMM's 2 per pass), and
its nominal work is the frozen base's forward and dx GEMMs (4·T·D²) plus the adapter's six
skinny products (shrink, expand, du, dB, dx's adapter part, dA: 12·T·D·r).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # usable shared memory per block (bytes)
FLOP_B = 16384
# Head dims of attention (up to 256) and feature sizes of the contrastive losses.
FLOP_DS = (64, 128, 256, 512, 1024)
# FLOPs / (B²·D) of forward + backward; attention per head with Lq = Lk = B (forward 4,
# backward 2.5× that). LoRA: see ``nominal_flops``.
NOMINAL = {"infonce": 8, "siglip": 6, "attention": 14}
# The adapter rank of LoRA's report problem (T = B tokens, in = out = D).
LORA_RANK = 16


def flop_unit(op: str, b: int, d: int) -> int:
    """What an op's FLOP columns are per: B²·D, or T·D² for a D → D LoRA layer over T = B."""
    return b * d * d if op == "lora" else b * b * d


def nominal_flops(op: str, b: int, d: int) -> int:
    """The minimum FLOPs of one forward + backward: LoRA with a frozen base, the base's
    forward and dx GEMMs (2·T·D² each) and the adapter's six T·D·r products."""
    if op == "lora":
        return 4 * b * d * d + 12 * b * d * LORA_RANK
    return NOMINAL[op] * b * b * d


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    usage = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    return usage


def compile_all():
    """Yield one dict per kernel × config × arch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .._triton import all_specs

    # Every kernel file registers its specs (mmkernels._triton.register_specs): none is listed
    # here, so a new kernel file is compiled without touching this one.
    for spec in all_specs():
        for cap, smem_limit in ARCHS.items():
            src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                            constexprs=spec["constexprs"], attrs=spec.get("attrs"))
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                      options={"num_warps": spec["num_warps"],
                                               "num_stages": spec["num_stages"]})
            usage = _resource_usage(compiled.asm["cubin"])
            ptx = compiled.asm["ptx"]
            shared = compiled.metadata.shared
            spills = usage.get("LOCAL", 0) + usage.get("STACK", 0)
            problems = []
            if spills:
                problems.append("spills")
            if shared > smem_limit:
                problems.append(f"shared > {smem_limit // 1024} KiB")
            config = ", ".join(f"{k}={v}" for k, v in spec["constexprs"].items()
                               if k.startswith("BLOCK_"))
            yield {
                "kernel": spec["name"],
                "config": f"{config}, warps={spec['num_warps']}, stages={spec['num_stages']}",
                "arch": f"sm_{cap}",
                "registers": usage.get("REG"),
                "shared_bytes": shared,
                "stack_bytes": usage.get("STACK", 0),
                "local_bytes": usage.get("LOCAL", 0),
                "wgmma": "wgmma" in ptx,
                "mma": bool(re.search(r"\bmma\.sync", ptx)),
                "flops_per_b2d": [_per_b2d(spec, d) for d in FLOP_DS],
                "ok": not problems,
                "problems": problems,
            }


def _per_b2d(spec: dict, d: int):
    flops = spec["flops"](FLOP_B, d)
    return None if flops is None else flops / flop_unit(spec["op"], FLOP_B, d)


def work_summary(specs: list[dict]) -> list[dict]:
    """Executed FLOPs of one forward + backward (or of a loss-only evaluation) per op,
    precision family and path, over the nominal work, at B = FLOP_B and each D of FLOP_DS."""
    rows = []
    for op in sorted({s["op"] for s in specs}):
        for fam in dict.fromkeys(s["family"] for s in specs):
            mine = [s for s in specs if s["op"] == op and s["family"] == fam]
            paths = [p for p in dict.fromkeys(s["path"] for s in mine) if p != "forward"]
            for path in paths:
                kernels = [s for s in mine if s["path"] in (path, "forward")]
                ratios = []
                for d in FLOP_DS:
                    executed = sum(f for f in (s["flops"](FLOP_B, d) for s in kernels) if f)
                    # A loss-only evaluation's nominal work is one product of the logits.
                    nominal = (2 * FLOP_B**2 * d if path == "loss-only"
                               else nominal_flops(op, FLOP_B, d))
                    ratios.append(executed / nominal if executed else None)
                rows.append({"op": op, "family": fam, "path": path, "ratios": ratios})
    return rows


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Interpreted kernels cannot be compiled: rerun ourselves with the interpreter off.
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        return subprocess.call([sys.executable, "-m", "mmkernels", "gpu-report", *argv], env=env)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu-report: triton is not installed (pip install triton)", file=sys.stderr)
        return 1
    flop_cols = " ".join(f"{'D=' + str(d):>6}" for d in FLOP_DS)
    header = f"{'kernel':<38} {'arch':<6} {'regs':>4} {'shared':>8} {'stack':>5} {'local':>5} " \
             f"{'mma':<5} {'wgmma':<5} {flop_cols} status  config"
    print(f"FLOPs executed per B²·D at B = {FLOP_B} in columns D=... (LoRA: per T·D², "
          f"T = B tokens through a D → D layer, r = {LORA_RANK})")
    print(header)
    print("-" * len(header))
    failed = 0
    for row in compile_all():
        status = "ok" if row["ok"] else "FAIL: " + ", ".join(row["problems"])
        failed += not row["ok"]
        flops = " ".join(f"{'-' if f is None else format(f, '.2f'):>6}"
                         for f in row["flops_per_b2d"])
        print(f"{row['kernel']:<38} {row['arch']:<6} {row['registers']:>4} "
              f"{row['shared_bytes']:>8} {row['stack_bytes']:>5} {row['local_bytes']:>5} "
              f"{str(row['mma']):<5} {str(row['wgmma']):<5} {flops} {status:<7} "
              f"{row['config']}", flush=True)
    from .._triton import all_specs
    print(f"\nExecuted FLOPs / nominal (InfoNCE 8·B²·D, SigLIP 6·B²·D, attention 14·B²·D, "
          f"LoRA 4·T·D² + 12·T·D·r forward + backward; loss only: 2·B²·D) at B = T = {FLOP_B}")
    print(f"{'op':<10} {'precision':<10} {'path':<14} " + " ".join(f"{'D=' + str(d):>7}"
                                                                 for d in FLOP_DS))
    for row in work_summary(all_specs()):
        fam = {"16bit": "bf16/fp16", "tf32": "fp32/tf32", "ieee": "fp32/ieee"}[row["family"]]
        print(f"{row['op']:<10} {fam:<10} {row['path']:<14} "
              + " ".join(f"{'-':>7}" if r is None else f"{r:>6.2f}×" for r in row["ratios"]))
    if failed:
        print(f"gpu-report: {failed} kernel configs spill or exceed shared memory",
              file=sys.stderr)
    return 1 if failed else 0
