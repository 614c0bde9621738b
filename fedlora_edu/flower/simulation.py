"""Flower's simulation engine: the same ServerApp and ClientApp, with Ray actors as virtual SuperNodes.

:class:`~fedlora_edu.flower.localhost.LocalDeployment` runs a federation as separate processes (a
SuperLink, one SuperNode per client, a fresh ``ClientApp`` process for every message). Flower's
*simulation engine* runs the same apps in one Python process and a small Ray cluster on this
machine: the ``ServerApp`` (:data:`~fedlora_edu.flower.apps.server_app`) plays its rounds in a thread
of the calling process, against an in-memory SuperLink; each client is a *virtual SuperNode*, an
entry (its node id, ``partition-id=k``, its :class:`~flwr.app.Context`) kept by that process; and
a pool of Ray actors, long-lived worker processes, runs the ``ClientApp``
(:data:`~fedlora_edu.flower.apps.client_app`, unchanged) for whichever node a message is addressed
to. An actor is not a client: it handles a message of client 0, then one of client 2, and the
node's context (where a method with client state keeps it, such as FedSA-LoRA's personal B)
travels to the actor with the message and back with the reply, so it survives between rounds as it
does on a SuperNode. Nothing is sent over a network, but every message and reply is serialized
between processes, so the history equals the simulator's as the deployment's does.

:func:`simulate` does what Flower's own ``flwr-simulation`` process does once a SuperLink has
handed it a run (``flwr.simulation.app.run_simulation_process``): it calls Flower's
``_run_simulation`` with the Flower App's directory, whose run config carries the
:class:`~fedlora_edu.flower.messaging.RunSettings`. That function is private to Flower (its public
``run_simulation`` cannot pass a run config, which both apps read their settings from), so this
module is tied to the pinned ``flwr`` version (``constraints.txt``); skipping the SuperLink saves
starting it and ``flwr run``.

Resources. Every virtual SuperNode runs on the CPU (``num_gpus=0``): Ray starts with
``cpus`` CPUs (default: as many as there are clients, at most the machine's) and each
``ClientApp`` call asks for one, so ``cpus`` actors train in parallel; on a 2-core machine, two.
``backend_config`` overrides any of Flower's ``init_args`` (Ray's ``ray.init`` arguments),
``client_resources`` and ``actor`` settings.

Clean-up. Ray is started for the run only (``address="local"``: a new local instance, never an
existing cluster), before Flower starts the ``ServerApp``'s thread (a start that misses Ray's
deadline on a loaded machine is tried once more), and shut down afterwards, whatever happens.
Every process Ray starts carries an environment variable with a token of the run (as a
deployment's processes do, :data:`~fedlora_edu.flower.localhost.MARKER`; the calling process holds
it only while ``ray.init`` runs), and those still alive after ``ray.shutdown()`` are ended (SIGTERM,
then SIGKILL until none is left). If Flower's runtime fails while the
``ServerApp`` thread runs, that thread is stopped too (it would otherwise wait out its timeouts and
could write a history later). Ray's session files and the Flower App live in a temporary directory
removed at the end, and the calling process's environment is restored.

Taught in ``book/flower/real_federation.ipynb``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.simulation.run_simulation import _run_simulation  # Flower's own simulation process calls it so
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType
from tqdm.auto import tqdm

from fedlora_edu.flower.apps import (
    RunSettings,
    check_supported,
    client_app,
    error_path,
    load_federation,
    read_history,
    server_app,
    write_app,
)
from fedlora_edu.flower.localhost import MARKER, describe_process, end_marked
from fedlora_edu.flower.split import split_messages
from fedlora_edu.registry import own_loop

INSTALL_LINE = "pip install fedlora-edu[flower]"

BACKEND_KEYS = ("init_args", "client_resources", "actor")
"""The sections of Flower's backend config (``flwr.simulation.run_simulation``'s ``backend_config``)."""


def ray_available() -> bool:
    """Whether Ray, which Flower's simulation engine runs on, is installed."""
    return importlib.util.find_spec("ray") is not None


def require_ray() -> None:
    """Raise an ImportError naming the install line if Ray is missing."""
    if not ray_available():
        raise ImportError("Flower's simulation engine needs Ray (Flower's `simulation` extra), which the `flower` "
                          f"extra brings: {INSTALL_LINE}")


