"""Every method of the simulator's round, through Flower's messages in one process, equals the simulator.

No SuperLink and no SuperNode processes (tests/test_flower_deployment.py starts them, for a few
methods): an in-process :class:`~flwr.serverapp.Grid` hands each message of the ServerApp's
:func:`~fedlora_edu.flower.apps.serve` to the real ClientApp (:data:`~fedlora_edu.flower.apps.client_app`),
serialised to Flower's wire format and back both ways, with one Flower :class:`~flwr.app.Context` per
client, serialised too between messages, as a SuperNode keeps it. What is exercised is what a
deployment adds to the simulator's round: serialisation, the ClientApp rebuilding its strategy for
every message, and where each method's client state lives (on the SuperNode, or kept by the server
and carried with the start). Two rounds on the smallest federation (two clients, one local step),
seed 1 (a setting left at its default 0 by a missing ``prepare`` would show); the clients of a
method that serves them their own model also score it on their own held-out data. The history
(accuracies, losses, bytes, discordance, update size, aggregation error) and the server's aggregate
after each round must equal :meth:`Federation.run` with the sequential engine. Skipped only when
Flower (the ``flower`` extra) is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")

from flower_equality import close  # noqa: E402
from helpers import TINY, tiny_federation  # noqa: E402

from fedlora_edu.core.adapters import base_weight  # noqa: E402
from fedlora_edu.core.strategy import Strategy  # noqa: E402
from fedlora_edu.flower.apps import (  # noqa: E402
    RunSettings,
    save_federation,
    serve,
    state_placement,
)
from fedlora_edu.flower.inprocess import InProcessGrid, flower_identity  # noqa: E402
from fedlora_edu.registry import METHODS, make_strategy, own_loop  # noqa: E402
from fedlora_edu.simulation.federation import Federation  # noqa: E402

ROUNDS = 2
SEED = 1
OPTIONS = {"pFedLoRA": {"rank": 4}, "FedLFC": {"groups": ["x", "y"]},
           "FedHLT": {"paths": [["root", "G", "en"], ["root", "G", "de"]]},
           "FedBiOT": {"distill_steps": 1, "public_examples": 8}}
"""What a method needs to run on this federation (its registered defaults assume another; as the methods' own
tests), and FedBiOT's alignment cut to one step: the emulator's quality is not what is tested here."""
PROFILE = TINY.with_overrides(num_clients=2, clients_per_round=2, local_steps=1, max_length=8, train_examples=32,
                              test_examples=8)
"""Smaller than the tests' tiny federation: two clients, both sampled, one local step, 8 tokens, 40 texts in all.

What is tested is the adapter, not learning; CI runs this file for every method."""


ACCEPTED = [name for name in METHODS if own_loop(make_strategy(name)) is None]
"""Every method that plays the simulator's round (split learning's are tests/test_flower_split.py's)."""


def personalised(name: str) -> bool:
    """Whether a client is served something other than the global model (its own ``personal_model`` or ``serving``)."""
    strategy = type(make_strategy(name))
    return strategy.personal_model is not Strategy.personal_model or strategy.serving is not Strategy.serving


@pytest.fixture(autouse=True)
def identity():
    with flower_identity():
        yield


@pytest.fixture(scope="module")
def federation_file(tmp_path_factory):
    federation = tiny_federation(profile=PROFILE)
    path = tmp_path_factory.mktemp("flower") / "federation.pt"
    save_federation(federation, path)
    return federation, path


def simulated(federation, method, evaluate_clients):
    """The simulator's history, and the server's adapter and head after each round's aggregation."""
    strategy = make_strategy(method, **OPTIONS.get(method, {}))
    after: list[dict] = []
    aggregate = strategy.aggregate

    def recorded(server, uploads, round_index):
        aggregate(server, uploads, round_index)
        after.append({"adapters": {n: (a.clone(), b.clone()) for n, (a, b) in server.adapters.items()},
                      "head": {k: v.clone() for k, v in server.head.items()}})

    strategy.aggregate = recorded
    history = federation.run(strategy, rounds=ROUNDS, seed=SEED, engine="sequential", progress=False,
                             evaluate_clients=evaluate_clients)
    return history, after, federation.last_model


