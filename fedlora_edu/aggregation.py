"""Server aggregation (survey section 3.1): the math as pure functions, then the strategies.

Every function takes client factors in the survey's notation: ``As[k]`` is A_k
(r_k x n), ``Bs[k]`` is B_k (m x r_k), ``weights[k]`` is p_k (non-negative, summing to
one). Products are unscaled (the LoRA factor alpha / r multiplies every term alike).

- :func:`ideal_update`: sum_k p_k B_k A_k, the right side of eq. 4 (and eq. 6).
- :func:`fedit_average`, :func:`discordance`: FedIT averages A and B separately, the
  left side of eq. 4; the discordance is the gap between the two sides.
- :func:`ffa_aggregate`: FFA-LoRA freezes A and averages B (eq. 5).
- :func:`flora_stack`: FLoRA stacks the clients' factors; their product is the ideal update.
- :func:`flexlora`: FlexLoRA forms sum_k p_k B_k A_k and hands each client its best
  rank-r_k approximation by SVD (eq. 6 and Eckart-Young).
- :func:`fedex_residual`: FedEx-LoRA folds ideal minus averaged product into W' (eq. 7).
- :func:`factored_svd`, :func:`truncated_factors_factored`: the SVD of a product B_stack A_stack
  from QR factorisations of its two factors, O((m + n) R^2) instead of O(m n min(m, n)).
  FlexLoRA's redistribution uses it by default. FedEx-LoRA's residual and FLoRA's merge
  need the m x n product itself (it is folded into W'), not its SVD, so it does not apply
  to them.

Taught in ``book/part2/aggregation_discordance.ipynb``; the factored SVD in
``book/fast/factored_svd.ipynb``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora_edu.strategy import (
    Payload,
    ServerState,
    Strategy,
    Upload,
    average_tensors,
    normalized_weights,
    split_factors,
)

WEIGHT_TOLERANCE = 1e-5


# ----------------------------------------------------------------------------------------
# Pure functions on client matrices
# ----------------------------------------------------------------------------------------
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


def ffa_aggregate(A: Tensor, Bs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """FFA-LoRA (Sun et al. 2024), eq. 5: with A frozen and shared, sum_k p_k B_k A = (sum_k p_k B_k) A.

    Returns the averaged B; its product with the shared A equals the ideal update exactly.
    """
    check_factors([A] * len(Bs), Bs)
    return average_tensors(list(Bs), check_weights(weights, len(Bs)))


def flora_stack(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FLoRA (Wang et al. 2024): stack p_k A_k row-wise and B_k column-wise.

    Returns (A, B) with A of shape (sum r_k) x n and B m x (sum r_k); B A equals
    :func:`ideal_update` exactly (block matrix product), for any mix of ranks.
    """
    check_factors(As, Bs)
    p = check_weights(weights, len(As))
    return torch.cat([w * a for w, a in zip(p, As, strict=True)], dim=0), torch.cat(list(Bs), dim=1)


def _balanced_split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
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


