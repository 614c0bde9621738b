"""Failures a real federation has, on Flower's deployment engine: the round completes with the others.

Five SuperNodes on localhost: client 0 is healthy, client 1 uploads NaN, client 2's ClientApp raises,
client 3 never answers, and client 4's SuperNode is killed (SIGKILL, with its ClientApp) once it has
received the round's message. The server must go on without them, record who dropped and why, and
hold exactly what client 0 alone would have given it: the simulator's federation of client 0 only
(same start, same batches) must end with the same global adapter, head and accuracy. Skipped only
when Flower (the ``flower`` extra) is not installed.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")
# Waits on the silent client's timeout and on process starts: run beside the others, see tasks.py.
pytestmark = pytest.mark.waits

from helpers import TINY, tiny_federation  # noqa: E402

from fedlora_edu.flower.apps import RunSettings, read_aggregates, save_federation  # noqa: E402
from fedlora_edu.flower.localhost import LocalDeployment, marked_processes  # noqa: E402
from fedlora_edu.registry import make_strategy  # noqa: E402
from fedlora_edu.simulation.federation import Federation  # noqa: E402

FAULTS = {1: "nan", 2: "crash", 3: "silent"}
KILLED = 4
ROUND_TIMEOUT = 90.0
"""How long the server waits for a round's replies: the silent and the killed client cost this much."""


def test_the_round_completes_without_the_clients_that_fail_and_says_who(tmp_path):
    federation = tiny_federation(profile=TINY.with_overrides(num_clients=5, clients_per_round=5))
    save_federation(federation, tmp_path / "federation.pt")
    settings = RunSettings.for_federation(
        federation, "FedIT", federation_file=tmp_path / "federation.pt", output=tmp_path / "history.json",
        aggregates=tmp_path / "aggregates.pt", rounds=1, seed=0, round_timeout=ROUND_TIMEOUT, connect_timeout=120)
    # insecure=True (plain HTTP on 127.0.0.1): the option stays tested; test_flower_deployment.py runs TLS.
    deployment = LocalDeployment(tmp_path / "deployment", federation.num_clients, faults=FAULTS, insecure=True)
    try:
        deployment.start()
        deployment.submit(settings)
        deadline = time.monotonic() + 300
        while deployment.received(KILLED, "train") == 0:
            assert time.monotonic() < deadline, f"client {KILLED} never received its round\n{deployment.logs()}"
            time.sleep(0.2)
        deployment.kill_client(KILLED)  # in the middle of its round
        history = deployment.wait(settings, timeout=600)
    finally:
        left = deployment.stop()
    assert left == [] and marked_processes(deployment.token) == []

    row = history.iloc[0]
    dropped = row["dropped"]
    print(f"dropped: {dropped}; round seconds {row['round_seconds']:.1f}")
    assert sorted(dropped) == [1, 2, 3, KILLED], dropped
    assert dropped[1] == "update holds NaN or Inf" and row["excluded"] == 1
    assert dropped[2].startswith("error reply") and "crashes on purpose" in dropped[2], dropped[2]
    assert dropped[3] == f"no reply within {ROUND_TIMEOUT:g} s"
    assert dropped[KILLED].startswith(("no reply", "error reply")), dropped[KILLED]

    # What the server holds is client 0's round, uncorrupted: the simulator with client 0 alone.
    alone = Federation(federation.base_model, federation.clients[:1], federation.test, profile=federation.profile)
    reference = alone.run(make_strategy("FedIT"), rounds=1, clients_per_round=1, seed=0, engine="sequential",
                          progress=False)
    held = read_aggregates(settings.aggregates)[0]
    for name, (a, b) in alone.last_server.adapters.items():
        assert torch.isfinite(held["adapters"][name][0]).all() and torch.isfinite(held["adapters"][name][1]).all()
        assert torch.allclose(held["adapters"][name][0], a, rtol=1e-5, atol=1e-6)
        assert torch.allclose(held["adapters"][name][1], b, rtol=1e-5, atol=1e-6)
    for key, value in alone.last_server.head.items():
        assert torch.allclose(held["head"][key], value, rtol=1e-5, atol=1e-6)
    assert row["accuracy"] == reference.iloc[0]["accuracy"]
    assert row["train_loss"] == pytest.approx(reference.iloc[0]["train_loss"], rel=1e-5)
    # Bytes: every sampled client was sent its start; uploads came from client 0 and the NaN client only.
    assert row["bytes_down"] == 5 * reference.iloc[0]["bytes_down"]
    assert row["bytes_up"] == 2 * reference.iloc[0]["bytes_up"]
