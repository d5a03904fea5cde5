"""Argument checks shared by the public ops.

Bad input must fail early with a ValueError/TypeError that names the argument and what was
expected, never reach a kernel (where it could read out of bounds) and never give a silently
wrong answer.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def features(op: str, name: str, t) -> torch.Tensor:
    """A (B, D) floating-point tensor with B, D >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape (B, D), "
                        f"got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must have shape (B, D), got a {t.dim()}-D tensor "
                         f"of shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, "
                        f"got {_dtype_name(t.dtype)}")
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
                        f"got {_dtype_name(image.dtype)} and {_dtype_name(text.dtype)}")
    if image.device != text.device:
        raise ValueError(f"{op}: image_features and text_features must be on the same device, "
                         f"got {image.device} and {text.device}")


def scalar(op: str, name: str, x, device, optional: bool = False) -> torch.Tensor | None:
    """A Python number or a one-element floating tensor on ``device``, as a 0-dim tensor.

    Tensors keep their autograd history (the gradient flows back to them); numbers become
    constants.
    """
    if x is None:
        if optional:
            return None
        raise TypeError(f"{op}: {name} must be a float or a 0-dim tensor, got None")
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
        raise TypeError(f"{op}: {name} must be a float or a 0-dim tensor, "
                        f"got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar (0-dim or one-element tensor), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, "
                            f"got {_dtype_name(x.dtype)}")
        if x.device != device:
            raise ValueError(f"{op}: {name} must be on the features' device {device}, "
                             f"got {x.device}")
        return x.reshape(())
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def choice(op: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")
