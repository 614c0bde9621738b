"""Split learning (survey section 5, Figure 4): the model cut in two, the client runs one part, the server the other.

A client too small to train the whole model keeps part of it; what crosses the network every local
step is then the *activations* at the cut (client to server) and their *gradient* (server to
client), per example, instead of (or on top of) an adapter once per round. Two placements of the
cut, as the survey's Figure 4 draws them, each a registered method:

- :class:`SplitFederatedLoRA` (Wang, Zhou, Shi, Letaief 2024, "Federated fine-tuning for pre-trained
  foundation models over wireless networks", arXiv 2407.02924; the survey's [Wang et al., 2024a],
  Figure 4 (a)): the client keeps the embeddings and the task module, the server runs the
  transformer body, where LoRA is. A local step: the client embeds its tokens and sends the
  embeddings up; the server runs the body and sends the sentence features down; the client applies
  the head, computes the loss (the labels never leave it) and sends the features' gradient up; the
  server back-propagates it into its LoRA factors. Nothing before the cut trains, so no gradient goes
  back down. We could read only the paper's abstract: that the server keeps one copy of the body's
  adapter per scheduled device, trained on that device's activations, and averages the copies by
  FedAvg at the end of each round is our reading of "split federated LoRA" (SFL's server-side
  aggregation); so is that the mean pooling runs on the server (it has no parameters; the head reads
  its output). With this reading the method learns exactly what FedIT learns from the same batches:
  the cut moves computation and changes what crosses the network, not the arithmetic (tested).
- :class:`SplitLoRA` (Lin et al. 2024, arXiv 2407.00952, official code FDU-INC/Split_LoRA@a549b60,
  ``SplitLoRA/examples/src/gpt2_ft_sfl.py``; FedsLLM, Zhao et al. 2024, places the cut the same way;
  Figure 4 (b)): the client keeps the embeddings and the first blocks, the server the rest and the
  head. A local step, as in the code's ``train_validate``: client forward, activations (and the labels)
  to the server, server loss, backward and optimiser step, the cut layer's gradient back, client
  backward and step. The server holds *one* server-side model, with one optimiser for the whole
  run, that every client's steps update in turn, client after client each step ("the client
  interacts with the server in turn"); each client keeps its own client-side adapter and optimiser,
  and the clients' client-side LoRA factors (A and B only) are averaged uniformly every fixed number
  of client steps (the code's ``fed_avg`` every ``aggregate_step = 100`` steps; here every
  ``clients_per_round x local_steps`` steps, once a round, unless ``average_every`` says otherwise).
  Our choices where the code differs from a clean reading: the code snapshots a client's factors
  *before* its last step and, with three clients and 100 steps, counts one client twice; we average
  every client's factors after its last step, once each. Its clients all take part in every step;
  here a round's sampled clients do, and a client downloads the averaged client-side adapter when it
  is sampled.

Bytes are counted as everywhere in the package: the size of the tensors that are really sent
(:func:`~fedlora_edu.core.adapters.tensor_bytes`, numel x element size), float32 for activations,
gradients and factors, int32 for lengths and labels (the attention mask is sent as each sequence's
length: padding is at the end). A batch's activations are a rectangle, batch x its longest
sequence x hidden size, and so is their gradient.

Split learning needs its own loop (:func:`run_split`): the simulator trains a client's whole model in
one backward pass, and SplitLoRA's server-side model is shared and stateful across clients. The loop
shares everything else with the simulator: the federation's data (the testbed, cached frozen layers
included), the model (``federation.fresh_model``, the same LoRA start), the clients' batches and
sampling (the same seeds), AdamW (:func:`~fedlora_edu.foundations.training.adamw`), the Strategy's
``aggregate`` and :class:`~fedlora_edu.core.strategy.ServerState`, and
:func:`~fedlora_edu.foundations.training.evaluate`; its history has the simulator's columns. On Flower the
same loop runs with the client's half of every step in its ClientApp, two messages a step
(:mod:`fedlora_edu.flower.split`, equal to :func:`run_split` to float tolerance, tested).

What a split client pays in compute and memory is counted by :func:`split_client_costs`, the package's cost
accounting (:mod:`fedlora_edu.efficiency.costs`, the same :class:`~fedlora_edu.efficiency.costs.ClientCost`) on
the client's side of the cut.

The leakage section at the end measures what crosses the network: how many input tokens an attacker
recovers from the activations at a cut of each depth, against a gradient-inversion attempt on a
LoRA update of the first layer (the survey's summary calls this analysis missing).

Taught in ``book/part4/split.ipynb``.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors, tensor_bytes
from fedlora_edu.core.factors import average_tensors
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import ClientStart, Payload, ServerState, Strategy, Upload, normalized_weights
from fedlora_edu.efficiency.costs import ClientCost
from fedlora_edu.foundations.training import BatchSampler, ClientData, adamw, evaluate, trim_batch

PLACEMENTS = ("head", "blocks")
"""Where the client's part ends: ``"head"``, the client keeps the embeddings and the task head (Wang et al.);
``"blocks"``, the client keeps the embeddings and the first blocks (SplitLoRA, FedsLLM)."""

SPLIT_COLUMNS = [
    "round", "method", "accuracy", "test_loss", "train_loss", "client_accuracy",
    "bytes_up", "bytes_down", "discordance", "update_size", "aggregation_error", "server_seconds", "clients",
    "excluded", "engine", "clients_per_pass",
    "cut_bytes_up", "cut_bytes_down", "adapter_bytes_up", "adapter_bytes_down", "cut_examples",
]
"""The history of :func:`run_split`: the simulator's columns (those that do not apply are NaN), then what crossed
the cut (``cut_bytes_*``), the factors and head sent (``adapter_bytes_*``) and the examples that crossed the cut."""

_LAYER = re.compile(r"\.layer\.(\d+)\.")


# ----- the model, cut in two ------------------------------------------------------------------------------------------
def split_classifier(model: nn.Module) -> nn.Module:
    """The mean-pooling classifier inside a peft model (or the classifier itself): the model that gets cut.

    The package's embedded encoder (all-MiniLM-L6-v2 read as a sentence encoder, a
    :class:`~fedlora_edu.assets.models.MeanPoolingClassifier`): embeddings, a stack of transformer
    blocks, mean pooling, a linear head.
    """
    for candidate in (model, getattr(getattr(model, "base_model", None), "model", None)):
        if candidate is not None and all(hasattr(candidate, name) for name in ("encoder", "classifier", "_run_layers")):
            return candidate
    raise ValueError("split learning here cuts the embedded mean-pooling encoder (build_federation's default model); "
                     f"got {type(model).__name__}")


def depth_of(classifier: nn.Module) -> int:
    """The number of transformer blocks."""
    return len(classifier.encoder.encoder.layer)


def run_blocks(classifier: nn.Module, hidden: Tensor, attention_mask: Tensor, start: int, stop: int) -> Tensor:
    """Blocks ``start`` to ``stop - 1`` applied to ``hidden``, the output of block ``start - 1`` (0: the embeddings)."""
    return classifier._run_layers(hidden, attention_mask, list(classifier.encoder.encoder.layer[start:stop]))


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The unit-length mean of the real tokens' vectors: the sentence features the head reads (no parameters)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0), dim=-1)


def block_index(layer_name: str) -> int:
    """The transformer block a LoRA layer's module name belongs to (``...encoder.layer.4.attention...`` -> 4)."""
    match = _LAYER.search(layer_name)
    if match is None:
        raise ValueError(f"{layer_name!r} names no transformer block (expected '.layer.<i>.')")
    return int(match.group(1))


