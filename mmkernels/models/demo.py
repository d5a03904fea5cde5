"""``python -m mmkernels demo``: train ``FusionModel`` on the shapes data set, end to end on
mmkernels' kernels, and compare it with the same model on the eager reference ops.

Stages (each with a progress bar, its wall time, throughput and peak memory):
  1. contrastive pre-training of the image and text encoders (ClipLoss over caption pairs);
  2. fusion training, encoders frozen: question answering on the colour and shape questions
     and image–text matching (a caption or another image's caption);
  3. LoRA: one adapter per new question type (count, relation) on the fusion blocks and the
     answer head, each against training only a new answer head on that type; then both
     adapters served in one mixed batch (an adapter name per sample).

Prints held-out recall@1/@5 both ways over the test pairs, question-answering accuracy per
type, and each adapter's accuracy served mixed; writes ``demo.json``, ``demo_loss.png`` and
``demo_gallery.png`` under the output folder. The speed and memory comparison runs a few steps
of every stage on both backends (``--backend`` picks the main run's).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mmkernels

from ..tools.bench.harness import PeakMemory
from .fusion import FusionConfig, FusionModel
from .shapes import ANSWERS, QUESTION_TYPES, TOKENIZER, make_split

BASE_TYPES = ("colour", "shape")       # stage 2
ADAPTER_TYPES = ("count", "relation")  # stage 3, one LoRA adapter each
# Every Linear of the media and fusion layers (attention projections and MLPs) and the answer head.
LORA_TARGETS = r"(media|fusion)\.\d+\..*\.((q|k|v|out)_proj|ff\.[03]|mlp\.[02])|answer_head"


@dataclass(frozen=True)
class DemoConfig:
    n_train: int = 20000
    n_test: int = 1000
    batch: int = 128
    contrastive_steps: int = 2400
    fusion_steps: int = 1200
    adapter_steps: int = 400
    lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    compare_steps: int = 10   # steps of each stage timed on both backends
    seed: int = 0
    device: str = "cpu"       # "cuda": bf16 autocast
    model: FusionConfig = FusionConfig()


QUICK = DemoConfig(n_train=3000, n_test=500, contrastive_steps=250, fusion_steps=250,
                   adapter_steps=80, compare_steps=3)


# ---------------------------------------------------------------------------------------
# One step of each task
# ---------------------------------------------------------------------------------------

def autocast(device: str):
    """bf16 autocast on a GPU; fp32 on the CPU (where bf16 matmuls are slower)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def contrastive_step(model, data, idx, loss_fn):
    return model.contrastive_loss(data.images[idx], data.caption_ids[idx],
                                  data.caption_mask[idx], loss_fn)


def fused_state(model, data, q_idx):
    """The fused <cls> states of questions ``q_idx``; each image's tokens and media pass are
    computed once for all its questions. The image encoder is frozen here (no grad)."""
    images, image_index = torch.unique(data.question_image[q_idx], return_inverse=True)
    with torch.no_grad():
        tokens = model.image_tokens(data.images[images])
    return model.fuse(data.question_ids[q_idx], data.question_mask[q_idx], tokens, image_index)


def qa_step(model, data, q_idx):
    """Cross-entropy of the answers of questions ``q_idx``."""
    return F.cross_entropy(model.answer_head(fused_state(model, data, q_idx)),
                           data.answers[q_idx])


def questions_about(data, idx, types):
    """The questions of ``types`` about images ``idx`` and, for each, its image's position in
    ``idx`` (the questions of an image are consecutive)."""
    per = data.questions_per_image
    q = (idx[:, None] * per + torch.arange(per)).flatten()
    keep = _of_types(data, types)[q]
    return q[keep], torch.arange(len(idx)).repeat_interleave(per)[keep]


