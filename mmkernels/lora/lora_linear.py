"""Fused LoRA linear layer: one or many adapters per batch, training and inference.

    y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ          (PEFT's formula; per row adapter with many)

Layers: argument checks → the custom ops ``mmkernels::lora_fwd`` / ``lora_bwd`` (one per
direction, any backend) with their autograd → the functional ``lora_linear`` → the module
``mmkernels.nn.LoRALinear`` and ``mmkernels.apply_lora`` (``mmkernels.lora.peft``).

The semantics every backend shares are written out in ``reference.py``. The forward saves x
itself, the (T, r) shrink output u = dropout(x)·Aᵀ and the dropout seed — never dropout(x):
the backward regenerates the mask. A frozen base (the normal case) costs no dW work.
Double backward (``create_graph=True``) differentiates the reference formula.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _validate
from .._autograd import double_backward
from .._dispatch import TRITON_DTYPES, Impl
from .._rng import draw_seed
from . import reference

OP = "lora_linear"
DISPATCH = _dispatch.Op(OP, (Impl("reference"), Impl("cpu"), Impl("triton", TRITON_DTYPES)))
MAX_RANK = 256


def _kernels(backend: str):
    return _dispatch.kernel_module(__package__, backend, "lora_triton")


# ---------------------------------------------------------------------------------------
# Custom ops. Arguments arrive normalised (see ``_normalise``): x (T, in) with unit column
# stride, weight (out, in), lora_A (N, r, in), lora_B (N, out, r) contiguous, scaling (N,) in
# the compute dtype, adapter_ids (T,) int64 or None (every row uses adapter 0, N == 1).
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("mmkernels::lora_fwd", mutates_args=())
def lora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             scaling: Tensor, adapter_ids: Optional[Tensor], dropout_p: float,
             seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, u, tf32): y (T, out) in x's dtype, u (T, r) in the compute dtype (unscaled), and
    whether fp32 products ran on TF32 (a 0-dim bool CPU tensor the backward must follow)."""
    tf32 = _dispatch.uses_tf32(backend, x.dtype)
    x, weight, bias, lora_A, lora_B = _layout(x, weight, bias, lora_A, lora_B)
    y, u = _kernels(backend).forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids,
                                     dropout_p, seed, tf32)
    return y, u, torch.tensor(tf32)


def _layout(x, weight, bias, lora_A, lora_B):
    """What the kernels take: x with unit column stride (any row stride), the rest
    contiguous. The functional passes these already; a direct call of the op may not."""
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return (x, weight.contiguous(), None if bias is None else bias.contiguous(),
            lora_A.contiguous(), lora_B.contiguous())


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, backend):
    T, r = x.shape[0], lora_A.shape[1]
    return (x.new_empty((T, weight.shape[0])),
            x.new_empty((T, r), dtype=_validate.compute_dtype(x.dtype)),
            torch.empty((), dtype=torch.bool))


