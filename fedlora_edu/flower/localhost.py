"""Flower's deployment engine on one machine: a SuperLink, one SuperNode per client, ``flwr run``.

What a real federation runs, on localhost: :class:`LocalDeployment` starts ``flower-superlink``
(the server side: it holds the runs and relays messages; it starts the ``ServerApp`` of a run in a
process of its own) and one ``flower-supernode`` per client (the client side: it pulls messages for
its node and runs the ``ClientApp`` in a fresh process for each), every one a separate operating
system process on ports chosen free at run time. :meth:`LocalDeployment.run` writes the Flower App
(:func:`~fedlora_edu.flower.apps.write_app`), submits it with ``flwr run`` and waits for the
history the server writes.

Connections use **TLS** by default: the deployment makes a certificate authority and a
certificate for 127.0.0.1 for the run (:func:`~fedlora_edu.flower.certificates.make_certificates`,
in a temporary directory removed when it stops), starts the SuperLink with them
(``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certfile``) and gives the SuperNodes and
``flwr`` the CA's certificate to check it against (``--root-certificates``, and
``root-certificates`` in Flower's configuration), as a federation across machines must. The
SuperNodes are not authenticated (any process that can reach the port may join; Flower's
``--enable-supernode-auth`` would add that). ``insecure=True`` runs plain HTTP instead
(``--insecure``), acceptable only because every process is on 127.0.0.1 of one machine.

Everything a deployment starts, and everything those processes start (Flower launches helper
processes detached from their parent's process group), carries one environment variable with a
token of this deployment; :meth:`LocalDeployment.stop` ends exactly the processes that carry it,
first politely (SIGTERM), then by force (SIGKILL), whatever happened before. Flower's own files
(``FLWR_HOME``: its configuration, installed apps) live in the deployment's directory, not in the
user's home.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import tomli_w
import torch

from fedlora_edu.flower.apps import FAULTS, RunSettings, error_path, read_history, write_app
from fedlora_edu.flower.certificates import Certificates, make_certificates

MARKER = "FEDLORA_FLOWER_DEPLOYMENT"
"""The environment variable every process of a :class:`LocalDeployment` carries (its token)."""

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Return once something accepts connections on ``port``; raise after ``timeout`` s or if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:g} s")


def marked_processes(token: str) -> list[int]:
    """The ids of this user's processes whose environment carries ``MARKER=token`` (Linux: reads /proc)."""
    wanted = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def kill_marked(token: str, patience: float = 20.0) -> list[int]:
    """SIGKILL every process carrying ``token`` until none is left or ``patience`` s pass; those still found.

    The processes are looked up again and killed again every 0.1 s: a process one of them started
    just before it died (a Ray worker its raylet was forking, say) carries the token too and would
    outlive a single pass; and on a loaded machine a killed process can take seconds to leave.
    """
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        left = marked_processes(token)
        if not left:  # none now, and none a moment later (one could have been starting)
            time.sleep(0.2)
            if not (left := marked_processes(token)):
                return []
        for pid in left:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
    return marked_processes(token)


