"""Eager, materializing cross-attention: the oracle every kernel is tested against, and the
fallback when no fast backend can run. It builds the (Lq × Lk) scores and lets autograd
differentiate them (double backward included).

Semantics every backend shares (``forward``'s contract):

* dense: q (B, H, Lq, Dqk), k (B, Hk, Lk, Dqk), v (B, Hk, Lk, Dv); query head h reads K/V head
  h // (H // Hk). ``key_padding_mask`` (B, Lk) bool, True = ignore that key.
* varlen: q (Tq, H, Dqk), k (Tk, Hk, Dqk), v (Tk, Hk, Dv); sequence s owns query rows
  cu_seqlens_q[s]:cu_seqlens_q[s+1] and key rows cu_seqlens_k[s]:cu_seqlens_k[s+1].
* causal: query i of a sequence sees key j iff j <= i + (Lk - Lq) (bottom-right aligned).
* a query row that sees no key at all gets out = 0, lse = +inf, and zero gradients.
* out is in q's dtype; lse (B, H, Lq) dense, (H, Tq) varlen, in the compute dtype (float64
  for float64 inputs, float32 otherwise) — log Σ_j exp(scale·q·k_j) over the keys it sees.
* dropout: probabilities are kept where ``dropout_keep`` says, and scaled by 1/(1 − p). The
  mask is a pure function of (seed, row, key) — row = the query row's flat index in lse,
  key = the key's index within its sequence (``mmkernels._rng.dropout_uniform(seed, row,
  key)``) — so every backend draws the same mask and a backward regenerates it instead of
  storing it.
"""
from __future__ import annotations

import torch

from .._rng import dropout_uniform
from .._validate import compute_dtype

def output_shapes(q, v, varlen: bool) -> tuple[tuple, tuple]:
    """(out shape, lse shape): (B, H, Lq, Dv) and (B, H, Lq) dense, (Tq, H, Dv) and (H, Tq)
    varlen (the fakes of every backend's ops allocate these)."""
    out = (*q.shape[:-1], v.shape[-1])
    return out, ((q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:-1]))


def _dense(q, k, v, mask, causal, scale, dropout_p, seed, rows, shift=None):
    """One dense block: q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), mask (B, Lk) or
    None, rows (B, H, Lq) int64 (the dropout row ids), shift (B,) each sample's causal
    alignment Lk − Lq (default: the block's). Returns out (acc dtype), lse."""
    acc = compute_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    group = H // k.shape[1]
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    if group > 1:
        ka, va = ka.repeat_interleave(group, dim=1), va.repeat_interleave(group, dim=1)
    s = (qa @ ka.transpose(-1, -2)) * scale
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        shift = Lk - Lq if shift is None else shift[:, None, None, None]
        allowed = allowed & (j <= i + shift)
    alive = allowed.any(-1, keepdim=True)
    # Dead rows (no key) get finite placeholder scores, so neither softmax nor its gradient
    # produces NaN, and are zeroed after it.
    s = torch.where(allowed, s, torch.where(alive, float("-inf"), 0.0))
    p = torch.softmax(s, dim=-1) * allowed
    lse = torch.logsumexp(s, dim=-1).masked_fill(~alive[..., 0], float("inf"))
    if dropout_p > 0.0:
        keys = torch.arange(Lk, device=q.device)
        keep = dropout_uniform(seed, rows[..., None], keys) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    return p @ va, lse


def forward(q, k, v, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
            causal=False, scale=1.0, dropout_p=0.0, seed=0):
    """(out, lse) as described in the module docstring; differentiable in q, k, v."""
    if cu_seqlens_q is None:
        B, H, Lq, _ = q.shape
        rows = torch.arange(B * H * Lq, device=q.device).view(B, H, Lq)
        out, lse = _dense(q, k, v, key_padding_mask, causal, scale, dropout_p, seed, rows)
        return out.to(q.dtype), lse
    Tq, H, _ = q.shape
    lens_q, lens_k = cu_seqlens_q.diff().long(), cu_seqlens_k.diff().long()
    n = len(lens_q)
    max_q, max_k = (int(lens_q.max()), int(lens_k.max())) if n else (0, 0)
    if max_q == 0 or n * max_q * max_k > 4 * int((lens_q * lens_k).sum()) + 4096:
        return _varlen_loop(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p, seed)
    # The sequences scattered into a padded (n, max_q | max_k) batch, one dense call, and the
    # rows gathered back: the same per-sequence attention as the loop below, vectorized (used
    # while padding at most quadruples the scores).
    seq_q = torch.repeat_interleave(torch.arange(n, device=q.device), lens_q, output_size=Tq)
    seq_k = torch.repeat_interleave(torch.arange(n, device=q.device), lens_k,
                                    output_size=k.shape[0])
    pos_q = torch.arange(Tq, device=q.device) - cu_seqlens_q.long()[seq_q]
    pos_k = torch.arange(k.shape[0], device=q.device) - cu_seqlens_k.long()[seq_k]

    def padded(x, seq, pos, length):
        return x.new_zeros(n, length, *x.shape[1:]).index_put((seq, pos), x).transpose(1, 2)

    mask = torch.arange(max_k, device=q.device)[None, :] >= lens_k[:, None]
    rows = (torch.arange(H, device=q.device)[None, :, None] * Tq
            + cu_seqlens_q.long()[:-1, None, None] + torch.arange(max_q, device=q.device))
    out, lse = _dense(padded(q, seq_q, pos_q, max_q), padded(k, seq_k, pos_k, max_k),
                      padded(v, seq_k, pos_k, max_k), mask, causal, scale, dropout_p, seed,
                      rows, shift=lens_k - lens_q)
    return out.transpose(1, 2)[seq_q, pos_q].to(q.dtype), lse.transpose(1, 2)[seq_q, pos_q].T


def _varlen_loop(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p, seed):
    """Varlen as one dense call per sequence (for lengths too uneven to pad)."""
    acc = compute_dtype(q.dtype)
    Tq, H, _ = q.shape
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: zeros
            outs.append(q.new_zeros(q1 - q0, H, v.shape[-1], dtype=acc))
            lses.append(torch.full((H, q1 - q0), float("inf"), dtype=acc, device=q.device))
            continue
        rows = (torch.arange(H, device=q.device)[:, None] * Tq
                + torch.arange(q0, q1, device=q.device))[None]
        out, lse = _dense(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                          v[k0:k1].transpose(0, 1)[None], None, causal, scale, dropout_p, seed,
                          rows)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        out = q.new_zeros(Tq, H, v.shape[-1], dtype=acc)
        lse = torch.full((H, Tq), float("inf"), dtype=acc, device=q.device)
    else:
        out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return out.to(q.dtype), lse
