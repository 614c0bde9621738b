"""Mixtures of LoRA experts (survey 4.2, eq. 14): FedLEASE's clustered experts and adaptive top-M router, FedMoE's
sub-mixtures with modular aggregation and expert recommendation."""

from __future__ import annotations

import contextlib
import functools
import re

import pytest
import torch
from helpers import recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.strategy import normalized_weights
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.heterogeneity.clustering import cluster_averages, matched_accuracy
from fedlora_edu.heterogeneity.experts import (
    ROUTER,
    ExpertRouter,
    FedLEASE,
    FedMoE,
    GateRecorder,
    adaptive_top_m_gates,
    expanded_slots,
    lease_clusters,
    mixture_installed,
    mixture_output,
    modular_average,
    recommend_experts,
    select_experts,
    stack_experts,
    sub_mixture_gates,
    uniform_mixture,
    unstack_experts,
)
from fedlora_edu.registry import METHODS, make_strategy
from fedlora_edu.teaching.per_client import keeping_client_states, served_accuracies

LAYERS = ("layer.4.query", "layer.5.value")


def random_experts(g, count, m=5, n=7, r=2):
    return [(torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64))
            for _ in range(count)]


# ----- stacking ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_stacked_experts_compute_the_sum_and_the_uniform_mixture_their_mean(seed):
    g = torch.Generator().manual_seed(seed)
    experts = random_experts(g, 3)
    a, b = stack_experts(experts, slots=5)
    assert a.shape == (10, 7) and b.shape == (5, 10) and not a[6:].any() and not b[:, 6:].any()
    assert torch.allclose(b @ a, sum(be @ ae for ae, be in experts))
    for (ae, be), (au, bu) in zip(experts, unstack_experts((a, b), 3, 2), strict=True):
        assert torch.equal(ae, au) and torch.equal(be, bu)
    alpha, r, slots = 16.0, 2, 5
    am, bm = uniform_mixture(experts, slots)
    mean = sum(alpha / r * be @ ae for ae, be in experts) / len(experts)
    assert torch.allclose(alpha / (slots * r) * bm @ am, mean)  # a plain rank-(slots r) layer computes the mean


# ----- FedLEASE's gates --------------------------------------------------------------------
@pytest.mark.parametrize("num_experts", [1, 2, 3, 4])
def test_adaptive_top_m_uses_its_own_expert_and_between_1_and_m_experts(num_experts):
    g = torch.Generator().manual_seed(num_experts)
    for own in range(num_experts):
        logits = torch.randn(400, 2 * num_experts - 1, generator=g, dtype=torch.float64, requires_grad=True)
        gates = adaptive_top_m_gates(logits, own, num_experts)
        assert gates.shape == (400, num_experts)
        assert torch.allclose(gates.sum(-1), torch.ones(400, dtype=torch.float64)) and (gates >= 0).all()
        assert (gates[:, own] > 0).all()  # M winners among 2M - 1 slots, only M - 1 of them not the own expert's
        used = (gates > 0).sum(-1)
        assert used.min() >= 1 and used.max() <= num_experts
        if num_experts >= 3:
            assert len(set(used.tolist())) > 1  # random scores: the number used varies
        gates[:, (own + 1) % num_experts].sum().backward()  # trainable: a gate's gradient reaches the scores
        assert num_experts == 1 or logits.grad.abs().sum() > 0
    m = 4
    slots = torch.tensor(expanded_slots(1, m))
    assert slots.tolist() == [1, 1, 1, 1, 0, 2, 3]
    own_high = torch.where(slots == 1, 5.0, 0.0).to(torch.float64)
    assert (adaptive_top_m_gates(own_high, 1, m) > 0).sum() == 1  # the own slots win: one expert
    others_high = torch.where(slots == 1, 0.0, 5.0).to(torch.float64)
    assert (adaptive_top_m_gates(others_high, 1, m) > 0).sum() == m  # the others win: all M experts
    with pytest.raises(ValueError, match="2M - 1"):
        adaptive_top_m_gates(torch.zeros(3, 6), 0, 4)
    with pytest.raises(ValueError, match="own"):
        expanded_slots(4, 4)


