"""mmkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention loaded with the same state
dict (outputs, weights and parameter gradients), and the Flamingo block."""
import math

import pytest
import torch

import mmkernels
from backends import device
from mmkernels.nn import GatedCrossAttentionBlock, MultiheadAttention
from mmkernels.nn.attention import _save_torch_keys
from oracle import assert_close

E, HEADS, N, L, S = 16, 4, 3, 5, 7
CONFIGS = {
    "self": dict(),
    "kdim-vdim": dict(kdim=12, vdim=20),
    "bias-kv": dict(add_bias_kv=True),
    "zero-attn": dict(add_zero_attn=True),
    "batch-first": dict(batch_first=True),
    "no-bias": dict(bias=False),
    "all": dict(kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True, batch_first=True),
}


def pair(dtype=torch.float64, **kw):
    theirs = torch.nn.MultiheadAttention(E, HEADS, **kw).to(device(), dtype)
    ours = MultiheadAttention(E, HEADS, **kw).to(device(), dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def inputs(kw, dtype=torch.float64, self_attention=False, length=S):
    bf = kw.get("batch_first", False)

    def make(n, d):
        return torch.randn((N, n, d) if bf else (n, N, d), dtype=dtype, device=device())

    q = make(L, E)
    if self_attention:
        return q, q, q
    return q, make(length, kw.get("kdim", E)), make(length, kw.get("vdim", E))


def torch_grads(module):
    """Our parameter gradients under torch.nn.MultiheadAttention's names."""
    grads = {n: p.grad for n, p in module.named_parameters()}
    _save_torch_keys(module, grads, "", None)
    return grads


def compare(ours, theirs, args, rtol=1e-10, **kw):
    a, wa = ours(*args, **kw)
    b, wb = theirs(*args, **kw)
    assert_close(a, b, rtol, "output")
    assert (wa is None) == (wb is None)
    if wa is not None:
        assert_close(wa, wb, rtol, "weights")
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    ours_grads = torch_grads(ours)
    for name, p in theirs.named_parameters():
        assert_close(ours_grads[name], p.grad, rtol, f"grad {name}")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_torch(config, need_weights, masked):
    kw = CONFIGS[config]
    ours, theirs = pair(**kw)
    mask = torch.rand(N, S, device=device()) < 0.3 if masked else None
    mask is None or mask[:, 0].fill_(False)  # torch gives NaN for an all-padded sample
    compare(ours, theirs, inputs(kw), key_padding_mask=mask, need_weights=need_weights,
            average_attn_weights=config != "self")


def test_self_attention_and_fp32_fast_path():
    """Self-attention in fp32 on the fused kernel (need_weights=False) against torch."""
    ours, theirs = pair(torch.float32)
    x = inputs({}, torch.float32, self_attention=True)
    mask = torch.rand(N, L, device=device()) < 0.3
    mask[:, 0] = False
    compare(ours, theirs, x, rtol=1e-5, key_padding_mask=mask, need_weights=False)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_attn_mask_and_causal_hint(mask_kind):
    ours, theirs = pair()
    x = inputs({}, self_attention=True)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=device()), 1)
    mask = causal if mask_kind == "bool" else torch.zeros(L, L, dtype=torch.float64,
                                                          device=device()).masked_fill(causal,
                                                                                       -1e9)
    compare(ours, theirs, x, attn_mask=mask, need_weights=False)
    ours.zero_grad(), theirs.zero_grad()
    compare(ours, theirs, x, attn_mask=mask, is_causal=True, need_weights=False)
    per_head = torch.randn(N * HEADS, L, L, dtype=torch.float64, device=device())
    ours.zero_grad(), theirs.zero_grad()
    compare(ours, theirs, x, attn_mask=per_head, need_weights=True, average_attn_weights=False)


def test_float_key_padding_mask_and_unbatched():
    ours, theirs = pair()
    q, k, v = inputs({})
    fmask = torch.randn(N, S, dtype=torch.float64, device=device())
    compare(ours, theirs, (q, k, v), key_padding_mask=fmask, need_weights=False)
    ours.zero_grad(), theirs.zero_grad()
    compare(ours, theirs, (q[:, 0], k[:, 0], v[:, 0]), need_weights=True)


def test_state_dict_both_ways():
    for kw in CONFIGS.values():
        ours, theirs = pair(**kw)
        assert set(ours.state_dict()) == set(theirs.state_dict())
        fresh = torch.nn.MultiheadAttention(E, HEADS, **kw).to(device(), torch.float64)
        fresh.load_state_dict(ours.state_dict())
        for name, value in theirs.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], value), name


