"""``mmkernels.integrations.open_clip.patch()``: open_clip's own factory builds our losses.

The patch mechanics are checked here against stand-in modules shaped like open_clip's (the
factory imported the loss classes by name); the real ``open_clip.create_loss`` runs in the
peers environment (``bash .ci/peers-env``: open_clip needs torchvision, which needs another
torch than the pinned one), and that test skips with the reason when it is absent.
"""
import os
import subprocess
import sys
import textwrap
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels.integrations import open_clip as integration

ROOT = Path(__file__).resolve().parents[2]


class _TheirClipLoss:  # stand-ins: only the identity of the classes matters here
    pass


class _TheirSigLipLoss:
    pass


def _fake_open_clip(monkeypatch):
    loss = types.ModuleType("open_clip.loss")
    loss.ClipLoss, loss.SigLipLoss = _TheirClipLoss, _TheirSigLipLoss
    factory = types.ModuleType("open_clip.factory")
    factory.ClipLoss, factory.SigLipLoss = _TheirClipLoss, _TheirSigLipLoss

    def create_loss(args):  # looks the names up in its own module, as open_clip's does
        if args.siglip:
            return factory.SigLipLoss()
        return factory.ClipLoss()

    factory.create_loss = create_loss
    package = types.ModuleType("open_clip")
    package.ClipLoss, package.create_loss = _TheirClipLoss, create_loss
    package.loss, package.factory = loss, factory
    for name, module in (("open_clip", package), ("open_clip.loss", loss),
                         ("open_clip.factory", factory)):
        monkeypatch.setitem(sys.modules, name, module)
    return package


def test_patch_reaches_the_factory_and_unpatch_restores(monkeypatch):
    package = _fake_open_clip(monkeypatch)
    integration.patch()
    integration.patch()  # idempotent
    try:
        assert package.create_loss(Namespace(siglip=False)).__class__ is mmkernels.nn.ClipLoss
        assert package.create_loss(Namespace(siglip=True)).__class__ is mmkernels.nn.SigLipLoss
        assert package.ClipLoss is mmkernels.nn.ClipLoss
        assert package.loss.SigLipLoss is mmkernels.nn.SigLipLoss
    finally:
        integration.unpatch()
    assert package.factory.ClipLoss is _TheirClipLoss and package.ClipLoss is _TheirClipLoss
    assert isinstance(package.create_loss(Namespace(siglip=True)), _TheirSigLipLoss)


_REAL = textwrap.dedent("""
    import argparse, torch, open_clip, mmkernels
    from mmkernels.integrations import open_clip as integration
    args = argparse.Namespace(distill=False, model="ViT-B-32", siglip=False, local_loss=False,
                              gather_with_grad=False, rank=0, world_size=1, horovod=False,
                              loss_dist_impl=None)
    theirs = open_clip.create_loss(args)
    integration.patch()
    ours = open_clip.create_loss(args)
    assert isinstance(ours, mmkernels.nn.ClipLoss), type(ours)
    args.siglip = True
    assert isinstance(open_clip.create_loss(args), mmkernels.nn.SigLipLoss)
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(33, 16, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(33, 16, dtype=torch.float64), dim=-1)
    a, b = ours(image, text, 14.0), theirs(image, text, 14.0)
    assert abs(a - b) < 1e-12, (a, b)
    print("ok")
""")


def test_real_open_clip_factory():
    python = os.environ.get("MMK_PEERS_PYTHON", str(ROOT / ".venv-peers" / "bin" / "python"))
    if not Path(python).exists():
        pytest.skip(f"no peers environment ({python}); create it with `bash .ci/peers-env`")
    run = subprocess.run([python, "-c", _REAL], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
