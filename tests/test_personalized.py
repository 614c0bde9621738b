"""Personalized LoRA (survey 4.2, eq. 13): FedSA-LoRA shares A and keeps every client's own B; CE-LoRA shares only C."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import TINY, recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.factors import average_tensors
from fedlora_edu.core.strategy import normalized_weights
from fedlora_edu.heterogeneity.personalized import (
    CELoRA,
    FDLoRA,
    FedDPA,
    FedSALoRA,
    _Phase1Mix,
    best_weight,
    cosine_matrix,
    similarity_weights,
)


def test_fedsa_lora_never_sends_b_and_every_client_keeps_its_own(shards_federation):
    strategy = recording(FedSALoRA)()
    history = shards_federation.run(strategy, rounds=3, progress=False, evaluate_clients=True)
    server = shards_federation.last_server
    layers = list(server.adapters)
    a_bytes = tensor_bytes([a for a, _ in server.adapters.values()])
    head_bytes = tensor_bytes(server.head)
    expected_keys = {f"{n}.A" for n in layers} | {f"head.{k}" for k in server.head}
    for t, starts in strategy.starts.items():
        for start in starts.values():
            assert set(start.download.tensors) == expected_keys, t  # B is never downloaded either
    for _, result, payload, state in strategy.sent:
        assert set(payload.tensors) == expected_keys and payload.nbytes == a_bytes + head_bytes
        for n in layers:
            assert torch.equal(state.B[n], result.adapters[n][1])  # the client kept the B it trained
    assert (history["bytes_up"] == TINY.clients_per_round * (a_bytes + head_bytes)).all()
    # Each client resumes from its own B: round t's start is the B it uploaded... kept in round t - 1.
    last_b = {}
    for t in sorted(strategy.starts):
        for k, start in strategy.starts[t].items():
            for n, (_, b) in start.adapters.items():
                if k in last_b:
                    assert torch.equal(b, last_b[k][n]), (t, k)
                else:
                    assert not b.any(), (t, k)  # before its first round: the server's initial B = 0
        for round_index, result, _, _ in strategy.sent:
            if round_index == t:
                last_b[result.client_id] = {n: b.clone() for n, (_, b) in result.adapters.items()}
    clients = sorted(last_b)
    assert len(clients) > 1
    n = layers[0]
    assert not torch.allclose(last_b[clients[0]][n], last_b[clients[1]][n])  # personal, not shared
    assert history["client_accuracy"].notna().all()


def test_fedsa_lora_server_averages_a_with_the_clients_weights_and_keeps_b_zero(shards_federation):
    strategy = recording(FedSALoRA)()
    shards_federation.run(strategy, rounds=2, progress=False)
    server = shards_federation.last_server
    uploads = strategy.uploads
    weights = normalized_weights(uploads)
    for n, (a, b) in server.adapters.items():
        expected = average_tensors([u.payload.tensors[f"{n}.A"].to(a) for u in uploads], weights)
        assert torch.allclose(a, expected)
        assert not b.any()  # the server never holds a B: its own model is the pre-trained one
    model = shards_federation.fresh_model()
    initial = adapter_io.get_lora_factors(model)
    assert all(not initial[n][1].any() for n in initial)


def test_fedsa_lora_personal_model_is_the_global_a_with_the_clients_own_b(shards_federation):
    strategy = recording(FedSALoRA)()
    shards_federation.run(strategy, rounds=1, progress=False)
    server = shards_federation.last_server
    _, result, _, state = strategy.sent[0]
    personal, head = strategy.personal_model(server, result.client_id, state)
    for n, (a, b) in personal.items():
        assert torch.equal(a, server.adapters[n][0]) and torch.equal(b, state.B[n].to(b))
    assert set(head) == set(server.head)
    assert strategy.personal_model(server, 99, FedSALoRA.ClientState()) is None  # never trained: global model


# ----- CE-LoRA: B C A, only C shared, a personalised C-bar per client ---------------------------------


def test_ce_lora_sends_only_c_and_keeps_a_and_b_on_the_client(shards_federation):
    strategy = recording(CELoRA)()
    history = shards_federation.run(strategy, rounds=3, progress=False, evaluate_clients=True)
    server = shards_federation.last_server
    layers = list(server.adapters)
    r = server.rank
    head_keys = {f"head.{k}" for k in server.head}
    c_bytes = len(layers) * r * r * 4  # float32 r x r per layer
    head_bytes = tensor_bytes(server.head)
    seen: set[int] = set()
    for _, _, payload, _ in strategy.sent:
        assert set(payload.tensors) == {f"{n}.C" for n in layers} | head_keys
        assert all(payload.tensors[f"{n}.C"].shape == (r, r) for n in layers)
    for t in sorted(strategy.starts):
        for k, start in strategy.starts[t].items():
            keys = set(start.download.tensors)
            if k in seen:  # a returning client downloads its C-bar and the head, never A or B
                assert keys == {f"{n}.C" for n in layers} | head_keys, (t, k)
            else:  # its first round: the starting A and B, once
                assert keys == {f"{n}.{f}" for n in layers for f in "AB"} | head_keys, (t, k)
        seen |= set(strategy.starts[t])
    descriptor = strategy.descriptor_bytes
    assert descriptor > 0
    first_uploads = {}
    for round_index, result, payload, _ in strategy.sent:
        first = result.client_id not in first_uploads
        first_uploads.setdefault(result.client_id, round_index)
        assert payload.nbytes == c_bytes + head_bytes + (descriptor if first else 0)
    assert history["client_accuracy"].notna().all()


class _CBarRecording(recording(CELoRA)):
    """CE-LoRA that also keeps a copy of every client's C-bar after each round's aggregation."""

    def aggregate(self, server, uploads, round_index):
        super().aggregate(server, uploads, round_index)
        self.__dict__.setdefault("c_bars", {})[round_index] = {
            k: {n: c.clone() for n, c in cs.items()} for k, cs in server.method_state.C_bar.items()}


def test_ce_lora_trains_b_c_a_and_resumes_from_its_own_a_b_and_its_c_bar(shards_federation):
    strategy = _CBarRecording()
    shards_federation.run(strategy, rounds=3, progress=False)
    last: dict[int, object] = {}
    resumed = 0
    for t in sorted(strategy.starts):
        for k, start in strategy.starts[t].items():
            if k in last:  # its own A and B as it left them, and the C-bar the server computed after its last round
                resumed += 1
                for n, (a, b) in start.adapters.items():
                    assert torch.equal(a, last[k].A[n]) and torch.equal(b, last[k].B[n]), (t, k)
                    assert torch.equal(start.download.tensors[f"{n}.C"], strategy.c_bars[t - 1][k][n]), (t, k)
        for round_index, result, _, client_state in strategy.sent:
            if round_index == t:
                for n, (effective_a, b) in result.adapters.items():
                    # the layer trained B C A: what it computed with is C times the A the client keeps
                    assert torch.allclose(effective_a, client_state.C[n] @ client_state.A[n], atol=1e-6)
                    assert torch.equal(b, client_state.B[n])
                last[result.client_id] = client_state
    assert resumed > 0 and len(shards_federation.last_server.method_state.C) > 1


def test_ce_lora_c_bar_is_the_similarity_weighted_mean_of_the_stored_cs(shards_federation):
    strategy = recording(CELoRA)(temperature=0.2, data_share=0.3)
    shards_federation.run(strategy, rounds=2, progress=False)
    server = shards_federation.last_server
    state = server.method_state
    clients = sorted(state.C)
    names = list(server.adapters)
    learned = torch.stack([torch.cat([(state.C[k][n] - torch.eye(server.rank)).flatten() for n in names])
                           for k in clients])
    descriptors = torch.stack([state.descriptors[k] for k in clients])
    sizes = torch.tensor([float(state.sizes[k]) for k in clients])
    p = sizes / sizes.sum()
    for row, i in enumerate(clients):
        # w_ij from its definition, one client at a time
        scores = [0.3 * float(torch.nn.functional.cosine_similarity(descriptors[row], descriptors[col], dim=0))
                  + 0.7 * float(torch.nn.functional.cosine_similarity(learned[row], learned[col], dim=0))
                  for col in range(len(clients))]
        raw = [float(p[col]) * math.exp(score / 0.2) for col, score in enumerate(scores)]
        expected = [value / sum(raw) for value in raw]
        got = [state.weights[-1][i][j] for j in clients]
        assert got == pytest.approx(expected, rel=1e-6)
        for n in names:
            assert torch.allclose(state.C_bar[i][n], average_tensors([state.C[j][n] for j in clients], expected),
                                  atol=1e-6)


def test_similarity_weights_limits_and_checks():
    g = torch.Generator().manual_seed(0)
    data = cosine_matrix(torch.randn(5, 7, generator=g))
    params = cosine_matrix(torch.randn(5, 3, generator=g))
    sizes = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0])
    for temperature, share in ((0.05, 0.5), (1.0, 0.0), (0.3, 1.0)):
        w = similarity_weights(data, params, sizes, temperature=temperature, data_share=share)
        assert torch.allclose(w.sum(dim=1), torch.ones(5, dtype=torch.float64)) and (w > 0).all()
    flat = similarity_weights(data, params, sizes, temperature=1e9, data_share=0.5)
    assert torch.allclose(flat, (sizes / sizes.sum()).double().expand(5, 5), atol=1e-8)  # FedAvg's p_j
    own = similarity_weights(data, params, sizes, temperature=1e-3, data_share=0.5)
    assert torch.allclose(own, torch.eye(5, dtype=torch.float64), atol=1e-8)  # each its own C (cos_ii = 1 is largest)
    for bad in ({"temperature": 0.0}, {"data_share": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            similarity_weights(data, params, sizes, **{"temperature": 1.0, "data_share": 0.5, **bad})
    with pytest.raises(ValueError, match="temperature"):
        CELoRA(temperature=-1.0)
    with pytest.raises(ValueError, match="5 x 5"):
        similarity_weights(data, params[:4, :4], sizes, temperature=1.0, data_share=0.5)


def test_ce_lora_layer_computes_w_plus_s_b_c_a_on_a_real_layer(shards_federation):
    """On the encoder's own LoRA layer, inside local_training the layer's output is W'x + s B C A x."""
    model = shards_federation.fresh_model()
    layers = adapter_io.lora_layers(model)
    name, layer = next(iter(layers.items()))
    g = torch.Generator().manual_seed(1)
    factors = {n: (torch.randn(lay.lora_A[adapter_io.ADAPTER].weight.shape, generator=g),
                   torch.randn(lay.lora_B[adapter_io.ADAPTER].weight.shape, generator=g)) for n, lay in layers.items()}
    adapter_io.set_lora_factors(model, factors)
    r = factors[name][0].shape[0]
    C = {n: torch.randn(r, r, generator=g) for n in layers}
    strategy = CELoRA()
    client_state = CELoRA.ClientState(C_start=C)
    x = torch.randn(3, factors[name][0].shape[1], generator=g)
    scale = layer.scaling[adapter_io.ADAPTER]
    with torch.no_grad():
        base = layer.base_layer(x)
    with strategy.local_training(model, None, client_state, 0), torch.no_grad():
        a, b = factors[name]
        assert torch.allclose(layer(x), base + scale * x @ (b @ C[name] @ a).T, atol=1e-4)
        assert any(p is layer.lora_A[adapter_io.ADAPTER].parametrizations.weight[0].C for p in model.parameters())
    assert torch.equal(layer.lora_A[adapter_io.ADAPTER].weight, a)  # undone on exit: A holds its stored value
    assert not any(hasattr(lay.lora_A[adapter_io.ADAPTER], "parametrizations") for lay in layers.values())


