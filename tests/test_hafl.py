"""HAFL (survey 5.1): each client trains its most important rank-1 components; each is averaged over its trainers."""

from __future__ import annotations

import pytest
import torch
from helpers import recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.strategy import BOTH
from fedlora_edu.efficiency.sparse import (
    HAFL,
    aggregate_rank_one,
    component_importance,
    smoothed_sensitivity,
    top_components,
)
from fedlora_edu.foundations.training import local_train


def test_importance_is_the_smoothed_sensitivity_summed_per_component():
    g = torch.Generator().manual_seed(0)
    r, n, m, beta1, beta2 = 5, 7, 6, 0.7, 0.9
    a, b = torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
    mean_a = unc_a = mean_b = unc_b = None
    hand = {"A": (torch.zeros(r, n), torch.zeros(r, n)), "B": (torch.zeros(m, r), torch.zeros(m, r))}
    for _ in range(4):
        grad_a, grad_b = torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
        mean_a, unc_a, score_a = smoothed_sensitivity(a, grad_a, mean_a, unc_a, beta1, beta2)
        mean_b, unc_b, score_b = smoothed_sensitivity(b, grad_b, mean_b, unc_b, beta1, beta2)
        for key, w, grad in (("A", a, grad_a), ("B", b, grad_b)):
            sensitivity = (w * grad).abs()
            mean = beta1 * hand[key][0] + (1 - beta1) * sensitivity
            hand[key] = (mean, beta2 * hand[key][1] + (1 - beta2) * (sensitivity - mean).abs())
    assert torch.allclose(score_a, hand["A"][0] * hand["A"][1]) and torch.allclose(score_b, hand["B"][0] * hand["B"][1])
    importance = component_importance(score_a, score_b)
    for i in range(r):
        assert importance[i] == pytest.approx(float(score_a[i].sum() / n + score_b[:, i].sum() / m), rel=1e-5)
    chosen = top_components(importance, 2)
    others = [i for i in range(r) if i not in chosen]
    assert min(importance[chosen]) >= max(importance[others])
    assert top_components(torch.zeros(4), 2) == [0, 1]  # ties: the lower index
    with pytest.raises(ValueError, match="kept"):
        top_components(importance, 0)


def test_rank_one_aggregation_averages_each_component_over_its_trainers_only():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, generator=g), torch.randn(5, 4, generator=g)
    parts = [([0, 2], torch.randn(2, 3, generator=g), torch.randn(5, 2, generator=g)),
             ([2], torch.randn(1, 3, generator=g), torch.randn(5, 1, generator=g))]
    new_a, new_b = aggregate_rank_one(a, b, parts, [0.25, 0.75])
    assert torch.allclose(new_a[0], parts[0][1][0]) and torch.allclose(new_b[:, 0], parts[0][2][:, 0])  # one trainer
    assert torch.allclose(new_a[2], 0.25 * parts[0][1][1] + 0.75 * parts[1][1][0])
    assert torch.allclose(new_b[:, 2], 0.25 * parts[0][2][:, 1] + 0.75 * parts[1][2][:, 0])
    for i in (1, 3):  # nobody trained it: the global component stays
        assert torch.equal(new_a[i], a[i]) and torch.equal(new_b[:, i], b[:, i])


def test_a_client_changes_only_its_components_on_a_real_model_layer(federation):
    strategy = HAFL(0.5)
    model = federation.fresh_model(seed=0)
    g = torch.Generator().manual_seed(2)
    start_factors = {name: (a, 0.1 * torch.randn(b.shape, generator=g))  # B != 0: every sensitivity can be > 0
                     for name, (a, b) in adapter_io.get_lora_factors(model).items()}
    server = type("Server", (), {"rank": adapter_io.model_rank(model), "adapters": start_factors, "head": {}})()
    state = strategy.new_client_state()
    start = strategy.client_start(server, 0, state, 0)
    adapter_io.set_lora_factors(model, start.adapters)
    with strategy.local_training(model, start, state, 0):
        local_train(model, federation.clients[0], steps=3, batch_size=4, learning_rate=1e-2, seed=0)
    after = adapter_io.get_lora_factors(model)
    assert state.kept == 2
    for name, (a, b) in after.items():
        chosen = state.selected[name]
        frozen = [i for i in range(server.rank) if i not in chosen]
        assert len(chosen) == 2
        assert torch.equal(a[frozen], start.adapters[name][0][frozen])
        assert torch.equal(b[:, frozen], start.adapters[name][1][:, frozen])
        assert not torch.equal(b[:, chosen], start.adapters[name][1][:, chosen])
        # the layer's B A moves by its chosen rank-1 components only
        a0, b0 = start.adapters[name]
        change = b @ a - b0 @ a0
        assert torch.allclose(change, b[:, chosen] @ a[chosen] - b0[:, chosen] @ a0[chosen], atol=1e-6)
    assert start.trainable == BOTH


