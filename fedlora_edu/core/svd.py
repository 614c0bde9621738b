"""Truncated SVD as LoRA factors, dense or from the factors of a product (Eckart-Young).

- :func:`truncated_factors`: the best rank-r approximation of an m x n matrix as (A, B),
  the singular values split evenly between the two (the dense route, O(m n min(m, n))).
- :func:`factored_svd`, :func:`truncated_factors_factored`: the SVD of a product
  B_stack A_stack from QR factorisations of its two factors, O((m + n) R^2) instead of
  O(m n min(m, n)), without forming the product.

Shared by the methods that redistribute an aggregate as low-rank factors (FlexLoRA, survey
eq. 6) and those that initialise from an SVD (FeDeRA and SLoRA, eq. 10). Taught in
``book/part2/aggregation_discordance.ipynb``; the factored route in ``book/fast/factored_svd.ipynb``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora_edu.core.checks import check_rank

SVD_METHODS = ("factored", "dense")


def check_method(method: object) -> str:
    """Validate an SVD route: ``"factored"`` (QR of the stacked factors) or ``"dense"`` (SVD of the product)."""
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    return str(method)


def balanced_split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) = (S_r^(1/2) V_r^T, U_r S_r^(1/2)) from an SVD, zero-padded to ``rank`` components.

    Each singular pair's sign is fixed so that the largest-magnitude entry of its left
    vector is positive: the SVD leaves (u_i, v_i) and (-u_i, -v_i) equally valid, and the
    convention makes two routes to the same SVD (dense or factored) return the same factors
    wherever the singular values are distinct.
    """
    r = min(rank, s.shape[0])
    u_r, vh_r = u[:, :r], vh[:r]
    if r > 0 and u_r.shape[0] > 0:
        pivot = u_r.abs().argmax(dim=0)
        signs = torch.sign(u_r.gather(0, pivot[None, :]))[0]
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        u_r, vh_r = u_r * signs[None, :], vh_r * signs[:, None]
    root = s[:r].clamp_min(0).sqrt()
    a = root[:, None] * vh_r
    b = u_r * root[None, :]
    if r < rank:  # more rank than the matrix has: pad with zero components
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    return a, b


def truncated_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation of ``delta`` as (A, B), by SVD (Eckart-Young).

    The singular values are split evenly, B = U_r S_r^(1/2) and A = S_r^(1/2) V_r^T, so
    both factors have the same scale and the first r' components of a rank-r result
    are the best rank-r' approximation. This is the dense route: one SVD of the m x n
    matrix, O(m n min(m, n)). :func:`truncated_factors_factored` reaches the same result
    from the factors of a product without forming it.
    """
    check_rank(rank)
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return balanced_split(u, s, vh, rank)


def factored_svd(B_stack: Tensor, A_stack: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the product ``B_stack @ A_stack`` without forming it (the route of ``book/fast/factored_svd``).

    ``B_stack`` is m x R and ``A_stack`` R x n (for instance :func:`flora_stack`'s factors,
    whose product is sum_k p_k B_k A_k of survey eq. 6). With the reduced QR
    factorisations B_stack = Q_B R_B and A_stack^T = Q_A R_A,

        B_stack A_stack = Q_B (R_B R_A^T) Q_A^T,

    and Q_B, Q_A have orthonormal columns, so the SVD of the small core
    R_B R_A^T = U_c S V_c^T gives the SVD of the product: U = Q_B U_c, V^T = V_c^T Q_A^T,
    the same S. Cost O((m + n) R^2 + R^3) instead of O(m n R) to form the product plus
    O(m n min(m, n)) for its SVD. Returns (U, S, Vh) with k = min(m, n, R) singular values;
    the product's other min(m, n) - k singular values are exactly zero. Correct for any R,
    including R > min(m, n) (then the core is min(m, R) x min(n, R) and nothing is saved)
    and rank-deficient stacks (R_B or R_A singular: the zero singular values come out as
    zero up to rounding, with arbitrary singular vectors).
    """
    if B_stack.ndim != 2 or A_stack.ndim != 2:
        raise ValueError(f"B_stack and A_stack must be matrices, got shapes {tuple(B_stack.shape)}, "
                         f"{tuple(A_stack.shape)}")
    if B_stack.shape[1] != A_stack.shape[0]:
        raise ValueError(f"B_stack is {tuple(B_stack.shape)} and A_stack {tuple(A_stack.shape)}: "
                         "B_stack must be m x R and A_stack R x n with the same R")
    if B_stack.shape[1] == 0:
        raise ValueError("B_stack and A_stack have R = 0 columns/rows: nothing to decompose")
    q_b, r_b = torch.linalg.qr(B_stack, mode="reduced")  # m x min(m, R), min(m, R) x R
    q_a, r_a = torch.linalg.qr(A_stack.T, mode="reduced")  # n x min(n, R), min(n, R) x R
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u_core, s, vh_core @ q_a.T


def truncated_factors_factored(B_stack: Tensor, A_stack: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """:func:`truncated_factors` of ``B_stack @ A_stack``, computed by :func:`factored_svd`.

    Same balanced split and sign convention, so it returns the same (A, B) as the dense
    route up to rounding wherever the top ``rank`` singular values are distinct.
    """
    check_rank(rank)
    u, s, vh = factored_svd(B_stack, A_stack)
    return balanced_split(u, s, vh, rank)
