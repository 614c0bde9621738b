"""A registered strategy as Flower's ServerApp and ClientApp: the simulator's round, across processes.

:meth:`Federation.run <fedlora_edu.simulation.federation.Federation.run>` plays a round inside one
process. :func:`serve` plays the same round from a Flower ``ServerApp``: it samples the clients
with the strategy, computes each one's ``client_start``, sends it as a Flower message, collects the
replies, and then does exactly what the simulator does with the uploads (weights p_k, the
discordance and update size, ``aggregate``, the change of W', the evaluation, the bytes).
:func:`client_step` is what a ``ClientApp`` does with that message: load the start into its model,
train with the simulator's own sequential path
(:meth:`Federation.train_sequential <fedlora_edu.simulation.federation.Federation.train_sequential>`,
the reference engine) and reply with the strategy's ``client_upload``. Nothing of a method's math is
written here; Flower carries the tensors and the round's settings.

What crosses the network each round, for sampled client k:

- down: the ``client_start`` adapter (rank r_k) and head (for a method whose client state lives on
  the SuperNode: the server's global adapter and head, from which the client computes its start),
  which of A and B train, and the current frozen weight W' of every layer a method has changed
  (FLoRA's merges, FedEx-LoRA's residual; a ClientApp process starts afresh for every message, so W'
  is sent whole and arrives bit for bit); for a method whose client state the server keeps, that
  state and the strategy's attributes (below);
- up: the strategy's payload (counted at the size the strategy says, ``Payload.nbytes``, as in the
  simulator), the client's trained factors for the server's measurements (``discordance``,
  ``update_size``, ``aggregation_error``: diagnostics a production server would not ask for), the
  client's loss and example count, and the client state the server keeps, as the round left it.

The history has the simulator's columns (``engine`` is ``"flower"``) and six more:
``flower_bytes_down`` and ``flower_bytes_up``, the array bytes Flower really carried,
``round_seconds``, the round's wall time on the server, and ``dropped``, ``{client: reason}`` for
every sampled client whose update did not count: no reply within the round's timeout, an error reply
(a client process that crashed), or an update holding NaN or Inf (also counted in ``excluded``, as
the simulator does). The round goes on with the others. ``flower_state_bytes_down`` and
``flower_state_bytes_up`` count the client state that crosses only because the server keeps it (below).

Where a client's state lives. A method whose clients keep something between rounds (its
``ClientState`` is not :class:`~fedlora_edu.core.strategy.NoState`) runs in one of two ways
(:func:`state_placement`):

- **on the SuperNode** (``"supernode"``, the methods of :data:`CLIENT_STATE_METHODS`: FedSA-LoRA's
  personal B, the compressors' error memory, LoRA-A2's and FLASC's start...): the state is kept in
  the ``state`` of the ClientApp's Flower :class:`~flwr.app.Context`, which the SuperNode holds in its
  memory for the whole run and hands to the ClientApp process of every message, so what a round's
  ClientApp writes there the next round's reads (:func:`save_client_state`, :func:`load_client_state`;
  it never crosses the network and dies with the SuperNode, as a real client's memory would).
  ``client_start`` runs on the client: the server sends its global adapter and head (and the scalars
  of its state), the client rebuilds that view of the server and asks the strategy for its start with
  its own state; it reports the start's download size and the factors it started from (for the
  server's ``update_size``). Only a method whose client hooks need nothing but that view, the
  strategy's constructor settings and the client's own state and data can run so;
- **kept by the server** (``"server"``, every other method with client state): the server keeps
  every client's state, as the simulator does, and runs ``client_start`` with it; the message
  carries the client's state after ``client_start`` and the strategy's attributes (what ``prepare``
  set up on the server, which the simulator's client hooks read from the same object:
  :func:`strategy_attributes`), the client trains and uploads with them, and its reply carries the
  state back, which the server stores (a client that does not answer keeps the state it had). Exact
  by construction: every hook runs on what it would see in the simulator. A reference to the
  federation's data is sent as a name that each process resolves to its own copy
  (:func:`federation_references`). What this simulates faithfully is each method's arithmetic and
  its own bytes (``bytes_up``, ``bytes_down``, counted as in the simulator), not where the state
  sits: in a real deployment of these papers the client keeps its state (FedDPA's local adapter,
  pFedLoRA's local model, PerFIT's masks, FLoRA's count of the merges it has applied), and where a
  paper has the server decide part of it (the layers FedRA assigns, FedMoE's sub-mixture) the server
  sends only that decision. What crosses only because of this mode is counted apart, in
  ``flower_state_bytes_down`` and ``flower_state_bytes_up`` (arrays and layout; also part of
  ``flower_bytes_*``, which count every array Flower carried). What a client's hooks write into the
  strategy object itself stays on the client (DP-FedAvg's ``update_norms``: the server's list stays
  empty on Flower).

Any value a state holds crosses as named tensors and a JSON layout
(:func:`~fedlora_edu.flower.records.encode_value`: tensors bit for bit, containers, the package's
dataclasses and modules, functions by name); a value it cannot carry raises a TypeError naming where
it sits. The split-learning methods (SplitFedLoRA, SplitLoRA) run in their own loop
(:func:`~fedlora_edu.efficiency.split.run_split`), not in the round :func:`serve` plays: the
ServerApp runs them with :func:`fedlora_edu.flower.split.serve_split`, which sends every local
step's activations and gradients as messages (the ClientApp's ``train.split_*`` actions,
:data:`SPLIT_ACTIONS`); :func:`check_supported` refuses them only with ``evaluate_clients``.
``tests/test_flower_every_method.py`` checks every method equal to the simulator (or to
``run_split``) through Flower's messages in one process; ``tests/test_flower_deployment.py`` a few
across real processes.

Evaluation: the server scores the global model on the test set, as the simulator does. With
``evaluate_clients`` every client also scores the model it is served (the strategy's
``personal_model``, or the global one) on its own held-out data, in its ClientApp
(:func:`client_evaluation`, an ``evaluate`` message after each round): the simulator's
``client_accuracy``, the mean over all clients, NaN if any client did not answer. For a method with
client state the client assembles its personal model itself, from the server's global model and its
state, as it does its start.

A limit: every process loads the whole simulated federation from one file
(:func:`~fedlora_edu.flower.messaging.save_federation`), where a real SuperNode would load only its own data.

Taught in ``book/flower/real_federation.ipynb`` (the simulator's round: ``book/part1/federated_learning.ipynb``).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    NoState,
    Payload,
    ServerState,
    Strategy,
    Upload,
    all_finite,
)
from fedlora_edu.flower.messaging import (  # the run's settings and federation file, re-exported here
    RunSettings,
    array_bytes,
    discover_clients,
    exchange,
    load_federation,
    save_federation,  # noqa: F401
)
from fedlora_edu.flower.records import (
    decode_value,
    encode_value,
    factors_to_tensors,
    record_to_tensors,
    tensors_to_factors,
    tensors_to_record,
)
from fedlora_edu.flower.split import CLIENT_HANDLERS, serve_split
from fedlora_edu.foundations.training import evaluate
from fedlora_edu.registry import own_loop
from fedlora_edu.simulation.federation import (
    HISTORY_COLUMNS,
    Federation,
    aggregation_error,
    layer_discordance,
    update_size,
)

FLOWER_COLUMNS = [*HISTORY_COLUMNS, "flower_bytes_down", "flower_bytes_up", "dropped", "round_seconds",
                  "flower_state_bytes_down", "flower_state_bytes_up"]
"""The simulator's history columns and what only a real federation has: wire bytes, dropped clients, the
round's wall time on the server (messages out to aggregate evaluated), and the bytes of the client state the
server sends and gets back only because it keeps that state for the client (module docstring; 0 otherwise)."""

FAULTS = ("", "nan", "crash", "silent")
"""Faults a SuperNode can be told to play (its node config ``fault``), for the failure tests and the chapter:
``"nan"`` uploads NaN, ``"crash"`` raises inside the ClientApp, ``"silent"`` never answers."""


CLIENT_STATE_METHODS = ("FedSA-LoRA", "LoRA-A2", "FLASC", "FSLoRA", "HAFL", "Quantized", "Top-k", "DP-FedAvg")
"""The methods with client state whose state lives on the SuperNode, ``client_start`` on the client (module docstring).

