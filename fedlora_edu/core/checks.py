"""Input checks shared by every layer: client weights p_k, factors A_k and B_k, ranks.

Every check raises a ValueError that names the bad argument and what was expected. In the
survey's notation (arXiv 2505.13502): ``As[k]`` is A_k (r_k x n), ``Bs[k]`` is B_k (m x r_k),
``weights[k]`` is p_k (non-negative, summing to one).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

WEIGHT_TOLERANCE = 1e-5
"""How far from 1 the weights p_k may sum (float32 round-off of n_k / sum_j n_j)."""


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """Validate client weights p_k: ``count`` of them, non-negative, summing to 1."""
    values = [float(w) for w in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(values) != count:
        raise ValueError(f"weights has {len(values)} entries for {count} clients")
    if any(not w >= 0 for w in values):
        raise ValueError(f"weights must be non-negative, got {values}")
    if abs(sum(values) - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"weights must sum to 1, they sum to {sum(values):.6g}")
    return values


def check_factors(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[int, int]:
    """Validate client factors; return (m, n). A_k must be r_k x n and B_k m x r_k."""
    if len(As) == 0:
        raise ValueError("As is empty: need at least one client")
    if len(As) != len(Bs):
        raise ValueError(f"As has {len(As)} matrices but Bs has {len(Bs)}")
    n = As[0].shape[-1]
    m = Bs[0].shape[0]
    for k, (a, b) in enumerate(zip(As, Bs, strict=True)):
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"client {k}: A and B must be matrices, got shapes {tuple(a.shape)}, {tuple(b.shape)}")
        if a.shape[1] != n:
            raise ValueError(f"As[{k}] has shape {tuple(a.shape)}; every A_k must have n = {n} columns")
        if b.shape[0] != m:
            raise ValueError(f"Bs[{k}] has shape {tuple(b.shape)}; every B_k must have m = {m} rows")
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"client {k}: Bs[{k}] is {tuple(b.shape)} and As[{k}] is {tuple(a.shape)}; "
                "B_k must be m x r_k and A_k r_k x n with the same r_k"
            )
    return m, n


def check_ranks(ranks: Sequence[int], count: int) -> list[int]:
    """Validate per-client ranks r_k >= 1."""
    values = list(ranks)
    if len(values) != count:
        raise ValueError(f"ranks has {len(values)} entries for {count} clients")
    for r in values:
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"ranks must be integers >= 1, got {values}")
    return values


def check_rank(rank: object) -> int:
    """Validate a target rank: an integer >= 1."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return rank
