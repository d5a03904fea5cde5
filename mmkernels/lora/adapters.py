"""LoRA on a whole model: ``apply_lora``, ``mixed_batch``, and PEFT's checkpoint format.

``apply_lora(model, target_modules, r, lora_alpha, ...)`` wraps the matching ``nn.Linear``s
in ``mmkernels.nn.LoRALinear`` in place, matching names as PEFT matches ``target_modules``
(a regex is full-matched against the module's dotted name; a list matches a name equal to
an entry or ending in "." + entry), and freezes every other parameter. It also reaches the
projections of ``mmkernels.nn.MultiheadAttention`` (q_proj, k_proj, v_proj, out_proj, also
for cross-attention with kdim ≠ vdim), which PEFT cannot adapt on torch's module (peft#761:
torch packs them into one parameter and calls out_proj functionally) — so a Linear inside a
``torch.nn.MultiheadAttention`` is refused rather than silently never used.

``save_adapter`` / ``load_adapter`` write and read PEFT's on-disk format: a folder with
``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (PEFT strips the
adapter name on save). ``PeftModel.from_pretrained`` loads what ``save_adapter`` writes and
``load_adapter`` loads what ``PeftModel.save_pretrained`` writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Union

import torch
from torch import nn

from ..nn.lora import LoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _matches(target_modules, name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every ``LoRALinear`` in ``model`` (holding ``adapter_name``, if
    given)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and (adapter_name is None
                                               or adapter_name in module.lora_A):
            yield name, module


def apply_lora(model: nn.Module, target_modules: Union[str, Sequence[str]], r: int,
               lora_alpha: float, lora_dropout: float = 0.0, adapter_name: str = "default",
               use_rslora: bool = False) -> nn.Module:
    """Put a LoRA adapter ``adapter_name`` on every ``nn.Linear`` of ``model`` matched by
    ``target_modules`` (PEFT's rule, see the module doc), freeze every parameter but the new
    adapter's, make it the active adapter, and return ``model`` (changed in place). A layer
    that already has LoRA adapters gets one more."""
    if not isinstance(target_modules, str):
        if isinstance(target_modules, bytes) or not all(isinstance(t, str)
                                                        for t in target_modules):
            raise TypeError(f"apply_lora: target_modules must be a regex string or a list of "
                            f"module-name suffixes, got {target_modules!r}")
        target_modules = list(target_modules)
    modules = dict(model.named_modules())
    targets = []
    for name, module in modules.items():
        if not name or not _matches(target_modules, name):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(parent, LoRALinear):
            continue  # the base_layer inside a wrapper: the wrapper itself is the target
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"apply_lora: {name!r} belongs to a torch.nn.MultiheadAttention, "
                             f"which calls its projections functionally, so an adapter there "
                             f"would never run; use mmkernels.nn.MultiheadAttention (the same "
                             f"constructor and state dict) instead")
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(f"apply_lora: target {name!r} is a {type(module).__name__}; "
                             f"only nn.Linear layers can take LoRA adapters")
        targets.append((name, parent, child, module))
    if not targets:
        raise ValueError(f"apply_lora: target_modules {target_modules!r} matched no nn.Linear "
                         f"in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parent, child, module in targets:
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
            module.set_adapter(adapter_name)
        else:
            module = LoRALinear(module, r, lora_alpha, lora_dropout, use_rslora, adapter_name)
            setattr(parent, child, module)
        for p in (module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight):
            p.requires_grad_(True)
    return model


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """Within the block, every ``LoRALinear`` of ``model`` applies sample i's adapter
    ``adapter_names[i]`` ("__base__" for none) in one fused call per layer — PEFT's
    ``model(x, adapter_names=...)``, for training as well as inference::

        with mmkernels.lora.mixed_batch(model, ["vqa", "count", "__base__"]):
            out = model(x)
    """
    names = list(adapter_names)
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("mixed_batch: the model has no LoRA layers")
    saved = [m.batch_adapter_names for m in layers]
    for m in layers:
        m.batch_adapter_names = names
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.batch_adapter_names = s


# ---------------------------------------------------------------------------------------
# PEFT's on-disk format
# ---------------------------------------------------------------------------------------

def _one(values: dict, what: str, adapter_name: str):
    distinct = set(values.values())
    if len(distinct) != 1:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} has different {what} per "
                         f"layer ({values}); PEFT's rank_pattern/alpha_pattern are not supported")
    return distinct.pop()


def save_adapter(model: nn.Module, path: Union[str, os.PathLike],
                 adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name`` of ``model`` to the folder ``path`` in PEFT's format
    (created if needed). ``target_modules`` is saved as the adapted modules' full names, so
    PEFT rebuilds exactly the same layers."""
    from safetensors.torch import save_file

    layers = dict(lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"save_adapter: the model has no LoRA adapter {adapter_name!r}")
    config = {
        "peft_type": "LORA",
        "r": _one({n: m.r[adapter_name] for n, m in layers.items()}, "ranks", adapter_name),
        "lora_alpha": _one({n: m.lora_alpha[adapter_name] for n, m in layers.items()},
                           "lora_alpha", adapter_name),
        "lora_dropout": _one({n: getattr(m.lora_dropout[adapter_name], "p", 0.0)
                              for n, m in layers.items()}, "dropouts", adapter_name),
        "use_rslora": _one({n: m.use_rslora[adapter_name] for n, m in layers.items()},
                           "use_rslora", adapter_name),
        "target_modules": sorted(layers),
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "task_type": None,
        "inference_mode": True, "base_model_name_or_path": None, "revision": None,
    }
    tensors = {}
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part)[adapter_name].weight
            tensors[f"{_PREFIX}{name}.{part}.weight"] = w.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})