A method belongs here when its ``client_start``, ``local_training``, ``client_upload``, ``personal_model`` and
``serving`` read nothing but the server's global adapter and head, the server's scalars (scaling, rank, seed,
round), the strategy's constructor settings and the client's own state and data: not the server's method
state, nor what ``prepare`` computed (read in their code, and checked equal to the simulator by
``tests/test_flower_every_method.py``). Two only with some settings (:func:`state_placement`): HAFL with its
``"freezing"`` scheme (its ``"truncation"`` hands out the components the server ranks, from its method
state), DP-FedAvg when the method it wraps qualifies. Every other method with client state runs with its
state kept by the server."""

STATE_PLACEMENTS = ("none", "supernode", "server")
"""Where a client's state lives on Flower (:func:`state_placement`): it has none, on its SuperNode, or on the server."""


def keeps_client_state(strategy: Strategy) -> bool:
    """Whether ``strategy``'s clients keep state between rounds (its ``ClientState`` is not ``NoState``)."""
    return type(strategy.new_client_state()) is not NoState


def state_placement(strategy: Strategy) -> str:
    """Where ``strategy``'s client state lives on Flower, one of :data:`STATE_PLACEMENTS` (module docstring)."""
    if not keeps_client_state(strategy):
        return "none"
    if strategy.name not in CLIENT_STATE_METHODS:
        return "server"
    if strategy.name == "DP-FedAvg":  # it adds only the round's start to the state of the method it wraps
        return "supernode" if state_placement(strategy.inner) in ("none", "supernode") else "server"
    if strategy.name == "HAFL" and strategy.scheme != "freezing":
        return "server"
    return "supernode"


