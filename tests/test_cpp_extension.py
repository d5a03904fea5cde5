"""Loading of the optional C++ extension mmkernels._C (mmkernels/_cpp.py).

The extension records the torch version it was compiled against (csrc/common/build_info.cpp);
_cpp reads it from the file before loading and refuses any other torch. The refusal is tested
on fake library files, so nothing needs rebuilding; the real build must load and match.
"""
import os
import subprocess
import sys
import textwrap
from importlib.machinery import EXTENSION_SUFFIXES

import pytest
import torch

import mmkernels
from mmkernels import _cpp

RUNNING = str(torch.__version__)


def fake_library(tmp_path, marker_version=None, name="_C.so"):
    """Bytes that look enough like a shared library, with or without the version marker."""
    path = tmp_path / name
    data = b"\x7fELF\x02\x01\x01" + os.urandom(4096).replace(b"MMK", b"mmk")
    if marker_version is not None:
        data += _cpp.BUILD_MARKER + marker_version.encode() + b"\0"
    data += os.urandom(4096).replace(b"MMK", b"mmk")
    path.write_bytes(data)
    return str(path)


def test_read_build_version(tmp_path):
    assert _cpp.read_build_version(fake_library(tmp_path, "2.99.0+cu999")) == "2.99.0+cu999"
    assert _cpp.read_build_version(fake_library(tmp_path, None, "none.so")) is None
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    assert _cpp.read_build_version(str(empty)) is None
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(b"junk" + _cpp.BUILD_MARKER + b"2.13")  # no terminating NUL
    assert _cpp.read_build_version(str(truncated)) is None


def test_check_build_accepts_same_version(tmp_path):
    assert _cpp.check_build(fake_library(tmp_path, RUNNING)) == (RUNNING, None)


def test_check_build_refuses_other_version(tmp_path):
    built, err = _cpp.check_build(fake_library(tmp_path, "2.99.0+cu999"), running="2.13.0+cpu")
    assert built == "2.99.0+cu999"
    assert "built against torch 2.99.0+cu999 but torch 2.13.0+cpu is running" in err
    assert "pip install --no-build-isolation -e ." in err


def test_check_build_refuses_unmarked_library(tmp_path):
    built, err = _cpp.check_build(fake_library(tmp_path, None))
    assert built is None
    assert "does not record the torch version" in err and "pip install" in err


def test_check_build_unreadable(tmp_path):
    built, err = _cpp.check_build(str(tmp_path / "missing.so"))
    assert built is None and "cannot be read" in err


def _never_dlopen(path):
    raise AssertionError(f"torch.ops.load_library called on a refused library: {path}")


@pytest.mark.parametrize("marker", ["0.0.1+mismatch", None], ids=["other-torch", "no-marker"])
def test_load_refuses_without_dlopen(tmp_path, monkeypatch, marker):
    path = fake_library(tmp_path, marker)
    monkeypatch.setattr(_cpp, "_state", {})
    monkeypatch.setattr(_cpp, "_find_library", lambda: path)
    monkeypatch.setattr(torch.ops, "load_library", _never_dlopen)
    assert _cpp.load() is None
    assert _cpp.built_torch_version() == marker
    assert _cpp.library_path() == path
    if marker is None:
        assert "does not record" in _cpp.error()
    else:
        assert f"built against torch {marker} but torch {RUNNING} is running" in _cpp.error()
    with pytest.warns(RuntimeWarning, match="fall back to the eager reference"):
        _cpp.warn_once()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cpp.warn_once()  # only once


def test_load_without_library(monkeypatch):
    monkeypatch.setattr(_cpp, "_state", {})
    monkeypatch.setattr(_cpp, "_find_library", lambda: None)
    assert _cpp.load() is None
    assert "not built" in _cpp.error() and "pip install --no-build-isolation -e ." in _cpp.error()
    assert _cpp.built_torch_version() is None and _cpp.library_path() is None


def test_load_is_cached(monkeypatch):
    first = _cpp.load()

    def boom():
        raise AssertionError("load() searched again after its first call")

    monkeypatch.setattr(_cpp, "_load_uncached", boom)
    monkeypatch.setattr(_cpp, "_find_library", boom)
    for _ in range(3):
        assert _cpp.load() is first
        _cpp.error()
        _cpp.built_torch_version()


def test_missing_extension_imports_quietly():
    """Without the library, importing the package and the C++ op wrappers neither fails nor
    warns; the fakes are not registered (the ops do not exist)."""
    code = textwrap.dedent("""
        import importlib.util, warnings
        warnings.simplefilter("error")
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "mmkernels._C" else real(name, *a)
        import torch
        import mmkernels
        from mmkernels import _cpp
        from mmkernels.contrastive import cpu
        assert _cpp.load() is None and "not built" in _cpp.error(), _cpp.error()
        assert cpu.register_fakes() is False
        assert not hasattr(torch.ops.mmkernels, "siglip_pass")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# The real build
# ---------------------------------------------------------------------------------------

needs_build = pytest.mark.skipif(_cpp.library_path() is None,
                                 reason=f"C++ extension not built: {_cpp.error()}")


@needs_build
def test_real_extension_loads_and_matches_torch():
    assert _cpp.load() is not None, _cpp.error()
    assert _cpp.error() is None
    assert _cpp.built_torch_version() == RUNNING
    assert _cpp.read_build_version(_cpp.library_path()) == RUNNING


@needs_build
def test_real_extension_is_found_by_find_spec():
    """setuptools' CppExtension naming (_C.<EXT_SUFFIX>) is what importlib finds, inside the
    package."""
    path = _cpp.library_path()
    assert os.path.dirname(path) == os.path.dirname(mmkernels.__file__)
    assert any(os.path.basename(path) == "_C" + suffix for suffix in EXTENSION_SUFFIXES), path


@needs_build
def test_real_extension_registers_contrastive_ops():
    _cpp.load()
    for name in ("infonce_lse", "infonce_grad", "siglip_pass"):
        op = getattr(torch.ops.mmkernels, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
