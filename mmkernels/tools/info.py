"""``python -m mmkernels info``: versions, device, backends (and why the others are not usable),
the C++ build, and the CPU's vector features."""
from __future__ import annotations

import importlib.util
import os
import platform


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
                                        "avx512_bf16", "amx_tile") if x in flags]
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report() -> list[tuple[str, str]]:
    import torch

    import mmkernels
    from mmkernels import _cpp

    triton_version = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton
        triton_version = triton.__version__
    rows = [
        ("mmkernels", mmkernels.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("triton", triton_version),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0")),
        ("cpu", f"{cpu_model()}, {os.cpu_count()} logical cores, "
                f"torch threads {torch.get_num_threads()}"),
        ("cpu features", " ".join(_cpu_flags()) or "unknown"),
        ("torch cpu capability", torch.backends.cpu.get_cpu_capability()),
        ("cuda device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
        ("C++ extension", "loaded" if _cpp.load() is not None else f"not loaded: {_cpp.error()}"),
        ("C++ built against torch", _cpp.built_torch_version() or "-"),
        ("available backends", ", ".join(mmkernels.available_backends())),
    ]
    rows += [(f"  {name} unavailable", why)
             for name, why in mmkernels.unavailable_reasons().items()]
    return rows


def main(argv: list[str]) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
