"""Sparse learning at the layer level (survey section 5): FedRA, Fed-piLot, FibecFed and FedFMSL.

What defines each method, on random inputs and on the real model: each layer is aggregated over
exactly the clients that trained it (a layer nobody trained keeps its value) and only the layers
sent are counted; Fed-piLot's choice fits each client's memory and is the knapsack's optimum;
FibecFed's Fisher scores are the direct computation; FedFMSL never switches a layer off.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import recording, tiny_federation
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import Payload, ServerState, Upload
from fedlora_edu.efficiency.costs import client_costs
from fedlora_edu.efficiency.layers import (
    FedFMSL,
    FedPiLot,
    FedRA,
    FibecFed,
    FixedLayers,
    LayerCosts,
    aggregate_by_layer,
    allocation_matrix,
    knapsack,
    layer_fisher_scores,
    layer_memory_costs,
    layer_of,
    modules_in,
    switch_schedule,
)
from fedlora_edu.foundations.training import trim_batch
from fedlora_edu.registry import METHODS, make_strategy

NAMES = [f"encoder.layer.{layer}.attention.self.{kind}" for layer in range(4) for kind in ("query", "value")]


@pytest.fixture(scope="module")
def layered():
    """The tiny federation with LoRA in its top three layers (the bottom three computed once)."""
    return tiny_federation("iid", adapted_layers=3)


@pytest.fixture(scope="module")
def costs(layered):
    return layer_memory_costs(layered)


# ----- the layer-wise aggregation -------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), clients=st.integers(1, 5))
def test_each_layer_is_averaged_over_exactly_the_clients_that_sent_it(seed, clients):
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    current = {name: (torch.randn(3, 5, generator=generator, dtype=torch.float64),
                      torch.randn(6, 3, generator=generator, dtype=torch.float64)) for name in NAMES}
    weights = (rng.random(clients) + 0.1).tolist()
    sent = [{name: (torch.randn(3, 5, generator=generator, dtype=torch.float64),
                    torch.randn(6, 3, generator=generator, dtype=torch.float64))
             for name in NAMES if rng.random() < 0.4} for _ in range(clients)]
    new, coverage = aggregate_by_layer(current, sent, weights)
    for name, (a, b) in current.items():
        holders = [(w, s[name]) for w, s in zip(weights, sent, strict=True) if name in s]
        assert coverage[name] == pytest.approx(sum(w for w, _ in holders))
        if not holders:
            assert torch.equal(new[name][0], a) and torch.equal(new[name][1], b)  # nobody held it: unchanged
            continue
        total = sum(w for w, _ in holders)
        torch.testing.assert_close(new[name][0], sum(w / total * fa for w, (fa, _) in holders))
        torch.testing.assert_close(new[name][1], sum(w / total * fb for w, (_, fb) in holders))


def test_aggregation_rejects_what_does_not_fit():
    current = {NAMES[0]: (torch.zeros(2, 3), torch.zeros(4, 2))}
    with pytest.raises(ValueError, match="weights"):
        aggregate_by_layer(current, [{}], [-1.0])
    with pytest.raises(ValueError, match="client_factors"):
        aggregate_by_layer(current, [{}, {}], [1.0])
    with pytest.raises(ValueError, match="does not have"):
        aggregate_by_layer(current, [{"elsewhere.layer.9.query": current[NAMES[0]]}], [1.0])
    with pytest.raises(ValueError, match="transformer layer"):
        layer_of("classifier.weight")


# ----- FedRA ----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(budgets=st.lists(st.integers(1, 6), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_allocation_rows_hold_each_clients_budget(budgets, seed):
    matrix = allocation_matrix(budgets, 6, seed)
    assert matrix.shape == (len(budgets), 6) and matrix.dtype == bool
    assert matrix.sum(axis=1).tolist() == budgets
    assert np.array_equal(matrix, allocation_matrix(budgets, 6, seed))  # the seed decides the draw


def test_allocation_and_fedra_reject_bad_budgets():
    with pytest.raises(ValueError, match="layer_budgets"):
        allocation_matrix([7], 6, 0)
    for bad in (0, -1, True, [1, 0], []):
        with pytest.raises(ValueError, match="layer_budgets"):
            FedRA(bad)


def test_fedra_aggregates_each_layer_over_its_holders_and_counts_only_what_is_sent(layered):
    strategy = recording(FedRA)([1, 1, 2])
    history = layered.run(strategy, rounds=2, seed=3, progress=False)
    names = list(layered.last_server.adapters)
    layers = sorted({layer_of(n) for n in names})
    for t, (before, uploads) in enumerate(strategy.rounds):
        matrix = allocation_matrix([1, 1, 2], len(layers), derive_seed(3, "fedra allocation", t))
        held = {u.client_id: sorted({layer_of(k.rsplit(".", 1)[0]) for k in u.payload.tensors if k.endswith(".A")})
                for u in uploads}
        start_layers = {k: sorted({layer_of(n.rsplit(".", 1)[0]) for n in s.download.tensors if n.endswith(".A")})
                        for k, s in strategy.starts[t].items()}
        assert held == start_layers  # a client downloads and uploads the layers it was allocated
        assert [len(held[k]) for k in sorted(held)] == [1, 1, 2]
        assert held == {k: [layers[i] for i in np.flatnonzero(matrix[k])] for k in held}
        after = strategy.rounds[t + 1][0] if t + 1 < len(strategy.rounds) else layered.last_server.adapters
        total = sum(u.num_examples for u in uploads)
        for name in names:
            holders = [u for u in uploads if f"{name}.A" in u.payload.tensors]
            if not holders:
                assert torch.equal(after[name][0], before[name][0]) and torch.equal(after[name][1], before[name][1])
                continue
            share = sum(u.num_examples for u in holders)
            assert share <= total
            for side, index in (("A", 0), ("B", 1)):
                expected = sum(u.num_examples / share * u.payload.tensors[f"{name}.{side}"] for u in holders)
                torch.testing.assert_close(after[name][index], expected)
        sent_bytes = sum(sum(t_.numel() * t_.element_size() for t_ in u.payload.tensors.values()) for u in uploads)
        assert history.loc[t, "bytes_up"] == sent_bytes
    # a layer the client was not allocated did not move during its training
    for t, result, _, state in strategy.sent:
        start = strategy.starts[t][result.client_id]
        for name, (a, b) in result.adapters.items():
            if layer_of(name) not in state.layers:
                assert torch.equal(a, start.adapters[name][0]) and torch.equal(b, start.adapters[name][1])


def test_fedra_allocation_is_the_seeded_matrix_of_the_round(layered):
    strategy = FedRA(1)
    layered.run(strategy, rounds=1, seed=5, progress=False, evaluate=False)
    server = layered.last_server
    expected = allocation_matrix([1] * layered.num_clients, 3, derive_seed(5, "fedra allocation", 0))
    assert np.array_equal(strategy.allocation(server, 0), expected)


def test_fedra_leaves_unallocated_blocks_out_of_the_client_model(layered):
    """Inside a client's training a block it was not allocated passes its input on unchanged; after, it computes."""
    strategy = FedRA(1)
    model = layered.fresh_model()
    strategy.prepare(layered, model, ServerState(adapter_io.get_lora_factors(model), {}, 1.0, 4, seed=0), 0)
    server = ServerState(adapter_io.get_lora_factors(model), {}, 1.0, 4, seed=0)
    state = strategy.new_client_state()
    start = strategy.client_start(server, 0, state, 0)
    (kept,) = state.layers
    blocks = model.base_model.model.encoder.encoder.layer
    hidden = torch.randn(2, 5, blocks[0].attention.self.query.in_features)
    mask = torch.ones(2, 5)
    layer_mask = model.base_model.model._layer_mask(hidden, mask)

    def out(block):
        value = block(hidden, layer_mask)
        return value[0] if isinstance(value, tuple) else value

    others = [i for i in (3, 4, 5) if i != kept]
    with strategy.local_training(model, start, state, 0):
        assert all(torch.equal(out(blocks[i]), hidden) for i in others)
        assert not torch.equal(out(blocks[kept]), hidden)
    assert not torch.equal(out(blocks[others[0]]), hidden)


