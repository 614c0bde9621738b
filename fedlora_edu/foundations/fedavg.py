"""FedAvg (McMahan et al. 2017): the server's weighted average of client models.

The survey (arXiv 2505.13502, section 2.1) writes federated learning as eq. 1,

    min_W f(W) = sum_{k=1}^{K} p_k f_k(W; D_k),    p_k = n_k / n,

and FedAvg (McMahan, Moore, Ramage, Hampson and Aguera y Arcas, AISTATS 2017) optimises it
in communication rounds: the server sends W to a sample of clients, each runs a few local
gradient steps on f_k from W, and the server replaces W by the p_k-weighted average of what
comes back. Every FedLoRA method of the later chapters is this loop with a different
answer to "what is averaged, and how".

* :func:`fedavg`: the aggregation step, sum_k p_k W_k, on state dicts (pure, tested).
* :func:`embed_texts`: frozen sentence embeddings from the embedded MiniLM encoder, so that
  FedAvg can be taught on a model that trains in milliseconds.
* :func:`federated_linear_probe` and :func:`centralized_linear_probe`: a linear classifier on
  those embeddings, trained by FedAvg and, as the upper bound, on the pooled data with the
  same number of gradient steps.
* :func:`best_linear_probe`: the best linear classifier on the frozen features (fitted to its
  optimum, penalty chosen on held-out data): the baseline that an adapter has to beat.

Taught in the chapter "book/part1/federated_learning.ipynb".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from fedlora_edu.core.checks import check_weights
from fedlora_edu.core.threads import one_thread

__all__ = [
    "ProbeFit",
    "best_linear_probe",
    "centralized_linear_probe",
    "embed_texts",
    "fedavg",
    "federated_linear_probe",
]

PROBE_COLUMNS = ["round", "accuracy", "test_loss", "objective", "train_loss", "client_drift"]


# ----------------------------------------------------------------------------------------
# The aggregation step
# ----------------------------------------------------------------------------------------
def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | Tensor) -> dict[str, Tensor]:
    """FedAvg's server step: the weighted average sum_k p_k W_k of the clients' models.

    ``states[k]`` is client k's model as a state dict (name -> tensor) and ``weights[k]`` its
    weight p_k = n_k / n from the survey's eq. 1 (arXiv 2505.13502), as in McMahan et al.
    (2017, FedAvg). Every state must have the same names and, per name, the same shape; the
    weights must be non-negative and sum to 1; tensors must be floating point. Returns new
    tensors (the inputs are not modified). Taught in the chapter
    "book/part1/federated_learning.ipynb".
    """
    if isinstance(states, Mapping) or len(states) == 0:
        raise ValueError("states must be a non-empty list of state dicts (one per client)")
    p = check_weights(weights, len(states))
    names = list(states[0].keys())
    for k, state in enumerate(states):
        if set(state.keys()) != set(names):
            missing = sorted(set(names) - set(state.keys()))
            extra = sorted(set(state.keys()) - set(names))
            raise ValueError(
                f"states[{k}] has different keys from states[0]: missing {missing}, extra {extra}"
            )
        for name in names:
            tensor = state[name]
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise ValueError(f"states[{k}][{name!r}] must be a floating-point tensor")
            if tensor.shape != states[0][name].shape:
                raise ValueError(
                    f"states[{k}][{name!r}] has shape {tuple(tensor.shape)}, states[0][{name!r}] "
                    f"has {tuple(states[0][name].shape)}"
                )
    # Eq. 1 weights the clients' objectives by p_k; FedAvg weights their models the same way.
    return {
        name: sum((w * state[name] for w, state in zip(p, states, strict=True)), torch.zeros_like(states[0][name]))
        for name in names
    }


# ----------------------------------------------------------------------------------------
# Frozen sentence embeddings
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def embed_texts(
    model: nn.Module,
    tokenizer: object,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """Mean-pooled, unit-length sentence embeddings of ``texts`` from a frozen encoder.

    ``model`` is the encoder or a classifier around it (its ``base_model`` is used, so the
    ``load_classifier`` result of :mod:`fedlora_edu.assets.models` works); the token vectors of the
    last layer are averaged over real (non-padding) tokens and scaled to length 1, as
    all-MiniLM-L6-v2 (Reimers and Gurevych 2019) is meant to be used. Returns a float tensor of
    shape (len(texts), hidden size) on the CPU. These fixed features let the chapter
    "book/part1/federated_learning.ipynb" teach FedAvg (McMahan et al. 2017) on a linear
    classifier before LoRA adapts the encoder itself.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    encoder = getattr(model, "base_model", model)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", leave=False, disable=not progress):
        batch = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt").to(device)
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        chunks.append(F.normalize(pooled, dim=-1).float().cpu())
    encoder.train(was_training)
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------
# A linear probe trained by FedAvg
# ----------------------------------------------------------------------------------------
def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_data(features: Tensor, labels: object, num_classes: int, prefix: str) -> tuple[Tensor, Tensor]:
    features = torch.as_tensor(features, dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{prefix}features must be a non-empty 2-D tensor, got shape {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"{prefix}labels has shape {tuple(labels.shape)}; need one label per row of {prefix}features "
            f"({features.shape[0]})"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{prefix}labels must lie in 0..{num_classes - 1} (num_classes={num_classes})")
    return features, labels


def _zero_probe(dimension: int, num_classes: int) -> dict[str, Tensor]:
    # Zero start: the loss is convex in (weight, bias), so there is no symmetry to break, and
    # every client and every method starts from the same W.
    return {"weight": torch.zeros(num_classes, dimension), "bias": torch.zeros(num_classes)}


def _logits(state: Mapping[str, Tensor], features: Tensor) -> Tensor:
    return features @ state["weight"].T + state["bias"]


@torch.no_grad()
def _evaluate_probe(state: Mapping[str, Tensor], features: Tensor, labels: Tensor) -> tuple[float, float]:
    logits = _logits(state, features)
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return accuracy, float(F.cross_entropy(logits, labels))


def _sgd_steps(
    state: Mapping[str, Tensor],
    features: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], float]:
    """Plain minibatch SGD on the cross-entropy from ``state``: the local steps on f_k in FedAvg.

    The gradient of the mean cross-entropy of a linear softmax classifier is written out
    (softmax minus one-hot, times the inputs), so a step costs two small matrix products.
    """
    weight, bias = state["weight"].clone(), state["bias"].clone()
    num_classes = weight.shape[0]
    size = min(batch_size, features.shape[0])
    losses = []
    for _ in range(steps):
        index = torch.randperm(features.shape[0], generator=generator)[:size]
        x, y = features[index], labels[index]
        logits = x @ weight.T + bias
        losses.append(float(F.cross_entropy(logits, y)))
        error = (torch.softmax(logits, dim=1) - F.one_hot(y, num_classes).to(logits.dtype)) / size
        weight -= learning_rate * (error.T @ x)
        bias -= learning_rate * error.sum(dim=0)
    return {"weight": weight, "bias": bias}, float(np.mean(losses))


def _check_probe_inputs(features, labels, test_features, test_labels, num_classes, rounds, local_steps,
                        clients_per_round, learning_rate, batch_size):
    _check_positive_int(rounds, "rounds")
    _check_positive_int(local_steps, "local_steps")
    _check_positive_int(clients_per_round, "clients_per_round")
    _check_positive_int(batch_size, "batch_size")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a number > 0, got {learning_rate!r}")
    features, labels = _check_data(features, labels, num_classes, "")
    test_features, test_labels = _check_data(test_features, test_labels, num_classes, "test_")
    if test_features.shape[1] != features.shape[1]:
        raise ValueError(
            f"test_features has {test_features.shape[1]} columns but features has {features.shape[1]}"
        )
    return features, labels, test_features, test_labels


def _check_partitions(partitions: Sequence[Sequence[int]], n: int, clients_per_round: int) -> list[Tensor]:
    if len(partitions) == 0:
        raise ValueError("partitions must hold at least one client")
    parts = [torch.as_tensor(np.asarray(part, dtype=np.int64)) for part in partitions]
    for k, part in enumerate(parts):
        if part.numel() == 0:
            raise ValueError(f"partitions[{k}] is empty: every client needs at least one example")
        if part.min() < 0 or part.max() >= n:
            raise ValueError(f"partitions[{k}] holds an index outside 0..{n - 1}")
    if clients_per_round > len(parts):
        raise ValueError(f"clients_per_round={clients_per_round} is more than the {len(parts)} clients")
    return parts


def _history_row(round_index: int, state: Mapping[str, Tensor], test: tuple[Tensor, Tensor],
                 train: tuple[Tensor, Tensor], train_loss: float, client_drift: float) -> dict[str, float]:
    accuracy, test_loss = _evaluate_probe(state, *test)
    return {"round": round_index, "accuracy": accuracy, "test_loss": test_loss,
            "objective": _evaluate_probe(state, *train)[1], "train_loss": train_loss,
            "client_drift": client_drift}


@one_thread()
def federated_linear_probe(
    features: Tensor,
    labels: Sequence[int] | Tensor,
    partitions: Sequence[Sequence[int]],
    test_features: Tensor,
    test_labels: Sequence[int] | Tensor,
    *,
    num_classes: int,
    rounds: int,
    local_steps: int,
    clients_per_round: int,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Train a linear classifier on frozen embeddings with FedAvg (McMahan et al. 2017).

    The clients are ``partitions`` (index arrays into ``features``/``labels``: the D_k of the
    survey's eq. 1, arXiv 2505.13502). The model W = (weight, bias) starts at zero. Each round
    the server samples ``clients_per_round`` clients uniformly without replacement; each starts
    from the global W and runs ``local_steps`` minibatch SGD steps on its own cross-entropy f_k;
    the server sets W to :func:`fedavg` of the returned models with weights p_k = n_k / sum of
    n_j over the sampled clients (McMahan et al.'s weighting). The same ``seed`` gives the same
    history.

    Returns a DataFrame with one row per round, round 0 being the start: ``round``,
    ``accuracy`` and ``test_loss`` (of the global W on the test set), ``objective`` (f(W) of
    eq. 1 on all clients' data, nats), ``train_loss`` (mean local loss of the sampled clients)
    and ``client_drift`` (sum_k p_k f(W_k) - f(W) in nats over the sampled clients' models W_k
    and their average W: how much worse on eq. 1's objective the clients' own models are than
    the average; never negative, because the cross-entropy is convex in W, near zero when the
    clients agree, and growing with ``local_steps`` when the D_k differ). Taught in the
    chapter "book/part1/federated_learning.ipynb".
    """
    features, labels, test_features, test_labels = _check_probe_inputs(
        features, labels, test_features, test_labels, num_classes, rounds, local_steps, clients_per_round,
        learning_rate, batch_size)
    parts = _check_partitions(partitions, features.shape[0], clients_per_round)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    # f(W) of eq. 1 with p_k = n_k / n is the mean loss over the union of the D_k.
    everyone = torch.cat(parts)
    train, test = (features[everyone], labels[everyone]), (test_features, test_labels)
    state = _zero_probe(features.shape[1], num_classes)
    rows = [_history_row(0, state, test, train, train_loss=math.nan, client_drift=0.0)]
    for round_index in tqdm(range(1, rounds + 1), desc="FedAvg", unit="round", leave=False, disable=not progress):
        sampled = np.sort(rng.choice(len(parts), size=clients_per_round, replace=False))
        client_states, sizes, losses = [], [], []
        for k in sampled:  # in a real federation these run in parallel, on the clients' devices
            client_state, loss = _sgd_steps(state, features[parts[k]], labels[parts[k]], steps=local_steps,
                                            batch_size=batch_size, learning_rate=learning_rate,
                                            generator=generator)
            client_states.append(client_state)
            sizes.append(len(parts[k]))
            losses.append(loss)
        p = [n / sum(sizes) for n in sizes]
        state = fedavg(client_states, p)
        # Client drift in nats: sum_k p_k f(W_k) - f(W) >= 0 (Jensen: f is convex in W).
        drift = sum(w * _evaluate_probe(s, *train)[1] for w, s in zip(p, client_states, strict=True))
        drift -= _evaluate_probe(state, *train)[1]
        rows.append(_history_row(round_index, state, test, train, float(np.dot(p, losses)), drift))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


@one_thread()
def centralized_linear_probe(
    features: Tensor,
    labels: Sequence[int] | Tensor,
    test_features: Tensor,
    test_labels: Sequence[int] | Tensor,
    *,
    num_classes: int,
    rounds: int,
    local_steps: int,
    clients_per_round: int,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """The same linear classifier trained on the pooled data: the upper bound for FedAvg.

    Minimises f(W) of the survey's eq. 1 (arXiv 2505.13502) directly, as if all D_k sat in one
    place, with the budget of :func:`federated_linear_probe`: each "round" is ``local_steps``
    SGD steps (the same number of sequential steps) on minibatches of ``clients_per_round *
    batch_size`` examples (the same number of examples per step, summed over the sampled
    clients). Same zero start and columns (``objective`` is the loss on all of ``features``;
    ``client_drift`` is 0: there is one model). Taught in the chapter
    "book/part1/federated_learning.ipynb" as the line FedAvg (McMahan et al. 2017) is
    compared against.
    """
    features, labels, test_features, test_labels = _check_probe_inputs(
        features, labels, test_features, test_labels, num_classes, rounds, local_steps, clients_per_round,
        learning_rate, batch_size)
    generator = torch.Generator().manual_seed(seed)
    train, test = (features, labels), (test_features, test_labels)
    state = _zero_probe(features.shape[1], num_classes)
    rows = [_history_row(0, state, test, train, train_loss=math.nan, client_drift=0.0)]
    for round_index in tqdm(range(1, rounds + 1), desc="centralized", unit="round", leave=False,
                            disable=not progress):
        state, loss = _sgd_steps(state, features, labels, steps=local_steps,
                                 batch_size=clients_per_round * batch_size, learning_rate=learning_rate,
                                 generator=generator)
        rows.append(_history_row(round_index, state, test, train, loss, client_drift=0.0))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


# ----------------------------------------------------------------------------------------
# The best linear probe: what a frozen encoder's features alone can do
# ----------------------------------------------------------------------------------------
PROBE_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)
"""L2 penalties :func:`best_linear_probe` chooses from (per example, on the weight only)."""


@dataclass
class ProbeFit:
    """A linear classifier fitted to frozen features: ``weight`` (classes x features), ``bias``,
    the L2 ``penalty`` chosen, and its accuracy on the held-out part of the training data."""

    weight: Tensor
    bias: Tensor
    penalty: float
    validation_accuracy: float

    def accuracy(self, features: Tensor, labels: Sequence[int] | Tensor) -> float:
        logits = torch.as_tensor(features, dtype=torch.float32) @ self.weight.T + self.bias
        return float((logits.argmax(dim=1) == torch.as_tensor(np.asarray(labels))).float().mean())


def _fit_logistic(features: Tensor, labels: Tensor, num_classes: int, penalty: float) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, mean cross-entropy + penalty * ||W||^2 / 2, to its optimum by L-BFGS."""
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    x, y = features.double(), labels
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


@one_thread()
def best_linear_probe(
    features: Tensor, labels: Sequence[int] | Tensor, *, num_classes: int,
    penalties: Sequence[float] = PROBE_PENALTIES, validation_fraction: float = 0.2, seed: int = 0,
) -> ProbeFit:
    """The best linear classifier on frozen features, as a baseline for what an adapter adds.

    A multinomial logistic regression fitted to its optimum (the loss is convex, so the result
    does not depend on a learning rate or a number of steps), with the L2 penalty chosen among
    ``penalties`` by accuracy on a held-out ``validation_fraction`` of the training data
    (stratified by nothing: a seeded random split), then refitted on all of it. Taught in
    ``book/part1/federated_learning.ipynb`` ("what the adapter adds over a probe").
    """
    features, labels_tensor = _check_data(features, labels, num_classes, "")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    if len(penalties) == 0 or any(not p >= 0 for p in penalties):
        raise ValueError(f"penalties must be a non-empty list of numbers >= 0, got {list(penalties)!r}")
    order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
    held_out = max(1, int(round(validation_fraction * features.shape[0])))
    if held_out >= features.shape[0]:
        raise ValueError("too few examples to hold out a validation split")
    fit_index, validation_index = order[held_out:], order[:held_out]
    scores = []
    for penalty in penalties:
        weight, bias = _fit_logistic(features[fit_index], labels_tensor[fit_index], num_classes, float(penalty))
        logits = features[validation_index] @ weight.T + bias
        scores.append(float((logits.argmax(dim=1) == labels_tensor[validation_index]).float().mean()))
    best = int(np.argmax(scores))  # the first (smallest) penalty among ties
    weight, bias = _fit_logistic(features, labels_tensor, num_classes, float(penalties[best]))
    return ProbeFit(weight, bias, float(penalties[best]), scores[best])
