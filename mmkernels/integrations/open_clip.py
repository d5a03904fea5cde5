"""Make open_clip train with mmkernels' fused contrastive losses.

    import mmkernels.integrations.open_clip as mmk_open_clip
    mmk_open_clip.patch()            # before open_clip.create_loss(args) is called
    loss = open_clip.create_loss(args)   # an mmkernels ClipLoss / SigLipLoss

``open_clip.factory`` imported ``ClipLoss`` and ``SigLipLoss`` by name, so replacing them in
``open_clip.loss`` alone would not reach ``create_loss``: ``patch`` rebinds the names where the
factory and the package look them up. Distillation and CoCa losses are left to open_clip (they
subclass its ClipLoss). ``unpatch`` restores open_clip's classes.
"""
from __future__ import annotations

import importlib

from .. import nn

_NAMES = ("ClipLoss", "SigLipLoss")
_MODULES = ("open_clip.factory", "open_clip.loss", "open_clip")
_saved: dict = {}


def patch() -> None:
    """Route open_clip's ClipLoss and SigLipLoss (and so ``open_clip.create_loss``) to
    ``mmkernels.nn``. Idempotent. Raises ImportError when open_clip cannot be imported."""
    modules = [importlib.import_module(name) for name in _MODULES]
    for module in modules:
        for name in _NAMES:
            current = getattr(module, name, None)
            if current is None or current is getattr(nn, name):
                continue
            _saved.setdefault((module.__name__, name), current)
            setattr(module, name, getattr(nn, name))


def unpatch() -> None:
    """Put open_clip's own classes back."""
    for (module_name, name), original in _saved.items():
        setattr(importlib.import_module(module_name), name, original)
    _saved.clear()
