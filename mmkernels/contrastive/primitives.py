"""The tile primitives a fast backend provides to the contrastive losses, behind one interface.

Both losses reduce to these O(M·N·D)-work, O((M+N)·D)-memory passes over the similarity tiles
X = s·I·Tᵀ + b of I (M×D) and T (N×D); everything else (diagonal terms, label smoothing,
reductions, collectives) is O(B·D) PyTorch shared by all backends in infonce.py / siglip.py.

  lse(I, T, s, b)                             -> row_lse (M,), col_lse (N,)
  grad(I, T, s, b, r, c, w_r, w_c)            -> A_I = P·T, A_T = Pᵀ·I, ΣP
        with P_ij = w_r[i]·exp(X_ij − r_i) + w_c[j]·exp(X_ij − c_j)
  siglip_pass(I, T, s, b, offset, want_grad)  -> Σ softplus(−z·X), A_I = G·T, A_T = Gᵀ·I, ΣG
        with z_ij = +1 iff j = i + offset, G = ∂/∂X of the loss sum

C++ (csrc/contrastive/) computes row and column quantities in one pass; Triton
(infonce_triton.py, siglip_triton.py) runs its one-sided kernels with the roles of I and T
swapped for the column side.
"""
from __future__ import annotations


class TritonPrimitives:
    """The Triton kernels, with the fp32 product precision fixed for the call (``tf32``)."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def lse(self, i, t, scale, bias):
        from .infonce_triton import infonce_lse
        return infonce_lse(i, t, scale, bias, self.tf32), infonce_lse(t, i, scale, bias, self.tf32)

    def grad(self, i, t, scale, bias, row_lse, col_lse, row_w, col_w):
        from .infonce_triton import infonce_grad
        a_i, psum = infonce_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w, self.tf32)
        a_t, _ = infonce_grad(t, i, scale, bias, col_lse, row_lse, col_w, row_w, self.tf32)
        return a_i, a_t, psum

    def siglip_pass(self, i, t, scale, bias, offset, want_grad):
        from .siglip_triton import siglip_pass
        return siglip_pass(i, t, scale, bias, offset, want_grad, self.tf32)


def primitives(backend: str, tf32: bool):
    """The primitive set of a fast backend ("cpu" or "triton")."""
    if backend == "cpu":
        from .cpu import CppPrimitives
        return CppPrimitives
    return TritonPrimitives(tf32)
