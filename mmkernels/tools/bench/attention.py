"""The attention family: cross-attention (text over image tokens) against what users call today.

Scenarios (the ``scenario`` field of a case):
  padded  B samples, keys padded at the end to a random length in [Lk/2, Lk] (the real
          padding of a batch of images with different token counts), a key_padding_mask
  dense   the same shapes, no padding: pure kernel quality
  packed  B (query, key) pairs of random lengths, Lq in [8, Lq], Lk in [16, Lk]: mmkernels
          runs cross_attention_varlen on the packed tokens, the peers run padded dense
          batches with a key padding mask (they have no packed form with a backward on CPU)
  infer   Lq text tokens over Lk image tokens, forward only

Implementations:
  eager       the masked formula: softmax(q·kᵀ·scale + mask)·v
  compile     torch.compile of that formula
  sdpa        F.scaled_dot_product_attention with its default kernel choice (the mask as a
              boolean attn_mask when there is one)
  sdpa_math   the same, forced onto SDPA's math backend
  flex        FlexAttention (compiled), forward only on CPU ("does not support backward")
  mmkernels   mmkernels.cross_attention / cross_attention_varlen, backend="auto"

Work (GFLOP/s): the unmasked work only, 4·H·D·Σ Lq·Lk_valid forward and 2.5× that backward
(Triton tutorial 06's count), so an implementation that computes padded keys pays for them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mmkernels

from . import peers
from .harness import DTYPES

IMPLS = ("eager", peers.COMPILE, "sdpa", "sdpa_math", "flex", "mmkernels")
BACKWARD_FACTOR = 2.5


@dataclass(frozen=True)
class Case:
    scenario: str
    mode: str       # "fwd" or "fwd+bwd"
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    dtype: str

    def __str__(self) -> str:
        return f"{self.scenario}-{self.mode}-B={self.B}-Lq={self.Lq}-Lk={self.Lk}-{self.dtype}"

    def aligned(self) -> str:
        return (f"{self.scenario:<6} {self.mode:<7} B={self.B:<3} H={self.H} Lq={self.Lq:<4} "
                f"Lk={self.Lk:<4} D={self.D} {self.dtype}")


def lengths(case: Case) -> tuple[list[int], list[int]]:
    """Per-sample (query, valid key) lengths: fixed by the case (not by the inputs' seed), so
    every implementation and the FLOP count see the same ones."""
    gen = torch.Generator().manual_seed(1000 + case.B * 7 + case.Lq * 13 + case.Lk)
    if case.scenario == "padded":
        keys = torch.randint(case.Lk // 2, case.Lk + 1, (case.B,), generator=gen).tolist()
        return [case.Lq] * case.B, keys
    if case.scenario == "packed":
        q = torch.randint(8, case.Lq + 1, (case.B,), generator=gen).tolist()
        return q, torch.randint(16, case.Lk + 1, (case.B,), generator=gen).tolist()
    return [case.Lq] * case.B, [case.Lk] * case.B


def _formula(q, k, v, mask):
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else ~mask[:, None, None, :])


def _sdpa_math(q, k, v, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return _sdpa(q, k, v, mask)


def _flex() -> Callable:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        raise peers.PeerUnavailable(f"FlexAttention is not available: {exc}") from exc
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, mask):
        if mask is None:
            return compiled(q, k, v)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(mask[b, kv_idx], float("-inf"), score)
        return compiled(q, k, v, score_mod=score_mod)
    return run


def _dense_step(attention: Callable) -> Callable:
    """fn(*inputs) -> a scalar, for an implementation of the dense (B, H, L, D) formula."""
    def step(q, k, v, mask, qp, kp, vp, packing):
        out = attention(q, k, v, mask)
        if packing is not None:  # a padded query row is not part of the result
            out = out * packing[-1]
        return out.sum()
    return step


def _fused(q, k, v, mask, qp, kp, vp, packing):
    if qp is not None:
        cu_q, cu_k, max_q, max_k, _ = packing
        return mmkernels.cross_attention_varlen(qp, kp, vp, cu_q, cu_k, max_seqlen_q=max_q,
                                                max_seqlen_k=max_k).sum()
    return mmkernels.cross_attention(q, k, v, key_padding_mask=mask).sum()


@dataclass(frozen=True)
class Attention:
    """Cross-attention, as ``family.BenchOp``."""

    name = "attention"
    title = "Cross-attention"
    case_type = Case
    impls = IMPLS
    quick_help = "attention: the padded and packed training cases and Lq=16 inference, smaller"
    sizes_help = "attention: inference query lengths Lq to run instead of the default list"
    warmup = "a B=2 warm-up at the case's head count and dims"
    step = ("the scenario's call on fp32 (B, H, L, D) inputs, `.sum().backward()` with q, k, v "
            "requiring grad for fwd+bwd rows, no grad for fwd rows")
    flops_formula = "4·H·D·Σ Lq·Lk_valid (×3.5 with the backward)"
    flops_note = "forward QKᵀ and PV; backward 2.5× forward; padded keys not counted"
    flops_basis = ("the useful work: keys that are padding are not counted, so an implementation "
                   "that computes them shows a lower rate")
    # Scenarios, not sizes: the plots are grouped bars per case.
    x_field = x_label = None
    # The pytest-benchmark cases (benchmarks/test_bench.py): milliseconds each.
    smoke_cases = (Case("padded", "fwd+bwd", 3, 2, 9, 40, 16, "fp32"),
                   Case("packed", "fwd+bwd", 4, 2, 24, 40, 16, "fp32"),
                   Case("infer", "fwd", 4, 2, 3, 40, 16, "fp32"))

    def flops(self, case: Case) -> int:
        lq, lk = lengths(case)
        fwd = 4 * case.H * case.D * sum(a * b for a, b in zip(lq, lk))
        return int(fwd * (1 + BACKWARD_FACTOR)) if case.mode == "fwd+bwd" else fwd

    def plan(self, device: str, quick: bool, sizes, dtypes, impls) -> list[tuple]:
        train = [("padded", 32, 64, 256), ("dense", 32, 64, 256), ("packed", 64, 128, 576)]
        if quick:
            train = [("padded", 16, 64, 256), ("packed", 32, 128, 576)]
        infer = sizes or ((16,) if quick else (1, 4, 16))
        cases = [Case(s, mode, b, 8, lq, lk, 64, dt) for s, b, lq, lk in train
                 for mode in ("fwd", "fwd+bwd") for dt in dtypes]
        cases += [Case("infer", "fwd", 64, 8, lq, 576, 64, dt) for lq in infer for dt in dtypes]
        plan = []
        for case in cases:
            chosen = [i for i in IMPLS if i in impls]
            if case.mode == "fwd+bwd" and device == "cpu":
                chosen = [i for i in chosen if i != "flex"]  # no backward on CPU
            plan.append((case, tuple(chosen)))
        return plan

    def build(self, impl: str) -> Callable:
        if impl == "mmkernels":
            return _fused
        if impl == "eager":
            return _dense_step(_formula)
        if impl == peers.COMPILE:
            return _dense_step(peers.compiled(_formula))
        if impl == "sdpa":
            return _dense_step(_sdpa)
        if impl == "sdpa_math":
            return _dense_step(_sdpa_math)
        if impl == "flex":
            return _dense_step(_flex())
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")

    def make_inputs(self, case: Case, device: str, seed: int = 0) -> tuple:
        """(q, k, v, mask, qp, kp, vp, packing): the padded dense batch every peer runs and,
        for "packed", the same tokens packed (qp, kp, vp) with (cu_q, cu_k, max_q, max_k,
        the (B, 1, Lq, 1) valid-query mask of the padded batch); the other entries None."""
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = DTYPES[case.dtype]
        grad = case.mode == "fwd+bwd"
        lq, lk = lengths(case)
        H, D = case.H, case.D

        def rand(*shape):
            return torch.randn(*shape, device=device, generator=gen).to(dtype)

        q, k, v = rand(case.B, H, case.Lq, D), rand(case.B, H, case.Lk, D), \
            rand(case.B, H, case.Lk, D)
        mask = None
        if case.scenario in ("padded", "packed"):
            valid_k = torch.tensor(lk, device=device)[:, None]
            mask = torch.arange(case.Lk, device=device)[None] >= valid_k
        qp = kp = vp = packing = None
        if case.scenario == "packed":
            qp = torch.cat([q[b, :, :n].transpose(0, 1) for b, n in enumerate(lq)])
            kp = torch.cat([k[b, :, :n].transpose(0, 1) for b, n in enumerate(lk)])
            vp = torch.cat([v[b, :, :n].transpose(0, 1) for b, n in enumerate(lk)])
            cu = [torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
                  for lens in (lq, lk)]
            valid_q = torch.tensor(lq, device=device)[:, None]
            valid = torch.arange(case.Lq, device=device)[None] < valid_q
            packing = (cu[0], cu[1], max(lq), max(lk), valid[:, None, :, None].to(dtype))
            qp, kp, vp = (x.contiguous().requires_grad_(grad) for x in (qp, kp, vp))
        q, k, v = (x.requires_grad_(grad) for x in (q, k, v))
        return q, k, v, mask, qp, kp, vp, packing

    def small_case(self, case: Case) -> Case:
        return Case(case.scenario, case.mode, 2, case.H, min(case.Lq, 16), min(case.Lk, 32),
                    case.D, case.dtype)

    def resolved_backend(self, dtype: str, device: str) -> str:
        from mmkernels.attention.cross_attention import DISPATCH
        probe = torch.empty(1, 1, 1, 1, dtype=DTYPES[dtype], device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DISPATCH.select("auto", {"q": probe, "k": probe, "v": probe})

    def estimate_bytes(self, impl: str, backend: str | None, case: Case) -> int:
        """Inputs and gradients (~8 B·H·L·D arrays), plus ~4 B·H·Lq·Lk score-sized arrays for
        the materializing implementations."""
        linear = 8 * case.B * case.H * (case.Lq + case.Lk) * case.D * 4
        fused = impl in ("mmkernels", "sdpa", "flex") and backend != "reference"
        return linear + (0 if fused else 4 * case.B * case.H * case.Lq * case.Lk * 4)


@dataclass(frozen=True)
class MhaCase:
    B: int
    Lq: int
    Lk: int
    E: int
    heads: int
    kdim: int
    dtype: str

    def __str__(self) -> str:
        return f"mha-B={self.B}-Lq={self.Lq}-Lk={self.Lk}-E={self.E}-{self.dtype}"

    def aligned(self) -> str:
        return (f"B={self.B:<3} Lq={self.Lq:<4} Lk={self.Lk:<4} E={self.E} heads={self.heads} "
                f"kdim={self.kdim} {self.dtype}")


def _torch_mha(query, key, value, mask, ours, theirs):
    return theirs(query, key, value, key_padding_mask=mask, need_weights=False)[0].sum()


def _our_mha(query, key, value, mask, ours, theirs):
    return ours(query, key, value, key_padding_mask=mask, need_weights=False)[0].sum()


@dataclass(frozen=True)
class MultiheadAttentionModule:
    """The module drop-in: torch.nn.MultiheadAttention against mmkernels.nn.MultiheadAttention
    loaded with its state dict, text over padded image tokens (need_weights=False, both
    modules' fast paths), projections included."""

    name = "mha"
    title = "nn.MultiheadAttention (cross-attention, padded image tokens)"
    case_type = MhaCase
    impls = ("eager", peers.COMPILE, "mmkernels")
    quick_help = "mha: one case"
    sizes_help = "mha: not used"
    warmup = "a B=2 warm-up"
    step = ("`module(text, image, image, key_padding_mask, need_weights=False)[0].sum()"
            ".backward()`; eager is torch.nn.MultiheadAttention, compile its torch.compile")
    flops_formula = "attention 4·H·hd·Σ Lq·Lk_valid ×3.5 + projections 6·(Lq·E + 2·Lk·kdim + Lq·E)·E·B"
    flops_note = "attention as in the attention op, plus the four projections forward and backward"
    flops_basis = "the useful work (padded keys not counted in the attention term)"
    x_field = x_label = None
    smoke_cases = (MhaCase(3, 9, 20, 32, 4, 24, "fp32"),)

    def _lengths(self, case):
        gen = torch.Generator().manual_seed(2000 + case.B + case.Lk)
        return torch.randint(case.Lk // 2, case.Lk + 1, (case.B,), generator=gen).tolist()

    def flops(self, case) -> int:
        lk = self._lengths(case)
        attention = 4 * case.E * case.Lq * sum(lk) * (1 + BACKWARD_FACTOR)
        projections = 6 * case.B * (2 * case.Lq * case.E + 2 * case.Lk * case.kdim) * case.E
        return int(attention + projections)

    def plan(self, device, quick, sizes, dtypes, impls):
        cases = [MhaCase(32, 64, 256, 512, 8, 1024, dt) for dt in dtypes]
        return [(c, tuple(i for i in self.impls if i in impls)) for c in cases]

    def build(self, impl: str) -> Callable:
        if impl == "mmkernels":
            return _our_mha
        if impl == "eager":
            return _torch_mha
        if impl == peers.COMPILE:
            return peers.compiled(_torch_mha)
        raise ValueError(f"unknown implementation {impl!r}; expected one of {self.impls}")

    def make_inputs(self, case, device: str, seed: int = 0) -> tuple:
        torch.manual_seed(seed)
        dtype = DTYPES[case.dtype]
        theirs = torch.nn.MultiheadAttention(case.E, case.heads, kdim=case.kdim, vdim=case.kdim,
                                             batch_first=True).to(device, dtype)
        ours = mmkernels.nn.MultiheadAttention(case.E, case.heads, kdim=case.kdim,
                                               vdim=case.kdim, batch_first=True).to(device, dtype)
        ours.load_state_dict(theirs.state_dict())
        text = torch.randn(case.B, case.Lq, case.E, device=device, dtype=dtype)
        image = torch.randn(case.B, case.Lk, case.kdim, device=device, dtype=dtype)
        valid = torch.tensor(self._lengths(case), device=device)[:, None]
        mask = torch.arange(case.Lk, device=device)[None] >= valid
        return text.requires_grad_(), image.requires_grad_(), image, mask, ours, theirs

    def small_case(self, case):
        return MhaCase(2, min(case.Lq, 8), min(case.Lk, 16), case.E, case.heads, case.kdim,
                       case.dtype)

    def resolved_backend(self, dtype: str, device: str) -> str:
        return Attention().resolved_backend(dtype, device)

    def estimate_bytes(self, impl, backend, case) -> int:
        acts = 8 * case.B * (case.Lq * case.E + case.Lk * (case.kdim + case.E)) * 4
        return acts + 4 * case.B * case.heads * case.Lq * case.Lk * 4


OPS = {"attention": Attention(), "mha": MultiheadAttentionModule()}