@pytest.mark.parametrize("method", ACCEPTED)
def test_every_method_through_flower_messages_equals_the_simulator(federation_file, tmp_path, method):
    federation, path = federation_file
    settings = RunSettings.for_federation(
        federation, method, federation_file=path, output=tmp_path / "history.json",
        aggregates=tmp_path / "aggregates.pt", rounds=ROUNDS, seed=SEED, round_timeout=60, connect_timeout=5,
        evaluate_clients=personalised(method), method_options=OPTIONS.get(method))
    grid = InProcessGrid(settings, federation.num_clients)
    history = serve(grid, federation, settings.strategy(), settings)
    held = torch.load(settings.aggregates, weights_only=True)
    reference, after, model = simulated(federation, method, settings.evaluate_clients)
    placement = state_placement(make_strategy(method))
    # A query to each SuperNode, then each round a train message and, if clients score their model, an evaluate one.
    assert grid.delivered == federation.num_clients * (1 + (1 + settings.evaluate_clients) * ROUNDS)
    assert len(history) == ROUNDS
    for t in range(ROUNDS):
        row, expected = history.iloc[t], reference.iloc[t]
        for name, (a, b) in after[t]["adapters"].items():
            got_a, got_b = held[t]["adapters"][name]
            assert close(got_a, a) and close(got_b, b), (method, t, name)
        for key, value in after[t]["head"].items():
            assert close(held[t]["head"][key], value), (method, t, key)
        for column in ("accuracy", "client_accuracy", "test_loss", "train_loss"):
            if column == "client_accuracy" and not settings.evaluate_clients:
                assert math.isnan(row[column]) and math.isnan(expected[column]), (method, t)
                continue
            assert math.isfinite(row[column]), (method, t, column)
            assert math.isclose(row[column], expected[column], rel_tol=1e-5), (method, t, column)
        assert (row["bytes_up"], row["bytes_down"]) == (expected["bytes_up"], expected["bytes_down"]), (method, t)
        for column in ("discordance", "update_size", "aggregation_error"):
            assert math.isclose(row[column], expected[column], rel_tol=1e-4, abs_tol=1e-9), (method, t, column)
        assert (row["clients"], row["excluded"], row["dropped"]) == (expected["clients"], 0, {}), (method, t)
        # Flower carried at least what the method counts; but FedBiOT counts its compressed model in its first
        # download, most of which (the embeddings, the kept blocks' weights) every Flower process loads itself.
        assert row["flower_bytes_up"] >= row["bytes_up"], (method, t)
        assert row["flower_bytes_down"] >= row["bytes_down"] or method == "FedBiOT", (method, t)
        # State crosses the network only where the server keeps it for the client, and is counted apart.
        carried = (row["flower_state_bytes_down"], row["flower_state_bytes_up"])
        if placement == "server":
            assert min(carried) > 0, (method, t, carried)
        else:
            assert carried == (0, 0), (method, t, carried)
    # W' as the method left it (FLoRA's merges, FedEx-LoRA's residual...), after the last round.
    for name, weight in held[-1]["base"].items():
        assert close(weight, base_weight(model, name)), (method, name)


def test_a_client_that_crashes_leaves_the_state_the_server_keeps_for_the_others_intact(federation_file, tmp_path):
    """FLoRA (its client state kept by the server): client 1's ClientApp raises every round.

    The rounds complete with client 0 alone and say who dropped; what the server holds after each
    round is what the simulator holds with client 0 alone (its state, returned and stored in round
    1, drives its round-2 start); only client 0's state comes back.
    """
    federation, path = federation_file
    settings = RunSettings.for_federation(
        federation, "FLoRA", federation_file=path, output=tmp_path / "history.json",
        aggregates=tmp_path / "aggregates.pt", rounds=ROUNDS, seed=SEED, round_timeout=60, connect_timeout=5)
    history = serve(InProcessGrid(settings, federation.num_clients, faults={1: "crash"}), federation,
                    settings.strategy(), settings)
    held = torch.load(settings.aggregates, weights_only=True)
    alone = Federation(federation.base_model, federation.clients[:1], federation.test, profile=federation.profile)
    reference, after, model = simulated(alone, "FLoRA", evaluate_clients=False)
    for t in range(ROUNDS):
        row = history.iloc[t]
        assert list(row["dropped"]) == [1] and "crashes on purpose" in row["dropped"][1], row["dropped"]
        for name, (a, b) in after[t]["adapters"].items():
            assert close(held[t]["adapters"][name][0], a) and close(held[t]["adapters"][name][1], b), (t, name)
        assert math.isclose(row["accuracy"], reference.iloc[t]["accuracy"], rel_tol=1e-5), t
        assert row["bytes_up"] == reference.iloc[t]["bytes_up"], t
        assert 0 < row["flower_state_bytes_up"] < row["flower_state_bytes_down"], t  # sent to both, back from one
    for name, weight in held[-1]["base"].items():
        assert close(weight, base_weight(model, name)), name