def match_pairs(data, idx, gen):
    """Each image of ``idx`` with its own caption (label 1) or, half the time, another one of
    the batch (label 0; 1 again when the shuffle drew its own or an identical caption)."""
    other = idx[torch.randperm(len(idx), generator=gen)]
    negative = torch.rand(len(idx), generator=gen) < 0.5
    cap = torch.where(negative, other, idx)
    same = torch.tensor([data.captions[a] == data.captions[b]
                         for a, b in zip(idx.tolist(), cap.tolist())])
    return cap, same.long()


def fusion_step(model, data, idx, gen):
    """Stage 2 on images ``idx``: the answers of their colour and shape questions plus
    image–text matching over ``match_pairs``. The questions and captions go through the fusion
    in one batch (questions padded to the caption length), one media pass per image."""
    q, q_image = questions_about(data, idx, BASE_TYPES)
    cap, labels = match_pairs(data, idx, gen)
    extra = data.caption_ids.shape[1] - data.question_ids.shape[1]
    ids = torch.cat([F.pad(data.question_ids[q], (0, extra), value=TOKENIZER.pad_id),
                     data.caption_ids[cap]])
    padding = torch.cat([F.pad(data.question_mask[q], (0, extra), value=True),
                         data.caption_mask[cap]])
    with torch.no_grad():
        tokens = model.image_tokens(data.images[idx])
    state = model.fuse(ids, padding, tokens, torch.cat([q_image, torch.arange(len(idx))]))
    n = len(q)
    loss = F.cross_entropy(model.answer_head(state[:n]), data.answers[q]) + \
        F.cross_entropy(model.match_head(state[n:]), labels.to(state.device))
    return loss, n + len(idx)


def _of_types(data, types) -> torch.Tensor:
    """For every question of ``data``, whether its type is one of ``types`` (on the CPU)."""
    codes = torch.tensor([QUESTION_TYPES.index(t) for t in types])
    return torch.isin(data.question_type.cpu(), codes)


def questions_of(data, types) -> torch.Tensor:
    return _of_types(data, types).nonzero()[:, 0]


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def retrieval(model, data, chunk=500) -> dict:
    model.eval()
    with autocast(data.images.device):
        image = torch.cat([model.embed_images(data.images[i:i + chunk])[0]
                           for i in range(0, len(data), chunk)])
        text = torch.cat([model.embed_texts(data.caption_ids[i:i + chunk],
                                            data.caption_mask[i:i + chunk])[0]
                          for i in range(0, len(data), chunk)])
    sim = image.float().cpu() @ text.float().cpu().T
    # A caption equal to the true one (a duplicate scene description) counts as correct.
    same = torch.tensor([[a == b for b in data.captions] for a in data.captions])
    out = {}
    for name, s, ok in (("image_to_text", sim, same), ("text_to_image", sim.T, same.T)):
        ranks = s.argsort(dim=1, descending=True)
        hits = ok.gather(1, ranks)
        for k in (1, 5):
            out[f"{name}_recall@{k}"] = hits[:, :k].any(1).float().mean().item()
    model.train()
    return out


@torch.no_grad()
def answer_accuracy(model, data, q_idx, head=None, chunk=1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(q_idx), chunk):
        q = q_idx[i:i + chunk]
        with autocast(data.images.device):
            pred = (head or model.answer_head)(fused_state(model, data, q)).argmax(1)
        correct += (pred == data.answers[q]).sum().item()
    model.train()
    return correct / max(len(q_idx), 1)


@torch.no_grad()
def match_accuracy(model, data, seed=0) -> float:
    """Image–text matching accuracy over every test image, half with another's caption."""
    model.eval()
    idx = torch.arange(len(data))
    cap, labels = match_pairs(data, idx, torch.Generator().manual_seed(seed))
    with autocast(data.images.device):
        logits = model.match_logits(data.caption_ids[cap], data.caption_mask[cap],
                                    model.image_tokens(data.images))
    model.train()
    return (logits.argmax(1).cpu() == labels).float().mean().item()


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------