def check_supported(strategy: Strategy, evaluate_clients: bool = False) -> None:
    """Refuse what the ServerApp cannot run, naming the method and why: every registered method runs, but a
    split-learning one (:func:`~fedlora_edu.registry.own_loop`) has no client evaluation."""
    loop = own_loop(strategy)
    if loop is not None and evaluate_clients:
        raise ValueError(
            f"strategy {strategy.name} is split learning: on Flower it plays {loop}'s steps as messages "
            f"(fedlora_edu.flower.split.serve_split), which, like run_split, has no client evaluation; "
            f"run it with evaluate_clients=False")


# ----- a client's state, kept in its Flower context ---------------------------------------------------

STATE_KEY = "fedlora.client_state"
"""The name of the ConfigRecord in ``Context.state`` holding the layout of the client's state (its tensors: the
ArrayRecord ``STATE_KEY + ".tensors"``)."""


def federation_references(federation: Federation) -> dict[str, Any]:
    """What every Flower process holds of its own, by name: a state that points at these is sent as the name.

    The federation a process loaded (its clients' data, test sets, pre-trained model): the
    simulator's hooks may keep a reference to it (FedDPA's strategy keeps the clients' data, FedBiOT's
    client state points at the server's state, which points at the federation), and on Flower each
    process puts its own in place (:func:`~fedlora_edu.flower.records.decode_value`).
    """
    named = {"federation": federation, "federation.clients": federation.clients,
             "federation.client_tests": federation.client_tests, "federation.test": federation.test,
             "federation.base_model": federation.base_model}
    return {name: value for name, value in named.items() if value is not None}


def _ids(references: dict[str, Any]) -> dict[int, str]:
    return {id(value): name for name, value in references.items()}


def save_client_state(client_state: Any, records: RecordDict, references: dict[str, Any] | None = None) -> None:
    """Store a strategy's client state in ``records`` (a Flower context's ``state``), bit for bit.

    Any value :func:`~fedlora_edu.flower.records.encode_value` carries (numbers, strings, tensors,
    containers of them, the package's dataclasses, modules); anything else raises a TypeError that
    names where it sits (``ClientState.field[key]``) and leaves ``records`` as it was.
    ``references``: :func:`federation_references`.
    """
    tensors, layout = encode_value(client_state, type(client_state).__name__, _ids(references or {}))
    records[f"{STATE_KEY}.tensors"] = tensors_to_record(tensors)
    records[STATE_KEY] = ConfigRecord({"layout": layout})


def load_client_state(strategy: Strategy, records: RecordDict, references: dict[str, Any] | None = None) -> Any:
    """The client state :func:`save_client_state` stored in ``records``, or a fresh one if none is there."""
    if STATE_KEY not in records:
        return strategy.new_client_state()
    client_state = decode_value(record_to_tensors(records[f"{STATE_KEY}.tensors"]),
                                str(records[STATE_KEY]["layout"]), references)
    expected = type(strategy.new_client_state())
    if type(client_state) is not expected:
        raise TypeError(f"the stored client state is a {type(client_state).__name__}, {strategy.name} keeps a "
                        f"{expected.__name__}")
    return client_state


def state_records(value: Any, name: str, references: dict[str, Any]) -> tuple[ArrayRecord, str]:
    """``value`` (a client state, a strategy's attributes) as an ArrayRecord and its JSON layout, for a message."""
    tensors, layout = encode_value(value, name, _ids(references))
    return tensors_to_record(tensors), layout


def state_bytes(record: ArrayRecord, layout: str) -> int:
    """What a state costs on the wire as we count it: its arrays' bytes and its layout's UTF-8 bytes."""
    return record.count_bytes() + len(layout.encode())


# ----- server -----------------------------------------------------------------------------------------


def train_message_content(start: ClientStart, base_weights: dict[str, Tensor], client_id: int,
                          round_index: int, server: ServerState | None = None,
                          carried: dict[str, tuple[ArrayRecord, str]] | None = None) -> RecordDict:
    """What client k receives for one round: its start, the changed W', which factors train.

    With ``server`` (a method whose state lives on the SuperNode) the client computes its start
    itself: ``start`` is then the server's global adapter and head, and the header carries the
    server's scalars. ``carried`` (a method whose state the server keeps) holds the client's state
    and the strategy's attributes, each an ArrayRecord and its layout (:func:`state_records`).
    """
    header = {"client_id": client_id, "round": round_index, "trainable": sorted(start.trainable),
              "start_on_client": server is not None, "state_from_server": carried is not None}
    if server is not None:
        header.update({"scaling": float(server.scaling), "rank": int(server.rank), "seed": int(server.seed)})
    content = RecordDict({
        "adapters": tensors_to_record(factors_to_tensors(start.adapters)),
        "head": tensors_to_record(start.head),
        "base": tensors_to_record(base_weights),
        "round": ConfigRecord(header),
    })
    _attach(content, carried)
    return content


