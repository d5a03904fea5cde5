"""LoRA: model-level ``apply_lora`` / ``mixed_batch`` and PEFT's checkpoint format
(``save_adapter`` / ``load_adapter``). The fused op is ``mmkernels.lora_linear``
(``lora/lora_linear.py``)."""
from .adapters import apply_lora, load_adapter, lora_layers, mixed_batch, save_adapter

__all__ = ["apply_lora", "load_adapter", "lora_layers", "mixed_batch", "save_adapter"]
