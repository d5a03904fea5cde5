"""The reference fusion model: the same first-step losses on the fused ops and on the eager
reference, the quick demo learns, and DDP training equals single-process training."""
from dataclasses import replace

import pytest
import torch

import mmkernels
from mmkernels.models import demo
from mmkernels.models.fusion import FusionConfig, FusionModel
from mmkernels.models.shapes import ANSWERS, make_split

import gloo

TINY_MODEL = FusionConfig(dim=32, heads=2, image_layers=1, text_layers=1, fusion_layers=1,
                          embed_dim=16)


def test_first_step_losses_fused_equal_eager():
    """Every stage's first loss, same model and seed, on the fused ops and on the reference."""
    cfg = replace(demo.QUICK, n_train=200, batch=16, compare_steps=1, model=TINY_MODEL)
    train = make_split(cfg.n_train, (0, 1))
    result = demo.compare_backends(cfg, train)
    fused, eager = result["fused"]["first_losses"], result["eager"]["first_losses"]
    for stage in ("contrastive", "fusion", "lora"):
        assert abs(fused[stage] - eager[stage]) <= 1e-5 * abs(eager[stage]), (stage, fused,
                                                                               eager)


def test_forward_dispatches_tasks():
    model = FusionModel(TINY_MODEL)
    with pytest.raises(ValueError, match="task must be one of"):
        model("nope")
    data = make_split(4, 0)
    emb, tokens = model("embed_images", data.images)
    assert emb.shape == (4, 16) and tokens.shape == (4, 64, 32)
    # The fusion reads the patch embeddings (fusion_image_layer=0), not the last layer.
    media = model("image_tokens", data.images)
    assert media.shape == (4, 64, 32) and not torch.allclose(media, tokens)
    logits = model("answer_logits", data.question_ids[:4], data.question_mask[:4], media)
    assert logits.shape == (4, len(ANSWERS))


def test_shared_images_equal_copied_images():
    """Texts reading shared images through image_index (one media pass per image, packed varlen
    cross-attention) get the <cls> states and gradients of each text with its own image copy."""
    model = FusionModel(TINY_MODEL).double()
    data = make_split(6, 0)
    q = torch.randperm(len(data.question_ids))[:7]
    index = torch.tensor([4, 0, 4, 2, 0, 4, 5])[torch.randperm(7)]  # images 1 and 3 unused
    tokens = model.image_tokens(data.images.double())
    shared = model.fuse(data.question_ids[q], data.question_mask[q], tokens, index)
    copied = model.fuse(data.question_ids[q], data.question_mask[q], tokens[index])
    torch.testing.assert_close(shared, copied, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(shared)
    params = [p for p in model.parameters()]
    for a, b in zip(torch.autograd.grad((shared * w).sum(), params, allow_unused=True,
                                        retain_graph=True),
                    torch.autograd.grad((copied * w).sum(), params, allow_unused=True)):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

@pytest.mark.slow
def test_quick_demo_learns(tmp_path):
    """The quick config (what CI runs) learns every task: each stage's loss falls, retrieval
    and answers are far above chance, and the adapters served mixed answer as served alone."""
    s = demo.run(demo.QUICK, out_dir=str(tmp_path), quiet=True, compare=False)
    for stage, (first, last) in s["loss_first_last"].items():
        assert last < 0.7 * first, (stage, first, last)
    chance = 1 / demo.QUICK.n_test
    r = s["retrieval"]
    assert r["image_to_text_recall@1"] > 50 * chance and r["text_to_image_recall@1"] > 50 * chance
    assert s["qa_accuracy"]["colour"] > 2 / 6  # 6 colours
    assert s["adapters"]["count"]["accuracy"] > 0.33  # 4 counts
    assert s["adapters"]["relation"]["accuracy"] > 0.45  # yes / no / a colour
    for t in demo.ADAPTER_TYPES:
        assert s["mixed_serving_accuracy"][t] == pytest.approx(s["adapters"][t]["accuracy"],
                                                                abs=1e-6)
    for name in ("demo.json", "demo_loss.png", "demo_gallery.png"):
        assert (tmp_path / name).exists()


# ---------------------------------------------------------------------------------------
# DistributedDataParallel

GLOBAL_BATCH, STEPS = 8, 2


def _train(rank, world):
    torch.manual_seed(0)
    model = FusionModel(TINY_MODEL).double()
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) \
        if world > 1 else model
    data = make_split(GLOBAL_BATCH * STEPS, 5)
    loss_fn = demo.contrastive_loss_fn(model.config)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    b = GLOBAL_BATCH // world
    for step in range(STEPS):
        idx = torch.arange(step * GLOBAL_BATCH + rank * b, step * GLOBAL_BATCH + (rank + 1) * b)
        loss = net("contrastive_loss", data.images[idx].double(), data.caption_ids[idx],
                   data.caption_mask[idx], loss_fn)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    params, ref = gloo.run(_train, 2, tmp_path), _train(0, 1)
    for n, p in params.items():
        torch.testing.assert_close(p, ref[n], rtol=1e-9, atol=1e-11, msg=n)
    torch.manual_seed(0)
    init = FusionModel(TINY_MODEL).double().state_dict()
    assert not torch.equal(params["image_encoder.embed.weight"], init["image_encoder.embed.weight"])
