"""Against PEFT itself (an optional test extra, ``pip install -c constraints.txt peft``):
the same adapter weights give the same outputs and adapter gradients, checkpoints load both
ways, a mixed-adapter batch equals PEFT's ``adapter_names=``, and bf16 merge/unmerge loses
less than PEFT's."""
import copy

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.lora import load_adapter, lora_layers, mixed_batch, save_adapter
from oracle import FP32_RTOL, assert_close

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -c "
                                          "constraints.txt peft)")

TARGETS = ["q", "v", "fc1"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(24, 16), nn.Linear(24, 16, bias=False)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(16, 40), "fc2": nn.Linear(40, 5)})

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.v(x)
        return self.mlp["fc2"](torch.relu(self.mlp["fc1"](h)))


def _models(r=4, alpha=8, use_rslora=False, dropout=0.0):
    """(PEFT model, mmkernels model) on identical base weights, PEFT's adapter randomized and
    copied into ours through PEFT's on-disk format."""
    torch.manual_seed(0)
    base = Block()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                             lora_dropout=dropout, use_rslora=use_rslora)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    ours = mmkernels.apply_lora(base, TARGETS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                use_rslora=use_rslora)
    return theirs, ours


def _lora_grads(model):
    """Adapter gradients keyed by PEFT's saved names (module path + lora_A/B)."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            key = n.replace("base_model.model.", "").replace(".default", "")
            out[key] = p.grad
    return out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_outputs_and_gradients(tmp_path, use_rslora):
    theirs, ours = _models(use_rslora=use_rslora)
    theirs.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    x = torch.randn(3, 7, 24)
    y_theirs, y_ours = theirs(x), ours(x)
    assert_close(y_ours, y_theirs, FP32_RTOL, "output")
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    g_theirs, g_ours = _lora_grads(theirs), _lora_grads(ours)
    assert set(g_theirs) == set(g_ours) and len(g_ours) == 2 * len(TARGETS)
    for k in g_ours:
        assert_close(g_ours[k], g_theirs[k], FP32_RTOL, k)
    assert {n.replace(".default", "") for n, p in ours.named_parameters()
            if p.requires_grad} == set(g_ours)


def test_checkpoints_load_both_ways(tmp_path):
    theirs, ours = _models()
    x = torch.randn(5, 24)
    # mmkernels → PEFT
    with torch.no_grad():
        for _, m in lora_layers(ours):
            m.lora_A["default"].weight.normal_()
            m.lora_B["default"].weight.normal_()
    save_adapter(ours, tmp_path / "ours")
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Block(), tmp_path / "ours")
    assert_close(loaded(x), ours(x), FP32_RTOL, "PEFT loading ours")
    # PEFT → mmkernels (a fresh model, layers created from PEFT's config)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    fresh = load_adapter(Block(), tmp_path / "theirs")
    assert_close(fresh(x), theirs(x), FP32_RTOL, "ours loading PEFT's")


def test_mixed_batch_equals_peft_adapter_names(tmp_path):
    theirs, ours = _models()
    second = peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS)
    theirs.add_adapter("other", second)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n and ".other." in n:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path)  # "default" in tmp_path, "other" in tmp_path/other
    load_adapter(ours, tmp_path)
    load_adapter(ours, tmp_path / "other", adapter_name="other")
    theirs.eval()
    ours.eval()
    x = torch.randn(4, 6, 24)
    names = ["other", "__base__", "default", "other"]
    want = theirs(x, adapter_names=names)
    with mixed_batch(ours, names):
        got = ours(x)
    assert_close(got, want, FP32_RTOL)


def test_bf16_merge_unmerge_beats_peft():
    """bf16 weights: merge then unmerge. Ours adds s·B·A to W in fp32 and rounds once per
    step; PEFT rounds the delta to bf16 and adds in bf16."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    ours = mmkernels.apply_lora(nn.Sequential(copy.deepcopy(base)), ["0"], r=16, lora_alpha=32)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(
                ((n, p) for n, p in theirs.named_parameters() if "lora_" in n),
                ((n, p) for n, p in ours.named_parameters() if "lora_" in n)):
            p1.normal_(0, 0.05)
            p2.copy_(p1)
    theirs.merge_adapter()
    theirs.unmerge_adapter()
    ours[0].merge()
    ours[0].unmerge()
    err_theirs = (theirs.base_model.model[0].base_layer.weight.float() - w0.float()).abs()
    err_ours = (ours[0].base_layer.weight.float() - w0.float()).abs()
    print(f"bf16 merge+unmerge: max |ΔW| PEFT {err_theirs.max():.3e} (mean {err_theirs.mean():.2e}"
          f"), mmkernels {err_ours.max():.3e} (mean {err_ours.mean():.2e})")
    assert err_ours.mean() < err_theirs.mean() and err_ours.max() <= err_theirs.max()
