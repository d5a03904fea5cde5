"""``FusionModel``: a small vision–language model on mmkernels' ops (a mini-ALBEF with Flamingo
gates), the example of how every public op is used.

    image ─ patches ─ ImageEncoder ─┬─ pooled ─ proj ─┐
                                    │                 ├─ ClipLoss / SigLipLoss (contrastive)
    caption ─ TextEncoder ─ pooled ─┼──────── proj ───┘
                                    │ image tokens (media)
    question ─ TextEncoder ─ tokens ─ FusionLayer × n ─ <cls> ─ answer head
    caption  ─ TextEncoder ─ tokens ─ (the same layers) ─ <cls> ─ matching head

    FusionLayer = GatedCrossAttentionBlock (text → image tokens) + a text self-attention layer

* Attention everywhere is ``mmkernels.nn.MultiheadAttention`` (the fused cross-attention
  kernel): self-attention in both encoders, with the text's key-padding masks, and the
  text-over-image cross-attention of the fusion layers. There, the texts about one image
  (its questions and its caption) attend it as one packed variable-length sequence
  (``cross_attention_varlen``): each image's keys and values are projected once.
* The contrastive loss is ``mmkernels.nn.ClipLoss`` (or ``SigLipLoss``, with a learnable bias):
  over every rank's negatives under DDP.
* LoRA (``mmkernels.apply_lora``) adapts the fusion blocks and the answer head per task, and
  ``mmkernels.lora.mixed_batch`` serves several adapters in one batch.

Every op follows ``backend="auto"``; ``mmkernels.use_backend("reference")`` runs the same model
on the eager reference ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as mnn
from .shapes import ANSWERS, TOKENIZER


@dataclass(frozen=True)
class FusionConfig:
    image_size: int = 32
    patch: int = 4                # the stride between patches
    patch_kernel: int = 8         # each patch's side: overlapping patches when > patch
    dim: int = 64
    heads: int = 4
    image_layers: int = 2
    text_layers: int = 2
    fusion_layers: int = 2
    fusion_image_layer: int = 0   # the image encoder's hidden state the fusion reads
    media_layers: int = 1         # trainable layers over those image tokens
    embed_dim: int = 64           # the contrastive embedding
    max_text_len: int = 32
    vocab_size: int = TOKENIZER.vocab_size
    answers: int = len(ANSWERS)
    loss: str = "clip"            # "clip" (InfoNCE) or "siglip"


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = mnn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class FusionLayer(nn.Module):
    """Flamingo's gated cross-attention block (text tokens attend to the image tokens), then a
    trainable self-attention layer over the text. The self-attention matters: with only
    cross-attention each text token would query the image alone, so the <cls> state could use
    only what the frozen encoder already put into <cls>; here every word's look at the image
    (the colour next to "square") reaches <cls> (ALBEF's fusion layer has the same three parts)."""

    def __init__(self, c: "FusionConfig"):
        super().__init__()
        self.cross = mnn.GatedCrossAttentionBlock(c.dim, c.heads)
        self.self_attn = EncoderLayer(c.dim, c.heads)
        # Flamingo's gates start at 0 (identity); here the blocks are the only path from the
        # image to the answer, so they start half open.
        with torch.no_grad():
            self.cross.attn_gate.fill_(0.5)
            self.cross.ff_gate.fill_(0.5)

    def forward(self, x: Tensor, padding: Tensor, image_tokens: Tensor,
                image_index: Tensor | None = None) -> Tensor:
        return self.self_attn(self.cross(x, image_tokens, media_index=image_index), padding)


class ImageEncoder(nn.Module):
    """Patch embedding (k×k patches every p pixels, one Linear) + learned positions + layers.

    Overlapping patches (k = 2p, as the overlapping patch embeddings of PVTv2/SegFormer): the
    objects sit at the corners between patches, so with k = p no token sees a whole small
    shape, and the binding of colour to shape must be learned by attention alone (measured:
    retrieval mistakes were mostly objects with swapped colours or shapes)."""

    def __init__(self, c: FusionConfig):
        super().__init__()
        self.patch, self.kernel = c.patch, c.patch_kernel
        n = (c.image_size // c.patch) ** 2
        self.embed = nn.Linear(3 * c.patch_kernel ** 2, c.dim)
        self.pos = nn.Parameter(torch.randn(1, n, c.dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(c.dim, c.heads) for _ in range(c.image_layers))
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, images: Tensor, layers: int | None = None) -> Tensor:
        """(B, 3, H, W) → image tokens (B, (H/p)·(W/p), dim): the hidden state after the first
        ``layers`` layers (all by default; 0 = the patch embeddings), through the final norm."""
        p, k = self.patch, self.kernel
        patches = F.unfold(images, kernel_size=k, stride=p, padding=(k - p) // 2).transpose(1, 2)
        x = self.embed(patches) + self.pos
        for layer in self.layers[:layers]:
            x = layer(x)
        return self.norm(x)


class TextEncoder(nn.Module):
    """Token + position embeddings and layers with the key-padding mask (True = padding)."""

    def __init__(self, c: FusionConfig):
        super().__init__()
        self.tokens = nn.Embedding(c.vocab_size, c.dim, padding_idx=TOKENIZER.pad_id)
        self.pos = nn.Parameter(torch.randn(1, c.max_text_len, c.dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(c.dim, c.heads) for _ in range(c.text_layers))
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        x = self.tokens(ids) + self.pos[:, :ids.shape[1]]
        for layer in self.layers:
            x = layer(x, padding)
        return self.norm(x)


class FusionModel(nn.Module):
    """See the module doc. Each task has its method; ``forward(task, *args)`` calls it, so that
    DistributedDataParallel (which synchronises through ``forward``) wraps any task."""

    def __init__(self, config: FusionConfig = FusionConfig()):
        super().__init__()
        c = self.config = config
        self.image_encoder = ImageEncoder(c)
        self.text_encoder = TextEncoder(c)
        self.image_proj = nn.Linear(c.dim, c.embed_dim)
        self.text_proj = nn.Linear(c.dim, c.embed_dim)
        # CLIP's initial temperature 1/0.07; SigLIP's log 10 and bias −10.
        init_scale = 10.0 if c.loss == "siglip" else 1 / 0.07
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)).log())
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if c.loss == "siglip" else None
        # What the fusion reads of the frozen image encoder. Its last layer's tokens are shaped
        # by the pooled contrastive loss: every token carries the scene, no longer its own
        # patch (LLaVA reads CLIP's penultimate layer for the same reason). Measured after
        # 600 contrastive steps, 600 question-answering steps: colour/shape accuracy 0.61/0.33
        # from the last layer, 0.72/0.68 from the patch embeddings; with one trainable layer
        # over the patch embeddings (Flamingo's Perceiver Resampler plays that part between
        # its frozen encoder and the gated blocks), 0.97/0.97 after 1,200 steps.
        self.media = nn.ModuleList(EncoderLayer(c.dim, c.heads) for _ in range(c.media_layers))
        self.fusion = nn.ModuleList(FusionLayer(c) for _ in range(c.fusion_layers))
        self.answer_head = nn.Linear(c.dim, c.answers)
        self.match_head = nn.Linear(c.dim, 2)

    TASKS = ("contrastive_loss", "answer_logits", "match_logits", "embed_images", "embed_texts",
             "image_tokens")

    def forward(self, task: str, *args):
        if task not in self.TASKS:
            raise ValueError(f"FusionModel: task must be one of {self.TASKS}, got {task!r}")
        return getattr(self, task)(*args)

    # -- contrastive ----------------------------------------------------------------------

    def embed_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(normalised embeddings (B, embed_dim), last-layer image tokens (B, P, dim))."""
        tokens = self.image_encoder(images)
        return F.normalize(self.image_proj(tokens.mean(1)), dim=-1), tokens

    def embed_texts(self, ids: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        """(normalised embeddings (B, embed_dim) from the <cls> token, tokens (B, L, dim))."""
        tokens = self.text_encoder(ids, padding)
        return F.normalize(self.text_proj(tokens[:, 0]), dim=-1), tokens

    def contrastive_loss(self, images: Tensor, ids: Tensor, padding: Tensor,
                         loss_fn: nn.Module) -> Tensor:
        image, _ = self.embed_images(images)
        text, _ = self.embed_texts(ids, padding)
        scale = self.logit_scale.clamp(max=4.6052).exp()  # CLIP's cap of 100
        if self.logit_bias is None:
            return loss_fn(image, text, scale)
        return loss_fn(image, text, scale, self.logit_bias)

    # -- fusion ---------------------------------------------------------------------------

    def image_tokens(self, images: Tensor) -> Tensor:
        """The image tokens the fusion reads (B, P, dim): the image encoder's hidden state
        after ``fusion_image_layer`` layers; the layers after it are not run."""
        return self.image_encoder(images, self.config.fusion_image_layer)

    def fuse(self, ids: Tensor, padding: Tensor, image_tokens: Tensor,
             image_index: Tensor | None = None) -> Tensor:
        """Text tokens attending to ``image_tokens(images)`` through the trainable media layers
        and the fusion layers → the <cls> state (T, dim). Text i reads image ``image_index[i]``
        (default: image i). The texts about one image share its media pass, and in each fusion
        layer its key/value projections: their tokens attend it as one packed sequence of
        ``cross_attention_varlen`` (``GatedCrossAttentionBlock``'s ``media_index``)."""
        for layer in self.media:
            image_tokens = layer(image_tokens)
        x = self.text_encoder(ids, padding)
        for layer in self.fusion:
            x = layer(x, padding, image_tokens, image_index)
        return x[:, 0]

    def answer_logits(self, question_ids: Tensor, question_padding: Tensor,
                      image_tokens: Tensor, image_index: Tensor | None = None) -> Tensor:
        return self.answer_head(self.fuse(question_ids, question_padding, image_tokens,
                                          image_index))

    def match_logits(self, caption_ids: Tensor, caption_padding: Tensor,
                     image_tokens: Tensor, image_index: Tensor | None = None) -> Tensor:
        return self.match_head(self.fuse(caption_ids, caption_padding, image_tokens,
                                         image_index))
