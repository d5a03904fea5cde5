"""Drop-in modules."""
from .attention import GatedCrossAttentionBlock, MultiheadAttention
from .contrastive import ClipLoss, SigLipLoss
from .lora import LoRALinear

__all__ = ["ClipLoss", "GatedCrossAttentionBlock", "LoRALinear", "MultiheadAttention", "SigLipLoss"]
