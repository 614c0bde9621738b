"""Offsite tuning (survey section 5, compressed learning): clients tune adapters on a compressed emulator of the model.

FedBiOT (Wu et al., KDD 2024, arXiv 2406.17706) is for a model its owner will not give away and
clients could not run anyway. The server splits the transformer blocks in two:

- the **adapter**: the top blocks (by default the last two, the authors' ``emu_r`` setting that
  leaves two blocks above the emulator), where the clients' LoRA modules live;
- the **emulator**: the blocks below, compressed by *layer dropping* (:func:`kept_layers`: of the n
  blocks, round(n (1 - drop_ratio)) are kept at an even stride, as in the authors' code,
  ``drop_ratio`` 0.2 as in their configurations) and then *aligned* with the full model by
  knowledge distillation on public data the federation does not train on (:func:`distill_emulator`:
  the emulator's output is pulled towards the output of the full blocks it replaces, with the
  normalised squared distance of the authors' code, ``||h_full - h_emu||^2 / mean(h_full^2)``).

Each client downloads the emulator once, fine-tunes the adapter's LoRA factors (A r x n, B m x r,
dW = B A, survey eq. 2) on its own data through the frozen emulator, with the proximal term
``proximal * ||theta - theta_start||^2`` on the adapter that the authors' client trainer adds, and
uploads the adapter's factors only; the server averages them with the weights p_k (survey eq. 1)
and plugs them into the **full** model, which is what is evaluated.

Our choices, where the paper's schedule is unknown to us or too costly here: by default the emulator is
aligned once, before round 1 (the authors' configurations pre-align it for 50 rounds of 10 steps and then
re-align it on the server before every round, the lower level of their bi-level problem, so that
their clients download the new emulator each round; aligned once, each client downloads it
once, counted in its first download). ``FedBiOT(realign_every=e)`` re-aligns it on the server after the
aggregation of every e-th round, ``distill_steps`` more steps on the same public texts from where the
emulator stands (a fresh optimiser each time, batches drawn anew), so that e = 1 is the authors' schedule;
its time is part of the round's server time, and a client that holds an older emulator downloads the
re-aligned blocks' weights before it trains (:func:`emulator_update_bytes`, counted in its download
as the first download is); ``distill_steps`` AdamW steps (default 20, batches of 16) at
``distill_learning_rate`` 1e-4 (their alignment inherits their clients' 5e-4; on the tiny test
federation 12 steps of 8 texts at 5e-4 raised the KL below, at 1e-4 lowered it) on two thirds of
``public_examples`` (96) texts of ``public_data`` (default the CrowdFlower sentiment tweets, which
neither the testbed nor the tests federate), in eval mode (no dropout); the distance alone, without
the KL term their code can add (weighted 0 in their configurations); ``proximal`` 1.0, their weight
of the term. The emulator's blocks start as the pre-trained blocks at the kept positions (as in
their code). The KL between the full model's and the emulator's class distributions on held-out
public texts measures the alignment (:func:`alignment`). When the federation caches the frozen
bottom blocks' output (the testbed), the clients' cached inputs are recomputed once through the
emulator, since a client has no full model to compute them with, in eval mode (no dropout, as the
federation computes its own cache), and after each re-alignment again before the client's next round.
Taught in ``book/part4/compression.ipynb``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedlora_edu.assets.data import load_text_classification
from fedlora_edu.assets.models import MeanPoolingClassifier, resolve_model
from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import ClientStart, Payload, ServerState, Upload
from fedlora_edu.efficiency.layers import LayerSparseStrategy, _layer_module, _skip, layer_of
from fedlora_edu.foundations.training import BatchSampler, ClientData, tokenize, trim_batch

VALUE_BYTES = 4


def kept_layers(num_layers: int, drop_ratio: float) -> list[int]:
    """Which of ``num_layers`` blocks the emulator keeps: round(n (1 - drop_ratio)) of them, evenly spaced.

    The i-th kept block is ``int(i (n - 1) / (k - 1))``, so the first and the last are always kept
    (the authors' layer-dropping rule); with k = 1 only the first is kept.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)) or not 0 <= drop_ratio < 1:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio!r}")
    kept = max(1, int(round(num_layers * (1 - drop_ratio))))
    if kept == 1:
        return [0]
    stride = (num_layers - 1) / (kept - 1)
    return sorted({int(i * stride) for i in range(kept)})


def normalized_gap(student: Tensor, teacher: Tensor) -> Tensor:
    """The distillation loss: the mean squared difference over the teacher's mean square."""
    return (teacher - student).pow(2).mean() / teacher.pow(2).mean()


def _classifier(model: nn.Module) -> MeanPoolingClassifier:
    for module in model.modules():
        if isinstance(module, MeanPoolingClassifier):
            return module
    raise ValueError("FedBiOT's emulator needs a mean-pooling classifier (the embedded encoder)")


def _base_parameters(block: nn.Module) -> dict[str, nn.Parameter]:
    """A block's pre-trained weights W' (its LoRA factors left out)."""
    return {name: parameter for name, parameter in block.named_parameters() if "lora_" not in name}


@dataclass
class Emulator:
    """The compressed blocks: ``layers`` (the blocks it stands for), ``kept`` among them, and their weights.

    ``weights[i]`` holds block i's pre-trained weights as aligned by :func:`distill_emulator`.
    """

    layers: list[int]
    kept: list[int]
    weights: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def dropped(self) -> list[int]:
        return [i for i in self.layers if i not in self.kept]


def build_emulator(model: nn.Module, num_layers: int, drop_ratio: float) -> Emulator:
    """The emulator of the first ``num_layers`` blocks of ``model``: the kept blocks' pre-trained weights, copied."""
    depth = len(_classifier(model).encoder.encoder.layer)
    if not 1 <= num_layers < depth:
        raise ValueError(f"the emulator stands for 1..{depth - 1} of the model's {depth} blocks, got {num_layers}")
    layers = list(range(num_layers))
    kept = [layers[i] for i in kept_layers(num_layers, drop_ratio)]
    weights = {i: {name: p.detach().clone() for name, p in _base_parameters(_layer_module(model, i)).items()}
               for i in kept}
    return Emulator(layers, kept, weights)


@contextlib.contextmanager
def emulator_installed(model: nn.Module, emulator: Emulator) -> Iterator[None]:
    """Run ``model`` as the emulator: dropped blocks pass their input on, kept blocks hold the emulator's weights.

    Everything is restored on exit; inside, the kept blocks' parameters are the model's own
    (so that :func:`distill_emulator` can train them), holding the emulator's values.
    """
    skipped, saved = [], []
    try:
        with torch.no_grad():
            for i in emulator.kept:
                for name, parameter in _base_parameters(_layer_module(model, i)).items():
                    saved.append((parameter, parameter.detach().clone()))
                    parameter.copy_(emulator.weights[i][name])
        for i in emulator.dropped:
            block = _layer_module(model, i)
            block.forward = _skip
            skipped.append(block)
        yield
    finally:
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)
        for block in skipped:
            del block.forward


