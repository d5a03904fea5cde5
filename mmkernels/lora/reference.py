"""Eager LoRA linear layer: the oracle the LoRA kernels will be tested against and the fallback.

    y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ          (PEFT's formula, tuners/lora/layer.py)

Semantics every backend will share:

* x (..., in) with any leading dims, flattened to T rows; weight (out, in), bias (out,) or None.
* one adapter: lora_A (r, in), lora_B (out, r), scaling a number.
* many adapters: lora_A (N, r, in), lora_B (N, out, r), scaling a number or an (N,) tensor, and
  ``adapter_ids`` (T,) int64 naming each row's adapter; −1 = the base layer only. Each adapter's
  gradients come only from its own rows.
* dropout on the adapter's input only: element (t, i) of the flattened x is kept iff
  ``mmkernels._rng.dropout_uniform(seed, t, i) >= dropout_p`` and kept ones are scaled by
  1/(1 − p), so the backward regenerates the mask from the seed (never stores dropout(x)).
* math in float32 (float64 for float64 inputs); y in x's dtype.
"""
from __future__ import annotations

import torch

from .._rng import dropout_uniform
from .._validate import compute_dtype


def dropout_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    """The (rows, cols) keep-and-rescale factors: 1/(1 − p) where kept, 0 where dropped."""
    u = dropout_uniform(seed, torch.arange(rows, device=device)[:, None],
                        torch.arange(cols, device=device)[None])
    return (u >= dropout_p).to(torch.float64) / (1.0 - dropout_p)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, adapter_ids=None):
    """y as in the module docstring; differentiable in every tensor argument."""
    acc = compute_dtype(x.dtype)
    lead = x.shape[:-1]
    xa = x.reshape(-1, x.shape[-1]).to(acc)
    y = xa @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    xd = xa
    if dropout_p > 0.0:
        xd = xa * dropout_mask(seed, xa.shape[0], xa.shape[1], dropout_p, x.device).to(acc)
    A, B = lora_A.to(acc), lora_B.to(acc)
    if adapter_ids is None:
        y = y + scaling * ((xd @ A.T) @ B.T)
    else:
        scales = torch.as_tensor(scaling, dtype=acc, device=x.device).expand(A.shape[0])
        for n in range(A.shape[0]):
            rows = (adapter_ids == n).nonzero()[:, 0]
            if rows.numel():
                delta = scales[n] * ((xd[rows] @ A[n].T) @ B[n].T)
                y = y.index_add(0, rows, delta)
    return y.reshape(*lead, weight.shape[0]).to(x.dtype)