class Stage:
    """Times a stage: wall time, samples/s and peak extra memory (RSS on CPU)."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device

    def __enter__(self):
        self.memory = PeakMemory(self.device)
        self.memory.start()
        self.t0 = time.perf_counter()
        self.samples = 0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak_mib = self.memory.extra() / 2**20
        return False

    def summary(self) -> dict:
        return {"seconds": round(self.seconds, 2), "samples": self.samples,
                "samples_per_s": round(self.samples / max(self.seconds, 1e-9), 1),
                "peak_extra_mib": round(self.peak_mib, 1)}


def _train(params, steps, lr, step_fn, desc, stage, losses, quiet=False):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    # One-cycle: a 10% warm-up (at least 2 steps: the schedule needs them), cosine decay.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, lr, total_steps=steps, pct_start=min(max(0.1, 2.5 / steps), 0.5)) \
        if steps >= 3 else None
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False, dynamic_ncols=True)
    for step in bar:
        with autocast(stage.device):
            loss, n = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        stage.samples += n
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")


def contrastive_loss_fn(config: FusionConfig):
    """ClipLoss (or SigLipLoss). Under torch.distributed every rank's negatives are used, with
    open_clip's local_loss=True, gather_with_grad=True: DDP's averaged update is then exactly
    single-process training on the concatenated batch."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if config.loss == "siglip":
        return mmkernels.nn.SigLipLoss(rank=rank, world_size=world)
    return mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                 world_size=world)


def stage_contrastive(model, train, cfg, gen, losses, stage, quiet=False):
    loss_fn = contrastive_loss_fn(model.config)
    params = [p for n, p in model.named_parameters()
              if n.split(".")[0] in ("image_encoder", "text_encoder", "image_proj", "text_proj",
                                     "logit_scale", "logit_bias")]

    def step(_):
        idx = torch.randint(0, len(train), (cfg.batch,), generator=gen)
        return contrastive_step(model, train, idx, loss_fn), cfg.batch
    _train(params, cfg.contrastive_steps, cfg.lr, step, "1 contrastive", stage, losses, quiet)


