"""Attention modules on the fused cross-attention kernel.

``MultiheadAttention`` is a drop-in for ``torch.nn.MultiheadAttention``: same constructor,
same ``forward`` signature and return values, and the same state-dict keys (a state dict
loads both ways). Two differences, both deliberate:

* the input and output projections are ``nn.Linear`` submodules called as modules
  (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), so adapters put on them (LoRA) get
  gradients — PyTorch packs them into ``in_proj_weight`` and calls ``out_proj`` functionally.
  State dicts still use PyTorch's keys (``in_proj_weight``/``in_proj_bias`` or
  ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``): hooks translate on save and load.
* a sample whose keys are all padding gives zero output and zero weights; PyTorch gives NaN.

``need_weights=False`` with no ``attn_mask`` (or a causal hint on square attention) is the
fast path: the fused kernel, never materializing the weights (the same rule as PyTorch's
own fast path). ``need_weights=True`` or a general ``attn_mask`` compute what PyTorch does,
eagerly.

``MultiheadAttention.forward_indexed`` is the one addition to torch's API: queries that share
key/value sets (several questions about one image) attend them through the packed varlen
kernel, each set projected once and never copied per query.

``GatedCrossAttentionBlock`` is Flamingo's gated cross-attention layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention.cross_attention import cross_attention, cross_attention_varlen

_QKV = ("q_proj", "k_proj", "v_proj")


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` on mmkernels' fused attention (see the module doc)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None):
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"MultiheadAttention: embed_dim and num_heads must be greater than "
                             f"0, got embed_dim={embed_dim} and num_heads={num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()
        self._register_state_dict_hook(_save_torch_keys)
        self.register_load_state_dict_pre_hook(_load_torch_keys)

    def _reset_parameters(self):
        # PyTorch's initialization: xavier-uniform over the packed (3E, E) in_proj_weight (or
        # each separate projection), zero biases, out_proj as nn.Linear with a zero bias.
        E = self.embed_dim
        with torch.no_grad():
            if self._qkv_same_embed_dim:
                bound = math.sqrt(6.0 / (E + 3 * E))
                for name in _QKV:
                    getattr(self, name).weight.uniform_(-bound, bound)
            else:
                for name in _QKV:
                    nn.init.xavier_uniform_(getattr(self, name).weight)
            for name in _QKV + ("out_proj",):
                if getattr(self, name).bias is not None:
                    getattr(self, name).bias.zero_()
            if self.bias_k is not None:
                nn.init.xavier_normal_(self.bias_k)
                nn.init.xavier_normal_(self.bias_v)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError("MultiheadAttention: query, key and value must all be 3-D "
                             "(batched) or all 2-D (unbatched), got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        N, L, _ = query.shape
        S = key.shape[1]
        if key.shape[0] != N or value.shape[:2] != key.shape[:2]:
            raise ValueError("MultiheadAttention: query, key and value must have the same batch "
                             "size and key and value the same length, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} "
                             "(batch first)")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"MultiheadAttention: key_padding_mask must have shape "
                             f"{(N, S) if batched else (S,)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError("MultiheadAttention: is_causal is a hint that needs attn_mask "
                             "(as in torch.nn.MultiheadAttention); pass the causal mask too")

        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(N, L, H, hd).transpose(1, 2)
        k, v = self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1)], dim=1)
            key_padding_mask, attn_mask = _pad_masks(key_padding_mask, attn_mask)
        k = k.view(N, -1, H, hd).transpose(1, 2)
        v = v.view(N, -1, H, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
            key_padding_mask, attn_mask = _pad_masks(key_padding_mask, attn_mask)
        dropout_p = self.dropout if self.training else 0.0

        # The causal hint is trusted when square (PyTorch trusts it the same way); SDPA's causal
        # is top-left aligned, ours bottom-right: they agree only when L equals the key length.
        causal = bool(is_causal) and key_padding_mask is None and L == k.shape[2]
        fused = not need_weights and (attn_mask is None or causal) and (
            key_padding_mask is None or key_padding_mask.dtype == torch.bool)
        if fused:
            out = cross_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                                  dropout_p=dropout_p)
            weights = None
        else:
            out, weights = _eager_attention(q, k, v, key_padding_mask, attn_mask, dropout_p)
            if not need_weights:
                weights = None
            elif average_attn_weights:
                weights = weights.mean(dim=1)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def forward_indexed(self, query: Tensor, key: Tensor, value: Tensor, key_index: Tensor,
                        key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Attention where sample b of ``query`` attends key/value set ``key_index[b]``.

        query (B, L, E); key (N, S, kdim) and value (N, S, vdim) hold N sets (sequence first
        when ``batch_first=False``, as in ``forward``); key_index (B,) integer in [0, N), in any
        order, a set used by any number of samples (none included); key_padding_mask (N, S)
        bool, True = padding. Returns the attention output (B, L, E), equal to
        ``forward(query, key[key_index], value[key_index], key_padding_mask[key_index],
        need_weights=False)[0]`` but without that copy: each set goes through k_proj/v_proj
        once, and the queries of the samples sharing a set are packed into one sequence of
        ``cross_attention_varlen`` whose keys are the set's unpadded keys. A set whose keys are
        all padding gives zeros, as in ``forward``.
        """
        op = "MultiheadAttention.forward_indexed"
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError(f"{op}: add_bias_kv and add_zero_attn are not supported")
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"{op}: query, key and value must be 3-D, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, _ = query.shape
        N, S, _ = key.shape
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(f"{op}: key and value must hold the same sets of the same length, "
                             f"got shapes {tuple(key.shape)} and {tuple(value.shape)} "
                             "(batch first)")
        if not isinstance(key_index, Tensor) or key_index.dtype.is_floating_point \
                or key_index.dtype.is_complex or key_index.dtype == torch.bool \
                or key_index.shape != (B,):
            raise TypeError(f"{op}: key_index must be an integer tensor of shape ({B},) (one set "
                            f"per query sample), got "
                            f"{getattr(key_index, 'dtype', type(key_index).__name__)} of shape "
                            f"{tuple(getattr(key_index, 'shape', ()))}")
        if B and (int(key_index.min()) < 0 or int(key_index.max()) >= N):
            raise ValueError(f"{op}: key_index must lie in [0, {N}) (the number of key sets), "
                             f"got values in [{int(key_index.min())}, {int(key_index.max())}]")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                             or tuple(key_padding_mask.shape) != (N, S)):
            raise ValueError(f"{op}: key_padding_mask must be a bool tensor of shape {(N, S)}, "
                             f"got {key_padding_mask.dtype} of shape "
                             f"{tuple(key_padding_mask.shape)}")
        H, hd = self.num_heads, self.head_dim
        key_index = key_index.to(device=query.device, dtype=torch.int64)
        # Samples grouped by set (a stable sort; skipped when already grouped), so that the
        # queries of set n are consecutive: varlen sequence n.
        grouped = B < 2 or bool((key_index[1:] >= key_index[:-1]).all())
        order = None if grouped else torch.argsort(key_index, stable=True)
        q = self.q_proj(query)
        if order is not None:
            q = q.index_select(0, order)
        k, v = self.k_proj(key), self.v_proj(value)
        if key_padding_mask is None:
            k, v = k.reshape(N * S, H, hd), v.reshape(N * S, H, hd)
            keys = torch.full((N,), S, dtype=torch.int64, device=query.device)
        else:
            keep = ~key_padding_mask.to(query.device)
            k, v = k[keep].view(-1, H, hd), v[keep].view(-1, H, hd)
            keys = keep.sum(1)
        queries = torch.bincount(key_index, minlength=N) * L
        cu_q = F.pad(queries.cumsum(0), (1, 0)).to(torch.int32)
        cu_k = F.pad(keys.cumsum(0), (1, 0)).to(torch.int32)
        out = cross_attention_varlen(q.reshape(B * L, H, hd), k, v, cu_q, cu_k,
                                     dropout_p=self.dropout if self.training else 0.0)
        out = out.view(B, L, self.embed_dim)
        if order is not None:
            out = out.index_select(0, torch.argsort(order))
        out = self.out_proj(out)
        return out if self.batch_first else out.transpose(0, 1)


