"""The one interface every FedLoRA method of the survey fits: :class:`Strategy`.

A round of the simulator (:mod:`fedlora_edu.simulation.federation`) asks the strategy these
things, and nothing in the loop knows which method is running:

1. ``sample_clients``: who takes part (uniform by default; groups and clusters override it).
2. ``client_start``: what client k starts training from and what it downloads for that
   (global adapter, a per-client rank, a personalised or re-initialised adapter, a
   frozen matrix...). What a client keeps between rounds and never sends is its client
   state, an instance of the strategy's ``ClientState`` dataclass that the simulator keeps
   for each client.
3. ``trainable``: which of A and B train in this round (FFA-LoRA freezes A; RoLoRA
   alternates); ``local_training``, rarely needed, wraps a client's training in a
   reparametrisation of the factors (mFedLoRU trains nested low-rank updates of A and B).
   ``batched_training`` and :meth:`Strategy.batched_training_obstacle` say whether the
   batched engine may train the round's clients together.
4. ``client_upload``: the :class:`Payload` the client sends, counted at its real size
   (sparse, quantised or sketched payloads set ``nbytes`` themselves).
5. ``aggregate``: the server's update of :class:`ServerState`: the global adapter,
   the head, changes to the frozen base weights W' (``base_deltas``: residuals,
   merges, periodic accumulation) and the method's own server state (``method_state``,
   an instance of the strategy's ``State`` dataclass: a server optimiser's moments,
   cluster records, merged stacks...).

:class:`Strategy` is abstract: a method must implement ``aggregate``; every other hook has
a default (FedIT's download and upload: the global adapter, A and B, and the head).

Taught in ``book/part1/fedlora.ipynb``; the methods are in :mod:`fedlora_edu.distributed`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fedlora_edu.core.adapters import Factors, tensor_bytes
from fedlora_edu.core.factors import average_tensors

BOTH = frozenset({"A", "B"})


@dataclass
class Payload:
    """What crosses the network in one direction for one client.

    ``nbytes`` defaults to the dense size of ``tensors``; a compressed payload sets it
    to the size of its real encoding.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)
    nbytes: int | None = None

    def __post_init__(self) -> None:
        if self.nbytes is None:
            self.nbytes = tensor_bytes(self.tensors)
        if self.nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {self.nbytes}")


@dataclass
class ClientStart:
    """Where client k starts a round: its adapter (rank r_k), head, and what it downloaded."""

    adapters: dict[str, Factors]
    head: dict[str, Tensor]
    download: Payload
    trainable: frozenset[str] = BOTH


@dataclass
class LocalResult:
    """A client's adapter and head after local training, with its data size n_k and loss."""

    client_id: int
    adapters: dict[str, Factors]
    head: dict[str, Tensor]
    num_examples: int
    train_loss: float
    rank: int


@dataclass
class Upload:
    """A received client update: the payload and the client's aggregation weight n_k."""

    client_id: int
    num_examples: int
    payload: Payload
    rank: int


@dataclass
class ServerState:
    """Everything the server keeps between rounds.

    ``adapters`` is the global adapter the model is evaluated with; ``base_deltas`` is
    filled by ``aggregate`` with changes to W' that the simulator applies to the shared
    base model (and that clients download); ``seed`` is the run's seed (methods derive
    their broadcast seeds from it); ``method_state`` is the method's own state, an
    instance of its :attr:`Strategy.State` dataclass (:class:`NoState` for most).
    """

    adapters: dict[str, Factors]
    head: dict[str, Tensor]
    scaling: float
    rank: int
    round: int = 0
    seed: int = 0
    base_deltas: dict[str, Tensor] = field(default_factory=dict)
    method_state: Any = None


@dataclass
class NoState:
    """The state of a method that keeps nothing of its own (the default ``State`` and ``ClientState``)."""


