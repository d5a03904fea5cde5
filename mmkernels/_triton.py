"""What every Triton kernel in mmkernels shares: precision families, input layout, launch
configs, small ``@triton.jit`` helpers, and the registry of compile specs that
``python -m mmkernels gpu-report`` compiles.

Imported only by the ``*_triton.py`` kernel files (never by ``import mmkernels``), so importing
the package does not import triton.

Precision (one rule for every kernel):

* fp16/bf16 inputs feed ``tl.dot`` directly with fp32 accumulation (family "16bit").
* fp32 inputs follow ``torch.get_float32_matmul_precision()``, read once per op call by the
  caller (``mmkernels._dispatch.fp32_uses_tf32``) and passed down as ``tf32``, so that a
  forward and its backward cannot disagree: "highest" (torch's default) runs exact IEEE fp32
  (family "ieee"); "high" or "medium" run TF32 tensor cores (family "tf32") on operands
  *rounded to nearest* first (``round_tf32``). Triton feeds raw fp32 to TF32 ``tl.dot``, which
  truncates the mantissa: a bias of up to 2^-10 relative per operand that does not average out
  (Inf-CL rounds by hand for the same reason). The Triton interpreter computes every ``tl.dot`` in fp32, so there a
  "tf32" kernel is exactly fp32 arithmetic on rounded operands: the TF32 oracle of the tests.

Layout: features/rows whose width, row stride or address is not a multiple of 16 elements are
copied into a zero-padded buffer of width roundup(D, 16) (``aligned_rows``). Triton
specializes launches on 16-divisibility; without it loads are not vectorized and the big
kernels spill registers.

Tile sweeps (the contrastive kernels; see ``logits_tile``, ``accumulate_slices``):

* Every logit tile is computed by ``logits_tile`` as (I-block)·(T-block)ᵀ with the same
  BLOCK_M × BLOCK_N × BLOCK_D shape in a forward and its backward, so the backward recomputes
  the forward's logits bit for bit. A softmax whose mass sits on one entry then gets
  exp(X − lse) = exp(0) = 1 exactly there, instead of exp(rounding of a logit of 1e5).
* A program keeps the rows it owns ("resident") and streams the other side's tiles. Its
  output rows, a (rows × D) fp32 gradient block, are accumulated in registers when D fits one
  BLOCK_DV slice, else in the output buffer itself, slice by slice after each tile
  (``accumulate_slices``): the tile's weights stay in registers and are used for every slice,
  so the logits are never recomputed per D-slice.
* Deterministic results (``deterministic()``: torch's flag) use no atomics: each output row
  has one owner program, and cross-program sums (log-sum-exp partials, scalar partial sums)
  go through small buffers reduced on the host in a fixed order. Otherwise the streamed side's
  gradient rows are added with fp32 atomics, which saves one recomputation of every tile.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
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
CAST_EXPONENT = 14

DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Each precision family is compiled for gpu-report with the dtype it serves.
SPEC_DTYPES = {"16bit": "bf16", "tf32": "fp32", "ieee": "fp32"}

# Grid sizing. A (row block × column range) program grid is given about PROGRAMS programs
# when the blocks allow it: two waves of a 132-SM H100 at one block per SM, so that small
# batches still fill the GPU and the tail of the last wave stays short. Shapes alone decide
# it (not the device), so a given call sums in the same order on every GPU.
PROGRAMS = 256


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
def rows_of(ptr, offs, stride):
    """Row base pointers; int64 offsets: rows·stride can exceed 2^31 elements."""
    return ptr + offs.to(tl.int64) * stride


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
def logits_tile(i_rows, t_rows, mask_m, mask_n, D, scale, bias, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """X = scale·I_blk·T_blkᵀ + bias (BLOCK_M × BLOCK_N, fp32) for row base pointers
    ``i_rows``/``t_rows``, looping over D in BLOCK_D chunks (the pipelined loop); padding rows
    and the D tail load as 0. Every kernel of a family forms its logits here with the same
    block sizes, in this orientation, so recomputed tiles equal the forward's bit for bit."""
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        a = load_rows(i_rows, cols, mask_m, mask_d, INPUT_PRECISION)
        b = load_rows(t_rows, cols, mask_n, mask_d, INPUT_PRECISION)
        s = tl.dot(a, tl.trans(b), s, input_precision=INPUT_PRECISION)
    return s * scale + bias


@triton.jit
def cast_for_dot(w, dtype, INPUT_PRECISION: tl.constexpr):
    """An fp32 weight tile as an operand of a second tl.dot on features of ``dtype``
    (TF32-rounded for TF32 dots; fp16/bf16: the caller pre-scales by a power of two)."""
    if INPUT_PRECISION == "tf32":
        w = round_tf32(w)
    return w.to(dtype)