def backend_settings(num_supernodes: int, cpus: int | None = None,
                     backend_config: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Flower's backend config for a CPU-only run: Ray with ``cpus`` CPUs, one CPU and no GPU per ClientApp call.

    ``cpus`` defaults to ``num_supernodes``, at most the machine's CPU count. ``backend_config``
    overrides single keys of each section (``init_args``, ``client_resources``, ``actor``).
    """
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ValueError(f"num_supernodes must be a positive int, got {num_supernodes!r}")
    if cpus is None:
        cpus = max(1, min(num_supernodes, os.cpu_count() or 1))
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ValueError(f"cpus must be a positive int, got {cpus!r}")
    config: dict[str, dict[str, Any]] = {
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "address": "local", "include_dashboard": False,
                      "logging_level": "WARNING", "log_to_driver": False,
                      "object_store_memory": 256 * 2**20},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "actor": {"tensorflow": 0},
    }
    for section, values in (backend_config or {}).items():
        if section not in BACKEND_KEYS:
            raise ValueError(f"backend_config has an unknown section {section!r}; the sections are {BACKEND_KEYS}")
        if not isinstance(values, dict):
            raise ValueError(f"backend_config[{section!r}] must be a dict, got {type(values).__name__}")
        config[section].update(values)
    if config["client_resources"].get("num_cpus", 0) > config["init_args"].get("num_cpus", cpus):
        raise ValueError(f"backend_config asks {config['client_resources']['num_cpus']} CPUs per client but Ray "
                         f"gets {config['init_args']['num_cpus']}: no actor would fit")
    return config


@dataclass
class _CountingMetrics:
    """Flower's simulation metrics (the ClientApps' run time), also counting the messages they handled."""

    clientapp_runtime: float = 0.0
    handled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_clientapp_runtime(self, runtime: float) -> None:
        with self._lock:
            self.clientapp_runtime += runtime
            self.handled += 1


def expected_messages(settings: RunSettings, num_supernodes: int, num_clients: int) -> int:
    """How many messages the ServerApp sends the ClientApps in a healthy run (for the progress bar).

    One query per SuperNode (which client it holds), one train message per sampled client and
    round, and, with ``evaluate_clients``, one evaluate message per client and round; for a
    split-learning method, its step messages (:func:`~fedlora_edu.flower.split.split_messages`).
    """
    strategy = settings.strategy()
    if own_loop(strategy) is not None:
        return num_supernodes + split_messages(strategy, settings, num_clients)
    per_round = min(settings.clients_per_round, num_clients)
    if settings.evaluate_clients:
        per_round += num_clients
    return num_supernodes + settings.rounds * per_round


def simulate(settings: RunSettings, num_supernodes: int | None = None, *, cpus: int | None = None,
             backend_config: dict[str, dict[str, Any]] | None = None, progress: bool = True) -> pd.DataFrame:
    """Run ``settings`` on Flower's simulation engine; the history the ServerApp wrote (:func:`~.apps.read_history`).

    One virtual SuperNode per client (``num_supernodes`` defaults to the federation's client count;
    SuperNode k holds client k); the ``ServerApp`` and ``ClientApp`` are the ones
    :class:`~fedlora_edu.flower.localhost.LocalDeployment` runs, so the history has the same
    columns and, with the same federation and seed, the simulator's numbers. ``cpus`` and
    ``backend_config``: see the module docstring. ``progress`` shows a bar of the ClientApp
    messages handled. The federation (``settings.federation``) must be on the CPU.

    Raises an ImportError naming the install line if Ray is missing, a ValueError for a bad
    argument (naming it), and the ServerApp's own exception if it fails; Ray and every process it
    started are stopped in every case. Files an earlier run left at ``settings.output`` and
    ``settings.aggregates`` are removed first, so what is read afterwards is this run's.
    """
    require_ray()
    import ray

    if not isinstance(settings, RunSettings):
        raise ValueError(f"settings must be a RunSettings, got {type(settings).__name__}")
    if not Path(settings.federation).is_file():
        raise ValueError(f"settings.federation names no file: {settings.federation} (write it with save_federation)")
    federation = load_federation(settings.federation)
    if federation.device.type != "cpu":
        raise ValueError(f"the federation is on {federation.device}; the simulation engine runs its clients on the "
                         "CPU: set federation.device = torch.device('cpu') before save_federation")
    num_clients = federation.num_clients
    del federation
    if num_supernodes is None:
        num_supernodes = num_clients
    config = backend_settings(num_supernodes, cpus, backend_config)
    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process; simulate starts and stops its own local Ray "
                           "instance: call ray.shutdown() first")
    check_supported(settings.strategy(), settings.evaluate_clients)  # a method it cannot run fails before Ray starts

    # What an earlier run left at the run's paths goes first: a history read afterwards is this run's.
    for stale in (settings.output, error_path(settings.output), settings.aggregates):
        if stale and Path(stale).is_file():
            Path(stale).unlink()
    # Short, under /tmp where there is one: Ray's socket paths inside must stay under the OS's limit (about 107
    # characters), which a long TMPDIR (macOS's) would break.
    work = Path(tempfile.mkdtemp(prefix="fedlora-sim-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token = uuid.uuid4().hex
    saved_environment = dict(os.environ)
    saved_identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    threads_before = set(threading.enumerate())
    metrics = _CountingMetrics()
    stop_bar = threading.Event()
    bar_thread = None
    try:
        app = write_app(work / "app", settings)
        config["init_args"].setdefault("_temp_dir", str(work / "ray"))
        # Every process Ray starts inherits these: the token (for the clean-up), no usage statistics sent
        # anywhere, and this process's thread count (which fixes the order of float sums, as in a deployment).
        os.environ[MARKER] = token
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
        os.environ.pop("RAY_ADDRESS", None)
        # Ray starts here, before Flower starts the ServerApp's thread: Flower would start it only after that
        # thread, which it cannot stop if Ray then fails. Flower's backend finds it running and uses it.
        _start_ray(ray, config["init_args"], token)
        # From here on only Ray's processes (and the workers its raylet starts, from the raylet's environment)
        # carry the token: a short-lived process this process starts later (a library calling a command-line
        # tool) would otherwise be taken for one of the simulation's and killed, or counted as left behind.
        del os.environ[MARKER]
        run_config = get_fused_config_from_dir(app, {})
        run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "big"))
        run.primary_task_id = int.from_bytes(os.urandom(7), "big")
        run.federation_id = NOOP_FEDERATION_ID
        # Who sends the ServerApp's messages (the SuperLink's node), as Flower's own simulation sets it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        if progress:
            bar_thread = threading.Thread(target=_show_progress, daemon=True, args=(
                metrics, expected_messages(settings, num_supernodes, num_clients), settings.method, stop_bar))
            bar_thread.start()
        _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        client_app=client_app, server_app=server_app, backend_name="ray", backend_config=config,
                        server_app_context=context, app_dir=str(app), run=run, is_app=True,
                        metrics=metrics)  # type: ignore[arg-type]
        if not Path(settings.output).is_file():
            failed = error_path(settings.output)
            raise RuntimeError("the simulation ended without a history"
                               + (f"; the ServerApp failed:\n{failed.read_text()}" if failed.is_file() else ""))
        return read_history(settings.output)
    finally:
        stop_bar.set()
        if bar_thread is not None:
            bar_thread.join(timeout=5)
        # A ServerApp thread still running means Flower's runtime failed under it: it would go on waiting for
        # replies (up to its timeouts) and could write a history of dropped clients later. Stop it.
        for thread in set(threading.enumerate()) - threads_before:
            if "server_th" in thread.name and thread.is_alive():
                _interrupt(thread)
        if ray.is_initialized():
            ray.shutdown()
        left = end_marked(token)
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved_identity
        os.environ.clear()
        os.environ.update(saved_environment)
        shutil.rmtree(work, ignore_errors=True)
        if left and sys.exc_info()[0] is None:
            raise RuntimeError("processes of the simulation still running after SIGKILL: "
                               + "; ".join(describe_process(pid) for pid in left))


class SimulationStopped(Exception):
    """Raised inside a ServerApp thread that outlived a failed simulation, to end it."""


def _interrupt(thread: threading.Thread, timeout: float = 30.0) -> None:
    """Raise :class:`SimulationStopped` in ``thread`` (at its next Python instruction) and wait for it to end."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SimulationStopped))
    thread.join(timeout)


def _start_ray(ray: Any, init_args: dict[str, Any], token: str, attempts: int = 2) -> None:
    """``ray.init`` as Flower's backend calls it (the ClientApps see this process's ``sys.path``), tried twice.

    On a loaded machine Ray's raylet may miss its startup deadline (30 s, fixed in Ray); the
    processes of a failed start are ended before the next try.
    """
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                # Ray's notice that a future version will stop hiding GPUs from an actor with num_gpus=0:
                # this version hides them, which is what a CPU-only run wants.
                warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
                ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as error:
            if ray.is_initialized():
                ray.shutdown()
            end_marked(token)
            if attempt == attempts:
                raise RuntimeError(f"Ray did not start ({attempts} tries): {error}") from error


def _show_progress(metrics: _CountingMetrics, total: int, method: str, stop: threading.Event) -> None:
    with tqdm(total=total, desc=f"{method} [flower simulation]", unit="msg", leave=False) as bar:
        while not stop.wait(0.2):
            if metrics.handled > bar.n:
                bar.update(metrics.handled - bar.n)
        if metrics.handled > bar.n:
            bar.update(metrics.handled - bar.n)
