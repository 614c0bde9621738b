"""Sparse learning at the layer level (survey section 5, "Sparse Learning", Figure 3 (b)): train and send some layers.

FLASC and FSLoRA (:mod:`fedlora_edu.efficiency.sparse`) sparsify entries and rank components of
every layer's adapter. The methods here choose *which layers* a client trains and sends; a layer
it does not train keeps its LoRA factors, and the server aggregates each layer over the clients
that trained it. What differs is how the layers are chosen:

- **FedRA** (Su, Li, Xue; ECCV 2024, arXiv 2311.11227): at random, each round, by an allocation
  matrix; each client's sub-model is made of its allocated layers only (:class:`FedRA`);
- **Fed-piLot** (Zhang, Xu, Liu, Hu; arXiv 2410.10200): per client, by a knapsack over the
  layers' information gain (value) and memory cost, under the client's memory budget
  (:class:`FedPiLot`);
- **FibecFed** (Liu et al. 2024, arXiv 2410.00131): the layers of largest Fisher information
  (:class:`FibecFed`);
- **FedFMSL** (Wu et al. 2024c, IEEE 10666083): more layers switched on as the training accuracy
  rises (:class:`FedFMSL`).

In the survey's notation (arXiv 2505.13502): layer l's adapter is A_l (r x n) and B_l (m x r),
dW_l = B_l A_l, and client k's weight is p_k = n_k / sum_j n_j (eq. 1). The layer-wise
aggregation every method here uses is eq. 4's separate averaging taken per layer over the set
S_l of clients that trained layer l, with the weights renormalised over S_l
(:func:`aggregate_by_layer`):

    A_l <- sum_{k in S_l} p_k A_{l,k} / sum_{k in S_l} p_k    (and B_l alike),

and A_l, B_l unchanged when S_l is empty.

A "layer" is one transformer block: every LoRA module in it (the query and value projections
here) is trained and sent together (:func:`layer_of`). Only the blocks LoRA adapts are candidates
(on the testbed outside ``gpu``, the top ones; the blocks below are frozen and shared by all
clients). Clients train inside :meth:`LayerSparseStrategy.local_training` (the layers they do
not train are frozen; FedRA's are skipped altogether), so the simulator runs these methods with
its sequential loop. Every figure in the papers beyond their abstracts is unknown to us
(``METHOD_SOURCES.md``): each class's docstring says which choices are ours.
Taught in ``book/part4/layers.ipynb``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors
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
from fedlora_edu.core.threads import one_thread
from fedlora_edu.efficiency.costs import client_costs
from fedlora_edu.foundations.training import BatchSampler, ClientData, trim_batch

_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)\.")
_BLOCK = re.compile(r"(?:^|\.)layer\.(\d+)$")


# ----- layers and the layer-wise aggregation ----------------------------------------------
def layer_of(name: str) -> int:
    """The index of the transformer block a LoRA module belongs to (``...layer.4.attention.self.query`` -> 4)."""
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"cannot tell which transformer layer the LoRA module {name!r} belongs to")
    return int(match.group(1))


def adapted_layers(names: Sequence[str]) -> list[int]:
    """The transformer blocks that hold LoRA modules among ``names``, in increasing order."""
    return sorted({layer_of(name) for name in names})


def modules_in(names: Sequence[str], layers: Sequence[int]) -> list[str]:
    """The LoRA modules of ``names`` that belong to one of ``layers``."""
    chosen = set(layers)
    return [name for name in names if layer_of(name) in chosen]


def aggregate_by_layer(current: Mapping[str, Factors], client_factors: Sequence[Mapping[str, Factors]],
                       weights: Sequence[float]) -> tuple[dict[str, Factors], dict[str, float]]:
    """Each module's A and B averaged over the clients that sent it, p_k renormalised over them (see module docstring).

    ``client_factors[k]`` holds the modules client k trained (any subset of ``current``) and
    ``weights[k]`` is its p_k. Returns the new adapter and, per module, the share of the weight
    that trained it (sum of p_k over S_l: 0 for a module nobody sent, which keeps its value).
    """
    if len(client_factors) != len(weights):
        raise ValueError(f"client_factors has {len(client_factors)} entries for {len(weights)} weights")
    if any(not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"weights must be finite numbers >= 0, got {list(weights)!r}")
    for k, factors in enumerate(client_factors):
        unknown = set(factors) - set(current)
        if unknown:
            raise ValueError(f"client_factors[{k}] holds modules the adapter does not have: {sorted(unknown)[:3]}")
    new: dict[str, Factors] = {}
    coverage: dict[str, float] = {}
    for name, (a, b) in current.items():
        held = [(w, factors[name]) for w, factors in zip(weights, client_factors, strict=True) if name in factors]
        total = sum(w for w, _ in held)
        coverage[name] = float(total)
        if not held or total <= 0:
            new[name] = (a.clone(), b.clone())
            continue
        new[name] = (sum(w / total * fa.to(a) for w, (fa, _) in held),
                     sum(w / total * fb.to(b) for w, (_, fb) in held))
    return new, coverage


# ----- the strategy every method here is ---------------------------------------------------
def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _layer_module(model: nn.Module, index: int) -> nn.Module:
    for name, module in model.named_modules():
        match = _BLOCK.search(name)
        if match is not None and int(match.group(1)) == index:
            return module
    raise ValueError(f"the model has no transformer layer {index}")


def _skip(hidden_states: Tensor, *_: Any, **__: Any) -> Tensor | tuple[Tensor]:
    """A transformer block left out of a sub-model: its input passes on unchanged (the residual stream)."""
    return hidden_states if _BLOCKS_RETURN_TENSORS else (hidden_states,)


def _blocks_return_tensors() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


_BLOCKS_RETURN_TENSORS = _blocks_return_tensors()


def _payload(adapters: Mapping[str, Factors], head: Mapping[str, Tensor], modules: Sequence[str],
             extra: Mapping[str, Tensor] | None = None) -> Payload:
    tensors = {}
    for name in modules:
        tensors[f"{name}.A"], tensors[f"{name}.B"] = adapters[name]
    tensors.update({f"head.{key}": value for key, value in head.items()})
    tensors.update(extra or {})
    return Payload(tensors)


class LayerSparseStrategy(Strategy):
    """Clients train (and send) the LoRA modules of some transformer layers only; the server aggregates layer by layer.

    A subclass says which layers client k trains in a round (:meth:`client_layers`) and may
    override which it downloads (:meth:`download_layers`: by default the layers it trains; the
    others it either does not run or holds from the shared start, see each method). The layers
    a client does not train are frozen during its local training, or, with ``skip_untrained``
    (FedRA), left out of its model: the block passes its input on unchanged. The upload holds the
    trained layers' A and B and the head; :meth:`aggregate` is :func:`aggregate_by_layer`, and the
    head is averaged as FedAvg does. Not registered itself: :class:`FixedLayers` is the plain
    version (one fixed set of layers for everyone).
    """

    name = "layer-sparse"
    skip_untrained = False

    @dataclass
    class ClientState:
        """Who the client is and which layers it trains in its current round."""

        client_id: int = -1
        layers: list[int] = field(default_factory=list)

    # ----- what a subclass decides --------------------------------------------------
    def client_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        """The transformer layers client k trains in this round (every adapted layer by default)."""
        return adapted_layers(list(server.adapters))

    def download_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        """The layers whose factors client k downloads (those it trains by default)."""
        return list(client_state.layers)

    def extra_upload(self, client_state: Any) -> dict[str, Tensor]:
        """Anything besides factors and head the client sends (nothing by default)."""
        return {}

    # ----- the hooks ----------------------------------------------------------------
    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        available = adapted_layers(list(server.adapters))
        layers = sorted(set(self.client_layers(server, client_id, client_state, round_index)))
        if not layers or not set(layers) <= set(available):
            raise ValueError(f"client {client_id} must train a non-empty subset of the adapted layers {available}, "
                             f"got {layers}")
        client_state.client_id, client_state.layers = client_id, layers
        adapters = {name: (a.clone(), b.clone()) for name, (a, b) in server.adapters.items()}
        head = {key: value.clone() for key, value in server.head.items()}
        sent = modules_in(list(adapters), self.download_layers(server, client_id, client_state, round_index))
        return ClientStart(adapters, head, _payload(adapters, head, sent))

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Freeze the LoRA factors of the layers the client does not train (skip their blocks: ``skip_untrained``)."""
        trained = set(client_state.layers)
        frozen = [(parameter, parameter.requires_grad) for name, layer in adapter_io.lora_layers(model).items()
                  if layer_of(name) not in trained
                  for parameter in (layer.lora_A[adapter_io.ADAPTER].weight, layer.lora_B[adapter_io.ADAPTER].weight)]
        skipped = []
        try:
            for parameter, _ in frozen:
                parameter.requires_grad_(False)
            if self.skip_untrained:
                for index in sorted({layer_of(name) for name in start.adapters} - trained):
                    block = _layer_module(model, index)
                    block.forward = _skip
                    skipped.append(block)
            yield
        finally:
            for parameter, before in frozen:
                parameter.requires_grad_(before)
            for block in skipped:
                del block.forward  # back to the class's forward

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The trained layers' A and B, the head, and :meth:`extra_upload`."""
        sent = modules_in(list(result.adapters), client_state.layers)
        return _payload(result.adapters, result.head, sent, self.extra_upload(client_state))

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """:func:`aggregate_by_layer` (each layer over the clients that sent it), then FedAvg of the head."""
        self.aggregate_layers(server, uploads)

    def aggregate_layers(self, server: ServerState, uploads: list[Upload]) -> dict[str, float]:
        """Set ``server.adapters`` and the head from the uploads; return each module's coverage (sum_{S_l} p_k)."""
        names = list(server.adapters)
        client_factors = [{name: (u.payload.tensors[f"{name}.A"], u.payload.tensors[f"{name}.B"]) for name in names
                           if f"{name}.A" in u.payload.tensors} for u in uploads]
        server.adapters, coverage = aggregate_by_layer(server.adapters, client_factors, normalized_weights(uploads))
        self.aggregate_head(server, uploads)
        return coverage