def test_hafl_uploads_its_components_and_the_server_averages_each_over_its_trainers(federation):
    strategy = recording(HAFL)([1.0, 0.5, 0.25])
    history = federation.run(strategy, rounds=2, progress=False, seed=5)
    server = federation.last_server
    rank = server.rank
    assert history["engine"].eq("sequential").all()
    for t, result, payload, state in strategy.sent:
        start = strategy.starts[t][result.client_id]
        kept = strategy.kept(result.client_id, rank)
        for name, (a, b) in result.adapters.items():
            chosen = payload.tensors[f"{name}.index"].long().tolist()
            frozen = [i for i in range(rank) if i not in chosen]
            assert chosen == state.selected[name] and len(chosen) == kept
            assert torch.equal(payload.tensors[f"{name}.A"], a[chosen])
            assert torch.equal(payload.tensors[f"{name}.B"], b[:, chosen])
            assert torch.equal(a[frozen], start.adapters[name][0][frozen])  # the others stayed frozen
            assert torch.equal(b[:, frozen], start.adapters[name][1][:, frozen])
        serialized = sum(len(v.numpy().tobytes()) for v in payload.tensors.values())
        assert payload.nbytes == serialized
    before, uploads = strategy.rounds[-1]
    total = sum(u.num_examples for u in uploads)
    for name, (a, b) in server.adapters.items():
        for i in range(rank):
            trainers = [(u.num_examples / total, u.payload.tensors[f"{name}.index"].long().tolist().index(i), u)
                        for u in uploads if i in u.payload.tensors[f"{name}.index"].long().tolist()]
            if not trainers:
                assert torch.equal(a[i], before[name][0][i])
                continue
            weight = sum(p for p, _, _ in trainers)
            expected_a = sum(p * u.payload.tensors[f"{name}.A"][j] for p, j, u in trainers) / weight
            expected_b = sum(p * u.payload.tensors[f"{name}.B"][:, j] for p, j, u in trainers) / weight
            assert torch.allclose(a[i], expected_a, atol=1e-6) and torch.allclose(b[:, i], expected_b, atol=1e-6)
    first_round = [payload.nbytes for t, _, payload, _ in strategy.sent if t == 0]
    assert history["bytes_up"].iloc[0] == sum(first_round)
    with pytest.raises(ValueError, match="budgets"):
        HAFL(0.0)


def test_the_first_step_scores_are_the_smoothed_sensitivity_of_the_real_layers(federation):
    """One local step on the real model: the client's scores are (1 - beta) |w grad| of that step's gradient, and
    its components are the top ones by the summed score of their A row and B column."""
    from fedlora_edu.foundations.training import BatchSampler, trim_batch

    strategy = HAFL(0.5, beta1=0.8, beta2=0.7)
    model = federation.fresh_model(seed=0)
    g = torch.Generator().manual_seed(4)
    factors = {name: (a, 0.1 * torch.randn(b.shape, generator=g))
               for name, (a, b) in adapter_io.get_lora_factors(model).items()}
    adapter_io.set_lora_factors(model, factors)
    data = federation.clients[1]
    batch = trim_batch(data.subset(BatchSampler(len(data), 4, 3).next()), torch.device("cpu"))
    torch.manual_seed(3)  # the dropout masks local_train's first step will draw
    model.train()
    model(**batch).loss.backward()
    layers = adapter_io.lora_layers(model)
    grads = {name: (layer.lora_A[adapter_io.ADAPTER].weight.grad.clone(),
                    layer.lora_B[adapter_io.ADAPTER].weight.grad.clone()) for name, layer in layers.items()}
    model.zero_grad(set_to_none=True)
    server = type("Server", (), {"rank": adapter_io.model_rank(model), "adapters": factors, "head": {}})()
    state = strategy.new_client_state()
    start = strategy.client_start(server, 1, state, 0)
    with strategy.local_training(model, start, state, 0):
        local_train(model, data, steps=1, batch_size=4, learning_rate=1e-3, seed=3)
    for name, (a, b) in factors.items():
        grad_a, grad_b = grads[name]
        scores = []
        for key, weight, grad in (("A", a, grad_a), ("B", b, grad_b)):
            sensitivity = (weight * grad).abs()
            mean = 0.2 * sensitivity
            uncertainty = 0.3 * (sensitivity - mean).abs()
            assert torch.allclose(state.mean[f"{name}.{key}"], mean, rtol=1e-4, atol=1e-12)
            assert torch.allclose(state.uncertainty[f"{name}.{key}"], uncertainty, rtol=1e-4, atol=1e-12)
            scores.append(mean * uncertainty)
        importance = scores[0].mean(dim=1) + scores[1].mean(dim=0)
        assert state.selected[name] == top_components(importance, 2)
