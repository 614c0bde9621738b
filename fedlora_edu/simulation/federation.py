"""The federated simulator: survey eq. 3 on one machine.

A :class:`Federation` holds K clients' tokenised data, a held-out test set and the
pre-trained model. :meth:`Federation.run` plays communication rounds of any
:class:`~fedlora_edu.core.strategy.Strategy`: sample clients, let each download its start
(``client_start``), train locally with gradient steps on its own data, upload
(``client_upload``), aggregate on the server, fold any change of the frozen weights
into the base model, and evaluate. Each round becomes one row of a pandas DataFrame
with the bytes really sent up and down.

Every run starts from a fresh copy of the same pre-trained model, client batches are
drawn from generators seeded by (seed, round, client) through
:func:`~fedlora_edu.core.seeds.derive_seed`, so two runs with the same seed
give the same history on CPU, and different methods see the same batches.

The sampled clients of a round train either one after another in one peft model
(:meth:`Federation.train_sequential`, the reference) or all at once, batched over a client
dimension (:meth:`Federation.train_batched`, :mod:`fedlora_edu.simulation.engine`); ``run(engine=...)``
chooses, and by default takes the batched engine wherever it applies.

Taught in ``book/part1/federated_learning.ipynb`` and ``book/part1/fedlora.ipynb``; the
engine in ``book/fast/engine.ipynb``.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedlora_edu.assets import data as data_sets
from fedlora_edu.assets.models import MeanPoolingClassifier, add_lora, load_classifier
from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.device import default_device
from fedlora_edu.core.factors import discordance, ideal_update
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import LocalResult, ServerState, Strategy, Upload, all_finite
from fedlora_edu.foundations import partition
from fedlora_edu.foundations.fedavg import best_linear_probe
from fedlora_edu.foundations.training import (
    BatchSampler,
    ClientData,
    evaluate,
    local_train,
    make_optimizer,
    set_trainable,
    tokenize,
    trim_batch,
)
from fedlora_edu.simulation.engine import (
    ClientJob,
    check_clients_per_pass,
    train_clients_in_groups,
    unsupported_reason,
)
from fedlora_edu.simulation.profiles import Profile, get_profile

HISTORY_COLUMNS = [
    "round", "method", "accuracy", "test_loss", "train_loss", "client_accuracy",
    "bytes_up", "bytes_down", "discordance", "update_size", "aggregation_error", "server_seconds", "clients",
    "excluded",
    "engine", "clients_per_pass",
]
ENGINES = ("auto", "batched", "sequential")
HEADS = ("trained", "probe")


def layer_discordance(results: list[LocalResult], weights: list[float], scaling: float) -> float:
    """Discordance of these client adapters in effective-weight units, over all layers.

    sqrt(sum over layers of ||avg(B) avg(A) - sum p_k B_k A_k||_F^2) times alpha / r;
    NaN when client ranks differ (separate averaging is then undefined).
    """
    if not results or len({r.rank for r in results}) != 1:
        return math.nan
    total = 0.0
    for name in results[0].adapters:
        As = [r.adapters[name][0] for r in results]
        Bs = [r.adapters[name][1] for r in results]
        total += discordance(As, Bs, weights) ** 2
    return scaling * math.sqrt(total)


def update_size(starts: list[dict[str, tuple[Tensor, Tensor]]], results: list[LocalResult], weights: list[float],
                scaling: float) -> float:
    """The size of the round's ideal update, in the units of the discordance, over all layers.

    s sqrt(sum over layers of ||sum_k p_k (B_k A_k - B_k^0 A_k^0)||_F^2), with (A_k^0, B_k^0) the
    adapter client k started the round from: the weighted average of what the clients' training
    added to their weights (survey eq. 4's right side, minus the start). The discordance divided
    by it is how large the error of separate averaging is relative to what the round learned.
    NaN without results.
    """
    if not results:
        return math.nan
    total = 0.0
    for name in results[0].adapters:
        change = sum(w * (r.adapters[name][1] @ r.adapters[name][0] - s[name][1].to(r.adapters[name][1])
                          @ s[name][0].to(r.adapters[name][0]))
                     for w, r, s in zip(weights, results, starts, strict=True))
        total += float(change.square().sum())
    return scaling * math.sqrt(total)


def aggregation_error(results: list[LocalResult], weights: list[float], server: ServerState) -> float:
    """How far the new global model is from the ideal aggregation, over all adapted layers.

    Every client of a round trains on the same frozen W', so client k's weight is
    W' + s B_k A_k and the ideal global weight is W' + s sum_k p_k B_k A_k (survey eq. 4,
    right side: FedAvg of the clients' models). After ``aggregate`` the global weight is
    W' + D + s B A (D the server's ``base_deltas``, A and B its new adapter), so the error is

        sqrt(sum over layers of ||D + s B A - s sum_k p_k B_k A_k||_F^2).

    Zero for methods that aggregate exactly (FFA-LoRA, FLoRA, FedEx-LoRA, CoLR, ...), FedIT's
    discordance for separate averaging, the Eckart-Young tail for FlexLoRA's truncation, and
    whatever a compressed payload loses. Unlike :func:`layer_discordance` it judges what the
    method did, not the clients' factors. NaN without results.
    """
    if not results:
        return math.nan
    total = 0.0
    for name, (a, b) in server.adapters.items():
        As = [r.adapters[name][0] for r in results]
        Bs = [r.adapters[name][1] for r in results]
        gap = server.scaling * (b @ a - ideal_update(As, Bs, weights))
        if name in server.base_deltas:
            gap = gap + server.base_deltas[name].to(gap)
        total += float(gap.square().sum())
    return math.sqrt(total)


class Federation:
    """K clients with their own data, a test set and a pre-trained model: ready to run any strategy.

    ``clients[k]`` is client k's training data and ``client_tests[k]`` its own held-out
    split (for personalised evaluation); ``test`` is the global held-out set.
    """

    def __init__(
        self,
        base_model: nn.Module,
        clients: list[ClientData],
        test: ClientData,
        *,
        profile: Profile,
        client_tests: list[ClientData] | None = None,
        label_names: list[str] | None = None,
        device: torch.device | None = None,
        train_head: bool = True,
    ) -> None:
        if not clients:
            raise ValueError("clients is empty: a federation needs at least one client")
        for k, data in enumerate(clients):
            if len(data) == 0:
                raise ValueError(f"client {k} has no training examples")
        if client_tests is not None and len(client_tests) != len(clients):
            raise ValueError(f"client_tests has {len(client_tests)} entries for {len(clients)} clients")
        self.base_model = base_model
        self.clients = clients
        self.client_tests = client_tests
        self.test = test
        self.profile = profile
        self.label_names = label_names
        self.device = default_device() if device is None else device
        self.train_head = bool(train_head)
        self.last_clients_per_pass: int | None = None  # set by train_batched: the group size that ran

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def client_sizes(self) -> list[int]:
        """n_k for every client."""
        return [len(c) for c in self.clients]

    def fresh_model(self, rank: int | None = None, seed: int = 0) -> nn.Module:
        """A copy of the pre-trained model wrapped with LoRA of ``rank`` (profile's by default).

        Its head trains beside the adapter, or stays frozen when the federation was built with
        ``train_head=False`` (``build_federation(head="probe")``).
        """
        model = add_lora(copy.deepcopy(self.base_model), rank=rank or self.profile.rank,
                         alpha=self.profile.lora_alpha, seed=seed, train_head=self.train_head)
        return model.to(self.device)

    def run(
        self,
        strategy: Strategy,
        *,
        rounds: int | None = None,
        clients_per_round: int | None = None,
        local_steps: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        seed: int = 0,
        evaluate: bool = True,
        evaluate_clients: bool = False,
        progress: bool = True,
        label: str | None = None,
        engine: str = "auto",
        clients_per_pass: int | None = None,
    ) -> pd.DataFrame:
        """Play ``rounds`` communication rounds of ``strategy``; return one history row per round.

        Unset arguments come from the profile. ``label`` names the run in the history
        (the strategy's name by default). A client update holding NaN or Inf is left
        out of its round with a warning.

        ``evaluate=False`` skips the test-set evaluation after each round (``accuracy``
        and ``test_loss`` are NaN): for a run that measures only what aggregation does
        (discordance, bytes), where the evaluation would be about a third of each
        round's time on a CPU.
        ``evaluate_clients=True`` scores each client's own held-out split (the
        ``client_accuracy`` column), independently of ``evaluate``.

        ``engine`` chooses how the sampled clients train: ``"sequential"`` swaps each
        client's adapter into the model and runs :func:`local_train` client after client
        (the reference); ``"batched"`` trains all of them at once with
        :func:`fedlora_edu.simulation.engine.train_clients_batched` (same batches, same optimiser;
        equal to the sequential loop to float tolerance with dropout off, equal in
        distribution with dropout on); ``"auto"`` (default) takes the batched engine
        where it applies and the sequential loop where it does not (a model the engine
        cannot run, or a strategy with ``batched_training = False``). The history's
        ``engine`` column and ``self.last_engine`` say which ran.

        ``clients_per_pass`` caps how many clients the batched engine trains in one pass
        (:func:`fedlora_edu.simulation.engine.train_clients_in_groups`); ``None`` (default) trains all
        sampled clients together and halves the group whenever the device runs out of
        memory. The history's ``clients_per_pass`` column says what ran (1 for the
        sequential loop).
        """
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a fedlora_edu Strategy, got {type(strategy).__name__}")
        p = self.profile
        rounds = p.rounds if rounds is None else rounds
        clients_per_round = min(p.clients_per_round, self.num_clients) if clients_per_round is None \
            else clients_per_round
        local_steps = p.local_steps if local_steps is None else local_steps
        batch_size = p.batch_size if batch_size is None else batch_size
        learning_rate = p.learning_rate if learning_rate is None else learning_rate
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if not 1 <= clients_per_round <= self.num_clients:
            raise ValueError(f"clients_per_round must be in 1..{self.num_clients}, got {clients_per_round}")
        if evaluate_clients and self.client_tests is None:
            raise ValueError("evaluate_clients needs a federation built with client_tests")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        check_clients_per_pass(clients_per_pass)
        if engine == "sequential" and clients_per_pass is not None:
            raise ValueError("clients_per_pass applies to the batched engine; engine='sequential' trains one "
                             "client at a time")

        model = self.fresh_model(strategy.max_rank(self.num_clients), seed=seed)
        used = self._choose_engine(model, strategy, engine)
        server = ServerState(
            adapters=adapter_io.get_lora_factors(model),
            head=adapter_io.get_head_state(model),
            scaling=adapter_io.lora_scaling(model),
            rank=adapter_io.model_rank(model),
            seed=seed,
            method_state=strategy.new_state(),
        )
        strategy.init_server(server, seed)
        strategy.prepare(self, model, server, seed)
        adapter_io.add_to_base_weights(model, server.base_deltas)
        server.base_deltas = {}
        client_states = {k: strategy.new_client_state() for k in range(self.num_clients)}
        rng = np.random.default_rng(seed)
        rows = []
        name = label or strategy.name
        bar = tqdm(range(rounds), desc=f"{name} [{used}]", disable=not progress, leave=False)
        train = self.train_sequential if used == "sequential" else functools.partial(
            self.train_batched, clients_per_pass=clients_per_pass)
        for t in bar:
            server.round = t
            sampled = strategy.sample_clients(t, self.num_clients, clients_per_round, rng)
            results: list[LocalResult] = []
            starts: list[dict[str, tuple[Tensor, Tensor]]] = []
            uploads: list[Upload] = []
            bytes_up = bytes_down = excluded = 0
            for k, start, result in train(model, strategy, server, client_states, sampled, t, seed=seed,
                                          steps=local_steps, batch_size=batch_size, learning_rate=learning_rate):
                bytes_down += start.download.nbytes
                rank_k, loss = result.rank, result.train_loss
                payload = strategy.client_upload(result, client_states[k], t)
                bytes_up += payload.nbytes
                if not all_finite(payload) or not math.isfinite(loss):
                    warnings.warn(f"round {t + 1}: client {k}'s update holds NaN or Inf; left out of the round",
                                  RuntimeWarning, stacklevel=2)
                    excluded += 1
                    continue
                results.append(result)
                starts.append({n: (a[:rank_k], b[:, :rank_k]) for n, (a, b) in start.adapters.items()})
                uploads.append(Upload(k, result.num_examples, payload, rank_k))
            weights = [u.num_examples / sum(v.num_examples for v in uploads) for u in uploads]
            measured_discordance = layer_discordance(results, weights, server.scaling)
            measured_update = update_size(starts, results, weights, server.scaling)
            server.base_deltas = {}
            started = time.perf_counter()
            if uploads:
                strategy.aggregate(server, uploads, t)
            server_seconds = time.perf_counter() - started
            error = aggregation_error(results, weights, server)
            adapter_io.add_to_base_weights(model, server.base_deltas)
            accuracy, test_loss, client_accuracy = self._evaluate(model, server, strategy, client_states,
                                                                  evaluate, evaluate_clients)
            rows.append({
                "round": t + 1, "method": name, "accuracy": accuracy, "test_loss": test_loss,
                "train_loss": float(np.mean([r.train_loss for r in results])) if results else math.nan,
                "client_accuracy": client_accuracy, "bytes_up": bytes_up, "bytes_down": bytes_down,
                "discordance": measured_discordance, "update_size": measured_update, "aggregation_error": error,
                "server_seconds": server_seconds,
                "clients": len(sampled), "excluded": excluded, "engine": used,
                "clients_per_pass": 1 if used == "sequential" else self.last_clients_per_pass,
            })
            if evaluate:
                bar.set_postfix(accuracy=f"{accuracy:.3f}")
            else:
                bar.set_postfix(discordance=f"{measured_discordance:.2e}")
        self.last_model = model
        self.last_server = server
        self.last_engine = used
        return pd.DataFrame(rows, columns=HISTORY_COLUMNS)

    @staticmethod
    def _choose_engine(model: nn.Module, strategy: Strategy, engine: str) -> str:
        """"batched" or "sequential" for this run: see :meth:`run`'s ``engine``."""
        if engine == "sequential":
            return "sequential"
        reason = unsupported_reason(model)
        if reason is None:
            reason = strategy.batched_training_obstacle()
        if reason is None:
            return "batched"
        if engine == "batched":
            raise ValueError(f"engine='batched' cannot run here: {reason}")
        return "sequential"

    def train_sequential(self, model, strategy, server, client_states, sampled, t, *, seed, steps, batch_size,
                         learning_rate):
        """Local training of round ``t``'s ``sampled`` clients, client after client in one peft model.

        The reference path of :meth:`run`: yields ``(k, start, result)`` lazily, so each
        client's ``client_start``, training and (in :meth:`run`) ``client_upload`` follow
        one another. Timed against :meth:`train_batched` in ``book/fast/engine.ipynb``.
        """
        for k in sampled:
            start = strategy.client_start(server, k, client_states[k], t)
            rank_k = next(iter(start.adapters.values()))[0].shape[0]
            adapter_io.set_lora_factors(model, start.adapters)
            adapter_io.set_head_state(model, start.head)
            set_trainable(model, start.trainable)
            with strategy.local_training(model, start, client_states[k], t):
                loss = local_train(model, self.clients[k], steps=steps, batch_size=batch_size,
                                   learning_rate=learning_rate, rank=rank_k,
                                   seed=derive_seed(seed, "client batches", t, k), device=self.device)
                result = LocalResult(k, adapter_io.get_lora_factors(model, rank=rank_k),
                                     adapter_io.get_head_state(model), len(self.clients[k]), loss, rank_k)
            yield k, start, result

    def train_batched(self, model, strategy, server, client_states, sampled, t, *, seed, steps, batch_size,
                      learning_rate, clients_per_pass=None):
        """The same local training, all sampled clients at once (:mod:`fedlora_edu.simulation.engine`).

        Every ``client_start`` first, then batched training, in one pass or in groups of
        ``clients_per_pass`` (see :meth:`run`); yields ``(k, start, result)``; the group size
        that ran is ``self.last_clients_per_pass``. ``model``'s parameters are not changed.
        """
        jobs = [ClientJob(k, self.clients[k], strategy.client_start(server, k, client_states[k], t),
                          derive_seed(seed, "client batches", t, k)) for k in sampled]
        results, self.last_clients_per_pass = train_clients_in_groups(
            model, jobs, clients_per_pass=clients_per_pass, steps=steps, batch_size=batch_size,
            learning_rate=learning_rate, device=self.device, dropout_seed=derive_seed(seed, "engine dropout", t))
        for job, result in zip(jobs, results, strict=True):
            yield job.client_id, job.start, result

    def centralized(
        self,
        *,
        steps: int,
        eval_every: int = 10,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> pd.DataFrame:
        """LoRA fine-tuning on all clients' data pooled in one place: the upper bound of FedLoRA.

        Returns one row per evaluation: ``step``, ``accuracy``, ``test_loss``, ``train_loss``.
        """
        if steps < 1 or eval_every < 1:
            raise ValueError(f"steps and eval_every must be >= 1, got {steps} and {eval_every}")
        p = self.profile
        batch_size = p.batch_size if batch_size is None else batch_size
        learning_rate = p.learning_rate if learning_rate is None else learning_rate
        pooled = ClientData.concat(self.clients)
        model = self.fresh_model(seed=seed)
        # One optimiser and one batch order for the whole run: evaluating must not change training.
        optimizer = make_optimizer(model, learning_rate)
        sampler = BatchSampler(len(pooled), batch_size, seed)
        torch.manual_seed(seed)
        rows, done = [], 0
        with tqdm(total=steps, desc="centralized", disable=not progress, leave=False) as bar:
            while done < steps:
                chunk = min(eval_every, steps - done)
                loss = local_train(model, pooled, steps=chunk, batch_size=batch_size, learning_rate=learning_rate,
                                   seed=derive_seed(seed, "centralized batches", done), device=self.device,
                                   optimizer=optimizer, sampler=sampler)
                done += chunk
                accuracy, test_loss = evaluate(model, self.test, device=self.device)
                rows.append({"step": done, "accuracy": accuracy, "test_loss": test_loss, "train_loss": loss})
                bar.update(chunk)
        self.last_model = model
        return pd.DataFrame(rows)

    def _evaluate(self, model, server, strategy, client_states, evaluate_global, evaluate_clients):
        adapter_io.set_lora_factors(model, server.adapters)
        adapter_io.set_head_state(model, server.head)
        accuracy = loss = client_accuracy = math.nan
        if evaluate_global:
            accuracy, loss = evaluate(model, self.test, device=self.device)
        if evaluate_clients:
            scores = []
            for k, data in enumerate(self.client_tests):
                personal = strategy.personal_model(server, k, client_states[k])
                if personal is not None:
                    adapter_io.set_lora_factors(model, personal[0])
                    adapter_io.set_head_state(model, personal[1])
                with strategy.serving(model, server, k, client_states[k]):
                    scores.append(evaluate(model, data, device=self.device)[0])
                if personal is not None:
                    adapter_io.set_lora_factors(model, server.adapters)
                    adapter_io.set_head_state(model, server.head)
            client_accuracy = float(np.mean(scores))
        return accuracy, loss, client_accuracy


def build_federation(
    data: str = "bbc_news",
    *,
    scheme: str = "iid",
    profile: Profile | str | None = None,
    model: str = "embedded",
    num_clients: int | None = None,
    client_test_fraction: float = 0.2,
    seed: int = 0,
    head: str = "trained",
    adapted_layers: int | None = None,
    **partition_options: object,
) -> Federation:
    """Load a data set and a model, split and partition the data, tokenise: one call per chapter.

    ``scheme`` is a partitioner of :mod:`fedlora_edu.foundations.partition` ("iid", "dirichlet" with
    ``alpha``, "shards" with ``classes_per_client``, "quantity" with ``alpha``,
    "natural"). The profile fixes the number of clients, examples and tokens.

    ``head`` says what the classifier head is. ``"trained"`` (default): a fresh head that
    trains beside the adapter and is averaged by FedAvg. ``"probe"``: the best linear probe on
    the frozen model's features (:func:`~fedlora_edu.foundations.fedavg.best_linear_probe`,
    fitted once on the clients' training data pooled, as if released with the model), then
    frozen for every method, so that the adapter is the only thing that learns and a method's
    gain over the starting accuracy is the adapter's. Needs a mean-pooling classifier (the
    embedded encoder); ``federation.probe`` keeps the fit.

    ``adapted_layers`` (the profile's by default; None adapts every layer) puts LoRA in the top
    layers of a mean-pooling encoder only. The layers below never change, so their output for
    every client's and test example is computed once here (``ClientData.hidden``) and every
    local step runs the adapted layers only: a step costs about adapted / all layers of a full
    one. The cached outputs are taken without dropout, so dropout acts in the adapted layers only.
    """
    profile = get_profile(profile) if not isinstance(profile, Profile) else profile
    num_clients = profile.num_clients if num_clients is None else num_clients
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not 0.0 <= client_test_fraction < 1.0:
        raise ValueError(f"client_test_fraction must be in [0, 1), got {client_test_fraction}")
    dataset = data_sets.load_text_classification(
        data, max_examples=profile.train_examples + profile.test_examples, seed=seed)
    test_fraction = profile.test_examples / len(dataset)
    train_set, test_set = data_sets.train_test_split(dataset, test_fraction=test_fraction, seed=seed)
    label_names = dataset.features["label"].names
    labels = list(train_set["label"])
    sources = list(train_set["source"]) if scheme == "natural" else None
    parts = partition.partition(labels, scheme, num_clients, seed=seed, sources=sources, **partition_options)
    base_model, tokenizer = load_classifier(model, num_labels=len(label_names), seed=seed)
    adapted_layers = profile.adapted_layers if adapted_layers is None else adapted_layers
    if adapted_layers is not None:
        if not isinstance(base_model, MeanPoolingClassifier):
            raise ValueError(f"adapted_layers needs a mean-pooling classifier (the embedded encoder); model {model!r} "
                             f"loads as {type(base_model).__name__}; pass adapted_layers=None to adapt every layer")
        depth = len(base_model.adapted_layers)
        if isinstance(adapted_layers, bool) or not isinstance(adapted_layers, int) or not 1 <= adapted_layers <= depth:
            raise ValueError(f"adapted_layers must be an integer in 1..{depth}, got {adapted_layers!r}")
        base_model.frozen_layers = depth - adapted_layers
    everything = tokenize(list(train_set["text"]), labels, tokenizer, profile.max_length)
    test = tokenize(list(test_set["text"]), list(test_set["label"]), tokenizer, profile.max_length)
    rng = np.random.default_rng(seed)
    clients, client_tests = [], []
    for indices in parts:
        shuffled = rng.permutation(indices)
        held_out = int(round(client_test_fraction * len(shuffled))) if len(shuffled) > 1 else 0
        clients.append(everything.subset(shuffled[held_out:]))
        client_tests.append(everything.subset(shuffled[:held_out]))
    if getattr(base_model, "frozen_layers", 0):
        clients = [cache_frozen_layers(base_model, data) for data in clients]
        client_tests = [cache_frozen_layers(base_model, data) for data in client_tests]
        test = cache_frozen_layers(base_model, test)
    probe = None
    if head == "probe":
        if not isinstance(base_model, MeanPoolingClassifier):
            raise ValueError(f"head='probe' needs a mean-pooling classifier (the embedded encoder); model {model!r} "
                             f"loads as {type(base_model).__name__}")
        pooled = ClientData.concat(clients)
        probe = best_linear_probe(pooled_features(base_model, pooled), pooled.labels,
                                  num_classes=len(label_names), seed=seed)
        with torch.no_grad():
            base_model.classifier.weight.copy_(probe.weight)
            base_model.classifier.bias.copy_(probe.bias)
    federation = Federation(base_model, clients, test, profile=profile,
                            client_tests=client_tests if client_test_fraction > 0 else None,
                            label_names=label_names, train_head=head != "probe")
    federation.partitions = parts
    federation.train_labels = labels
    federation.probe = probe
    return federation


@torch.no_grad()
def cache_frozen_layers(model: MeanPoolingClassifier, data: ClientData, batch_size: int = 64) -> ClientData:
    """``data`` with ``hidden`` set: the output of ``model``'s frozen bottom for every example (on the CPU).

    Taken in evaluation mode (no dropout) over the full padded length; a batch later cuts it to
    its own width, as it cuts the ids.
    """
    if len(data) == 0:
        return ClientData(data.input_ids, data.attention_mask, data.labels,
                          torch.zeros(0, data.input_ids.shape[1], model.config.hidden_size))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(data), batch_size):
        ids = data.input_ids[start:start + batch_size].to(device)
        mask = data.attention_mask[start:start + batch_size].to(device)
        chunks.append(model.bottom(ids, mask).float().cpu())
    model.train(was_training)
    return ClientData(data.input_ids, data.attention_mask, data.labels, torch.cat(chunks))


@torch.no_grad()
def pooled_features(model: MeanPoolingClassifier, data: ClientData, batch_size: int = 64) -> torch.Tensor:
    """The frozen encoder's sentence features of ``data`` (what a linear probe on it reads), on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(data), batch_size):
        batch = trim_batch(data.subset(list(range(start, min(start + batch_size, len(data))))), device)
        features = model.pooled(batch["input_ids"], batch["attention_mask"], batch.get("hidden_states"))
        chunks.append(features.float().cpu())
    model.train(was_training)
    return torch.cat(chunks)
