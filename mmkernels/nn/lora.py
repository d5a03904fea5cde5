"""``LoRALinear``: an ``nn.Linear`` with named LoRA adapters on the fused ``lora_linear`` op.

PEFT's semantics and parameter names (``peft/tuners/lora/layer.py``), so state dicts and
checkpoints move between the two: the wrapped layer is ``base_layer``; adapter ``name`` has
``lora_A[name]`` (an ``nn.Linear(in, r, bias=False)``, Kaiming-uniform at init) and
``lora_B[name]`` (``nn.Linear(r, out, bias=False)``, zero at init, so a new adapter starts as
the identity); its scaling is α/r, or α/√r with ``use_rslora``. What differs:

* ``forward(x, adapter_names=[...])`` (one name per sample, "__base__" for none) is one fused
  call with per-row adapter ids, and it trains: each adapter's gradients come from its own
  samples. PEFT loops over the adapters and is meant for inference.
* ``merge()`` / ``unmerge()`` compute W ± s·B·A in fp32 and round once, whatever the weight
  dtype, so ``unmerge(merge(W))`` returns a bf16 W to within one bf16 rounding.
* An unknown adapter name is an error, never silently the base layer.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora.lora_linear import lora_linear

BASE = "__base__"


class LoRALinear(nn.Module):
    """LoRA adapters around ``base`` (an ``nn.Linear``); see the module doc."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = "default",
                 backend: str = "auto"):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.backend = backend
        # Per-sample adapter names set for a whole model by mmkernels.lora.mixed_batch().
        self.batch_adapter_names: Optional[Sequence[str]] = None
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)

    # -- adapters -----------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """A new adapter ``name`` (A Kaiming-uniform, B zero: the layer is unchanged until it
        trains), on the base weight's device and dtype. Does not make it active."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"LoRALinear: an adapter name must be a non-empty string other "
                             f"than {BASE!r}, got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"LoRALinear: adapter {name!r} exists already")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: r must be a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"LoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        w = self.base_layer.weight
        factory = {"device": w.device, "dtype": w.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        # PEFT's initialisation (nn.Linear's own for A; B zero).
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.use_rslora[name] = bool(use_rslora)
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter a plain ``forward(x)`` applies."""
        self._known(name)
        if self.merged and name not in self.merged_adapters:
            raise RuntimeError(f"LoRALinear: unmerge {self.merged_adapters} before switching "
                               f"to adapter {name!r}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        self._known(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"LoRALinear: adapter {name!r} is merged; unmerge it first")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del d[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def _known(self, name: str) -> None:
        if name not in self.lora_A:
            raise ValueError(f"LoRALinear: no adapter {name!r}; adapters: {list(self.lora_A)}")

    def dropout_p(self, name: str) -> float:
        return getattr(self.lora_dropout[name], "p", 0.0) if self.training else 0.0

    # -- forward ------------------------------------------------------------------------

    def forward(self, x: Tensor, adapter_names: Optional[Sequence[str]] = None) -> Tensor:
        """``base(x)`` plus the active adapter, or with ``adapter_names`` (one name per sample,
        i.e. per index of x's first dim; "__base__" for no adapter) each sample's own adapter,
        all in one fused call."""
        w, b = self.base_layer.weight, self.base_layer.bias
        if adapter_names is None:
            adapter_names = self.batch_adapter_names
        if adapter_names is None:
            name = self.active_adapter
            if self.merged or name is None:
                return self.base_layer(x)
            return lora_linear(x, w, b, self.lora_A[name].weight, self.lora_B[name].weight,
                               self.scaling[name], dropout_p=self.dropout_p(name),
                               backend=self.backend)
        if self.merged:
            raise RuntimeError("LoRALinear: adapter_names cannot be used while adapters are "
                               "merged into the base weight; unmerge() first")
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(f"LoRALinear: adapter_names must give one name per sample (x's "
                             f"first dim, {x.shape[0] if x.dim() else 'none'}), got "
                             f"{len(adapter_names)} names")
        used = [n for n in dict.fromkeys(adapter_names) if n != BASE]
        for n in used:
            self._known(n)
        if not used:
            return self.base_layer(x)
        drops = {self.dropout_p(n) for n in used}
        if len(drops) > 1:
            raise ValueError(f"LoRALinear: a mixed batch in training needs one dropout "
                             f"probability, adapters {used} have {sorted(drops)}")
        index = {n: i for i, n in enumerate(used)}
        per_sample = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64)
        ids = per_sample.repeat_interleave(x[0].numel() // x.shape[-1]).to(x.device)
        # Adapters of different ranks share the call padded with zeros to the largest rank
        # (zero rows of A and columns of B add nothing, and get no gradient back).
        r = max(self.r[n] for n in used)
        A = torch.stack([F.pad(self.lora_A[n].weight, (0, 0, 0, r - self.r[n])) for n in used])
        B = torch.stack([F.pad(self.lora_B[n].weight, (0, r - self.r[n])) for n in used])
        scaling = torch.tensor([self.scaling[n] for n in used], device=x.device)
        return lora_linear(x, w, b, A, B, scaling, dropout_p=drops.pop(), adapter_ids=ids,
                           backend=self.backend)

    # -- merging ------------------------------------------------------------------------

    def _delta(self, name: str) -> Tensor:
        """s·B·A in fp32 (fp64 for fp64 weights)."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B[name].weight.to(acc) @ self.lora_A[name].weight.to(acc)) \
            * self.scaling[name]

    @torch.no_grad()
    def merge(self, adapter_name: Optional[str] = None) -> None:
        """W ← W + s·B·A for the active adapter (or ``adapter_name``), summed in fp32 and
        rounded once to W's dtype; ``forward(x)`` then runs the base layer alone."""
        name = self.active_adapter if adapter_name is None else adapter_name
        self._known(name)
        if name in self.merged_adapters:
            return
        w, delta = self.base_layer.weight, self._delta(name)
        w.copy_(w.to(delta.dtype) + delta)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W ← W − s·B·A in fp32, in reverse merge order."""
        w = self.base_layer.weight
        while self.merged_adapters:
            delta = self._delta(self.merged_adapters.pop())
            w.copy_(w.to(delta.dtype) - delta)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={ {n: self.r[n] for n in self.lora_A} }, active={self.active_adapter!r}")