def test_all_padding_gives_zeros_not_nan():
    """Where torch returns NaN (a sample whose keys are all padding), we return zeros."""
    ours, _ = pair()
    q, k, v = inputs({})
    mask = torch.zeros(N, S, dtype=torch.bool, device=device())
    mask[1] = True
    for need_weights in (False, True):
        out, w = ours(q, k, v, key_padding_mask=mask, need_weights=need_weights)
        assert torch.isfinite(out).all()
        bias = ours.out_proj.bias
        assert_close(out[:, 1], bias.expand(L, E), 1e-12, "padded sample = out_proj(0)")
        if w is not None:
            assert (w[1] == 0).all()


def test_projections_are_modules():
    """Hooks on the projections see every call: adapters placed there get gradients."""
    ours, _ = pair()
    seen = []
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(ours, name).register_forward_hook(lambda m, i, o, name=name: seen.append(name))
    ours(*inputs({}), need_weights=False)
    assert sorted(seen) == ["k_proj", "out_proj", "q_proj", "v_proj"]


def test_dropout_train_and_eval():
    ours, _ = pair(torch.float32, dropout=0.5)
    x = inputs({}, torch.float32)
    ours.eval()
    a, b = ours(*x, need_weights=False)[0], ours(*x, need_weights=False)[0]
    assert torch.equal(a, b)
    ours.train()
    torch.manual_seed(3)
    c = ours(*x, need_weights=False)[0]
    torch.manual_seed(3)
    d = ours(*x, need_weights=False)[0]
    assert torch.equal(c, d) and not torch.equal(a, c)


