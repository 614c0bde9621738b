"""Hypernetwork (survey 4.2, eq. 15): descriptors to adapters, pFedHN's server step, an unseen client."""

from __future__ import annotations

import pytest
import torch

from fedlora_edu.heterogeneity.hypernetwork import LoRAHypernetwork, hypernetwork_update

SHAPES = {"encoder.layer.4.attention.self.query": (6, 5), "encoder.layer.5.attention.self.value": (6, 5)}


def test_a_fresh_hypernetwork_gives_every_client_b_zero_and_the_right_shapes():
    hypernetwork = LoRAHypernetwork(3, SHAPES, rank=2, seed=0)
    for seed in range(3):
        adapter = hypernetwork(torch.randn(3, generator=torch.Generator().manual_seed(seed)))
        assert set(adapter) == set(SHAPES)
        for name, (a, b) in adapter.items():
            m, n = SHAPES[name]
            assert a.shape == (2, n) and b.shape == (m, 2)
            assert not b.any() and a.abs().max() > 0
    with pytest.raises(ValueError, match="descriptor must be a vector"):
        hypernetwork(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRAHypernetwork(3, SHAPES, rank=0)


def test_the_server_step_is_the_chain_rule_on_the_clients_update():
    """With SGD at rate eta: psi' = psi - eta (d theta / d psi)^T (theta_start - theta_k)."""
    torch.manual_seed(0)
    hypernetwork = LoRAHypernetwork(3, SHAPES, rank=2, seed=1).double()
    descriptor = torch.randn(3, dtype=torch.float64)
    start = hypernetwork(descriptor)
    trained = {name: (a.detach() + 0.1 * torch.randn_like(a), b.detach() + 0.1 * torch.randn_like(b))
               for name, (a, b) in start.items()}
    params = list(hypernetwork.parameters())
    outputs = [t for name in SHAPES for t in start[name]]
    deltas = [(t - trained[name][i]).detach() for name in SHAPES for i, t in enumerate(start[name])]
    expected_grads = torch.autograd.grad(outputs, params, grad_outputs=deltas, allow_unused=True)
    before = [p.detach().clone() for p in params]
    eta = 0.05
    moved = hypernetwork_update(hypernetwork, torch.optim.SGD(params, lr=eta), descriptor, trained)
    assert moved == pytest.approx(float(torch.cat([d.reshape(-1) for d in deltas]).norm()))
    for p, old, grad in zip(params, before, expected_grads, strict=True):
        expected = old if grad is None else old - eta * grad
        assert torch.allclose(p.detach(), expected, atol=1e-12)


def test_an_unseen_client_gets_the_adapter_its_descriptor_calls_for():
    """Clients whose training pulls toward an adapter that depends linearly on their descriptor; after the
    server's steps, a client that never trained gets, from its descriptor alone, close to its own target."""
    g = torch.Generator().manual_seed(3)
    basis = [{name: (torch.randn(2, n, generator=g), torch.randn(m, 2, generator=g)) for name, (m, n) in SHAPES.items()}
             for _ in range(3)]

    def target(descriptor):
        return {name: tuple(sum(float(descriptor[i]) * basis[i][name][j] for i in range(3)) for j in (0, 1))
                for name in SHAPES}

    hypernetwork = LoRAHypernetwork(3, SHAPES, rank=2, hidden=32, seed=0)
    optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=1e-2)
    clients = [torch.rand(3, generator=g) for _ in range(12)]
    for step in range(600):
        descriptor = clients[step % len(clients)]
        start = hypernetwork(descriptor)
        goal = target(descriptor)
        # local training: halfway from the start to the client's own adapter
        trained = {name: tuple(t.detach() + 0.5 * (goal[name][j] - t.detach()) for j, t in enumerate(factors))
                   for name, factors in start.items()}
        hypernetwork_update(hypernetwork, optimizer, descriptor, trained)
    unseen = torch.tensor([0.4, 0.5, 0.3])
    with torch.no_grad():
        generated = hypernetwork(unseen)
    goal = target(unseen)
    error = sum(float((generated[n][j] - goal[n][j]).square().sum()) for n in SHAPES for j in (0, 1)) ** 0.5
    size = sum(float(goal[n][j].square().sum()) for n in SHAPES for j in (0, 1)) ** 0.5
    assert error < 0.15 * size, error / size