def test_fedra_client_computes_less_than_one_training_the_same_layer_in_the_full_model(layered):
    fedra = client_costs(layered, FedRA(1), rounds=1, local_steps=1, evaluate=False)
    whole = client_costs(layered, FixedLayers([5]), rounds=1, local_steps=1, evaluate=False)
    assert fedra.trainable_parameters == whole.trainable_parameters
    assert fedra.flops < whole.flops


# ----- Fed-piLot ------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 20)), max_size=9),
       capacity=st.integers(0, 60))
def test_knapsack_is_optimal_against_brute_force(items, capacity):
    values, costs_ = [v for v, _ in items], [c for _, c in items]
    chosen = knapsack(values, costs_, capacity)
    assert chosen == sorted(set(chosen))
    assert sum(costs_[i] for i in chosen) <= capacity
    best = max(sum(values[i] for i in subset) for size in range(len(items) + 1)
               for subset in itertools.combinations(range(len(items)), size)
               if sum(costs_[i] for i in subset) <= capacity)
    assert sum(values[i] for i in chosen) == pytest.approx(best, abs=1e-9)


def test_knapsack_rejects_bad_inputs():
    with pytest.raises(ValueError, match="capacity"):
        knapsack([1.0], [1], -1)
    with pytest.raises(ValueError, match=r"costs\[0\]"):
        knapsack([1.0], [1.5], 3)
    with pytest.raises(ValueError, match=r"values\[0\]"):
        knapsack([math.nan], [1], 3)
    with pytest.raises(ValueError, match="items"):
        knapsack([1.0, 2.0], [1], 3)


