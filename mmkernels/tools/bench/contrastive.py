"""The contrastive losses' family: InfoNCE (CLIP) and SigLIP against the implementations
users replace.

Implementations ("peers"):
  eager       the open_clip formula written out: logits = s·I·Tᵀ (+b), then the cross-entropies
              (InfoNCE) or −Σ logsigmoid(labels·logits)/B (SigLIP)
  open_clip   open_clip's own ClipLoss / SigLipLoss, loaded from open_clip/loss.py alone
  compile     torch.compile of the eager formula (compilation happens in the warm-up)
  mmkernels   the fused op with backend="auto", labelled with the backend it resolves to

Every call takes (image, text, logit_scale, logit_bias): unit-norm (B, D) features, and the
features, logit_scale and logit_bias require grad.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mmkernels

from . import peers
from .harness import DTYPES

IMPLS = ("eager", "open_clip", peers.COMPILE, "mmkernels")
# The eager formula materializes the B×B logits; these hold about four B×B fp32 matrices at
# their peak (logits, the softmax/logsigmoid output, and its gradient pair in backward).
MATERIALIZING_MATRICES = 4


@dataclass(frozen=True)
class Case:
    B: int
    D: int
    dtype: str

    def __str__(self) -> str:
        return f"B={self.B}-D={self.D}-{self.dtype}"

    def aligned(self) -> str:
        return f"B={self.B:<6} D={self.D:<4} {self.dtype}"


@dataclass(frozen=True)
class Group:
    sizes: tuple
    D: int
    impls: tuple


DEFAULT_D = 512
QUICK_SIZES = (256, 1024, 2048)
# The pytest-benchmark cases (benchmarks/test_bench.py): a few ms each.
SMOKE_CASES = (Case(256, 512, "fp32"),)
# Full runs. The large-B groups are the memory cases: only the fused op can hold them.
FULL = {
    ("infonce", "cpu"): (Group((1024, 4096, 8192, 16384, 32768), 512, IMPLS),
                         Group((65536, 131072), 256, ("mmkernels",))),
    ("siglip", "cpu"): (Group((1024, 4096, 8192, 16384), 512, IMPLS),),
    ("infonce", "cuda"): (Group((1024, 4096, 16384, 32768, 65536), 512, IMPLS),
                          Group((131072, 262144), 512, ("mmkernels",))),
    ("siglip", "cuda"): (Group((1024, 4096, 16384, 32768, 65536), 512, IMPLS),
                         Group((131072, 262144), 512, ("mmkernels",))),
}
# The warm-up batch: big enough to start every library and thread pool, small enough to cost
# nothing next to the case.
WARMUP_B = 64


def eager_infonce(image, text, scale, bias=None):
    """open_clip's ClipLoss formula, with the text-side logits taken as a transpose."""
    logits = scale * image @ text.T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_siglip(image, text, scale, bias):
    """open_clip's SigLipLoss formula: labels +1 on the diagonal, −1 elsewhere."""
    logits = scale * image @ text.T + bias
    b = logits.shape[0]
    labels = 2 * torch.eye(b, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / b


def fused_infonce(image, text, scale, bias=None):
    return mmkernels.infonce_loss(image, text, scale, bias)


def fused_siglip(image, text, scale, bias):
    return mmkernels.siglip_loss(image, text, scale, bias)


@dataclass(frozen=True)
class Loss:
    """One contrastive loss, as ``family.BenchOp``."""

    name: str
    title: str
    module: str               # the public op's module, whose DISPATCH resolves backends
    flops_per_b2d: int        # nominal FLOPs / (B²·D) of the fused O(B)-memory algorithm
    flops_note: str
    bias: float | None        # logit_bias of the benchmark inputs (None: no bias)
    eager: Callable
    fused: Callable
    open_clip_class: str

    case_type = Case
    impls = IMPLS
    quick_help = f"B in {QUICK_SIZES} at D={DEFAULT_D}"
    sizes_help = f"batch sizes to run instead of the default list (D={DEFAULT_D})"
    warmup = f"a B={WARMUP_B} warm-up"
    x_field, x_label = "B", "batch size B"
    smoke_cases = SMOKE_CASES

    @property
    def step(self) -> str:
        bias = " and logit_bias" if self.bias is not None else ""
        return f"`loss.backward()` with the features, logit_scale{bias} requiring grad"

    @property
    def flops_formula(self) -> str:
        return f"{self.flops_per_b2d}·B²·D"

    @property
    def flops_basis(self) -> str:
        return (f"the minimum work of the fused O(B)-memory algorithm ({self.flops_note}). "
                "Materializing implementations do less arithmetic but hold B×B matrices, so "
                "this column compares times on one scale")

    def flops(self, case: Case) -> int:
        return self.flops_per_b2d * case.B ** 2 * case.D

    def plan(self, device: str, quick: bool, sizes, dtypes, impls) -> list[tuple[Case, tuple]]:
        """(case, implementations) in run order: every peer of a case together, eager first."""
        if sizes:
            groups = (Group(tuple(sizes), DEFAULT_D, IMPLS),)
        elif quick:
            groups = (Group(QUICK_SIZES, DEFAULT_D, IMPLS),)
        else:
            groups = FULL[(self.name, device)]
        return [(Case(b, g.D, dt), tuple(i for i in g.impls if i in impls))
                for g in groups for dt in dtypes for b in g.sizes]

    def build(self, impl: str) -> Callable:
        """The callable ``fn(image, text, logit_scale, logit_bias) -> loss`` of one peer."""
        if impl == "eager":
            return self.eager
        if impl == "mmkernels":
            return self.fused
        if impl == peers.COMPILE:
            return peers.compiled(self.eager)
        if impl == "open_clip":
            # ClipLoss and SigLipLoss both take (image, text, logit_scale, logit_bias).
            return getattr(peers.load_open_clip_loss(), self.open_clip_class)()
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")

    def make_inputs(self, case: Case, device: str, seed: int = 0):
        """(image, text, logit_scale, logit_bias): unit-norm features and CLIP's initial scale
        1/0.07, all leaves requiring grad (logit_bias is None for InfoNCE)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = DTYPES[case.dtype]

        def features():
            x = torch.randn(case.B, case.D, device=device, generator=gen)
            return F.normalize(x, dim=-1).to(dtype).requires_grad_()

        image, text = features(), features()
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        bias = None if self.bias is None else \
            torch.tensor(self.bias, device=device, requires_grad=True)
        return image, text, scale, bias

    def small_case(self, case: Case) -> Case:
        return Case(min(case.B, WARMUP_B), case.D, case.dtype)

    def resolved_backend(self, dtype: str, device: str) -> str:
        # Imported here: the op modules' dispatch tables are only needed to resolve.
        dispatch = importlib.import_module(self.module).DISPATCH
        probe = torch.empty(1, 1, dtype=DTYPES[dtype], device=device)
        with warnings.catch_warnings():
            # The fallback warning is the dispatcher's business at call time; here we only ask.
            warnings.simplefilter("ignore")
            return dispatch.select("auto", {"image_features": probe, "text_features": probe})

    def estimate_bytes(self, impl: str, backend: str | None, case: Case) -> int:
        """The B×B matrices of a materializing implementation, plus features, their grads and
        O(B·D) temporaries (about 8 B×D fp32 arrays)."""
        b, d = case.B, case.D
        linear = 8 * b * d * 4
        materializes = impl != "mmkernels" or backend == "reference"
        return linear + (MATERIALIZING_MATRICES * b * b * 4 if materializes else 0)


OPS = {
    "infonce": Loss("infonce", "InfoNCE (CLIP)", "mmkernels.contrastive.infonce", 8,
                    "forward LSE pass 2·B²·D + backward recompute, dI and dT 2·B²·D each",
                    None, eager_infonce, fused_infonce, "ClipLoss"),
    "siglip": Loss("siglip", "SigLIP", "mmkernels.contrastive.siglip", 6,
                   "one pass emitting the loss and both gradients: logits, dI and dT 2·B²·D "
                   "each",
                   # SigLIP's initialisation: t' = log 10 and b = −10.
                   -10.0, eager_siglip, fused_siglip, "SigLipLoss"),
}
