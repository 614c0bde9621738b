"""Flower's messages without processes: a Grid whose SuperNodes are entries of a dict, for trying a run quickly.

:class:`InProcessGrid` is what the ServerApp's functions (:func:`~fedlora_edu.flower.apps.serve`,
:func:`~fedlora_edu.flower.split.serve_split`) talk to in place of a SuperLink: every message is
serialised to Flower's wire format (protobuf bytes), parsed back, handed to the real ClientApp
(:data:`~fedlora_edu.flower.apps.client_app`) with that client's Flower
:class:`~flwr.app.Context`, and the reply serialised and parsed back the same way; the context is
serialised after every message, as a SuperNode keeps it. What this leaves out of a deployment is
processes, ports, TLS and time: a message is answered at once, in the calling process (so a
ClientApp's global state, torch's random generator for one, is the caller's). What it keeps is
everything the history depends on, so a run here equals the same run on the deployment or the
simulation engine (tested), in seconds. :func:`run_in_process` plays a whole run.

The tests of the adapter use it for every method (``tests/test_flower_every_method.py``,
``tests/test_flower_split.py``); ``book/flower/real_federation.ipynb`` uses it for split learning,
whose per-step messages would cost a deployment seconds each.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict

import pandas as pd
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedlora_edu.flower.apps import FAULTS, RunSettings, check_supported, client_app, load_federation, serve
from fedlora_edu.flower.split import serve_split
from fedlora_edu.registry import own_loop

NODE_OFFSET = 100
"""Node ``NODE_OFFSET + k`` holds client k (Flower's node ids are not client ids; the server asks each node)."""


def wire(message: Message) -> Message:
    """``message`` as the other side receives it: serialised to Flower's protobuf bytes and parsed back."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(message).SerializeToString()))


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are entries of a dict: a pushed message is answered at once by the ClientApp.

    Node ``NODE_OFFSET + k`` holds client k; each keeps its Flower Context, serialised after every
    message. ``faults`` (client -> a fault of :data:`~fedlora_edu.flower.apps.FAULTS`) is each
    node's ``fault`` setting; a ClientApp that raises is answered with an error reply, as a
    SuperNode answers. ``delivered`` counts the messages handled. Flower's process identity must be
    set while it runs (:func:`flower_identity`).
    """

    def __init__(self, settings: RunSettings, num_clients: int, faults: dict[int, str] | None = None) -> None:
        for client, fault in (faults or {}).items():
            if fault not in FAULTS or not 0 <= client < num_clients:
                raise ValueError(f"faults maps a client in 0..{num_clients - 1} to one of {FAULTS}, "
                                 f"got {client!r}: {fault!r}")
        self.contexts = {NODE_OFFSET + k: Context(run_id=1, node_id=NODE_OFFSET + k,
                                                  node_config={"partition-id": k, "fault": (faults or {}).get(k, "")},
                                                  state=RecordDict(), run_config=asdict(settings))
                         for k in range(num_clients)}
        self.replies: dict[str, Message] = {}
        self.delivered = 0

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError("an InProcessGrid holds one run")

    @property
    def run(self):
        raise NotImplementedError("an InProcessGrid holds one run")

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError("build a flwr.app.Message and push it")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids number them
            node = message.metadata.dst_node_id
            try:
                reply = client_app(wire(message), self.contexts[node])
            except Exception as error:  # noqa: BLE001 (what a SuperNode does with a ClientApp that raises)
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            self.contexts[node] = context_from_proto(
                ProtoContext.FromString(context_to_proto(self.contexts[node]).SerializeToString()))
            self.replies[message.metadata.message_id] = wire(reply)
            self.delivered += 1
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError("push_messages, then pull_messages")


@contextlib.contextmanager
def flower_identity() -> Iterator[None]:
    """Give this process the run and task identity a Flower runtime sets (a Message reads it); restored after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_in_process(settings: RunSettings, faults: dict[int, str] | None = None) -> tuple[pd.DataFrame, InProcessGrid]:
    """Play ``settings`` through an :class:`InProcessGrid`, as the ServerApp would: the history and the grid.

    The ServerApp's choice of function (:func:`~fedlora_edu.flower.split.serve_split` for a
    split-learning method, :func:`~fedlora_edu.flower.apps.serve` for the others); the history has
    the columns of a Flower run of that method. Nothing is written but what ``settings`` names
    (``aggregates``); ``output`` is not written.
    """
    strategy = settings.strategy()
    check_supported(strategy, settings.evaluate_clients)
    federation = load_federation(settings.federation)
    grid = InProcessGrid(settings, federation.num_clients, faults)
    with flower_identity():
        play = serve_split if own_loop(strategy) is not None else serve
        history = play(grid, federation, strategy, settings)
    return history, grid