def test_sub_mixture_gates_live_on_the_selected_experts_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=g, requires_grad=True)
    gates = sub_mixture_gates(logits, (1, 3))
    assert torch.allclose(gates.sum(-1), torch.ones(50))
    assert not gates[:, [0, 2, 4]].any() and (gates[:, [1, 3]] > 0).all()
    (gates * torch.randn(50, 5, generator=g)).sum().backward()
    assert not logits.grad[:, [0, 2, 4]].any() and logits.grad[:, [1, 3]].abs().sum() > 0
    with pytest.raises(ValueError, match="selected"):
        sub_mixture_gates(logits, (5,))


# ----- aggregation, selection, recommendation -----------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modular_average_averages_each_expert_over_exactly_its_holders(seed):
    g = torch.Generator().manual_seed(seed)
    previous = random_experts(g, 4)
    held = [(0, 2), (2,), (0, 1), (2,)]
    uploads = [{e: random_experts(g, 1)[0] for e in h} for h in held]
    weights = torch.rand(4, generator=g, dtype=torch.float64)
    weights = (weights / weights.sum()).tolist()
    merged = modular_average(uploads, weights, previous)
    for e in range(4):
        holders = [k for k, h in enumerate(held) if e in h]
        if not holders:  # expert 3: nobody holds it, it keeps its value
            assert all(torch.equal(t, p) for t, p in zip(merged[e], previous[e], strict=True))
            continue
        mass = sum(weights[k] for k in holders)
        for i in range(2):
            expected = sum(weights[k] / mass * uploads[k][e][i] for k in holders)
            assert torch.allclose(merged[e][i], expected)
    # One expert per client (FedLEASE's clusters): the per-cluster average of the clustering module.
    labels = [0, 1, 0, 1]
    adapters = [{"l": random_experts(g, 1)[0]} for _ in labels]
    by_cluster = cluster_averages(adapters, weights, labels)
    merged = modular_average([{c: adapters[k]["l"]} for k, c in enumerate(labels)], weights, previous[:2])
    for c in (0, 1):
        assert all(torch.allclose(x, y) for x, y in zip(merged[c], by_cluster[c]["l"], strict=True))
    with pytest.raises(ValueError, match="weights"):
        modular_average(uploads, weights[:3], previous)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_and_recommendation_follow_the_activation_statistics(seed):
    g = torch.Generator().manual_seed(seed)
    share = torch.rand(6, generator=g)
    chosen = select_experts(share, 3)
    assert len(chosen) == 3 and min(share[list(chosen)]) >= max(share[[e for e in range(6) if e not in chosen]])
    assert select_experts(torch.tensor([0.2, 0.3, 0.3, 0.2]), 1) == (1,)  # ties: the lower index
    held = tuple(e for e in range(6) if e not in chosen)  # the least activated ones
    assert recommend_experts(share, held, margin=0.0) == chosen
    flat = torch.full((6,), 1 / 6) + 1e-4 * torch.rand(6, generator=g)  # barely told apart: nothing changes
    assert recommend_experts(flat, held, margin=0.1) == tuple(sorted(held))
    with pytest.raises(ValueError, match="size"):
        select_experts(share, 7)
    with pytest.raises(ValueError, match="margin"):
        recommend_experts(share, held, margin=-1.0)


# ----- FedLEASE's clustering ------------------------------------------------------------------
def planted(seed, groups, noise=0.05, m=8, n=6, r=2):
    g = torch.Generator().manual_seed(seed)
    centres = {group: {name: torch.randn(m, r, generator=g) for name in LAYERS} for group in sorted(set(groups))}
    return [{name: (torch.randn(r, n, generator=g), b + noise * torch.randn(b.shape, generator=g))
             for name, b in centres[group].items()} for group in groups]