def test_layer_costs_are_counted_and_bound_the_peak_of_a_set(layered, costs):
    assert set(costs.layer_bytes) == {3, 4, 5}
    # a lower layer keeps more activations for the backward pass: it costs more
    assert costs.layer_bytes[3] > costs.layer_bytes[4] > costs.layer_bytes[5] > 0
    measured = client_costs(layered, FixedLayers([4, 5]), rounds=1, local_steps=1, evaluate=False)
    assert measured.peak_bytes <= costs.step_bytes([4, 5])


def test_fed_pilot_choice_fits_each_budget_and_is_the_knapsack_optimum(layered, costs):
    budgets = [costs.step_bytes([5]), costs.step_bytes([4, 5]), costs.step_bytes([3]) + costs.layer_bytes[5] // 2]
    strategy = FedPiLot(budgets, costs=costs)
    layered.run(strategy, rounds=2, seed=1, progress=False, evaluate=False)
    state = layered.last_server.method_state
    layers = [3, 4, 5]
    for t, selections in enumerate(state.selections):
        assert selections, t
        for k, chosen in selections.items():
            assert costs.step_bytes(chosen) <= budgets[k]
            scores = dict(zip(layers, state.scores[t][k], strict=True))  # the scores the choice was made with
            best = max(sum(scores[i] for i in subset) for size in range(4)
                       for subset in itertools.combinations(layers, size) if costs.step_bytes(subset) <= budgets[k])
            assert sum(scores[i] for i in chosen) == pytest.approx(best)
    assert state.scores[0][0] == strategy.scores(FedPiLot.State(local_gain=state.local_gain), 0, layers)
    assert state.selections[0][0] == [5]  # the smallest budget holds the top layer only
    measured = client_costs(layered, FixedLayers(state.selections[0][1]), rounds=1, local_steps=1, evaluate=False)
    assert measured.peak_bytes <= budgets[1]  # the counted peak of the chosen set fits the budget


def test_fed_pilot_never_samples_a_client_whose_memory_holds_no_layer(layered, costs):
    too_small = costs.base_bytes + min(costs.layer_bytes.values()) - 1
    strategy = recording(FedPiLot)([too_small, costs.step_bytes([5]), costs.step_bytes([5])], costs=costs)
    layered.run(strategy, rounds=2, clients_per_round=2, seed=0, progress=False, evaluate=False)
    assert all(0 not in starts for starts in strategy.starts.values())
    with pytest.raises(ValueError, match="clients_per_round"):
        layered.run(FedPiLot([too_small] * 3, costs=costs), rounds=1, clients_per_round=1, progress=False)


def test_fed_pilot_re_applies_an_untrained_layers_decayed_change():
    """Round 1 trains both layers; round 2 only layer 1: layer 0 moves again by decay x its round-1 change."""
    names = ["m.layer.0.q", "m.layer.1.q"]
    start = {n: (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)) for n in names}
    server = ServerState(dict(start), {}, 1.0, 2, method_state=FedPiLot.State(stale={0: 0, 1: 0}))
    strategy = FedPiLot(decay=0.5)

    def upload(k, factors):
        tensors = {f"{n}.{side}": f[i] for n, f in factors.items() for i, side in enumerate("AB")}
        return Upload(k, 10, Payload(tensors), 2)

    first = {n: (torch.ones(2, 3, dtype=torch.float64), 2 * torch.ones(4, 2, dtype=torch.float64)) for n in names}
    strategy.aggregate(server, [upload(0, first)], 0)
    assert torch.equal(server.adapters[names[0]][0], first[names[0]][0])
    second = {names[1]: (3 * torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64))}
    strategy.aggregate(server, [upload(1, second)], 1)
    torch.testing.assert_close(server.adapters[names[0]][0], 1.5 * torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(server.adapters[names[0]][1], 3.0 * torch.ones(4, 2, dtype=torch.float64))
    torch.testing.assert_close(server.adapters[names[1]][0], second[names[1]][0])
    strategy = FedPiLot(decay=0.0)
    server = ServerState(dict(start), {}, 1.0, 2, method_state=FedPiLot.State(stale={0: 0, 1: 0}))
    strategy.aggregate(server, [upload(0, first)], 0)
    strategy.aggregate(server, [upload(1, second)], 1)
    assert torch.equal(server.adapters[names[0]][0], first[names[0]][0])  # no compensation: unchanged


def test_fed_pilot_rejects_bad_parameters():
    for options, word in (({"memory_budgets": -1}, "memory_budgets"), ({"memory_budgets": []}, "memory_budgets"),
                          ({"mix": 1.5}, "mix"), ({"decay": -0.1}, "decay"), ({"costs": {3: 1}}, "costs"),
                          ({"score_batch": 0}, "score_batch")):
        with pytest.raises(ValueError, match=word):
            FedPiLot(**options)


# ----- FibecFed -------------------------------------------------------------------------
def test_fisher_scores_equal_a_direct_computation(layered):
    model = layered.fresh_model(seed=2)
    generator = torch.Generator().manual_seed(0)
    factors = {n: (a, 0.05 * torch.randn(b.shape, generator=generator))
               for n, (a, b) in adapter_io.get_lora_factors(model).items()}
    adapter_io.set_lora_factors(model, factors)  # B != 0, so A's gradient counts too
    data = layered.clients[0]
    scores = layer_fisher_scores(model, data, examples=5, seed=7)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(7))[:5].tolist()
    model.eval()
    expected = {}
    for layer in (3, 4, 5):
        params = [p for name, module in adapter_io.lora_layers(model).items() if layer_of(name) == layer
                  for p in (module.lora_A["default"].weight, module.lora_B["default"].weight)]
        total = 0.0
        for i in order:
            batch = trim_batch(data.subset([i]), torch.device("cpu"))
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            log_likelihood = F.log_softmax(logits.double(), dim=-1)[0, batch["labels"][0]]
            gradients = torch.autograd.grad(log_likelihood, params)
            total += sum(float(g.double().square().sum()) for g in gradients)
        expected[layer] = total / len(order)
    assert set(scores) == {3, 4, 5}
    for layer in expected:
        assert scores[layer] == pytest.approx(expected[layer], rel=1e-4)
    assert all(module.lora_A["default"].weight.grad is None for module in adapter_io.lora_layers(model).values())