def _output_of(model: nn.Module, layer: int, batch: dict[str, Tensor]) -> Tensor:
    """The token vectors leaving block ``layer`` when ``model``'s encoder reads ``batch``."""
    captured = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = _layer_module(model, layer).register_forward_hook(keep)
    try:
        _classifier(model).encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return captured[0]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def alignment(model: nn.Module, emulator: Emulator, data: ClientData, batch_size: int = 32) -> tuple[float, float]:
    """How far the emulator is from the full model on ``data``: (distillation loss, KL), one pass of each model.

    The distillation loss is :func:`normalized_gap` of the emulator's output against the full blocks',
    averaged over batches; the KL is the mean KL(full model || model with the emulator) of the class
    distributions the model's head gives.
    """
    training, device, gaps, kl = model.training, _device(model), [], 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = trim_batch(data.subset(list(range(start, min(start + batch_size, len(data))))), device)
            batch.pop("labels")
            teacher, full = _output_and_logits(model, emulator.layers[-1], batch)
            with emulator_installed(model, emulator):
                student, emulated = _output_and_logits(model, emulator.layers[-1], batch)
            gaps.append(float(normalized_gap(student, teacher)))
            kl += float(F.kl_div(emulated, full, log_target=True, reduction="sum"))
    model.train(training)
    return float(np.mean(gaps)), kl / len(data)


