"""Loads the optional C++ extension ``mmkernels._C`` once.

The extension is a plain shared library of torch.library registrations (as in torchao): each
op family's C++ file adds its ops to the ``mmkernels`` namespace with
``TORCH_LIBRARY_FRAGMENT`` / ``TORCH_LIBRARY_IMPL``, and loading the library with
``torch.ops.load_library`` makes them callable as ``torch.ops.mmkernels.<op>``. It is not a
Python module (it has no ``PyInit__C``); ``importlib.util.find_spec`` only locates the file.

It is optional: a package installed with ``MMK_NO_CPP=1``, or whose build failed, still imports
and runs every op on the eager reference. We warn once, at the first op that would have used
it, not at import, so that ``import mmkernels`` stays quiet and cheap.

A library compiled against one torch must never be loaded under another (libtorch has no
stable C++ ABI: at best the load fails on a missing symbol, at worst the kernels run on
mismatched structures). ``setup.py`` compiles the torch version into the library
(``csrc/common/build_info.cpp``, a string ``MMK_BUILT_WITH_TORCH=<version>``), and ``load()``
reads it from the file's bytes, without loading it, and refuses any version other than the
running ``torch.__version__``.

``load()`` does the work on its first call only (``import mmkernels`` makes that call); every
later call returns the cached result, so it is safe to call while torch.compile traces.
"""
from __future__ import annotations

import mmap
import warnings

import torch

#: Bytes that precede the torch version in the library (csrc/common/build_info.cpp).
BUILD_MARKER = b"MMK_BUILT_WITH_TORCH="
_REBUILD = "rebuild with `pip install --no-build-isolation -e .` (and without MMK_NO_CPP=1)"

# module: torch.ops.mmkernels once loaded, else None; error: why not (None when loaded);
# path: the library file found (or None); built_torch: the torch version recorded in it;
# warned: whether warn_once() has warned.
_state: dict = {}


def read_build_version(path: str) -> str | None:
    """The torch version recorded in the library at ``path``, or None when it has none.

    Reads the file (memory-mapped, so only the pages up to the marker are touched); never loads
    it. Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            return None
        with data:
            start = data.find(BUILD_MARKER)
            if start < 0:
                return None
            start += len(BUILD_MARKER)
            end = data.find(b"\0", start, start + 256)
            if end < 0:
                return None
            return data[start:end].decode("ascii", errors="replace")


def check_build(path: str, running: str | None = None) -> tuple[str | None, str | None]:
    """Compare the library at ``path`` with the running torch (or ``running``).

    Returns (built_version, error): error is None when the library may be loaded, else the
    reason it must not be. built_version is the recorded version (None if there is none).
    """
    running = str(torch.__version__) if running is None else str(running)
    try:
        built = read_build_version(path)
    except OSError as exc:
        return None, f"mmkernels._C cannot be read ({exc}); {_REBUILD}"
    if built is None:
        return None, (f"mmkernels._C ({path}) does not record the torch version it was built "
                      f"against (built by an older mmkernels?); {_REBUILD}")
    if built != running:
        return built, (f"mmkernels._C was built against torch {built} but torch {running} "
                       f"is running; {_REBUILD}")
    return built, None


def _find_library() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("mmkernels._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.has_location:
        return None
    return spec.origin


def _load_uncached() -> dict:
    state = {"module": None, "error": None, "path": None, "built_torch": None}
    path = _find_library()
    if path is None:
        state["error"] = f"the C++ extension mmkernels._C is not built; {_REBUILD}"
        return state
    state["path"] = path
    built, err = check_build(path)
    state["built_torch"] = built
    if err is not None:
        state["error"] = err
        return state
    try:
        torch.ops.load_library(path)
    except Exception as exc:  # noqa: BLE001 - OSError from dlopen, RuntimeError from a registration
        state["error"] = f"loading mmkernels._C ({path}) failed ({exc}); {_REBUILD}"
        return state
    state["module"] = torch.ops.mmkernels
    return state


def load():
    """``torch.ops.mmkernels`` once the extension is loaded, else None (error() says why).

    The first call finds, checks and loads the library; later calls only return that result.
    """
    state = _state
    if "module" not in state:
        state.update(_load_uncached())
    return state["module"]


def error() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    load()
    return _state["error"]


def built_torch_version() -> str | None:
    """The torch version the extension found here was built against (None: no extension,
    or one that records none). Set even when a mismatch kept it from loading."""
    load()
    return _state.get("built_torch")


def library_path() -> str | None:
    """The path of the extension's shared library, when one was found."""
    load()
    return _state.get("path")


def warn_once() -> None:
    """One RuntimeWarning, the first time an op would have used the missing extension."""
    if load() is None and not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"mmkernels: {error()}; CPU ops fall back to the eager reference",
                      RuntimeWarning, stacklevel=3)


_faked: set = set()


def register_fakes(fakes: dict) -> bool:
    """Register the fake (meta) implementations of C++ ops (``"mmkernels::name": fn``), each
    once, so that torch.compile and opcheck can trace them; True when they are registered.
    Does nothing (False) when the extension is not loaded: the ops do not exist then.

    Called from the module each op names with ``m.set_python_module`` (its ``cpu.py``):
    torch checks that the fake is registered from there, so the registration is attributed
    to our caller's frame (``_stacklevel=2``)."""
    if load() is None:
        return False
    for name, fn in fakes.items():
        if name not in _faked:
            torch.library.register_fake(name, fn, _stacklevel=2)
            _faked.add(name)
    return True