def stage_fusion(model, train, cfg, gen, losses, stage, quiet=False):
    for part in (model.image_encoder, model.text_encoder, model.image_proj, model.text_proj):
        part.requires_grad_(False)
    params = [p for n, p in model.named_parameters()
              if n.split(".")[0] in ("media", "fusion", "answer_head", "match_head")]

    def step(_):
        # Half a batch of images: with ~2 colour/shape questions each and one caption, about
        # 1.5 batches of texts.
        idx = torch.randint(0, len(train), (cfg.batch // 2,), generator=gen)
        return fusion_step(model, train, idx, gen)
    _train(params, cfg.fusion_steps, cfg.lr, step, "2 fusion", stage, losses, quiet)


def stage_adapter(model, train, cfg, gen, qtype, losses, stage, quiet=False):
    """LoRA adapter ``qtype`` on the fusion blocks and the answer head (the rest frozen)."""
    mmkernels.apply_lora(model, LORA_TARGETS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                         adapter_name=qtype)
    q_pool = questions_of(train, (qtype,))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(_):
        q = q_pool[torch.randint(0, len(q_pool), (cfg.batch,), generator=gen)]
        return qa_step(model, train, q), cfg.batch
    _train(params, cfg.adapter_steps, cfg.lr, step, f"3 lora {qtype}", stage, losses, quiet)


def head_only_baseline(model, train, test, cfg, gen, qtype) -> float:
    """A new answer head trained on ``qtype`` over the frozen fusion model (no adapter)."""
    head = copy.deepcopy(model.answer_head)
    head.reset_parameters()
    q_pool = questions_of(train, (qtype,))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr)
    for _ in range(cfg.adapter_steps):
        q = q_pool[torch.randint(0, len(q_pool), (cfg.batch,), generator=gen)]
        with torch.no_grad(), autocast(cfg.device):
            fused = fused_state(model, train, q)
        with autocast(cfg.device):
            loss = F.cross_entropy(head(fused), train.answers[q])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return answer_accuracy(model, test, questions_of(test, (qtype,)), head=head)


def mixed_serving(model, test) -> dict:
    """Both adapters in one batch: each question served by its type's adapter."""
    q = questions_of(test, ADAPTER_TYPES)
    names = [QUESTION_TYPES[t] for t in test.question_type[q].tolist()]
    with mmkernels.lora.mixed_batch(model, names):
        acc = {}
        model.eval()
        with torch.no_grad(), autocast(test.images.device):
            # One image per question: the media layers' rows carry the adapter names too.
            tokens = model.image_tokens(test.images[test.question_image[q]])
            pred = model.answer_logits(test.question_ids[q], test.question_mask[q],
                                       tokens).argmax(1)
        model.train()
    right = (pred == test.answers[q]).cpu()
    for t in ADAPTER_TYPES:
        sel = torch.tensor([n == t for n in names])
        acc[t] = right[sel].float().mean().item()
    return acc


# ---------------------------------------------------------------------------------------
# The fused-vs-eager comparison: a few steps of each stage on each backend
# ---------------------------------------------------------------------------------------

def compare_backends(cfg: DemoConfig, train) -> dict:
    steps = max(cfg.compare_steps, 1)
    short = replace(cfg, contrastive_steps=steps, fusion_steps=steps, adapter_steps=steps)
    out = {}
    for backend in ("auto", "reference"):
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model = FusionModel(cfg.model).to(cfg.device)
        seconds, peak, first = 0.0, 0.0, {}
        with mmkernels.use_backend(backend):
            for name, run in (
                    ("contrastive", lambda s, l: stage_contrastive(model, train, short, gen, l, s,
                                                                   True)),
                    ("fusion", lambda s, l: stage_fusion(model, train, short, gen, l, s, True)),
                    ("lora", lambda s, l: stage_adapter(model, train, short, gen, "count", l, s,
                                                        True))):
                losses = []
                with Stage(name, cfg.device) as stage:
                    run(stage, losses)
                seconds += stage.seconds
                peak = max(peak, stage.peak_mib)
                first[name] = losses[0]
        out[backend] = {"seconds": seconds, "peak_extra_mib": peak, "first_losses": first}
    fused, eager = out["auto"], out["reference"]
    return {"steps_per_stage": steps, "fused": fused, "eager": eager,
            "speedup": eager["seconds"] / fused["seconds"],
            "memory_ratio": eager["peak_extra_mib"] / max(fused["peak_extra_mib"], 1e-9)}


# ---------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------

def run(cfg: DemoConfig, backend: str = "auto", out_dir: str = "benchmarks/results",
        quiet: bool = False, compare: bool = True) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    image_size = cfg.model.image_size
    train = make_split(cfg.n_train, (cfg.seed, 1), image_size=image_size).to(cfg.device)
    test = make_split(cfg.n_test, (cfg.seed, 2), image_size=image_size).to(cfg.device)
    model = FusionModel(cfg.model).to(cfg.device)
    losses = {k: [] for k in ("contrastive", "fusion") + ADAPTER_TYPES}
    summary = {"config": asdict(cfg), "backend": backend, "stages": {},
               "torch": torch.__version__, "device": _device_name(cfg.device),
               "threads": torch.get_num_threads()}
    say = (lambda *a: None) if quiet else print
    with mmkernels.use_backend(backend):
        with Stage("contrastive", cfg.device) as st:
            stage_contrastive(model, train, cfg, gen, losses["contrastive"], st, quiet)
        summary["stages"]["contrastive"] = st.summary()
        summary["retrieval"] = retrieval(model, test)
        say(f"stage 1 contrastive: {st.summary()}\n  {summary['retrieval']}")

        with Stage("fusion", cfg.device) as st:
            stage_fusion(model, train, cfg, gen, losses["fusion"], st, quiet)
        summary["stages"]["fusion"] = st.summary()
        summary["qa_accuracy"] = {t: answer_accuracy(model, test, questions_of(test, (t,)))
                                  for t in QUESTION_TYPES}
        summary["match_accuracy"] = match_accuracy(model, test)
        say(f"stage 2 fusion: {st.summary()}\n  QA accuracy: {summary['qa_accuracy']}, "
            f"matching accuracy {summary['match_accuracy']:.3f}")

        summary["adapters"] = {}
        # The baselines first: each on the fusion model as stage 2 left it, no adapter.
        baselines = {t: head_only_baseline(model, train, test, cfg, gen, t)
                     for t in ADAPTER_TYPES}
        for qtype in ADAPTER_TYPES:
            baseline = baselines[qtype]
            with Stage(qtype, cfg.device) as st:
                stage_adapter(model, train, cfg, gen, qtype, losses[qtype], st, quiet)
            acc = answer_accuracy(model, test, questions_of(test, (qtype,)))
            summary["stages"][f"lora_{qtype}"] = st.summary()
            summary["adapters"][qtype] = {"accuracy": acc, "head_only_accuracy": baseline}
            say(f"stage 3 lora {qtype}: {st.summary()}\n  accuracy {acc:.3f} "
                f"(new answer head only: {baseline:.3f})")
        summary["mixed_serving_accuracy"] = mixed_serving(model, test)
        say(f"both adapters in one mixed batch: {summary['mixed_serving_accuracy']}")
    summary["loss_first_last"] = {k: [sum(v[:10]) / len(v[:10]), sum(v[-10:]) / len(v[-10:])]
                                  for k, v in losses.items() if v}
    summary["qa_accuracy_final"] = dict(summary["qa_accuracy"])
    for t in ADAPTER_TYPES:
        summary["qa_accuracy_final"][t] = summary["mixed_serving_accuracy"][t]
    if compare:
        summary["fused_vs_eager"] = compare_backends(cfg, train)
        c = summary["fused_vs_eager"]
        say(f"fused vs eager ({c['steps_per_stage']} steps per stage): "
            f"{c['speedup']:.2f}× faster, {c['memory_ratio']:.2f}× less peak memory")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, "demo" if backend == "auto" else f"demo_{backend}")
        with open(stem + ".json", "w") as f:
            json.dump(summary, f, indent=2)
        _plots(losses, test, model, stem)
    say(f"total {summary['total_seconds']} s")
    return summary


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _plots(losses, test, model, stem):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .shapes import save_gallery
    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3))
    for ax, (name, values) in zip(axes, losses.items()):
        k = max(len(values) // 50, 1)
        smooth = [sum(values[i:i + k]) / len(values[i:i + k]) for i in range(0, len(values), k)]
        ax.plot([i * k for i in range(len(smooth))], smooth)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(stem + "_loss.png", dpi=100)
    plt.close(fig)
    # Gallery: a few test images with their top retrieved caption and a question answered.
    n = 8
    with torch.no_grad(), autocast(test.images.device):
        model.eval()
        image = model.embed_images(test.images[:n])[0]
        tokens = model.image_tokens(test.images[:n])
        text = model.embed_texts(test.caption_ids, test.caption_mask)[0]
        best = (image @ text.T).argmax(1)
        q = torch.arange(n) * test.questions_per_image
        # Each question by its type's adapter, the base model for colour and shape.
        types = [QUESTION_TYPES[t] for t in test.question_type[q].tolist()]
        with mmkernels.lora.mixed_batch(model, [t if t in ADAPTER_TYPES else "__base__"
                                                for t in types]):
            pred = model.answer_logits(test.question_ids[q], test.question_mask[q],
                                       tokens).argmax(1)
        model.train()
    best, pred = best.tolist(), pred.tolist()
    texts = [f"{test.captions[best[i]]}\nQ: {test.questions[q[i]]} A: {ANSWERS[pred[i]]}"
             for i in range(n)]
    save_gallery(test.images[:n].cpu(), texts, stem + "_gallery.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small config (~1 minute)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu"),
                        help="the main run's backend (reference: the same model, eager ops)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (bf16 autocast)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the fused-vs-eager timing of a few steps per stage")
    args = parser.parse_args(argv)
    cfg = replace(QUICK if args.quick else DemoConfig(), device=args.device)
    run(cfg, args.backend, args.out, compare=not args.no_compare)
    return 0