def frozen_output(classifier: nn.Module, batch: Mapping[str, Tensor], depth: int) -> Tensor:
    """The output of the embeddings and the first ``depth`` blocks, where nothing trains, as the unsplit model has it.

    Where the batch carries the testbed's cache (``hidden_states``, the output of the
    ``classifier.frozen_layers`` frozen blocks, computed once in evaluation mode), the frozen part runs
    without dropout, as the cache was computed, and the cache itself is returned at its depth;
    without a cache it runs in the model's mode, as the unsplit model's forward pass runs it.
    """
    cached = getattr(classifier, "frozen_layers", 0)
    with_cache = "hidden_states" in batch
    if with_cache and depth == cached:
        return batch["hidden_states"]
    was_training = classifier.training
    if with_cache:
        classifier.eval()
    try:
        with torch.no_grad():
            hidden = classifier.encoder.embeddings(input_ids=batch["input_ids"])
            return run_blocks(classifier, hidden, batch["attention_mask"], 0, depth)
    finally:
        classifier.train(was_training)


def client_activations(classifier: nn.Module, batch: Mapping[str, Tensor], cut: int) -> Tensor:
    """The output of the embeddings and blocks ``0 .. cut - 1``: what the client sends up at a cut after ``cut`` blocks.

    The frozen bottom (``classifier.frozen_layers`` blocks, no LoRA) is :func:`frozen_output` (the
    testbed's cache where the batch carries it); the blocks from there to the cut run as the unsplit
    model runs them (with its LoRA and dropout).
    """
    frozen = getattr(classifier, "frozen_layers", 0)
    if cut <= frozen:
        return frozen_output(classifier, batch, cut)
    start = frozen_output(classifier, batch, frozen)
    return run_blocks(classifier, start, batch["attention_mask"], frozen, cut)


def activation_message(activations: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
    """What the client sends up at the cut: the activations (float32), each sequence's length and, when the loss is
    computed on the server, the labels (int32)."""
    message = {"activations": activations.detach().to(torch.float32),
               "lengths": attention_mask.sum(dim=1).to(torch.int32)}
    if labels is not None:
        message["labels"] = labels.to(torch.int32)
    return message


def _mask_of(lengths: Tensor, width: int) -> Tensor:
    """The attention mask the server rebuilds from the lengths (padding at the end)."""
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).to(torch.int64)


