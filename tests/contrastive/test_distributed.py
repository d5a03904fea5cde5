"""Multi-process training with torch.distributed (gloo, CPU): after a few DDP steps every
rank's parameters must equal single-process training on the concatenated global batch."""
import math

import pytest
import torch

import mmkernels

import gloo

GLOBAL_BATCH = 12  # divisible by 2 and 4 ranks
STEPS = 3
BACKENDS = [b for b in ("reference", "cpu") if b in mmkernels.available_backends()]
CASES = [(loss, backend) for loss in ("infonce", "siglip") for backend in BACKENDS]


class TinyClip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(10, 6)
        self.text = torch.nn.Linear(8, 6)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-2.0))

    def forward(self, x_image, x_text):
        image = torch.nn.functional.normalize(self.image(x_image), dim=-1)
        text = torch.nn.functional.normalize(self.text(x_text), dim=-1)
        return image, text, self.log_scale.exp(), self.bias


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(GLOBAL_BATCH, 10, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64))


def train(loss_name, backend, rank, world):
    """Train TinyClip for STEPS steps on this rank's slice; return (params, first loss)."""
    torch.manual_seed(0)  # identical initial parameters everywhere
    model = TinyClip().double()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b = GLOBAL_BATCH // world
    first_loss = None
    for step in range(STEPS):
        x_image, x_text = (x[rank * b:(rank + 1) * b] for x in global_batch(step))
        image, text, scale, bias = model(x_image, x_text)
        if loss_name == "infonce":
            loss = mmkernels.infonce_loss(image, text, scale, bias, label_smoothing=0.1,
                                          backend=backend)
        else:
            loss = mmkernels.siglip_loss(image, text, scale, bias, backend=backend)
        first_loss = loss.detach() if first_loss is None else first_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    module = model.module if world > 1 else model
    return [p.detach().clone() for p in module.parameters()], first_loss


def _train_every_case(rank, world):
    import torch.distributed as dist
    results = {}
    for case in CASES:
        params, loss = train(*case, rank, world)
        losses = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(losses, loss)
        results[case] = (params, torch.stack(losses))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_matches_single_process(world, tmp_path):
    results = gloo.run(_train_every_case, world, tmp_path)
    for case in CASES:
        params, rank_losses = results[case]
        ref_params, ref_loss = train(*case, rank=0, world=1)
        # Each rank reports the loss of its own pairs against the global batch; their mean
        # is the single-process loss.
        torch.testing.assert_close(rank_losses.mean(), ref_loss, rtol=1e-12, atol=0,
                                   msg=f"{case}: loss")
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12, msg=f"{case}: params")


# ---------------------------------------------------------------------------------------------
# open_clip's ClipLoss flags: mmkernels.nn.ClipLoss must give open_clip's update and returned
# loss for all four (local_loss, gather_with_grad) combinations.

FLAGS = [(False, False), (False, True), (True, False), (True, True)]
OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5),
              "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)}


def train_clip_loss(make_loss, optimizer, rank, world):
    """Train TinyClip (DDP when world > 1) with ``make_loss()``; return the parameters and the
    loss this rank returned at each step."""
    torch.manual_seed(0)
    model = TinyClip().double()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = OPTIMIZERS[optimizer](model.parameters())
    loss_fn = make_loss()
    b = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        x_image, x_text = (x[rank * b:(rank + 1) * b] for x in global_batch(step))
        image, text, scale, bias = model(x_image, x_text)
        loss = loss_fn(image, text, scale, bias)
        losses.append(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    module = model.module if world > 1 else model
    return [p.detach().clone() for p in module.parameters()], torch.stack(losses)


def _train_open_clip_and_ours(rank, world):
    import torch.distributed as dist

    from mmkernels.tools.bench.peers import load_open_clip_loss
    open_clip_loss = load_open_clip_loss()
    results = {}
    for local_loss, gather_with_grad in FLAGS:
        flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                     world_size=world)
        for optimizer in OPTIMIZERS:
            results[(local_loss, gather_with_grad, optimizer, "open_clip")] = train_clip_loss(
                lambda: open_clip_loss.ClipLoss(**flags), optimizer, rank, world)
            for backend in BACKENDS:
                results[(local_loss, gather_with_grad, optimizer, backend)] = train_clip_loss(
                    lambda: mmkernels.nn.ClipLoss(**flags, backend=backend), optimizer, rank,
                    world)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    return gathered


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_clip_loss_flags_match_open_clip(world, tmp_path):
    from mmkernels.tools.bench.peers import PeerUnavailable, load_open_clip_loss
    try:
        load_open_clip_loss()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    per_rank = gloo.run(_train_open_clip_and_ours, world, tmp_path)
    for local_loss, gather_with_grad in FLAGS:
        for optimizer in OPTIMIZERS:
            key = (local_loss, gather_with_grad, optimizer)
            for rank, results in enumerate(per_rank):
                ref_params, ref_losses = results[key + ("open_clip",)]
                for backend in BACKENDS:
                    params, losses = results[key + (backend,)]
                    what = f"{key} {backend} rank {rank}"
                    torch.testing.assert_close(losses, ref_losses, rtol=1e-10, atol=1e-12,
                                               msg=f"{what}: returned losses")
                    for p, r in zip(params, ref_params):
                        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-11,
                                                   msg=f"{what}: parameters")
