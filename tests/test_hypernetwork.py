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
