"""Argument checks shared by the public ops.

Bad input must fail early with a ValueError/TypeError that names the argument and what was
expected, never reach a kernel (where it could read out of bounds) and never give a silently
wrong answer.
"""
from __future__ import annotations

import numbers

import torch

#: The floating dtypes every op takes (backends may take fewer: see ``_dispatch.Impl``).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype math runs in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_number(x) -> bool:
    """A real number: Python int/float and numpy scalars (np.float32, np.int64...), not bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor)) \
        and type(x).__name__ != "bool_"


def floating_tensor(op: str, name: str, t, shape: str, dim: int) -> torch.Tensor:
    """A floating-point tensor of rank ``dim``; ``shape`` names its dims in the messages
    (e.g. "(B, D)")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {shape}, "
                        f"got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must have shape {shape}, got a {t.dim()}-D tensor "
                         f"of shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, "
                        f"got {dtype_name(t.dtype)}")
    return t


def features(op: str, name: str, t) -> torch.Tensor:
    """A (B, D) floating-point tensor with B, D >= 1."""
    floating_tensor(op, name, t, "(B, D)", 2)
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have B >= 1 and D >= 1, got shape {tuple(t.shape)}")
    return t


def feature_pair(op: str, image, text) -> None:
    features(op, "image_features", image)
    features(op, "text_features", text)
    if image.shape != text.shape:
        raise ValueError(f"{op}: image_features and text_features must have the same shape "
                         f"(B, D), got {tuple(image.shape)} and {tuple(text.shape)}")
    if image.dtype != text.dtype:
        raise TypeError(f"{op}: image_features and text_features must have the same dtype, "
                        f"got {dtype_name(image.dtype)} and {dtype_name(text.dtype)}")
    if image.device != text.device:
        raise ValueError(f"{op}: image_features and text_features must be on the same device, "
                         f"got {image.device} and {text.device}")


SCALAR = "a scalar: a real number (Python or numpy) or a one-element floating-point tensor"


def scalar(op: str, name: str, x, device, dtype=torch.float32,
           optional: bool = False) -> torch.Tensor | None:
    """A number or a one-element floating tensor on ``device``, as a 0-dim tensor.

    Tensors keep their dtype and autograd history (the gradient flows back to them); numbers
    become constants of ``dtype`` (the features' compute dtype, so a float64 call keeps a
    float64 scale).
    """
    if x is None:
        if optional:
            return None
        raise TypeError(f"{op}: {name} must be {SCALAR}, got None")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{op}: {name} must be {SCALAR}, got a tensor of shape "
                             f"{tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be {SCALAR}, got a {dtype_name(x.dtype)} tensor")
        if x.device != device:
            raise ValueError(f"{op}: {name} must be on the features' device {device}, "
                             f"got {x.device}")
        return x.reshape(())
    if not is_number(x):
        raise TypeError(f"{op}: {name} must be {SCALAR}, got {type(x).__name__}")
    return torch.tensor(float(x), dtype=dtype, device=device)


def choice(op: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")