class FixedLayers(LayerSparseStrategy):
    """Every client trains the same fixed transformer ``layers`` (FedIT's aggregation on them); the others stay frozen.

    Not a method of the survey: the plain layer-sparse baseline, and what
    :func:`layer_memory_costs` runs to count a layer's memory.
    """

    name = "fixed layers"

    def __init__(self, layers: Sequence[int]) -> None:
        super().__init__(None)
        chosen = sorted({int(layer) for layer in layers})
        if not chosen or any(layer < 0 for layer in chosen):
            raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {list(layers)!r}")
        self.layers = chosen

    def client_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        return list(self.layers)


# ----- FedRA ------------------------------------------------------------------------------
def allocation_matrix(budgets: Sequence[int], num_layers: int, seed: int) -> np.ndarray:
    """FedRA's random allocation matrix: a boolean K x L matrix whose row k holds ``budgets[k]`` ones at random places.

    Each row is a uniformly random subset of the L layers of size budgets[k], drawn independently
    of the others with a generator seeded by ``seed``.
    """
    num_layers = _check_count(num_layers, "num_layers")
    generator = np.random.default_rng(seed)
    matrix = np.zeros((len(budgets), num_layers), dtype=bool)
    for k, budget in enumerate(budgets):
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 1 <= budget <= num_layers:
            raise ValueError(f"layer_budgets[{k}] must be an integer in 1..{num_layers}, got {budget!r}")
        matrix[k, generator.choice(num_layers, size=int(budget), replace=False)] = True
    return matrix


