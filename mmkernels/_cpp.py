"""Loads the optional C++ extension ``mmkernels._C`` once.

The extension is optional (torchao does the same): a package installed with ``MMK_NO_CPP=1``,
or whose build failed, still imports and runs every op on the eager reference. We warn once,
at the first op that would have used it, not at import, so that ``import mmkernels`` stays quiet
and cheap.
"""
from __future__ import annotations

import importlib
import warnings

_state: dict = {}


def load():
    """Return the extension module, or None (and remember why) when it cannot be loaded."""
    if "module" not in _state:
        try:
            _state["module"] = importlib.import_module("mmkernels._C")
            _state["error"] = None
        except ImportError as exc:
            _state["module"] = None
            _state["error"] = f"the C++ extension mmkernels._C is not built ({exc}); " \
                              "reinstall with `pip install --no-build-isolation -e .` " \
                              "(and without MMK_NO_CPP=1)"
    return _state["module"]


def error() -> str | None:
    load()
    return _state["error"]


def warn_once() -> None:
    if load() is None and not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"mmkernels: {error()}; CPU ops fall back to the eager reference",
                      RuntimeWarning, stacklevel=3)