@pytest.mark.parametrize("seed", range(4))
def test_lease_clusters_use_b_only_choose_the_number_and_recover_planted_groups(seed):
    groups = [0, 1, 2, 0, 1, 2, 2, 0]
    adapters = planted(seed, groups)  # A random per client: only B carries the group
    labels, distances, scores = lease_clusters(adapters, most=5)
    assert len(set(labels)) == 3 and matched_accuracy(labels, groups) == 1.0
    assert max(scores, key=scores.get) == 3 and distances.shape == (8, 8)
    g = torch.Generator().manual_seed(100 + seed)
    other_a = [{name: (10 * torch.randn(a.shape, generator=g), b) for name, (a, b) in adapter.items()}
               for adapter in adapters]
    assert lease_clusters(other_a, most=5)[0] == labels  # changing A does not change the clustering
    fixed, _, _ = lease_clusters(adapters, most=5, num_clusters=2)
    assert len(set(fixed)) == 2


# ----- the mixture on a real layer -------------------------------------------------------------
def test_the_installed_mixture_is_the_equation_on_a_real_layer_and_is_undone(shards_federation):
    """W'x + sum_e g_e(x) (alpha / r) B_e A_e x per token; only trainable experts get gradients; restored after."""
    model = shards_federation.fresh_model(rank=4)  # 2 slots of rank 2
    layers = adapter_io.lora_layers(model)
    name, layer = next(iter(layers.items()))
    g = torch.Generator().manual_seed(3)
    n = layer.lora_A[adapter_io.ADAPTER].weight.shape[1]
    m = layer.lora_B[adapter_io.ADAPTER].weight.shape[0]
    experts = {lay: [(torch.randn(2, n, generator=g), torch.randn(m, 2, generator=g)) for _ in range(2)]
               for lay in layers}
    adapter_io.set_lora_factors(model, {lay: stack_experts(e, 2) for lay, e in experts.items()})
    rule = functools.partial(adaptive_top_m_gates, own=1, num_experts=2)
    routers = {lay: ExpertRouter(torch.randn(3, n, generator=g) / n ** 0.5, rule, 2) for lay in layers}
    x = torch.randn(2, 6, n, generator=g)
    before = layer(x).detach()
    head_keys = adapter_io.get_head_state(model).keys()
    recorder = GateRecorder()
    with mixture_installed(model, routers, 2, trainable={lay: [1] for lay in layers}, recorder=recorder):
        out = layer(x)
        gates = rule(x @ routers[name].weight.T)
        alpha_over_r = layer.lora_alpha[adapter_io.ADAPTER] / 2
        expected = mixture_output(x, layer.base_layer.weight, experts[name], gates, alpha_over_r)
        expected = expected + layer.base_layer.bias
        assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
        assert any(p is routers[name].weight for p in model.parameters())  # an optimiser built inside trains it
        assert adapter_io.get_head_state(model).keys() == head_keys  # and it is not mistaken for the head
        out.square().sum().backward()
        a_grad = layer.lora_A[adapter_io.ADAPTER].weight.grad
        assert not a_grad[:2].any() and a_grad[2:].abs().sum() > 0  # expert 0 frozen, expert 1 trains
        assert routers[name].weight.grad.abs().sum() > 0
        used = recorder.experts_used(name)
        assert used.sum() == 12 and used[0] == 0  # every token used its own expert, 1 or 2 in all
    model.zero_grad(set_to_none=True)
    assert torch.allclose(layer(x), before) and ROUTER not in layer._modules
    assert layer.scaling[adapter_io.ADAPTER] == layer.lora_alpha[adapter_io.ADAPTER] / 4


def test_the_simulator_and_served_accuracies_evaluate_each_client_inside_serving(shards_federation):
    """Strategy.serving is the context a client's served model is scored in, in the simulator and after a run."""

    class Counting(keeping_client_states(FedIT)):
        def serving(self, model, server, client_id, client_state):
            self.__dict__.setdefault("calls", []).append(client_id)
            return contextlib.nullcontext()

    strategy = Counting()
    shards_federation.run(strategy, rounds=1, evaluate=False, evaluate_clients=True, progress=False)
    assert strategy.calls == [0, 1, 2]
    served_accuracies(shards_federation, strategy, shards_federation.last_server, strategy.client_states[-3:])
    assert strategy.calls == [0, 1, 2, 0, 1, 2]
    assert isinstance(FedIT().serving(None, None, 0, None), contextlib.nullcontext)  # nothing by default