def step_bytes(examples: int, width: int, hidden: int, placement: str) -> tuple[int, int]:
    """Bytes up and down of one local step's messages for a batch of ``examples`` sequences ``width`` tokens wide.

    ``"blocks"``: up the activations (examples x width x hidden float32), the lengths and the labels (int32
    each), down their gradient (the same size as the activations). ``"head"``: up the embeddings and the
    lengths, then the features' gradient (examples x hidden); down the features. What :func:`split_backward`
    sends (tested).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    activations = 4 * examples * width * hidden
    if placement == "blocks":
        return activations + 4 * examples + 4 * examples, activations
    return activations + 4 * examples + 4 * examples * hidden, 4 * examples * hidden


@dataclass
class SplitStep:
    """One local step of a split model: its loss and logits, and every message that crossed the cut, by direction."""

    loss: Tensor
    logits: Tensor
    up: list[dict[str, Tensor]] = field(default_factory=list)
    down: list[dict[str, Tensor]] = field(default_factory=list)

    @property
    def bytes_up(self) -> int:
        return sum(tensor_bytes(message) for message in self.up)

    @property
    def bytes_down(self) -> int:
        return sum(tensor_bytes(message) for message in self.down)


def split_backward(classifier: nn.Module, batch: Mapping[str, Tensor], placement: str, cut: int = 0, *,
                   client_side: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> SplitStep:
    """Forward and backward of one batch through the model cut in two; gradients accumulate on the parameters.

    The two parts meet only through the messages: the receiving side starts from a fresh leaf
    tensor holding what was sent, and the sending side back-propagates the gradient it receives for
    it. ``placement="blocks"``: the client runs the first ``cut`` blocks, the server the rest, the
    pooling, the head and the loss (the labels go up). ``placement="head"``: the client embeds, the
    server runs every block and the pooling, the client the head and the loss (``cut`` is ignored: 0).
    No optimiser step is taken: the caller steps each side's optimiser (they hold disjoint parameters).
    The client's computations run inside ``client_side()`` (how :func:`split_client_costs` counts them).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    mask, labels = batch["attention_mask"], batch["labels"]
    depth = depth_of(classifier)
    if placement == "blocks":
        if not 0 < cut < depth:
            raise ValueError(f"cut must be in 1..{depth - 1} (blocks on the client), got {cut!r}")
        with client_side():
            smashed = client_activations(classifier, batch, cut)
            up = activation_message(smashed, mask, labels)
        received = up["activations"].clone().requires_grad_(smashed.requires_grad)
        server_mask = _mask_of(up["lengths"], received.shape[1])
        hidden = run_blocks(classifier, received, server_mask, cut, depth)
        logits = classifier.classifier(mean_pool(hidden, server_mask))
        loss = F.cross_entropy(logits.float(), up["labels"].long())
        loss.backward()
        step = SplitStep(loss.detach(), logits.detach(), up=[up])
        if received.requires_grad:  # the cut layer's gradient goes back; the client back-propagates it
            down = {"gradient": received.grad.to(torch.float32)}
            with client_side():
                smashed.backward(down["gradient"])
            step.down.append(down)
        return step
    # placement "head": client embeddings | server body and pooling | client head and loss
    with client_side():
        embedded = frozen_output(classifier, batch, 0)
        up = activation_message(embedded, mask)
    server_mask = _mask_of(up["lengths"], up["activations"].shape[1])
    frozen = getattr(classifier, "frozen_layers", 0)
    # The server's frozen blocks give the same numbers whether run on the message or read from the testbed's cache
    # (up to float rounding); the cache saves the simulation their arithmetic.
    start = frozen_output(classifier, batch, frozen) if "hidden_states" in batch else \
        run_blocks(classifier, up["activations"], server_mask, 0, frozen)
    features = mean_pool(run_blocks(classifier, start, server_mask, frozen, depth), server_mask)
    down = {"features": features.detach().to(torch.float32)}
    with client_side():
        received = down["features"].clone().requires_grad_(True)
        logits = classifier.classifier(received)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        gradient = {"gradient": received.grad.to(torch.float32)}
    if features.requires_grad:
        features.backward(gradient["gradient"])
    return SplitStep(loss.detach(), logits.detach(), up=[up, gradient], down=[down])


# ----- the two placements, registered -----------------------------------------------------------------------------
class SplitMethod(Strategy):
    """A split-learning method: where the cut is, and what the server does with the clients' factors.

    It runs in its own loop, :func:`run_split` (the simulator's ``Federation.run`` refuses it). ``aggregate``
    is the method's rule for what is averaged; ``client_side`` says which LoRA layers and whether the head
    live on the client.
    """

    placement: ClassVar[str] = "head"
    batched_training = False

    def __init__(self, cut: int | None = None, average_every: int | None = None) -> None:
        super().__init__()
        if cut is not None and (isinstance(cut, bool) or not isinstance(cut, int) or cut < 1):
            raise ValueError(f"cut must be an integer >= 1 (blocks on the client), got {cut!r}")
        if average_every is not None and (isinstance(average_every, bool) or not isinstance(average_every, int)
                                          or average_every < 1):
            raise ValueError(f"average_every must be an integer >= 1 (client steps), got {average_every!r}")
        self.cut = cut
        self.average_every = average_every

    def cut_for(self, classifier: nn.Module) -> int:
        """The number of blocks on the client (0 for the head placement)."""
        return 0

    def client_side(self, layer_name: str, cut: int) -> bool:
        """Whether a LoRA layer lives on the client."""
        return self.placement == "blocks" and block_index(layer_name) < cut

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        raise TypeError(f"{self.name} is split learning: it runs in its own loop, "
                        f"fedlora_edu.efficiency.split.run_split(federation, strategy), not in Federation.run")