def test_hyperflora_generates_every_clients_adapter_from_its_descriptor_and_steps_psi_per_upload(federation):
    import copy

    from helpers import recording

    from fedlora_edu.core.strategy import split_factors
    from fedlora_edu.heterogeneity.hypernetwork import HyperFloRA, mean_feature_descriptor

    class Snapshots(HyperFloRA):
        """Keeps psi before and after each round's aggregation."""

        def aggregate(self, server, uploads, round_index):
            before = copy.deepcopy(server.method_state.hypernetwork)
            super().aggregate(server, uploads, round_index)
            self.__dict__.setdefault("psi", []).append((before, copy.deepcopy(server.method_state.hypernetwork)))

    strategy = recording(Snapshots)(held_out=[0])
    history = federation.run(strategy, rounds=2, progress=False, seed=1, evaluate_clients=True)
    server = federation.last_server
    state = server.method_state
    names = list(server.adapters)
    assert sorted(state.descriptors) == list(range(federation.num_clients))
    last = federation.num_clients - 1
    descriptor = mean_feature_descriptor(federation.fresh_model(seed=1), federation.clients[last])
    assert torch.allclose(descriptor, state.descriptors[last], atol=1e-5)  # the mean of the frozen features
    assert all(0 not in starts for starts in strategy.starts.values())  # the held-out client never trains
    for t, starts in strategy.starts.items():
        psi = strategy.psi[t][0]  # psi as the round began
        for k, start in starts.items():
            expected = psi(state.descriptors[k].double())
            for n in names:  # client k starts from h(psi; r_k)
                assert torch.allclose(start.adapters[n][0], expected[n][0].float(), atol=1e-6)
                assert torch.allclose(start.adapters[n][1], expected[n][1].float(), atol=1e-6)
    assert all(not b.any() for start in strategy.starts[0].values() for _, b in start.adapters.values())
    # round 1's server steps, replayed from psi_0 with a fresh Adam: one hypernetwork_update per upload
    replay = copy.deepcopy(strategy.psi[0][0])
    optimizer = torch.optim.Adam(replay.parameters(), lr=strategy.server_learning_rate)
    for upload in strategy.rounds[0][1]:
        a, b = split_factors(upload.payload, names)
        hypernetwork_update(replay, optimizer, state.descriptors[upload.client_id].double(),
                            {n: (a[n], b[n]) for n in names})
    for got, want in zip(strategy.psi[0][1].parameters(), replay.parameters(), strict=True):
        assert torch.allclose(got, want)
    assert len(state.moved) == 2 and all(m > 0 for m in state.moved)
    # every client, trained or held out, has a personal model, h(psi; r_k); they differ between clients
    personal = {k: strategy.personal_model(server, k, None)[0] for k in range(federation.num_clients)}
    assert not torch.allclose(personal[0][names[0]][1], personal[1][names[0]][1])
    assert history["client_accuracy"].notna().all()
    # bytes: A, B and the head up, and each client's descriptor once, in its first upload
    adapter_bytes = 4 * (sum(a.numel() + b.numel() for a, b in server.adapters.values())
                         + sum(t.numel() for t in server.head.values()))
    first = {}
    for round_index, result, payload, _ in strategy.sent:
        first.setdefault(result.client_id, round_index)
        extra = payload.nbytes - adapter_bytes
        assert extra == (strategy.descriptor_bytes if first[result.client_id] == round_index else 0)
    assert strategy.descriptor_bytes == 4 * state.descriptors[1].numel()


def test_hyperflora_serves_a_descriptor_it_never_saw_and_names_bad_arguments(federation):
    from fedlora_edu.heterogeneity.hypernetwork import HyperFloRA

    strategy = HyperFloRA()
    federation.run(strategy, rounds=1, progress=False)
    server = federation.last_server
    unseen = torch.randn_like(server.method_state.descriptors[0])
    adapter = strategy.generate(server, unseen)
    assert {name: (a.shape, b.shape) for name, (a, b) in adapter.items()} == {
        name: (a.shape, b.shape) for name, (a, b) in server.adapters.items()}
    for bad, match in (({"hidden": 0}, "hidden"), ({"server_learning_rate": 0}, "server_learning_rate")):
        with pytest.raises(ValueError, match=match):
            HyperFloRA(**bad)
    with pytest.raises(ValueError, match="held_out"):
        federation.run(HyperFloRA(held_out=range(federation.num_clients)), rounds=1, progress=False)
    with pytest.raises(ValueError, match="before prepare"):
        HyperFloRA().generate(server.__class__(adapters={}, head={}, scaling=1.0, rank=1, seed=0,
                                               method_state=HyperFloRA.State()), unseen)