def end_marked(token: str, grace: float = 5.0) -> list[int]:
    """End the processes that carry ``token``: SIGTERM, up to ``grace`` s to leave, then :func:`kill_marked`.

    Returns those still found afterwards.
    """
    for pid in marked_processes(token):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while marked_processes(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    return kill_marked(token)


def describe_process(pid: int) -> str:
    """``pid``, its state, parent and command line as /proc shows them (for an error message)."""
    try:
        status = dict(line.split(":\t", 1) for line in (Path("/proc") / str(pid) / "status").read_text().splitlines()
                      if ":\t" in line)
        command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (gone)"
    state, parent = status.get("State", "?").strip(), status.get("PPid", "?").strip()
    return f"{pid} (state {state}, parent {parent}: {command[:160]})"


class LocalDeployment:
    """A SuperLink and ``num_clients`` SuperNodes on localhost, in ``directory``; a context manager.

    SuperNode k holds client k (``--node-config partition-id=k``); ``faults[k]`` (one of
    :data:`~fedlora_edu.flower.apps.FAULTS`) makes it misbehave. Each process writes its output
    to ``<directory>/logs/<name>.log``; :meth:`logs` returns their ends for an error message.

    With ``insecure=False`` (default) every connection to the SuperLink uses TLS with certificates
    made for this deployment (``self.certificates`` while it runs); ``insecure=True`` runs plain
    HTTP (the module docstring says when that is acceptable).
    """

    def __init__(self, directory: str | Path, num_clients: int, *, faults: dict[int, str] | None = None,
                 start_timeout: float = 60.0, insecure: bool = False) -> None:
        faults = faults or {}
        unknown = {k: f for k, f in faults.items() if f not in FAULTS or not 0 <= k < num_clients}
        if unknown:
            raise ValueError(f"faults must map client ids 0..{num_clients - 1} to one of {FAULTS}; got {unknown}")
        self.directory = Path(directory)
        self.num_clients = num_clients
        self.faults = faults
        self.start_timeout = start_timeout
        self.insecure = bool(insecure)
        self.certificates: Certificates | None = None
        self._certificate_dir: Path | None = None
        self.token = uuid.uuid4().hex
        self.processes: dict[str, subprocess.Popen] = {}
        self.superlink_port: int | None = None
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            MARKER: self.token,
            "FLWR_HOME": str(self.directory / "flwr-home"),
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # Flower starts its helpers by name
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            # As many threads as this process uses: the thread count changes the order of float sums,
            # so with the simulator's count a client's training is the simulator's to the last bits
            # (with another, equal to about 1e-7 only).
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())),
            "PYTHONUNBUFFERED": "1",
        }

    def tool(self, name: str) -> str:
        """A Flower command of this Python environment."""
        return str(Path(sys.executable).parent / name)

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(cmd, env=self.env, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = process
        return process

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait until it listens, then start the SuperNodes and write Flower's configuration."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.superlink_port = free_port()
        if self.insecure:
            serve_with, trust_with, connection = ["--insecure"], ["--insecure"], {"insecure": True}
        else:
            self._certificate_dir = Path(tempfile.mkdtemp(prefix="fedlora-flower-tls-"))
            self.certificates = make_certificates(self._certificate_dir, hosts=("localhost", HOST))
            serve_with = ["--ssl-ca-certfile", str(self.certificates.ca),
                          "--ssl-certfile", str(self.certificates.certificate),
                          "--ssl-keyfile", str(self.certificates.key)]
            trust_with = ["--root-certificates", str(self.certificates.ca)]
            connection = {"root-certificates": str(self.certificates.ca)}
        superlink = self._start("superlink", [
            self.tool("flower-superlink"), *serve_with, "--host", HOST, "--port", str(self.superlink_port),
            "--disable-runtime-dependency-installation"])
        wait_for_port(self.superlink_port, self.start_timeout, superlink)
        for k in range(self.num_clients):
            node_config = f"partition-id={k} num-partitions={self.num_clients}"
            if self.faults.get(k):
                node_config += f' fault="{self.faults[k]}"'
            # The SuperNode's own port serves its ClientApp processes on this machine only (plain HTTP).
            self._start(f"supernode-{k}", [
                self.tool("flower-supernode"), *trust_with, "--superlink", f"{HOST}:{self.superlink_port}",
                "--node-config", node_config, "--host", HOST, "--port", str(free_port())])
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": "local", "local": {"address": f"{HOST}:{self.superlink_port}", **connection}}}))
        return self

    def run(self, settings: RunSettings, timeout: float = 600.0) -> pd.DataFrame:
        """Submit a run with ``flwr run`` and return the history its server wrote (:func:`read_history`).

        Raises with the server's traceback if the ServerApp failed, and with the processes' logs
        if nothing came within ``timeout`` seconds.
        """
        self.submit(settings)
        return self.wait(settings, timeout)

    def submit(self, settings: RunSettings) -> None:
        """Write the Flower App of ``settings`` and submit it with ``flwr run`` (returns once the SuperLink has it)."""
        app = write_app(self.directory / f"app-{uuid.uuid4().hex[:8]}", settings)
        submitted = subprocess.run([self.tool("flwr"), "run", str(app), "local"], env=self.env, cwd=app,
                                   capture_output=True, text=True, timeout=120)
        if submitted.returncode != 0:
            raise RuntimeError(f"flwr run failed ({submitted.returncode}):\n{submitted.stdout}\n{submitted.stderr}")

    def wait(self, settings: RunSettings, timeout: float = 600.0) -> pd.DataFrame:
        """The history of a submitted run, once its server has written it (see :meth:`run`)."""
        output, failed = Path(settings.output), error_path(settings.output)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if output.exists():
                return read_history(output)
            if failed.exists():
                raise RuntimeError(f"the ServerApp failed:\n{failed.read_text()}")
            if self.processes["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink exited during the run\n{self.logs()}")
            time.sleep(0.5)
        raise TimeoutError(f"no history after {timeout:g} s\n{self.logs()}")

    def received(self, client_id: int, message_type: str = "train") -> int:
        """How many messages of ``message_type`` SuperNode ``client_id`` has received so far (from its log)."""
        log = self.directory / "logs" / f"supernode-{client_id}.log"
        return log.read_text(errors="replace").count(f"Receiving: {message_type} message") if log.exists() else 0

    def kill_client(self, client_id: int) -> None:
        """Kill SuperNode ``client_id`` and every ClientApp it started (SIGKILL: as a machine that fails)."""
        node = self.processes[f"supernode-{client_id}"]
        for pid in self._children(node.pid):
            _signal(pid, signal.SIGKILL)
        _signal(node.pid, signal.SIGKILL)
        node.wait(timeout=10)

    @staticmethod
    def _children(pid: int) -> list[int]:
        """Every descendant of ``pid`` (Linux: /proc/<pid>/task/*/children)."""
        found, queue = [], [pid]
        while queue:
            parent = queue.pop()
            for task in Path(f"/proc/{parent}/task").glob("*"):
                try:
                    kids = [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    continue
                found.extend(kids)
                queue.extend(kids)
        return found

    def logs(self, lines: int = 30) -> str:
        """The last ``lines`` lines of every process's log."""
        parts = []
        for path in sorted((self.directory / "logs").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self, grace: float = 5.0) -> list[int]:
        """End every process of this deployment (SIGTERM, then SIGKILL after ``grace`` s); return those still found.

        Idempotent, and safe to call when :meth:`start` failed half-way.
        """
        for process in self.processes.values():
            if process.poll() is None:
                _signal(process.pid, signal.SIGTERM)
        for pid in marked_processes(self.token):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (marked_processes(self.token)
                                              or any(p.poll() is None for p in self.processes.values())):
            time.sleep(0.1)
        kill_marked(self.token)
        for process in self.processes.values():
            if process.poll() is None:
                _signal(process.pid, signal.SIGKILL)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.1)
        if self._certificate_dir is not None:  # the run's keys and certificates go with it
            shutil.rmtree(self._certificate_dir, ignore_errors=True)
            self._certificate_dir = None
        return marked_processes(self.token)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