# ----- FedDPA: a global adapter shared, a local adapter kept, mixed in each client's model -------------


class _RecordingFedDPA(recording(FedDPA)):
    """FedDPA that records what the model holds when the simulator's training (phase 2) begins."""

    def local_training(self, model, start, client_state, round_index):
        inner = super().local_training(model, start, client_state, round_index)
        outer = self

        class _Wrapped:
            def __enter__(self):
                inner.__enter__()
                outer.__dict__.setdefault("phase2_starts", []).append(
                    (round_index, client_state.client_id, adapter_io.get_lora_factors(model),
                     {n: lay.scaling[adapter_io.ADAPTER] for n, lay in adapter_io.lora_layers(model).items()}))

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

        return _Wrapped()


def test_feddpa_keeps_the_local_adapter_on_the_client_and_trains_it_from_round_two(shards_federation):
    strategy = _RecordingFedDPA()
    history = shards_federation.run(strategy, rounds=3, progress=False, evaluate_clients=True)
    server = shards_federation.last_server
    r = server.rank // 2
    layers = list(server.adapters)
    expected_keys = {f"{n}.{f}" for n in layers for f in "AB"} | {f"head.{k}" for k in server.head}
    for starts in strategy.starts.values():
        for start in starts.values():  # the download: the global adapter (rank r) and the head, nothing local
            assert set(start.download.tensors) == expected_keys
            assert all(start.download.tensors[f"{n}.A"].shape[0] == r for n in layers)
    locals_seen: dict[int, dict] = {}
    for t, result, payload, state in strategy.sent:
        assert set(payload.tensors) == expected_keys  # the local adapter is never sent
        if t == 0:
            assert state.local is None  # round 1 trains the global adapter only
        else:
            assert state.local is not None and all(a.shape[0] == r for a, _ in state.local.values())
            previous = locals_seen.get(result.client_id)
            if previous is not None:  # resumed, and trained further
                assert any(not torch.equal(state.local[n][1], previous[n][1]) for n in layers)
            locals_seen[result.client_id] = state.local
    assert locals_seen and history["client_accuracy"].notna().all()
    scaling = shards_federation.last_server.scaling
    assert len(strategy.phase2_starts) == len(strategy.sent)  # every client trained inside the method's context
    for t, k, factors, scalings in strategy.phase2_starts:
        start = strategy.starts[t][k]
        for n, (a, b) in factors.items():  # phase 2 starts from the server's global adapter, the local half zero
            assert torch.equal(a[:r], start.adapters[n][0]) and not a[r:].any() and not b[:, r:].any()
            assert scalings[n] == pytest.approx(2 * scaling)  # the global adapter alone, at alpha / r