def test_fibecfed_keeps_the_layers_of_largest_weighted_fisher_and_trains_only_them(layered):
    strategy = recording(FibecFed)(1, fisher_examples=3)
    layered.run(strategy, rounds=1, seed=2, progress=False, evaluate=False)
    state = layered.last_server.method_state
    assert state.kept == [max(state.fisher, key=state.fisher.get)]
    before, uploads = strategy.rounds[0]
    for upload in uploads:
        assert {layer_of(k.rsplit(".", 1)[0]) for k in upload.payload.tensors if k[-2:] in (".A", ".B")} == \
            set(state.kept)
    for name in layered.last_server.adapters:
        if layer_of(name) not in state.kept:
            assert torch.equal(layered.last_server.adapters[name][1], before[name][1])
    with pytest.raises(ValueError, match="layers_kept"):
        layered.run(FibecFed(4), rounds=1, progress=False)
    for bad in (0, True):
        with pytest.raises(ValueError, match="layers_kept"):
            FibecFed(bad)
    with pytest.raises(ValueError, match="fisher_examples"):
        FibecFed(fisher_examples=0)


# ----- FedFMSL --------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(accuracies=st.lists(st.floats(0, 1), max_size=20), initial=st.integers(1, 3), extra=st.integers(0, 3),
       gain=st.floats(0, 0.2))
