"""Personalized structure (survey 4.2, eq. 14): PerFIT searches a sparse structure per client within its budget."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.strategy import normalized_weights
from fedlora_edu.heterogeneity.structure import (
    PerFIT,
    apply_masks,
    kept_entries,
    mask_bytes,
    masked_mean,
    prune_to_budget,
    taylor_importance,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_to_budget_keeps_the_most_important_entries_and_never_regrows(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.A": (3, 7), "l0.B": (5, 3), "l1.A": (3, 4)}
    importance = {k: torch.rand(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    mask = {k: (torch.rand(s, generator=g) < 0.7).float() for k, s in shapes.items()}
    kept_now = int(sum(m.sum() for m in mask.values()))
    for keep in (0, 1, kept_now // 2, kept_now):
        out = prune_to_budget(importance, mask, keep)
        assert int(sum(m.sum() for m in out.values())) == keep
        for k in shapes:
            assert not (out[k].bool() & ~mask[k].bool()).any()  # a dropped entry never comes back
        kept = torch.cat([importance[k][out[k].bool()] for k in shapes])
        dropped = torch.cat([importance[k][mask[k].bool() & ~out[k].bool()] for k in shapes])
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()  # the layers compete: the most important entries win anywhere
    with pytest.raises(ValueError, match="keep"):
        prune_to_budget(importance, mask, kept_now + 1)
    with pytest.raises(ValueError, match="keys"):
        prune_to_budget({"l0.A": importance["l0.A"]}, mask, 1)


def test_taylor_importance_is_the_loss_change_of_zeroing_an_entry_to_first_order():
    """For a linear loss the first-order estimate is exact: zeroing entry e changes L by theta_e dL/dtheta_e."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)

    def loss(t):
        return (w * t).sum() + 3.0

    loss(theta).backward()
    importance = taylor_importance(theta.detach(), theta.grad)
    for i in range(4):
        for j in range(6):
            zeroed = theta.detach().clone()
            zeroed[i, j] = 0
            assert math.isclose(float(importance[i, j]), abs(float(loss(theta.detach()) - loss(zeroed))),
                                rel_tol=1e-12, abs_tol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        taylor_importance(theta.detach(), theta.grad[:2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_mean_averages_each_entry_over_the_clients_that_keep_it(seed):
    g = torch.Generator().manual_seed(seed)
    K, shape = 4, (5, 3)
    values = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(K)]
    masks = [(torch.rand(shape, generator=g) < 0.5).double() for _ in range(K)]
    raw = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    weights = (raw / raw.sum()).tolist()
    previous = torch.randn(shape, generator=g, dtype=torch.float64)
    out = masked_mean(values, masks, weights, previous)
    for i in range(shape[0]):
        for j in range(shape[1]):
            keepers = [k for k in range(K) if masks[k][i, j]]
            if keepers:
                expected = sum(weights[k] * values[k][i, j] for k in keepers) / sum(weights[k] for k in keepers)
            else:
                expected = previous[i, j]  # nobody kept it: the server keeps its value
            assert torch.isclose(out[i, j], torch.as_tensor(expected), rtol=1e-12, atol=1e-12)
    full = masked_mean(values, [torch.ones(shape, dtype=torch.float64)] * K, weights, previous)
    assert torch.allclose(full, sum(w * v for w, v in zip(weights, values, strict=True)), atol=1e-12)  # FedAvg


def test_perfit_searches_once_within_budget_sends_only_its_structure_and_averages_over_keepers(shards_federation):
    strategy = recording(PerFIT)(prune_stages=2)
    history = shards_federation.run(strategy, rounds=3, progress=False, evaluate_clients=True)
    server = shards_federation.last_server
    R = server.rank
    r = R // 2
    budget = sum(r * (a.shape[1] + b.shape[0]) for a, b in server.adapters.values())
    dense = sum(a.numel() + b.numel() for a, b in server.adapters.values())
    head_bytes = tensor_bytes(server.head)
    structures = {}
    for t, result, payload, state in strategy.sent:
        k = result.client_id
        assert kept_entries(state.masks) == budget  # eq. 14's constraint, met with equality
        assert state.kept_by_stage == [dense, dense - (dense - budget) // 2, budget]
        structures.setdefault(k, state.masks)
        assert state.masks is structures[k]  # searched once, kept after
        for n, (a, b) in result.adapters.items():
            ma, mb = state.masks[n]
            assert torch.equal(payload.tensors[f"{n}.A"], a * ma) and torch.equal(payload.tensors[f"{n}.B"], b * mb)
            assert not a[~ma.bool()].any() and not b[~mb.bool()].any()  # trained inside the structure only
        structure = mask_bytes(state.masks) if t == 0 else 0  # the bitmap goes once, with the first upload
        assert payload.nbytes == 4 * budget + head_bytes + structure, (t, k)
        assert (f"{next(iter(server.adapters))}.A.mask" in payload.tensors) == (t == 0)
    assert len({id(m) for m in structures.values()}) == 3
    first = next(iter(server.adapters))
    assert not torch.equal(structures[0][first][0], structures[1][first][0])  # personal structures
    for t, starts in strategy.starts.items():
        before = strategy.rounds[t][0]
        for k, start in starts.items():
            if t == 0:  # the dense expanded adapter
                assert start.download.nbytes == 4 * dense + head_bytes
                assert all(torch.equal(start.adapters[n][0], a) for n, (a, _) in before.items())
            else:  # the global adapter through the client's structure, only its entries sent
                assert start.download.nbytes == 4 * budget + head_bytes
                expected = apply_masks(before, structures[k])
                assert all(torch.equal(start.adapters[n][i], expected[n][i]) for n in before for i in (0, 1))
    for t, (before, uploads) in enumerate(strategy.rounds):
        after = strategy.rounds[t + 1][0] if t + 1 < len(strategy.rounds) else server.adapters
        weights = normalized_weights(uploads)
        for n, (a_old, b_old) in before.items():
            for i, (side, old) in enumerate((("A", a_old), ("B", b_old))):
                expected = masked_mean([u.payload.tensors[f"{n}.{side}"] for u in uploads],
                                       [structures[u.client_id][n][i] for u in uploads], weights, old)
                assert torch.allclose(after[n][i], expected, atol=1e-6), (t, n, side)
    assert (history["bytes_up"] > 0).all() and history["client_accuracy"].notna().all()


def test_perfit_budgets_differ_per_client_as_eq_14_allows(shards_federation):
    strategy = recording(PerFIT)(rank=2, prune_stages=1, budgets={0: 1, 2: 3})  # expanded rank R = 4
    shards_federation.run(strategy, rounds=1, progress=False)
    server = shards_federation.last_server
    assert server.rank == 4 and all(r.rank == 4 for _, r, _, _ in strategy.sent)  # every client in the expanded adapter
    sizes = {k: sum(k_r * (a.shape[1] + b.shape[0]) for a, b in server.adapters.values())
             for k, k_r in {0: 1, 1: server.rank // 2, 2: 3}.items()}
    for _, result, _, state in strategy.sent:
        assert kept_entries(state.masks) == sizes[result.client_id] == strategy.budget(server, result.client_id)


def test_perfit_personal_model_is_the_global_adapter_through_the_structure_on_a_real_layer(shards_federation):
    """W'x + s (M_B * B)(M_A * A) x, and inside training no gradient reaches a pruned entry."""
    strategy = PerFIT()
    model = shards_federation.fresh_model(rank=2 * shards_federation.profile.rank)
    layers = adapter_io.lora_layers(model)
    name, layer = next(iter(layers.items()))
    g = torch.Generator().manual_seed(5)
    adapters = {n: (torch.randn(lay.lora_A[adapter_io.ADAPTER].weight.shape, generator=g),
                    torch.randn(lay.lora_B[adapter_io.ADAPTER].weight.shape, generator=g)) for n, lay in layers.items()}
    masks = {n: ((torch.rand(a.shape, generator=g) < 0.5).float(), (torch.rand(b.shape, generator=g) < 0.5).float())
             for n, (a, b) in adapters.items()}
    server = type("Server", (), {"adapters": adapters, "head": {}})()
    personal, _ = strategy.personal_model(server, 0, PerFIT.ClientState(client_id=0, masks=masks))
    adapter_io.set_lora_factors(model, personal)
    s = layer.scaling[adapter_io.ADAPTER]
    x = torch.randn(2, adapters[name][0].shape[1], generator=g)
    (a, b), (ma, mb) = adapters[name], masks[name]
    with torch.no_grad():
        expected = layer.base_layer(x) + s * x @ ((mb * b) @ (ma * a)).T
        assert torch.allclose(layer(x), expected, atol=1e-3, rtol=1e-4)
    assert strategy.personal_model(server, 1, PerFIT.ClientState()) is None  # before its search: the global model
    # Inside local_training, the stored factors go through the mask: pruned entries get no gradient.
    strategy._clients = shards_federation.clients
    adapter_io.set_lora_factors(model, adapters)
    with strategy.local_training(model, None, PerFIT.ClientState(client_id=0, masks=masks), 1):
        original = layer.lora_A[adapter_io.ADAPTER].parametrizations.weight.original
        layer(x).square().sum().backward()
        assert original.grad is not None and not original.grad[~ma.bool()].any() and original.grad[ma.bool()].any()
    assert not any(hasattr(lay.lora_A[adapter_io.ADAPTER], "parametrizations") for lay in layers.values())


def test_perfit_checks_its_settings():
    for label, bad in (("expansion", 0), ("prune_stages", 0), ("importance_batches", True), ("search_steps", 0)):
        with pytest.raises(ValueError, match=label):
            PerFIT(**{label: bad})
    with pytest.raises(ValueError, match=r"budgets\[0\]"):
        PerFIT(budgets={0: 0})
    with pytest.raises(ValueError, match="exceeds the expanded rank"):
        PerFIT(rank=2, budgets={1: 5})
    assert PerFIT(rank=4).max_rank(10) == 8 and PerFIT(rank=4, expansion=3).max_rank(10) == 12
    assert PerFIT().max_rank(10) is None
