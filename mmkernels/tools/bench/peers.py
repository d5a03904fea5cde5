"""The implementations mmkernels is compared with, loaded the same way by every family and by
the tests: torch.compile of an eager formula, and the other libraries' own modules."""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

# The torch.compile peer's implementation name: it compiles in its first call, so the harness
# warms it at the case's own shape and reports a failed compile as a skip.
COMPILE = "compile"


class PeerUnavailable(Exception):
    """This peer cannot run here; the message says why (reported, never fatal)."""


def compiled(eager: Callable) -> Callable:
    # Static shapes: each worker sees one shape, and the warm-up call compiles it.
    return torch.compile(eager, dynamic=False)


@functools.cache
def load_open_clip_loss():
    """open_clip's ``loss`` module (ClipLoss, SigLipLoss); ``PeerUnavailable`` says why not.

    ``import open_clip`` runs the package ``__init__``, which imports the models and
    torchvision (and fails when torchvision does not match torch, e.g. beside a CPU-only
    torch). ``loss.py`` only needs torch, so it is loaded on its own; ``find_spec`` locates
    the package without executing it.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable("open_clip is not installed (pip install open_clip_torch)")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    try:
        loss_spec = importlib.util.spec_from_file_location("_mmk_open_clip_loss", path)
        module = importlib.util.module_from_spec(loss_spec)
        loss_spec.loader.exec_module(module)
    except Exception as exc:  # any failure only means this peer is left out, with the reason
        raise PeerUnavailable(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    return module