def test_feddpa_server_keeps_the_uniform_mean_twice(shards_federation):
    strategy = recording(FedDPA)()
    shards_federation.run(strategy, rounds=2, progress=False)
    server = shards_federation.last_server
    uploads = strategy.uploads
    uniform = [1.0 / len(uploads)] * len(uploads)
    r = server.rank // 2
    for n, (a, b) in server.adapters.items():
        mean_a = average_tensors([u.payload.tensors[f"{n}.A"].to(a) for u in uploads], uniform)
        mean_b = average_tensors([u.payload.tensors[f"{n}.B"].to(b) for u in uploads], uniform)
        assert torch.allclose(a[:r], mean_a) and torch.equal(a[:r], a[r:])
        assert torch.allclose(b[:, :r], mean_b) and torch.equal(b[:, :r], b[:, r:])


def test_feddpa_phase_one_leaves_the_global_half_without_gradient():
    g = torch.Generator().manual_seed(2)
    r = 3
    for side, shape in (("A", (2 * r, 5)), ("B", (4, 2 * r))):
        x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        mixed = _Phase1Mix(r, side, global_weight=0.6, local_weight=1.4)(x)
        (mixed * torch.randn(shape, generator=g, dtype=torch.float64)).sum().backward()
        glob, loc = (x.grad[:r], x.grad[r:]) if side == "A" else (x.grad[:, :r], x.grad[:, r:])
        assert not glob.any() and loc.abs().sum() > 0
        if side == "B":
            assert torch.allclose(mixed[:, :r], 0.6 * x[:, :r]) and torch.allclose(mixed[:, r:], 1.4 * x[:, r:])


