"""What every Flower run of the package shares: its settings, its federation file, the server's message exchange.

:class:`RunSettings` travels in the run config to the ServerApp and every ClientApp;
:func:`save_federation` and :func:`load_federation` give every process the same federation; and
:func:`exchange`, :func:`discover_clients` and :func:`array_bytes` are how a ServerApp talks to
the SuperNodes through Flower's :class:`~flwr.serverapp.Grid`. Both ways of playing a run use them:
the simulator's round (:mod:`fedlora_edu.flower.apps`) and split learning's steps
(:mod:`fedlora_edu.flower.split`); :mod:`fedlora_edu.flower.apps` re-exports them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora_edu.core.strategy import Strategy
from fedlora_edu.registry import make_strategy
from fedlora_edu.simulation.federation import Federation


@dataclass(frozen=True)
class RunSettings:
    """Everything a Flower run needs to know, carried in its run config (the same on server and clients).

    ``federation`` is the file :func:`save_federation` wrote; ``output`` the file the server writes
    the history to (:func:`~fedlora_edu.flower.apps.read_history`); ``method_options`` the JSON of ``make_strategy``'s
    keyword arguments. ``round_timeout`` (seconds) is how long the server waits for a round's
    replies before it goes on without the missing clients; ``connect_timeout`` how long it waits
    for the SuperNodes to connect. ``aggregates``, if set, is a file where the server saves what it
    held after each round (global adapter, head, changed W'; :func:`~fedlora_edu.flower.apps.read_aggregates`), for a
    round-by-round comparison. ``evaluate_clients`` has every client score its served model on its
    own held-out data after each round (``client_accuracy``, as ``Federation.run(evaluate_clients=True)``).
    """

    method: str
    federation: str
    output: str
    rounds: int
    clients_per_round: int
    local_steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    method_options: str = "{}"
    evaluate: bool = True
    round_timeout: float = 120.0
    connect_timeout: float = 120.0
    aggregates: str = ""
    evaluate_clients: bool = False

    @classmethod
    def for_federation(cls, federation: Federation, method: str, *, federation_file: str | Path,
                       output: str | Path, rounds: int | None = None, clients_per_round: int | None = None,
                       local_steps: int | None = None, batch_size: int | None = None,
                       learning_rate: float | None = None, seed: int = 0, method_options: dict | None = None,
                       evaluate: bool = True, round_timeout: float = 120.0,
                       connect_timeout: float = 120.0, aggregates: str | Path = "",
                       evaluate_clients: bool = False) -> RunSettings:
        """Settings with unset values taken from the federation's profile, as :meth:`Federation.run` takes them.

        Paths are made absolute: Flower's processes run in other folders.
        """
        p = federation.profile
        return cls(
            method=method, federation=str(Path(federation_file).resolve()), output=str(Path(output).resolve()),
            rounds=p.rounds if rounds is None else rounds,
            clients_per_round=min(p.clients_per_round, federation.num_clients) if clients_per_round is None
            else clients_per_round,
            local_steps=p.local_steps if local_steps is None else local_steps,
            batch_size=p.batch_size if batch_size is None else batch_size,
            learning_rate=float(p.learning_rate if learning_rate is None else learning_rate),
            seed=seed, method_options=json.dumps(method_options or {}), evaluate=evaluate,
            round_timeout=float(round_timeout), connect_timeout=float(connect_timeout),
            aggregates=str(Path(aggregates).resolve()) if aggregates else "",
            evaluate_clients=bool(evaluate_clients),
        )

    @classmethod
    def from_run_config(cls, config: dict) -> RunSettings:
        """The settings of a Flower run config (``Context.run_config``); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    def strategy(self) -> Strategy:
        """The registered method these settings name, built with their options."""
        return make_strategy(self.method, **json.loads(self.method_options))


def save_federation(federation: Federation, path: str | Path) -> Path:
    """Write ``federation`` (model, clients' data, test set) to one file every Flower process loads."""
    path = Path(path)
    torch.save(federation, path)
    return path


def load_federation(path: str | Path) -> Federation:
    """The federation :func:`save_federation` wrote (a file of this run, so unpickling it is trusted).

    Memory-mapped: a ClientApp process, started afresh for every message, reads only what it uses.
    """
    return torch.load(path, weights_only=False, mmap=True)



def exchange(grid: Grid, messages: dict[int, Message], timeout: float, poll: float = 0.5) -> dict[int, Message]:
    """Send ``messages`` (by a key of the caller's: a client id) and return the replies that came within ``timeout``.

    A reply is matched to its message by ``reply_to_message_id``, not by its sender: an error reply
    the SuperLink writes for a node it lost comes from the SuperLink itself.
    """
    keys = list(messages)
    ids = list(grid.push_messages([messages[key] for key in keys]))
    key_of = {message_id: key for message_id, key in zip(ids, keys, strict=True)}
    pending, replies = set(key_of), {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            answered = reply.metadata.reply_to_message_id
            if answered in pending:
                replies[key_of[answered]] = reply
                pending.discard(answered)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def discover_clients(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Client id -> Flower node id: wait for the SuperNodes, then ask each which client it holds.

    A SuperNode says its client in its node config (``partition-id``); a node that does not reply
    within ``timeout`` is left out (its client then drops out of every round it is sampled in).
    """
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < num_clients and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    questions = {node: Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids}
    replies = exchange(grid, questions, timeout=max(1.0, deadline - time.monotonic()))
    return {int(reply.content["node"]["partition_id"]): node for node, reply in replies.items() if reply.has_content()}


def array_bytes(content: RecordDict) -> int:
    """The bytes of every array in a message's content (what Flower serialises of the tensors)."""
    return sum(record.count_bytes() for record in content.array_records.values())


