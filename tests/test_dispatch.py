"""Backend selection: what is available, what auto picks, and refusals that explain
themselves."""
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import _cpp, _dispatch


def test_available_backends_are_explained():
    names = mmkernels.available_backends()
    reasons = mmkernels.unavailable_reasons()
    assert "reference" in names
    assert set(names) | set(reasons) == {"reference", "cpu", "triton"}
    assert not set(names) & set(reasons)
    assert all(isinstance(r, str) and r for r in reasons.values())


def test_auto_picks_cpu_for_cpu_tensors():
    x = torch.randn(3, 2)
    expected = "cpu" if "cpu" in mmkernels.available_backends() else "reference"
    assert _dispatch.select("auto", (x, x), "op") == expected
    # float64 runs on the C++ path too (gradcheck needs it)
    assert _dispatch.select("auto", (x.double(), x.double()), "op") == expected


def test_refusal_lists_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(mmkernels.BackendUnavailableError) as info:
        _dispatch.select("triton", (x, x), "infonce_loss")
    msg = str(info.value)
    assert "infonce_loss" in msg and "float64" in msg and "TRITON_INTERPRET" in msg


def test_missing_extension_falls_back_and_warns_once(monkeypatch):
    monkeypatch.setattr(_cpp, "_state", {"module": None, "error": "not built (test)"})
    x = torch.randn(3, 2)
    with pytest.warns(RuntimeWarning, match="not built"):
        assert _dispatch.select("auto", (x, x), "op") == "reference"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select("auto", (x, x), "op") == "reference"
    with pytest.raises(mmkernels.BackendUnavailableError, match="not built"):
        _dispatch.select("cpu", (x, x), "op")
    assert mmkernels.infonce_loss(x, x, 1.0).isfinite()


def test_import_is_light():
    """Importing mmkernels neither imports triton nor initialises CUDA."""
    code = ("import sys, torch, mmkernels; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)