@pytest.mark.parametrize("local_weight", [0.1, 0.5, 0.83])
def test_feddpa_mixture_stacks_the_papers_weighted_sum_on_random_factors(local_weight):
    """At the rank-2r layer's scaling s/2, the stacked product is (1 - a) s B_g A_g + a s B_l A_l (survey eq. 13)."""
    g = torch.Generator().manual_seed(11)
    r, n, m, s = 3, 7, 5, 16 / 3
    names = ["q", "v"]
    global_adapter = {k: (torch.randn(r, n, generator=g, dtype=torch.float64),
                          torch.randn(m, r, generator=g, dtype=torch.float64)) for k in names}
    local = {k: (torch.randn(r, n, generator=g, dtype=torch.float64),
                 torch.randn(m, r, generator=g, dtype=torch.float64)) for k in names}
    mixed = FedDPA(local_weight=local_weight).mixture(global_adapter, local)
    for k in names:
        a, b = mixed[k]
        assert a.shape == (2 * r, n) and b.shape == (m, 2 * r)
        (a_g, b_g), (a_l, b_l) = global_adapter[k], local[k]
        expected = (1 - local_weight) * s * b_g @ a_g + local_weight * s * b_l @ a_l
        assert torch.allclose(s / 2 * b @ a, expected, atol=1e-12)


