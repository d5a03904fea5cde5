"""LoRA under DistributedDataParallel (gloo, 2 CPU processes): only the adapters train and
are all-reduced, and 3 steps equal single-process training on the concatenated batch."""
import pytest
import torch
from torch import nn

import mmkernels

import gloo

GLOBAL_BATCH = 8
STEPS = 3
BACKENDS = [b for b in ("reference", "cpu") if b in mmkernels.available_backends()]


class Model(nn.Module):
    """Cross-attention of text over image tokens (kdim ≠ embed_dim) and an MLP head."""

    def __init__(self):
        super().__init__()
        self.cross = mmkernels.nn.MultiheadAttention(16, 2, kdim=12, vdim=12, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, text, image):
        h = text + self.cross(text, image, image, need_weights=False)[0]
        return self.fc2(torch.relu(self.fc1(h))).mean(1)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(GLOBAL_BATCH, 5, 16, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 7, 12, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))


def train(backend, rank, world):
    torch.manual_seed(0)
    model = Model().double()
    mmkernels.apply_lora(model, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"], r=4,
                         lora_alpha=8)
    for _, m in mmkernels.lora.lora_layers(model):
        m.backend = backend
        with torch.no_grad():
            m.lora_B["default"].weight.normal_(0, 0.1)  # start away from B = 0
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    b = GLOBAL_BATCH // world
    frozen_grads = []
    for step in range(STEPS):
        text, image, labels = (t[rank * b:(rank + 1) * b] for t in batch(step))
        loss = nn.functional.cross_entropy(net(text, image), labels)
        opt.zero_grad()
        loss.backward()
        frozen_grads += [n for n, p in model.named_parameters()
                         if not p.requires_grad and p.grad is not None]
        opt.step()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return initial, final, trainable, frozen_grads


def _train_every_backend(rank, world):
    return {backend: train(backend, rank, world) for backend in BACKENDS}


@pytest.mark.slow
def test_ddp_trains_only_adapters_and_matches_single_process(tmp_path):
    results = gloo.run(_train_every_backend, 2, tmp_path)
    for backend in BACKENDS:
        initial, params, trainable, frozen_grads = results[backend]
        _, ref_params, _, _ = train(backend, rank=0, world=1)
        assert trainable and all(".lora_" in n for n in trainable), trainable
        assert not frozen_grads, f"frozen parameters got gradients: {frozen_grads}"
        for n, p in params.items():
            assert torch.equal(p, initial[n]) != (n in trainable), f"{n} moved or not"
            torch.testing.assert_close(p, ref_params[n], rtol=1e-10, atol=1e-12,
                                       msg=f"{backend}: {n}")
