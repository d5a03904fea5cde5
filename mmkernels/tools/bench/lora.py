"""The LoRA family: a linear layer with LoRA adapters (frozen base) against what users run.

Scenarios (the ``scenario`` field of a case):
  single  one adapter, T tokens, in → out, rank r, dropout p (issue 9 (a))
  mixed   N adapters, each row's adapter drawn at random (issue 9 (b))
  infer   N adapters mixed per row, forward only, dropout off, few tokens (issue 9 (c))

Implementations:
  linear     the frozen nn.Linear alone (F.linear): the floor, and what serving one adapter
             merged into W costs
  eager      PEFT's formula: base(x) + s·B(A(dropout(x))); with many adapters PEFT's mixed
             batch (``_mixed_batch_forward``): a loop over the adapters gathering their rows
  compile    torch.compile of that formula
  peft       PEFT's own ``lora.Linear`` (its ``adapter_names=`` path for mixed batches),
             when PEFT is installed
  mmkernels  mmkernels.lora_linear, backend="auto"

Every implementation gets x requiring grad in fwd+bwd rows (the layer sits inside a network),
the adapters requiring grad, W and b frozen.

Work (GFLOP/s): the LoRA layer's nominal work, 2·T·in·out + 2·T·r·(in + out) forward and,
with the frozen base, 2·T·in·out + 4·T·r·(in + out) backward (dx through W; du, dB, dA and
the adapter's part of dx). The linear floor does less (no adapter) and is scored on the same
count, so its rate is the ceiling the fused layer aims at.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mmkernels

from . import peers
from .harness import DTYPES

IMPLS = ("linear", "eager", peers.COMPILE, "peft", "mmkernels")


@dataclass(frozen=True)
class Case:
    scenario: str
    mode: str       # "fwd" or "fwd+bwd"
    T: int
    d_in: int
    d_out: int
    r: int
    N: int          # adapters
    dropout: float
    dtype: str

    def __str__(self) -> str:
        return f"{self.scenario}-{self.mode}-T={self.T}-N={self.N}-{self.dtype}"

    def aligned(self) -> str:
        return (f"{self.scenario:<6} {self.mode:<7} T={self.T:<5} {self.d_in}→{self.d_out} "
                f"r={self.r} N={self.N} p={self.dropout} {self.dtype}")


def _adapter_ids(case: Case, device) -> torch.Tensor | None:
    """Each row's adapter, fixed by the case (not by the inputs' seed)."""
    if case.scenario == "single":
        return None
    gen = torch.Generator().manual_seed(3000 + case.T + case.N)
    return torch.randint(0, case.N, (case.T,), generator=gen).to(device)


def _formula(x, W, b, A, B, s, ids, names, layer, p):
    """PEFT's formula, eager; many adapters as PEFT's mixed batch (gather, compute, scatter)."""
    y = F.linear(x, W, b)
    if ids is None:
        return (y + s * (F.dropout(x, p) @ A.T @ B.T)).sum()
    for n in range(A.shape[0]):
        rows = (ids == n).nonzero()[:, 0]
        y = y.index_add(0, rows, s * (F.dropout(x[rows], p) @ A[n].T @ B[n].T))
    return y.sum()


def _linear(x, W, b, A, B, s, ids, names, layer, p):
    return F.linear(x, W, b).sum()


def _fused(x, W, b, A, B, s, ids, names, layer, p):
    return mmkernels.lora_linear(x, W, b, A, B, s, dropout_p=p, adapter_ids=ids).sum()


def _peft(x, W, b, A, B, s, ids, names, layer, p):
    if layer is None:
        raise peers.PeerUnavailable("PEFT is not installed (pip install -c constraints.txt peft)")
    if names is None:
        return layer(x).sum()
    # PEFT's mixed-batch path; its model-level hook refuses training mode, the layer's own
    # method runs (and differentiates) the same code.
    return layer._mixed_batch_forward(x, adapter_names=names).sum()


@functools.cache
def _peft_module():
    try:
        import peft
    except ImportError:
        return None
    return peft


def _peft_layer(W, b, A, B, s, p, r):
    """PEFT's lora.Linear around a copy of (W, b) with the adapters "a0".."a{N-1}" holding
    copies of A, B (trainable), or None without PEFT."""
    peft = _peft_module()
    if peft is None:
        return None
    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device,
                           dtype=W.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(torch.nn.Sequential(base), peft.LoraConfig(
            r=r, lora_alpha=s * r, lora_dropout=p, target_modules=["0"]), adapter_name="a0")
        A3, B3 = (A, B) if A.dim() == 3 else (A[None], B[None])
        for n in range(1, A3.shape[0]):
            model.add_adapter(f"a{n}", peft.LoraConfig(r=r, lora_alpha=s * r, lora_dropout=p,
                                                       target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        if b is not None:
            layer.base_layer.bias.copy_(b)
        for n in range(A3.shape[0]):
            layer.lora_A[f"a{n}"].weight.copy_(A3[n])
            layer.lora_B[f"a{n}"].weight.copy_(B3[n])
            layer.lora_A[f"a{n}"].weight.requires_grad_(A.requires_grad)
            layer.lora_B[f"a{n}"].weight.requires_grad_(A.requires_grad)
    layer.base_layer.weight.requires_grad_(False)
    if b is not None:
        layer.base_layer.bias.requires_grad_(False)
    return layer.to(W.dtype)


@dataclass(frozen=True)
class LoRA:
    """LoRA linear layers, as ``family.BenchOp``."""

    name = "lora"
    title = "LoRA linear layer (frozen base)"
    case_type = Case
    impls = IMPLS
    quick_help = "lora: the single and mixed training cases at T=2048/1024 and T=16 inference"
    sizes_help = "lora: inference token counts T to run instead of the default list"
    warmup = "a T=64 warm-up at the case's dims"
    step = ("the layer on fp32 (T, in) x, `.sum().backward()` with x, A and B requiring grad "
            "(W, b frozen) for fwd+bwd rows, no grad for fwd rows")
    flops_formula = "2·T·in·out + 2·T·r·(in+out) (+ 2·T·in·out + 4·T·r·(in+out) backward)"
    flops_note = "the base GEMM and the adapter's shrink/expand; frozen base: no dW"
    flops_basis = ("the LoRA layer's work, for every implementation: the frozen Linear alone does "
                   "less, so its rate is the ceiling the fused layer aims at")
    x_field = x_label = None
    floors = ("linear",)
    # Dropout off: the smoke tests check each implementation's value against eager's, and
    # dropout masks differ between implementations.
    smoke_cases = (Case("single", "fwd+bwd", 33, 40, 24, 4, 1, 0.0, "fp32"),
                   Case("mixed", "fwd+bwd", 40, 40, 24, 4, 3, 0.0, "fp32"),
                   Case("infer", "fwd", 5, 40, 24, 4, 3, 0.0, "fp32"))

    def flops(self, case: Case) -> int:
        base, adapter = 2 * case.T * case.d_in * case.d_out, \
            2 * case.T * case.r * (case.d_in + case.d_out)
        return 2 * base + 3 * adapter if case.mode == "fwd+bwd" else base + adapter

    def plan(self, device: str, quick: bool, sizes, dtypes, impls) -> list[tuple]:
        d, r = 1024, 16
        cases = []
        for mode in ("fwd", "fwd+bwd"):
            cases.append(("single", mode, 2048 if quick else 8192, 1, 0.05))
            cases.append(("mixed", mode, 1024 if quick else 4096, 8, 0.05))
        infer = sizes or ((16,) if quick else (1, 16, 256))
        cases += [("infer", "fwd", t, 8, 0.0) for t in infer]
        chosen = tuple(i for i in IMPLS if i in impls)
        return [(Case(s, mode, t, d, d, r, n, p, dt), chosen)
                for s, mode, t, n, p in cases for dt in dtypes]

    def build(self, impl: str) -> Callable:
        if impl == "mmkernels":
            return _fused
        if impl == "eager":
            return _formula
        if impl == peers.COMPILE:
            return peers.compiled(_formula)
        if impl == "linear":
            return _linear
        if impl == "peft":
            if _peft_module() is None:
                raise peers.PeerUnavailable("PEFT is not installed "
                                            "(pip install -c constraints.txt peft)")
            return _peft
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")

    def make_inputs(self, case: Case, device: str, seed: int = 0) -> tuple:
        """(x, W, b, A, B, scaling, ids, names, peft_layer, dropout_p)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = DTYPES[case.dtype]
        grad = case.mode == "fwd+bwd"

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, device=device, generator=gen) * std).to(dtype)

        x = rand(case.T, case.d_in)
        W, b = rand(case.d_out, case.d_in, std=case.d_in ** -0.5), rand(case.d_out)
        many = case.N > 1 or case.scenario != "single"
        lead = (case.N,) if many else ()
        A = rand(*lead, case.r, case.d_in, std=case.d_in ** -0.5)
        B = rand(*lead, case.d_out, case.r, std=case.r ** -0.5)
        ids = _adapter_ids(case, device)
        names = None if ids is None else [f"a{n}" for n in ids.tolist()]
        layer = _peft_layer(W, b, A.requires_grad_(grad), B, 2.0, case.dropout, case.r)
        x, A, B = (t.requires_grad_(grad) for t in (x, A, B))
        if layer is not None:  # dropout on (training mode) exactly when the case has it
            layer.train(case.dropout > 0)
        return x, W, b, A, B, 2.0, ids, names, layer, case.dropout

    def small_case(self, case: Case) -> Case:
        return Case(case.scenario, case.mode, 64, case.d_in, case.d_out, case.r, case.N,
                    case.dropout, case.dtype)

    def resolved_backend(self, dtype: str, device: str) -> str:
        from mmkernels.lora.lora_linear import DISPATCH
        probe = torch.empty(1, 1, dtype=DTYPES[dtype], device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DISPATCH.select("auto", {"x": probe, "weight": probe, "lora_A": probe,
                                            "lora_B": probe})

    def estimate_bytes(self, impl: str, backend: str | None, case: Case) -> int:
        """x, y and their gradients, the dropout copy of x, the weights."""
        acts = 4 * case.T * (case.d_in + case.d_out) * 4
        return acts + 2 * case.d_in * case.d_out * 4


OPS = {"lora": LoRA()}
