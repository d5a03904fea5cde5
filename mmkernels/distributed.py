"""The collectives the multi-rank losses need, behind one small interface.

A loss written against ``Comm`` runs unchanged on one process (``LOCAL``: every collective is
the identity) and on many (``DistComm``). Every rank holds ``b`` local pairs; the global batch
is the concatenation over ranks in rank order, so rank ``k``'s pairs sit at rows
``k*b .. (k+1)*b`` of the gathered features.

Gradient convention: each rank's loss is over its own pairs (open_clip's ``local_loss=True``)
and the gradients a rank returns for its features are the derivatives of the *sum of all
ranks' losses*, so that DDP's gradient averaging yields exactly the gradient of the mean loss
over the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """Single process: the global batch is the local batch."""

    world_size = 1
    rank = 0

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logsumexp_across(self, lse: torch.Tensor) -> torch.Tensor:
        return lse


LOCAL = Comm()


class DistComm(Comm):
    """torch.distributed collectives over ``group`` (any backend: nccl, gloo)."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # gloo has no reduce_scatter; an all_reduce followed by taking our slice is equivalent.
        self._has_reduce_scatter = dist.get_backend(group) != "gloo"

    def all_gather(self, x):
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)

    def all_gather_with_grad(self, x):
        return _AllGather.apply(x, self)

    def all_reduce(self, x):
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x

    def reduce_scatter(self, x):
        """Sum ``x`` (global rows) over ranks and keep this rank's rows."""
        b = x.shape[0] // self.world_size
        if self._has_reduce_scatter:
            out = x.new_empty((b,) + tuple(x.shape[1:]))
            dist.reduce_scatter_tensor(out, x.contiguous(), group=self.group)
            return out
        return self.all_reduce(x)[self.rank * b:(self.rank + 1) * b].clone()

    def logsumexp_across(self, lse):
        """Combine per-rank partial log-sum-exps (each over that rank's rows) into the total."""
        return torch.logsumexp(self.all_gather(lse.unsqueeze(0)), dim=0)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad), None


def resolve(op: str, distributed, group, features: torch.Tensor) -> Comm:
    """Pick the Comm for a call. ``distributed=None`` means: use every rank when
    torch.distributed is initialised with more than one process."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() \
            and dist.get_world_size(group) > 1
    if not distributed:
        return LOCAL
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{op}: distributed=True needs torch.distributed to be initialised")
    comm = DistComm(group)
    if comm.world_size == 1:
        return LOCAL
    local_batch = features.shape[0]
    # nccl only moves device tensors: the size check travels on the features' device.
    sizes = comm.all_gather(torch.tensor([local_batch], device=features.device))
    if not bool((sizes == local_batch).all()):
        raise ValueError(f"{op}: every rank must hold the same number of pairs B, "
                         f"got {sizes.tolist()}")
    return comm
