"""Which backends the parity tests run on, with the skip reason when one cannot run here."""
import os

import pytest
import torch

import mmkernels


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fast_backends():
    """pytest params for the non-reference backends, marked and skipped as appropriate."""
    params = []
    reasons = mmkernels.unavailable_reasons()
    for name in ("cpu", "triton"):
        marks = []
        if name == "triton" and device() == "cpu":
            marks.append(pytest.mark.interpreter)
        if name in reasons:
            marks.append(pytest.mark.skip(reason=reasons[name]))
        elif name == "cpu" and device() == "cuda":
            marks.append(pytest.mark.skip(reason="C++ backend tests run on CPU machines"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def all_backends():
    return [pytest.param("reference", id="reference")] + fast_backends()


def interpreted(backend: str) -> bool:
    """Triton on CPU: the interpreter is slow, so tests keep its shapes small."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