class SplitFederatedLoRA(SplitMethod):
    """Wang et al. 2024a: the client keeps the embeddings and the task head; the server runs the body with LoRA.

    Survey section 5, Figure 4 (a). Each sampled client's steps train a copy of the body's adapter on
    the server (a fresh AdamW per copy and round, as the simulator's clients); at the end of the
    round the server averages the copies with p_k = n_k / n (eq. 1) and the clients' heads likewise
    (when the head trains). These are FedIT's averages, and FedIT's training: the cut changes where
    the arithmetic runs and what crosses the network, not the result (tested against FedIT). What
    is ours (the paper's algorithm was not available to us beyond its abstract): the per-client copies
    and their FedAvg, and the pooling on the server's side of the cut.
    """

    name = "SplitFedLoRA"
    paper = "Wang, Zhou, Shi, Letaief 2024, arXiv 2407.02924 (the survey's Wang et al. 2024a)"
    chapter = "book/part4/split"
    placement = "head"

    def __init__(self) -> None:
        super().__init__()

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """FedAvg (p_k) of the server-side copies of the adapter and of the clients' heads."""
        weights = normalized_weights(uploads)
        adapters = {}
        for name in server.adapters:
            adapters[name] = (average_tensors([u.payload.tensors[f"{name}.A"] for u in uploads], weights),
                              average_tensors([u.payload.tensors[f"{name}.B"] for u in uploads], weights))
        server.adapters = adapters
        if server.head:
            self.aggregate_head(server, uploads)


class SplitLoRA(SplitMethod):
    """SplitLoRA (Lin et al. 2024) and FedsLLM: the client keeps the first ``cut`` blocks, the server the rest.

    Survey section 5, Figure 4 (b); the official code FDU-INC/Split_LoRA@a549b60 (``gpt2_ft_sfl.py``).
    One server-side model and optimiser for the whole run, updated by every client's step in turn;
    each client's own client-side adapter and AdamW (kept across rounds, as the code keeps one
    optimiser per client); every ``average_every`` client steps (counted over the round's clients, as
    the code counts ``train_step``; by default once a round) the participating clients' client-side A
    and B are replaced by their uniform mean (the code's ``fed_avg``), which :meth:`aggregate`
    computes. ``cut`` is the number of blocks on the client; by default the smallest that gives the
    client a LoRA module: one block above the frozen bottom (on the testbed under ``cpu``, where LoRA
    adapts the top two of six blocks, five blocks; with every block adapted, one).
    """

    name = "SplitLoRA"
    paper = "Lin et al. 2024, arXiv 2407.00952 (code FDU-INC/Split_LoRA@a549b60); FedsLLM, Zhao et al. 2024"
    chapter = "book/part4/split"
    placement = "blocks"

    def cut_for(self, classifier: nn.Module) -> int:
        frozen = getattr(classifier, "frozen_layers", 0)
        cut = frozen + 1 if self.cut is None else self.cut
        if not frozen < cut < depth_of(classifier):
            raise ValueError(f"cut must leave the client at least one adapted block and the server at least one: "
                             f"{frozen + 1}..{depth_of(classifier) - 1} here (the bottom {frozen} blocks carry no "
                             f"LoRA), got {cut}")
        return cut

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """The uniform mean of the uploaded client-side A and B (SplitLoRA's ``fed_avg``); other layers unchanged."""
        if not uploads:
            return
        weights = [1.0 / len(uploads)] * len(uploads)
        adapters = dict(server.adapters)
        for name in server.adapters:
            if f"{name}.A" in uploads[0].payload.tensors:
                adapters[name] = (average_tensors([u.payload.tensors[f"{name}.A"] for u in uploads], weights),
                                  average_tensors([u.payload.tensors[f"{name}.B"] for u in uploads], weights))
        server.adapters = adapters


# ----- the loop -----------------------------------------------------------------------------------------------------
def _factor_tensors(adapters: Mapping[str, Factors]) -> dict[str, Tensor]:
    out = {}
    for name, (a, b) in adapters.items():
        out[f"{name}.A"], out[f"{name}.B"] = a, b
    return out


