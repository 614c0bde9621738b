"""Split learning on Flower: the cut's activations and gradients as Flower messages, every local step.

:func:`~fedlora_edu.efficiency.split.run_split` plays a split-learning method inside one process:
a local step calls :func:`~fedlora_edu.efficiency.split.split_backward`, whose two halves meet only
through the messages at the cut. Here the halves run in two places. The ServerApp
(:func:`serve_split`, called by :data:`~fedlora_edu.flower.apps.server_app` for a method that
runs in its own loop) holds the server's part of the model; each SuperNode's ClientApp holds the
client's part and its data, and a local step becomes an exchange of Flower messages (actions of
the ``train`` message type, handled by :data:`~fedlora_edu.flower.apps.client_app`):

- :class:`~fedlora_edu.efficiency.split.SplitFederatedLoRA` (the client keeps the embeddings and the
  head): ``train.split_forward``, the client embeds its batch and replies with the embeddings and
  the lengths; the server runs the body and the pooling; ``train.split_head``, it sends the
  features down, the client applies its head, computes the loss (the labels never leave it), steps
  its head's AdamW and replies with the features' gradient; the server back-propagates it into its
  copy of the body's adapter for that client. At the end of a client's steps its last reply carries
  its head (the round's upload), and the server aggregates with the method's ``aggregate``.
- :class:`~fedlora_edu.efficiency.split.SplitLoRA` (the client keeps the first blocks): ``train.split_forward``,
  the client runs its blocks and replies with the activations, lengths and labels; the server runs
  the rest, the head and the loss, steps its optimiser; ``train.split_backward``, it sends the cut
  layer's gradient down and the client back-propagates it and steps its own AdamW. When the
  method averages (``average_every`` client steps, once a round by default), ``train.split_upload``
  asks each of the round's clients for its client-side factors; the average goes down with each
  client's next forward message (the first of the next round it is sampled in, or, for a mid-round
  average, its next step).

What each side keeps. The server: its part of the model, as :func:`run_split` keeps it
(SplitFedLoRA's per-client copy and its AdamW for the client's steps, SplitLoRA's one server-side
model and AdamW for the whole run). The client, in its Flower :class:`~flwr.app.Context` (held by
the SuperNode between messages, never sent): SplitFedLoRA's head and its AdamW state during a
round, SplitLoRA's client-side factors and AdamW state for the whole run. A ClientApp process may
live for one message only, so nothing else survives between messages: the client draws its batch
again from the simulator's seed (:func:`client_batch`), and SplitLoRA's client recomputes its
forward pass when the gradient arrives (the same weights and the same dropout masks, so the same
graph; a long-lived client would keep the graph instead: one more forward pass of its blocks per
step).

Same numbers as :func:`run_split`. In :func:`run_split` the two sides draw their dropout masks
from one generator, in the order the step runs them. So that the Flower run draws the same masks,
every message carries that generator's state (torch's CPU generator, 5,056 bytes) and every reply
the state it left: an artefact of the comparison, not of split learning, counted apart
(``flower_state_bytes_*``, inside ``flower_bytes_*``, never in the method's ``bytes_*``). With the
testbed's cached frozen layers the server's frozen blocks run without dropout on the embeddings
it receives, as the cache was computed (:func:`run_split` reads the cache itself: equal to float
rounding). The history has :data:`~fedlora_edu.efficiency.split.SPLIT_COLUMNS`, ``engine``
``"flower"``, and the Flower columns of :data:`SPLIT_FLOWER_COLUMNS`.

Limits. A step needs its client's reply: a client that does not answer, or answers with an error,
stops the run with an error naming the client, round, step and message (a split run has no
"round goes on without it": the server's part of a step cannot finish without the client's). No
client-side evaluation (``evaluate_clients``: :func:`run_split` has none). Messages go one at a
time, as :func:`run_split` plays them: a round costs ``2 x clients x local steps`` exchanges (plus
SplitLoRA's uploads), so the message latency, not the arithmetic, sets a round's time on Flower.

Taught in ``book/flower/real_federation.ipynb``; the method in ``book/part4/split.ipynb``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import Payload, ServerState, Upload

# _lora_parameters and _mask_of are run_split's own helpers, private there: efficiency/split.py is fingerprinted by
# Part IV's stored study, so it keeps its names.
from fedlora_edu.efficiency.split import (
    SPLIT_COLUMNS,
    SplitMethod,
    _lora_parameters,
    _mask_of,
    activation_message,
    client_activations,
    depth_of,
    frozen_output,
    mean_pool,
    run_blocks,
    split_classifier,
)
from fedlora_edu.flower.messaging import RunSettings, array_bytes, discover_clients, exchange
from fedlora_edu.flower.records import factors_to_tensors, record_to_tensors, tensors_to_record
from fedlora_edu.foundations.training import BatchSampler, adamw, evaluate, trim_batch
from fedlora_edu.simulation.federation import Federation

SPLIT_FLOWER_COLUMNS = [*SPLIT_COLUMNS, "flower_bytes_down", "flower_bytes_up", "dropped", "round_seconds",
                        "flower_state_bytes_down", "flower_state_bytes_up", "messages"]
"""A split run's history on Flower: :func:`run_split`'s columns, then the array bytes Flower carried each way,
``dropped`` (always empty: a split run stops rather than drop a client), the round's wall time, the bytes of the
dropout generator's state that travel only so that the run equals :func:`run_split`, and the messages sent."""