def check_rank(rank: object) -> int:
    """Validate a target rank: an integer >= 1."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return rank


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
    return _balanced_split(u, s, vh, rank)


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
    return _balanced_split(u, s, vh, rank)


SVD_METHODS = ("factored", "dense")


def check_method(method: object) -> str:
    """Validate an SVD route: ``"factored"`` (QR of the stacked factors) or ``"dense"`` (SVD of the product)."""
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    return str(method)


def flexlora(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], ranks: Sequence[int],
    method: str = "factored",
) -> list[tuple[Tensor, Tensor]]:
    """FlexLoRA (Bai et al. 2024), eq. 6: SVD of sum_k p_k B_k A_k, redistributed to each rank.

    Returns one (A_k, B_k) per entry of ``ranks``: the best rank-r_k approximation
    of the ideal update (clients may have different ranks). ``method="factored"`` (the
    default) takes the SVD from the stacked factors (:func:`factored_svd`) and never
    forms the m x n sum; ``method="dense"`` forms it and takes its SVD (the reference).
    When the total rank R = sum_k r_k reaches min(m, n), the factored route has nothing
    to save and takes the dense SVD. Both give the same products B_k A_k up to rounding.
    """
    check_method(method)
    rank_list = check_ranks(ranks, len(ranks))
    if not rank_list:
        raise ValueError("ranks is empty")
    a_stack, b_stack = flora_stack(As, Bs, weights)
    m, total_rank, n = b_stack.shape[0], b_stack.shape[1], a_stack.shape[1]
    # With R >= min(m, n) the QR core is as large as the product: the factored route saves
    # nothing (benchmarks/svd.py measures it slower), so it takes the dense SVD instead.
    if method == "dense" or total_rank >= min(m, n):
        a, b = truncated_factors(ideal_update(As, Bs, weights), max(rank_list))
    else:
        a, b = truncated_factors_factored(b_stack, a_stack, max(rank_list))
    return [(a[:r].clone(), b[:, :r].clone()) for r in rank_list]


def fedex_residual(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """FedEx-LoRA (Singhal et al. 2024), eq. 7: R = sum_k p_k B_k A_k - avg(B) avg(A).

    Folding R into the frozen weight (W' <- W' + R) makes W' + avg(B) avg(A) equal the
    ideal aggregation exactly. R is full-size (m x n): that is its communication cost.
    """
    a_bar, b_bar = fedit_average(As, Bs, weights)
    return ideal_update(As, Bs, weights) - b_bar @ a_bar


# ----------------------------------------------------------------------------------------
# Strategies: the same math inside the simulator
# ----------------------------------------------------------------------------------------
def _collect(
    server: ServerState, uploads: list[Upload], *, require_both: bool = False
) -> tuple[list[float], dict[str, tuple[list, list]]]:
    """Per layer, the clients' A's and B's, and the weights p_k.

    With ``require_both`` every upload must carry both factors of every layer (methods that
    train A and B each round), else a ValueError names the client and the layer.
    """
    names = list(server.adapters)
    weights = normalized_weights(uploads)
    per_layer: dict[str, tuple[list, list]] = {n: ([], []) for n in names}
    for upload in uploads:
        a, b = split_factors(upload.payload, names)
        for n in names:
            if require_both and (n not in a or n not in b):
                raise ValueError(f"client {upload.client_id}'s upload carries no {n}.A or {n}.B")
            if n in a:
                per_layer[n][0].append(a[n])
            if n in b:
                per_layer[n][1].append(b[n])
    return weights, per_layer


class FedIT(Strategy):
    """FedIT (Zhang et al. 2024, "Towards building the federated GPT"): FedAvg on A and B separately.

    Its aggregate is the left side of survey eq. 4, so it carries the discordance.
    """

    name = "FedIT"

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = _collect(server, uploads)
        server.adapters = {n: fedit_average(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)


class FFALoRA(Strategy):
    """FFA-LoRA (Sun et al. 2024, ICLR): A stays at its random initialisation; only B trains (eq. 5).

    A is derived from the shared seed, so clients never download it; each round moves
    B and the head only.
    """

    name = "FFA-LoRA"

    def trainable(self, round_index: int) -> frozenset[str]:
        return frozenset({"B"})

    def client_start(self, server, client_id, client_state, round_index):
        start = super().client_start(server, client_id, client_state, round_index)
        tensors = {k: v for k, v in start.download.tensors.items() if not k.endswith(".A")}
        start.download = Payload(tensors)
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = _collect(server, uploads)
        server.adapters = {
            n: (server.adapters[n][0], ffa_aggregate(server.adapters[n][0], b_list, weights))
            for n, (_, b_list) in per_layer.items()
        }
        self.aggregate_head(server, uploads)


class FLoRA(Strategy):
    """FLoRA (Wang et al. 2024, NeurIPS): stack the clients' adapters, merge the stack into W'.

    The server broadcasts the stacked adapter (rank sum_k r_k); every client adds its
    product to its frozen weight and starts the next round from a fresh LoRA (A random,
    B zero). Clients may have different ranks.
    """

    name = "FLoRA"

    def __init__(self, rank: int | None = None, ranks: Sequence[int] | None = None) -> None:
        super().__init__(rank)
        self.ranks = None if ranks is None else check_ranks(ranks, len(ranks))

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return self.ranks[client_id] if self.ranks is not None else super().client_rank(client_id, server)

    def max_rank(self, num_clients: int) -> int | None:
        return max(self.ranks) if self.ranks is not None else self.rank

    def client_start(self, server, client_id, client_state, round_index):
        start = super().client_start(server, client_id, client_state, round_index)
        # The fresh adapter comes from the shared seed; what is downloaded is last round's stack.
        stacked = server.extra.get("stacked", {})
        tensors = {f"{n}.{side}": t for n, (a, b) in stacked.items() for side, t in (("A", a), ("B", b))}
        tensors.update({f"head.{k}": v for k, v in server.head.items()})
        start.download = Payload(tensors)
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = _collect(server, uploads)
        stacked = {n: flora_stack(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        server.extra["stacked"] = stacked
        server.base_deltas = {n: server.scaling * (b @ a) for n, (a, b) in stacked.items()}
        # Fresh adapter for the next round: a new random A (survey eq. 9), zero B.
        generator = torch.Generator().manual_seed(int(server.extra.get("seed", 0)) * 7_919 + round_index + 1)
        server.adapters = {
            n: (torch.empty_like(a).uniform_(-1.0, 1.0, generator=generator) / a.shape[1] ** 0.5,
                torch.zeros_like(b))
            for n, (a, b) in server.adapters.items()
        }
        self.aggregate_head(server, uploads)


class FlexLoRA(Strategy):
    """FlexLoRA (Bai et al. 2024, NeurIPS): full-size aggregation, SVD redistributed to each rank (eq. 6).

    ``ranks[k]`` is client k's rank (default: all equal). The global adapter kept by
    the server is the best rank-max(r_k) approximation of sum_k p_k B_k A_k; client k
    starts from its first r_k components, which are its best rank-r_k approximation.
    ``method`` picks the SVD route of :func:`flexlora` (``"factored"`` by default, never
    forming the m x n sum on the server; ``"dense"`` is the reference).
    """

    name = "FlexLoRA"

    def __init__(self, rank: int | None = None, ranks: Sequence[int] | None = None, method: str = "factored") -> None:
        super().__init__(rank)
        self.ranks = None if ranks is None else check_ranks(ranks, len(ranks))
        self.method = check_method(method)

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return self.ranks[client_id] if self.ranks is not None else super().client_rank(client_id, server)

    def max_rank(self, num_clients: int) -> int | None:
        if self.ranks is not None and len(self.ranks) != num_clients:
            raise ValueError(f"ranks has {len(self.ranks)} entries for {num_clients} clients")
        return max(self.ranks) if self.ranks is not None else self.rank

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = _collect(server, uploads)
        server.adapters = {n: flexlora(a_list, b_list, weights, [server.rank], method=self.method)[0]
                           for n, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)


class FedExLoRA(Strategy):
    """FedEx-LoRA (Singhal et al. 2024), eq. 7: FedIT's averages plus the exact residual in W'.

    Each client downloads the averaged A and B and the full-size residual of every
    adapted layer (m x n each), which it adds to its frozen weight.
    """

    name = "FedEx-LoRA"

    def client_start(self, server, client_id, client_state, round_index):
        start = super().client_start(server, client_id, client_state, round_index)
        residuals = server.extra.get("residuals", {})
        start.download = Payload(
            {**start.download.tensors, **{f"{n}.residual": r for n, r in residuals.items()}}
        )
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = _collect(server, uploads)
        averaged = {n: fedit_average(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        residuals = {n: fedex_residual(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        server.adapters = averaged
        server.extra["residuals"] = residuals
        server.base_deltas = {n: server.scaling * r for n, r in residuals.items()}
        self.aggregate_head(server, uploads)


METHODS: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedIT, FFALoRA, FLoRA, FlexLoRA, FedExLoRA)
}


def make_strategy(name: str, **kwargs: object) -> Strategy:
    """Build a strategy by its survey name (``"FedIT"``, ``"FFA-LoRA"``, ``"CoLR"``, ...).

    Any method of the book, not only the five of this module: the registry is
    :data:`fedlora_edu.methods.METHODS` (imported here when called, since it imports
    this module).
    """
    from fedlora_edu.methods import make_strategy as make_any

    return make_any(name, **kwargs)