class FedRA(LayerSparseStrategy):
    """FedRA (Su, Li, Xue; ECCV 2024, arXiv 2311.11227): random layer allocation, layer-wise aggregation.

    Each round the server draws a random allocation matrix M (K x L, :func:`allocation_matrix`):
    client k gets the layers of row k, as many as its resources allow (``layer_budgets``, one
    count for everyone or one per client; by default half the adapted layers, rounded up). Its
    model is made of those layers only: a block it was not allocated is left out (its input passes
    on unchanged), so it computes, holds and trains less. It downloads and uploads the LoRA factors
    of its layers; the server averages each layer over the clients that held it, p_k renormalised
    over them, and a layer nobody held keeps its value (:func:`aggregate_by_layer`, survey eq. 4
    per layer).

    As in the paper's abstract: a random allocation matrix each round, sub-models made of the
    allocated layers, aggregation by the allocation matrix. Our choices (the official code,
    github.com/leondada/FedRA, was not read): every row is an independent uniform subset of the
    layers (a layer may go to nobody in a round), drawn for all K clients with the seed
    ``derive_seed(seed, "fedra allocation", round)``; only the blocks LoRA adapts are allocated
    (the frozen blocks below, computed once by the testbed, stay in every sub-model); AdamW local
    training as for every method here.
    """

    name = "FedRA"
    paper = "Su, Li, Xue 2024 (ECCV), arXiv 2311.11227"
    chapter = "book/part4/layers"
    skip_untrained = True

    def __init__(self, layer_budgets: int | Sequence[int] | None = None) -> None:
        super().__init__(None)
        if layer_budgets is None or isinstance(layer_budgets, (int, np.integer)):
            self.layer_budgets = layer_budgets if layer_budgets is None else [_check_count(layer_budgets,
                                                                                           "layer_budgets")]
        else:
            self.layer_budgets = [_check_count(b, "layer_budgets") for b in layer_budgets]
            if not self.layer_budgets:
                raise ValueError("layer_budgets must name at least one client's budget")

    def budgets(self, num_clients: int, num_layers: int) -> list[int]:
        """Every client's number of layers (the rows' sums of the allocation matrix)."""
        if self.layer_budgets is None:
            return [math.ceil(num_layers / 2)] * num_clients
        if len(self.layer_budgets) == 1:
            return self.layer_budgets * num_clients
        if len(self.layer_budgets) < num_clients:
            raise ValueError(f"layer_budgets names {len(self.layer_budgets)} clients' budgets; the federation has "
                             f"{num_clients}")
        return list(self.layer_budgets[:num_clients])

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        self.num_clients = federation.num_clients
        self.budgets(self.num_clients, len(adapted_layers(list(server.adapters))))  # fail early on a bad budget

    def allocation(self, server: ServerState, round_index: int) -> np.ndarray:
        """This round's allocation matrix (the same for every client of the round: one draw per round)."""
        layers = adapted_layers(list(server.adapters))
        if getattr(self, "num_clients", None) is None:
            raise ValueError("FedRA draws its allocation matrix for the federation's clients: prepare runs first")
        budgets = self.budgets(self.num_clients, len(layers))
        return allocation_matrix(budgets, len(layers), derive_seed(server.seed, "fedra allocation", round_index))

    def client_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        layers = adapted_layers(list(server.adapters))
        row = self.allocation(server, round_index)[client_id]
        return [layer for layer, held in zip(layers, row, strict=True) if held]


