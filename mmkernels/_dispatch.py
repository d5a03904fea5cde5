"""Backend selection shared by every op: each op's implementation on each backend states what
it supports, and a refusal lists every reason (the xformers ``fmha/dispatch.py`` idea).

Two levels:

* the **machine**: can a backend run anything here at all (``machine_reason``: the C++
  extension is built, triton is installed and has a GPU or the interpreter)?
* the **call**: can this op's implementation on that backend take these inputs
  (``Impl.not_supported_reasons(inputs)``: dtypes and devices of every tensor input, the GPU's
  compute capability, and whatever the op adds: head dims, mask kinds, ranks...)?

``Op.select(backend, inputs)``:

* a named backend that cannot run the call raises ``BackendUnavailableError`` with every
  reason, and says which backends could;
* ``"auto"`` tries triton for CUDA inputs and cpu for CPU inputs, then the reference; it never
  fails. Falling back because the C++ extension is missing warns once (``_cpp.warn_once``);
  falling back for any other reason (a dtype, a head dim...) warns once per op and reason, so
  a user learns why a call was slow.

Backends:
  reference  eager PyTorch, materializing. The oracle for tests and the fallback.
  cpu        the C++ kernels of ``mmkernels._C`` (csrc/), CPU tensors.
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import _cpp
from ._validate import FLOAT_DTYPES, dtype_name

BACKENDS = ("reference", "cpu", "triton")
# Looked up once at import (find_spec does not import triton): the dispatcher runs inside
# torch.compile traces, where importlib calls are not traceable.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def machine_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run anything on this machine, or None if it can."""
    if backend == "cpu":
        return _cpp.error()
    if backend == "triton":
        if not _TRITON_INSTALLED:
            return "triton is not installed (pip install triton)"
        # torch.cuda.is_available() does not create a CUDA context.
        if not torch.cuda.is_available() and not interpreter():
            return "no CUDA device, and TRITON_INTERPRET=1 is not set (set it before " \
                   "triton is imported to run Triton kernels on CPU)"
    return None


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [name for name in BACKENDS if machine_reason(name) is None]


def unavailable_reasons() -> dict[str, str]:
    """For each backend that cannot run on this machine, why."""
    return {name: why for name in BACKENDS if (why := machine_reason(name)) is not None}


def fp32_uses_tf32() -> bool:
    """Whether Triton's fp32 products may use TF32 tensor cores: torch's own switch,
    ``torch.set_float32_matmul_precision`` ("highest", torch's default, means exact fp32).
    An op reads it once per call, inside its custom op (torch.compile cannot trace the query),
    and hands it to its backward, so both always agree."""
    return torch.get_float32_matmul_precision() != "highest"


def uses_tf32(backend: str, dtype: torch.dtype) -> bool:
    """Whether a call on ``backend`` with inputs of ``dtype`` runs its fp32 products on TF32
    (Triton only). Read inside the custom ops, which torch.compile does not trace, and carried
    from the forward to the backward so both always agree."""
    return backend == "triton" and dtype == torch.float32 and fp32_uses_tf32()


def _tensors(inputs: Mapping) -> dict[str, torch.Tensor]:
    return {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor)}


def _device_reasons(backend: str, devices: set, floats: set) -> list[str]:
    """Device limits every op shares on ``backend``, for inputs on ``devices`` (torch.device)
    with floating dtypes ``floats``."""
    cuda = next((d for d in devices if d.type == "cuda"), None)
    types = {d.type for d in devices}
    if backend == "cpu":
        return [f"the C++ kernels take CPU tensors, got {d} tensors" for d in types - {"cpu"}]
    if backend != "triton":
        return []
    reasons = [f"Triton kernels take CUDA tensors, got {d} tensors"
               for d in types - {"cpu", "cuda"}]
    if "cpu" in types:
        if not interpreter():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 to run Triton kernels")
        elif torch.bfloat16 in floats:
            reasons.append("bfloat16 is silently wrong in the Triton interpreter")
    if cuda is not None:
        major, minor = torch.cuda.get_device_capability(cuda)
        if major < 8:
            # mma on bf16 and TF32 operands needs Ampere; the compile would fail.
            if torch.bfloat16 in floats:
                reasons.append(f"bfloat16 needs compute capability 8.0 or newer, this GPU is "
                               f"sm_{major}{minor}")
            if torch.float32 in floats and fp32_uses_tf32():
                reasons.append(f"TF32 (torch.get_float32_matmul_precision() = "
                               f"{torch.get_float32_matmul_precision()!r}) needs compute "
                               f"capability 8.0 or newer, this GPU is sm_{major}{minor}; set "
                               "torch.set_float32_matmul_precision('highest')")
    return reasons