def test_feddpa_personal_model_is_the_papers_mixture_on_a_real_layer(shards_federation):
    """In the rank-2r layer at its own scaling, the personal model computes W'x + (1-a) s B_g A_g x + a s B_l A_l x."""
    strategy = FedDPA(local_weight=0.3)
    model = shards_federation.fresh_model(rank=2 * shards_federation.profile.rank)
    layers = adapter_io.lora_layers(model)
    name, layer = next(iter(layers.items()))
    r = shards_federation.profile.rank
    g = torch.Generator().manual_seed(3)

    def random_adapter():
        return {n: (torch.randn(r, lay.lora_A[adapter_io.ADAPTER].weight.shape[1], generator=g),
                    torch.randn(lay.lora_B[adapter_io.ADAPTER].weight.shape[0], r, generator=g))
                for n, lay in layers.items()}

    global_adapter, local = random_adapter(), random_adapter()
    server = type("Server", (), {"adapters": FedDPA._twice(global_adapter), "rank": 2 * r, "head": {}})()
    personal, _ = strategy.personal_model(server, 0, FedDPA.ClientState(client_id=0, local=local))
    adapter_io.set_lora_factors(model, personal)
    s = 2 * layer.scaling[adapter_io.ADAPTER]  # alpha / r
    x = torch.randn(2, global_adapter[name][0].shape[1], generator=g)
    (a_g, b_g), (a_l, b_l) = global_adapter[name], local[name]
    with torch.no_grad():
        expected = layer.base_layer(x) + 0.7 * s * x @ (b_g @ a_g).T + 0.3 * s * x @ (b_l @ a_l).T
        assert torch.allclose(layer(x), expected, atol=1e-3, rtol=1e-4)
    assert strategy.personal_model(server, 1, FedDPA.ClientState()) is None  # no local adapter yet: the global model


def test_feddpa_checks_its_settings():
    for bad in (0.0, 1.0, True):
        with pytest.raises(ValueError, match="local_weight"):
            FedDPA(local_weight=bad)
    with pytest.raises(ValueError, match="local_steps"):
        FedDPA(local_steps=0)
    assert FedDPA(rank=4).max_rank(10) == 8 and FedDPA().max_rank(10) is None


# ----- FDLoRA: FedDPA's two adapters, synchronised every few rounds, fused by a searched weight -------


def test_best_weight_is_the_argmin_of_the_loss_and_the_first_of_equals():
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        centre = float(torch.rand(1, generator=g))
        grid = [i / 10 for i in range(11)]
        weight, losses = best_weight(grid, lambda w, c=centre: (w - c) ** 2)
        assert losses == [(w - centre) ** 2 for w in grid]
        assert abs(weight - centre) <= 0.05 + 1e-12
    assert best_weight([0.0, 0.5, 1.0], lambda w: 1.0)[0] == 0.0  # equal losses: the first weight
    with pytest.raises(ValueError, match="empty"):
        best_weight([], lambda w: 0.0)


