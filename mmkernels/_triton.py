"""What every Triton kernel in mmkernels shares: precision families, input layout, launch
configs, small ``@triton.jit`` helpers, and the registry of compile specs that
``python -m mmkernels gpu-report`` compiles.

Imported only by the ``*_triton.py`` kernel files (never by ``import mmkernels``), so importing
the package does not import triton.

Precision (one rule for every kernel):

* fp16/bf16 inputs feed ``tl.dot`` directly with fp32 accumulation (family "16bit").
* fp32 inputs follow ``torch.get_float32_matmul_precision()``, read once per op call by the
  caller (``mmkernels._dispatch.fp32_uses_tf32``) and passed down as ``tf32``, so that a forward and its backward cannot
  disagree: "highest" (torch's default) runs exact IEEE fp32 (family "ieee"); "high" or
  "medium" run TF32 tensor cores (family "tf32") on operands *rounded to nearest* first
  (``round_tf32``). Triton feeds raw fp32 to TF32 ``tl.dot``, which truncates the mantissa:
  a bias of up to 2^-10 relative per operand that does not average out (Inf-CL rounds by hand
  for the same reason). The Triton interpreter computes every ``tl.dot`` in fp32, so there a
  "tf32" kernel is exactly fp32 arithmetic on rounded operands: the TF32 oracle of the tests.

Layout: features/rows whose width, row stride or address is not a multiple of 16 elements are
copied into a zero-padded buffer of width roundup(D, 16) (``aligned_rows``). Triton
specializes launches on 16-divisibility; without it loads are not vectorized and the big
kernels spill registers.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil

import torch
import triton
import triton.language as tl

# Triton decides interpreter vs. compiled mode from this variable when kernels are decorated,
# so launch configs follow the same switch.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Power-of-two factor applied to a probability/gradient tile before its cast to a 16-bit dtype
# for the second tl.dot (exact, undone on the accumulator): keeps entries ≤ 2 out of fp16's
# subnormal range (< 6e-5), where they would lose their precision.
CAST_SCALE = tl.constexpr(16384.0)

DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Each precision family is compiled for gpu-report with the dtype it serves.
SPEC_DTYPES = {"16bit": "bf16", "tf32": "fp32", "ieee": "fp32"}


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def max_propagate_nan(a, b):
    """A max whose reductions keep NaN (``tl.max`` drops it): NaN in → NaN out."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def round_tf32(x):
    """fp32 → the nearest TF32 value (10-bit mantissa, ties to even), still stored as fp32.

    Plain integer arithmetic on the bits, so it runs the same compiled and interpreted. NaN
    and inf keep their class (the carry never reaches the exponent of a NaN's payload-free
    form that matters: inf has a zero mantissa, NaN stays NaN after masking).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    rounded = bits.to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def row_block(ptr, stride, n_rows, BLOCK: tl.constexpr):
    """The prologue of a kernel whose program owns BLOCK rows: (row offsets, valid mask, row
    base pointers). int64 pointer offsets: rows·stride can exceed 2^31 elements."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows
    return offs, mask, ptr + offs.to(tl.int64) * stride


@triton.jit
def load_scalar(ptr, PRESENT: tl.constexpr):
    """An fp32 0-dim argument read through a pointer (0 when absent); no host sync needed."""
    if PRESENT:
        value = tl.load(ptr).to(tl.float32)
    else:
        value = 0.0
    return value


@triton.jit
def load_rows(rows, cols, mask_rows, mask_cols, INPUT_PRECISION: tl.constexpr):
    """A (rows × cols) operand tile for tl.dot, zero outside the masks, TF32-rounded when the
    dot runs in TF32."""
    x = tl.load(rows[:, None] + cols[None, :], mask=mask_rows[:, None] & mask_cols[None, :],
                other=0.0)
    if INPUT_PRECISION == "tf32":
        x = round_tf32(x)
    return x


