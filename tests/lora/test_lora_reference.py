"""The LoRA reference (mmkernels.lora.reference), checked against PEFT's formula written out and
against its own single-adapter form: the oracle must be right before kernels are judged by it."""
import torch

from mmkernels.lora import reference
from oracle import assert_close


def _inputs(T=7, fin=33, fout=100, r=8, N=None, dtype=torch.float64):
    x = torch.randn(3, T, fin, dtype=dtype)
    w, b = torch.randn(fout, fin, dtype=dtype), torch.randn(fout, dtype=dtype)
    shape_a = (r, fin) if N is None else (N, r, fin)
    shape_b = (fout, r) if N is None else (N, fout, r)
    return x, w, b, torch.randn(shape_a, dtype=dtype), torch.randn(shape_b, dtype=dtype)


def test_single_adapter_is_peft_formula():
    x, w, b, A, B = _inputs()
    y = reference.forward(x, w, b, A, B, 0.5)
    peft = torch.nn.functional.linear(x, w, b) + 0.5 * (x @ A.T @ B.T)
    assert_close(y, peft, 1e-12)


def test_dropout_mask_applies_to_adapter_input_only():
    x, w, b, A, B = _inputs()
    p, seed = 0.3, 12345
    y = reference.forward(x, w, b, A, B, 2.0, dropout_p=p, seed=seed)
    flat = x.reshape(-1, x.shape[-1])
    mask = reference.dropout_mask(seed, *flat.shape, p, x.device)
    expected = flat @ w.T + b + 2.0 * ((flat * mask) @ A.T @ B.T)
    assert_close(y.reshape(-1, w.shape[0]), expected, 1e-12)
    kept = (mask > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.05


def test_many_adapters_equal_one_at_a_time():
    N = 5
    x, w, b, A, B = _inputs(T=40, N=N)
    ids = torch.randint(-1, N, (x.shape[0] * x.shape[1],))
    ids[ids == 3] = 4  # adapter 3 gets no rows
    scales = torch.rand(N, dtype=torch.float64)
    y = reference.forward(x, w, b, A, B, scales, adapter_ids=ids).reshape(-1, w.shape[0])
    flat = x.reshape(-1, x.shape[-1])
    for t in range(flat.shape[0]):
        n = ids[t].item()
        one = flat[t] @ w.T + b
        if n >= 0:
            one = one + scales[n] * (flat[t] @ A[n].T @ B[n].T)
        assert_close(y[t], one, 1e-12)
    # Each adapter's gradients come only from its own rows (none for the row-less adapter 3).
    A.requires_grad_()
    y = reference.forward(x, w, b, A, B, scales, adapter_ids=ids)
    (gA,) = torch.autograd.grad(y.sum(), A)
    assert (gA[3] == 0).all() and all(gA[n].abs().sum() > 0 for n in (0, 1, 2, 4))