@dataclass(frozen=True)
class Impl:
    """What one op's implementation on one backend supports.

    The generic statement is the floating dtypes it takes; an op with more limits (head dim,
    mask kinds, ranks...) subclasses this and overrides ``op_reasons``.
    """

    backend: str
    dtypes: tuple = FLOAT_DTYPES

    def op_reasons(self, inputs: Mapping) -> list[str]:
        """Op-specific reasons this implementation cannot take ``inputs`` (none by default)."""
        return []

    def not_supported_reasons(self, inputs: Mapping) -> list[str]:
        """Every reason this implementation cannot run a call on ``inputs`` (a mapping of
        argument name to value; tensors among them are checked for dtype and device)."""
        reasons = []
        machine = machine_reason(self.backend)
        if machine:
            reasons.append(machine)
        tensors = _tensors(inputs)
        supported = ", ".join(dtype_name(d) for d in self.dtypes)
        for name, t in tensors.items():
            if t.is_floating_point() and t.dtype not in self.dtypes:
                reasons.append(f"{name}: dtype {dtype_name(t.dtype)} is not supported "
                               f"(supports {supported})")
        reasons += _device_reasons(self.backend, {t.device for t in tensors.values()},
                                   {t.dtype for t in tensors.values() if t.is_floating_point()})
        return reasons + self.op_reasons(inputs)


_warned: set = set()


def _warn_fallback(op: str, backend: str, reasons: list[str]) -> None:
    key = (op, backend, tuple(reasons))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"mmkernels: {op}: backend {backend!r} cannot run this call ("
                  + "; ".join(reasons) + "); running the eager reference instead",
                  RuntimeWarning, stacklevel=4)


@dataclass(frozen=True)
class Op:
    """An op and its implementations, one per backend (the reference always among them)."""

    name: str
    impls: tuple

    def __post_init__(self):
        assert {impl.backend for impl in self.impls} <= set(BACKENDS)
        assert any(impl.backend == "reference" for impl in self.impls)

    def impl(self, backend: str) -> Impl | None:
        return next((i for i in self.impls if i.backend == backend), None)

    def not_supported_reasons(self, backend: str, inputs: Mapping) -> list[str]:
        impl = self.impl(backend)
        if impl is None:
            return [f"{self.name} has no {backend} implementation"]
        return impl.not_supported_reasons(inputs)

    def select(self, backend, inputs: Mapping) -> str:
        """Resolve ``backend`` ("auto" or a name) for a call on ``inputs``."""
        if not isinstance(backend, str):
            raise TypeError(f"{self.name}: backend must be a str, one of "
                            f"{('auto',) + BACKENDS}, got {type(backend).__name__}")
        if backend == "auto" and _AUTO_OVERRIDE:
            backend = _AUTO_OVERRIDE[-1]
        if backend == "auto":
            on_cuda = any(t.device.type == "cuda" for t in _tensors(inputs).values())
            preferred = "triton" if on_cuda else "cpu"
            reasons = self.not_supported_reasons(preferred, inputs)
            if not reasons:
                return preferred
            if preferred == "cpu" and machine_reason("cpu") is not None:
                _cpp.warn_once()  # not built here: the one warning of _cpp
            else:
                _warn_fallback(self.name, preferred, reasons)
            return "reference"
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend must be 'auto' or one of {BACKENDS}, "
                             f"got {backend!r}")
        reasons = self.not_supported_reasons(backend, inputs)
        if reasons:
            usable = [b for b in BACKENDS if not self.not_supported_reasons(b, inputs)]
            raise BackendUnavailableError(
                f"{self.name}: backend {backend!r} cannot run this call: " + "; ".join(reasons)
                + f" (backends that can: {', '.join(usable) or 'none'})")
        return backend


# What "auto" means inside ``use_backend`` blocks (innermost last); empty: the normal choice.
_AUTO_OVERRIDE: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, every op called with ``backend="auto"`` (all modules' default) runs
    on ``name`` instead — e.g. a whole model on the eager ``"reference"`` to compare it with
    the fused run. A named backend that cannot run a call raises, as when passed directly."""
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"use_backend: name must be 'auto' or one of {BACKENDS}, got {name!r}")
    _AUTO_OVERRIDE.append(name)
    try:
        yield
    finally:
        _AUTO_OVERRIDE.pop()


def kernel_module(package: str, backend: str, triton_module: str):
    """The module of op family ``package`` that holds a fast backend's ``forward``/``backward``:
    ``cpu`` or ``triton_module``, imported on first use (importing mmkernels must not import
    triton)."""
    return importlib.import_module(f"{package}.{'cpu' if backend == 'cpu' else triton_module}")