# ----- Fed-piLot --------------------------------------------------------------------------
def knapsack(values: Sequence[float], costs: Sequence[int], capacity: int) -> list[int]:
    """The 0/1 knapsack: the items of largest total value whose costs sum to at most ``capacity``.

    Exact: it keeps, item after item, every (cost, value) a subset can reach that no other
    reachable subset beats on both (the Pareto frontier), so it needs no rounding of the costs
    (bytes here). Among equally valuable subsets the cheapest one is returned. Item indices in
    increasing order.
    """
    if len(values) != len(costs):
        raise ValueError(f"values has {len(values)} items and costs {len(costs)}")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise ValueError(f"capacity must be an integer >= 0, got {capacity!r}")
    for i, (value, cost) in enumerate(zip(values, costs, strict=True)):
        if isinstance(cost, bool) or not isinstance(cost, (int, np.integer)) or cost < 0:
            raise ValueError(f"costs[{i}] must be an integer >= 0, got {cost!r}")
        if not math.isfinite(value):
            raise ValueError(f"values[{i}] must be finite, got {value!r}")
    frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, (value, cost) in enumerate(zip(values, costs, strict=True)):
        grown = [(c + int(cost), v + float(value), items + (i,)) for c, v, items in frontier if c + cost <= capacity]
        merged = sorted(frontier + grown, key=lambda state: (state[0], -state[1]))
        frontier, best = [], -math.inf
        for state in merged:
            if state[1] > best:
                frontier.append(state)
                best = state[1]
    return list(max(frontier, key=lambda state: (state[1], -state[0]))[2])


@dataclass(frozen=True)
class LayerCosts:
    """A local step's memory: ``base_bytes`` with no layer training, plus ``layer_bytes[l]`` per trained layer."""

    base_bytes: int
    layer_bytes: dict[int, int]

    def step_bytes(self, layers: Sequence[int]) -> int:
        """The memory the knapsack charges for training ``layers`` (an upper bound of the counted peak)."""
        return self.base_bytes + sum(self.layer_bytes[layer] for layer in layers)


def layer_memory_costs(federation: Any, *, seed: int = 0, **run_options: Any) -> LayerCosts:
    """Each adapted layer's memory cost, counted by the package's one accounting path (``client_costs``).

    For every adapted layer l, one client's round of :class:`FixedLayers` ([l]) is counted by
    :func:`fedlora_edu.efficiency.costs.client_costs`;
    ``layer_bytes[l]`` is its peak (:attr:`ClientCost.peak_bytes`) minus the model's weights: the
    gradient and AdamW's two moments of layer l's LoRA numbers and the activations saved for the
    backward pass, from layer l up. ``base_bytes`` is the weights. Training a set S of layers needs
    the weights, the optimiser state of each, and the activations from the lowest one up, so
    ``base_bytes + sum_{l in S} layer_bytes[l]`` is at least the peak of training S (the
    activations above the lowest layer of S are counted more than once): charging it keeps a
    client within its budget. ``run_options`` go to the federation's ``run`` (default one local
    step, no evaluation: a step's memory does not depend on how many follow it).
    """
    run_options = {"local_steps": 1, "evaluate": False, **run_options}
    layers = adapted_layers(list(adapter_io.get_lora_factors(federation.fresh_model(seed=seed))))
    counted = {layer: client_costs(federation, FixedLayers([layer]), rounds=1, seed=seed, **run_options)
               for layer in layers}
    base = {cost.weight_bytes for cost in counted.values()}
    if len(base) != 1:
        raise RuntimeError(f"the model's weights were counted differently per layer: {sorted(base)}")
    return LayerCosts(base.pop(), {layer: cost.peak_bytes - cost.weight_bytes for layer, cost in counted.items()})


