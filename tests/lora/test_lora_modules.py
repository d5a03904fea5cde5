"""mmkernels.nn.LoRALinear, mmkernels.apply_lora / lora.mixed_batch, and the PEFT-format
checkpoint round trip (PEFT itself is in test_lora_peft.py)."""
import math

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.lora import load_adapter, mixed_batch, save_adapter
from mmkernels.nn import LoRALinear
from oracle import FP32_RTOL, assert_close


def _layer(d_in=12, d_out=10, r=4, alpha=8.0, **kw):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d_in, d_out), r, alpha, **kw)
    with torch.no_grad():  # a trained B (zero at init would hide the adapter)
        layer.lora_B["default"].weight.normal_()
    return layer


def _eager(layer, x, name="default"):
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.base_layer(x) + layer.scaling[name] * (x @ A.T @ B.T)


def test_init_names_and_scaling():
    base = nn.Linear(12, 10)
    layer = LoRALinear(base, 4, 8.0)
    assert layer.lora_A["default"].weight.shape == (4, 12)
    assert layer.lora_B["default"].weight.shape == (10, 4)
    assert (layer.lora_B["default"].weight == 0).all()
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=√5) on fan_in 12
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= bound and a.std() > bound / 4
    assert layer.scaling["default"] == 2.0
    assert LoRALinear(nn.Linear(12, 10), 4, 8.0, use_rslora=True).scaling["default"] == 4.0
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias",
                                       "lora_A.default.weight", "lora_B.default.weight"}
    x = torch.randn(3, 12)
    assert_close(layer(x), base(x), FP32_RTOL)  # B = 0: the base layer


def test_forward_matches_formula_and_dropout_only_in_training():
    layer = _layer(lora_dropout=0.5)
    x = torch.randn(2, 5, 12)
    layer.eval()
    assert_close(layer(x), _eager(layer, x), FP32_RTOL)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    assert torch.equal(a, layer(x))
    assert not torch.allclose(a, _eager(layer, x))


def test_adapters_add_set_delete():
    layer = _layer()
    layer.add_adapter("other", 2, 4.0)
    assert layer.active_adapter == "default"
    with torch.no_grad():
        layer.lora_B["other"].weight.normal_()
    x = torch.randn(4, 12)
    layer.set_adapter("other")
    assert_close(layer(x), _eager(layer, x, "other"), FP32_RTOL)
    with pytest.raises(ValueError, match="exists already"):
        layer.add_adapter("other", 2, 4.0)
    with pytest.raises(ValueError, match="no adapter 'missing'"):
        layer.set_adapter("missing")
    layer.delete_adapter("other")
    assert "other" not in layer.lora_A and layer.active_adapter == "default"
    assert_close(layer(x), _eager(layer, x), FP32_RTOL)


def test_mixed_batch_forward_and_gradients():
    """One fused call: each sample gets its adapter, and trains only it."""
    layer = _layer()
    layer.add_adapter("b", 3, 6.0)
    with torch.no_grad():
        layer.lora_B["b"].weight.normal_()
    x = torch.randn(5, 3, 12)
    names = ["b", "__base__", "default", "b", "default"]
    y = layer(x, adapter_names=names)
    for i, n in enumerate(names):
        want = layer.base_layer(x[i]) if n == "__base__" else _eager(layer, x[i], n)
        assert_close(y[i], want, FP32_RTOL, f"sample {i}")
    y[1].sum().backward()  # the base-only sample trains no adapter
    for name, p in layer.named_parameters():
        if "lora_" in name:
            assert p.grad is None or (p.grad == 0).all(), name
    layer.zero_grad()
    layer(x, adapter_names=names)[0].sum().backward()  # sample 0 uses "b" only
    assert (layer.lora_A["default"].weight.grad == 0).all()
    assert layer.lora_A["b"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no adapter 'zzz'"):
        layer(x, adapter_names=["zzz"] * 5)
    with pytest.raises(ValueError, match="one name per sample"):
        layer(x, adapter_names=["b"] * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(dtype):
    layer = _layer(64, 48).to(dtype)
    x = torch.randn(7, 64, dtype=dtype)
    w0 = layer.base_layer.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    rtol = FP32_RTOL if dtype == torch.float32 else 2e-2
    assert_close(layer(x), before, rtol, "merged forward")
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x, adapter_names=["default"] * 7)
    layer.unmerge()
    w = layer.base_layer.weight.detach()
    if dtype == torch.float32:
        assert_close(w, w0, FP32_RTOL)
    else:
        # Two roundings at most: merge rounds W + Δ, unmerge rounds back to W's grid (each at
        # most half an ulp, eps/2 relative). Δ = s·B·A here is as large as W itself.
        merged = w0.float() + layer._delta("default")
        bound = torch.finfo(dtype).eps / 2 * (merged.abs() + w0.float().abs())
        assert ((w.float() - w0.float()).abs() <= bound).all()


# ---------------------------------------------------------------------------------------
# apply_lora on models
# ---------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """Self-attention and cross-attention (kdim ≠ vdim) on mmkernels' MHA, and an MLP."""

    def __init__(self):
        super().__init__()
        self.attn = mmkernels.nn.MultiheadAttention(16, 2, batch_first=True)
        self.cross = mmkernels.nn.MultiheadAttention(16, 2, kdim=12, vdim=20, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x, image_k, image_v):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.cross(x, image_k, image_v, need_weights=False)[0]
        return self.head(x + self.mlp(x))


def _tiny_inputs(n=4):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, 5, 16, generator=g), torch.randn(n, 7, 12, generator=g),
            torch.randn(n, 7, 20, generator=g))


