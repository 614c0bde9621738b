"""Client-side LoRA initialisation (survey section 3.2, "Client-Side Initialization", eq. 11).

What does client k start a round from? The survey's answers, in the survey's notation
(A is r x n, B is m x r, p_k client weights summing to one, s = alpha / r LoRA's constant):

- **Avg-Initial** (LoRA-FAIR's name for the conventional choice): every client starts from the
  averaged factors A_t = sum_k p_k A_k^{t-1}, B_t = sum_k p_k B_k^{t-1}. That is FedIT;
  :class:`AvgInitial` is FedIT under this name.
- **Re-Initial**: every round every client starts from a fresh adapter drawn by eq. 9
  (Gaussian A, zero B, :func:`gaussian_reinit`) and the server folds the aggregated
  product into the frozen weight, W'_t = W'_{t-1} + s B_t A_t (``server.base_deltas``).
- **Local-Initial**: all clients start from the adapter of one client c of the previous
  round, chosen at random (:func:`choose_local_initial_client`, seeded).
- **FedLoRU** (Park and Klabjan 2024): Re-Initial every tau rounds instead of every round,
  so the global model is eq. 11, W_T = W' + s sum_{t <= T, t mod tau = 0} B_t A_t
  (:func:`fedloru_global_weight`); between accumulations it averages as FedIT does.
  :class:`PFedLoRU` adds a personal low-rank module that never leaves the client;
  :class:`MFedLoRU` lets client k of capacity r_k <= r change each global factor only by a
  rank-r_k product, A_k = A + A_left A_right, B_k = B + B_left B_right (hierarchical low-rank
  updates, :func:`nested_update`, :func:`mfedloru_aggregate`).
- **FRLoRA** (Yan et al., ICLR 2025): every round each client restarts from the principal
  singular components of the *pre-trained* weight (:func:`principal_factors`) and the
  server adds the residual s (avg(B) avg(A) - B_0 A_0) to the global weight
  (:func:`frlora_residual`).

Diagnostics for the chapter: :func:`initialization_drift` (how far a client's start is from
the global model, in effective-weight units) and :func:`update_dispersion` (how much the
clients' updates of one round disagree).

Taught in ``book/part2/client_initialization.ipynb``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors, base_weight
from fedlora_edu.core.checks import check_factors, check_rank, check_ranks, check_weights
from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.merges import MergingClientState, MergingState, missed_merges
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    collect_factors,
    normalized_weights,
    split_factors,
)
from fedlora_edu.distributed.discordance import FedIT

SEED_BYTES = 8
"""A seed crosses the network as one 64-bit integer (a re-initialised adapter is regenerated from it)."""


# ----------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------
def check_tau(tau: object) -> int:
    """Validate FedLoRU's accumulation period tau: an integer >= 1 (tau = 1 is Re-Initial)."""
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (rounds between accumulations), got {tau!r}")
    return tau


def accumulation_round(round_index: int, tau: int) -> bool:
    """True when round ``round_index`` (counted from 0) ends a FedLoRU cycle: t mod tau = 0, t = round_index + 1.

    The survey's eq. 11 counts rounds from 1, so with tau = 2 the accumulations happen after
    rounds 2, 4, 6, ... (``round_index`` 1, 3, 5, ...).
    """
    check_tau(tau)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be an integer >= 0, got {round_index!r}")
    return (round_index + 1) % tau == 0


def reinit_seed(seed: int, round_index: int) -> int:
    """The seed from which the fresh adapter of round ``round_index`` is drawn (a pure function of both)."""
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    return derive_seed(seed, "re-initialised adapter", round_index)


def gaussian_reinit(shapes: Mapping[str, Factors], seed: int, round_index: int) -> dict[str, Factors]:
    """Survey eq. 9 for every layer: A ~ N(0, sigma^2) entrywise, B = 0, drawn from :func:`reinit_seed`.

    Only the shapes, dtypes and devices of ``shapes``' (A, B) are used. The survey leaves
    sigma open; we take sigma = 1 / sqrt(3 n), the standard deviation of peft's default A
    (Kaiming-uniform on [-1/sqrt(n), 1/sqrt(n)]), so a re-initialised adapter has the scale
    of the first round's. With B = 0 a fresh adapter adds nothing to the model until it trains.
    """
    generator = torch.Generator().manual_seed(reinit_seed(seed, round_index))
    fresh: dict[str, Factors] = {}
    for name, (a, b) in shapes.items():
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"shapes[{name!r}]: A {tuple(a.shape)} and B {tuple(b.shape)} must be r x n and m x r")
        sigma = 1.0 / math.sqrt(3.0 * a.shape[1])
        drawn = torch.randn(tuple(a.shape), generator=generator, dtype=torch.float64) * sigma
        fresh[name] = (drawn.to(device=a.device, dtype=a.dtype), torch.zeros_like(b))
    return fresh


def fedloru_global_weight(pretrained: Tensor, accumulated: Sequence[Factors], scaling: float) -> Tensor:
    """Survey eq. 11: W_T = W' + s sum over accumulation rounds t <= T of B_t A_t.

    ``accumulated`` holds the global (A_t, B_t) of every round with t mod tau = 0 up to T. (The
    model evaluated at a T that is not a multiple of tau also applies its live adapter.)
    """
    if pretrained.ndim != 2:
        raise ValueError(f"pretrained must be a matrix, got shape {tuple(pretrained.shape)}")
    total = pretrained.clone()
    for t, (a, b) in enumerate(accumulated):
        check_factors([a], [b])
        if (b.shape[0], a.shape[1]) != tuple(pretrained.shape):
            raise ValueError(f"accumulated[{t}]: B A is {b.shape[0]} x {a.shape[1]}, W' is {tuple(pretrained.shape)}")
        total = total + scaling * (b @ a)
    return total