def _attach(content: RecordDict, carried: dict[str, tuple[ArrayRecord, str]] | None) -> None:
    """Put each carried state (``"state"``, ``"strategy"``) in ``content``: its arrays, its layout in ``"layouts"``."""
    if carried:
        for name, (record, _) in carried.items():
            content[name] = record
        content["layouts"] = ConfigRecord({name: layout for name, (_, layout) in carried.items()})


def _carried_bytes(carried: dict[str, tuple[ArrayRecord, str]] | None) -> int:
    return sum(state_bytes(record, layout) for record, layout in (carried or {}).values())


def _received(content: RecordDict, name: str, references: dict[str, Any]) -> Any:
    """The state :func:`_attach` put in ``content`` under ``name``, decoded."""
    return decode_value(record_to_tensors(content[name]), str(content["layouts"][name]), references)


def strategy_attributes(strategy: Strategy) -> dict[str, Any]:
    """The strategy object's own attributes: what its client hooks may read besides their arguments.

    In the simulator those hooks run on the very object the server set up (``init_server``,
    ``prepare``: FedDPA's phase-1 settings, FedLEASE's seed, FedRA's client count); a method whose
    state the server keeps sends them with each start, so the client's strategy is the server's.
    """
    return dict(vars(strategy))


def serve(grid: Grid, federation: Federation, strategy: Strategy, settings: RunSettings) -> pd.DataFrame:
    """Play ``settings.rounds`` rounds of ``strategy`` through ``grid``; one history row per round.

    The same steps, in the same order, as :meth:`Federation.run` with ``engine="sequential"``,
    except that local training happens on the SuperNodes (:func:`client_step`). With the same
    federation and seed the history is the simulator's to float tolerance. A split-learning method
    runs in :func:`fedlora_edu.flower.split.serve_split` instead (the ServerApp picks it).
    """
    if own_loop(strategy) is not None:
        raise ValueError(f"strategy {strategy.name} is split learning: serve plays Federation.run's round, "
                         f"fedlora_edu.flower.split.serve_split plays {own_loop(strategy)}'s steps")
    if settings.evaluate_clients and federation.client_tests is None:
        raise ValueError("evaluate_clients needs a federation built with client_tests")
    num_clients = federation.num_clients
    seed = settings.seed
    nodes = discover_clients(grid, num_clients, settings.connect_timeout)
    model = federation.fresh_model(strategy.max_rank(num_clients), seed=seed)
    server = ServerState(
        adapters=adapter_io.get_lora_factors(model),
        head=adapter_io.get_head_state(model),
        scaling=adapter_io.lora_scaling(model),
        rank=adapter_io.model_rank(model),
        seed=seed,
        method_state=strategy.new_state(),
    )
    strategy.init_server(server, seed)
    strategy.prepare(federation, model, server, seed)
    changed = set(server.base_deltas)  # the layers whose W' differs from the pre-trained one: sent each round
    adapter_io.add_to_base_weights(model, server.base_deltas)
    server.base_deltas = {}
    placement = state_placement(strategy)
    on_client = placement == "supernode"  # then client_start runs on the SuperNodes, with their state
    mirrored = placement == "server"  # then the server keeps every client's state and sends it with the start
    references = federation_references(federation)
    client_states = {} if on_client else {k: strategy.new_client_state() for k in range(num_clients)}
    rng = np.random.default_rng(seed)
    rows, kept = [], []
    for t in range(settings.rounds):
        round_started = time.perf_counter()
        server.round = t
        sampled = strategy.sample_clients(t, num_clients, settings.clients_per_round, rng)
        base = {name: adapter_io.base_weight(model, name) for name in sorted(changed)}
        starts: dict[int, ClientStart] = {}
        messages: dict[int, Message] = {}
        dropped: dict[int, str] = {}
        bytes_down = flower_down = state_down = state_up = 0
        estimated_down: dict[int, int] = {}
        attributes = state_records(strategy_attributes(strategy), type(strategy).__name__, references) \
            if mirrored else None
        for k in sampled:
            carried = None
            if on_client:
                # The client computes its start from its own state; what the server knows is its global model.
                # A client that never replies is counted with the download a fresh client state would get.
                start = ClientStart({n: (a.clone(), b.clone()) for n, (a, b) in server.adapters.items()},
                                    {key: v.clone() for key, v in server.head.items()}, Payload(),
                                    strategy.trainable(t))
                estimated_down[k] = strategy.client_start(server, k, strategy.new_client_state(), t).download.nbytes
            elif mirrored:
                # client_start works on a copy: a client that does not answer keeps the state it had.
                working = _received(_carry_content(state_records(client_states[k], "client_state", references)),
                                    "state", references)
                start = strategy.client_start(server, k, working, t)
                bytes_down += start.download.nbytes
                carried = {"state": state_records(working, f"client {k}'s state", references),
                           "strategy": attributes}
            else:
                start = strategy.client_start(server, k, client_states[k], t)
                bytes_down += start.download.nbytes
            starts[k] = start
            if k not in nodes:
                dropped[k] = "no SuperNode holds this client"
                continue
            content = train_message_content(start, base, k, t, server if on_client else None, carried)
            flower_down += array_bytes(content)
            state_down += _carried_bytes(carried)
            messages[k] = Message(content, dst_node_id=nodes[k], message_type=MessageType.TRAIN)
        replies = exchange(grid, messages, timeout=settings.round_timeout)
        results: list[LocalResult] = []
        trained_from: list[dict[str, tuple[Tensor, Tensor]]] = []
        uploads: list[Upload] = []
        bytes_up = flower_up = excluded = 0
        names = list(server.adapters)
        for k in sampled:  # in the sampled order, as the simulator sums
            reply = replies.get(k)
            if on_client and (reply is None or reply.has_error()):
                bytes_down += estimated_down[k]
            if k in dropped:
                continue
            if reply is None:
                dropped[k] = f"no reply within {settings.round_timeout:g} s"
                continue
            if reply.has_error():
                dropped[k] = f"error reply: {reply.error.reason}"
                continue
            flower_up += array_bytes(reply.content)
            meta = reply.content["upload"]
            if on_client:
                bytes_down += int(meta["download_nbytes"])
                starts[k] = ClientStart(tensors_to_factors(record_to_tensors(reply.content["started"]), names),
                                        {}, Payload())
            if mirrored:  # the client's state after its round, as the simulator's hooks left it
                client_states[k] = _received(reply.content, "state", references)
                state_up += state_bytes(reply.content["state"], str(reply.content["layouts"]["state"]))
            payload = Payload(record_to_tensors(reply.content["payload"]), nbytes=int(meta["nbytes"]))
            bytes_up += payload.nbytes
            loss, rank_k = float(meta["train_loss"]), int(meta["rank"])
            if not all_finite(payload) or not math.isfinite(loss):
                warnings.warn(f"round {t + 1}: client {k}'s update holds NaN or Inf; left out of the round",
                              RuntimeWarning, stacklevel=2)
                excluded += 1
                dropped[k] = "update holds NaN or Inf"
                continue
            trained = tensors_to_factors(record_to_tensors(reply.content["trained"]), names)
            results.append(LocalResult(k, trained, {}, int(meta["num_examples"]), loss, rank_k))
            trained_from.append({n: (a[:rank_k], b[:, :rank_k]) for n, (a, b) in starts[k].adapters.items()})
            uploads.append(Upload(k, int(meta["num_examples"]), payload, rank_k))
        weights = [u.num_examples / sum(v.num_examples for v in uploads) for u in uploads]
        measured_discordance = layer_discordance(results, weights, server.scaling)
        measured_update = update_size(trained_from, results, weights, server.scaling)
        server.base_deltas = {}
        started = time.perf_counter()
        if uploads:
            strategy.aggregate(server, uploads, t)
        server_seconds = time.perf_counter() - started
        error = aggregation_error(results, weights, server)
        adapter_io.add_to_base_weights(model, server.base_deltas)
        changed |= set(server.base_deltas)
        accuracy = test_loss = math.nan
        if settings.evaluate:
            adapter_io.set_lora_factors(model, server.adapters)
            adapter_io.set_head_state(model, server.head)
            accuracy, test_loss = evaluate(model, federation.test, device=federation.device)
        client_accuracy = math.nan
        if settings.evaluate_clients:
            client_accuracy, carried_down = _evaluate_on_clients(
                grid, nodes, strategy, server, client_states,
                {name: adapter_io.base_weight(model, name) for name in sorted(changed)}, t, settings, num_clients,
                references)
            state_down += carried_down
        rows.append({
            "round": t + 1, "method": strategy.name, "accuracy": accuracy, "test_loss": test_loss,
            "train_loss": float(np.mean([r.train_loss for r in results])) if results else math.nan,
            "client_accuracy": client_accuracy, "bytes_up": bytes_up, "bytes_down": bytes_down,
            "discordance": measured_discordance, "update_size": measured_update, "aggregation_error": error,
            "server_seconds": server_seconds, "clients": len(sampled), "excluded": excluded, "engine": "flower",
            "clients_per_pass": 1, "flower_bytes_down": flower_down, "flower_bytes_up": flower_up,
            "dropped": dropped, "round_seconds": time.perf_counter() - round_started,
            "flower_state_bytes_down": state_down, "flower_state_bytes_up": state_up,
        })
        if settings.aggregates:
            kept.append({"adapters": {n: (a.clone(), b.clone()) for n, (a, b) in server.adapters.items()},
                         "head": {k: v.clone() for k, v in server.head.items()},
                         "base": {n: adapter_io.base_weight(model, n).detach().clone() for n in sorted(changed)}})
    if settings.aggregates:
        torch.save(kept, settings.aggregates)
    return pd.DataFrame(rows, columns=FLOWER_COLUMNS)