# ----- FedLEASE in the simulator ---------------------------------------------------------------
def test_fedlease_experts_are_clusters_averaged_within_them_and_served_through_the_router(shards_federation):
    cls = keeping_client_states(recording(FedLEASE))
    strategy = cls(rank=2, max_experts=2)
    history = shards_federation.run(strategy, rounds=1, evaluate_clients=True, progress=False)
    server = shards_federation.last_server
    state = server.method_state
    clusters = set(state.cluster_of.values())
    assert len(state.experts) == len(clusters) == 2  # one expert per cluster (3 clients: 2 clusters)
    assert state.warmup_bytes == 3 * sum(tensor_bytes(list(adapter)) for adapter in state.experts[0].values())
    # each client sends its own cluster's expert and the head, nothing else
    r = 2
    expert_bytes = sum(r * (a.shape[1] + b.shape[0]) * 4 for a, b in state.experts[0].values())
    for _, result, payload, _ in strategy.sent:
        c = state.cluster_of[result.client_id]
        sent_experts = {re.search(r"\.expert(\d+)\.[AB]$", key) for key in payload.tensors}
        assert {int(found.group(1)) for found in sent_experts if found} == {c}
        assert payload.nbytes == expert_bytes + tensor_bytes(result.head)
    # each expert is the p_k-weighted mean over its cluster's clients of the round
    uploads = strategy.uploads
    weights = normalized_weights(uploads)
    for c in clusters:
        members = [i for i, u in enumerate(uploads) if state.cluster_of[u.client_id] == c]
        mass = sum(weights[i] for i in members)
        for name in state.experts[c]:
            expected = sum(weights[i] / mass * uploads[i].payload.tensors[f"{name}.expert{c}.A"].double()
                           for i in members)
            assert torch.allclose(state.experts[c][name][0].double(), expected, atol=1e-6)
    # the served model mixes the experts by the client's router: the simulator's column agrees
    states = strategy.client_states[-3:]
    accuracies, personal = served_accuracies(shards_federation, strategy, server, states)
    assert all(personal) and abs(sum(accuracies) / 3 - history["client_accuracy"].iloc[-1]) < 1e-9
    for s in states:
        for used in s.experts_used.values():
            assert used[0] == 0 and used.sum() > 0  # every token used 1 or 2 experts


def test_fedlease_an_expert_with_none_of_its_clients_sampled_keeps_its_value(shards_federation):
    strategy = recording(FedLEASE)(rank=2, max_experts=2)
    shards_federation.run(strategy, rounds=1, clients_per_round=1, evaluate=False, progress=False)
    state = shards_federation.last_server.method_state
    (upload,) = strategy.uploads
    sampled = state.cluster_of[upload.client_id]
    before = strategy.starts[0][upload.client_id].download.tensors
    for c in range(len(state.experts)):
        for name, (a, _) in state.experts[c].items():
            same = torch.equal(a, before[f"{name}.expert{c}.A"])
            assert same == (c != sampled)


