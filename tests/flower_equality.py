"""A Flower run's history and aggregates against the simulator's, round by round (for the Flower engines' tests).

The checks the deployment and simulation-engine tests share: every round's global adapter, head and
changed frozen weight W' within float tolerance, the same accuracy, losses, bytes and diagnostics,
and no client dropped.
"""

from __future__ import annotations

import math

import torch

from fedlora_edu.core.adapters import base_weight
from fedlora_edu.registry import make_strategy


def simulated(federation, method: str, rounds: int, evaluate_clients: bool = False):
    """``rounds`` rounds of ``method`` in the simulator (sequential engine): history, final server, final model."""
    history = federation.run(make_strategy(method), rounds=rounds, seed=0, engine="sequential", progress=False,
                             evaluate_clients=evaluate_clients)
    return history, federation.last_server, federation.last_model


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and equal within float tolerance (a tensor that crossed Flower against the simulator's)."""
    return a.shape == b.shape and torch.allclose(a, b.to(a), rtol=1e-5, atol=1e-6)


def assert_equals_simulator(history, aggregates, federation, method: str, rounds: int,
                            evaluate_clients: bool = False) -> None:
    """Fail, naming the method, round and quantity, where the Flower run differs from the simulator."""
    assert len(history) == rounds and len(aggregates) == rounds, (method, len(history), len(aggregates))
    for t in range(rounds):
        reference, server, model = simulated(federation, method, t + 1, evaluate_clients)
        row, expected, held = history.iloc[t], reference.iloc[t], aggregates[t]
        for name, (a, b) in server.adapters.items():
            assert close(held["adapters"][name][0], a) and close(held["adapters"][name][1], b), (method, t, name)
        for key, value in server.head.items():
            assert close(held["head"][key], value), (method, t, key)
        for name, weight in held["base"].items():
            assert close(weight, base_weight(model, name)), (method, t, name)
        assert row["accuracy"] == expected["accuracy"], (method, t)
        if evaluate_clients:
            assert math.isfinite(row["client_accuracy"]), (method, t)
            assert row["client_accuracy"] == expected["client_accuracy"], (method, t)
        else:
            assert math.isnan(row["client_accuracy"]) and math.isnan(expected["client_accuracy"]), (method, t)
        assert math.isclose(row["test_loss"], expected["test_loss"], rel_tol=1e-5), (method, t)
        assert math.isclose(row["train_loss"], expected["train_loss"], rel_tol=1e-5), (method, t)
        assert (row["bytes_up"], row["bytes_down"]) == (expected["bytes_up"], expected["bytes_down"]), (method, t)
        for column in ("discordance", "update_size", "aggregation_error"):
            assert math.isclose(row[column], expected[column], rel_tol=1e-4, abs_tol=1e-9), (method, t, column)
        assert (row["clients"], row["excluded"], row["dropped"]) == (expected["clients"], 0, {}), (method, t)
        assert row["engine"] == "flower", (method, t)
        assert row["flower_bytes_down"] >= row["bytes_down"] and row["flower_bytes_up"] >= row["bytes_up"]


SPLIT_COUNTS = ("bytes_up", "bytes_down", "cut_bytes_up", "cut_bytes_down", "adapter_bytes_up", "adapter_bytes_down",
                "cut_examples", "clients")
"""What a split run on Flower must count exactly as run_split does."""


def assert_equals_run_split(history, aggregates, federation, method: str, rounds: int, seed: int,
                            options: dict | None = None) -> None:
    """Fail, naming the method, round and quantity, where a split run on Flower differs from ``run_split``."""
    from fedlora_edu.efficiency.split import run_split

    assert len(history) == rounds and len(aggregates) == rounds, (method, len(history), len(aggregates))
    for t in range(rounds):
        reference = run_split(federation, make_strategy(method, **(options or {})), rounds=t + 1, seed=seed)
        server = run_split.last_server
        row, expected, held = history.iloc[t], reference.iloc[t], aggregates[t]
        for name, (a, b) in server.adapters.items():
            assert close(held["adapters"][name][0], a) and close(held["adapters"][name][1], b), (method, t, name)
        for key, value in server.head.items():
            assert close(held["head"][key], value), (method, t, key)
        assert row["accuracy"] == expected["accuracy"], (method, t)
        assert math.isclose(row["test_loss"], expected["test_loss"], rel_tol=1e-5), (method, t)
        assert math.isclose(row["train_loss"], expected["train_loss"], rel_tol=1e-5), (method, t)
        for column in SPLIT_COUNTS:
            assert row[column] == expected[column], (method, t, column)
        assert row["engine"] == "flower" and row["dropped"] == {}, (method, t)