@torch.library.custom_op("mmkernels::lora_bwd", mutates_args=())
def lora_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scaling: Tensor, adapter_ids: Optional[Tensor], u: Tensor, dropout_p: float,
             seed: Optional[Tensor], needs: list[bool], backend: str,
             tf32: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW, db, dA, dB) for ``needs`` = which of them to compute; one not needed is an
    empty (0,) tensor and costs nothing."""
    x, weight, _, lora_A, lora_B = _layout(x, weight, None, lora_A, lora_B)
    return _kernels(backend).backward(grad_y.contiguous(), x, weight, lora_A, lora_B, scaling,
                                      adapter_ids, u.contiguous(), dropout_p, seed, *needs,
                                      bool(tf32))


@lora_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scaling, adapter_ids, u, dropout_p, seed, needs,
      backend, tf32):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    likes = (x, weight, weight, lora_A, lora_B)
    return tuple(t.new_empty(shape if need else (0,))
                 for t, shape, need in zip(likes, shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, seed, backend = inputs
    _, u, tf32 = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, ids, u, seed, tf32)
    ctx.args = (dropout_p, backend, bias is not None)
    # Only for create_graph=True, which differentiates the reference formula:
    ctx.bias = bias
    ctx.set_materialize_grads(False)  # u and the tf32 flag are never differentiated


def _autograd_backward(ctx, grad_y, *_unused):
    # (x, weight, bias, lora_A, lora_B) get gradients; scaling, ids, dropout_p, seed, backend
    # are constants.
    consts = (None,) * 5
    if grad_y is None:
        return (None,) * 5 + consts
    x, weight, lora_A, lora_B, scaling, ids, u, seed, tf32 = ctx.saved_tensors
    dropout_p, backend, has_bias = ctx.args
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        seed_int = 0 if seed is None else int(seed)

        def fn(x, weight, bias, lora_A, lora_B):
            single = ids is None
            return reference.forward(x, weight, bias, lora_A[0] if single else lora_A,
                                     lora_B[0] if single else lora_B,
                                     scaling[0] if single else scaling, dropout_p, seed_int, ids)
        return double_backward(fn, grad_y, (x, weight, ctx.bias, lora_A, lora_B)) + consts
    needs = [need[0], need[1], need[2] and has_bias, need[3], need[4]]
    grads = lora_bwd(grad_y, x, weight, lora_A, lora_B, scaling, ids, u, dropout_p, seed, needs,
                     backend, tf32)
    return tuple(g if n else None for g, n in zip(grads, needs)) + consts


lora_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p, adapter_ids):
    """Every argument checked against the others; returns (in, out, r, N, many)."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"{OP}: x must be a tensor of shape (..., in), got "
                        f"{'a 0-dim tensor' if isinstance(x, Tensor) else type(x).__name__}")
    _validate.floating_tensor(OP, "x", x, "(..., in)", x.dim())
    _validate.floating_tensor(OP, "weight", weight, "(out, in)", 2)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"{OP}: x (..., in) and weight (out, in) must agree on in, got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None:
        _validate.floating_tensor(OP, "bias", bias, "(out,)", 1)
        if bias.shape[0] != out_f:
            raise ValueError(f"{OP}: bias must have shape (out,) = ({out_f},), got "
                             f"{tuple(bias.shape)}")
    if not isinstance(lora_A, Tensor):
        raise TypeError(f"{OP}: lora_A must be a tensor of shape (r, in) or (N, r, in), got "
                        f"{type(lora_A).__name__}")
    if lora_A.dim() not in (2, 3):
        raise ValueError(f"{OP}: lora_A must have shape (r, in) or (N, r, in), got shape "
                         f"{tuple(lora_A.shape)}")
    many = lora_A.dim() == 3
    a_shape, b_shape = ("(N, r, in)", "(N, out, r)") if many else ("(r, in)", "(out, r)")
    _validate.floating_tensor(OP, "lora_A", lora_A, a_shape, lora_A.dim())
    _validate.floating_tensor(OP, "lora_B", lora_B, b_shape, lora_A.dim())
    N = lora_A.shape[0] if many else 1
    r = lora_A.shape[-2]
    if lora_A.shape[-1] != in_f:
        raise ValueError(f"{OP}: lora_A {a_shape} must have in = {in_f} (weight's), got shape "
                         f"{tuple(lora_A.shape)}")
    expected_b = ((N,) if many else ()) + (out_f, r)
    if tuple(lora_B.shape) != expected_b:
        raise ValueError(f"{OP}: lora_B must have shape {b_shape} = {expected_b} to match weight "
                         f"{tuple(weight.shape)} and lora_A {tuple(lora_A.shape)}, got "
                         f"{tuple(lora_B.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{OP}: the rank r must be in [1, {MAX_RANK}], got {r}")
    if N < 1:
        raise ValueError(f"{OP}: lora_A (N, r, in) needs N >= 1 adapters, got N = 0")
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{OP}: {name} must have x's dtype {_validate.dtype_name(x.dtype)}, "
                            f"got {_validate.dtype_name(t.dtype)} (cast the adapter or the input)")
        if t is not None and t.device != x.device:
            raise ValueError(f"{OP}: {name} must be on x's device {x.device}, got {t.device}")
    if not _validate.is_number(dropout_p):
        raise TypeError(f"{OP}: dropout_p must be a real number in [0, 1), got "
                        f"{type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    rows = x.shape[:-1].numel()
    _check_ids(adapter_ids, rows, N, many, x.device)
    return in_f, out_f, r, N, many


def _check_ids(ids, rows: int, N: int, many: bool, device) -> None:
    if ids is None:
        if many:
            raise ValueError(f"{OP}: with lora_A (N, r, in) for N adapters, adapter_ids (an "
                             f"int64 tensor of shape (T,)) must name each row's adapter")
        return
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
        got = _validate.dtype_name(ids.dtype) if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{OP}: adapter_ids must be an int64 tensor of shape (T,), got {got}")
    if tuple(ids.shape) != (rows,):
        raise ValueError(f"{OP}: adapter_ids must have shape (T,) = ({rows},) (one id per row "
                         f"of x flattened to (T, in)), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{OP}: adapter_ids must be on x's device {device}, got {ids.device}")
    # One host sync in eager mode; under torch.compile the kernels bound-check instead
    # (the C++ op raises, the Triton kernels treat an id out of range as -1).
    if rows and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)
        if int(lo) < -1 or int(hi) >= N:
            raise ValueError(f"{OP}: adapter_ids must be in [-1, {N}) (-1 = the base layer "
                             f"only), got values in [{int(lo)}, {int(hi)}]")