def _carry_content(state: tuple[ArrayRecord, str]) -> RecordDict:
    content = RecordDict()
    _attach(content, {"state": state})
    return content


def evaluate_on_clients(grid: Grid, nodes: dict[int, int], strategy: Strategy, server: ServerState,
                        client_states: dict, base_weights: dict[str, Tensor], round_index: int, settings: RunSettings,
                        num_clients: int, references: dict[str, Any] | None = None) -> float:
    """Every client scores its served model on its own held-out data; the mean, as the simulator's ``client_accuracy``.

    For a method without client state, or whose state the server keeps, the server computes each
    client's ``personal_model`` (it holds everything it needs) and sends it (with the client's
    state and the strategy's attributes, for ``serving``, when the server keeps the state); for
    one whose state lives on the SuperNode it sends its global model and the client assembles its
    own (:func:`client_evaluation`). NaN if any client has no SuperNode or does not answer within
    the round's timeout: a mean over fewer clients would be another quantity. ``references``:
    :func:`federation_references` (needed when the server keeps the clients' state).
    """
    return _evaluate_on_clients(grid, nodes, strategy, server, client_states, base_weights, round_index, settings,
                                num_clients, references or {})[0]


def _evaluate_on_clients(grid: Grid, nodes: dict[int, int], strategy: Strategy, server: ServerState,
                         client_states: dict, base_weights: dict[str, Tensor], round_index: int,
                         settings: RunSettings, num_clients: int, references: dict[str, Any]) -> tuple[float, int]:
    """:func:`evaluate_on_clients`, and the bytes of the client states and strategy attributes it sent."""
    placement = state_placement(strategy)
    on_client = placement == "supernode"
    if any(k not in nodes for k in range(num_clients)):
        return math.nan, 0
    attributes = state_records(strategy_attributes(strategy), type(strategy).__name__, references) \
        if placement == "server" else None
    # serving, run on the client, may read the server's method state (FedMoE: its global router): sent with it
    method_state = state_records(server.method_state, "server.method_state", references) \
        if attributes is not None and type(strategy).serving is not Strategy.serving else None
    messages, carried_bytes = {}, 0
    for k in range(num_clients):
        adapters, head = server.adapters, server.head
        if not on_client:
            personal = strategy.personal_model(server, k, client_states[k])
            if personal is not None:
                adapters, head = personal
        content = RecordDict({
            "adapters": tensors_to_record(factors_to_tensors(adapters)),
            "head": tensors_to_record(head),
            "base": tensors_to_record(base_weights),
            "round": ConfigRecord({"client_id": k, "round": round_index, "personal_on_client": on_client,
                                   "state_from_server": attributes is not None,
                                   "scaling": float(server.scaling), "rank": int(server.rank),
                                   "seed": int(server.seed)}),
        })
        if attributes is not None:
            carried = {"state": state_records(client_states[k], f"client {k}'s state", references),
                       "strategy": attributes}
            if method_state is not None:
                carried["method_state"] = method_state
            _attach(content, carried)
            carried_bytes += _carried_bytes(carried)
        messages[k] = Message(content, dst_node_id=nodes[k], message_type=MessageType.EVALUATE)
    replies = exchange(grid, messages, timeout=settings.round_timeout)
    scores = []
    for k in range(num_clients):  # in client order, as the simulator averages
        reply = replies.get(k)
        if reply is None or reply.has_error():
            return math.nan, carried_bytes
        scores.append(float(reply.content["evaluation"]["accuracy"]))
    return float(np.mean(scores)), carried_bytes


