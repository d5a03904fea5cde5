"""Drop-in modules."""
from .attention import GatedCrossAttentionBlock, MultiheadAttention
from .contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "GatedCrossAttentionBlock", "MultiheadAttention", "SigLipLoss"]
