"""Backend selection shared by every op.

Each backend states what it supports (device, dtypes, what it needs installed); ``select``
returns the one to run or raises ``BackendUnavailableError`` listing, for each backend
considered, the reason it was refused (the xformers dispatch idea), so a failed request
explains itself instead of silently running something else.

Backends:
  reference  eager PyTorch, materializing. The oracle for tests and the fallback.
  cpu        the C++ extension ``mmkernels._C`` (csrc/cpu), CPU tensors.
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from . import _cpp

BACKENDS = ("reference", "cpu", "triton")
_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda() -> bool:
    # torch.cuda.is_available() does not create a CUDA context; it is only called on demand.
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Backend:
    name: str
    dtypes: tuple

    def machine_reason(self) -> str | None:
        """Why this backend cannot run anything on this machine, or None if it can."""
        if self.name == "cpu":
            return _cpp.error()
        if self.name == "triton":
            if importlib.util.find_spec("triton") is None:
                return "triton is not installed (pip install triton)"
            if not _cuda() and not _interpreter():
                return "no CUDA device, and TRITON_INTERPRET=1 is not set (set it before " \
                       "triton is imported to run Triton kernels on CPU)"
        return None

    def refusals(self, tensors) -> list[str]:
        """Every reason this backend cannot run a call on these tensors."""
        reasons = []
        machine = self.machine_reason()
        if machine:
            reasons.append(machine)
        for t in tensors:
            if t.dtype not in self.dtypes:
                names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                reasons.append(f"dtype {str(t.dtype).replace('torch.', '')} is not supported "
                               f"(supports {names})")
                break
        device = tensors[0].device.type if tensors else "cpu"
        if self.name == "cpu" and device != "cpu":
            reasons.append(f"the C++ kernels take CPU tensors, got {device} tensors")
        if self.name == "triton":
            if device == "cpu" and not _interpreter():
                reasons.append("CPU tensors need TRITON_INTERPRET=1 to run Triton kernels")
            elif device == "cpu" and tensors and tensors[0].dtype == torch.bfloat16:
                reasons.append("bfloat16 is silently wrong in the Triton interpreter")
            elif device not in ("cpu", "cuda"):
                reasons.append(f"Triton kernels take CUDA tensors, got {device} tensors")
        return reasons


REGISTRY = {
    "reference": Backend("reference", _ALL_FLOATS),
    # float64 runs natively in C++ so that torch.autograd.gradcheck can check the fast path.
    "cpu": Backend("cpu", _ALL_FLOATS),
    "triton": Backend("triton", (torch.float16, torch.bfloat16, torch.float32)),
}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [name for name in BACKENDS if REGISTRY[name].machine_reason() is None]


def unavailable_reasons() -> dict[str, str]:
    """For each backend that cannot run on this machine, why."""
    return {name: REGISTRY[name].machine_reason() for name in BACKENDS
            if REGISTRY[name].machine_reason() is not None}


def select(backend: str, tensors, op: str) -> str:
    """Resolve ``backend`` ("auto" or a name) for a call on ``tensors``.

    "auto" tries triton for CUDA tensors and cpu for CPU tensors, then the reference; it never
    fails. A named backend that cannot run raises BackendUnavailableError with the reasons.
    """
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, one of {('auto',) + BACKENDS}, "
                        f"got {type(backend).__name__}")
    if backend == "auto":
        device = tensors[0].device.type
        preferred = "triton" if device == "cuda" else "cpu"
        if not REGISTRY[preferred].refusals(tensors):
            return preferred
        if preferred == "cpu" and device == "cpu":
            _cpp.warn_once()
        return "reference"
    if backend not in REGISTRY:
        raise ValueError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reasons = REGISTRY[backend].refusals(tensors)
    if reasons:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run this call: "
                                      + "; ".join(reasons))
    return backend
