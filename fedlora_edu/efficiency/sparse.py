"""Sparse learning at the parameter level (survey section 5.1): send only the largest entries of the adapter.

FLASC (Kuo, Raje, Rajesh, Smith; arXiv 2406.05233) keeps LoRA's factors but sparsifies what
crosses the network in both directions:

- **down**: the server keeps the global top-k entries, by magnitude over *all* LoRA factors of
  the model together, at a download density ``d_down`` (:func:`top_k_mask`); the client starts
  from the adapter with every other entry set to zero;
- **local**: the client trains the whole adapter, dense;
- **up**: the client's change ``delta = start - trained`` is sparsified the same way at an upload
  density ``d_up``;
- **server**: the weighted mean of the clients' deltas is a gradient for a server optimiser
  (AdamW at 1e-3 by default, as in the authors' code, or SGD), which steps the global adapter.

As in the authors' code (imkevinkuo/flasc, commit 17c70635, ``train_sparse_lora_dp.py::fl_train``):
one global top-k over all LoRA parameters, the download mask recomputed every round, the delta
taken as server-masked start minus client, the mean delta as the server optimiser's gradient.
Our choices: the mean is weighted by the clients' p_k (survey eq. 1); local training is the
simulator's (AdamW, like every method here; the authors use SGD with momentum); a sparse payload
is counted as 4 bytes of value and 4 of index per kept entry, or as the dense tensors when that
is smaller (:func:`sparse_bytes`). With both densities 1 and SGD at rate 1 on the server, FLASC is
FedIT (tests/test_sparse.py checks it).

HAFL (Su, Yan, Deng; arXiv 2411.06581) sparsifies by rank-1 component instead of by entry: each
client updates only the components of B A = sum_i b_i a_i that its smoothed sensitivities rank
highest, as many as its budget allows (the paper's freezing scheme; its truncation scheme, where the client
holds and sends only those components, is ``HAFL(scheme="truncation")``), and the server averages each
component over the clients that trained it (:class:`HAFL`). FSLoRA's sketches (:class:`FSLoRA`) choose
components at random and rescale them.
Taught in ``book/part4/sparse.ipynb``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedlora_edu.core.adapters import ADAPTER, Factors, lora_layers
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    normalized_weights,
)

VALUE_BYTES = 4
INDEX_BYTES = 4
HAFL_SCHEMES = ("freezing", "truncation")


def _check_density(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def top_k_mask(tensors: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    """Boolean masks keeping the ``ceil(density * total)`` entries of largest magnitude over all ``tensors`` together.

    One threshold for every tensor (FLASC's global top-k); ties at the threshold are broken by
    position, so exactly k entries are kept.
    """
    density = _check_density(density, "density")
    if not tensors:
        raise ValueError("tensors is empty: nothing to sparsify")
    names = list(tensors)
    flat = torch.cat([tensors[name].detach().reshape(-1).abs().float() for name in names])
    k = max(1, int(torch.ceil(torch.tensor(density * flat.numel())).item()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for name in names:
        size = tensors[name].numel()
        masks[name] = keep[start:start + size].reshape(tensors[name].shape)
        start += size
    return masks


def sparse_bytes(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> int:
    """What sending the masked entries costs: value and index per kept entry, or the dense tensors if fewer bytes."""
    kept = sum(int(masks[name].sum()) for name in tensors)
    dense = sum(t.numel() for t in tensors.values()) * VALUE_BYTES
    return min(kept * (VALUE_BYTES + INDEX_BYTES), dense)


def _flatten(adapters: Mapping[str, Factors]) -> dict[str, Tensor]:
    out = {}
    for name, (a, b) in adapters.items():
        out[f"{name}.A"], out[f"{name}.B"] = a, b
    return out


def _trained_change(result: LocalResult, start: Mapping[str, Factors] | None) -> dict[str, Factors]:
    """Per layer, (A_trained - A_start, B_trained - B_start): what the client's round changed."""
    if start is None:
        raise ValueError(f"client {result.client_id} uploads without having started a round")
    return {name: (a - start[name][0].to(a), b - start[name][1].to(b)) for name, (a, b) in result.adapters.items()}


class FLASC(Strategy):
    """FLASC (Kuo et al. 2024, arXiv 2406.05233): top-k sparse download and upload, dense local training.

    ``density_down`` and ``density_up`` are the shares of all LoRA entries sent each way;
    ``server_optimizer`` is ``"adamw"`` (default, learning rate ``server_learning_rate`` 1e-3 as
    in the authors' code) or ``"sgd"``. See the module docstring for what follows the authors'
    code and what is our choice. The task head, when it trains, is averaged as FedAvg does.
    """

    name = "FLASC"
    paper = "Kuo et al. 2024, arXiv 2406.05233"
    chapter = "book/part4/sparse"

    @dataclass
    class State:
        """The server optimiser over the global adapter, built in :meth:`prepare`."""

        parameters: dict[str, Tensor] | None = None
        optimizer: torch.optim.Optimizer | None = None

    @dataclass
    class ClientState:
        """The (masked) adapter the client started its current round from."""

        start: dict[str, Factors] | None = None

    def __init__(self, density_down: float = 0.25, density_up: float = 0.25, *, server_optimizer: str = "adamw",
                 server_learning_rate: float = 1e-3) -> None:
        super().__init__(None)
        self.density_down = _check_density(density_down, "density_down")
        self.density_up = _check_density(density_up, "density_up")
        if server_optimizer not in ("adamw", "sgd"):
            raise ValueError(f"server_optimizer must be 'adamw' or 'sgd', got {server_optimizer!r}")
        if not (isinstance(server_learning_rate, (int, float)) and server_learning_rate > 0):
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate!r}")
        self.server_optimizer = server_optimizer
        self.server_learning_rate = float(server_learning_rate)

    def prepare(self, federation: Any, model: torch.nn.Module, server: ServerState, seed: int) -> None:
        state = server.method_state
        state.parameters = {key: value.detach().clone().requires_grad_(True)
                            for key, value in _flatten(server.adapters).items()}
        optimizer = torch.optim.AdamW if self.server_optimizer == "adamw" else torch.optim.SGD
        options = {"weight_decay": 0.0} if self.server_optimizer == "adamw" else {}
        state.optimizer = optimizer(list(state.parameters.values()), lr=self.server_learning_rate, **options)

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        flat = _flatten(server.adapters)
        masks = top_k_mask(flat, self.density_down)
        adapters = {name: (a * masks[f"{name}.A"], b * masks[f"{name}.B"]) for name, (a, b) in server.adapters.items()}
        client_state.start = {name: (a.clone(), b.clone()) for name, (a, b) in adapters.items()}
        flat_start = _flatten(adapters)
        head = {key: value.clone() for key, value in server.head.items()}
        nbytes = sparse_bytes(flat_start, masks) + sum(v.numel() * VALUE_BYTES for v in head.values())
        tensors = {**flat_start, **{f"head.{key}": value for key, value in head.items()}}
        return ClientStart(adapters, head, Payload(tensors, nbytes))

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The change ``start - trained``, top-k sparsified over every factor at ``density_up``, and the head."""
        deltas = {key: -change for key, change in _flatten(_trained_change(result, client_state.start)).items()}
        masks = top_k_mask(deltas, self.density_up)
        tensors = {f"delta.{key}": value * masks[key] for key, value in deltas.items()}
        tensors.update({f"head.{key}": value for key, value in result.head.items()})
        nbytes = sparse_bytes(deltas, masks) + sum(v.numel() * VALUE_BYTES for v in result.head.values())
        return Payload(tensors, nbytes)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """The p_k-weighted mean delta is the gradient of one step of the server optimiser."""
        state = server.method_state
        weights = normalized_weights(uploads)
        state.optimizer.zero_grad()
        for key, parameter in state.parameters.items():
            parameter.grad = sum(p * u.payload.tensors[f"delta.{key}"].to(parameter)
                                 for p, u in zip(weights, uploads, strict=True))
        state.optimizer.step()
        server.adapters = {name: (state.parameters[f"{name}.A"].detach().clone().to(a),
                                  state.parameters[f"{name}.B"].detach().clone().to(b))
                           for name, (a, b) in server.adapters.items()}
        self.aggregate_head(server, uploads)


def sketch_indices(rank: int, kept: int, seed: int) -> list[int]:
    """The rank components a sketch keeps: ``kept`` of ``range(rank)``, uniformly without replacement, sorted."""
    if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= rank:
        raise ValueError(f"a sketch keeps between 1 and {rank} components, got {kept!r}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(rank, generator=generator)[:kept].tolist())


class FSLoRA(Strategy):
    """FSLoRA (Fang et al. 2025, arXiv 2501.19389): each client trains a sketch of a larger global adapter.

    The server keeps a global adapter of rank r. Each round it samples, for client k, a sketch
    S_k: a diagonal r x r matrix with the value r / m_k on m_k rank components chosen uniformly
    (:func:`sketch_indices`) and 0 elsewhere, so that E[S_k] = I. Client k trains B S_k A from
    the global A and B (Algorithm 1, eq. 4): only the chosen columns of B and rows of A move.
    It uploads those columns of B's change and rows of A's change; the server adds the
    p_k-weighted sum of the clients' changes, each placed at its components and zero elsewhere,
    to the global adapter (eq. 5). A client's memory and compute are those of rank m_k, and the
    global rank can exceed what any client could train.

    ``sketch`` is every client's share m_k / r (a number in (0, 1]) or a sequence of shares, one
    per client (heterogeneous resources). As in the authors' code
    (wenzhifang/Federated-Sketching-LoRA-Implementation@2d4d7ac6, ``src/LoRA_Sketching.py``), the
    sketched model scales B's chosen columns by r / m_k; the simulator trains that scaled copy
    with AdamW (the authors rescale B's gradient so that their optimiser steps the unscaled B),
    and the change of B is scaled back by m_k / r before it is sent. Our choices: the download
    is the whole global adapter (Algorithm 1, step 3) plus the sketch's component indices; the
    upload is the dense chosen rows and columns (the server knows the indices). The head, when it
    trains, is averaged as FedAvg does.
    """

    name = "FSLoRA"
    paper = "Fang et al. 2025, arXiv 2501.19389"
    chapter = "book/part4/sparse"

    @dataclass
    class ClientState:
        """The components the client's sketch chose this round, their scale r / m_k, and where it started."""

        indices: list[int] | None = None
        scale: float = 1.0
        start: dict[str, Factors] | None = None

    def __init__(self, sketch: float | list[float] = 0.5) -> None:
        super().__init__(None)
        shares = list(sketch) if isinstance(sketch, (list, tuple)) else [sketch]
        for share in shares:
            _check_density(share, "sketch")
        self.sketch = [float(share) for share in shares]

    def share(self, client_id: int) -> float:
        """Client k's m_k / r."""
        if len(self.sketch) == 1:
            return self.sketch[0]
        if client_id >= len(self.sketch):
            raise ValueError(f"sketch names {len(self.sketch)} clients' shares; client {client_id} has none")
        return self.sketch[client_id]

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        rank = server.rank
        kept = max(1, int(round(self.share(client_id) * rank)))
        indices = sketch_indices(rank, kept, derive_seed(server.seed, "fslora sketch", round_index, client_id))
        scale = rank / kept
        adapters = {name: (a[indices].clone(), b[:, indices].clone() * scale)
                    for name, (a, b) in server.adapters.items()}
        client_state.indices, client_state.scale = indices, scale
        client_state.start = {name: (a.clone(), b.clone()) for name, (a, b) in adapters.items()}
        tensors = _flatten(server.adapters)
        head = {key: value.clone() for key, value in server.head.items()}
        tensors.update({f"head.{key}": value for key, value in head.items()})
        tensors["sketch"] = torch.tensor(indices, dtype=torch.int32)
        return ClientStart(adapters, head, Payload(tensors))

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The chosen rows of A's change and columns of B's change (unscaled), and the head."""
        tensors = {}
        for name, (change_a, change_b) in _trained_change(result, client_state.start).items():
            tensors[f"{name}.dA"], tensors[f"{name}.dB"] = change_a, change_b / client_state.scale
        tensors["sketch"] = torch.tensor(client_state.indices, dtype=torch.int32)
        tensors.update({f"head.{key}": value for key, value in result.head.items()})
        payload = Payload(tensors)
        return Payload(tensors, payload.nbytes - tensors["sketch"].numel() * 4)  # the server chose the indices

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Eq. 5: the global A and B plus the p_k-weighted sum of the changes, each at its client's components."""
        weights = normalized_weights(uploads)
        adapters = {}
        for name, (a, b) in server.adapters.items():
            new_a, new_b = a.clone(), b.clone()
            for p, upload in zip(weights, uploads, strict=True):
                indices = upload.payload.tensors["sketch"].long().tolist()
                new_a[indices] += p * upload.payload.tensors[f"{name}.dA"].to(a)
                new_b[:, indices] += p * upload.payload.tensors[f"{name}.dB"].to(b)
            adapters[name] = (new_a, new_b)
        server.adapters = adapters
        self.aggregate_head(server, uploads)


def smoothed_sensitivity(weight: Tensor, grad: Tensor, mean: Tensor | None, uncertainty: Tensor | None,
                         beta1: float = 0.85, beta2: float = 0.85) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the smoothed sensitivity of every entry of a factor (AdaLoRA's definition, our reading of HAFL's).

    With I = |w * grad| the sensitivity of this step, the smoothed sensitivity
    mean' = beta1 mean + (1 - beta1) I, its uncertainty U' = beta2 U + (1 - beta2) |I - mean'|, and the
    score s = mean' * U'. ``mean`` and ``uncertainty`` None start both at zero. Returns (mean', U', s).
    """
    sensitivity = (weight.detach() * grad.detach()).abs().float()
    mean = torch.zeros_like(sensitivity) if mean is None else mean
    uncertainty = torch.zeros_like(sensitivity) if uncertainty is None else uncertainty
    mean = beta1 * mean + (1 - beta1) * sensitivity
    uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - mean).abs()
    return mean, uncertainty, mean * uncertainty


def component_importance(score_a: Tensor, score_b: Tensor) -> Tensor:
    """The importance of each rank-1 component b_i a_i: the mean score of row i of A plus that of column i of B."""
    if score_a.shape[0] != score_b.shape[1]:
        raise ValueError(f"A has {score_a.shape[0]} rows but B has {score_b.shape[1]} columns")
    return score_a.mean(dim=1) + score_b.mean(dim=0)


def top_components(importance: Tensor, kept: int) -> list[int]:
    """The ``kept`` most important components, sorted by index; ties go to the lower index."""
    if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= importance.numel():
        raise ValueError(f"kept must be in 1..{importance.numel()}, got {kept!r}")
    order = sorted(range(importance.numel()), key=lambda i: (-float(importance[i]), i))
    return sorted(order[:kept])


def aggregate_rank_one(a: Tensor, b: Tensor, parts: list[tuple[list[int], Tensor, Tensor]],
                       weights: list[float]) -> Factors:
    """HAFL's rank-1 aggregation of one layer: each component averaged over the clients that trained it.

    ``parts[k]`` is client k's (component indices S_k, A[S_k], B[:, S_k]) and ``weights[k]`` its p_k.
    Component i becomes sum_{k: i in S_k} p_k (a_i^k, b_i^k) / sum_{k: i in S_k} p_k; a component no
    client trained keeps the global (a_i, b_i). Zero-padding would instead divide by sum_k p_k over all
    clients, diluting the components few clients trained.
    """
    new_a, new_b = a.clone(), b.clone()
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    sum_a = torch.zeros(a.shape, dtype=torch.float64)
    sum_b = torch.zeros(b.shape, dtype=torch.float64)
    for (indices, rows, columns), p in zip(parts, weights, strict=True):
        total[indices] += p
        sum_a[indices] += p * rows.double()
        sum_b[:, indices] += p * columns.double()
    trained = (total > 0).nonzero().flatten().tolist()
    new_a[trained] = (sum_a[trained] / total[trained, None]).to(a)
    new_b[:, trained] = (sum_b[:, trained] / total[None, trained]).to(b)
    return new_a, new_b


def aggregate_scores(previous: Tensor, parts: list[tuple[list[int], Tensor]], weights: list[float]) -> Tensor:
    """The server's importance of each component of one layer after a round of HAFL's truncation scheme (our choice).

    ``parts[k]`` is client k's (component indices S_k, its importance of each of them) and ``weights[k]`` its p_k.
    Component i's score becomes sum_{k: i in S_k} p_k s_i^k / sum_{k: i in S_k} p_k, the same renormalised
    average as :func:`aggregate_rank_one`'s; a component no client held keeps its ``previous`` score.
    """
    total = torch.zeros(previous.numel(), dtype=torch.float64)
    weighted = torch.zeros(previous.numel(), dtype=torch.float64)
    for (indices, scores), p in zip(parts, weights, strict=True):
        total[indices] += p
        weighted[indices] += p * scores.double()
    new = previous.clone()
    held = (total > 0).nonzero().flatten().tolist()
    new[held] = (weighted[held] / total[held]).to(previous)
    return new


class HAFL(Strategy):
    """HAFL (Su, Yan, Deng 2024, arXiv 2411.06581): each client trains only its most important rank-1 components.

    A layer's update is a sum of rank-1 components, dW = B A = sum_i b_i a_i (survey eq. 2, A r x n,
    B m x r). Every client downloads the whole global adapter of rank r and keeps it whole in its
    forward pass, but under its budget it updates only r_k = max(1, round(share_k r)) components of
    each layer and keeps the others frozen (the paper's importance-based *freezing* scheme). The
    components are chosen by importance: the smoothed sensitivity of each factor entry
    (:func:`smoothed_sensitivity`: I = |w grad L|, smoothed by an exponential average with its
    uncertainty, as in AdaLoRA), summed per component over row i of A and column i of B
    (:func:`component_importance`). The client uploads its components' rows of A, columns of B and
    their indices; the server averages each component over exactly the clients that trained it, with
    the renormalised weights p_k / sum_{k: i in S_k} p_k (:func:`aggregate_rank_one`), instead of
    zero-padding every client to rank r. The head, when it trains, is averaged as FedAvg does.

    ``budgets`` is a share r_k / r in (0, 1], or a sequence of shares that client k takes in turn
    (``budgets[k % len(budgets)]``). Our choices, where the paper's abstract (all we have of it) says no
    more: each client keeps its own smoothed scores across the rounds it takes part in (beta1 = beta2
    = 0.85, AdaLoRA's defaults), updates them at every local step, and chooses its components at the
    first step of each round from the scores that include that step (ties go to the lower index: with
    B = 0 at the start every score is 0, so a fresh adapter's first components train first); the
    component's importance is the mean score of its A row plus that of its B column; the budget is the
    same share of every layer; factors are averaged component-wise (a_i and b_i separately).
    Frozen components get a zero gradient, which leaves them exactly unchanged under the clients'
    AdamW without weight decay. Needs the gradients, so the simulator trains its clients one by one.

    ``scheme="truncation"`` is the paper's other scheme, the one its abstract says may degrade accuracy
    and that freezing replaces: client k *holds* only its r_k components of each layer. It downloads A[S_k],
    B[:, S_k] and the indices S_k (its download shrinks to r_k / r of the adapter's), its forward pass
    applies W' x + (alpha / r) B[:, S_k] A[S_k] x (the other components are absent, not frozen: they are
    zero-padded out of the model's rank-r slots, and the scaling stays the global adapter's), it trains
    and uploads those components, and the server aggregates them with :func:`aggregate_rank_one` as in
    the freezing scheme. The components must be chosen *before* the client trains, and a client never sees
    the sensitivities of the components it does not hold; our choice: the server keeps an importance per
    component (``server.method_state``), each client uploads with its components its own importance of
    each (r_k float32 numbers per layer, counted in its upload), the server averages them over the
    clients that held each component (:func:`aggregate_scores`; a component nobody held keeps its
    score; the client's own smoothed sensitivities carry over its rounds as in freezing, those of the
    components it holds updated at every step), and hands client k the r_k components it ranks highest
    (all scores start at 0, so the first round hands out the first r_k components, as the freezing
    scheme's ties do). With every budget 1 the two schemes train the same components from the same
    start, so their aggregates are equal.
    """

    name = "HAFL"
    paper = "Su, Yan, Deng 2024, arXiv 2411.06581"
    chapter = "book/part4/sparse"

    @dataclass
    class State:
        """The truncation scheme's server-side importance of each component, per layer (unused by freezing)."""

        importance: dict[str, Tensor] = field(default_factory=dict)

    @dataclass
    class ClientState:
        """The client's smoothed sensitivities (per factor), its budget and this round's components per layer.

        Under truncation the sensitivities keep the full rank-r shapes, and a round updates the rows of A and
        columns of B of the components the client holds.
        """

        mean: dict[str, Tensor] | None = None
        uncertainty: dict[str, Tensor] | None = None
        kept: int = 0
        selected: dict[str, list[int]] | None = None

    def __init__(self, budgets: float | list[float] = (1.0, 0.5, 0.25), *, beta1: float = 0.85,
                 beta2: float = 0.85, scheme: str = "freezing") -> None:
        super().__init__(None)
        if scheme not in HAFL_SCHEMES:
            raise ValueError(f"scheme must be one of {HAFL_SCHEMES}, got {scheme!r}")
        self.scheme = scheme
        shares = list(budgets) if isinstance(budgets, (list, tuple)) else [budgets]
        if not shares:
            raise ValueError("budgets is empty")
        self.budgets = [_check_density(share, "budgets") for share in shares]
        for value, label in ((beta1, "beta1"), (beta2, "beta2")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{label} must be in [0, 1), got {value!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)

    def share(self, client_id: int) -> float:
        """Client k's r_k / r."""
        return self.budgets[client_id % len(self.budgets)]

    def kept(self, client_id: int, rank: int) -> int:
        """r_k: how many components of each layer client k trains."""
        return max(1, min(rank, int(round(self.share(client_id) * rank))))

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        """Freezing: the whole global adapter. Truncation: the r_k components the server ranks highest, with indices."""
        client_state.kept = self.kept(client_id, server.rank)
        client_state.selected = None
        if self.scheme == "freezing":
            return super().client_start(server, client_id, client_state, round_index)
        scores = server.method_state.importance
        client_state.selected = {name: top_components(scores.get(name, torch.zeros(server.rank)), client_state.kept)
                                 for name in server.adapters}
        adapters = {name: (a[client_state.selected[name]].clone(), b[:, client_state.selected[name]].clone())
                    for name, (a, b) in server.adapters.items()}
        tensors: dict[str, Tensor] = {}
        for name, (a, b) in adapters.items():
            tensors[f"{name}.A"], tensors[f"{name}.B"] = a, b
            tensors[f"{name}.index"] = torch.tensor(client_state.selected[name], dtype=torch.int32)
        tensors.update({f"head.{key}": value for key, value in server.head.items()})
        return ClientStart(adapters, {key: value.clone() for key, value in server.head.items()}, Payload(tensors),
                           self.trainable(round_index))

    def observe(self, factors: Mapping[str, tuple[Tensor, Tensor, Tensor, Tensor]], client_state: Any) -> None:
        """Update the client's smoothed sensitivities from one step's (A, grad A, B, grad B) per layer."""
        if client_state.mean is None:
            client_state.mean, client_state.uncertainty = {}, {}
        for name, (a, grad_a, b, grad_b) in factors.items():
            for key, weight, grad in ((f"{name}.A", a, grad_a), (f"{name}.B", b, grad_b)):
                client_state.mean[key], client_state.uncertainty[key], _ = smoothed_sensitivity(
                    weight, torch.zeros_like(weight) if grad is None else grad, client_state.mean.get(key),
                    client_state.uncertainty.get(key), self.beta1, self.beta2)

    def observe_held(self, factors: Mapping[str, tuple[Tensor, Tensor, Tensor, Tensor]], client_state: Any) -> None:
        """Truncation: update the sensitivities of the held components from one step's (A, grad A, B, grad B).

        The model's first r_k slots hold the components ``client_state.selected[name]`` (in that order); the
        slots above are padding. The client's sensitivities keep the rank-r shapes (row i of A, column i of B
        for component i); only the held components' entries change.
        """
        if client_state.mean is None:
            client_state.mean, client_state.uncertainty = {}, {}
        for name, (a, grad_a, b, grad_b) in factors.items():
            held, kept = client_state.selected[name], len(client_state.selected[name])
            grad_a = torch.zeros_like(a) if grad_a is None else grad_a
            grad_b = torch.zeros_like(b) if grad_b is None else grad_b
            # component i is row i of A and column i of B: on A and on B^T, the held components are rows
            for key, weight, grad, transposed in ((f"{name}.A", a, grad_a, False), (f"{name}.B", b, grad_b, True)):
                mean = client_state.mean.setdefault(key, torch.zeros(weight.shape, dtype=torch.float32))
                uncertainty = client_state.uncertainty.setdefault(key, torch.zeros_like(mean))
                rows_of = (lambda t: t.T) if transposed else (lambda t: t)  # noqa: E731
                new_mean, new_uncertainty, _ = smoothed_sensitivity(
                    rows_of(weight)[:kept].cpu(), rows_of(grad)[:kept].cpu(), rows_of(mean)[held],
                    rows_of(uncertainty)[held], self.beta1, self.beta2)
                rows_of(mean)[held] = new_mean
                rows_of(uncertainty)[held] = new_uncertainty

    def importance(self, client_state: Any, name: str) -> Tensor:
        """The client's current importance of each component of layer ``name``."""
        score = {key: client_state.mean[key] * client_state.uncertainty[key] for key in (f"{name}.A", f"{name}.B")}
        return component_importance(score[f"{name}.A"], score[f"{name}.B"])

    @contextlib.contextmanager
    def local_training(self, model: torch.nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Before each optimiser step: update the scores, choose components (first step), zero the rest's gradients.

        Truncation: only the scores of the held components change; the absent ones are padding that the
        simulator's ``local_train`` holds at zero (its ``rank`` r_k).
        """
        parameters = {name: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
                      for name, layer in lora_layers(model).items()}

        def observe_held(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.observe_held({name: (a, a.grad, b, b.grad) for name, (a, b) in parameters.items()}, client_state)

        def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.observe({name: (a, a.grad, b, b.grad) for name, (a, b) in parameters.items()}, client_state)
            if client_state.selected is None:
                client_state.selected = {name: top_components(self.importance(client_state, name), client_state.kept)
                                         for name in parameters}
            for name, (a, b) in parameters.items():
                frozen = [i for i in range(a.shape[0]) if i not in set(client_state.selected[name])]
                if a.grad is not None:
                    a.grad[frozen] = 0
                if b.grad is not None:
                    b.grad[:, frozen] = 0

        handle = register_optimizer_step_pre_hook(before_step if self.scheme == "freezing" else observe_held)
        try:
            yield
        finally:
            handle.remove()

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """Per layer, the trained components' rows of A, columns of B and their indices; and the head.

        Truncation: the client's whole (rank r_k) adapter, the indices, and its importance of each component.
        """
        if client_state.selected is None:
            raise ValueError(f"client {result.client_id} uploads without having trained a step")
        tensors: dict[str, Tensor] = {}
        for name, (a, b) in result.adapters.items():
            indices = client_state.selected[name]
            if self.scheme == "freezing":
                tensors[f"{name}.A"], tensors[f"{name}.B"] = a[indices].clone(), b[:, indices].clone()
            else:
                if a.shape[0] != len(indices):
                    raise ValueError(f"client {result.client_id} holds {len(indices)} components of {name} but "
                                     f"returns {a.shape[0]}")
                tensors[f"{name}.A"], tensors[f"{name}.B"] = a.clone(), b.clone()
            tensors[f"{name}.index"] = torch.tensor(indices, dtype=torch.int32)
            if self.scheme == "truncation":
                tensors[f"{name}.importance"] = self.held_importance(client_state, name).float()
        tensors.update({f"head.{key}": value for key, value in result.head.items()})
        return Payload(tensors)

    def held_importance(self, client_state: Any, name: str) -> Tensor:
        """Truncation: the client's importance of each component it holds of layer ``name``, in its order."""
        held = client_state.selected[name]
        if client_state.mean is None:
            return torch.zeros(len(held))
        score = {key: client_state.mean[key] * client_state.uncertainty[key] for key in (f"{name}.A", f"{name}.B")}
        return component_importance(score[f"{name}.A"][held], score[f"{name}.B"][:, held])

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """:func:`aggregate_rank_one` on every layer, then FedAvg of the head (truncation: the scores too)."""
        weights = normalized_weights(uploads)
        if self.scheme == "truncation":
            scores = server.method_state.importance
            server.method_state.importance = {
                name: aggregate_scores(scores.get(name, torch.zeros(server.rank)),
                                       [(u.payload.tensors[f"{name}.index"].long().tolist(),
                                         u.payload.tensors[f"{name}.importance"]) for u in uploads], weights)
                for name in server.adapters}
        server.adapters = {
            name: aggregate_rank_one(a, b, [(u.payload.tensors[f"{name}.index"].long().tolist(),
                                             u.payload.tensors[f"{name}.A"], u.payload.tensors[f"{name}.B"])
                                            for u in uploads], weights)
            for name, (a, b) in server.adapters.items()}
        self.aggregate_head(server, uploads)