def test_bad_input():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiheadAttention(10, 3)
    ours, _ = pair()
    q, k, v = inputs({})
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ours(q, k, v, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal is a hint that needs attn_mask"):
        ours(q, k, v, is_causal=True)


# ---------------------------------------------------------------------------------------
# forward_indexed: queries sharing key/value sets (packed varlen)
# ---------------------------------------------------------------------------------------

def indexed_inputs(kdim=E, vdim=E, sets=4, dtype=torch.float64):
    """7 query samples over 4 sets in a random order: set 1 unused, set 2 read three times,
    set 3 all padding (zeros out, as in forward)."""
    index = torch.tensor([2, 0, 2, 3, 0, 2, 0])[torch.randperm(7)].to(device())
    q = torch.randn(7, L, E, dtype=dtype, device=device())
    k = torch.randn(sets, S, kdim, dtype=dtype, device=device())
    v = torch.randn(sets, S, vdim, dtype=dtype, device=device())
    mask = torch.rand(sets, S, device=device()) < 0.4
    mask[:, 0] = False
    mask[3] = True
    return q, k, v, index, mask


@pytest.mark.parametrize("config", ["batch-first", "self", "kdim-vdim"])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_indexed_equals_forward_on_copied_sets(config, masked):
    kw = CONFIGS[config]
    ours, _ = pair(**kw)
    q, k, v, index, mask = indexed_inputs(kw.get("kdim", E), kw.get("vdim", E))
    mask = mask if masked else None
    leaves = [t.requires_grad_() for t in (q, k, v)]
    bf = kw.get("batch_first", False)
    tr = (lambda t: t) if bf else (lambda t: t.transpose(0, 1))
    a = ours.forward_indexed(tr(q), tr(k), tr(v), index, mask)
    b = ours(tr(q), tr(k[index]), tr(v[index]), need_weights=False,
             key_padding_mask=None if mask is None else mask[index])[0]
    assert_close(a, b, 1e-10, "output")
    w = torch.randn_like(a)
    grads_a = torch.autograd.grad((a * w).sum(), leaves + list(ours.parameters()))
    grads_b = torch.autograd.grad((b * w).sum(), leaves + list(ours.parameters()))
    for name, ga, gb in zip(["q", "k", "v"] + [n for n, _ in ours.named_parameters()],
                            grads_a, grads_b):
        assert_close(ga, gb, 1e-10, f"grad {name}")
    if masked:
        dead = tr(a)[index == 3]
        assert_close(dead, ours.out_proj.bias.expand_as(dead), 1e-12,
                     "a set all padding gives out_proj(0)")


def test_forward_indexed_fp32_and_compiled():
    ours = MultiheadAttention(E, HEADS, batch_first=True).to(device())
    q, k, v, index, mask = indexed_inputs(dtype=torch.float32)
    ref = ours(q, k[index], v[index], key_padding_mask=mask[index], need_weights=False)[0]
    assert_close(ours.forward_indexed(q, k, v, index, mask), ref, 1e-5, "fp32")
    compiled = torch.compile(ours.forward_indexed)
    assert_close(compiled(q, k, v, index, mask), ref, 1e-5, "compiled")


def test_forward_indexed_bad_input():
    ours = MultiheadAttention(E, HEADS, batch_first=True).to(device())
    q, k, v, index, mask = indexed_inputs(dtype=torch.float32)
    with pytest.raises(TypeError, match=r"key_index must be an integer tensor of shape \(7,\)"):
        ours.forward_indexed(q, k, v, index.float(), mask)
    with pytest.raises(TypeError, match="key_index must be an integer tensor"):
        ours.forward_indexed(q, k, v, index[:3], mask)
    with pytest.raises(ValueError, match=r"key_index must lie in \[0, 4\)"):
        ours.forward_indexed(q, k, v, index + 2, mask)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape"):
        ours.forward_indexed(q, k, v, index, mask[:, 1:])
    with pytest.raises(ValueError, match="key and value must hold the same sets"):
        ours.forward_indexed(q, k, v[:3], index, mask)
    biased = MultiheadAttention(E, HEADS, batch_first=True, add_bias_kv=True).to(device())
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn are not supported"):
        biased.forward_indexed(q, k, v, index, mask)


# ---------------------------------------------------------------------------------------
# Flamingo block
# ---------------------------------------------------------------------------------------

def test_gated_block_identity_at_init_and_no_media():
    block = GatedCrossAttentionBlock(16, 4, media_dim=24).to(device())
    x = torch.randn(2, 5, 16, device=device())
    media = torch.randn(2, 9, 24, device=device())
    assert torch.equal(block(x, media), x)
    assert torch.equal(block(x), x)


def test_gated_block_trains_and_skips_samples_without_media():
    block = GatedCrossAttentionBlock(16, 4, media_dim=24).to(device())
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    x = torch.randn(3, 5, 16, device=device(), requires_grad=True)
    media = torch.randn(3, 9, 24, device=device())
    mask = torch.rand(3, 9, device=device()) < 0.3
    mask[1] = True  # sample 1 has no media
    out = block(x, media, mask)
    assert torch.equal(out[1], x[1])
    assert not torch.allclose(out[0], x[0])
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert block.attn_gate.grad.abs() > 0 and block.attn.k_proj.weight.grad.abs().sum() > 0


def test_gated_block_matches_formula():
    """x + tanh(α)·xattn(LN x) then + tanh(β)·FFN(LN x), with torch's MHA as the xattn."""
    block = GatedCrossAttentionBlock(16, 4, media_dim=24).to(device(), torch.float64)
    with torch.no_grad():
        block.attn_gate.fill_(0.3)
        block.ff_gate.fill_(-0.7)
    theirs = torch.nn.MultiheadAttention(16, 4, bias=False, kdim=24, vdim=24,
                                         batch_first=True).to(device(), torch.float64)
    theirs.load_state_dict(block.attn.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64, device=device())
    media = torch.randn(2, 9, 24, dtype=torch.float64, device=device())
    h = block.norm_attn(x)
    y = x + math.tanh(0.3) * theirs(h, media, media, need_weights=False)[0]
    y = y + math.tanh(-0.7) * block.ff(block.norm_ff(y))
    assert_close(block(x, media), y, 1e-10)
    assert mmkernels.nn.GatedCrossAttentionBlock is GatedCrossAttentionBlock


def test_gated_block_media_index():
    """media_index reads shared media (forward_indexed) and equals the copied media; a sample
    whose media is all padding passes through unchanged."""
    block = GatedCrossAttentionBlock(16, 4, media_dim=24).to(device(), torch.float64)
    with torch.no_grad():
        block.attn_gate.fill_(0.4)
        block.ff_gate.fill_(0.6)
    x = torch.randn(7, 5, 16, dtype=torch.float64, device=device())
    media = torch.randn(4, 9, 24, dtype=torch.float64, device=device())
    mask = torch.rand(4, 9, device=device()) < 0.3
    mask[3] = True
    index = torch.tensor([3, 1, 1, 0, 3, 2, 1], device=device())
    out = block(x, media, mask, media_index=index)
    assert_close(out, block(x, media[index], mask[index]), 1e-10, "media_index")
    assert torch.equal(out[index == 3], x[index == 3])
