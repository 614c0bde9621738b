"""Flower's simulation engine (Ray actors as virtual SuperNodes) runs the deployment's apps to the simulator's numbers.

Each run is :func:`fedlora_edu.flower.simulation.simulate` on the tiny federation, two rounds, one
virtual SuperNode per client: FedIT (only the adapter changes) and FedSA-LoRA (a personal B kept in
each virtual SuperNode's context between rounds, which travels to whichever Ray actor handles the
node's message: the round-2 aggregate equals the simulator's only if each client started round 2
from its own B). A method that changes W' (FedEx-LoRA, FLoRA) crosses the same messages: that is
checked for every method in ``tests/test_flower_every_method.py``. Round by round the runs must
equal :meth:`Federation.run` (the sequential engine), as on the deployment engine
(``tests/test_flower_deployment.py``, which also checks client-side evaluation, the same ClientApp
code), and every run must leave no process behind and the calling process as it found it. Skipped
when Flower, or Ray (which its simulation engine needs), is not installed: both come with
``pip install fedlora-edu[flower]``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")

from flower_equality import assert_equals_run_split, assert_equals_simulator  # noqa: E402

from fedlora_edu.flower import simulation  # noqa: E402
from fedlora_edu.flower.apps import RunSettings, error_path, read_aggregates, save_federation  # noqa: E402
from fedlora_edu.flower.localhost import MARKER, kill_marked, marked_processes  # noqa: E402

needs_ray = pytest.mark.skipif(not simulation.ray_available(),
                               reason="Flower's simulation engine needs Ray: pip install fedlora-edu[flower]")

ROUNDS = 2
METHODS = ("FedIT", "FedSA-LoRA")


def started_here() -> set[int]:
    """The live (not zombie) processes, other than this one, started while this test runs (by it or its children).

    Every process inherits pytest's ``PYTEST_CURRENT_TEST`` (this test's id, the only one running in this
    process), which Ray's processes and workers keep: another test's processes, of another pytest worker
    running at the same time, do not count.
    """
    mark = f"PYTEST_CURRENT_TEST={os.environ['PYTEST_CURRENT_TEST']}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if state != "Z" and mark in environment:
            found.add(int(entry.name))
    return found


def test_started_here_sees_a_child_process():
    """The check the runs rely on finds a process this test started, and not once it has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in started_here()
    finally:
        child.kill()
        child.wait()
    assert child.pid not in started_here()


RESPAWNER = """
import subprocess, sys, time
while True:  # starts a new child every 20 ms, as a raylet starts workers, until it is killed
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.02)
"""


