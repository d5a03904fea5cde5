"""``python -m mmkernels gpu-report``: compile every shipped Triton kernel config for sm_80
and sm_90 without a GPU and print what the hardware would see.

One row per kernel × config × arch: registers, shared memory, stack and local memory (spills)
from the cubin (triton's bundled ``cuobjdump --dump-resource-usage``), and whether the PTX uses
tensor-core instructions (mma / wgmma). Exits non-zero on spills or on shared memory over the
architecture's per-block limit, so CI catches a config that would fail or crawl on a GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # usable shared memory per block (bytes)


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
                "ok": not problems,
                "problems": problems,
            }


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
    header = f"{'kernel':<26} {'arch':<6} {'regs':>4} {'shared':>8} {'stack':>5} {'local':>5} " \
             f"{'mma':<5} {'wgmma':<5} status  config"
    print(header)
    print("-" * len(header))
    failed = 0
    for row in compile_all():
        status = "ok" if row["ok"] else "FAIL: " + ", ".join(row["problems"])
        failed += not row["ok"]
        print(f"{row['kernel']:<26} {row['arch']:<6} {row['registers']:>4} "
              f"{row['shared_bytes']:>8} {row['stack_bytes']:>5} {row['local_bytes']:>5} "
              f"{str(row['mma']):<5} {str(row['wgmma']):<5} {status:<7} {row['config']}",
              flush=True)
    if failed:
        print(f"gpu-report: {failed} kernel configs spill or exceed shared memory",
              file=sys.stderr)
    return 1 if failed else 0