def _output_and_logits(model: nn.Module, layer: int, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The token vectors leaving block ``layer`` and the log-probabilities of the classes, in one forward pass."""
    captured = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = _layer_module(model, layer).register_forward_hook(keep)
    try:
        logits = model(**batch).logits
    finally:
        handle.remove()
    return captured[0], F.log_softmax(logits.float(), dim=-1)


def emulator_gap(model: nn.Module, emulator: Emulator, data: ClientData, batch_size: int = 32) -> float:
    """The distillation loss (:func:`normalized_gap`) of the emulator's output on ``data``, averaged over batches."""
    return alignment(model, emulator, data, batch_size)[0]


def emulator_kl(model: nn.Module, emulator: Emulator, data: ClientData, batch_size: int = 32) -> float:
    """Mean KL(full model || model with the emulator) of the class distributions the model's head gives on ``data``."""
    return alignment(model, emulator, data, batch_size)[1]


def distill_emulator(model: nn.Module, emulator: Emulator, data: ClientData, *, steps: int, batch_size: int,
                     learning_rate: float, seed: int = 0) -> list[float]:
    """Align the emulator with the full model on ``data``: AdamW on the kept blocks' weights; returns each step's loss.

    Each step, the output of the full blocks the emulator stands for (the teacher, computed first,
    without gradient) and the emulator's output on the same batch are compared with
    :func:`normalized_gap`; only the emulator's weights change (``emulator.weights`` is updated,
    ``model`` is left as it was).
    """
    if steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and learning_rate > 0, got {steps}, {batch_size}, "
                         f"{learning_rate}")
    device, training = _device(model), model.training
    sampler = BatchSampler(len(data), min(batch_size, len(data)), seed)
    batches = [trim_batch(data.subset(sampler.next()), device) for _ in range(steps)]
    model.eval()
    with torch.no_grad():
        teachers = [_output_of(model, emulator.layers[-1], batch) for batch in batches]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    losses = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with emulator_installed(model, emulator):
            trained = {i: _base_parameters(_layer_module(model, i)) for i in emulator.kept}
            parameters = [p for block in trained.values() for p in block.values()]
            for p in parameters:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
            for batch, teacher in zip(batches, teachers, strict=True):
                loss = normalized_gap(_output_of(model, emulator.layers[-1], batch), teacher)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            emulator.weights = {i: {name: p.detach().clone() for name, p in block.items()}
                                for i, block in trained.items()}
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(training)
    return losses