def read_aggregates(path: str | Path) -> list[dict]:
    """What the server held after each round (``RunSettings.aggregates``): ``adapters``, ``head``, changed ``base``."""
    return torch.load(path, weights_only=True)


def write_json(path: str | Path, value: object) -> None:
    """Write ``value`` as JSON, whole or not at all (a reader polling for the file never sees half of it)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def read_history(path: str | Path) -> pd.DataFrame:
    """The history a Flower run's server wrote (``RunSettings.output``), ``dropped`` keyed by client id again."""
    rows = json.loads(Path(path).read_text())["history"]
    for row in rows:
        row["dropped"] = {int(k): reason for k, reason in row["dropped"].items()}
    # A split run's rows have their own columns (fedlora_edu.flower.split.SPLIT_FLOWER_COLUMNS), in order.
    return pd.DataFrame(rows, columns=list(rows[0]) if rows else FLOWER_COLUMNS)


def error_path(output: str | Path) -> Path:
    """Where the server writes its traceback when the run fails (next to ``output``)."""
    output = Path(output)
    return output.with_name(output.name + ".error")


server_app = ServerApp()
"""The Flower ServerApp of every method: ``flwr run`` loads it as ``fedlora_edu.flower.apps:server_app``."""


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    try:
        strategy = settings.strategy()
        check_supported(strategy, settings.evaluate_clients)
        if own_loop(strategy) is not None:
            history = serve_split(grid, load_federation(settings.federation), strategy, settings)
        else:
            history = serve(grid, load_federation(settings.federation), strategy, settings)
        write_json(settings.output, {"history": history.to_dict(orient="records")})
    except BaseException:
        error_path(settings.output).write_text(traceback.format_exc())
        raise


# ----- client -----------------------------------------------------------------------------------------