class _RecordingFDLoRA(recording(FDLoRA)):
    """FDLoRA that records where every personal adapter's training starts."""

    def local_start(self, client_state, global_adapter, round_index):
        local = super().local_start(client_state, global_adapter, round_index)
        self.__dict__.setdefault("local_starts", []).append(
            (round_index, client_state.client_id, copy.deepcopy(local), copy.deepcopy(global_adapter),
             client_state.local is None))
        return local


def test_fdlora_synchronises_the_personal_adapter_and_fuses_by_the_searched_weight(shards_federation):
    strategy = _RecordingFDLoRA(sync_every=2, fusion_grid=(0.0, 0.25, 0.5, 0.75, 1.0))
    history = shards_federation.run(strategy, rounds=3, progress=False, evaluate_clients=True)
    server = shards_federation.last_server
    layers = list(server.adapters)
    expected_keys = {f"{n}.{f}" for n in layers for f in "AB"} | {f"head.{k}" for k in server.head}
    for _, _, payload, _ in strategy.sent:
        assert set(payload.tensors) == expected_keys  # the personal adapter is never sent
    starts = strategy.local_starts
    assert {t for t, *_ in starts} == {1, 2}  # round 1 (t = 0) trains the global adapter only
    for t, _, local, global_adapter, first in starts:
        same = all(torch.equal(local[n][i], global_adapter[n][i]) for n in layers for i in (0, 1))
        if t == 2 and not first:  # a synchronisation round: the personal adapter restarts from the global one
            assert same
        else:
            assert not same
    assert any(t == 2 and not first for t, *_, first in starts)
    for t, _, _, state in strategy.sent:
        if t >= 1:
            assert state.fusion_weight in strategy.fusion_grid and len(state.fusion_losses) == 5
            assert state.fusion_weight == strategy.fusion_grid[state.fusion_losses.index(min(state.fusion_losses))]
    # the server: the clients' weighted mean of the global adapters, kept twice
    before, uploads = strategy.rounds[-1]
    weights = normalized_weights(uploads)
    r = server.rank // 2
    for n in layers:
        a = average_tensors([u.payload.tensors[f"{n}.A"] for u in uploads], weights)
        assert torch.allclose(server.adapters[n][0], torch.cat([a, a]), atol=1e-6)
    assert server.adapters[layers[0]][0].shape[0] == 2 * r
    assert history["client_accuracy"].notna().all()


def test_fdlora_personal_model_uses_each_clients_fusion_weight():
    g = torch.Generator().manual_seed(9)
    r, n, m = 2, 5, 4
    global_adapter = {"q": (torch.randn(r, n, generator=g, dtype=torch.float64),
                            torch.randn(m, r, generator=g, dtype=torch.float64))}
    local = {"q": (torch.randn(r, n, generator=g, dtype=torch.float64),
                   torch.randn(m, r, generator=g, dtype=torch.float64))}
    server = type("Server", (), {"adapters": FDLoRA._twice(global_adapter), "rank": 2 * r, "head": {}})()
    strategy = FDLoRA()
    for weight in (0.0, 0.3, 1.0):
        state = FDLoRA.ClientState(client_id=0, local=local, fusion_weight=weight)
        (a, b), = strategy.personal_model(server, 0, state)[0].values()
        (a_g, b_g), (a_l, b_l) = global_adapter["q"], local["q"]
        assert torch.allclose(b @ a / 2, (1 - weight) * b_g @ a_g + weight * b_l @ a_l, atol=1e-12)
    assert strategy.personal_model(server, 0, FDLoRA.ClientState(client_id=0)) is None


def test_fdlora_checks_its_settings():
    for label, bad in (("sync_every", 0), ("fusion_batches", True)):
        with pytest.raises(ValueError, match=label):
            FDLoRA(**{label: bad})
    with pytest.raises(ValueError, match="fusion_grid"):
        FDLoRA(fusion_grid=(0.5, 1.5))
    assert not FDLoRA(sync_every=3).synchronises(0) and FDLoRA(sync_every=3).synchronises(3)