@triton.jit
def dot_rows(a_rows, b_rows, mask_a, mask_b, D, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """S = A_blk·B_blkᵀ (BLOCK_A × BLOCK_B, fp32) for row base pointers ``a_rows``/``b_rows``,
    looping over D in BLOCK_D chunks; out-of-range rows and the D tail load as 0."""
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        a = load_rows(a_rows, cols, mask_a, mask_d, INPUT_PRECISION)
        b = load_rows(b_rows, cols, mask_b, mask_d, INPUT_PRECISION)
        s = tl.dot(a, tl.trans(b), s, input_precision=INPUT_PRECISION)
    return s


@triton.jit
def cast_for_dot(p, like, INPUT_PRECISION: tl.constexpr):
    """An fp32 weight tile as the left operand of a second tl.dot against ``like``'s dtype
    (TF32-rounded for TF32 dots; fp16/bf16 operands: the caller pre-scales by CAST_SCALE)."""
    if INPUT_PRECISION == "tf32":
        p = round_tf32(p)
    return p.to(like.dtype)


# ----------------------------------------------------------------------------------------------
# Host helpers


def family(dtype: torch.dtype, tf32: bool) -> str:
    """Precision family of a kernel's config table: "16bit", "tf32" or "ieee"."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if tf32 else "ieee"


def input_precision(fam: str) -> str:
    # tl.dot's input_precision only changes fp32 products; 16-bit operands use tensor cores.
    return "tf32" if fam == "tf32" else "ieee"


def config(configs: dict, interpret_configs: dict, kernel: str, fam: str, D: int) -> dict:
    """Launch config (block sizes, warps, stages, INPUT_PRECISION) of ``kernel``; BLOCK_D-like
    sizes shrink to next_pow2(D) for small D (≥ 16, the smallest tl.dot)."""
    cfg = dict(interpret_configs[kernel] if INTERPRET else configs[kernel][fam])
    d_pow2 = max(16, triton.next_power_of_2(D))
    for key in ("BLOCK_D", "BLOCK_DV"):
        if key in cfg:
            cfg[key] = min(cfg[key], d_pow2)
    cfg["INPUT_PRECISION"] = input_precision(fam)
    return cfg


def aligned_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` itself when its rows are 16-aligned and ``width`` wide, else a zero-padded copy
    (an O(rows·D) copy next to the kernels' O(rows²·D) work). Zero columns add nothing to
    the products; callers drop the matching output columns (``unpad``)."""
    aligned = x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0
    if x.shape[1] == width and x.stride(1) == 1 and aligned:
        return x
    out = x.new_zeros(x.shape[0], width)
    out[:, : x.shape[1]] = x
    return out


def padded_width(d: int) -> int:
    return triton.cdiv(d, 16) * 16


def unpad(acc: torch.Tensor, d: int) -> torch.Tensor:
    """Drop the accumulator columns that came from zero padding."""
    return acc if acc.shape[1] == d else acc[:, :d].contiguous()


def scalar(value, device) -> torch.Tensor:
    """A 0-dim fp32 tensor for a kernel to read through a pointer (no .item(): no sync)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())


def vector(value, n: int, device, name: str) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(value.shape)}")
    return value.contiguous()


def launch_device(device):
    """Triton launches on the current CUDA device, which need not be the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Compile specs for gpu-report

_SPEC_PROVIDERS: list = []


def register_specs(provider) -> None:
    """Called at import by each kernel file with a function returning its compile specs."""
    if provider not in _SPEC_PROVIDERS:
        _SPEC_PROVIDERS.append(provider)


def all_specs() -> list[dict]:
    """Every registered spec, after importing every ``*_triton`` module of the package (so a
    new kernel file is found without being listed anywhere)."""
    import mmkernels
    for info in pkgutil.walk_packages(mmkernels.__path__, "mmkernels."):
        if info.name.rsplit(".", 1)[-1].endswith("_triton"):
            importlib.import_module(info.name)
    return [spec for provider in _SPEC_PROVIDERS for spec in provider()]


def compile_spec(kernel: str, fn, signature: dict, configs: dict, fam: str, aligned,
                 **constexprs) -> dict:
    """One spec: the shipped config of ``kernel`` for ``fam`` at full block sizes (large D).
    ``signature`` maps argument names to Triton types, "*features" standing for the family's
    input dtype; ``aligned`` names the arguments the wrappers guarantee 16-divisible (marked
    with ``tt.divisibility`` as the JIT would specialize them at run time)."""
    cfg = configs[kernel][fam]
    t = SPEC_DTYPES[fam]
    constexprs = dict(constexprs, INPUT_PRECISION=input_precision(fam),
                      **{key: value for key, value in cfg.items() if key.startswith("BLOCK_")})
    signature = {name: f"*{t}" if ty == "*features" else ty for name, ty in signature.items()}
    return dict(
        name=f"{kernel}[{t}]" if fam == "16bit" else f"{kernel}[fp32,{fam}]",
        fn=fn,
        signature={**signature, **{name: "constexpr" for name in constexprs}},
        constexprs=constexprs,
        attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