CLIENT_KEY = "fedlora.split"
"""Where a split client keeps its side in its Flower context: its trained tensors (SplitLoRA's client-side factors,
SplitFedLoRA's head) under ``CLIENT_KEY``, its AdamW state under ``CLIENT_KEY + ".optimizer"``."""

POLL = 0.01
"""Seconds between the server's looks for a reply: a split step waits on its client, so the wait is short."""


# ----- what both sides share ------------------------------------------------------------------------------------


def client_layers(model: torch.nn.Module, strategy: SplitMethod, cut: int) -> list[str]:
    """The LoRA layers on the client's side of the cut, in the model's order (none for SplitFedLoRA)."""
    return [name for name in adapter_io.lora_layers(model) if strategy.client_side(name, cut)]


def client_batch(federation: Federation, client_id: int, settings: RunSettings, round_index: int,
                 step: int) -> dict[str, Tensor]:
    """Client ``client_id``'s batch of local step ``step`` in round ``round_index``: the simulator's (the same seed)."""
    data = federation.clients[client_id]
    sampler = BatchSampler(len(data), settings.batch_size,
                           derive_seed(settings.seed, "client batches", round_index, client_id))
    for _ in range(step):
        sampler.next()
    return trim_batch(data.subset(sampler.next()), federation.device)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """An optimiser's per-parameter state as named tensors (``"<index>.<key>"``), bit for bit."""
    return {f"{index}.{key}": value for index, state in optimizer.state_dict()["state"].items()
            for key, value in state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """Give ``optimizer`` (over the same parameters, in the same order) the state :func:`optimizer_tensors` took."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _rng_record(state: Tensor | None = None) -> ArrayRecord:
    return tensors_to_record({"state": torch.get_rng_state() if state is None else state})


def _set_rng(content: RecordDict) -> None:
    torch.set_rng_state(record_to_tensors(content["rng"])["state"])


# ----- the client's side ------------------------------------------------------------------------------------------


class _ClientSide:
    """A split client's side for one message: the model, its cut, its batch, and what its context keeps."""

    def __init__(self, federation: Federation, strategy: SplitMethod, content: RecordDict, client_id: int,
                 settings: RunSettings, records: RecordDict) -> None:
        header = content["split"]
        if int(header["client_id"]) != client_id:
            raise ValueError(f"a message for client {header['client_id']} reached the SuperNode of client {client_id}")
        self.round, self.step = int(header["round"]), int(header["step"])
        self.strategy, self.settings, self.records = strategy, settings, records
        self.model = federation.fresh_model(seed=settings.seed)
        self.classifier = split_classifier(self.model)
        self.cut = strategy.cut_for(self.classifier)
        self.batch = client_batch(federation, client_id, settings, self.round, self.step)
        self.num_examples = len(federation.clients[client_id])
        self.model.train()

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the client trains: SplitLoRA's client-side factors (A, B per layer), or SplitFedLoRA's head."""
        if self.strategy.placement == "blocks":
            return _lora_parameters(self.model, client_layers(self.model, self.strategy, self.cut))
        return list(adapter_io.head_parameters(self.model).values())

    def load(self, start: dict[str, Tensor] | None = None) -> torch.optim.Optimizer | None:
        """Put the kept (or, with ``start``, the downloaded) values into the model; the AdamW with its kept state.

        A download replaces the client's values, never its AdamW state (SplitLoRA keeps one AdamW per
        client for the run; SplitFedLoRA's head starts a round with a download and a fresh AdamW).
        None when the client trains nothing (SplitFedLoRA with a frozen head, ``head="probe"``).
        """
        parameters = self.parameters()
        if not parameters:
            return None
        kept = record_to_tensors(self.records[CLIENT_KEY]) if CLIENT_KEY in self.records else None
        values = start if start is not None else kept
        if values is None:
            raise RuntimeError("a split client was asked for a step before it received its start")
        with torch.no_grad():
            for index, parameter in enumerate(parameters):
                parameter.copy_(values[str(index)])
        optimizer = adamw(parameters, self.settings.learning_rate)
        if f"{CLIENT_KEY}.optimizer" in self.records:
            load_optimizer_tensors(optimizer, record_to_tensors(self.records[f"{CLIENT_KEY}.optimizer"]))
        return optimizer

    def save(self, optimizer: torch.optim.Optimizer | None = None, fresh_optimizer: bool = False) -> None:
        """Keep the trained values (and the AdamW state, or an empty one) in the context for the next message."""
        self.records[CLIENT_KEY] = tensors_to_record({str(i): p for i, p in enumerate(self.parameters())})
        if fresh_optimizer:
            self.records[f"{CLIENT_KEY}.optimizer"] = ArrayRecord()
        elif optimizer is not None:
            self.records[f"{CLIENT_KEY}.optimizer"] = tensors_to_record(optimizer_tensors(optimizer))

    def forward(self) -> Tensor:
        """The client's part of the forward pass: its blocks' output (SplitLoRA) or the embeddings (SplitFedLoRA)."""
        if self.strategy.placement == "blocks":
            return client_activations(self.classifier, self.batch, self.cut)
        return frozen_output(self.classifier, self.batch, 0)


def client_forward(federation: Federation, strategy: SplitMethod, content: RecordDict, client_id: int,
                   settings: RunSettings, records: RecordDict) -> RecordDict:
    """``train.split_forward``: the client runs its part of a step's forward pass; the reply is what crosses the cut.

    The message carries the dropout generator's state (module docstring) and, at a client's first
    step of a round (or after a mid-round average), its download: the averaged client-side factors
    (SplitLoRA) or the global head (SplitFedLoRA, whose head's AdamW starts afresh).
    """
    side = _ClientSide(federation, strategy, content, client_id, settings, records)
    download = record_to_tensors(content["download"]) if "download" in content else None
    if download is not None:
        side.load(download)
        side.save(fresh_optimizer=strategy.placement == "head")  # SplitFedLoRA's head: a fresh AdamW for the round
    elif strategy.placement == "blocks":
        side.load()
    _set_rng(content)
    sent = side.forward()
    up = activation_message(sent, side.batch["attention_mask"],
                            side.batch["labels"] if strategy.placement == "blocks" else None)
    return RecordDict({"cut": tensors_to_record(up), "rng": _rng_record(),
                       "meta": ConfigRecord({"trains": bool(sent.requires_grad)})})


def client_head(federation: Federation, strategy: SplitMethod, content: RecordDict, client_id: int,
                settings: RunSettings, records: RecordDict) -> RecordDict:
    """``train.split_head`` (SplitFedLoRA): the head on the received features, the loss, the head's AdamW step.

    The reply carries the features' gradient and the loss; on the round's last step (``last`` in the
    message) also the trained head, the client's upload.
    """
    side = _ClientSide(federation, strategy, content, client_id, settings, records)
    optimizer = side.load()
    _set_rng(content)
    received = record_to_tensors(content["cut"])["features"].requires_grad_(True)
    logits = side.classifier.classifier(received)
    loss = F.cross_entropy(logits.float(), side.batch["labels"])
    loss.backward()
    if optimizer is not None:  # the head trains (it is frozen with build_federation(head="probe"))
        optimizer.step()
        side.save(optimizer)
    reply = RecordDict({"cut": tensors_to_record({"gradient": received.grad.to(torch.float32)}), "rng": _rng_record(),
                        "meta": ConfigRecord({"loss": float(loss.detach()), "num_examples": side.num_examples})})
    if bool(content["split"]["last"]):
        reply["upload"] = tensors_to_record(adapter_io.get_head_state(side.model))
    return reply


def client_backward(federation: Federation, strategy: SplitMethod, content: RecordDict, client_id: int,
                    settings: RunSettings, records: RecordDict) -> RecordDict:
    """``train.split_backward`` (SplitLoRA): back-propagate the cut layer's gradient through the client's blocks, step.

    The forward pass is run again from the generator state the step's forward started from (sent
    back with the gradient): the same weights and dropout masks, so the same graph as the forward
    message built (module docstring).
    """
    side = _ClientSide(federation, strategy, content, client_id, settings, records)
    optimizer = side.load()
    _set_rng(content)
    optimizer.zero_grad(set_to_none=True)
    side.forward().backward(record_to_tensors(content["cut"])["gradient"])
    optimizer.step()
    side.save(optimizer)
    return RecordDict({"meta": ConfigRecord({"num_examples": side.num_examples})})


def client_upload(federation: Federation, strategy: SplitMethod, content: RecordDict, client_id: int,
                  settings: RunSettings, records: RecordDict) -> RecordDict:
    """``train.split_upload`` (SplitLoRA's average): the client's client-side factors (``<layer>.A``, ``.B``)."""
    side = _ClientSide(federation, strategy, content, client_id, settings, records)
    side.load()
    mine = set(client_layers(side.model, strategy, side.cut))
    factors = {name: pair for name, pair in adapter_io.get_lora_factors(side.model).items() if name in mine}
    return RecordDict({"upload": tensors_to_record(factors_to_tensors(factors)),
                       "meta": ConfigRecord({"num_examples": side.num_examples})})


CLIENT_HANDLERS = {"split_forward": client_forward, "split_head": client_head, "split_backward": client_backward,
                   "split_upload": client_upload}
"""The ClientApp's function for each ``train.<action>`` of a split run (:data:`~fedlora_edu.flower.apps.client_app`
registers them)."""


# ----- the server's side ------------------------------------------------------------------------------------------


class _Round:
    """One round's messages with the clients, one at a time, and what they carried."""

    def __init__(self, grid: Grid, nodes: dict[int, int], settings: RunSettings, round_index: int) -> None:
        self.grid, self.nodes, self.settings, self.round = grid, nodes, settings, round_index
        self.flower_down = self.flower_up = self.state_down = self.state_up = self.messages = 0
        self.cut_up = self.cut_down = self.adapter_up = self.adapter_down = self.examples = 0

    def ask(self, client_id: int, action: str, step: int, records: dict[str, ArrayRecord],
            last: bool = False) -> RecordDict:
        """Send client ``client_id`` one ``train.<action>`` message; its reply, or an error naming what failed."""
        where = f"client {client_id}'s {action} message of round {self.round + 1}, step {step + 1}"
        if client_id not in self.nodes:
            raise RuntimeError(f"split learning stopped: no SuperNode holds client {client_id} ({where})")
        content = RecordDict({"split": ConfigRecord({"client_id": client_id, "round": self.round, "step": step,
                                                     "last": last}), **records})
        message = Message(content, dst_node_id=self.nodes[client_id], message_type=f"train.{action}")
        self.flower_down += array_bytes(content)
        self.state_down += content["rng"].count_bytes() if "rng" in content else 0
        self.messages += 1
        reply = exchange(self.grid, {client_id: message}, timeout=self.settings.round_timeout, poll=POLL).get(client_id)
        if reply is None:
            raise RuntimeError(f"split learning stopped: no reply within {self.settings.round_timeout:g} s to {where}; "
                               "a split step cannot finish without its client")
        if reply.has_error():
            raise RuntimeError(f"split learning stopped: error reply to {where}: {reply.error.reason}")
        self.flower_up += array_bytes(reply.content)
        self.state_up += reply.content["rng"].count_bytes() if "rng" in reply.content else 0
        return reply.content


def _frozen_on_server(classifier: torch.nn.Module, embedded: Tensor, mask: Tensor, cached: bool) -> Tensor:
    """The server's frozen bottom blocks on the received embeddings: without dropout where the testbed caches them."""
    frozen = getattr(classifier, "frozen_layers", 0)
    if frozen == 0:
        return embedded
    if not cached:  # as run_split runs them without a cache: in the model's mode
        return run_blocks(classifier, embedded, mask, 0, frozen)
    classifier.eval()
    try:
        with torch.no_grad():
            return run_blocks(classifier, embedded, mask, 0, frozen)
    finally:
        classifier.train()




def _factor_record(server: ServerState, names: list[str]) -> ArrayRecord:
    """The server's factors of ``names`` as a client loads them: A, B, A, B, ... numbered in layer order."""
    return tensors_to_record({str(i): tensor for i, tensor in
                              enumerate(t for name in names for t in server.adapters[name])})


class _Stream:
    """The dropout generator's state as it passes between the server and the clients (module docstring).

    The server sets torch's generator to it before its own draws and takes it back after; each
    message carries it and each reply returns it. Kept apart from the process's generator, which a
    client in the same process (an in-process grid) would otherwise move.
    """

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.state = torch.get_rng_state()

    def record(self) -> ArrayRecord:
        return _rng_record(self.state)

    def returned(self, reply: RecordDict) -> None:
        self.state = record_to_tensors(reply["rng"])["state"]

    def draw(self) -> None:
        """Before the server's draws: torch's generator at the stream's state."""
        torch.set_rng_state(self.state)

    def drawn(self) -> None:
        """After the server's draws: the stream where torch's generator is."""
        self.state = torch.get_rng_state()


def _head_round(talk: _Round, federation: Federation, strategy: SplitMethod, model: torch.nn.Module,
                classifier: torch.nn.Module, server: ServerState, sampled: list[int], t: int,
                settings: RunSettings) -> list[float]:
    """SplitFedLoRA's round (run_split's ``_train_head_placement``), the client's half played by message."""
    uploads, losses = [], []
    head_bytes = tensor_bytes(server.head)
    cached = federation.clients[0].hidden is not None
    depth, frozen = depth_of(classifier), getattr(classifier, "frozen_layers", 0)
    head_names = set(adapter_io.head_parameters(model))
    steps = settings.local_steps
    for k in sampled:
        adapter_io.set_lora_factors(model, server.adapters)
        adapter_io.set_head_state(model, server.head)
        talk.adapter_down += head_bytes  # the head, where it trains, is the client's download
        body = [p for name, p in model.named_parameters() if p.requires_grad and name not in head_names]
        optimizer = adamw(body, settings.learning_rate)  # the server's copy of the body's adapter for client k
        stream = _Stream(derive_seed(settings.seed, "client batches", t, k))  # dropout, as run_split seeds it
        model.train()
        client_losses, reply = [], None
        for s in range(steps):
            optimizer.zero_grad(set_to_none=True)
            records = {"rng": stream.record()}
            if s == 0:
                records["download"] = tensors_to_record({str(i): v for i, v in enumerate(server.head.values())})
            reply = talk.ask(k, "split_forward", s, records)
            stream.returned(reply)
            up = record_to_tensors(reply["cut"])
            mask = _mask_of(up["lengths"], up["activations"].shape[1])
            stream.draw()
            start = _frozen_on_server(classifier, up["activations"], mask, cached)
            features = mean_pool(run_blocks(classifier, start, mask, frozen, depth), mask)
            stream.drawn()
            down = {"features": features.detach().to(torch.float32)}
            reply = talk.ask(k, "split_head", s, {"cut": tensors_to_record(down), "rng": stream.record()},
                             last=s == steps - 1)
            stream.returned(reply)
            gradient = record_to_tensors(reply["cut"])
            if features.requires_grad:
                features.backward(gradient["gradient"])
            optimizer.step()
            talk.cut_up += tensor_bytes(up) + tensor_bytes(gradient)
            talk.cut_down += tensor_bytes(down)
            talk.examples += int(up["lengths"].shape[0])
            client_losses.append(float(reply["meta"]["loss"]))
        losses.append(float(np.mean(client_losses)))
        head = record_to_tensors(reply["upload"])
        talk.adapter_up += head_bytes
        tensors = factors_to_tensors(adapter_io.get_lora_factors(model))
        tensors |= {f"head.{key}": value for key, value in head.items()}
        # The adapter copies never leave the server: only the head is a network upload.
        uploads.append(Upload(k, int(reply["meta"]["num_examples"]), Payload(tensors, nbytes=head_bytes), server.rank))
    strategy.aggregate(server, uploads, t)
    return losses


def _block_round(talk: _Round, federation: Federation, strategy: SplitMethod, model: torch.nn.Module,
                 classifier: torch.nn.Module, server: ServerState, sampled: list[int], t: int,
                 settings: RunSettings, cut: int, client_names: list[str], server_names: list[str],
                 shared: dict[str, Any]) -> list[float]:
    """SplitLoRA's round (run_split's ``_train_block_placement``), the clients' halves played by message."""
    if "server_optimizer" not in shared:  # one server-side model and optimiser for the whole run
        adapter_io.set_lora_factors(model, server.adapters)
        adapter_io.set_head_state(model, server.head)
        server_parameters = _lora_parameters(model, server_names) + list(adapter_io.head_parameters(model).values())
        shared["server_optimizer"] = adamw(server_parameters, settings.learning_rate)
    server_optimizer = shared["server_optimizer"]
    client_factor_bytes = tensor_bytes([tensor for name in client_names for tensor in server.adapters[name]])
    pending = set(sampled)  # clients whose next forward message carries the averaged client-side factors
    talk.adapter_down += client_factor_bytes * len(sampled)
    stream = _Stream(derive_seed(settings.seed, "split dropout", t))
    model.train()
    steps, depth = settings.local_steps, depth_of(classifier)
    total = len(sampled) * steps
    every = total if strategy.average_every is None else strategy.average_every
    if total % every:
        raise ValueError(f"average_every ({every}) must divide a round's client steps ({len(sampled)} clients x "
                         f"{steps} steps = {total}), so that a round ends with an average")
    losses: dict[int, list[float]] = {k: [] for k in sampled}
    done = 0
    for s in range(steps):
        for k in sampled:  # "the client interacts with the server in turn"
            server_optimizer.zero_grad(set_to_none=True)
            started_from = stream.record()  # the client's backward message runs its forward again from here
            records = {"rng": started_from}
            if k in pending:
                records["download"] = _factor_record(server, client_names)
                pending.discard(k)
            reply = talk.ask(k, "split_forward", s, records)
            stream.returned(reply)
            up = record_to_tensors(reply["cut"])
            received = up["activations"].clone().requires_grad_(bool(reply["meta"]["trains"]))
            mask = _mask_of(up["lengths"], received.shape[1])
            stream.draw()
            hidden = run_blocks(classifier, received, mask, cut, depth)
            logits = classifier.classifier(mean_pool(hidden, mask))
            stream.drawn()
            loss = F.cross_entropy(logits.float(), up["labels"].long())
            loss.backward()
            talk.cut_up += tensor_bytes(up)
            if received.requires_grad:  # the cut layer's gradient goes back; the client back-propagates it
                down = {"gradient": received.grad.to(torch.float32)}
                talk.ask(k, "split_backward", s, {"cut": tensors_to_record(down), "rng": started_from})
                talk.cut_down += tensor_bytes(down)
            server_optimizer.step()
            talk.examples += int(up["labels"].shape[0])
            losses[k].append(float(loss.detach()))
            done += 1
            if done % every == 0:  # SplitLoRA's fed_avg of the client-side A and B
                uploads = []
                for j in sampled:
                    answer = talk.ask(j, "split_upload", s, {})
                    uploads.append(Upload(j, int(answer["meta"]["num_examples"]),
                                          Payload(record_to_tensors(answer["upload"])), server.rank))
                    talk.adapter_up += uploads[-1].payload.nbytes
                strategy.aggregate(server, uploads, t)
                if done != total:  # the last average of a round is next round's download
                    pending = set(sampled)
                    talk.adapter_down += client_factor_bytes * len(sampled)
    layers = adapter_io.lora_layers(model)
    server.adapters = {name: server.adapters[name] if name in client_names else
                       (layers[name].lora_A[adapter_io.ADAPTER].weight.detach().clone(),
                        layers[name].lora_B[adapter_io.ADAPTER].weight.detach().clone()) for name in server.adapters}
    server.head = adapter_io.get_head_state(model)
    return [float(np.mean(values)) for values in losses.values()]


def serve_split(grid: Grid, federation: Federation, strategy: SplitMethod, settings: RunSettings) -> pd.DataFrame:
    """Play ``settings.rounds`` rounds of a split-learning method through ``grid``; one history row per round.

    The same steps, in the same order, as :func:`~fedlora_edu.efficiency.split.run_split`, with the
    client's half of every step in its ClientApp (module docstring); with the same federation and
    seed the history equals :func:`run_split`'s to float tolerance. What the server held after each
    round goes to ``settings.aggregates`` when set (:func:`~fedlora_edu.flower.apps.read_aggregates`).
    """
    if not isinstance(strategy, SplitMethod):
        raise TypeError(f"serve_split runs a split-learning method (SplitFedLoRA, SplitLoRA), got "
                        f"{type(strategy).__name__}; fedlora_edu.flower.apps.serve runs the others")
    if settings.evaluate_clients:
        raise ValueError("evaluate_clients: split learning here has no client evaluation (run_split has none)")
    num_clients = federation.num_clients
    if settings.rounds < 1 or settings.local_steps < 1:
        raise ValueError(f"rounds and local_steps must be >= 1, got {settings.rounds} and {settings.local_steps}")
    if not 1 <= settings.clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round must be in 1..{num_clients}, got {settings.clients_per_round}")
    nodes = discover_clients(grid, num_clients, settings.connect_timeout)
    seed = settings.seed
    model = federation.fresh_model(seed=seed)
    classifier = split_classifier(model)
    cut = strategy.cut_for(classifier)
    server = ServerState(adapters=adapter_io.get_lora_factors(model), head=adapter_io.get_head_state(model),
                         scaling=adapter_io.lora_scaling(model), rank=adapter_io.model_rank(model), seed=seed,
                         method_state=strategy.new_state())
    client_names = [n for n in server.adapters if strategy.client_side(n, cut)]
    server_names = [n for n in server.adapters if n not in client_names]
    rng = np.random.default_rng(seed)
    shared: dict[str, Any] = {}
    rows, kept = [], []
    for t in range(settings.rounds):
        round_started = time.perf_counter()
        server.round = t
        sampled = strategy.sample_clients(t, num_clients, settings.clients_per_round, rng)
        talk = _Round(grid, nodes, settings, t)
        started = time.perf_counter()
        if strategy.placement == "head":
            losses = _head_round(talk, federation, strategy, model, classifier, server, sampled, t, settings)
        else:
            losses = _block_round(talk, federation, strategy, model, classifier, server, sampled, t, settings, cut,
                                  client_names, server_names, shared)
        seconds = time.perf_counter() - started
        adapter_io.set_lora_factors(model, server.adapters)
        adapter_io.set_head_state(model, server.head)
        accuracy = test_loss = math.nan
        if settings.evaluate:
            accuracy, test_loss = evaluate(model, federation.test, device=federation.device)
        rows.append({
            "round": t + 1, "method": strategy.name, "accuracy": accuracy, "test_loss": test_loss,
            "train_loss": float(np.mean(losses)), "client_accuracy": math.nan,
            "bytes_up": talk.cut_up + talk.adapter_up, "bytes_down": talk.cut_down + talk.adapter_down,
            "discordance": math.nan, "update_size": math.nan, "aggregation_error": math.nan,
            "server_seconds": seconds, "clients": len(sampled), "excluded": 0, "engine": "flower",
            "clients_per_pass": 1, "cut_bytes_up": talk.cut_up, "cut_bytes_down": talk.cut_down,
            "adapter_bytes_up": talk.adapter_up, "adapter_bytes_down": talk.adapter_down,
            "cut_examples": talk.examples, "flower_bytes_down": talk.flower_down, "flower_bytes_up": talk.flower_up,
            "dropped": {}, "round_seconds": time.perf_counter() - round_started,
            "flower_state_bytes_down": talk.state_down, "flower_state_bytes_up": talk.state_up,
            "messages": talk.messages,
        })
        if settings.aggregates:
            kept.append({"adapters": {n: (a.clone(), b.clone()) for n, (a, b) in server.adapters.items()},
                         "head": {key: v.clone() for key, v in server.head.items()}, "base": {}})
    if settings.aggregates:
        torch.save(kept, settings.aggregates)
    return pd.DataFrame(rows, columns=SPLIT_FLOWER_COLUMNS)


def split_messages(strategy: SplitMethod, settings: RunSettings, num_clients: int) -> int:
    """How many messages a healthy split run sends its clients (for a progress bar): two a client step, plus uploads."""
    sampled = min(settings.clients_per_round, num_clients)
    per_round = 2 * sampled * settings.local_steps
    if strategy.placement == "blocks":
        total = sampled * settings.local_steps
        every = total if strategy.average_every is None else strategy.average_every
        per_round += sampled * (total // every)
    return settings.rounds * per_round
