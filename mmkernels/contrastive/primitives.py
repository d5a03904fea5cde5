"""The tile primitives a fast backend provides to the contrastive losses, behind one interface.

Both losses reduce to these O(M·N·D)-work, O((M+N)·D)-memory passes over the similarity tiles
X = s·I·Tᵀ + b of I (M×D) and T (N×D); everything else (diagonal terms, label smoothing,
reductions, collectives) is O(B·D) PyTorch shared by all backends in infonce.py / siglip.py.

The positive of row i is column i + offset (rank·b in a distributed batch; absent when out of
range).

  lse(I, T, s, b, offset, keep_rows)
      -> LSE_{j≠i+offset} X_ij (M,), LSE_{i: i+offset≠j} X_ij (N,), X_{i,i+offset} (M,) as the
         tile computed it (−inf where absent), and the first ``keep_rows`` rows of X (of Xᵀ
         when M > N) for ``grad`` (empty when 0; C++ only, see cpu.py)
  grad(I, T, s, b, r, c, w_r, w_c, offset, tiles)  -> A_I = P·T, A_T = Pᵀ·I, ΣP
      with P_ij = w_r[i]·exp(X_ij − r_i) + w_c[j]·exp(X_ij − c_j) off the positives, 0 on them
      (the host adds the positives' terms without cancellation); kept rows read from ``tiles``
  siglip_pass(I, T, s, b, offset, want_grad)  -> Σ softplus(−z·X), A_I = G·T, A_T = Gᵀ·I, ΣG
      with z_ij = +1 iff j = i + offset, G = ∂/∂X of the loss sum

C++ (csrc/contrastive/) and Triton (infonce_triton.py, siglip_triton.py) both compute row and
column quantities from one computation of each tile (Triton's deterministic backward computes
each tile twice: once per output side, see infonce_triton.py).
"""
from __future__ import annotations


class TritonPrimitives:
    """The Triton kernels, with the fp32 product precision fixed for the call (``tf32``).

    ``grad`` and ``siglip_pass`` take the atomic path (each tile computed once, gradient rows
    added with fp32 atomics) unless torch's deterministic mode is on; ``lse`` is always
    deterministic. Logits are never kept: ``keep_rows`` is ignored and ``tiles`` is empty."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def lse(self, i, t, scale, bias, offset, keep_rows):
        from .infonce_triton import infonce_lse
        return (*infonce_lse(i, t, scale, bias, offset, self.tf32), i.new_empty(0))

    def grad(self, i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset, tiles):
        from .infonce_triton import infonce_grad
        return infonce_grad(i, t, scale, bias, row_lse, col_lse, row_w, col_w, offset,
                            self.tf32)

    def siglip_pass(self, i, t, scale, bias, offset, want_grad):
        from .siglip_triton import siglip_pass
        return siglip_pass(i, t, scale, bias, offset, want_grad, self.tf32)


def primitives(backend: str, tf32: bool):
    """The primitive set of a fast backend ("cpu" or "triton")."""
    if backend == "cpu":
        from .cpu import CppPrimitives
        return CppPrimitives
    return TritonPrimitives(tf32)
