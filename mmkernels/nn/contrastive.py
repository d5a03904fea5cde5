"""Drop-ins for open_clip's ``ClipLoss`` and ``SigLipLoss``: same constructor arguments, same
forward signatures, same returned values, computed by the fused losses."""
from typing import Optional

from torch import nn

from ..contrastive.infonce import infonce_loss
from ..contrastive.siglip import siglip_loss


def _distributed(world_size: int) -> Optional[bool]:
    # open_clip gathers exactly when world_size > 1; so do we (through torch.distributed).
    return world_size > 1


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss computed without materializing the B×B logits.

    With ``world_size > 1`` (torch.distributed initialised) ``local_loss`` and
    ``gather_with_grad`` mean what they mean in open_clip, for the returned loss and for the
    update after DDP's averaging (see ``mmkernels.infonce_loss``), still fused: no rank builds a
    global B×B matrix. ``local_loss=True, gather_with_grad=True`` is the combination whose
    update equals single-process training on the global batch; open_clip's defaults (both
    False) give the encoders 1/world_size of that gradient, in open_clip and here alike.
    ``cache_labels`` is accepted for signature compatibility (no labels are built).
    Extra keyword-only knobs: ``label_smoothing``, ``backend``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, label_smoothing: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: use_horovod is not supported; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.label_smoothing = label_smoothing
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict: bool = False):
        loss = infonce_loss(image_features, text_features, logit_scale, logit_bias,
                            label_smoothing=self.label_smoothing, backend=self.backend,
                            distributed=_distributed(self.world_size),
                            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss computed without the B×B logits.

    Multi-rank: the same loss open_clip's exchanges compute (this rank's images against every
    rank's texts), through one all-gather of the texts whatever ``dist_impl`` says.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto"):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError("SigLipLoss: dist_impl must be one of 'bidir', 'shift', 'reduce', "
                             f"'gather', got {dist_impl!r}")
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias,
                output_dict: bool = False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias,
                           backend=self.backend, distributed=_distributed(self.world_size))
        return {"contrastive_loss": loss} if output_dict else loss