def nested_update(factor: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """mFedLoRU's hierarchical low-rank update of one low-rank factor: factor + left @ right.

    For A (r x n) the nested pair is left r x r_k, right r_k x n; for B (m x r) it is left
    m x r_k, right r_k x r. The change of the factor has rank at most r_k, the client's capacity
    (Park and Klabjan 2024, arXiv 2409.12371, mFedLoRU; the constant in front of the product is
    1, see :class:`MFedLoRU`). Taught in ``book/part2/client_initialization.ipynb``.
    """
    _check_nested(factor, left, right)
    return factor + left @ right


def _check_nested(factor: Tensor, left: Tensor, right: Tensor) -> None:
    """Validate a nested pair for a factor: left rows x r_k, right r_k x columns."""
    if factor.ndim != 2 or left.ndim != 2 or right.ndim != 2:
        raise ValueError(f"factor, left and right must be matrices, got shapes {tuple(factor.shape)}, "
                         f"{tuple(left.shape)}, {tuple(right.shape)}")
    if left.shape[0] != factor.shape[0]:
        raise ValueError(f"left is {tuple(left.shape)}: it must have the factor's {factor.shape[0]} rows")
    if right.shape[1] != factor.shape[1]:
        raise ValueError(f"right is {tuple(right.shape)}: it must have the factor's {factor.shape[1]} columns")
    if left.shape[1] != right.shape[0]:
        raise ValueError(f"left is {tuple(left.shape)} and right {tuple(right.shape)}: "
                         "left must be rows x r_k and right r_k x columns with the same r_k")


class NestedUpdate(torch.nn.Module):
    """One factor's value while an mFedLoRU client trains: ``nested_update(factor, left, right)``.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` on a peft LoRA
    factor (A, r x n, or B, m x r), it makes the factor's stored value the frozen start and
    ``left`` (rows x r_k) and ``right`` (r_k x columns) the parameters that train. As LoRA
    starts its own product at zero, ``left`` starts at zero and ``right`` is drawn uniformly
    in +-1/sqrt(columns) (peft's default for LoRA's A), so the client starts exactly at the
    factor it downloaded. Taught in ``book/part2/client_initialization.ipynb``.
    """

    def __init__(self, factor: Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        check_rank(rank)
        rows, columns = factor.shape
        bound = 1.0 / math.sqrt(columns)
        right = (torch.rand(rank, columns, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.left = torch.nn.Parameter(torch.zeros(rows, rank, dtype=factor.dtype, device=factor.device))
        self.right = torch.nn.Parameter(right.to(dtype=factor.dtype, device=factor.device))

    def forward(self, factor: Tensor) -> Tensor:
        return nested_update(factor, self.left, self.right)


def mfedloru_aggregate(A: Tensor, B: Tensor, A_updates: Sequence[tuple[Tensor, Tensor]],
                       B_updates: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """mFedLoRU's server step (Park and Klabjan 2024, arXiv 2409.12371): average the clients' factors.

    Client k returns A_k = A + A_left_k A_right_k and B_k = B + B_left_k B_right_k
    (:func:`nested_update`, ``A_updates[k]`` = (A_left_k, A_right_k), likewise for B), each of
    its own rank r_k. The server averages the factors as FedLoRU does,

        A_t = sum_k p_k A_k = A + sum_k p_k A_left_k A_right_k,
        B_t = sum_k p_k B_k = B + sum_k p_k B_left_k B_right_k,

    which is defined for any mix of r_k: every A_k is r x n and every B_k m x r. (The product
    B_t A_t is FedIT's average of factors, not sum_k p_k B_k A_k; the accumulation every tau
    rounds is eq. 11's, :func:`fedloru_global_weight`.) Taught in
    ``book/part2/client_initialization.ipynb``.
    """
    check_factors([A], [B])
    if len(A_updates) != len(B_updates) or not A_updates:
        raise ValueError(f"A_updates has {len(A_updates)} entries and B_updates {len(B_updates)}: "
                         "need one (left, right) pair per client for each, at least one client")
    p = check_weights(weights, len(A_updates))
    new_a, new_b = A.clone(), B.clone()
    for k, (w, (a_left, a_right), (b_left, b_right)) in enumerate(zip(p, A_updates, B_updates, strict=True)):
        if a_left.shape[1:] != b_left.shape[1:]:
            raise ValueError(f"client {k}: A's nested rank {a_left.shape[1]} differs from B's {b_left.shape[1]}")
        _check_nested(A, a_left, a_right)
        _check_nested(B, b_left, b_right)
        new_a = new_a + w * (a_left @ a_right)
        new_b = new_b + w * (b_left @ b_right)
    return new_a, new_b


def default_nested_ranks(rank: int, num_clients: int) -> list[int]:
    """Three device tiers for :class:`MFedLoRU` when no ``ranks`` are given: r, r/2, r/4 (at least 1), cycling.

    Client k gets max(1, rank // 2 ** (k mod 3)), so with r = 8 the clients' nested ranks are
    8, 4, 2, 8, 4, 2, ... The paper does not prescribe tiers; this is the book's default.
    """
    check_rank(rank)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    return [max(1, rank // 2 ** (k % 3)) for k in range(num_clients)]


def choose_local_initial_client(client_ids: Sequence[int], seed: int, round_index: int) -> int:
    """Local-Initial's client c: one of this round's uploaders, uniformly at random, from (seed, round)."""
    ids = list(client_ids)
    if not ids:
        raise ValueError("client_ids is empty: Local-Initial needs at least one client to copy")
    rng = np.random.default_rng(derive_seed(seed, "Local-Initial client", round_index))
    return int(ids[int(rng.integers(len(ids)))])


def principal_factors(weight: Tensor, rank: int, scaling: float) -> Factors:
    """FRLoRA's (and PiSSA's) initial adapter: the top-``rank`` singular part of a weight matrix.

    With W = U S V^T (singular values in decreasing order) it returns
    A_0 = sqrt(S_r / s) V_r^T (r x n) and B_0 = U_r sqrt(S_r / s) (m x r), so that
    s B_0 A_0 = U_r S_r V_r^T, the best rank-r approximation of W (Eckart-Young). The SVD is
    taken in float64 and the result cast back to W's dtype and device. Signs: each singular
    pair is flipped so that the largest-magnitude entry of u_i is positive, which makes the
    result a function of W alone.
    """
    check_rank(rank)
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    if rank > min(weight.shape):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(weight.shape)} of the weight")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling!r}")
    u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    u_r, s_r, vh_r = u[:, :rank], s[:rank], vh[:rank]
    pivot = u_r.abs().argmax(dim=0)
    signs = torch.sign(u_r.gather(0, pivot[None, :]))[0]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    u_r, vh_r = u_r * signs[None, :], vh_r * signs[:, None]
    root = (s_r / scaling).sqrt()
    a = (root[:, None] * vh_r).to(device=weight.device, dtype=weight.dtype)
    b = (u_r * root[None, :]).to(device=weight.device, dtype=weight.dtype)
    return a, b


def frlora_residual(A_avg: Tensor, B_avg: Tensor, A_init: Tensor, B_init: Tensor, scaling: float) -> Tensor:
    """FRLoRA's global step: the residual s (avg(B) avg(A) - B_0 A_0) added to the global weight.

    The clients started from (A_0, B_0), so this is how far the averaged adapter moved the
    layer in the round; adding it to W' and restarting from (A_0, B_0) keeps the global model
    W' + s B_0 A_0 + residual, the averaged model, while the next round's clients start again
    from the same principal components.
    """
    check_factors([A_avg, A_init], [B_avg, B_init])
    return scaling * (B_avg @ A_avg - B_init @ A_init)


def _product_gap(x: Mapping[str, Factors], y: Mapping[str, Factors], scaling: float) -> Tensor:
    """Per layer s (B_x A_x - B_y A_y), stacked as one vector (effective-weight units)."""
    if set(x) != set(y):
        raise ValueError(f"adapters have different layers: {sorted(set(x) ^ set(y))[:3]}")
    parts = []
    for name in x:
        (a1, b1), (a2, b2) = x[name], y[name]
        check_factors([a1, a2], [b1, b2])
        parts.append((scaling * (b1 @ a1 - b2 @ a2)).reshape(-1).to(torch.float64))
    return torch.cat(parts)


def initialization_drift(starts: Sequence[Mapping[str, Factors]], reference: Mapping[str, Factors],
                         scaling: float) -> float:
    """Mean over clients of ||s (B_k A_k - B_g A_g)||_F over all layers: start k vs the global adapter g.

    Clients and server share the frozen weight W', so this is the distance between the
    weight client k starts training from and the global model's weight. Zero for Avg-Initial,
    Re-Initial, FedLoRU and FRLoRA (their starts are the global model); positive for
    Local-Initial, whose clients start from one client's adapter instead of the average.
    """
    if not starts:
        raise ValueError("starts is empty: need at least one client's start")
    return float(np.mean([float(torch.linalg.vector_norm(_product_gap(s, reference, scaling))) for s in starts]))


def update_dispersion(starts: Sequence[Mapping[str, Factors]], trained: Sequence[Mapping[str, Factors]],
                      weights: Sequence[float], scaling: float) -> float:
    """How much the clients' updates of one round disagree, relative to their average.

    With dW_k = s (B'_k A'_k - B_k A_k) (trained minus start, all layers stacked) and
    dW = sum_k p_k dW_k, returns sqrt(sum_k p_k ||dW_k - dW||^2) / ||dW||. 0 when all clients
    moved the same way; 1 when the spread is as large as the average move.
    """
    if len(starts) != len(trained) or not starts:
        raise ValueError(f"starts has {len(starts)} entries and trained {len(trained)}: need one per client, >= 1")
    p = check_weights(weights, len(starts))
    updates = [_product_gap(t, s, scaling) for s, t in zip(starts, trained, strict=True)]
    mean = sum(w * d for w, d in zip(p, updates, strict=True))
    spread = math.sqrt(sum(w * float(torch.linalg.vector_norm(d - mean)) ** 2 for w, d in zip(p, updates, strict=True)))
    size = float(torch.linalg.vector_norm(mean))
    return spread / size if size > 0 else math.nan


# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------
def _layers(server: ServerState, uploads: list[Upload]) -> tuple[list[float], dict[str, tuple[list, list]]]:
    """Per layer, the uploaded A's and B's (both required), and the weights p_k."""
    return collect_factors(server, uploads, require_both=True)


class AvgInitial(FedIT):
    """Avg-Initial (LoRA-FAIR, Bian, Wang, Zhang, Xu 2024, arXiv 2411.14961).

    Survey section 3.2: every client starts round t from the averaged factors
    A_t = sum_k p_k A_k^{t-1} and B_t = sum_k p_k B_k^{t-1}, "the conventional FL approach".
    That is exactly FedIT (:class:`fedlora_edu.distributed.discordance.FedIT`), reused unchanged under
    LoRA-FAIR's name. Taught in ``book/part2/client_initialization.ipynb``.
    """

    name = "Avg-Initial"
    paper = "Bian, Wang, Zhang, Xu 2024 (LoRA-FAIR), arXiv 2411.14961"
    chapter = "book/part2/client_initialization"


class FedLoRU(Strategy):
    """FedLoRU (Park and Klabjan 2024, arXiv 2409.12371): Re-Initial every ``tau`` rounds, survey eq. 11.

    Each round the clients train the global adapter and the server averages A and B as
    FedIT does. After every round t with t mod tau = 0 (1-based) the server accumulates the
    averaged product into the frozen weight, W' <- W' + s B_t A_t (``server.base_deltas``),
    and restarts the adapter from eq. 9 (:func:`gaussian_reinit`). So the global model is
    W_T = W' + s sum_{t <= T, t mod tau = 0} B_t A_t (:func:`fedloru_global_weight`), plus the
    live adapter between accumulations: each cycle's update is low-rank but their sum is
    not, which is the paper's "higher-rank model from low-rank updates".

    Choices where the paper leaves room: the fresh A is Gaussian (survey eq. 9; the paper's
    code redraws peft's Kaiming-uniform) with the standard deviation of peft's A; round 1
    starts from the shared server initialisation every method of the book starts from; the
    aggregation weights are p_k = n_k / sum n_j (the paper's code also weights by data size).
    Bytes down: the head; the adapter, or only a seed when it was just re-initialised; and
    every accumulation the client has not applied yet (:func:`~fedlora_edu.core.merges.missed_merges`).
    (The brief of this chapter cited arXiv 2410.23295; the paper is 2409.12371.)

    Deviation from the reference code: the authors' code (haemPark/fedloru_official, commit
    219688b6b1cbc1cf4c07de539a9e50d41192bb68; ``src/algorithm/fedloru/lorumodel.py``,
    ``src/algorithm/fedloru/main.py`` and the top-level ``main.py``) trains CNNs (LeNet, ResNet;
    CIFAR in its README) from scratch, ReLoRA-style: each adapted convolution's base weight W'
    starts at zero, both factors start Kaiming-uniform, and the server averages the whole state
    dict with data-size weights. Its ``--accumulate_and_reinit`` rounds fold s B A into W' and
    restart A Kaiming-uniform, B = 0; its ``--accumulate`` rounds, the ones the README's example
    uses, fold s B A into W' without a restart, so right after such a merge the model applies
    that product twice. Ours fine-tunes a pre-trained model (W' is the pre-trained weight, as in
    eq. 11) from the initial adapter every method of the book shares, and after every tau-th
    round folds s B_t A_t into W' and restarts (eq. 9), as eq. 11 is written; the backbone, the
    data and the learning rate are those of every other method, so that the comparison is fair.
    The effect of the difference on accuracy is not yet measured; a study will measure it.
    Taught in ``book/part2/client_initialization.ipynb``.
    """

    name = "FedLoRU"
    paper = "Park and Klabjan 2024, arXiv 2409.12371"
    chapter = "book/part2/client_initialization"

    @dataclass
    class State(MergingState):
        """FedLoRU's merges, and whether the adapter was just re-initialised (clients then get only a seed)."""

        fresh: bool = False

    ClientState = MergingClientState

    def __init__(self, rank: int | None = None, tau: int = 2) -> None:
        super().__init__(rank)
        self.tau = check_tau(tau)

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        tensors = {k: v for k, v in start.download.tensors.items() if k.startswith("head.")}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if server.method_state.fresh:
            nbytes += SEED_BYTES  # the fresh adapter is regenerated from the round's seed
        else:
            adapter = {k: v for k, v in start.download.tensors.items() if not k.startswith("head.")}
            tensors.update(adapter)
            nbytes += sum(t.numel() * t.element_size() for t in adapter.values())
        merged, merged_bytes = missed_merges(server.method_state, client_state)
        tensors.update(merged)
        start.download = Payload(tensors, nbytes=nbytes + merged_bytes)
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = _layers(server, uploads)
        averaged = {n: fedit_average(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)
        self.accumulate(server, averaged, round_index)

    def accumulate(self, server: ServerState, averaged: dict[str, Factors], round_index: int) -> None:
        """End of round t: keep the averaged adapter, or (t mod tau = 0) fold s B_t A_t into W' and restart (eq. 9)."""
        if accumulation_round(round_index, self.tau):
            server.base_deltas = {n: server.scaling * (b @ a) for n, (a, b) in averaged.items()}
            server.method_state.merges.append(averaged)
            server.method_state.merge_rounds.append(round_index + 1)
            server.adapters = gaussian_reinit(averaged, server.seed, round_index + 1)
            server.method_state.fresh = True
        else:
            server.adapters = averaged
            server.method_state.fresh = False


class ReInitial(FedLoRU):
    """Re-Initial (LoRA-FAIR, Bian et al. 2024, arXiv 2411.14961): re-initialise every round.

    Survey section 3.2: each round every client starts from eq. 9 (Gaussian A, zero B) and
    the server folds the aggregated product into the frozen weight, W'_t = W'_{t-1} + s B_t A_t
    with A_t, B_t the averaged factors. It is FedLoRU with tau = 1 and runs the same code.
    Taught in ``book/part2/client_initialization.ipynb``.
    """

    name = "Re-Initial"
    paper = "Bian, Wang, Zhang, Xu 2024 (LoRA-FAIR), arXiv 2411.14961"
    chapter = "book/part2/client_initialization"

    def __init__(self, rank: int | None = None) -> None:
        super().__init__(rank, tau=1)


class LocalInitial(FedIT):
    """Local-Initial (LoRA-FAIR, Bian et al. 2024, arXiv 2411.14961): everyone starts from one client's adapter.

    Survey section 3.2: after round t-1 the server picks one client c of that round at
    random (:func:`choose_local_initial_client`, seeded by the run's seed and the round) and
    every client starts round t from A_c^{t-1}, B_c^{t-1}.

    Choices where the survey leaves room: the *global model* (what is evaluated, and what
    the drift is measured against) is FedIT's average, as LoRA-FAIR compares initialisations
    of one aggregation; only the clients' starting point differs. The head, which the
    survey's formula does not name, is the averaged one. Round 1 starts from the server's
    initial adapter. Bytes down: client c's A and B and the head.
    Taught in ``book/part2/client_initialization.ipynb``.
    """

    name = "Local-Initial"
    paper = "Bian, Wang, Zhang, Xu 2024 (LoRA-FAIR), arXiv 2411.14961"
    chapter = "book/part2/client_initialization"

    @dataclass
    class State:
        """The adapter every client starts the next round from, and the client chosen in each round."""

        chosen: dict[str, Factors] | None = None
        chosen_clients: list[int] = field(default_factory=list)

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        chosen = server.method_state.chosen
        if chosen is None:
            return super().client_start(server, client_id, client_state, round_index)
        adapters = {name: (a.clone(), b.clone()) for name, (a, b) in chosen.items()}
        tensors = {f"{name}.{side}": t for name, (a, b) in adapters.items() for side, t in (("A", a), ("B", b))}
        tensors.update({f"head.{k}": v for k, v in server.head.items()})
        return ClientStart(adapters, {k: v.clone() for k, v in server.head.items()}, Payload(tensors),
                           self.trainable(round_index))

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        super().aggregate(server, uploads, round_index)
        c = choose_local_initial_client([u.client_id for u in uploads], server.seed, round_index)
        upload = next(u for u in uploads if u.client_id == c)
        a, b = split_factors(upload.payload, list(server.adapters))
        server.method_state.chosen = {n: (a[n].clone(), b[n].clone()) for n in server.adapters}
        server.method_state.chosen_clients.append(c)


class PFedLoRU(FedLoRU):
    """pFedLoRU (Park and Klabjan 2024, arXiv 2409.12371): FedLoRU plus a personal low-rank module.

    Every client's model is W' + s (B_G A_G + B_L A_L): the global module (A_G, B_G), rank
    r_G, is FedLoRU's (averaged every round, accumulated into W' every tau rounds), and the
    personal module (A_L, B_L), rank r_L, lives in the client's ``client_state`` and never
    leaves it: the upload holds the global module and the head only. A client's personal
    model (:meth:`personal_model`) is the current global module plus its own personal one.

    In the simulator the two modules share one LoRA layer of rank r_G + r_L: components
    0..r_G-1 are the global module and r_G.. the personal one, so B A = B_G A_G + B_L A_L with
    one constant s = alpha / (r_G + r_L). ``rank`` is r_G and ``personal_rank`` r_L (default
    r_G); with ``rank=None`` the model's rank is split, r_L = ``personal_rank`` or half.

    What we could check against the paper, and what not. Its abstract (arXiv 2409.12371, v1
    and v2) says FedLoRU's variants "adapt to environments with statistical and model
    heterogeneity by employing multiple or hierarchical low-rank updates"; pFedLoRU is the
    "multiple" one, and a public review of the paper's ICLR 2025 submission describes it as
    "another low-rank module pair" with personal matrices named L and U. The copies of the paper we
    could search end before its pFedLoRU section, and the authors' public code
    (github.com/haemPark/fedloru_official) implements FedAvg, FedHM and FedLoRU only. So how
    the paper trains the two modules within a round (together, or one after the other, in
    which order and for how many steps each) and whether it ever folds a client's personal
    product into that client's own weight are NOT verified here. (An earlier version of this
    docstring said the paper trains them one after the other; we could not find that in a
    text we can quote, and no longer claim it.)

    What this class does (each a choice): both modules train together, in every local step,
    for the profile's number of local steps, with one AdamW. Training them one after the other
    would need two local phases per round, or a ``trainable`` that freezes some components of
    A and B; the simulator has neither (one ``local_train`` per client and round, and
    ``trainable`` freezes all of A or all of B), so it is not done here. Upload: the global
    module (A_G, B_G) and the head; (A_L, B_L) never leave the client. Every client's personal
    module starts as peft initialises components r_G.. (random A, zero B) and is kept as an
    adapter, never folded into a per-client W' (that would cost m x n per layer and client);
    the head is global (averaged); the personal module is not re-initialised when the global
    one is accumulated. Taught in ``book/part2/client_initialization.ipynb``.
    """

    name = "pFedLoRU"
    paper = "Park and Klabjan 2024, arXiv 2409.12371"
    chapter = "book/part2/client_initialization"

    @dataclass
    class State(FedLoRU.State):
        """FedLoRU's state and the personal module every client starts from (components r_G.. of the start)."""

        personal_init: dict[str, Factors] = field(default_factory=dict)

    @dataclass
    class ClientState(MergingClientState):
        """The client's personal module (A_L, B_L) per layer; None until its first round."""

        personal: dict[str, Factors] | None = None

    def __init__(self, rank: int | None = None, personal_rank: int | None = None, tau: int = 2) -> None:
        super().__init__(rank, tau=tau)
        if personal_rank is not None:
            check_rank(personal_rank)
        self.personal_rank = personal_rank
        self.global_rank: int | None = rank

    def max_rank(self, num_clients: int) -> int | None:
        if self.rank is None:
            return None
        return self.rank + (self.personal_rank if self.personal_rank is not None else self.rank)

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return server.rank

    def init_server(self, server: ServerState, seed: int) -> None:
        super().init_server(server, seed)
        total = server.rank
        if self.rank is not None:
            personal = total - self.rank
        else:
            personal = self.personal_rank if self.personal_rank is not None else total // 2
        if personal < 1 or total - personal < 1:
            raise ValueError(f"pFedLoRU needs a global rank >= 1 and a personal_rank >= 1; the model's rank {total} "
                             f"cannot be split into {total - personal} + {personal}")
        self.global_rank = total - personal
        g = self.global_rank
        server.method_state.personal_init = {n: (a[g:].clone(), b[:, g:].clone())
                                             for n, (a, b) in server.adapters.items()}
        server.adapters = {n: (a[:g].clone(), b[:, :g].clone()) for n, (a, b) in server.adapters.items()}

    def _personal(self, server: ServerState, client_state: Any) -> dict[str, Factors]:
        return server.method_state.personal_init if client_state.personal is None else client_state.personal

    def _joined(self, server: ServerState, client_state: Any) -> dict[str, Factors]:
        personal = self._personal(server, client_state)
        return {n: (torch.cat([a, personal[n][0].to(a)]), torch.cat([b, personal[n][1].to(b)], dim=1))
                for n, (a, b) in server.adapters.items()}

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        start.adapters = {n: (a.clone(), b.clone()) for n, (a, b) in self._joined(server, client_state).items()}
        return start

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        g = self.global_rank
        assert g is not None
        client_state.personal = {n: (a[g:].clone(), b[:, g:].clone()) for n, (a, b) in result.adapters.items()}
        tensors: dict[str, Tensor] = {}
        for name, (a, b) in result.adapters.items():
            tensors[f"{name}.A"] = a[:g].clone()
            tensors[f"{name}.B"] = b[:, :g].clone()
        tensors.update({f"head.{k}": v for k, v in result.head.items()})
        return Payload(tensors)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        return self._joined(server, client_state), {k: v.clone() for k, v in server.head.items()}


class MFedLoRU(FedLoRU):
    """mFedLoRU (Park and Klabjan 2024, arXiv 2409.12371): FedLoRU for clients of different capacity.

    Hierarchical low-rank updates. The global model is FedLoRU's, W' + s B A with A r x n and
    B m x r, accumulated into W' every ``tau`` rounds (survey eq. 11, :func:`fedloru_global_weight`).
    Client k, of capacity r_k <= r (``ranks[k]``), does not move A and B freely: it returns

        A_k = A + A_left_k A_right_k    (A_left_k r x r_k, A_right_k r_k x n),
        B_k = B + B_left_k B_right_k    (B_left_k m x r_k, B_right_k r_k x r),

    a low-rank update of each low-rank factor (:func:`nested_update`), the second level of the
    hierarchy whose first level is W' + s B A. The server averages the factors as FedLoRU does,
    A_t = A + sum_k p_k A_left_k A_right_k and B_t likewise (:func:`mfedloru_aggregate`), which
    is defined for any mix of ranks, and every tau rounds (1-based t mod tau = 0) folds
    s B_t A_t into W' and restarts from eq. 9. So the global weight after T rounds is eq. 11,
    W_T = W' + s sum_{t <= T, t mod tau = 0} B_t A_t, with every B_t A_t built from nested
    updates (plus the live adapter between accumulations).

    Sources, and what is reconstructed. The paper's abstract (v1 and v2) says FedLoRU's
    variants adapt to "statistical and model heterogeneity by employing multiple or
    hierarchical low-rank updates"; mFedLoRU is the hierarchical, model-heterogeneous one (a
    figure of the paper, as reproduced in public slides presenting it, is captioned "Low-rank
    factorization methods in pFedLoRU and mFedLoRU"). The copies of the paper we could search
    end before its mFedLoRU section and
    the authors' public code (github.com/haemPark/fedloru_official) has no mFedLoRU, so the
    update above (which factors are factorised again, on which side, additively) is our reading
    of "hierarchical low-rank updates", not a transcription of the paper's equations; check it
    against the paper's mFedLoRU section before relying on the details below.

    How the client trains (:meth:`local_training`). While client k trains, every LoRA factor of
    the model is parametrised as A + A_left A_right (:class:`NestedUpdate`, via
    ``torch.nn.utils.parametrize``): the downloaded A and B are frozen and only the nested
    factors (and the head) have gradients and AdamW state, so the client's optimiser state is
    of rank r_k, and its change of A and of B has rank at most r_k at every step. A_left and
    B_left start at zero, A_right and B_right uniform in +-1/sqrt(columns), seeded by the run's
    seed, the round and the client. The upload is the trained nested factors themselves. The
    batched engine trains the factors directly, so the simulator runs mFedLoRU's clients in the
    sequential loop (``history["engine"]`` says so).

    Choices where the paper (as far as we could read it) leaves room: both A and B get a nested
    update, with constant 1 in front of each nested product; the nested factors start afresh
    every round and are folded into (A, B) once per round, on the server; the upload is the
    four nested factors per layer and the
    head (the server holds A and B and rebuilds A_k, B_k exactly), counted per layer at their
    size r_k (r + n) + r_k (m + r) or at the size r (m + n) of A_k, B_k where that is smaller;
    ``ranks`` gives one r_k per client (1 <= r_k <= r), by default three tiers r, r/2, r/4
    (:func:`default_nested_ranks`); the head is averaged; p_k = n_k / sum_j n_j; everything
    else (seeded re-initialisation, downloads) is :class:`FedLoRU`'s. Every client holds
    the full rank-r adapter, so the simulator's ``client_rank`` is r for all: r_k is the rank
    of the change, not of the adapter (FlexLoRA's and HetLoRA's heterogeneity truncates the
    adapter itself). Taught in ``book/part2/client_initialization.ipynb``.
    """

    name = "mFedLoRU"
    paper = "Park and Klabjan 2024, arXiv 2409.12371"
    chapter = "book/part2/client_initialization"

    @dataclass
    class ClientState(MergingClientState):
        """This round's nested rank r_k and seed, and the trained nested factors until they are uploaded."""

        nested_rank: int = 0
        nested_seed: int = 0
        nested: dict[tuple[str, str], Tensor] | None = None

    def __init__(self, rank: int | None = None, ranks: Sequence[int] | None = None, tau: int = 2) -> None:
        super().__init__(rank, tau=tau)
        if ranks is not None and (isinstance(ranks, str) or any(isinstance(r, bool) for r in ranks)):
            raise ValueError(f"ranks must be a sequence of integers >= 1, one per client, got {ranks!r}")
        self.ranks = None if ranks is None else check_ranks(list(ranks), len(ranks))

    def max_rank(self, num_clients: int) -> int | None:
        if self.ranks is not None and len(self.ranks) != num_clients:
            raise ValueError(f"ranks has {len(self.ranks)} entries for {num_clients} clients")
        return self.rank

    def init_server(self, server: ServerState, seed: int) -> None:
        super().init_server(server, seed)
        if self.ranks is not None and max(self.ranks) > server.rank:
            raise ValueError(f"ranks: every nested rank r_k must be at most the global rank r = {server.rank}, "
                             f"got {self.ranks}")

    def nested_rank(self, client_id: int, server: ServerState) -> int:
        """r_k, the rank of client k's change of A and of B (``ranks[k]``, or the default tiers)."""
        if self.ranks is not None:
            return self.ranks[client_id]
        return default_nested_ranks(server.rank, client_id + 1)[client_id]

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        client_state.nested_rank = self.nested_rank(client_id, server)
        client_state.nested_seed = derive_seed(server.seed, "mFedLoRU nested factors", round_index, client_id)
        return start

    @contextlib.contextmanager
    def local_training(self, model: torch.nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Train the nested factors of every LoRA factor (:class:`NestedUpdate`), the factors frozen.

        On a normal exit the trained nested factors are kept in ``client_state.nested``
        for :meth:`client_upload`; on any exit the parametrisations are removed and the factors
        hold their stored (start) values again.
        """
        rank = client_state.nested_rank
        generator = torch.Generator().manual_seed(client_state.nested_seed)
        modules = {(name, side): getattr(layer, f"lora_{side}")[adapter_io.ADAPTER]
                   for name, layer in adapter_io.lora_layers(model).items() for side in "AB"}
        nests: dict[tuple[str, str], NestedUpdate] = {}
        try:
            for key, module in modules.items():
                nests[key] = NestedUpdate(module.weight.detach(), rank, generator)
                parametrize.register_parametrization(module, "weight", nests[key])
                module.parametrizations.weight.original.requires_grad_(False)
            yield
            client_state.nested = {
                (name, f"{side}_{part}"): getattr(nest, part).detach().clone()
                for (name, side), nest in nests.items() for part in ("left", "right")}
        finally:
            for key in nests:
                parametrize.remove_parametrizations(modules[key], "weight", leave_parametrized=False)

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        trained, client_state.nested = client_state.nested, None
        if trained is None:
            raise ValueError("mFedLoRU's client trained outside local_training: no nested factors to send")
        tensors: dict[str, Tensor] = {}
        nbytes = 0
        for name, (a, b) in result.adapters.items():
            nested = {key: trained[(name, key)] for key in ("A_left", "A_right", "B_left", "B_right")}
            tensors.update({f"{name}.{key}": t for key, t in nested.items()})
            nested_bytes = sum(t.numel() * t.element_size() for t in nested.values())
            nbytes += min(nested_bytes, a.numel() * a.element_size() + b.numel() * b.element_size())
        head = {f"head.{k}": v for k, v in result.head.items()}
        tensors.update(head)
        return Payload(tensors, nbytes=nbytes + sum(t.numel() * t.element_size() for t in head.values()))

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights = normalized_weights(uploads)
        averaged: dict[str, Factors] = {}
        for name, (a, b) in server.adapters.items():
            pairs: dict[str, list[tuple[Tensor, Tensor]]] = {"A": [], "B": []}
            for upload in uploads:
                keys = [f"{name}.{side}_{part}" for side in "AB" for part in ("left", "right")]
                missing = [key for key in keys if key not in upload.payload.tensors]
                if missing:
                    raise ValueError(f"client {upload.client_id}'s upload carries no {missing[0]}")
                for side in "AB":
                    pairs[side].append((upload.payload.tensors[f"{name}.{side}_left"].to(a),
                                        upload.payload.tensors[f"{name}.{side}_right"].to(a)))
            averaged[name] = mfedloru_aggregate(a, b, pairs["A"], pairs["B"], weights)
        self.aggregate_head(server, uploads)
        self.accumulate(server, averaged, round_index)


class FRLoRA(Strategy):
    """FRLoRA, Federated Residual LoRA (Yan, Feng, Zuo, Zhu, Goh, Liu 2025, ICLR, OpenReview e0rQRMUhs7).

    "Federated Residual Low-Rank Adaption of Large Language Models"; we found no arXiv
    version, so the citation is the ICLR 2025 paper (openreview.net/forum?id=e0rQRMUhs7) and
    its public code (github.com/IAMJackYan/FRLoRA), read to understand, not copied.

    Before round 1 (:meth:`prepare`) the server takes, for every adapted layer, the SVD of
    the *pre-trained* weight W_pre = U S V^T and sets the adapter to its principal part,
    A_0 = sqrt(S_r / s) V_r^T, B_0 = U_r sqrt(S_r / s) (:func:`principal_factors`), and the frozen
    weight to the rest, W' = W_pre - s B_0 A_0, so the model is unchanged. Every round every
    client starts from the same (A_0, B_0); the server averages A and B (FedIT) and adds the
    residual s (avg(B) avg(A) - B_0 A_0) to W' (:func:`frlora_residual`), which sums the
    round's weight change into the global weight (a higher-rank global update) while the
    clients' low-rank matrices are re-initialised.

    What the singular vectors are of: the pre-trained weights, computed once (the paper:
    "reinitializes the local low-rank matrices with the principal singular values and
    vectors of the pre-trained weights in each round"; its public code keeps that first SVD
    and resets to it each round), not of the accumulated global weight.
    Choices where the paper leaves room: weights p_k = n_k / sum n_j (the public code weights
    clients equally); the rank and alpha are the profile's. Bytes down: the head and the
    averaged factors of every round the client has not applied (its W' must follow the
    global one); A_0, B_0 are computed on the client from the pre-trained weights.
    Taught in ``book/part2/client_initialization.ipynb``.
    """

    name = "FRLoRA"
    paper = "Yan et al. 2025, ICLR, OpenReview e0rQRMUhs7"
    chapter = "book/part2/client_initialization"

    @dataclass
    class State(MergingState):
        """The merges so far and the principal factors (A_0, B_0) every round restarts from."""

        init: dict[str, Factors] | None = None

    ClientState = MergingClientState

    def prepare(self, federation: object, model: torch.nn.Module, server: ServerState, seed: int) -> None:
        init = {name: principal_factors(base_weight(model, name), server.rank, server.scaling)
                for name in server.adapters}
        init = {name: (a.to(server.adapters[name][0]), b.to(server.adapters[name][1])) for name, (a, b) in init.items()}
        server.method_state.init = init
        server.adapters = {name: (a.clone(), b.clone()) for name, (a, b) in init.items()}
        server.base_deltas = {name: -server.scaling * (b @ a) for name, (a, b) in init.items()}

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        if server.method_state.init is None:
            raise ValueError("FRLoRA.prepare has not run: its initial adapter comes from the pre-trained weights")
        start = super().client_start(server, client_id, client_state, round_index)
        tensors = {k: v for k, v in start.download.tensors.items() if k.startswith("head.")}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        merged, merged_bytes = missed_merges(server.method_state, client_state)
        tensors.update(merged)
        start.download = Payload(tensors, nbytes=nbytes + merged_bytes)
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = _layers(server, uploads)
        init = server.method_state.init
        averaged = {n: fedit_average(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        server.base_deltas = {n: frlora_residual(a, b, init[n][0], init[n][1], server.scaling)
                              for n, (a, b) in averaged.items()}
        server.method_state.merges.append(averaged)
        server.adapters = {n: (a.clone(), b.clone()) for n, (a, b) in init.items()}
        self.aggregate_head(server, uploads)

