"""Same seed, same federation, same numbers: two methods on Flower's deployment engine against the simulator.

A SuperLink and three SuperNodes run on localhost as separate processes, over TLS with certificates
made for the run (see fedlora_edu.flower.localhost; the failure tests run ``insecure=True``), each
run is submitted with ``flwr run``, and every round's global adapter, head, frozen weight W',
accuracy, losses and bytes must equal :meth:`Federation.run` (the sequential engine, the one a
client's training reuses) on the same tiny federation. FedIT changes only the adapter; FedSA-LoRA
keeps a personal B on every client, which lives in the SuperNode's context between rounds: its
round-2 aggregate equals the simulator's only if each client started round 2 from its own B, and
its run also has every client score its personal model (the global A, its own B) on its held-out
data in its ClientApp, which must give the simulator's ``client_accuracy``. Every other method the
adapter runs (FedEx-LoRA, which changes W', among them) is checked equal to the simulator through
Flower's messages in one process, in tests/test_flower_every_method.py, and on Flower's simulation
engine in tests/test_flower_simulation.py; across processes a round costs tens of seconds here.
Skipped only when Flower (the ``flower`` extra) is not installed.
"""

from __future__ import annotations

import math
import socket
import ssl

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")

from helpers import tiny_federation  # noqa: E402

from fedlora_edu.core.adapters import base_weight  # noqa: E402
from fedlora_edu.flower.apps import RunSettings, read_aggregates, save_federation  # noqa: E402
from fedlora_edu.flower.localhost import LocalDeployment, marked_processes  # noqa: E402
from fedlora_edu.registry import make_strategy  # noqa: E402

ROUNDS = 2
METHODS = ("FedIT", "FedSA-LoRA")
EVALUATE_CLIENTS = {"FedSA-LoRA"}
"""The runs whose clients also score their served model on their own held-out data (a round trip more)."""


@pytest.fixture(scope="module")
def federation():
    return tiny_federation()


@pytest.fixture(scope="module")
def deployment(federation, tmp_path_factory):
    """One SuperLink and one SuperNode per client for the module's runs (TLS), stopped whatever happens."""
    directory = tmp_path_factory.mktemp("flower")
    save_federation(federation, directory / "federation.pt")
    local = LocalDeployment(directory / "deployment", federation.num_clients)
    certificates = None
    try:
        local.start()
        certificates = local.certificates
        yield local
    finally:
        left = local.stop()
        assert left == [], f"processes of the deployment still running after stop: {left}"
        assert certificates is None or not certificates.ca.parent.exists(), "the run's certificates were left"


def flower_run(deployment, federation, method):
    directory = deployment.directory.parent
    settings = RunSettings.for_federation(
        federation, method, federation_file=directory / "federation.pt", output=directory / f"{method}.json",
        aggregates=directory / f"{method}.pt", rounds=ROUNDS, seed=0, round_timeout=300, connect_timeout=120,
        evaluate_clients=method in EVALUATE_CLIENTS)
    try:
        history = deployment.run(settings, timeout=600)
    except Exception as error:
        raise AssertionError(f"the Flower run of {method} failed: {error}\n{deployment.logs()}") from error
    return history, read_aggregates(settings.aggregates)


def simulated(federation, method, rounds):
    history = federation.run(make_strategy(method), rounds=rounds, seed=0, engine="sequential", progress=False,
                             evaluate_clients=method in EVALUATE_CLIENTS)
    return history, federation.last_server, federation.last_model


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b.to(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_flower_deployment_equals_the_simulator_round_by_round(deployment, federation, method):
    history, aggregates = flower_run(deployment, federation, method)
    print(f"{method} on Flower: round seconds {history['round_seconds'].round(1).tolist()}")
    assert len(history) == ROUNDS and len(aggregates) == ROUNDS
    for t in range(ROUNDS):
        reference, server, model = simulated(federation, method, rounds=t + 1)
        row, expected = history.iloc[t], reference.iloc[t]
        held = aggregates[t]
        # The aggregate: the global adapter, the head and every W' the method changed.
        for name, (a, b) in server.adapters.items():
            assert close(held["adapters"][name][0], a) and close(held["adapters"][name][1], b), (method, t, name)
        for key, value in server.head.items():
            assert close(held["head"][key], value), (method, t, key)
        if method == "FedSA-LoRA":  # B is personal: the server's stays the initial one (zero)
            assert all(not held["adapters"][name][1].any() for name in held["adapters"]), (method, t)
        for name, weight in held["base"].items():
            assert close(weight, base_weight(model, name)), (method, t, name)
        # What the round measured.
        assert row["accuracy"] == expected["accuracy"], (method, t)
        if method in EVALUATE_CLIENTS:  # each client's own model on its own held-out data, scored in its ClientApp
            assert math.isfinite(row["client_accuracy"]), (method, t)
            assert row["client_accuracy"] == expected["client_accuracy"], (method, t)
        else:
            assert math.isnan(row["client_accuracy"]) and math.isnan(expected["client_accuracy"]), (method, t)
        assert math.isclose(row["test_loss"], expected["test_loss"], rel_tol=1e-5), (method, t)
        assert math.isclose(row["train_loss"], expected["train_loss"], rel_tol=1e-5), (method, t)
        assert (row["bytes_up"], row["bytes_down"]) == (expected["bytes_up"], expected["bytes_down"]), (method, t)
        for column in ("discordance", "update_size", "aggregation_error"):
            assert math.isclose(row[column], expected[column], rel_tol=1e-4, abs_tol=1e-9), (method, t, column)
        assert (row["clients"], row["excluded"], row["dropped"]) == (3, 0, {}), (method, t)
        # Flower carried at least what the strategy counts (plus W' and the trained factors for the measurements).
        assert row["flower_bytes_down"] >= row["bytes_down"] and row["flower_bytes_up"] >= row["bytes_up"]


def test_the_superlink_speaks_tls_with_the_runs_certificate_only(deployment):
    """A client that trusts the run's CA completes the handshake for 127.0.0.1; one that does not is refused."""
    assert not deployment.insecure and deployment.certificates is not None
    address = ("127.0.0.1", deployment.superlink_port)
    trusting = ssl.create_default_context(cafile=str(deployment.certificates.ca))
    with socket.create_connection(address, timeout=10) as raw, \
            trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]
    stranger = ssl.create_default_context()  # the system's authorities only
    with socket.create_connection(address, timeout=10) as raw, pytest.raises(ssl.SSLCertVerificationError):
        stranger.wrap_socket(raw, server_hostname="127.0.0.1")


def test_stopping_leaves_no_process(federation, tmp_path):
    """A deployment that is stopped, or whose start fails half-way, leaves none of its processes."""
    local = LocalDeployment(tmp_path / "deployment", federation.num_clients)
    with local:
        assert len(marked_processes(local.token)) >= 1 + federation.num_clients
    assert marked_processes(local.token) == []
