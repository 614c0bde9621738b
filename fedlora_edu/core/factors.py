"""The factor math every method shares: weighted sums (survey eq. 1) and the two sides of eq. 4.

In the survey's notation (arXiv 2505.13502): ``As[k]`` is A_k (r_k x n), ``Bs[k]`` is B_k
(m x r_k), ``weights[k]`` is p_k. Products are unscaled (LoRA's alpha / r multiplies every
term alike).

- :func:`average_tensors`: sum_k p_k T_k, FedAvg's weighted sum (eq. 1; the weights of a
  round's uploads are :func:`fedlora_edu.core.strategy.normalized_weights`).
- :func:`ideal_update`: sum_k p_k B_k A_k (m x n), the right side of eq. 4 (and of eq. 6).
- :func:`fedit_average`: (sum_k p_k A_k, sum_k p_k B_k), separate averaging, the left side of eq. 4.
- :func:`discordance`: the gap between the two sides, || avg(B) avg(A) - sum_k p_k B_k A_k ||_F.

Taught in ``book/part1/fedlora.ipynb`` and ``book/part2/aggregation_discordance.ipynb``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora_edu.core.checks import check_factors, check_weights


def average_tensors(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """sum_k p_k T_k."""
    return sum(w * t for w, t in zip(weights, tensors, strict=True))  # type: ignore[return-value]


def ideal_update(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k p_k B_k A_k (m x n): the ideal aggregation of survey eq. 4, right side."""
    check_factors(As, Bs)
    p = check_weights(weights, len(As))
    return sum(w * (b @ a) for w, a, b in zip(p, As, Bs, strict=True))  # type: ignore[return-value]


def fedit_average(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FedIT (Zhang et al. 2024): (sum_k p_k A_k, sum_k p_k B_k), eq. 4 left side. Equal ranks only."""
    check_factors(As, Bs)
    p = check_weights(weights, len(As))
    if len({a.shape[0] for a in As}) != 1:
        raise ValueError(f"FedIT averages A and B elementwise: all ranks must match, got {[a.shape[0] for a in As]}")
    return average_tensors(list(As), p), average_tensors(list(Bs), p)


def discordance(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]) -> float:
    """|| avg(B) avg(A) - sum_k p_k B_k A_k ||_F: the aggregation discordance of survey eq. 4."""
    a_bar, b_bar = fedit_average(As, Bs, weights)
    return float(torch.linalg.matrix_norm(b_bar @ a_bar - ideal_update(As, Bs, weights)))