def test_fedfmsl_switches_layers_on_monotonically(accuracies, initial, extra, gain):
    total = initial + extra
    schedule = switch_schedule(accuracies, initial=initial, total=total, gain=gain)
    assert len(schedule) == len(accuracies) + 1 and schedule[0] == initial
    assert all(0 <= later - earlier <= 1 for earlier, later in itertools.pairwise(schedule))
    assert max(schedule) <= total
    rising = sorted(accuracies)  # accuracy that never falls: with gain 0 every round after the first adds a layer
    assert switch_schedule(rising, initial=initial, total=total, gain=0.0)[-1] == \
        min(total, initial + max(0, len(rising) - 1))
    assert switch_schedule([0.5] + [0.5 + gain / 2] * 5, initial=initial, total=total, gain=gain + 1e-3)[-1] == initial


def test_fedfmsl_trains_the_top_layers_and_adds_one_as_accuracy_rises(layered):
    strategy = recording(FedFMSL)(1, gain=0.0)  # any rise switches one more layer on
    layered.run(strategy, rounds=3, seed=0, progress=False, evaluate=False)
    state = layered.last_server.method_state
    actives = [active for _, active in state.history]
    assert actives[0] == 1 and all(b >= a for a, b in itertools.pairwise(actives))
    assert all(0 <= accuracy <= 1 for accuracy, _ in state.history)
    for t, _, payload, client_state in strategy.sent:
        sent = {layer_of(k.rsplit(".", 1)[0]) for k in payload.tensors if k[-2:] in (".A", ".B")}
        assert sent == set(client_state.layers) == set([3, 4, 5][-actives[t]:])
        assert "train_accuracy" in payload.tensors
    for bad, word in ((0, "initial_layers"), (True, "initial_layers")):
        with pytest.raises(ValueError, match=word):
            FedFMSL(bad)
    with pytest.raises(ValueError, match="gain"):
        FedFMSL(gain=-0.5)
    with pytest.raises(ValueError, match="initial_layers"):
        layered.run(FedFMSL(4), rounds=1, progress=False)


# ----- registry and shared pieces -------------------------------------------------------
def test_registered_by_their_survey_names():
    for name, cls in (("FedRA", FedRA), ("Fed-piLot", FedPiLot), ("FibecFed", FibecFed), ("FedFMSL", FedFMSL)):
        assert METHODS[name] is cls and isinstance(make_strategy(name), cls)
        assert cls.chapter == "book/part4/layers"


def test_modules_in_and_fixed_layers():
    assert modules_in(NAMES, [1]) == NAMES[2:4]
    with pytest.raises(ValueError, match="layers"):
        FixedLayers([])
    assert LayerCosts(10, {0: 1, 1: 2}).step_bytes([0, 1]) == 13