class _Received:
    """A strategy as :meth:`Federation.train_sequential` sees it on a client: the start the server sent.

    ``train_sequential`` asks its strategy for the client's start and for the context to train in;
    on a SuperNode the start comes from the message, the context from the method.
    """

    def __init__(self, strategy: Strategy, start: ClientStart) -> None:
        self.strategy = strategy
        self.start = start

    def client_start(self, server, client_id, client_state, round_index) -> ClientStart:
        return self.start

    def local_training(self, model, start, client_state, round_index):
        return self.strategy.local_training(model, start, client_state, round_index)


def client_step(federation: Federation, strategy: Strategy, content: RecordDict, client_id: int,
                settings: RunSettings, fault: str = "", client_state: Any = None) -> RecordDict:
    """Client ``client_id``'s part of a round: train from the received start, reply with the upload.

    The model is the server's (same rank, same seed) with the received W'; training is the
    simulator's sequential path on this client's data with the simulator's batch seed, so the
    result equals the simulator's client to float tolerance. ``fault`` (:data:`FAULTS`) makes the
    client misbehave on purpose.

    ``client_state`` is this client's state (a method with client state: the caller loads it
    from the Flower context and stores it again afterwards; this function updates it in place,
    as the simulator's hooks do). When the message says so (``start_on_client``), the client
    computes its start itself: ``strategy.client_start`` on a view of the server rebuilt from the
    message (global adapter, head, scaling, rank, seed, round; no method state) and its own state.
    When it says ``state_from_server`` (a method whose state the server keeps), the message carries
    the client's state and the server's strategy attributes: ``strategy`` takes those attributes
    (it is changed in place), the client trains with that state, and the reply carries the state
    back (``client_state`` is then ignored).
    """
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    if fault == "crash":
        raise RuntimeError(f"client {client_id} crashes on purpose (fault='crash')")
    if fault == "silent":
        time.sleep(10 * settings.round_timeout)  # never answers within the round
    header = content["round"]
    if int(header["client_id"]) != client_id:
        raise ValueError(f"a message for client {header['client_id']} reached the SuperNode of client {client_id}")
    round_index = int(header["round"])
    from_server = bool(header.get("state_from_server", False))
    if from_server:
        references = federation_references(federation)
        vars(strategy).update(_received(content, "strategy", references))
        client_state = _received(content, "state", references)
    model = federation.fresh_model(strategy.max_rank(federation.num_clients), seed=settings.seed)
    with torch.no_grad():
        for name, weight in record_to_tensors(content["base"]).items():
            adapter_io.base_weight(model, name).copy_(weight)
    layers = list(adapter_io.lora_layers(model))
    received = ClientStart(tensors_to_factors(record_to_tensors(content["adapters"]), layers),
                           record_to_tensors(content["head"]), Payload(), frozenset(header["trainable"]))
    if client_state is None:
        client_state = strategy.new_client_state()
    if bool(header.get("start_on_client", False)):
        view = ServerState(adapters=received.adapters, head=received.head, scaling=float(header["scaling"]),
                           rank=int(header["rank"]), round=round_index, seed=int(header["seed"]))
        start = strategy.client_start(view, client_id, client_state, round_index)
    else:
        start = received
    [(_, _, result)] = federation.train_sequential(
        model, _Received(strategy, start), None, {client_id: client_state}, [client_id], round_index,
        seed=settings.seed, steps=settings.local_steps, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate)
    payload = strategy.client_upload(result, client_state, round_index)
    tensors = payload.tensors
    if fault == "nan":
        tensors = {name: torch.full_like(tensor, math.nan) for name, tensor in tensors.items()}
    rank = int(result.rank)
    reply = RecordDict({
        "payload": tensors_to_record(tensors),
        "trained": tensors_to_record(factors_to_tensors(result.adapters)),
        "started": tensors_to_record(factors_to_tensors({n: (a[:rank], b[:, :rank])
                                                         for n, (a, b) in start.adapters.items()}))
        if start is not received else ArrayRecord(),
        "upload": ConfigRecord({"nbytes": int(payload.nbytes), "num_examples": int(result.num_examples),
                                "train_loss": float(result.train_loss), "rank": rank,
                                "download_nbytes": int(start.download.nbytes)}),
    })
    if from_server:
        _attach(reply, {"state": state_records(client_state, f"client {client_id}'s state", references)})
    return reply


