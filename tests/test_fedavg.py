"""Tests for fedlora_edu.fedavg: FedAvg (McMahan et al. 2017) and survey eq. 1 on a linear probe."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_edu.foundations import fedavg as fa
from fedlora_edu.foundations.partition import partition

FAST = settings(max_examples=40, deadline=None)


def random_states(num_clients: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"weight": torch.randn(3, 4, generator=generator), "bias": torch.randn(3, generator=generator)}
        for _ in range(num_clients)
    ]


# ----------------------------------------------------------------------------------------
# fedavg: the server step
# ----------------------------------------------------------------------------------------
@FAST
@given(
    raw_weights=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_fedavg_is_the_weighted_sum(raw_weights, seed):
    states = random_states(len(raw_weights), seed)
    p = [w / sum(raw_weights) for w in raw_weights]
    result = fa.fedavg(states, p)
    assert set(result) == {"weight", "bias"}
    for name in ("weight", "bias"):
        by_hand = torch.zeros_like(states[0][name])
        for w, state in zip(p, states, strict=True):
            by_hand += w * state[name]
        torch.testing.assert_close(result[name], by_hand)


def test_equal_weights_give_the_mean():
    states = random_states(4, seed=1)
    result = fa.fedavg(states, [0.25] * 4)
    for name in ("weight", "bias"):
        torch.testing.assert_close(result[name], torch.stack([s[name] for s in states]).mean(dim=0))


def test_single_client_returns_itself_and_inputs_are_untouched():
    states = random_states(1, seed=2)
    copies = [{name: tensor.clone() for name, tensor in state.items()} for state in states]
    result = fa.fedavg(states, torch.tensor([1.0]))
    for name in ("weight", "bias"):
        assert torch.equal(result[name], states[0][name])
        assert result[name] is not states[0][name]
        assert torch.equal(states[0][name], copies[0][name])


def test_zero_weight_client_is_ignored():
    states = random_states(2, seed=3)
    result = fa.fedavg(states, np.array([1.0, 0.0]))
    assert torch.equal(result["weight"], states[0]["weight"])


@pytest.mark.parametrize(
    ("make_states", "weights", "parameter"),
    [
        (lambda: [], [], "states"),
        (lambda: random_states(1, 0)[0], [1.0], "states"),
        (lambda: random_states(2, 0), [0.5], "weights"),
        (lambda: random_states(2, 0), [1.5, -0.5], "weights"),
        (lambda: random_states(2, 0), [0.5, 0.6], "weights"),
        (lambda: [random_states(1, 0)[0], {"weight": torch.zeros(3, 4)}], [0.5, 0.5], "states[1]"),
        (lambda: [random_states(1, 0)[0], {"weight": torch.zeros(4, 3), "bias": torch.zeros(3)}], [0.5, 0.5],
         "states[1]['weight']"),
        (lambda: [{"step": torch.tensor([1])}, {"step": torch.tensor([2])}], [0.5, 0.5], "states[0]['step']"),
    ],
)
def test_bad_inputs_raise_naming_the_parameter(make_states, weights, parameter):
    with pytest.raises(ValueError, match="^" + re.escape(parameter)):
        fa.fedavg(make_states(), weights)


# ----------------------------------------------------------------------------------------
# The linear probe on synthetic data: exact claims
# ----------------------------------------------------------------------------------------
def blobs(n: int = 120, num_classes: int = 3, dimension: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes, dimension, generator=generator)
    labels = torch.arange(n) % num_classes
    features = centres[labels] + torch.randn(n, dimension, generator=generator)
    return features, labels


def test_local_step_matches_autograd():
    features, labels = blobs()
    generator = torch.Generator().manual_seed(0)
    start = {"weight": 0.1 * torch.randn(3, 8, generator=generator), "bias": torch.zeros(3)}
    stepped, _ = fa._sgd_steps(start, features, labels, steps=1, batch_size=len(labels), learning_rate=0.5,
                               generator=torch.Generator().manual_seed(1))
    weight = start["weight"].clone().requires_grad_(True)
    bias = start["bias"].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(features @ weight.T + bias, labels).backward()
    torch.testing.assert_close(stepped["weight"], start["weight"] - 0.5 * weight.grad)
    torch.testing.assert_close(stepped["bias"], start["bias"] - 0.5 * bias.grad)


def test_round_zero_is_the_uniform_prediction():
    features, labels = blobs()
    parts = partition(labels.numpy(), "iid", 4, seed=0)
    history = fa.federated_linear_probe(features, labels, parts, features, labels, num_classes=3, rounds=2,
                                        local_steps=2, clients_per_round=2, learning_rate=0.1, batch_size=8,
                                        progress=False)
    assert list(history.columns) == fa.PROBE_COLUMNS
    assert history["round"].tolist() == [0, 1, 2]
    # W = 0 gives every class probability 1/C: the loss of eq. 1 is log C on any data.
    assert history.loc[0, "objective"] == pytest.approx(math.log(3))
    assert history.loc[0, "test_loss"] == pytest.approx(math.log(3))


def test_one_full_batch_step_with_every_client_is_gradient_descent_on_eq1():
    """FedSGD: sum_k p_k (W - lr grad f_k) = W - lr grad sum_k p_k f_k, exactly (McMahan et al. 2017)."""
    features, labels = blobs(n=90)
    parts = partition(labels.numpy(), "dirichlet", 3, alpha=0.5, seed=0)
    largest = max(len(part) for part in parts)
    options = dict(num_classes=3, rounds=5, local_steps=1, clients_per_round=3, learning_rate=0.5,
                   batch_size=largest, progress=False)
    federated = fa.federated_linear_probe(features, labels, parts, features, labels, **options)
    centralized = fa.centralized_linear_probe(features, labels, features, labels, **options)
    np.testing.assert_allclose(federated["objective"], centralized["objective"], rtol=1e-5)


def test_probe_is_deterministic_for_a_seed():
    features, labels = blobs()
    parts = partition(labels.numpy(), "dirichlet", 5, alpha=0.3, seed=0)
    options = dict(num_classes=3, rounds=4, local_steps=3, clients_per_round=2, learning_rate=0.5, batch_size=4,
                   progress=False)
    first = fa.federated_linear_probe(features, labels, parts, features, labels, seed=7, **options)
    again = fa.federated_linear_probe(features, labels, parts, features, labels, seed=7, **options)
    other = fa.federated_linear_probe(features, labels, parts, features, labels, seed=8, **options)
    pd.testing.assert_frame_equal(first, again)
    assert not first["objective"].equals(other["objective"])


def test_client_drift_is_a_jensen_gap():
    """drift = sum_k p_k f(W_k) - f(sum_k p_k W_k): zero for one client, never negative (f is convex)."""
    features, labels = blobs()
    parts = partition(labels.numpy(), "shards", 3, classes_per_client=1, seed=0)
    options = dict(num_classes=3, rounds=5, local_steps=4, learning_rate=0.1, batch_size=8, progress=False)
    alone = fa.federated_linear_probe(features, labels, parts, features, labels, clients_per_round=1, **options)
    together = fa.federated_linear_probe(features, labels, parts, features, labels, clients_per_round=3, **options)
    assert alone["client_drift"].abs().max() < 1e-6
    assert (together["client_drift"].iloc[1:] > 0).all()


@pytest.mark.parametrize(
    ("change", "parameter"),
    [
        ({"clients_per_round": 9}, "clients_per_round"),
        ({"rounds": 0}, "rounds"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"num_classes": 2}, "labels"),
        ({"partitions": [[0, 1], []]}, "partitions"),
        ({"partitions": [[0, 1000]]}, "partitions"),
        ({"labels": torch.zeros(5, dtype=torch.int64)}, "labels"),
        ({"test_features": torch.zeros(120, 5)}, "test_features"),
    ],
)
def test_probe_rejects_bad_input(change, parameter):
    features, labels = blobs()
    arguments = dict(features=features, labels=labels, partitions=partition(labels.numpy(), "iid", 4, seed=0),
                     test_features=features, test_labels=labels, num_classes=3, rounds=2, local_steps=1,
                     clients_per_round=2, learning_rate=0.1, batch_size=4, progress=False)
    arguments.update(change)
    with pytest.raises(ValueError, match=parameter):
        fa.federated_linear_probe(**arguments)


# ----------------------------------------------------------------------------------------
# Real embeddings: BBC News through the embedded MiniLM
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bbc_embeddings():
    from fedlora_edu.assets.data import load_text_classification, train_test_split
    from fedlora_edu.assets.models import load_classifier

    dataset = load_text_classification("bbc_news", max_examples=200, seed=0)
    train, test = train_test_split(dataset, test_fraction=0.25, seed=0)
    model, tokenizer = load_classifier("embedded", num_labels=5, seed=0)
    embed = dict(max_length=24, progress=False)
    return (
        model, tokenizer, list(train["text"]),
        fa.embed_texts(model, tokenizer, list(train["text"]), **embed), torch.tensor(list(train["label"])),
        fa.embed_texts(model, tokenizer, list(test["text"]), **embed), torch.tensor(list(test["label"])),
    )


def test_embeddings_are_unit_vectors_independent_of_batching(bbc_embeddings):
    model, tokenizer, texts, features, *_ = bbc_embeddings
    assert features.shape == (len(texts), 384)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(texts)))
    # Padding must not leak into the mean: tiny batches pad less, the result is the same.
    small_batches = fa.embed_texts(model, tokenizer, texts[:6], max_length=24, batch_size=2, progress=False)
    torch.testing.assert_close(small_batches, features[:6], atol=1e-5, rtol=1e-4)


def test_embed_texts_rejects_bad_input(bbc_embeddings):
    model, tokenizer, *_ = bbc_embeddings
    with pytest.raises(ValueError, match="texts"):
        fa.embed_texts(model, tokenizer, "one string", max_length=24)
    with pytest.raises(ValueError, match="max_length"):
        fa.embed_texts(model, tokenizer, ["a"], max_length=1)


def test_fedavg_probe_learns_bbc_topics_on_iid_clients(bbc_embeddings):
    _, _, _, features, labels, test_features, test_labels = bbc_embeddings
    parts = partition(labels.numpy(), "iid", 5, seed=0)
    options = dict(num_classes=5, rounds=20, local_steps=3, clients_per_round=3, learning_rate=2.0, batch_size=8,
                   seed=0, progress=False)
    federated = fa.federated_linear_probe(features, labels, parts, test_features, test_labels, **options)
    centralized = fa.centralized_linear_probe(features, labels, test_features, test_labels, **options)
    chance = 1 / 5
    assert federated["accuracy"].iloc[-1] > chance + 0.4
    assert centralized["accuracy"].iloc[-1] > chance + 0.4
    assert federated["objective"].iloc[-1] < 0.7 * math.log(5)


def test_best_linear_probe_reaches_the_optimum_and_picks_the_penalty_on_held_out_data():
    from fedlora_edu.foundations.fedavg import PROBE_PENALTIES, _fit_logistic, best_linear_probe

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 2
    labels = torch.arange(120) % 3
    features = centres[labels] + torch.randn(120, 8, generator=generator)
    fit = best_linear_probe(features, labels, num_classes=3, seed=0)
    assert fit.penalty in PROBE_PENALTIES and fit.weight.shape == (3, 8) and fit.bias.shape == (3,)
    assert fit.accuracy(features, labels) > 0.9  # well-separated classes
    # the refit is the optimum of the penalised loss: its gradient vanishes there
    weight = fit.weight.double().requires_grad_(True)
    bias = fit.bias.double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(features.double() @ weight.T + bias, labels)
    (loss + 0.5 * fit.penalty * weight.square().sum()).backward()
    assert float(weight.grad.abs().max()) < 1e-4 and float(bias.grad.abs().max()) < 1e-4
    # the chosen penalty is the one with the best validation accuracy on the same split
    order = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    fit_index, validation_index = order[24:], order[:24]
    scores = []
    for penalty in PROBE_PENALTIES:
        w, b = _fit_logistic(features[fit_index], labels[fit_index], 3, penalty)
        predicted = (features[validation_index] @ w.T + b).argmax(1)
        scores.append(float((predicted == labels[validation_index]).float().mean()))
    assert fit.validation_accuracy == max(scores) and PROBE_PENALTIES[scores.index(max(scores))] == fit.penalty


def test_best_linear_probe_names_bad_arguments():
    from fedlora_edu.foundations.fedavg import best_linear_probe

    features, labels = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="validation_fraction"):
        best_linear_probe(features, labels, num_classes=2, validation_fraction=1.0)
    with pytest.raises(ValueError, match="penalties"):
        best_linear_probe(features, labels, num_classes=2, penalties=[])
    with pytest.raises(ValueError, match="labels"):
        best_linear_probe(features, labels[:5], num_classes=2)
