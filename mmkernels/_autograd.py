"""Autograd pieces shared by every fused op."""
from __future__ import annotations

import torch


def double_backward(fn, grad, inputs, *args):
    """The gradients of Σ grad·fn(*inputs, *args) w.r.t. ``inputs`` as a differentiable graph:
    what a fused op's backward returns under ``create_graph=True`` (the fused kernels'
    gradients are not themselves differentiable, so the eager reference formula is
    differentiated instead). None for inputs that need no gradient."""
    with torch.enable_grad():
        leaves = [x for x in inputs if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad(fn(*inputs, *args), leaves, grad,
                                         create_graph=True, allow_unused=True))
    return tuple(next(grads) if x is not None and x.requires_grad else None for x in inputs)
