"""The three tile primitives a fast backend provides, behind one interface.

Both contrastive losses reduce to these O(M·N·D)-work, O((M+N)·D)-memory passes over the
similarity tiles X = s·I·Tᵀ + b of I (M×D) and T (N×D); everything else (diagonal terms,
label smoothing, reductions, collectives) is O(B·D) PyTorch shared by all backends in
infonce.py / siglip.py.

  lse(I, T, s, b)                        -> row_lse (M,), col_lse (N,)
  grad(I, T, s, b, r, c, w_r, w_c)       -> A_I = P·T, A_T = Pᵀ·I, ΣP
        with P_ij = w_r[i]·exp(X_ij − r_i) + w_c[j]·exp(X_ij − c_j)
  siglip(I, T, s, b, offset, want_grad)  -> Σ softplus(−z·X), A_I = G·T, A_T = Gᵀ·I, ΣG
        with z_ij = +1 iff j = i + offset, G = ∂/∂X of the loss sum

C++ (csrc/cpu/infonce.cpp, csrc/cpu/siglip.cpp) computes row and column quantities in one
pass; Triton (infonce_triton.py, siglip_triton.py) runs its one-sided kernel twice with the
roles of I and T swapped, since the transposed logits are the same products.
"""
from __future__ import annotations

from .. import _cpp


class CppPrimitives:
    name = "cpu"

    @staticmethod
    def lse(i, t, scale, bias):
        return _cpp.load().infonce_lse(i, t, scale, bias)

    @staticmethod
    def grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w):
        return _cpp.load().infonce_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w)

    @staticmethod
    def siglip(i, t, scale, bias, offset, want_grad):
        return _cpp.load().siglip_fwd_bwd(i, t, scale, bias, offset, want_grad)


class TritonPrimitives:
    name = "triton"

    @staticmethod
    def lse(i, t, scale, bias):
        from .infonce_triton import infonce_lse
        return infonce_lse(i, t, scale, bias), infonce_lse(t, i, scale, bias)

    @staticmethod
    def grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w):
        from .infonce_triton import infonce_grad
        a_i, psum = infonce_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w)
        a_t, _ = infonce_grad(t, i, scale, bias, col_lse, row_lse, col_w, row_w)
        return a_i, a_t, psum

    @staticmethod
    def siglip(i, t, scale, bias, offset, want_grad):
        from .siglip_triton import siglip_grad
        loss, a_i, gsum = siglip_grad(i, t, scale, bias, offset, True)
        if not want_grad:
            return loss, a_i.new_empty(0), a_i.new_empty(0), gsum
        _, a_t, _ = siglip_grad(t, i, scale, bias, -offset, False)
        return loss, a_i, a_t, gsum


PRIMITIVES = {"cpu": CppPrimitives, "triton": TritonPrimitives}