def _randomize_lora(model, name="default"):
    with torch.no_grad():
        for _, m in mmkernels.lora.lora_layers(model, name):
            m.lora_B[name].weight.normal_()


def test_apply_lora_targets_freezes_and_trains_cross_attention():
    torch.manual_seed(0)
    model = mmkernels.apply_lora(Tiny(), ["q_proj", "k_proj", "v_proj", "out_proj", "0"],
                                 r=4, lora_alpha=8)
    adapted = {n for n, _ in mmkernels.lora.lora_layers(model)}
    assert adapted == {f"{a}.{p}" for a in ("attn", "cross")
                       for p in ("q_proj", "k_proj", "v_proj", "out_proj")} | {"mlp.0"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(adapted)
    _randomize_lora(model)
    model(*_tiny_inputs()).square().sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable), n
    # kdim ≠ vdim: the adapters on k_proj/v_proj have the right input widths.
    assert model.cross.k_proj.lora_A["default"].weight.shape == (4, 12)
    assert model.cross.v_proj.lora_A["default"].weight.shape == (4, 20)


def test_apply_lora_regex_and_second_adapter():
    model = mmkernels.apply_lora(Tiny(), r"mlp\.[02]", r=2, lora_alpha=2)
    assert {n for n, _ in mmkernels.lora.lora_layers(model)} == {"mlp.0", "mlp.2"}
    mmkernels.apply_lora(model, ["mlp.0"], r=3, lora_alpha=3, adapter_name="second")
    assert set(model.mlp[0].lora_A) == {"default", "second"}
    assert model.mlp[0].active_adapter == "second"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mlp.0.lora_A.second.weight", "mlp.0.lora_B.second.weight"}


def test_apply_lora_refuses_what_would_silently_do_nothing():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="torch.nn.MultiheadAttention"):
        mmkernels.apply_lora(model, ["out_proj"], r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        mmkernels.apply_lora(nn.Sequential(nn.Linear(4, 4)), ["q_proj"], r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="only nn.Linear"):
        mmkernels.apply_lora(nn.Sequential(nn.Conv1d(4, 4, 1)), ["0"], r=2, lora_alpha=2)


def test_mixed_batch_on_a_model():
    torch.manual_seed(0)
    model = mmkernels.apply_lora(Tiny(), ["q_proj", "v_proj", "0"], r=4, lora_alpha=8)
    mmkernels.apply_lora(model, ["q_proj", "v_proj", "0"], r=2, lora_alpha=4,
                         adapter_name="other")
    _randomize_lora(model)
    _randomize_lora(model, "other")
    inputs = _tiny_inputs(3)
    names = ["other", "default", "__base__"]
    with mixed_batch(model, names):
        mixed = model(*inputs)
    for i, n in enumerate(names):
        one = [t[i:i + 1] for t in inputs]
        with mixed_batch(model, [n]):
            assert_close(mixed[i:i + 1], model(*one), FP32_RTOL, n)
    assert all(m.batch_adapter_names is None for _, m in mmkernels.lora.lora_layers(model))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = mmkernels.apply_lora(Tiny(), ["q_proj", "out_proj"], r=4, lora_alpha=16,
                                 use_rslora=True)
    _randomize_lora(model)
    inputs = _tiny_inputs()
    want = model(*inputs)
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    torch.manual_seed(0)
    fresh = load_adapter(Tiny(), tmp_path)
    assert_close(fresh(*inputs), want, FP32_RTOL)
    assert fresh.attn.q_proj.use_rslora["default"]
    with pytest.raises(ValueError, match="no LoRA adapter 'nope'"):
        save_adapter(model, tmp_path / "x", adapter_name="nope")