def client_evaluation(federation: Federation, strategy: Strategy, content: RecordDict, client_id: int,
                      settings: RunSettings, client_state: Any = None) -> RecordDict:
    """Client ``client_id`` scores the model it is served on its own held-out data (``federation.client_tests``).

    The model is built as in :func:`client_step` (the server's rank and seed, the received W') with
    the received adapter and head; when the message says so (``personal_on_client``), the client
    replaces them with the strategy's ``personal_model`` of its own state, as the simulator does,
    and evaluates inside the strategy's ``serving`` context. Nothing of the state changes. When it
    says ``state_from_server``, the message carries the client's state and the strategy's attributes
    (as in :func:`client_step`), and for a method with its own ``serving`` the server's method state,
    which ``serving`` then sees.
    """
    header = content["round"]
    if int(header["client_id"]) != client_id:
        raise ValueError(f"a message for client {header['client_id']} reached the SuperNode of client {client_id}")
    if federation.client_tests is None:
        raise ValueError("client evaluation needs a federation built with client_tests")
    method_state = None
    if bool(header.get("state_from_server", False)):
        references = federation_references(federation)
        vars(strategy).update(_received(content, "strategy", references))
        client_state = _received(content, "state", references)
        if "method_state" in content:
            method_state = _received(content, "method_state", references)
    model = federation.fresh_model(strategy.max_rank(federation.num_clients), seed=settings.seed)
    with torch.no_grad():
        for name, weight in record_to_tensors(content["base"]).items():
            adapter_io.base_weight(model, name).copy_(weight)
    adapters = tensors_to_factors(record_to_tensors(content["adapters"]), list(adapter_io.lora_layers(model)))
    head = record_to_tensors(content["head"])
    view = ServerState(adapters=adapters, head=head, scaling=float(header["scaling"]), rank=int(header["rank"]),
                       round=int(header["round"]), seed=int(header["seed"]), method_state=method_state)
    if client_state is None:
        client_state = strategy.new_client_state()
    if bool(header["personal_on_client"]):
        personal = strategy.personal_model(view, client_id, client_state)
        if personal is not None:
            adapters, head = personal
    adapter_io.set_lora_factors(model, adapters)
    adapter_io.set_head_state(model, head)
    data = federation.client_tests[client_id]
    with strategy.serving(model, view, client_id, client_state):
        accuracy, loss = evaluate(model, data, device=federation.device)
    return RecordDict({"evaluation": ConfigRecord({"accuracy": float(accuracy), "loss": float(loss),
                                                   "num_examples": len(data)})})


client_app = ClientApp()
"""The Flower ClientApp of every method: ``flwr run`` loads it as ``fedlora_edu.flower.apps:client_app``.

A SuperNode says which client of the federation it is with ``--node-config 'partition-id=<k>'``
(and, to play a failure, ``fault="nan"``, ``"crash"`` or ``"silent"``).
"""


@client_app.query()
def _client_identify(message: Message, context: Context) -> Message:
    return Message(RecordDict({"node": ConfigRecord({"partition_id": int(context.node_config["partition-id"])})}),
                   reply_to=message)


@client_app.train()
def _client_train(message: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(dict(context.run_config))
    strategy = settings.strategy()
    federation = load_federation(settings.federation)
    references = federation_references(federation)
    on_node = state_placement(strategy) == "supernode"
    client_state = load_client_state(strategy, context.state, references) if on_node else None
    content = client_step(federation, strategy, message.content, int(context.node_config["partition-id"]), settings,
                          fault=str(context.node_config.get("fault", "")), client_state=client_state)
    if on_node:  # kept by the SuperNode for the next round of this run (module docstring)
        save_client_state(client_state, context.state, references)
    return Message(content, reply_to=message)


@client_app.evaluate()
def _client_evaluate(message: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(dict(context.run_config))
    strategy = settings.strategy()
    federation = load_federation(settings.federation)
    client_state = load_client_state(strategy, context.state, federation_references(federation)) \
        if state_placement(strategy) == "supernode" else None
    content = client_evaluation(federation, strategy, message.content, int(context.node_config["partition-id"]),
                                settings, client_state=client_state)
    return Message(content, reply_to=message)


def _split_step(action: str):
    """The ClientApp's function for a split-learning ``train.<action>`` message (:mod:`fedlora_edu.flower.split`)."""

    def handle(message: Message, context: Context) -> Message:
        settings = RunSettings.from_run_config(dict(context.run_config))
        content = CLIENT_HANDLERS[action](load_federation(settings.federation), settings.strategy(), message.content,
                                          int(context.node_config["partition-id"]), settings, context.state)
        return Message(content, reply_to=message)

    handle.__name__ = f"_client_{action}"
    return handle


SPLIT_ACTIONS = tuple(CLIENT_HANDLERS)
"""The ``train.<action>`` messages of a split-learning run (:mod:`fedlora_edu.flower.split`)."""

for _action in SPLIT_ACTIONS:
    client_app.train(_action)(_split_step(_action))


# ----- the Flower App directory -----------------------------------------------------------------------


def write_app(directory: str | Path, settings: RunSettings) -> Path:
    """Write the Flower App ``flwr run`` submits: a ``pyproject.toml`` naming this module's apps and the settings.

    The app holds no code of its own (every process imports ``fedlora_edu``, installed with the
    ``flower`` extra); its run config is ``settings``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedlora-flower", "version": "1.0.0", "license": "MIT",
                    "description": "A fedlora_edu strategy on Flower (written by fedlora_edu.flower.apps.write_app)",
                    "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedlora-edu",
            "components": {"serverapp": "fedlora_edu.flower.apps:server_app",
                           "clientapp": "fedlora_edu.flower.apps:client_app"},
            "config": asdict(settings),
        }}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    return directory