def _pad_masks(key_padding_mask, attn_mask):
    """One more key (bias_kv or the zero key): never padding, always attendable."""
    if key_padding_mask is not None:
        key_padding_mask = F.pad(key_padding_mask, (0, 1))
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask, (0, 1))
    return key_padding_mask, attn_mask


def _additive(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    return mask.to(dtype)


def _eager_attention(q, k, v, key_padding_mask, attn_mask, dropout_p):
    """PyTorch's need_weights/attn_mask path: (out (N, H, L, hd), weights (N, H, L, S)), with
    rows that see no key giving zeros instead of NaN."""
    N, H, L, hd = q.shape
    S = k.shape[2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if attn_mask is not None:
        m = _additive(attn_mask, s.dtype)
        s = s + (m.view(N, H, L, S) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        s = s + _additive(key_padding_mask, s.dtype)[:, None, None, :]
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    weights = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


def _save_torch_keys(module, state_dict, prefix, local_metadata):
    """Rename the projections' entries to torch.nn.MultiheadAttention's keys."""
    names = [prefix + f"{p}.weight" for p in _QKV]
    if not all(n in state_dict for n in names):
        return  # wrapped projections (adapters) keep their own keys
    weights = [state_dict.pop(n) for n in names]
    if module._qkv_same_embed_dim:
        state_dict[prefix + "in_proj_weight"] = torch.cat(weights)
    else:
        for p, w in zip(_QKV, weights):
            state_dict[prefix + f"{p}_weight"] = w
    biases = [prefix + f"{p}.bias" for p in _QKV]
    if all(b in state_dict for b in biases):
        state_dict[prefix + "in_proj_bias"] = torch.cat([state_dict.pop(b) for b in biases])


def _load_torch_keys(module, state_dict, prefix, *args):
    """Accept torch.nn.MultiheadAttention's keys (and our own, as saved)."""
    E = module.embed_dim
    packed = state_dict.pop(prefix + "in_proj_weight", None)
    if packed is not None:
        for p, w in zip(_QKV, packed.split(E)):
            state_dict[prefix + f"{p}.weight"] = w
    for p in _QKV:
        w = state_dict.pop(prefix + f"{p}_weight", None)
        if w is not None:
            state_dict[prefix + f"{p}.weight"] = w
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        for p, b in zip(_QKV, bias.split(E)):
            state_dict[prefix + f"{p}.bias"] = b


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention layer (Alayrac et al. 2022):

        x = x + tanh(α_attn) · xattn(LN(x), media, media_key_padding_mask)
        x = x + tanh(α_ff)   · FFN(LN(x))

    with α initialised to 0, so a fresh block is the identity. Text x (B, L, dim) attends to
    media (B, M, media_dim); ``media_key_padding_mask`` (B, M) bool, True = padding. With
    ``media_index`` (B,), media holds N items (N, M, media_dim), mask (N, M), and sample b reads
    item ``media_index[b]`` (``MultiheadAttention.forward_indexed``: an item read by several
    samples is projected once). A sample with no media (``media=None``, or every media token
    padded) passes through unchanged: both gated branches are zeroed for it, as in Flamingo,
    where text without preceding media attends to nothing. The attention has no biases
    (Flamingo's), so its zero output stays zero.
    """

    def __init__(self, dim, num_heads, media_dim=None, ff_mult=4, dropout=0.0, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        media_dim = dim if media_dim is None else media_dim
        self.norm_attn = nn.LayerNorm(dim, **factory)
        self.attn = MultiheadAttention(dim, num_heads, dropout=dropout, bias=False,
                                       kdim=media_dim, vdim=media_dim, batch_first=True,
                                       **factory)
        self.attn_gate = nn.Parameter(torch.zeros(1, **factory))
        self.norm_ff = nn.LayerNorm(dim, **factory)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim, **factory), nn.GELU(),
                                nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim, **factory))
        self.ff_gate = nn.Parameter(torch.zeros(1, **factory))

    def forward(self, x: Tensor, media: Optional[Tensor] = None,
                media_key_padding_mask: Optional[Tensor] = None,
                media_index: Optional[Tensor] = None) -> Tensor:
        if media is None:
            return x
        h = self.norm_attn(x)
        if media_index is None:
            attended, _ = self.attn(h, media, media, need_weights=False,
                                    key_padding_mask=media_key_padding_mask)
        else:
            attended = self.attn.forward_indexed(h, media, media, media_index,
                                                 media_key_padding_mask)
        gate_attn, gate_ff = self.attn_gate.tanh(), self.ff_gate.tanh()
        if media_key_padding_mask is not None:
            has_media = (~media_key_padding_mask).any(dim=1)
            if media_index is not None:
                has_media = has_media[media_index]
            has_media = has_media.to(x.dtype)[:, None, None]
            gate_attn, gate_ff = gate_attn * has_media, gate_ff * has_media
        x = x + gate_attn * attended
        return x + gate_ff * self.ff(self.norm_ff(x))