def _scaling(scaling, N: int, acc: torch.dtype, device) -> Tensor:
    """scaling as an (N,) tensor of the compute dtype: a number, or a tensor of one element or
    N elements (a constant: LoRA's scaling is a hyperparameter, not trained)."""
    if isinstance(scaling, Tensor):
        if scaling.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"{OP}: scaling must be a real number or a floating tensor of shape "
                            f"() or (N,) = ({N},), got a {_validate.dtype_name(scaling.dtype)} "
                            f"tensor")
        if scaling.numel() == 1 and scaling.dim() <= 1:
            scaling = scaling.reshape(1).expand(N)
        elif tuple(scaling.shape) != (N,):
            raise ValueError(f"{OP}: scaling must be a number or a tensor of shape () or (N,) = "
                             f"({N},), got shape {tuple(scaling.shape)}")
        if scaling.requires_grad:
            raise ValueError(f"{OP}: scaling is a constant (no gradient flows to it); pass "
                             f"scaling.detach()")
        if scaling.device != device:
            raise ValueError(f"{OP}: scaling must be on x's device {device}, got "
                             f"{scaling.device}")
        return scaling.to(acc).contiguous()
    if not _validate.is_number(scaling):
        raise TypeError(f"{OP}: scaling must be a real number or a tensor of shape () or (N,), "
                        f"got {type(scaling).__name__}")
    return torch.full((N,), float(scaling), dtype=acc, device=device)


def _rows(x: Tensor) -> Tensor:
    """x as (T, in) with unit column stride: a view whenever one exists (the forward saves x
    itself, never a copy, and the kernels take any row stride)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


# ---------------------------------------------------------------------------------------
# Functional
# ---------------------------------------------------------------------------------------

def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, scaling=1.0, *, dropout_p: float = 0.0,
                adapter_ids: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """A linear layer with LoRA adapters in one fused call:
    y = x·Wᵀ + b + scaling·dropout(x)·Aᵀ·Bᵀ (PEFT's ``LoraLayer``).

    x (..., in) with any leading dims; weight (out, in); bias (out,) or None. One adapter:
    lora_A (r, in), lora_B (out, r), scaling a number. Many adapters: lora_A (N, r, in),
    lora_B (N, out, r), scaling a number or an (N,) tensor, and ``adapter_ids`` (T,) int64
    over the flattened leading dims of x naming each row's adapter, −1 for the base layer only
    (also allowed with one adapter). Rows of different adapters share one call in training as
    in inference; adapter n's gradients come only from its rows. 1 <= r <= 256; x, weight,
    bias and the adapters share one dtype (fp32/fp16/bf16 with fp32 accumulation, fp64 on the
    cpu and reference backends).

    ``dropout_p`` drops elements of the adapter's input (always, like ``F.dropout`` with
    training=True: pass 0 in eval) with a counter-based mask seeded from torch's generator,
    so ``torch.manual_seed`` repeats a run; the backward regenerates the mask. Gradients go to
    x, lora_A, lora_B, and to weight/bias only when they require grad. ``scaling`` is a
    constant.
    """
    in_f, out_f, r, N, many = _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                     adapter_ids)
    _validate.choice(OP, "backend", backend, ("auto",) + _dispatch.BACKENDS)
    dropout_p = float(dropout_p)
    acc = _validate.compute_dtype(x.dtype)
    scales = _scaling(scaling, N, acc, x.device)
    name = DISPATCH.select(backend, {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A,
                                     "lora_B": lora_B})
    lead = x.shape[:-1]
    if x.numel() == 0 or out_f == 0:
        name = "reference"  # nothing to compute: the reference handles empty shapes
    seed = draw_seed(dropout_p, x.device)
    A3 = lora_A if many else lora_A.unsqueeze(0)
    B3 = lora_B if many else lora_B.unsqueeze(0)
    if name == "reference":
        seed_int = 0 if seed is None else int(seed)
        if adapter_ids is None:
            return reference.forward(x, weight, bias, lora_A, lora_B, scales[0], dropout_p,
                                     seed_int)
        return reference.forward(x, weight, bias, A3, B3, scales, dropout_p, seed_int,
                                 adapter_ids)
    y = lora_fwd(_rows(x), weight, bias, A3, B3, scales,
                 None if adapter_ids is None else adapter_ids.contiguous(), dropout_p, seed,
                 name)[0]
    return y.view(*lead, out_f)