def public_data(name: str, examples: int, max_length: int, seed: int = 0) -> ClientData:
    """``examples`` texts of the embedded data set ``name``, tokenised for the embedded encoder (labels unused)."""
    from transformers import AutoTokenizer

    dataset = load_text_classification(name, max_examples=examples, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded"))
    return tokenize(list(dataset["text"]), list(dataset["label"]), tokenizer, max_length)


def emulator_update_bytes(emulator: Emulator) -> int:
    """What a client that holds an older emulator downloads after a re-alignment: the kept blocks' weights.

    Distillation changes only those (:func:`distill_emulator`); the embeddings and the adapter's blocks
    a client already holds stay as they were. Their dense size, as serialized.
    """
    return adapter_io.tensor_bytes([value for block in emulator.weights.values() for value in block.values()])


def emulator_bytes(model: nn.Module, emulator: Emulator) -> int:
    """The size of the compressed model a client downloads once: every pre-trained weight but the dropped blocks'.

    The embeddings, the emulator's kept blocks and the adapter's blocks, 4 bytes a number; the LoRA
    factors and the head are counted in the rounds' payloads.
    """
    classifier = _classifier(model)
    dropped = {id(p) for i in emulator.dropped for p in _layer_module(model, i).parameters()}
    head = {id(p) for p in classifier.classifier.parameters()}
    return VALUE_BYTES * sum(p.numel() for name, p in classifier.named_parameters()
                             if "lora_" not in name and id(p) not in dropped and id(p) not in head)


class FedBiOT(LayerSparseStrategy):
    """FedBiOT (Wu et al., KDD 2024, arXiv 2406.17706): LoRA adapters tuned on a distilled, layer-dropped emulator.

    The blocks below the top ``adapter_layers`` form the emulator: ``drop_ratio`` of them dropped
    (:func:`kept_layers`), the rest aligned with the full model by distillation on public data
    (:func:`distill_emulator`) in :meth:`prepare`, before round 1. Client k trains the LoRA factors
    (A, B) of the adapter's blocks only, through the frozen emulator, with the proximal term
    ``proximal * ||theta - theta_start||^2`` of the authors' client (added to the gradient before each
    optimiser step), and sends them with the head; the server averages them with the weights p_k (FedIT
    on the adapter, survey eq. 1) and evaluates the full model with them plugged in. The first download
    of each client carries the compressed model (:func:`emulator_bytes`), once; every round's payload
    is the adapter's factors and the head. See the module docstring for what follows the authors' code
    and what is our choice (by default the emulator is aligned once, not before every round). The run's
    alignment is kept in ``server.method_state``: the emulator, and the distillation loss and KL
    before and after it on held-out public texts.

    ``realign_every`` e >= 1 adds the authors' lower level: after the aggregation of rounds e, 2e, ...
    the server re-aligns the emulator (:meth:`realign`; its time falls in the round's ``server_seconds``,
    each re-alignment's round, losses and seconds are kept in ``server.method_state.realignments``), and
    the next download of every client that holds an older emulator carries the re-aligned blocks
    (:func:`emulator_update_bytes`). The default 0 never re-aligns (what the stored studies ran). The server
    re-aligns after every e-th round, the last one included, since it cannot know that no round follows.
    """

    name = "FedBiOT"
    paper = "Wu et al. 2024, KDD, arXiv 2406.17706"
    chapter = "book/part4/compression"

    @dataclass
    class State:
        """The emulator, the alignment's measurements, and the clients' inputs recomputed through it (if cached).

        With re-alignment: the server's model and public texts it re-aligns with, the emulator's ``version``
        (0 before the first re-alignment), the size of a re-aligned download, one record per re-alignment, and
        the version each client's recomputed inputs were taken with.
        """

        emulator: Emulator | None = None
        emulator_bytes: int = 0
        distill_losses: list[float] = field(default_factory=list)
        gap_before: float = float("nan")
        gap_after: float = float("nan")
        kl_before: float = float("nan")
        kl_after: float = float("nan")
        federation: Any = None
        hidden: dict[int, Tensor] = field(default_factory=dict)
        model: Any = None
        public_train: Any = None
        version: int = 0
        update_bytes: int = 0
        realignments: list[dict[str, Any]] = field(default_factory=list)
        hidden_version: dict[int, int] = field(default_factory=dict)

    @dataclass
    class ClientState(LayerSparseStrategy.ClientState):
        """Besides its layers: whether the client holds the emulator yet, which version, and the server's state."""

        has_emulator: bool = False
        emulator_version: int = 0
        server_state: Any = None

    def __init__(self, adapter_layers: int = 2, drop_ratio: float = 0.2, *, proximal: float = 1.0,
                 public_data: str = "tweet_sentiment", public_examples: int = 96, distill_steps: int = 20,
                 distill_batch_size: int = 16, distill_learning_rate: float = 1e-4, realign_every: int = 0) -> None:
        super().__init__(None)
        if isinstance(realign_every, bool) or not isinstance(realign_every, int) or realign_every < 0:
            raise ValueError(f"realign_every must be an integer >= 0 (0: align once), got {realign_every!r}")
        self.realign_every = realign_every
        if isinstance(adapter_layers, bool) or not isinstance(adapter_layers, int) or adapter_layers < 1:
            raise ValueError(f"adapter_layers must be an integer >= 1, got {adapter_layers!r}")
        kept_layers(1, drop_ratio)  # checks drop_ratio
        if isinstance(proximal, bool) or not isinstance(proximal, (int, float)) or proximal < 0:
            raise ValueError(f"proximal must be >= 0, got {proximal!r}")
        if public_examples < 4 or distill_steps < 1 or distill_batch_size < 1 or not distill_learning_rate > 0:
            raise ValueError("need public_examples >= 4, distill_steps >= 1, distill_batch_size >= 1 and "
                             "distill_learning_rate > 0")
        self.adapter_layers, self.drop_ratio, self.proximal = adapter_layers, float(drop_ratio), float(proximal)
        self.public_data, self.public_examples = public_data, int(public_examples)
        self.distill_steps, self.distill_batch_size = int(distill_steps), int(distill_batch_size)
        self.distill_learning_rate = float(distill_learning_rate)

    def adapter_blocks(self, model_or_names: nn.Module | list[str]) -> list[int]:
        """The blocks of the adapter: the top ``adapter_layers`` blocks that carry LoRA modules."""
        names = model_or_names if isinstance(model_or_names, list) else list(adapter_io.lora_layers(model_or_names))
        adapted = sorted({layer_of(name) for name in names})
        if len(adapted) < self.adapter_layers:
            raise ValueError(f"the model adapts {len(adapted)} blocks; the adapter needs {self.adapter_layers}")
        return adapted[-self.adapter_layers:]

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        """Build the emulator, align it on held-out public data, and recompute cached client inputs through it."""
        state = server.method_state
        blocks = self.adapter_blocks(model)
        emulator = build_emulator(model, blocks[0], self.drop_ratio)
        public = public_data(self.public_data, self.public_examples, federation.profile.max_length, seed=seed)
        held_out = len(public) // 3
        train, test = public.subset(list(range(held_out, len(public)))), public.subset(list(range(held_out)))
        state.gap_before, state.kl_before = alignment(model, emulator, test)
        state.distill_losses = distill_emulator(model, emulator, train, steps=self.distill_steps,
                                                batch_size=self.distill_batch_size,
                                                learning_rate=self.distill_learning_rate, seed=seed)
        state.gap_after, state.kl_after = alignment(model, emulator, test)
        state.emulator, state.emulator_bytes, state.federation = emulator, emulator_bytes(model, emulator), federation
        state.update_bytes = emulator_update_bytes(emulator)
        if self.realign_every:
            state.model, state.public_train = model, train
        classifier = _classifier(model)
        if classifier.frozen_layers:  # in eval mode: a frozen bottom's output carries no dropout
            training = model.training
            model.eval()
            with torch.no_grad(), emulator_installed(model, emulator):
                state.hidden = {k: _bottom(classifier, data) for k, data in enumerate(federation.clients)}
            model.train(training)

    def client_layers(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> list[int]:
        return self.adapter_blocks(list(server.adapters))

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        """The adapter's factors and the head; the compressed model too, the first time (counted once).

        After a re-alignment, a client holding an older emulator also downloads the re-aligned blocks.
        """
        start = super().client_start(server, client_id, client_state, round_index)
        state = client_state.server_state = server.method_state
        if not client_state.has_emulator:
            client_state.has_emulator = True
            start.download = Payload(start.download.tensors, start.download.nbytes + state.emulator_bytes)
        elif client_state.emulator_version < state.version:
            start.download = Payload(start.download.tensors, start.download.nbytes + state.update_bytes)
        client_state.emulator_version = state.version
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """FedIT on the adapter (the layer-sparse average); then, every ``realign_every`` rounds, :meth:`realign`."""
        super().aggregate(server, uploads, round_index)
        if self.realign_every and (round_index + 1) % self.realign_every == 0:
            self.realign(server, round_index)

    def realign(self, server: ServerState, round_index: int) -> list[float]:
        """The lower level of the bi-level problem: ``distill_steps`` more steps of :func:`distill_emulator`.

        On the server's model and the public texts :meth:`prepare` distilled on, with batches drawn from a
        seed derived from the run's and the round; the emulator's version goes up by one. Returns the losses.
        """
        state = server.method_state
        if state.model is None or state.emulator is None:
            raise ValueError("realign needs prepare() to have run with realign_every >= 1")
        started = time.perf_counter()
        losses = distill_emulator(state.model, state.emulator, state.public_train, steps=self.distill_steps,
                                  batch_size=self.distill_batch_size, learning_rate=self.distill_learning_rate,
                                  seed=derive_seed(server.seed, "FedBiOT realign", round_index))
        state.version += 1
        state.update_bytes = emulator_update_bytes(state.emulator)
        state.realignments.append({"round": round_index + 1, "losses": losses,
                                   "seconds": time.perf_counter() - started})
        return losses

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """The adapter trains (the rest frozen) through the emulator, with the proximal term on its factors."""
        state = client_state.server_state
        trained = [p for name, layer in adapter_io.lora_layers(model).items() if layer_of(name) in client_state.layers
                   for p in (layer.lora_A[adapter_io.ADAPTER].weight, layer.lora_B[adapter_io.ADAPTER].weight)]
        anchors = [p.detach().clone() for p in trained]

        def proximal_gradient(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for p, anchor in zip(trained, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_(2 * self.proximal * (p.detach() - anchor))

        data = state.federation.clients[client_state.client_id] if state.hidden else None
        cached = None if data is None else data.hidden
        if data is not None and state.hidden_version.get(client_state.client_id, 0) < state.version:
            # re-aligned since this client's inputs were computed: through the new emulator, as the client would
            classifier, training = _classifier(model), model.training
            model.eval()
            with torch.no_grad(), emulator_installed(model, state.emulator):
                state.hidden[client_state.client_id] = _bottom(classifier, data)
            model.train(training)
            state.hidden_version[client_state.client_id] = state.version
        handle = register_optimizer_step_pre_hook(proximal_gradient) if self.proximal > 0 else None
        try:
            if data is not None:
                data.hidden = state.hidden[client_state.client_id]
            with super().local_training(model, start, client_state, round_index), \
                    emulator_installed(model, state.emulator):
                yield
        finally:
            if handle is not None:
                handle.remove()
            if data is not None:
                data.hidden = cached


def _bottom(classifier: nn.Module, data: ClientData, batch_size: int = 64) -> Tensor:
    """The frozen bottom's output for every example of ``data`` (through whatever blocks the model holds now)."""
    device = _device(classifier)
    parts = [classifier.bottom(data.input_ids[i:i + batch_size].to(device),
                               data.attention_mask[i:i + batch_size].to(device)).cpu()
             for i in range(0, len(data), batch_size)]
    return torch.cat(parts)