def _lora_parameters(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    layers = adapter_io.lora_layers(model)
    return [p for name in names for p in (layers[name].lora_A[adapter_io.ADAPTER].weight,
                                          layers[name].lora_B[adapter_io.ADAPTER].weight)]


@dataclass
class _Traffic:
    cut_up: int = 0
    cut_down: int = 0
    adapter_up: int = 0
    adapter_down: int = 0
    examples: int = 0

    def add(self, step: SplitStep, examples: int) -> None:
        self.cut_up += step.bytes_up
        self.cut_down += step.bytes_down
        self.examples += examples


def run_split(
    federation: Any,
    strategy: SplitMethod,
    *,
    rounds: int | None = None,
    clients_per_round: int | None = None,
    local_steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    seed: int = 0,
    evaluate_rounds: bool | str = True,
    progress: bool = False,
    label: str | None = None,
    meter: SplitMeter | None = None,
) -> pd.DataFrame:
    """Play ``rounds`` rounds of a split-learning method on ``federation``; one history row per round.

    ``federation`` is a :class:`~fedlora_edu.simulation.federation.Federation` (its data, model,
    profile); unset arguments come from its profile, as in ``Federation.run``, and the clients'
    sampling and batches are the simulator's (the same seeds). ``evaluate_rounds``: True scores the
    shared test set after every round with :func:`~fedlora_edu.foundations.training.evaluate`,
    ``"last"`` after the last round only, False never; ``progress`` shows a bar over the rounds. The
    assembled model (every LoRA factor and the head, wherever they were trained) is
    ``run_split.last_model`` afterwards, the server's state ``run_split.last_server``.

    Bytes per round, summed over the round's clients: ``cut_bytes_*``, every message that crossed the
    cut; ``adapter_bytes_*``, the factors and head downloaded and uploaded (SplitLoRA's client-side
    factors at each averaging; the head when it trains); ``bytes_up`` and ``bytes_down``, their sums.
    """
    if not isinstance(strategy, SplitMethod):
        raise TypeError(f"run_split runs a split-learning method (SplitFedLoRA, SplitLoRA), got "
                        f"{type(strategy).__name__}")
    p = federation.profile
    rounds = p.rounds if rounds is None else rounds
    clients_per_round = min(p.clients_per_round, federation.num_clients) if clients_per_round is None \
        else clients_per_round
    local_steps = p.local_steps if local_steps is None else local_steps
    batch_size = p.batch_size if batch_size is None else batch_size
    learning_rate = p.learning_rate if learning_rate is None else learning_rate
    if rounds < 1 or local_steps < 1:
        raise ValueError(f"rounds and local_steps must be >= 1, got {rounds} and {local_steps}")
    if not 1 <= clients_per_round <= federation.num_clients:
        raise ValueError(f"clients_per_round must be in 1..{federation.num_clients}, got {clients_per_round}")
    if evaluate_rounds not in (True, False, "last"):
        raise ValueError(f"evaluate_rounds must be True, False or 'last', got {evaluate_rounds!r}")
    device = federation.device
    model = federation.fresh_model(seed=seed)
    classifier = split_classifier(model)
    cut = strategy.cut_for(classifier)
    server = ServerState(adapters=adapter_io.get_lora_factors(model), head=adapter_io.get_head_state(model),
                         scaling=adapter_io.lora_scaling(model), rank=adapter_io.model_rank(model), seed=seed,
                         method_state=strategy.new_state())
    names = list(server.adapters)
    client_names = [n for n in names if strategy.client_side(n, cut)]
    server_names = [n for n in names if n not in client_names]
    rng = np.random.default_rng(seed)
    train_loop = _train_head_placement if strategy.placement == "head" else _train_block_placement
    shared: dict[str, Any] = {}  # what SplitLoRA's server and clients keep across rounds (optimisers, adapters)
    rows = []
    name = label or strategy.name
    meter = meter or SplitMeter(counting=False)
    meter.weight_storages = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    for t in tqdm(range(rounds), desc=f"{label or strategy.name} [split]", disable=not progress, leave=False):
        server.round = t
        meter.reset()
        sampled = strategy.sample_clients(t, federation.num_clients, clients_per_round, rng)
        traffic = _Traffic()
        started = time.perf_counter()
        losses = train_loop(federation, strategy, model, classifier, server, sampled, t, cut=cut, seed=seed,
                            steps=local_steps, batch_size=batch_size, learning_rate=learning_rate, traffic=traffic,
                            client_names=client_names, server_names=server_names, shared=shared, device=device,
                            meter=meter)
        seconds = time.perf_counter() - started
        adapter_io.set_lora_factors(model, server.adapters)
        adapter_io.set_head_state(model, server.head)
        accuracy = test_loss = math.nan
        if evaluate_rounds is True or (evaluate_rounds == "last" and t == rounds - 1):
            accuracy, test_loss = evaluate(model, federation.test, device=device)
        rows.append({
            "round": t + 1, "method": name, "accuracy": accuracy, "test_loss": test_loss,
            "train_loss": float(np.mean(losses)), "client_accuracy": math.nan,
            "bytes_up": traffic.cut_up + traffic.adapter_up, "bytes_down": traffic.cut_down + traffic.adapter_down,
            "discordance": math.nan, "update_size": math.nan, "aggregation_error": math.nan,
            "server_seconds": seconds, "clients": len(sampled), "excluded": 0, "engine": "split",
            "clients_per_pass": 1, "cut_bytes_up": traffic.cut_up, "cut_bytes_down": traffic.cut_down,
            "adapter_bytes_up": traffic.adapter_up, "adapter_bytes_down": traffic.adapter_down,
            "cut_examples": traffic.examples,
        })
    run_split.last_model = model
    run_split.last_server = server
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


def _batches(data: ClientData, batch_size: int, seed: int, steps: int, device: torch.device) -> Iterator[dict]:
    """The simulator's batches of one client's round (:func:`~fedlora_edu.foundations.training.local_train`'s)."""
    sampler = BatchSampler(len(data), batch_size, seed)
    for _ in range(steps):
        yield trim_batch(data.subset(sampler.next()), device)


def _train_head_placement(federation, strategy, model, classifier, server, sampled, t, *, cut, seed, steps,
                          batch_size, learning_rate, traffic, client_names, server_names, shared, device, meter):
    """Wang et al.'s round: each client's steps train a server-side copy of the adapter (and its own head)."""
    uploads, losses = [], []
    head_bytes = tensor_bytes(server.head)
    for k in sampled:
        adapter_io.set_lora_factors(model, server.adapters)
        adapter_io.set_head_state(model, server.head)
        traffic.adapter_down += head_bytes  # the head, where it trains, is the client's download
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(parameters, learning_rate)  # the server's copy for client k and the client's head
        batch_seed = derive_seed(seed, "client batches", t, k)
        torch.manual_seed(batch_seed)  # dropout, as local_train seeds it
        model.train()
        client_losses = []
        for batch in _batches(federation.clients[k], batch_size, batch_seed, steps, device):
            optimizer.zero_grad(set_to_none=True)
            step = split_backward(classifier, batch, "head", client_side=meter.segment)
            meter.end_step()
            optimizer.step()
            traffic.add(step, int(batch["labels"].shape[0]))
            client_losses.append(float(step.loss))
        losses.append(float(np.mean(client_losses)))
        factors = adapter_io.get_lora_factors(model)
        head = adapter_io.get_head_state(model)
        traffic.adapter_up += head_bytes
        tensors = _factor_tensors(factors) | {f"head.{key}": value for key, value in head.items()}
        # The adapter copies never leave the server: only the head is a network upload.
        uploads.append(Upload(k, len(federation.clients[k]), Payload(tensors, nbytes=head_bytes), server.rank))
    strategy.aggregate(server, uploads, t)
    return losses


@torch.no_grad()
def _load_global(parameters: list[nn.Parameter], server: ServerState, client_names: list[str]) -> None:
    """A client's own client-side factors (A, B, A, B, ... in layer order) set to the server's averaged ones."""
    for index, layer in enumerate(client_names):
        parameters[2 * index].copy_(server.adapters[layer][0])
        parameters[2 * index + 1].copy_(server.adapters[layer][1])


def _train_block_placement(federation, strategy, model, classifier, server, sampled, t, *, cut, seed, steps,
                           batch_size, learning_rate, traffic, client_names, server_names, shared, device, meter):
    """SplitLoRA's round: the clients' steps in turn against one server-side model; client-side factors averaged."""
    layers = adapter_io.lora_layers(model)
    if "server_optimizer" not in shared:  # one server-side model and optimiser for the whole run
        adapter_io.set_lora_factors(model, server.adapters)
        adapter_io.set_head_state(model, server.head)
        server_parameters = _lora_parameters(model, server_names) + list(adapter_io.head_parameters(model).values())
        shared["server_optimizer"] = adamw(server_parameters, learning_rate)
        shared["clients"] = {}
    server_optimizer = shared["server_optimizer"]
    model_client_parameters = _lora_parameters(model, client_names)
    client_factor_bytes = tensor_bytes(_factor_tensors({n: server.adapters[n] for n in client_names}))
    own = {}
    for k in sampled:  # each sampled client downloads the averaged client-side adapter, keeps its own optimiser
        if k not in shared["clients"]:
            parameters = [nn.Parameter(p.detach().clone()) for p in model_client_parameters]
            shared["clients"][k] = (parameters, adamw(parameters, learning_rate))
        _load_global(shared["clients"][k][0], server, client_names)
        own[k] = shared["clients"][k]
        traffic.adapter_down += client_factor_bytes
    batches = {k: _batches(federation.clients[k], batch_size, derive_seed(seed, "client batches", t, k), steps, device)
               for k in sampled}
    torch.manual_seed(derive_seed(seed, "split dropout", t))
    model.train()
    total = len(sampled) * steps
    every = total if strategy.average_every is None else strategy.average_every
    if total % every:
        raise ValueError(f"average_every ({every}) must divide a round's client steps ({len(sampled)} clients x "
                         f"{steps} steps = {total}), so that a round ends with an average")
    losses: dict[int, list[float]] = {k: [] for k in sampled}
    done = 0
    for _ in range(steps):
        for k in sampled:  # "the client interacts with the server in turn"
            parameters, optimizer = own[k]
            with torch.no_grad():
                for target, value in zip(model_client_parameters, parameters, strict=True):
                    target.copy_(value)
            server_optimizer.zero_grad(set_to_none=True)
            for target in model_client_parameters:
                target.grad = None
            batch = next(batches[k])
            step = split_backward(classifier, batch, "blocks", cut, client_side=meter.segment)
            meter.end_step()
            server_optimizer.step()
            for value, target in zip(parameters, model_client_parameters, strict=True):
                value.grad = None if target.grad is None else target.grad.detach().clone()
            optimizer.step()
            traffic.add(step, int(batch["labels"].shape[0]))
            losses[k].append(float(step.loss))
            done += 1
            if done % every == 0:  # SplitLoRA's fed_avg of the client-side A and B
                uploads = []
                for j in sampled:
                    values = own[j][0]
                    tensors = {}
                    for index, layer in enumerate(client_names):
                        tensors[f"{layer}.A"] = values[2 * index].detach().clone()
                        tensors[f"{layer}.B"] = values[2 * index + 1].detach().clone()
                    uploads.append(Upload(j, len(federation.clients[j]), Payload(tensors), server.rank))
                    traffic.adapter_up += uploads[-1].payload.nbytes
                strategy.aggregate(server, uploads, t)
                last = done == total
                for j in sampled:
                    _load_global(own[j][0], server, client_names)
                    if not last:  # the last average of a round is next round's download
                        traffic.adapter_down += client_factor_bytes
    server.adapters = {name: server.adapters[name] if name in client_names else
                       (layers[name].lora_A[adapter_io.ADAPTER].weight.detach().clone(),
                        layers[name].lora_B[adapter_io.ADAPTER].weight.detach().clone()) for name in server.adapters}
    server.head = adapter_io.get_head_state(model)
    return [float(np.mean(values)) for values in losses.values()]


# ----- what a split client pays: the package's cost accounting, on the client's side of the cut ---------------------
class SplitMeter:
    """Counts the client's side of a split step (the segments :func:`split_backward` runs in ``client_side``).

    As :func:`fedlora_edu.efficiency.costs.client_costs` counts a whole local step: torch's ``FlopCounterMode``
    for the forward and backward FLOPs, and autograd's saved-tensor hooks for the activations a forward pass
    keeps for the backward one (the largest total of one step). With ``counting=False`` it counts nothing.
    """

    def __init__(self, counting: bool = True) -> None:
        self.counting = counting
        self.flops = 0
        self.activation_bytes = 0
        self._current = 0
        self._seen: set[tuple[int, int]] = set()
        self.weight_storages: set[int] = set()

    def reset(self) -> None:
        self.flops = self.activation_bytes = self._current = 0
        self._seen = set()

    def _pack(self, tensor: Tensor) -> Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in self._seen and key[0] not in self.weight_storages:  # a weight is no activation
            self._seen.add(key)
            self._current += key[1]
            self.activation_bytes = max(self.activation_bytes, self._current)
        return tensor

    @contextlib.contextmanager
    def segment(self) -> Iterator[None]:
        if not self.counting:
            yield
            return
        with FlopCounterMode(display=False) as counter, \
                torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield
        self.flops += int(counter.get_total_flops())

    def end_step(self) -> None:
        """A step is over: what its forward passes saved is freed."""
        self._current = 0
        self._seen = set()


def client_modules(classifier: nn.Module, strategy: SplitMethod, cut: int) -> list[nn.Module]:
    """The modules a split client holds: the embeddings, and the first ``cut`` blocks or the head."""
    held = [classifier.encoder.embeddings]
    if strategy.placement == "blocks":
        held += list(classifier.encoder.encoder.layer[:cut])
    else:
        held.append(classifier.classifier)
    return held


def split_client_costs(federation: Any, strategy: SplitMethod, *, rounds: int = 2, seed: int = 0,
                       **run_options: Any) -> ClientCost:
    """What a split client pays in a round: :class:`~fedlora_edu.efficiency.costs.ClientCost`, as ``client_costs``.

    :func:`run_split` for ``rounds`` rounds of one client each; the last client's round is counted on its side
    of the cut: the FLOPs of its segments of every local step, the weights of the modules it holds
    (:func:`client_modules`), its trainable numbers (SplitLoRA's client-side factors; SplitFedLoRA's head where
    it trains), the activations its forward passes save, and the bytes of the round (the cut's messages and the
    factors, read from the run's history). As for every method, the arithmetic counted is what the simulation
    runs: the testbed's cached frozen blocks are not recomputed, by the client or by anyone.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    for reserved in ("rounds", "clients_per_round", "seed", "meter"):
        if reserved in run_options:
            raise ValueError(f"split_client_costs sets {reserved} itself; it cannot be passed")
    meter = SplitMeter()  # reset at every round: it holds the last round's counts
    history = run_split(federation, strategy, rounds=rounds, clients_per_round=1, seed=seed, evaluate_rounds=False,
                        meter=meter, **run_options)
    model = run_split.last_model
    classifier = split_classifier(model)
    held = [p for module in client_modules(classifier, strategy, strategy.cut_for(classifier))
            for p in module.parameters()]
    trainable = [p for p in held if p.requires_grad]
    row = history.iloc[-1]
    steps = run_options.get("local_steps", federation.profile.local_steps)
    return ClientCost(method=strategy.name, steps=int(steps), flops=meter.flops,
                      trainable_parameters=sum(p.numel() for p in trainable),
                      weight_bytes=sum(p.numel() * p.element_size() for p in held),
                      trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
                      activation_bytes=meter.activation_bytes, bytes_up=int(row["bytes_up"]),
                      bytes_down=int(row["bytes_down"]))


# ----- leakage: what an attacker reads from what crosses the network ------------------------------------------------
# Two things cross the network in a federation: the activations at a cut (split learning, every step, per example)
# and an adapter's update (FedLoRA, once a round). An honest-but-curious server holds the pre-trained model (it is
# public, and in split learning the server runs part of it), so it can compute what any token looks like anywhere
# in the frozen model. The attacks below are deliberately simple; a stronger attack recovers at least as much.
def attacked_positions(data: ClientData, exclude: Sequence[int] = ()) -> Tensor:
    """The (example, position) pairs an attack is scored on: real tokens (not padding), none of ``exclude``
    (the tokenizer's special tokens, which every sequence holds)."""
    keep = data.attention_mask.bool()
    if len(exclude):
        keep &= ~torch.isin(data.input_ids, torch.as_tensor(list(exclude)))
    return keep


@torch.no_grad()
def cut_activations(classifier: nn.Module, data: ClientData, depths: Sequence[int], *,
                    exclude: Sequence[int] = (), batch_size: int = 64) -> tuple[dict[int, Tensor], Tensor, Tensor]:
    """The frozen model's token vectors at each cut depth in ``depths`` (0: the embeddings' output), at the attacked
    positions: ``({depth: activations N x hidden}, token ids N, positions N)``, in evaluation mode (no dropout)."""
    depth_all = depth_of(classifier)
    if not depths or any(not 0 <= d <= depth_all for d in depths):
        raise ValueError(f"depths must lie in 0..{depth_all}, got {list(depths)}")
    was_training = classifier.training
    classifier.eval()
    keep = attacked_positions(data, exclude)
    out: dict[int, list[Tensor]] = {d: [] for d in depths}
    try:
        for start in range(0, len(data), batch_size):
            ids, mask = data.input_ids[start:start + batch_size], data.attention_mask[start:start + batch_size]
            chosen = keep[start:start + batch_size]
            hidden = classifier.encoder.embeddings(input_ids=ids)
            for depth in range(max(depths) + 1):
                if depth:
                    hidden = run_blocks(classifier, hidden, mask, depth - 1, depth)
                if depth in out:
                    out[depth].append(hidden[chosen].float())
    finally:
        classifier.train(was_training)
    positions = torch.arange(data.input_ids.shape[1]).expand_as(data.input_ids)[keep]
    return {d: torch.cat(parts) for d, parts in out.items()}, data.input_ids[keep], positions


def nearest_token_attack(reference: Tensor, reference_ids: Tensor, activations: Tensor, chunk: int = 2048) -> Tensor:
    """A learned inversion: each activation gets the token of its nearest neighbour (cosine) among ``reference``,
    activations of the same depth computed on public text whose tokens are known (``reference_ids``).

    It can only name tokens the public text holds; on those, it is the attack a server mounts with the public
    model and any text at hand.
    """
    if reference.shape[0] != reference_ids.shape[0] or reference.ndim != 2 or activations.ndim != 2:
        raise ValueError("reference (N x d) and reference_ids (N) must match; activations must be M x d")
    keys = F.normalize(reference.float(), dim=1)
    found = [reference_ids[(F.normalize(activations[i:i + chunk].float(), dim=1) @ keys.T).argmax(dim=1)]
             for i in range(0, activations.shape[0], chunk)]
    return torch.cat(found) if found else reference_ids[:0]


def embedding_dictionary_attack(dictionary: Tensor, activations: Tensor, exclude: Sequence[int] = (),
                                chunk: int = 1024) -> Tensor:
    """The attack on a cut at depth 0: each activation gets the vocabulary token whose entry of ``dictionary`` is
    nearest (Euclidean); ``dictionary`` is :func:`first_layer_dictionary`, what every token looks like leaving
    the embeddings (the embedding table is public: the server holds the pre-trained model).

    The dictionary averages the position embeddings (the position's own is small next to the word's), so the
    attack does not need to know where a token sat; tokens whose embeddings nearly coincide can be confused.
    """
    norms = dictionary.float().square().sum(dim=1)
    excluded = torch.as_tensor(list(exclude), dtype=torch.long)
    found = []
    for start in range(0, activations.shape[0], chunk):
        # ||a - t||^2 = ||a||^2 - 2 a.t + ||t||^2; the first term is the same for every candidate t
        distances = norms[None, :] - 2 * activations[start:start + chunk].float() @ dictionary.float().T
        if excluded.numel():
            distances[:, excluded] = math.inf
        found.append(distances.argmin(dim=1))
    return torch.cat(found) if found else torch.empty(0, dtype=torch.long)


def recovered_share(predicted: Tensor, true: Tensor) -> float:
    """The share of token positions whose token the attack got right."""
    if predicted.shape != true.shape or true.numel() == 0:
        raise ValueError(f"predicted {tuple(predicted.shape)} and true {tuple(true.shape)} must match and be non-empty")
    return float((predicted == true).float().mean())


def named_share(named: Tensor, true: Tensor) -> float:
    """The share of token positions whose token is among the tokens an attack ``named`` (a bag of words: an
    update does not say where a token was)."""
    if true.numel() == 0:
        raise ValueError("true holds no token")
    return float(torch.isin(true, named).float().mean())


@torch.no_grad()
def first_layer_dictionary(classifier: nn.Module) -> Tensor:
    """What each vocabulary token looks like entering the first block (vocabulary x hidden): the embeddings' output
    with the position embeddings averaged over the positions (a token's position is unknown to an update's
    attacker), in evaluation mode."""
    embeddings = classifier.encoder.embeddings
    positions = embeddings.position_embeddings.weight.mean(dim=0)
    token_type = embeddings.token_type_embeddings.weight[0]
    return embeddings.LayerNorm(embeddings.word_embeddings.weight + positions + token_type).float()


def block_update_rows(change: Mapping[str, Factors], block: int = 0) -> Tensor:
    """The rows of the A-changes of every LoRA layer in ``block``, stacked: for one gradient step,
    dA = -lr s B^T G^T X, so each row is a combination of the block's input token vectors (the rows of X)."""
    rows = [a for name, (a, _) in change.items() if block_index(name) == block]
    if not rows:
        raise ValueError(f"no LoRA layer of block {block} in the change")
    return torch.cat(rows).float()


def update_attack(dictionary: Tensor, rows: Tensor, count: int, exclude: Sequence[int] = ()) -> Tensor:
    """Gradient inversion on an update of the first block's A: the ``count`` tokens whose input vectors lie most
    in the span of the update's rows (the share of a token vector's norm inside that span, ranked).

    With one example's update, the span (at most 2r dimensions for the query and value) nearly holds its few
    token vectors; with many examples, their tokens outnumber the dimensions and the span holds no token
    much more than another.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    _, singular, right = torch.linalg.svd(rows.double(), full_matrices=False)
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        raise ValueError("the update is zero: it holds nothing to attack (B = 0 makes LoRA's first A-gradient zero)")
    basis = right[singular > singular[0] * 1e-6].to(dictionary.dtype)
    score = (dictionary @ basis.T).norm(dim=1) / dictionary.norm(dim=1).clamp_min(1e-12)
    if len(exclude):
        score[torch.as_tensor(list(exclude))] = -1.0
    return score.topk(count).indices