def normalized_weights(uploads: list[Upload]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients that took part (survey eq. 1)."""
    total = sum(u.num_examples for u in uploads)
    if total <= 0:
        raise ValueError("uploads carry no examples; cannot weight them")
    return [u.num_examples / total for u in uploads]


class Strategy(ABC):
    """A FedLoRA method: the hooks the simulator calls each round (see the module docstring).

    Abstract: a method implements :meth:`aggregate` and overrides what else differs; the
    defaults download the global adapter (truncated to the client's rank) and the head,
    train A and B, and upload both with the head. ``rank`` is the LoRA rank every client
    uses unless :meth:`client_rank` says otherwise.

    Class attributes a method declares: ``name`` (the survey's name, the registry's key),
    ``paper`` (its citation) and ``chapter`` (the notebook that teaches it, without
    ``.ipynb``); ``State`` and ``ClientState``, the dataclasses of what the server and each
    client keep between rounds (:class:`NoState` by default); ``batched_training``, False
    for a method whose clients the batched engine must not train together.
    """

    name: ClassVar[str] = "strategy"
    paper: ClassVar[str] = ""
    chapter: ClassVar[str] = ""
    State: ClassVar[type] = NoState
    ClientState: ClassVar[type] = NoState
    batched_training: ClassVar[bool] = True

    def __init__(self, rank: int | None = None) -> None:
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        self.rank = rank

    # ----- set-up -------------------------------------------------------------------
    def new_state(self) -> Any:
        """A fresh server-side state for one run (``server.method_state``)."""
        return self.State()

    def new_client_state(self) -> Any:
        """A fresh state for one client, kept by the simulator across the rounds of one run."""
        return self.ClientState()

    def batched_training_obstacle(self) -> str | None:
        """Why the batched engine cannot train this method's clients together, or None if it can.

        It cannot when the method says so (``batched_training = False``) or when it overrides
        :meth:`local_training` (its clients train inside a reparametrisation; the engine trains
        the stacked factors directly).
        """
        if not self.batched_training:
            return f"strategy {self.name} sets batched_training = False"
        if type(self).local_training is not Strategy.local_training:
            return f"strategy {self.name} trains its clients in a reparametrisation (local_training)"
        return None

    def client_rank(self, client_id: int, server: ServerState) -> int:
        """The LoRA rank r_k of client k (the server's rank by default)."""
        return server.rank if self.rank is None else self.rank

    def max_rank(self, num_clients: int) -> int | None:
        """The largest rank any client uses, if the strategy fixes it (the model is built with it)."""
        return self.rank

    def init_server(self, server: ServerState, seed: int) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Adjust the initial server state (server-side initialisation, survey 3.2)."""

    def prepare(  # noqa: B027 (optional hook, no-op by default)
        self, federation: object, model: torch.nn.Module, server: ServerState, seed: int
    ) -> None:
        """Server-side work before round 1 that needs the model or the clients' data.

        Called once per run, after :meth:`init_server`, with the
        :class:`~fedlora_edu.simulation.federation.Federation` and the freshly built peft ``model``
        (its base weights W' as pre-trained). Data-driven and weight-driven initialisations
        (survey 3.2: SLoRA's sparse phase, FeDeRA's SVD of W', eq. 10) set
        ``server.adapters`` here, and may set ``server.base_deltas``: the simulator adds
        them to W' before round 1, exactly as it does after each aggregation. Nothing by
        default.
        """

    def sample_clients(
        self, round_index: int, num_clients: int, clients_per_round: int, rng: np.random.Generator
    ) -> list[int]:
        """Uniform sampling without replacement, in increasing client order."""
        return sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())

    # ----- client side --------------------------------------------------------------
    def trainable(self, round_index: int) -> frozenset[str]:
        """Which LoRA matrices train in this round: any of {"A", "B"}."""
        return BOTH

    def local_training(
        self, model: torch.nn.Module, start: ClientStart, client_state: Any, round_index: int
    ) -> contextlib.AbstractContextManager[None]:
        """The context client k's local training runs in, after its start is loaded into ``model``.

        Nothing by default. A method whose clients train something other than the LoRA
        factors themselves (mFedLoRU: a nested low-rank update of each factor) registers a
        parametrisation of the factors here, freezes their stored values, and undoes both on
        exit; the optimiser then trains whatever requires a gradient, and the trained factors
        are read inside the context. Only the sequential loop can run such a method: the
        batched engine trains the stacked factors directly, so the simulator falls back.
        """
        return contextlib.nullcontext()

    def client_start(
        self, server: ServerState, client_id: int, client_state: Any, round_index: int
    ) -> ClientStart:
        """Download the global adapter, truncated to the client's rank, and the head."""
        r = self.client_rank(client_id, server)
        adapters = {name: (a[:r].clone(), b[:, :r].clone()) for name, (a, b) in server.adapters.items()}
        tensors = {f"{name}.A": a for name, (a, _) in adapters.items()}
        tensors.update({f"{name}.B": b for name, (_, b) in adapters.items()})
        tensors.update({f"head.{k}": v for k, v in server.head.items()})
        return ClientStart(adapters, {k: v.clone() for k, v in server.head.items()}, Payload(tensors),
                           self.trainable(round_index))

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """Send the matrices that trained this round and the head."""
        trained = self.trainable(round_index)
        tensors: dict[str, Tensor] = {}
        for name, (a, b) in result.adapters.items():
            if "A" in trained:
                tensors[f"{name}.A"] = a
            if "B" in trained:
                tensors[f"{name}.B"] = b
        tensors.update({f"head.{k}": v for k, v in result.head.items()})
        return Payload(tensors)

    def personal_model(
        self, server: ServerState, client_id: int, client_state: Any
    ) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """Client k's own (adapters, head) for evaluation on its own data; None means the global model."""
        return None

    def serving(
        self, model: torch.nn.Module, server: ServerState, client_id: int, client_state: Any
    ) -> contextlib.AbstractContextManager[None]:
        """The context client k's served model is evaluated in, once its factors and head are loaded into ``model``.

        Nothing by default: a served model is a LoRA adapter and a head (``personal_model``'s, or
        the server's). A method whose served model computes something a plain adapter cannot (a
        per-client router over LoRA experts: FedLEASE and FedMoE,
        :mod:`fedlora_edu.heterogeneity.experts`) installs that forward here and undoes it on exit,
        as :meth:`local_training` does for training.
        """
        return contextlib.nullcontext()

    # ----- server side --------------------------------------------------------------
    @abstractmethod
    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Update ``server`` from the round's uploads: the method's aggregation rule."""

    def aggregate_head(self, server: ServerState, uploads: list[Upload]) -> None:
        """FedAvg of the task head (a plain linear layer: averaging it is exact)."""
        weights = normalized_weights(uploads)
        server.head = {
            key: average_tensors([u.payload.tensors[f"head.{key}"] for u in uploads], weights)
            for key in server.head
        }


def split_factors(payload: Payload, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The A's and B's of a payload by layer name (missing ones are left out)."""
    a = {n: payload.tensors[f"{n}.A"] for n in names if f"{n}.A" in payload.tensors}
    b = {n: payload.tensors[f"{n}.B"] for n in names if f"{n}.B" in payload.tensors}
    return a, b


def all_finite(payload: Payload) -> bool:
    """False when any tensor holds NaN or Inf (such an update is left out of the round)."""
    return all(bool(torch.isfinite(t).all()) for t in payload.tensors.values())


def collect_factors(
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