@triton.jit
def accumulate_slices(out_rows, mask_out, w, src_rows, mask_src, D, has_prev, last, unscale,
                      ATOMIC: tl.constexpr, BLOCK_DV: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    """out[r, :D] += unscale·(w·src)[r, :D] for a weight tile ``w`` (R × C, cast for the dot)
    and the C source rows ``src_rows``, one BLOCK_DV slice of D at a time, in global memory.

    ATOMIC: fp32 atomic adds (other programs add to the same rows). Otherwise the program owns
    the rows: read-modify-write, reading only when ``has_prev`` (false on the first tile: the
    buffer is uninitialised), and the power-of-two ``unscale`` applied on the ``last`` tile.
    The caller puts a barrier between tiles: a tile's stores and the next tile's loads of the
    same addresses may be issued by different threads.
    """
    # Scalar conditions join masks through tl.where: the interpreter turns (vector & scalar)
    # masks into integers, which its tl.load rejects.
    offs_v = tl.arange(0, BLOCK_DV)
    for v0 in range(0, D, BLOCK_DV):
        cols = v0 + offs_v
        mask_v = cols < D
        src = load_rows(src_rows, cols, mask_src, mask_v, INPUT_PRECISION)
        ptrs = out_rows[:, None] + cols[None, :]
        mask = mask_out[:, None] & mask_v[None, :]
        if ATOMIC:
            part = tl.dot(w, src, input_precision=INPUT_PRECISION)
            tl.atomic_add(ptrs, part * unscale, mask=mask, sem="relaxed")
        else:
            acc = tl.load(ptrs, mask=tl.where(has_prev, mask, False), other=0.0)
            acc = tl.dot(w, src, acc, input_precision=INPUT_PRECISION)
            tl.store(ptrs, acc * tl.where(last, unscale, 1.0), mask=mask)


@triton.jit
def store_rows(out_rows, mask_out, acc, D, ATOMIC: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Write a register accumulator (R × BLOCK_DV, D ≤ BLOCK_DV) to its rows: a plain store
    for an owner program, an atomic add when other programs add to the same rows."""
    cols = tl.arange(0, BLOCK_DV)
    ptrs = out_rows[:, None] + cols[None, :]
    mask = mask_out[:, None] & (cols < D)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=mask)


# Dropout: the counter hash of ``mmkernels._rng.dropout_uniform`` in uint32 arithmetic, one
# implementation for every op (attention's probabilities, LoRA's adapter input). An element
# (row, column) is kept iff u = (h >> 8)·2⁻²⁴ ≥ p with
#     h = fmix32(fmix32(fmix32(column ^ seed_hi) ^ row) + seed_lo),
# compared on integers as (h >> 8) ≥ ⌈p·2²⁴⌉ (``dropout_threshold``), which is exact. The
# column half is one vector per column block (``dropout_column_hash``), so an element costs two
# fmix32 (``dropout_kept``).


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finalizer on uint32 (wrapping multiplications)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def seed_halves(seed_ptr, HAS_DROPOUT: tl.constexpr):
    """(seed_lo, seed_hi) as uint32 from the int64 seed tensor (0, 0 without dropout); read
    through a pointer, so drawing a seed never syncs the host."""
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        seed_hi = (seed >> 32).to(tl.uint32)
    else:
        seed_lo = 0
        seed_hi = 0
    return seed_lo, seed_hi


@triton.jit
def dropout_column_hash(cols, seed_hi):
    """The column half of the dropout hash, fmix32(column ^ seed_hi), for a vector of
    column indices (attention: the key's index in its sequence; LoRA: the feature)."""
    return fmix32(cols.to(tl.uint32) ^ seed_hi)


@triton.jit
def dropout_kept(column_hash, rows, seed_lo, threshold):
    """Keep mask for broadcast (column hash, row) pairs; ``rows`` uint32."""
    h = fmix32(fmix32(column_hash ^ rows) + seed_lo)
    return (h >> 8).to(tl.int32) >= threshold


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
    """Launch config (block sizes, warps, stages, INPUT_PRECISION) of ``kernel``: its GPU
    config (``gpu_config``) or, under the interpreter, its interpreter config."""
    if INTERPRET:
        return sized(interpret_configs[kernel], fam, D)
    return gpu_config(configs, kernel, fam, D)


def gpu_config(configs: dict, kernel: str, fam: str, D: int) -> dict:
    """The GPU launch config of ``kernel`` for family ``fam`` at width D (gpu-report's FLOP
    counts use it whatever the process's mode)."""
    return sized(configs[kernel][fam], fam, D)


def sized(cfg: dict, fam: str, D: int) -> dict:
    """BLOCK_D-like sizes shrunk to next_pow2(D) for small D (≥ 16, the smallest tl.dot)."""
    cfg = dict(cfg)
    d_pow2 = max(16, triton.next_power_of_2(D))
    for key in ("BLOCK_D", "BLOCK_DV"):
        if key in cfg:
            cfg[key] = min(cfg[key], d_pow2)
    cfg["INPUT_PRECISION"] = input_precision(fam)
    return cfg


def dropout_threshold(p: float) -> int:
    """⌈p·2²⁴⌉: u = (h >> 8)·2⁻²⁴ ≥ p  ⇔  (h >> 8) ≥ ⌈p·2²⁴⌉ (p·2²⁴ is exact in float64)."""
    return math.ceil(p * 2.0**24)


def deterministic() -> bool:
    """Whether the kernels must give run-to-run identical results (no atomics): torch's
    ``torch.use_deterministic_algorithms`` switch, read once per op call."""
    return torch.are_deterministic_algorithms_enabled()


def column_splits(row_programs: int, col_tiles: int) -> tuple[int, int]:
    """(splits, tiles per split) of the column tiles so that ``row_programs`` × splits is
    about ``PROGRAMS``; every split gets at least one tile."""
    splits = min(col_tiles, max(1, triton.cdiv(PROGRAMS, row_programs)))
    per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, per_split), per_split


def weight_scale(*weights: torch.Tensor) -> torch.Tensor:
    """[f, 1/f], f = 2^(CAST_EXPONENT − e) with max|w| = m·2^e (m in [0.5, 1)): the exact
    power of two that brings the largest weight to just under 2^14 before a weight tile is
    cast to fp16 (entries then stay above fp16's subnormal range down to ~4e-9 of the largest).
    A device tensor: no host sync. The exponent is clamped so both factors stay normal."""
    w_max = torch.stack([w.abs().amax() for w in weights]).amax()
    exponent = CAST_EXPONENT - torch.frexp(w_max).exponent.clamp(-112, 140)
    one = torch.ones((), dtype=torch.float32, device=w_max.device)
    return torch.stack([torch.ldexp(one, exponent), torch.ldexp(one, -exponent)]).float()


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


def kernel_signature(fn, feature_args, pointers: dict, floats=(), unit_strides=False) -> dict:
    """Triton types of a kernel's runtime arguments, for compiling it without a GPU: the
    ``feature_args`` pointers in the family's dtype ("*features"), ``pointers`` with their
    own types, ``floats`` fp32, with ``unit_strides`` the ``stride_*d`` arguments as the
    constexpr 1 the JIT specializes them to (contiguous last dims: the layout the configs are
    tuned for), every other integer i32. Read from the Python function's annotations: the
    same under the interpreter (which has no ``params``)."""
    sig = {}
    for param in inspect.signature(fn.fn).parameters.values():
        name = param.name
        if param.annotation is tl.constexpr:
            continue
        if name in feature_args:
            sig[name] = "*features"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        elif unit_strides and name.startswith("stride_") and name.endswith("d"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def compile_spec(kernel: str, fn, signature: dict, cfg: dict, fam: str, aligned, *, op: str,
                 path: str, flops, **constexprs) -> dict:
    """One spec: the shipped config ``cfg`` of ``kernel`` for ``fam``. ``signature`` maps
    argument names to Triton types, "*features" standing for the family's input dtype;
    ``aligned`` names the arguments the wrappers guarantee 16-divisible (marked with
    ``tt.divisibility`` as the JIT would specialize them at run time).

    ``op`` and ``path`` ("deterministic", "atomic", "forward" for both, "loss-only") group the
    kernels of one loss evaluation; ``flops(B, D)`` is the FLOPs this kernel executes for
    M = N = B (padding included) when it is the variant launched at that D, else None."""
    t = SPEC_DTYPES[fam]
    constexprs = dict(constexprs, INPUT_PRECISION=input_precision(fam),
                      **{key: value for key, value in cfg.items() if key.startswith("BLOCK_")})
    signature = {name: f"*{t}" if ty == "*features" else ty for name, ty in signature.items()}
    return dict(
        name=f"{kernel}[{t}]" if fam == "16bit" else f"{kernel}[fp32,{fam}]",
        op=op, path=path, family=fam, flops=flops,
        fn=fn,
        signature={**signature, **{name: "constexpr" for name in constexprs}},
        constexprs=constexprs,
        attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def tile_flops(rows: int, cols: int, depth: int, block_rows: int, block_cols: int,
               block_depth: int) -> int:
    """FLOPs of one tl.dot sweep over a rows × cols tile grid with reduction depth ``depth``,
    as executed: every dimension rounded up to its block (masked lanes still multiply)."""
    def up(n, b):
        return triton.cdiv(n, b) * b
    return 2 * up(rows, block_rows) * up(cols, block_cols) * up(depth, block_depth)