# PEFT options whose non-default values change the layer's math in ways LoRALinear does not
# implement: loading such an adapter must fail, never run as something else.
_UNSUPPORTED = {"fan_in_fan_out": False, "use_dora": False, "rank_pattern": {},
                "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
                "lora_bias": False, "target_parameters": None, "exclude_modules": None,
                "use_qalora": False, "alora_invocation_tokens": None, "layer_replication": None,
                "trainable_token_indices": None, "use_bdlora": None, "arrow_config": None}


def load_adapter(model: nn.Module, path: Union[str, os.PathLike],
                 adapter_name: str = "default") -> nn.Module:
    """Read a PEFT LoRA adapter from the folder ``path`` into ``model`` as ``adapter_name``:
    the layers are created with ``apply_lora`` from the saved config when the model does not
    have that adapter yet, then every adapter weight is loaded (a missing or unexpected key,
    or a shape mismatch, is an error). Returns ``model``."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {path} holds a {config.get('peft_type')!r} adapter, "
                         f"not LORA")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, None, {}, [], False):
            raise ValueError(f"load_adapter: the adapter sets {key}={value!r}, which mmkernels' "
                             f"LoRALinear does not support")
    if config.get("bias", "none") != "none":
        raise ValueError(f"load_adapter: the adapter trains biases (bias={config['bias']!r}), "
                         f"which mmkernels' LoRALinear does not support")
    if not any(True for _ in lora_layers(model, adapter_name)):
        apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"],
                   config.get("lora_dropout", 0.0), adapter_name,
                   config.get("use_rslora", False))
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    expected = set()
    for name, m in lora_layers(model, adapter_name):
        for part in ("lora_A", "lora_B"):
            key = f"{_PREFIX}{name}.{part}.weight"
            expected.add(key)
            if key not in state:
                raise ValueError(f"load_adapter: {WEIGHTS_NAME} has no {key!r}")
            w = getattr(m, part)[adapter_name].weight
            if state[key].shape != w.shape:
                raise ValueError(f"load_adapter: {key!r} has shape {tuple(state[key].shape)}, "
                                 f"the model's layer needs {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(state[key])
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"load_adapter: {WEIGHTS_NAME} has weights for layers the model does "
                         f"not adapt: {unexpected[:5]}")
    return model