def test_kill_marked_ends_a_process_that_keeps_starting_others_and_spares_the_unmarked():
    """Every process carrying the token dies, children started while the first ones were killed too; others live."""
    token = uuid.uuid4().hex
    marked = subprocess.Popen([sys.executable, "-c", RESPAWNER], env={**os.environ, MARKER: token})
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while len(marked_processes(token)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(marked_processes(token)) >= 4, "the respawner did not start its children"
        assert kill_marked(token) == []
        assert marked_processes(token) == [] and marked.wait(timeout=5) == -signal.SIGKILL
        assert unmarked.poll() is None, "a process without the token was killed"
    finally:
        for process in (marked, unmarked):
            process.kill()
            process.wait()
        kill_marked(token)


@pytest.fixture(scope="module")
def federation_file(federation, tmp_path_factory):
    return save_federation(federation, tmp_path_factory.mktemp("simulation") / "federation.pt")


@needs_ray
@pytest.mark.parametrize("method", METHODS)
def test_the_simulation_engine_equals_the_simulator_round_by_round(federation, federation_file, method):
    import ray

    directory = federation_file.parent
    settings = RunSettings.for_federation(
        federation, method, federation_file=federation_file, output=directory / f"{method}.json",
        aggregates=directory / f"{method}.pt", rounds=ROUNDS, seed=0, round_timeout=300, connect_timeout=120)
    environment = dict(os.environ)
    history = simulation.simulate(settings, progress=False)
    assert started_here() == set(), "a process of the simulation outlived it"
    assert not ray.is_initialized() and dict(os.environ) == environment
    print(f"{method} on Flower's simulation engine: round seconds {history['round_seconds'].round(2).tolist()}")
    aggregates = read_aggregates(settings.aggregates)
    if method == "FedSA-LoRA":  # B is personal: the server's stays the initial one (zero)
        assert all(not b.any() for held in aggregates for _, b in held["adapters"].values())
    assert_equals_simulator(history, aggregates, federation, method, ROUNDS)


@needs_ray
def test_split_learning_on_the_simulation_engine_equals_run_split(federation, federation_file):
    """SplitLoRA across Ray's worker processes: its clients keep their side in the Context between messages."""
    directory = federation_file.parent
    settings = RunSettings.for_federation(
        federation, "SplitLoRA", federation_file=federation_file, output=directory / "SplitLoRA.json",
        aggregates=directory / "SplitLoRA.pt", rounds=ROUNDS, seed=0, round_timeout=300, connect_timeout=120)
    history = simulation.simulate(settings, progress=False)
    assert started_here() == set(), "a process of the simulation outlived it"
    print(f"SplitLoRA on Flower's simulation engine: {history['messages'].tolist()} messages, round seconds "
          f"{history['round_seconds'].round(2).tolist()}")
    assert_equals_run_split(history, read_aggregates(settings.aggregates), federation, "SplitLoRA", ROUNDS, seed=0)


def test_without_ray_simulate_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(simulation, "ray_available", lambda: False)
    settings = RunSettings("FedIT", str(tmp_path / "federation.pt"), str(tmp_path / "out.json"), 1, 1, 1, 1, 0.1)
    with pytest.raises(ImportError, match=r"pip install fedlora-edu\[flower\]"):
        simulation.simulate(settings)


@pytest.mark.parametrize(("arguments", "named"), [
    ({"num_supernodes": 0}, "num_supernodes"),
    ({"num_supernodes": 2.5}, "num_supernodes"),
    ({"num_supernodes": 3, "cpus": 0}, "cpus"),
    ({"num_supernodes": 3, "backend_config": {"resources": {}}}, "'resources'"),
    ({"num_supernodes": 3, "backend_config": {"init_args": 2}}, "init_args"),
    ({"num_supernodes": 3, "cpus": 1, "backend_config": {"client_resources": {"num_cpus": 2}}}, "CPUs per client"),
])
def test_a_bad_backend_setting_is_refused_by_name(arguments, named):
    with pytest.raises(ValueError, match=named):
        simulation.backend_settings(**arguments)


def test_the_default_backend_is_cpu_only_and_fits_the_machine():
    config = simulation.backend_settings(3)
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert config["init_args"]["num_gpus"] == 0 and config["init_args"]["address"] == "local"
    assert 1 <= config["init_args"]["num_cpus"] <= min(3, os.cpu_count() or 1)
    overridden = simulation.backend_settings(3, cpus=1, backend_config={"init_args": {"log_to_driver": True}})
    assert overridden["init_args"]["num_cpus"] == 1 and overridden["init_args"]["log_to_driver"] is True


@needs_ray
def test_a_bad_run_fails_before_ray_starts(federation_file, tmp_path):
    """A missing federation file and an unknown method are refused by name, and no Ray process is started."""
    missing = RunSettings("FedIT", str(tmp_path / "nowhere.pt"), str(tmp_path / "out.json"), 1, 1, 1, 1, 0.1)
    with pytest.raises(ValueError, match="settings.federation"):
        simulation.simulate(missing)
    unknown = RunSettings("No-Such-LoRA", str(federation_file), str(tmp_path / "out.json"), 1, 1, 1, 1, 0.1)
    with pytest.raises(ValueError, match="No-Such-LoRA"):
        simulation.simulate(unknown, progress=False)
    assert started_here() == set()


@needs_ray
def test_a_run_that_fails_under_way_leaves_nothing_running(federation, federation_file, tmp_path):
    """Flower's runtime fails after the ServerApp started (every client asks for a GPU that Ray does not have).

    The error reaches the caller; Ray, its processes and the ServerApp's thread are stopped, and no history is
    written (the ServerApp, stopped, records why next to it).
    """
    import ray

    settings = RunSettings.for_federation(federation, "FedIT", federation_file=federation_file,
                                          output=tmp_path / "history.json", rounds=1, connect_timeout=120)
    environment, threads = dict(os.environ), set(threading.enumerate())
    with pytest.raises(RuntimeError) as failure:
        simulation.simulate(settings, cpus=1, backend_config={"client_resources": {"num_gpus": 1.0}}, progress=False)
    causes, error = [], failure.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    assert any("ActorPool is empty" in cause for cause in causes), causes
    assert "SimulationStopped" in error_path(settings.output).read_text(), "the ServerApp thread was not stopped"
    assert started_here() == set(), "a process of the failed simulation outlived it"
    assert not ray.is_initialized() and dict(os.environ) == environment
    assert not [t.name for t in set(threading.enumerate()) - threads if t.is_alive()]
    assert not (tmp_path / "history.json").exists()
