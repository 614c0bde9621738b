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

import socket
import ssl

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")
# The deployment starts a ClientApp process per message and waits on polls: `python3 tasks.py test` runs the
# tests marked so in a pytest run of their own beside the others (see tasks.py's unit_tests).
pytestmark = pytest.mark.waits

from flower_equality import assert_equals_simulator  # noqa: E402
from helpers import tiny_federation  # noqa: E402

from fedlora_edu.flower.apps import RunSettings, read_aggregates, save_federation  # noqa: E402
from fedlora_edu.flower.localhost import LocalDeployment, marked_processes  # noqa: E402

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


@pytest.mark.parametrize("method", METHODS)
def test_flower_deployment_equals_the_simulator_round_by_round(deployment, federation, method):
    history, aggregates = flower_run(deployment, federation, method)
    print(f"{method} on Flower: round seconds {history['round_seconds'].round(1).tolist()}")
    # The aggregate (global adapter, head, every W' the method changed) and what each round measured: the simulator's.
    assert_equals_simulator(history, aggregates, federation, method, ROUNDS, method in EVALUATE_CLIENTS)
    assert (history["clients"] == federation.num_clients).all(), method  # every SuperNode took part every round
    if method == "FedSA-LoRA":  # B is personal: the server's stays the initial one (zero)
        assert all(not b.any() for held in aggregates for _, b in held["adapters"].values()), method


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
