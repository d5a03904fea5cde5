"""The counter-based dropout RNG every op shares (attention's probabilities today).

A mask element is a pure function of (seed, row, column), so a backward regenerates the
forward's mask instead of storing it, and every backend (reference, C++, Triton) draws the same
mask from the same seed — which is what lets the tests compare dropout results across backends
exactly. Each op documents what its rows and columns are.
"""
from __future__ import annotations

from typing import Optional

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²) held in int64, without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: a bijection of [0, 2³²) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_uniform(seed: int, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The counter-based uniform in [0, 1) (multiples of 2⁻²⁴, float64) that decides whether
    element (row, key) is kept: kept iff u >= dropout_p. ``rows``/``keys`` are int64 tensors
    in [0, 2³²) that broadcast; ``seed`` an int in [0, 2⁶³). The C++ and Triton kernels
    compute the same integers with uint32 arithmetic:

        h = fmix32(fmix32(fmix32(key ^ seed_hi) ^ row) + seed_lo)    (mod 2³²)
        u = (h >> 8) · 2⁻²⁴
    """
    seed_lo, seed_hi = seed & _M32, (seed >> 32) & _M32
    h = _fmix32(keys ^ seed_hi)
    h = _fmix32(h ^ rows)
    h = _fmix32((h + seed_lo) & _M32)
    return (h >> 8).to(torch.float64) * 2.0 ** -24


def draw_seed(dropout_p: float, device) -> Optional[torch.Tensor]:
    """An op's dropout seed: drawn from torch's generator for ``device`` (so torch.manual_seed
    makes a run repeatable), kept as a 0-dim int64 tensor so torch.compile need not specialize
    on it; None without dropout."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