# ----- FedMoE in the simulator -----------------------------------------------------------------
def test_fedmoe_trains_and_sends_only_its_sub_mixture_and_aggregates_by_module(shards_federation):
    cls = keeping_client_states(recording(FedMoE))
    strategy = cls(rank=1, num_experts=4, experts_per_client=2, margin=0.0)
    history = shards_federation.run(strategy, rounds=1, evaluate_clients=True, progress=False)
    server = shards_federation.last_server
    state = server.method_state
    starts = strategy.starts[0]
    first = {k: dict(starts[k].download.tensors) for k in starts}
    held = {}
    for _, result, payload, client_state in strategy.sent:
        k = result.client_id
        held[k] = client_state.selected
        # stage 1 chose the most activated experts (this client's sub-mixture at its download)
        size = 0
        for name, (a, b) in result.adapters.items():
            chosen = client_state.selected[name]
            assert len(chosen) == 2
            for e in range(4):
                sl = slice(e, e + 1)  # rank 1: expert e is component e
                if e not in chosen:  # not held: zero, untrained, not sent
                    assert not a[sl].any() and not b[:, sl].any() and f"{name}.expert{e}.A" not in payload.tensors
                else:
                    assert not torch.equal(b[:, sl], first[k][f"{name}.expert{e}.B"])  # trained
            size += 2 * (a.shape[1] + b.shape[0] + a.shape[1]) * 4 + 4 * 4  # experts, router rows, 4 shares
        assert payload.nbytes == size + tensor_bytes(result.head)
    # modular aggregation: each expert over exactly its holders; an expert nobody held keeps its value
    uploads = strategy.uploads
    weights = normalized_weights(uploads)
    before = strategy.rounds[0]
    kept = averaged = 0
    for name in state.router:
        for e in range(4):
            holders = [i for i, u in enumerate(uploads) if e in held[u.client_id][name]]
            value = state.experts[e][name][1]
            if not holders:
                assert torch.equal(value, before[0][name][1][:, e:e + 1])  # slots = E: the mean is the stack
                kept += 1
                continue
            averaged += 1
            mass = sum(weights[i] for i in holders)
            expected = sum(weights[i] / mass * uploads[i].payload.tensors[f"{name}.expert{e}.B"].double()
                           for i in holders)
            assert torch.allclose(value.double(), expected, atol=1e-6)
    assert kept > 0 and averaged > 0  # both cases occurred
    # recommendation with margin 0: the new sub-mixture is the top-2 of the statistics the client sent
    for u in uploads:
        for name in state.router:
            assert state.selected[u.client_id][name] == select_experts(u.payload.tensors[f"{name}.activation"], 2)
    states = strategy.client_states[-3:]
    accuracies, personal = served_accuracies(shards_federation, strategy, server, states)
    assert all(personal) and abs(sum(accuracies) / 3 - history["client_accuracy"].iloc[-1]) < 1e-9


def test_fedmoe_stage_one_takes_the_most_activated_experts(shards_federation):
    strategy = FedMoE(rank=1, num_experts=4, experts_per_client=3)
    model = shards_federation.fresh_model(rank=4)
    server = type("Server", (), {})()
    server.adapters, server.rank, server.head = adapter_io.get_lora_factors(model), 4, {}
    server.method_state = FedMoE.State()
    strategy.init_server(server, seed=0)
    strategy.prepare(shards_federation, model, server, seed=0)
    state = server.method_state
    assert set(state.selected) == {0, 1, 2}
    for k in range(3):
        for name, share in state.activation[k].items():
            assert abs(float(share.sum()) - 1) < 1e-5
            assert state.selected[k][name] == select_experts(share, 3)
    assert state.search_bytes == 3 * len(state.router) * 4 * 4


def test_the_methods_check_their_settings_and_are_registered():
    for cls, label, options in ((FedLEASE, "max_experts", {"max_experts": 1}),
                                (FedLEASE, "num_experts", {"max_experts": 2, "num_experts": 3}),
                                (FedLEASE, "warmup_steps", {"warmup_steps": 0}),
                                (FedMoE, "experts_per_client", {"num_experts": 4, "experts_per_client": 5}),
                                (FedMoE, "probe_batches", {"probe_batches": 0}),
                                (FedMoE, "margin", {"margin": -0.5})):
        with pytest.raises(ValueError, match=label):
            cls(**options)
    assert METHODS["FedLEASE"] is FedLEASE and METHODS["FedMoE"] is FedMoE
    assert isinstance(make_strategy("FedMoE", num_experts=2, experts_per_client=1), FedMoE)
    assert FedLEASE(rank=2, max_experts=3).max_rank(8) == 6 and FedMoE(rank=2, num_experts=4).max_rank(8) == 8
