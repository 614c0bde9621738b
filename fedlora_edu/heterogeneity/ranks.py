"""Heterogeneous ranks (survey section 4.1, eq. 12): clients of different LoRA ranks r_k, one server adapter.

Survey eq. 12 is the usual federated objective, min sum_k p_k f_k(A_k, B_k, W'; D_k), with one
difference: client k's factors have its own rank r_k, ``A_k`` r_k x n and ``B_k`` m x r_k, chosen
for its resources or its task. The server keeps one adapter of the largest rank r_max and must
move between the two sizes in both directions:

- **down**, to a client: truncation, the first r_k rows of A and columns of B
  (:func:`truncate_factors`);
- **up**, from the clients: HetLoRA (Cho et al. 2024, EMNLP, arXiv 2401.06432) pads every
  client's factors with zeros to r_max (:func:`zero_pad_factors`) and averages them with
  *sparsity weights* p_k proportional to ||B_k A_k||_F (:func:`sparsity_weights`,
  :func:`zero_padding_average`); replication-based padding (Byun and Lee 2024, arXiv
  2406.17477; RBLA, Chen et al. 2024a, arXiv 2408.08699) fills a low-rank client's missing rank
  slots from the clients that hold them instead of with zeros, so that slot i is averaged over
  its holders only (:func:`replication_padding_average`).

HetLoRA's clients also keep their rank small themselves: the local loss carries a penalty on the
tail of the rank, lambda ||B_k[:, t:]||_F ||A_k[t:, :]||_F with t = floor(gamma r_k)
(:func:`rank_tail_penalty`), and a client whose tail shrank in its round prunes it,
r_k <- max(r_min, floor(gamma r_k)) (:func:`pruned_rank`). :class:`HetLoRA` puts these together
as a strategy of the simulator.

Sources: HetLoRA has no official code; the rules above are those of the two re-implementations
listed in ``METHOD_SOURCES.md`` (FlexLoRA's, alibaba/FederatedScope@4643e1a5,
``fed_utils/client.py`` and ``fed_utils/model_aggregation.py``), which agree on them. For
replication-based padding only the abstract and summaries are known; the exact replication rule
is ours (see :func:`replication_padding_average`).

Notation: ``As[k]`` is A_k (r_k x n), ``Bs[k]`` is B_k (m x r_k), ``weights[k]`` is p_k.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora_edu.core.adapters import ADAPTER, Factors, lora_layers
from fedlora_edu.core.checks import check_factors, check_rank, check_ranks, check_weights
from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    normalized_weights,
)


def truncate_factors(A: Tensor, B: Tensor, rank: int) -> Factors:
    """The first ``rank`` components of (A, B): A[:rank] (rank x n) and B[:, :rank] (m x rank), as copies.

    What a client of rank r_k downloads from a server adapter of larger rank (HetLoRA's
    distribution). ``rank`` may not exceed the adapter's rank.
    """
    check_factors([A], [B])
    rank = check_rank(rank)
    if rank > A.shape[0]:
        raise ValueError(f"rank {rank} exceeds the adapter's rank {A.shape[0]}: truncation cannot add components")
    return A[:rank].clone(), B[:, :rank].clone()


def zero_pad_factors(A: Tensor, B: Tensor, rank: int) -> Factors:
    """(A, B) padded with zeros to ``rank`` components: A gets zero rows, B zero columns; B A is unchanged."""
    check_factors([A], [B])
    rank = check_rank(rank)
    if rank < A.shape[0]:
        raise ValueError(f"rank {rank} is below the factors' rank {A.shape[0]}: padding cannot remove components")
    extra = rank - A.shape[0]
    return (torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0),
            torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1))


def _check_clients(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float] | None,
                   max_rank: int | None) -> tuple[list[float], int]:
    check_factors(As, Bs)
    ranks = [int(a.shape[0]) for a in As]
    if max_rank is None:
        max_rank = max(ranks)
    max_rank = check_rank(max_rank)
    if max_rank < max(ranks):
        raise ValueError(f"max_rank {max_rank} is below the largest client rank {max(ranks)}")
    p = check_weights(weights, len(As)) if weights is not None else [1.0 / len(As)] * len(As)
    return p, max_rank


def update_norm(A: Tensor, B: Tensor) -> float:
    """||B A||_F without forming the m x n product: sqrt(trace((B^T B)(A A^T))), an r x r computation."""
    check_factors([A], [B])
    gram = (B.T @ B) * (A @ A.T)  # elementwise: trace(X Y) = sum_ij X_ij Y_ji, and A A^T is symmetric
    return float(gram.sum().clamp(min=0.0).sqrt())


def sparsity_weights(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> list[float]:
    """HetLoRA's aggregation weights: p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F.

    A client whose update is larger (less sparse) counts more. If every update is zero the
    weights are equal.
    """
    check_factors(As, Bs)
    norms = [update_norm(a, b) for a, b in zip(As, Bs, strict=True)]
    total = sum(norms)
    if total == 0.0:
        return [1.0 / len(norms)] * len(norms)
    return [value / total for value in norms]


def zero_padding_average(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float] | None = None,
                         max_rank: int | None = None) -> Factors:
    """HetLoRA's aggregation: pad every client to ``max_rank`` (default: the largest r_k) with zeros, then average.

    Returns (A, B), ``max_rank x n`` and ``m x max_rank``: A = sum_k p_k pad(A_k), B = sum_k p_k
    pad(B_k). ``weights`` are the p_k (default equal; pass :func:`sparsity_weights` for
    HetLoRA's). Rank slot i is averaged over *all* clients, those that do not hold it
    contributing zeros: the dilution that replication-based padding avoids.
    """
    p, max_rank = _check_clients(As, Bs, weights, max_rank)
    padded = [zero_pad_factors(a, b, max_rank) for a, b in zip(As, Bs, strict=True)]
    return fedit_average([a for a, _ in padded], [b for _, b in padded], p)


def slot_holders(ranks: Sequence[int], max_rank: int) -> Tensor:
    """A ``len(ranks) x max_rank`` 0/1 matrix: entry (k, i) is 1 when client k holds rank slot i (i < r_k)."""
    return (torch.arange(max_rank)[None, :] < torch.tensor(list(ranks))[:, None]).to(torch.float64)


def replication_padding_average(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float] | None = None,
                                max_rank: int | None = None, previous: Factors | None = None) -> Factors:
    """Replication-based padding: rank slot i is the p-weighted average over the clients that hold it.

    A low-rank client's missing slot i is filled with the p-weighted average of slot i over the
    clients that hold it (a replica of what they sent), then every client is averaged with its
    weight p_k. Filling the gap this way and averaging over everyone is the same as averaging
    slot i over its holders only, with weights p_k / sum_{j holds i} p_j: a slot that one
    rank-8 client holds among rank-2 clients keeps its full size instead of shrinking by that
    client's weight, as zero-padding makes it. With equal ranks this is the plain weighted
    average (FedIT's). A slot that no client with a positive weight holds has nothing to
    replicate: it keeps its value in ``previous`` (the server's adapter before the round, A
    ``max_rank x n`` and B ``m x max_rank``), or raises a ValueError when ``previous`` is None.
    Our choice: the papers' exact replication rule is not known to us (only their abstracts);
    this is the rule their description implies, with the weights given here.
    """
    p, max_rank = _check_clients(As, Bs, weights, max_rank)
    ranks = [int(a.shape[0]) for a in As]
    holders = slot_holders(ranks, max_rank)  # K x R
    slot_weight = torch.tensor(p, dtype=torch.float64)[:, None] * holders
    mass = slot_weight.sum(dim=0)  # per slot: the total weight of its holders
    empty = mass == 0
    if bool(empty.any()) and previous is None:
        raise ValueError(f"rank slots {torch.nonzero(empty).flatten().tolist()} are held by no client "
                         "with a positive weight: there is nothing to replicate (pass previous to keep them)")
    share = slot_weight / torch.where(empty, torch.ones_like(mass), mass)  # K x R, columns sum to 1 over holders
    padded = [zero_pad_factors(a, b, max_rank) for a, b in zip(As, Bs, strict=True)]
    A = sum(share[k].to(a.dtype)[:, None] * a for k, (a, _) in enumerate(padded))
    B = sum(share[k].to(b.dtype)[None, :] * b for k, (_, b) in enumerate(padded))
    if bool(empty.any()):
        previous_A, previous_B = previous
        if previous_A.shape != A.shape or previous_B.shape != B.shape:
            raise ValueError(f"previous must be A {tuple(A.shape)} and B {tuple(B.shape)}, got "
                             f"{tuple(previous_A.shape)} and {tuple(previous_B.shape)}")
        A[empty] = previous_A.to(A)[empty]
        B[:, empty] = previous_B.to(B)[:, empty]
    return A, B


def _check_gamma(gamma: object) -> float:
    """HetLoRA's tail fraction gamma: a number strictly between 0 and 1."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
    return float(gamma)


def tail_start(rank: int, gamma: float) -> int:
    """Where HetLoRA's rank tail starts: t = floor(gamma r_k), at most r_k - 1 (the tail is never empty)."""
    rank = check_rank(rank)
    return min(math.floor(_check_gamma(gamma) * rank), rank - 1)


def rank_tail_penalty(A: Tensor, B: Tensor, gamma: float) -> Tensor:
    """HetLoRA's regulariser for one layer: ||B[:, t:]||_F ||A[t:, :]||_F with t = :func:`tail_start`.

    A differentiable scalar (a tensor): added, times lambda and summed over the adapted layers,
    to the client's task loss, it pulls the last rank components toward zero, so that a
    client can prune them (:func:`pruned_rank`). Its gradient reaches only the tail's rows of A
    and columns of B.
    """
    check_factors([A], [B])
    start = tail_start(int(A.shape[0]), gamma)
    return torch.linalg.matrix_norm(B[:, start:]) * torch.linalg.matrix_norm(A[start:, :])


def pruned_rank(rank: int, tail_before: float, tail_after: float, gamma: float, min_rank: int = 1) -> int:
    """HetLoRA's self-pruning: r_k <- max(min_rank, floor(gamma r_k)) if the tail penalty fell in the round.

    ``tail_before`` and ``tail_after`` are :func:`rank_tail_penalty` summed over the layers, at
    the start and the end of the client's local training. A tail that did not shrink keeps the
    rank.
    """
    rank = check_rank(rank)
    min_rank = check_rank(min_rank)
    _check_gamma(gamma)
    if tail_after < tail_before:
        return max(min_rank, min(rank, math.floor(gamma * rank)))
    return rank


# ----------------------------------------------------------------------------------------
# HetLoRA as a strategy of the simulator
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tail_penalty_added(model: torch.nn.Module, rank: int, weight: float, gamma: float) -> Iterator[None]:
    """While active, every forward pass of ``model`` adds weight * sum_layers rank_tail_penalty to its loss."""
    layers = lora_layers(model)

    def add_penalty(module: torch.nn.Module, inputs: object, output: object) -> object:
        if getattr(output, "loss", None) is None:
            return output
        penalty = sum(rank_tail_penalty(layer.lora_A[ADAPTER].weight[:rank], layer.lora_B[ADAPTER].weight[:, :rank],
                                        gamma) for layer in layers.values())
        output.loss = output.loss + weight * penalty
        return output

    handle = model.register_forward_hook(add_penalty)
    try:
        yield
    finally:
        handle.remove()


def _total_tail(adapters: Mapping[str, Factors], gamma: float) -> float:
    with torch.no_grad():
        return float(sum(rank_tail_penalty(a, b, gamma) for a, b in adapters.values()))


class HetLoRA(Strategy):
    """HetLoRA (Cho, Liu, Xu, Fahrezi, Joshi; EMNLP 2024, arXiv 2401.06432): heterogeneous ranks (eq. 12).

    The server keeps one adapter of the largest rank r_max. Client k downloads its first r_k
    components (truncation), trains them with the rank-tail penalty added to its loss,
    ``penalty`` times sum over layers of ||B_k[:, t:]||_F ||A_k[t:, :]||_F, t = floor(gamma
    r_k) (:func:`rank_tail_penalty`), and prunes itself after the round if the penalty fell,
    r_k <- max(``min_rank``, floor(gamma r_k)) (:func:`pruned_rank`), uploading the kept
    components only: the server learns the client's new rank from the shapes it receives. The
    server pads every upload with zeros to r_max and averages with HetLoRA's sparsity weights,
    p_k proportional to ||B_k A_k||_F (``weighting="sparsity"``, per layer) or with the clients'
    data sizes (``weighting="samples"``), and keeps each client's current rank (``State.ranks``).

    ``ranks`` gives every client its starting rank (one per client; default: all at the model's
    rank). Defaults as in FlexLoRA's re-implementation (alibaba/FederatedScope@4643e1a5,
    ``fed_utils/client.py``): gamma 0.99. Our choices, where the re-implementations are silent or
    differ: the penalty weight lambda (default 1e-3; the sources we have give no value),
    sparsity weights taken per layer, a pruned client uploading only its kept
    components, and the penalty added to the training loss by a forward hook, so the reported
    training loss includes it. The hook needs the sequential loop: the batched engine trains
    the stacked factors itself, so ``batched_training`` is False.
    """

    name = "HetLoRA"
    paper = "Cho et al. 2024, EMNLP, arXiv 2401.06432"
    chapter = "book/part3/heterogeneous_ranks"
    batched_training = False

    @dataclass
    class State:
        """Each client's current rank (after self-pruning), and every pruning as (round, client, old, new)."""

        ranks: dict[int, int] = field(default_factory=dict)
        pruned: list[tuple[int, int, int, int]] = field(default_factory=list)

    @dataclass
    class ClientState:
        """The tail penalty of the client's start this round (what self-pruning compares with)."""

        tail_before: float = 0.0

    padding: str = "zeros"
    """How the server fills a low-rank client's missing rank slots: "zeros" (HetLoRA) or "replication"."""

    def __init__(self, ranks: Sequence[int] | None = None, *, penalty: float = 1e-3, gamma: float = 0.99,
                 min_rank: int = 1, weighting: str = "sparsity") -> None:
        super().__init__(None)
        self.ranks = None if ranks is None else check_ranks(ranks, len(ranks))
        if not (isinstance(penalty, (int, float)) and penalty >= 0):
            raise ValueError(f"penalty must be a number >= 0, got {penalty!r}")
        if weighting not in ("sparsity", "samples"):
            raise ValueError(f"weighting must be 'sparsity' (HetLoRA's) or 'samples', got {weighting!r}")
        self.penalty = float(penalty)
        self.gamma = _check_gamma(gamma)
        self.min_rank = check_rank(min_rank)
        self.weighting = weighting

    def max_rank(self, num_clients: int) -> int | None:
        if self.ranks is None:
            return None
        if len(self.ranks) != num_clients:
            raise ValueError(f"ranks has {len(self.ranks)} entries for {num_clients} clients")
        return max(self.ranks)

    def client_rank(self, client_id: int, server: ServerState) -> int:
        current = server.method_state.ranks.get(client_id)
        if current is not None:
            return current
        return self.ranks[client_id] if self.ranks is not None else server.rank

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        client_state.tail_before = _total_tail(start.adapters, self.gamma)
        return start

    def local_training(self, model: torch.nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> contextlib.AbstractContextManager[None]:
        rank = next(iter(start.adapters.values()))[0].shape[0]
        if self.penalty == 0.0:
            return contextlib.nullcontext()
        return _tail_penalty_added(model, rank, self.penalty, self.gamma)

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        rank = next(iter(result.adapters.values()))[0].shape[0]
        after = _total_tail(result.adapters, self.gamma)
        kept = pruned_rank(rank, client_state.tail_before, after, self.gamma, self.min_rank)
        tensors: dict[str, Tensor] = {}
        for name, (a, b) in result.adapters.items():
            tensors[f"{name}.A"], tensors[f"{name}.B"] = truncate_factors(a, b, kept)
        tensors.update({f"head.{key}": value for key, value in result.head.items()})
        return Payload(tensors)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        state = server.method_state
        for upload in uploads:
            name = next(iter(server.adapters))
            new = int(upload.payload.tensors[f"{name}.A"].shape[0])
            old = self.client_rank(upload.client_id, server)
            if new != old:
                state.pruned.append((round_index, upload.client_id, old, new))
            state.ranks[upload.client_id] = new
        samples = normalized_weights(uploads)
        adapters = {}
        for name, (a, b) in server.adapters.items():
            As = [u.payload.tensors[f"{name}.A"].to(a) for u in uploads]
            Bs = [u.payload.tensors[f"{name}.B"].to(b) for u in uploads]
            weights = sparsity_weights(As, Bs) if self.weighting == "sparsity" else samples
            if self.padding == "replication":  # a slot no client of the round holds keeps the server's value
                adapters[name] = replication_padding_average(As, Bs, weights, max_rank=server.rank, previous=(a, b))
            else:
                adapters[name] = zero_padding_average(As, Bs, weights, max_rank=server.rank)
        server.adapters = adapters
        self.aggregate_head(server, uploads)


class ReplicationPadding(HetLoRA):
    """Replication-based padding (Byun and Lee 2024, arXiv 2406.17477; RBLA, Chen et al. 2024a, arXiv 2408.08699).

    HetLoRA with one change at the server, the one the survey names: a low-rank client's missing
    rank slots are filled from the clients that hold them, not with zeros, so each slot is
    averaged over its holders (:func:`replication_padding_average`) and the components only
    high-rank clients learn keep their size. Everything else is :class:`HetLoRA`'s (truncated
    download, tail penalty, self-pruning). Not implemented: Byun and Lee's rule that gives high
    ranks to clients with high-quality data; a chapter sets the ranks itself (``ranks``).
    """

    name = "replication padding"
    paper = "Byun and Lee 2024, arXiv 2406.17477; Chen et al. 2024a, arXiv 2408.08699"
    padding = "replication"
