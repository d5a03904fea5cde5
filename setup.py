"""Build mmkernels and its optional C++ extension ``mmkernels._C``.

The extension holds the CPU kernels (``csrc/``: generic code in ``csrc/common``, one folder
per op family, e.g. ``csrc/contrastive``; every ``csrc/**/*.cpp`` is compiled, and each file
registers its own ops as ``torch.ops.mmkernels.*``). It is optional: ``MMK_NO_CPP=1`` skips
it, and a build that fails leaves a pure-Python package whose CPU ops fall back to the eager
reference (``mmkernels`` warns once, at the first op that would have used the extension; the
import stays quiet). The extension records the torch version it was compiled against and is
not loaded under any other. Build against the installed torch:

    pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpp_extensions():
    if os.environ.get("MMK_NO_CPP", "0") == "1":
        print("mmkernels: MMK_NO_CPP=1, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("mmkernels: torch not importable at build time, skipping the C++ extension "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}
    import torch

    # Every .cpp under csrc/ (csrc/common, csrc/contrastive, ...): a new op family adds its
    # folder and registers its ops there, without touching this file.
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # The torch version this build is compiled against, as a C string literal:
    # csrc/common/build_info.cpp embeds it and mmkernels/_cpp.py refuses to load the library
    # under any other torch. (torch's ninja build shell-quotes each flag, and the fallback
    # without ninja passes arguments verbatim, so the flag is given unquoted here.)
    escaped = str(torch.__version__).replace("\\", "\\\\").replace('"', '\\"')
    version_define = f'-DMMK_TORCH_VERSION="{escaped}"'
    # -O3 and OpenMP (at::parallel_for expands to OpenMP pragmas in the extension's own code).
    # No -march flag: hot loops are compiled for several ISAs with target_clones and picked
    # at load time, so the wheel runs on any x86-64 CPU. -fno-trapping-math lets GCC turn the
    # float selects in those loops (exp clamping, softplus/sigmoid branches) into blends;
    # without it the loops stay scalar. Results are unchanged (only FP exception flags,
    # which nothing reads, could differ).
    ext = CppExtension(
        name="mmkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math",
                                    version_define]},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """A failed C++ build must not fail the install: the package falls back to eager."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                print(f"mmkernels: C++ extension build failed ({exc}); "
                      "the package will use the reference backend on CPU", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                print(f"mmkernels: building {ext.name} failed ({exc})", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="mmkernels",
    version="0.1.0",
    description="Fused kernels for multimodal training: contrastive losses, cross-modal attention, LoRA",
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    python_requires=">=3.9",
    # safetensors: PEFT's adapter checkpoint format (mmkernels.lora.save_adapter/load_adapter).
    # tqdm: the demo's progress bars.
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        # No open_clip_torch here: it depends on torchvision, which replaces a pinned CPU torch
        # with the newest CUDA build. Its loss.py (the peer we compare with) needs only torch:
        # install it with `pip install --no-deps open_clip_torch` (README, .ci/run).
        "test": ["pytest", "pytest-benchmark", "numpy", "matplotlib"],
        "bench": ["matplotlib", "pytest-benchmark"],
        # PEFT (the LoRA peer): install with `-c constraints.txt` so it keeps the pinned torch.
        "peft": ["peft"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
