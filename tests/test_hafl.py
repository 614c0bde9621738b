"""HAFL (survey 5.1): each client trains its most important rank-1 components; each is averaged over its trainers.

Both of the paper's schemes: freezing (the default) and truncation (the client holds only its components)."""

from __future__ import annotations

import pytest
import torch
from helpers import recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.strategy import BOTH, LocalResult, ServerState
from fedlora_edu.efficiency.sparse import (
    HAFL,
    aggregate_rank_one,
    aggregate_scores,
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


# ----- the truncation scheme: a client holds, downloads, runs and uploads only its r_k components -----------------


def test_the_servers_scores_average_each_component_over_the_clients_that_held_it():
    g = torch.Generator().manual_seed(5)
    previous = torch.rand(5, generator=g)
    parts = [([0, 3], torch.rand(2, generator=g)), ([3, 4], torch.rand(2, generator=g))]
    new = aggregate_scores(previous, parts, [0.4, 0.6])
    assert new[0] == pytest.approx(float(parts[0][1][0]))  # one holder: its score
    assert new[3] == pytest.approx(float(0.4 * parts[0][1][1] + 0.6 * parts[1][1][0]))
    assert new[4] == pytest.approx(float(parts[1][1][1]))
    assert torch.equal(new[[1, 2]], previous[[1, 2]])  # nobody held them: the server's score stays


def _truncation_server(model, strategy, importance_seed=None):
    server = ServerState(adapters=adapter_io.get_lora_factors(model), head=adapter_io.get_head_state(model),
                         scaling=adapter_io.lora_scaling(model), rank=adapter_io.model_rank(model),
                         method_state=strategy.new_state())
    if importance_seed is not None:  # scores from an earlier round, so that the chosen ones are not the first
        g = torch.Generator().manual_seed(importance_seed)
        server.method_state.importance = {name: torch.rand(server.rank, generator=g) for name in server.adapters}
    g = torch.Generator().manual_seed(7)
    server.adapters = {name: (a, 0.1 * torch.randn(b.shape, generator=g)) for name, (a, b) in server.adapters.items()}
    return server


def test_a_truncated_client_holds_and_runs_only_its_components_on_a_real_model_layer(federation):
    strategy = HAFL(0.5, scheme="truncation")
    model = federation.fresh_model(seed=0)
    server = _truncation_server(model, strategy, importance_seed=3)
    state = strategy.new_client_state()
    start = strategy.client_start(server, 0, state, 0)
    kept = strategy.kept(0, server.rank)
    assert kept == server.rank // 2
    for name, (a, b) in server.adapters.items():  # down: exactly the r_k components the server ranks highest
        chosen = top_components(server.method_state.importance[name], kept)
        assert state.selected[name] == chosen and chosen != list(range(kept))
        assert torch.equal(start.adapters[name][0], a[chosen]) and torch.equal(start.adapters[name][1], b[:, chosen])
        assert start.download.tensors[f"{name}.index"].tolist() == chosen
    serialized = sum(len(v.numpy().tobytes()) for v in start.download.tensors.values())
    assert start.download.nbytes == serialized
    full = sum(a.numel() + b.numel() for a, b in server.adapters.values())
    head = sum(v.numel() for v in server.head.values())
    assert serialized == 4 * (full * kept // server.rank + len(server.adapters) * kept + head)

    adapter_io.set_lora_factors(model, start.adapters)
    name, layer = next(iter(adapter_io.lora_layers(model).items()))
    a, b = server.adapters[name]
    chosen = state.selected[name]
    x = torch.randn(3, a.shape[1], generator=torch.Generator().manual_seed(8))
    model.eval()
    with torch.no_grad():
        out = layer(x)
        base = layer.get_base_layer()(x)
    truncated = base + server.scaling * x @ (b[:, chosen] @ a[chosen]).T
    whole = base + server.scaling * x @ (b @ a).T
    assert torch.allclose(out, truncated, atol=1e-5)  # the forward pass: W' x + s B[:, S] A[S] x
    assert not torch.allclose(out, whole, atol=1e-5)  # the other components are absent, not frozen

    with strategy.local_training(model, start, state, 0):
        local_train(model, federation.clients[0], steps=3, batch_size=4, learning_rate=1e-2, rank=kept, seed=0)
    after = adapter_io.get_lora_factors(model)
    result = LocalResult(0, adapter_io.get_lora_factors(model, rank=kept), {}, len(federation.clients[0]), 0.0, kept)
    payload = strategy.client_upload(result, state, 0)
    for name, (a, b) in after.items():
        assert not a[kept:].any() and not b[:, kept:].any()  # the padding stayed empty
        assert payload.tensors[f"{name}.A"].shape[0] == payload.tensors[f"{name}.B"].shape[1] == kept  # up: r_k
        assert torch.equal(payload.tensors[f"{name}.A"], a[:kept])
        assert payload.tensors[f"{name}.index"].tolist() == state.selected[name]
        held = state.selected[name]
        absent = [i for i in range(server.rank) if i not in held]
        assert not state.mean[f"{name}.A"][absent].any() and not state.mean[f"{name}.B"][:, absent].any()
        assert state.mean[f"{name}.B"][:, held].abs().sum() > 0  # what it held, it scored
        assert torch.allclose(payload.tensors[f"{name}.importance"], component_importance(
            (state.mean[f"{name}.A"] * state.uncertainty[f"{name}.A"])[held],
            (state.mean[f"{name}.B"] * state.uncertainty[f"{name}.B"])[:, held]))
    assert payload.nbytes == sum(len(v.numpy().tobytes()) for v in payload.tensors.values())


def test_truncation_in_the_simulator_sends_r_k_components_and_leaves_unheld_ones_unchanged(federation):
    strategy = recording(HAFL)([1.0, 0.5, 0.25], scheme="truncation")
    history = federation.run(strategy, rounds=2, progress=False, seed=5)
    rank = federation.last_server.rank
    for t, result, payload, state in strategy.sent:
        start = strategy.starts[t][result.client_id]
        kept = strategy.kept(result.client_id, rank)
        before = strategy.rounds[t][0]
        for name in before:
            chosen = state.selected[name]
            assert len(chosen) == kept == result.adapters[name][0].shape[0]
            assert torch.equal(start.adapters[name][0], before[name][0][chosen])  # the server's components
            assert payload.tensors[f"{name}.A"].shape == (kept, before[name][0].shape[1])
            assert payload.tensors[f"{name}.index"].tolist() == start.download.tensors[f"{name}.index"].tolist()
        assert payload.nbytes == sum(len(v.numpy().tobytes()) for v in payload.tensors.values())
        assert start.download.nbytes == sum(len(v.numpy().tobytes()) for v in start.download.tensors.values())
    for t in range(2):
        assert history["bytes_up"].iloc[t] == sum(p.nbytes for s, _, p, _ in strategy.sent if s == t)
        assert history["bytes_down"].iloc[t] == sum(s.download.nbytes for s in strategy.starts[t].values())
    scores_after_first = {}
    for name in strategy.rounds[0][0]:  # the second round's components are the top ones by the server's scores
        parts = [(u.payload.tensors[f"{name}.index"].long().tolist(), u.payload.tensors[f"{name}.importance"])
                 for u in strategy.rounds[0][1]]
        weights = [u.num_examples / sum(v.num_examples for v in strategy.rounds[0][1]) for u in strategy.rounds[0][1]]
        scores_after_first[name] = aggregate_scores(torch.zeros(rank), parts, weights)
    for k, start in strategy.starts[1].items():
        for name, scores in scores_after_first.items():
            assert start.download.tensors[f"{name}.index"].tolist() == top_components(scores, strategy.kept(k, rank))

    small = recording(HAFL)(0.25, scheme="truncation")  # everyone holds component 0 only in round 1
    federation.run(small, rounds=1, progress=False, seed=6)
    before, uploads = small.rounds[0]
    total = sum(u.num_examples for u in uploads)
    for name, (a, b) in federation.last_server.adapters.items():
        assert torch.equal(a[1:], before[name][0][1:]) and torch.equal(b[:, 1:], before[name][1][:, 1:])
        expected = sum(u.num_examples / total * u.payload.tensors[f"{name}.A"][0] for u in uploads)
        assert torch.allclose(a[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="scheme"):
        HAFL(0.5, scheme="pruning")


def test_with_every_budget_one_both_schemes_give_the_same_aggregate_and_freezing_stays_the_default(federation):
    assert HAFL().scheme == "freezing"
    freezing = recording(HAFL)(1.0)
    frozen_history = federation.run(freezing, rounds=2, progress=False, seed=3)
    frozen_server = federation.last_server
    truncation = recording(HAFL)(1.0, scheme="truncation")
    truncated_history = federation.run(truncation, rounds=2, progress=False, seed=3)
    for name, (a, b) in federation.last_server.adapters.items():
        assert torch.equal(a, frozen_server.adapters[name][0]) and torch.equal(b, frozen_server.adapters[name][1])
    # freezing downloads the whole adapter as FedIT does; truncation adds the indices, and the scores go up
    rank, layers = frozen_server.rank, len(frozen_server.adapters)
    for start in freezing.starts[0].values():
        assert set(start.download.tensors) == {f"{n}.{m}" for n in frozen_server.adapters for m in "AB"} | {
            f"head.{key}" for key in frozen_server.head}
    extra = federation.profile.clients_per_round * 4 * rank * layers
    assert (truncated_history["bytes_down"] == frozen_history["bytes_down"] + extra).all()
    assert (truncated_history["bytes_up"] == frozen_history["bytes_up"] + extra).all()