def squared_gradient_by_layer(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[int, float]:
    """Per transformer layer, ||grad of the batch's loss w.r.t. the layer's LoRA factors||^2 (every A and B in it)."""
    by_layer: dict[int, list[Tensor]] = {}
    for name, layer in adapter_io.lora_layers(model).items():
        by_layer.setdefault(layer_of(name), []).extend(
            [layer.lora_A[adapter_io.ADAPTER].weight, layer.lora_B[adapter_io.ADAPTER].weight])
    parameters = [p for params in by_layer.values() for p in params]
    with torch.enable_grad():
        loss = model(**batch).loss
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    squares = iter(0.0 if g is None else float(g.double().square().sum()) for g in gradients)
    return {layer: sum(next(squares) for _ in params) for layer, params in by_layer.items()}


@contextlib.contextmanager
def _scoring(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) with every LoRA factor requiring a gradient, on one CPU thread; restored on exit.

    One thread because the scores come from passes over one example or one small batch, where
    the hand-offs of several intra-op threads cost more than the arithmetic on a loaded CPU
    (:mod:`fedlora_edu.core.threads`).
    """
    factors = [p for layer in adapter_io.lora_layers(model).values()
               for p in (layer.lora_A[adapter_io.ADAPTER].weight, layer.lora_B[adapter_io.ADAPTER].weight)]
    before = [p.requires_grad for p in factors]
    was_training = model.training
    model.eval()
    try:
        for p in factors:
            p.requires_grad_(True)
        with one_thread():
            yield
    finally:
        for p, flag in zip(factors, before, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def information_gain(model: nn.Module, data: ClientData, *, batch_size: int, seed: int,
                     device: torch.device | None = None) -> dict[int, float]:
    """Fed-piLot's local information gain of each layer, our version: ||gradient||^2 of its LoRA factors on one batch.

    A gradient step of size eta on layer l alone lowers the loss by about eta ||g_l||^2 (first
    order), so ||g_l||^2 is what training layer l is worth to this client now. One batch of
    ``batch_size`` of the client's examples, drawn with ``seed``, without dropout.
    """
    device = next(model.parameters()).device if device is None else device
    indices = BatchSampler(len(data), min(batch_size, len(data)), seed).next()
    with _scoring(model):
        return squared_gradient_by_layer(model, trim_batch(data.subset(indices), device))


class FedPiLot(LayerSparseStrategy):
    """Fed-piLot (Zhang, Xu, Liu, Hu 2024, arXiv 2410.10200): layers chosen per client by a knapsack under its memory.

    Each round, client k trains the layers that maximise the total information-gain score
    (value) among the sets whose memory (cost) fits its budget b_k: a 0/1 knapsack
    (:func:`knapsack`, exact), charged ``costs.step_bytes(S) <= b_k`` with the package's counted
    costs (:func:`layer_memory_costs`, an upper bound of the peak, so the chosen set fits).
    The score of layer l for client k mixes a local and a global information gain, each
    normalised to sum to 1 over the layers: (1 - ``mix``) times the client's local gain
    (:func:`information_gain` on its own data) plus ``mix`` times the global gain, the squared size
    of the layer's last aggregated change ||s (B_l A_l - B_l' A_l')||_F^2 (none before round 2).
    The server aggregates each layer over the clients that trained it (:func:`aggregate_by_layer`,
    the spatial part) and compensates an under-updated layer (the temporal part): a layer that no
    client trained this round takes its last aggregated change again, scaled by ``decay`` ** s,
    with s the rounds since it was last trained.

    From the paper's abstract: per-client assignment of LoRA layers under heterogeneous memory as
    a knapsack over a local-global information-gain score, and a spatial-temporal aggregation
    with dynamic weights for under-updated layers. Every formula above is our choice (the paper's
    are not known to us): the local gain as a squared gradient norm, computed once per client
    before round 1 on one batch (it needs one backward pass through every adapted layer; the
    simulation does not charge it to the budget), the 50/50 mix, the re-applied decayed change as
    the compensation (``decay=0`` turns it off), and the layer (transformer block) as the unit.

    ``memory_budgets``: b_k in bytes of one local step, one for everyone or one per client (e.g.
    :func:`fedlora_edu.federations.memory_budgets`); None: no limit (every layer trains).
    ``costs``: the :class:`LayerCosts` to charge (measured in :meth:`prepare` with
    :func:`layer_memory_costs` when None and budgets are set). A client whose budget holds no
    layer cannot train and is never sampled.
    """

    name = "Fed-piLot"
    paper = "Zhang, Xu, Liu, Hu 2024, arXiv 2410.10200"
    chapter = "book/part4/layers"

    @dataclass
    class State:
        """Per layer: global gain, last change, rounds since trained; local gains; each round's scores and choices."""

        global_gain: dict[int, float] = field(default_factory=dict)
        last_change: dict[str, Factors] = field(default_factory=dict)
        stale: dict[int, int] = field(default_factory=dict)
        local_gain: dict[int, dict[int, float]] = field(default_factory=dict)
        selections: list[dict[int, list[int]]] = field(default_factory=list)
        scores: list[dict[int, list[float]]] = field(default_factory=list)

    def __init__(self, memory_budgets: int | Sequence[int] | None = None, *, costs: LayerCosts | None = None,
                 mix: float = 0.5, decay: float = 0.5, score_batch: int = 16) -> None:
        super().__init__(None)
        if memory_budgets is not None:
            listed = [memory_budgets] if isinstance(memory_budgets, (int, np.integer)) else list(memory_budgets)
            for budget in listed:
                if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
                    raise ValueError(f"memory_budgets must be integers >= 0 (bytes), got {budget!r}")
            if not listed:
                raise ValueError("memory_budgets must name at least one client's budget")
            memory_budgets = [int(b) for b in listed]
        if costs is not None and not isinstance(costs, LayerCosts):
            raise ValueError(f"costs must be a LayerCosts, got {type(costs).__name__}")
        for label, value in (("mix", mix), ("decay", decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{label} must be in [0, 1], got {value!r}")
        self.memory_budgets = memory_budgets
        self.costs = costs
        self.mix, self.decay = float(mix), float(decay)
        self.score_batch = _check_count(score_batch, "score_batch")

    def budget(self, client_id: int) -> int | None:
        """Client k's memory budget b_k in bytes (None: no limit)."""
        if self.memory_budgets is None:
            return None
        if len(self.memory_budgets) == 1:
            return self.memory_budgets[0]
        if client_id >= len(self.memory_budgets):
            raise ValueError(f"memory_budgets names {len(self.memory_budgets)} clients' budgets; client {client_id} "
                             "has none")
        return self.memory_budgets[client_id]

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        state = server.method_state
        layers = adapted_layers(list(server.adapters))
        if self.memory_budgets is not None and self.costs is None:
            self.costs = layer_memory_costs(federation, seed=seed)
        if self.costs is not None and set(self.costs.layer_bytes) != set(layers):
            raise ValueError(f"costs count the layers {sorted(self.costs.layer_bytes)}; the model adapts {layers}")
        for k, data in enumerate(federation.clients):
            state.local_gain[k] = information_gain(model, data, batch_size=self.score_batch, device=federation.device,
                                                   seed=derive_seed(seed, "fed-pilot gain", k))
        cheapest = None if self.costs is None else self.costs.step_bytes([min(layers, key=self.costs.layer_bytes.get)])
        self.eligible = [k for k in range(federation.num_clients) if cheapest is None or self.budget(k) >= cheapest]
        state.stale = dict.fromkeys(layers, 0)

    def sample_clients(self, round_index: int, num_clients: int, clients_per_round: int,
                       rng: np.random.Generator) -> list[int]:
        """Uniform among the clients whose budget holds at least one layer (found in :meth:`prepare`)."""
        eligible = getattr(self, "eligible", None)
        eligible = list(range(num_clients)) if eligible is None else eligible
        if clients_per_round > len(eligible):
            raise ValueError(f"clients_per_round is {clients_per_round}, but only {len(eligible)} clients' memory "
                             "budgets hold a layer")
        return sorted(rng.choice(eligible, size=clients_per_round, replace=False).tolist())

    def scores(self, state: Any, client_id: int, layers: Sequence[int]) -> list[float]:
        """The local-global information-gain score of each layer for client k (see the class docstring)."""
        def normalised(gains: Mapping[int, float]) -> list[float] | None:
            total = sum(gains.get(layer, 0.0) for layer in layers)
            return None if total <= 0 else [gains.get(layer, 0.0) / total for layer in layers]

        local = normalised(state.local_gain.get(client_id, {})) or [1.0 / len(layers)] * len(layers)
        shared = normalised(state.global_gain)
        if shared is None:
            return local
        return [(1 - self.mix) * lo + self.mix * gl for lo, gl in zip(local, shared, strict=True)]

    def client_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        """The knapsack's choice: the layers of largest total score whose counted memory fits b_k."""
        state = server.method_state
        layers = adapted_layers(list(server.adapters))
        budget = self.budget(client_id)
        scores = self.scores(state, client_id, layers)
        if budget is None:
            chosen = list(layers)
        else:
            capacity = budget - self.costs.base_bytes
            if capacity < 0:
                raise ValueError(f"client {client_id}'s memory budget ({budget} bytes) does not hold the model's "
                                 f"weights ({self.costs.base_bytes} bytes)")
            weights = [self.costs.layer_bytes[layer] for layer in layers]
            picked = knapsack(scores, weights, capacity)
            chosen = [layers[i] for i in picked]
            if not chosen:
                raise ValueError(f"client {client_id}'s memory budget ({budget} bytes) holds no layer")
        while len(state.selections) <= round_index:
            state.selections.append({})
            state.scores.append({})
        state.selections[round_index][client_id] = chosen
        state.scores[round_index][client_id] = scores
        return chosen

    def download_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        """Every adapted layer: the client runs them all, and others' training moves those it does not train."""
        return adapted_layers(list(server.adapters))

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Spatial: each layer averaged over the clients that trained it; temporal: compensation of the others."""
        state = server.method_state
        before = {name: (a.clone(), b.clone()) for name, (a, b) in server.adapters.items()}
        coverage = self.aggregate_layers(server, uploads)
        trained_layers = {layer_of(name) for name, share in coverage.items() if share > 0}
        adapters = dict(server.adapters)
        for layer in state.stale:
            state.stale[layer] = 0 if layer in trained_layers else state.stale[layer] + 1
        for name, (a, b) in before.items():
            layer = layer_of(name)
            if layer in trained_layers:
                state.last_change[name] = (adapters[name][0] - a, adapters[name][1] - b)
            elif name in state.last_change and self.decay > 0:
                weight = self.decay ** state.stale[layer]
                change_a, change_b = state.last_change[name]
                adapters[name] = (a + weight * change_a, b + weight * change_b)
        server.adapters = adapters
        gains: dict[int, float] = {}
        for name, (a, b) in adapters.items():
            old_a, old_b = before[name]
            change = server.scaling * (b @ a - old_b @ old_a)
            gains[layer_of(name)] = gains.get(layer_of(name), 0.0) + float(change.double().square().sum())
        state.global_gain = gains


# ----- FibecFed ---------------------------------------------------------------------------
def layer_fisher_scores(model: nn.Module, data: ClientData, *, examples: int, seed: int = 0,
                        device: torch.device | None = None) -> dict[int, float]:
    """The empirical Fisher information of each layer's LoRA factors: the trace, averaged over examples.

    F_l = (1/N) sum_i ||grad_{A_l, B_l} log p(y_i | x_i)||^2 over N = ``examples`` of the client's
    examples (drawn with ``seed``; all of them if fewer), one example at a time, without dropout:
    the trace of the diagonal of the empirical Fisher matrix of the layer's LoRA parameters.
    """
    examples = _check_count(examples, "examples")
    device = next(model.parameters()).device if device is None else device
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:examples].tolist()
    totals: dict[int, float] = {}
    with _scoring(model):
        for index in order:
            for layer, square in squared_gradient_by_layer(model, trim_batch(data.subset([index]), device)).items():
                totals[layer] = totals.get(layer, 0.0) + square
    return {layer: total / len(order) for layer, total in totals.items()}


class FibecFed(LayerSparseStrategy):
    """FibecFed (Liu et al. 2024, arXiv 2410.00131): only the layers of largest Fisher information are trained and sent.

    Before round 1 every client computes the Fisher information of each layer's LoRA factors on
    its own data (:func:`layer_fisher_scores`); the server weights them by p_k and keeps the
    ``layers_kept`` layers of largest total. Those layers are trained, sent and aggregated
    (:func:`aggregate_by_layer`, every client holding them: FedIT on those layers); the others stay
    at their start (B = 0: they add nothing to W'), so no client downloads or sends them.

    From the abstract: Fisher information selects the layers for sparse LoRA updates, and a
    Fisher-based curriculum orders the data. Left out here: the data curriculum (clients draw
    their batches as for every method). Our choices: the Fisher score is the trace of the
    empirical Fisher of the layer's LoRA factors at the start (B = 0, so only B's gradient is
    non-zero there), over ``fisher_examples`` examples per client, computed once (the selection
    is fixed for the run), summed over clients with the weights p_k; ``layers_kept`` defaults to
    half the adapted layers, rounded up.
    """

    name = "FibecFed"
    paper = "Liu et al. 2024, arXiv 2410.00131"
    chapter = "book/part4/layers"

    @dataclass
    class State:
        """Each layer's p_k-weighted Fisher score and the layers kept."""

        fisher: dict[int, float] = field(default_factory=dict)
        kept: list[int] = field(default_factory=list)

    def __init__(self, layers_kept: int | None = None, *, fisher_examples: int = 8) -> None:
        super().__init__(None)
        self.layers_kept = None if layers_kept is None else _check_count(layers_kept, "layers_kept")
        self.fisher_examples = _check_count(fisher_examples, "fisher_examples")

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        state = server.method_state
        layers = adapted_layers(list(server.adapters))
        kept = math.ceil(len(layers) / 2) if self.layers_kept is None else self.layers_kept
        if kept > len(layers):
            raise ValueError(f"layers_kept is {kept}, but the model adapts only {len(layers)} layers")
        weights = np.asarray(federation.client_sizes, dtype=float) / sum(federation.client_sizes)
        totals = dict.fromkeys(layers, 0.0)
        for k, data in enumerate(federation.clients):
            scores = layer_fisher_scores(model, data, examples=self.fisher_examples,
                                         seed=derive_seed(seed, "fibecfed fisher", k), device=federation.device)
            for layer in layers:
                totals[layer] += float(weights[k]) * scores[layer]
        state.fisher = totals
        state.kept = sorted(sorted(layers, key=lambda layer: (-totals[layer], layer))[:kept])

    def client_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        kept = server.method_state.kept
        if not kept:
            raise ValueError("FibecFed has not selected its layers: prepare runs before round 1")
        return list(kept)


# ----- FedFMSL ----------------------------------------------------------------------------
def switch_on(active: int, reference: float | None, accuracy: float, *, total: int,
              gain: float) -> tuple[int, float]:
    """FedFMSL's rule (ours): one more layer on when the training accuracy has risen by ``gain`` since the last switch.

    ``active`` layers are on and ``reference`` is the accuracy at the last switch (None before the
    first round, whose accuracy becomes the reference). Returns the new (active, reference):
    never fewer layers than before, at most ``total``, at most one more per round.
    """
    if not math.isfinite(accuracy):
        raise ValueError(f"accuracy must be finite, got {accuracy!r}")
    if reference is None:
        return active, accuracy
    if accuracy >= reference + gain and active < total:
        return active + 1, accuracy
    return active, reference


def switch_schedule(accuracies: Sequence[float], *, initial: int, total: int, gain: float) -> list[int]:
    """The number of layers on in each round, given the training accuracy of the rounds before (``len + 1`` rounds)."""
    initial, total = _check_count(initial, "initial_layers"), _check_count(total, "total")
    if initial > total:
        raise ValueError(f"initial_layers is {initial}, more than the {total} adapted layers")
    active, reference, schedule = initial, None, [initial]
    for accuracy in accuracies:
        active, reference = switch_on(active, reference, accuracy, total=total, gain=gain)
        schedule.append(active)
    return schedule


class FedFMSL(LayerSparseStrategy):
    """FedFMSL (Wu et al. 2024c, IEEE 10666083): LoRA layers switched on progressively as the training accuracy rises.

    Round 1 trains the ``initial_layers`` top adapted layers (those nearest the head). Each client
    measures its accuracy on the batches it trains on and sends it with its update (4 bytes);
    the server's training accuracy is the p_k-weighted mean, and once it has risen by ``gain``
    since the last switch, one more layer, the next one down, is switched on for every client from
    the next round (:func:`switch_on`). Switched-on layers stay on. Clients train, download and
    send the layers that are on (a layer still off is at its start, B = 0, which every client
    builds from the shared seed); aggregation is :func:`aggregate_by_layer` (FedIT on the layers
    that are on).

    The paper was not found (``METHOD_SOURCES.md``): the survey's sentence ("a sparsely activated
    LoRA layer framework, which progressively tunes specific LoRA layers over communication
    rounds based on training accuracy") is all we follow. Every rule above is our choice: the
    order (top down), one layer per switch, the gain rule and its default (0.02), the accuracy
    measured on the training batches during local training.
    """

    name = "FedFMSL"
    paper = "Wu et al. 2024c, IEEE 10666083 (paper not found; the survey's description)"
    chapter = "book/part4/layers"

    @dataclass
    class State:
        """How many layers are on, the accuracy at the last switch, and each round's (accuracy, layers on)."""

        active: int = 0
        reference: float | None = None
        history: list[tuple[float, int]] = field(default_factory=list)

    @dataclass
    class ClientState(LayerSparseStrategy.ClientState):
        """Also the client's correct and counted training predictions this round."""

        correct: int = 0
        seen: int = 0

    def __init__(self, initial_layers: int = 1, *, gain: float = 0.02) -> None:
        super().__init__(None)
        self.initial_layers = _check_count(initial_layers, "initial_layers")
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 <= gain <= 1:
            raise ValueError(f"gain must be in [0, 1], got {gain!r}")
        self.gain = float(gain)

    def init_server(self, server: ServerState, seed: int) -> None:
        total = len(adapted_layers(list(server.adapters)))
        if self.initial_layers > total:
            raise ValueError(f"initial_layers is {self.initial_layers}, more than the {total} adapted layers")
        server.method_state.active = self.initial_layers

    def client_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        return adapted_layers(list(server.adapters))[-server.method_state.active:]

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Freeze the layers that are off, and count the client's correct predictions on its training batches."""
        client_state.correct = client_state.seen = 0

        def count(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            labels = kwargs.get("labels")
            if module.training and labels is not None:
                client_state.correct += int((output.logits.detach().argmax(dim=-1) == labels).sum())
                client_state.seen += int(labels.numel())

        hook = model.register_forward_hook(count, with_kwargs=True)
        try:
            with super().local_training(model, start, client_state, round_index):
                yield
        finally:
            hook.remove()

    def extra_upload(self, client_state: Any) -> dict[str, Tensor]:
        accuracy = client_state.correct / client_state.seen if client_state.seen else math.nan
        return {"train_accuracy": torch.tensor(accuracy, dtype=torch.float32)}

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Layer-wise averaging, then one more layer on if the round's training accuracy rose by ``gain``."""
        super().aggregate(server, uploads, round_index)
        state = server.method_state
        weights = normalized_weights(uploads)
        accuracy = sum(p * float(u.payload.tensors["train_accuracy"]) for p, u in zip(weights, uploads, strict=True))
        state.history.append((accuracy, state.active))
        state.active, state.reference = switch_on(state.active, state.reference, accuracy,
                                                  total=len(adapted_layers(list(server.adapters))), gain=self.gain)
