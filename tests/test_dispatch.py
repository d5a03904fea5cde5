"""Backend selection: what is available, what auto picks, and refusals that explain
themselves."""
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import _cpp, _dispatch
from mmkernels._dispatch import TRITON_DTYPES, Impl

OP = _dispatch.Op("op", (Impl("reference"), Impl("cpu"), Impl("triton", TRITON_DTYPES)))


def inputs(*tensors):
    return {f"x{i}": t for i, t in enumerate(tensors)}


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
    assert OP.select("auto", inputs(x, x)) == expected
    # float64 runs on the C++ path too (gradcheck needs it)
    assert OP.select("auto", inputs(x.double(), x.double())) == expected


def test_refusal_lists_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(mmkernels.BackendUnavailableError) as info:
        _dispatch.Op("infonce_loss", OP.impls).select("triton", inputs(x, x))
    msg = str(info.value)
    assert "infonce_loss" in msg and "float64" in msg and "TRITON_INTERPRET" in msg


def test_missing_extension_falls_back_and_warns_once(monkeypatch):
    monkeypatch.setattr(_cpp, "_state", {"module": None, "error": "not built (test)"})
    x = torch.randn(3, 2)
    with pytest.warns(RuntimeWarning, match="not built"):
        assert OP.select("auto", inputs(x, x)) == "reference"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OP.select("auto", inputs(x, x)) == "reference"
    with pytest.raises(mmkernels.BackendUnavailableError, match="not built"):
        OP.select("cpu", inputs(x, x))
    assert mmkernels.infonce_loss(x, x, 1.0).isfinite()


def test_import_is_light():
    """Importing mmkernels neither imports triton nor initialises CUDA."""
    code = ("import sys, torch, mmkernels; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)


class _HeadDimImpl(Impl):
    """An implementation with an op-specific limit, as attention backends have."""

    def op_reasons(self, inputs):
        d = inputs["q"].shape[-1]
        return [f"head dim {d} > 8 is not supported"] if d > 8 else []


HEAD_OP = _dispatch.Op("attn", (Impl("reference"), _HeadDimImpl("cpu"),
                               _HeadDimImpl("triton", TRITON_DTYPES)))


def test_every_input_is_checked():
    """Refusals look at every tensor input, not only the first, and name the argument."""
    x = torch.randn(3, 2)
    reasons = OP.not_supported_reasons("triton", {"a": x, "b": x.double()})
    assert any(r.startswith("b: dtype float64") for r in reasons)
    assert not any(r.startswith("a:") for r in reasons)


def test_op_specific_refusal_lists_all_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(mmkernels.BackendUnavailableError) as info:
        HEAD_OP.select("triton", {"q": q})
    msg = str(info.value)
    assert "attn" in msg and "head dim 16" in msg and "float64" in msg
    assert "TRITON_INTERPRET" in msg and "backends that can: reference" in msg


@pytest.mark.skipif("cpu" not in mmkernels.available_backends(), reason="needs the C++ build")
def test_auto_fallback_warns_once_with_the_reason():
    """auto never fails, but a fallback for a reason other than a missing build says why, once
    per op and reason."""
    import warnings
    q = torch.randn(2, 16)
    with pytest.warns(RuntimeWarning, match="attn: backend 'cpu' cannot run this call "
                                             r"\(head dim 16 > 8"):
        assert HEAD_OP.select("auto", {"q": q}) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HEAD_OP.select("auto", {"q": q}) == "reference"
        assert HEAD_OP.select("auto", {"q": torch.randn(2, 4)}) == "cpu"


@pytest.mark.parametrize("precision,dtype,words", [
    ("highest", torch.bfloat16, "bfloat16 needs compute capability 8.0"),
    ("high", torch.float32, "TF32"),
])
def test_old_gpus_refuse_bf16_and_tf32(monkeypatch, precision, dtype, words):
    """sm_70/75 cannot run bf16 or TF32 tensor-core code: refused with the reason, not a
    failed compile (checked without a GPU: the capability query is stubbed)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    reasons = _dispatch._device_reasons("triton", {torch.device("cuda", 0)}, {dtype})
    assert any(words in r and "sm_75" in r for r in reasons), reasons
    assert not _dispatch._device_reasons("triton", {torch.device("cuda", 0)}, {torch.float16})
