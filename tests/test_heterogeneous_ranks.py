"""Heterogeneous ranks (survey 4.1, eq. 12): truncation, padding, HetLoRA's weights, penalty and pruning."""

from __future__ import annotations

import pytest
import torch
from helpers import random_factors, random_weights

from fedlora_edu.core.factors import fedit_average, ideal_update
from fedlora_edu.core.svd import truncated_factors
from fedlora_edu.heterogeneity.ranks import (
    pruned_rank,
    rank_tail_penalty,
    replication_padding_average,
    slot_holders,
    sparsity_weights,
    tail_start,
    truncate_factors,
    update_norm,
    zero_pad_factors,
    zero_padding_average,
)

RANK_MIXES = [[2, 4, 8], [8, 8, 8], [1, 8], [3, 1, 2, 5]]


@pytest.mark.parametrize("ranks", RANK_MIXES)
@pytest.mark.parametrize("seed", [0, 1])
def test_padding_then_truncation_is_the_identity_and_keeps_the_product(ranks, seed):
    g = torch.Generator().manual_seed(seed)
    for rank in ranks:
        A, B = random_factors(g, 7, 5, rank)
        A_pad, B_pad = zero_pad_factors(A, B, max(ranks))
        assert A_pad.shape == (max(ranks), 5) and B_pad.shape == (7, max(ranks))
        assert torch.equal(B_pad @ A_pad, B @ A)
        A_back, B_back = truncate_factors(A_pad, B_pad, rank)
        assert torch.equal(A_back, A) and torch.equal(B_back, B)


def test_truncation_and_padding_refuse_the_wrong_direction():
    A, B = torch.zeros(4, 5), torch.zeros(6, 4)
    with pytest.raises(ValueError, match="exceeds the adapter's rank 4"):
        truncate_factors(A, B, 5)
    with pytest.raises(ValueError, match="below the factors' rank 4"):
        zero_pad_factors(A, B, 3)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        truncate_factors(A, B, 0)


@pytest.mark.parametrize("seed", range(4))
def test_update_norm_and_sparsity_weights_match_the_dense_products(seed):
    g = torch.Generator().manual_seed(seed)
    clients = [random_factors(g, 9, 6, r) for r in (1, 3, 6)]
    norms = [float(torch.linalg.matrix_norm(B @ A)) for A, B in clients]
    assert [update_norm(A, B) for A, B in clients] == pytest.approx(norms, rel=1e-9)
    weights = sparsity_weights([A for A, _ in clients], [B for _, B in clients])
    assert weights == pytest.approx([value / sum(norms) for value in norms], rel=1e-9)
    zero = [torch.zeros(2, 6), torch.zeros(3, 6)], [torch.zeros(9, 2), torch.zeros(9, 3)]
    assert sparsity_weights(*zero) == [0.5, 0.5]


@pytest.mark.parametrize("seed", range(3))
def test_with_equal_ranks_both_paddings_are_fedit(seed):
    g = torch.Generator().manual_seed(seed)
    clients = [random_factors(g, 7, 5, 4) for _ in range(3)]
    As, Bs = [A for A, _ in clients], [B for _, B in clients]
    weights = random_weights(g, 3)
    expected = fedit_average(As, Bs, weights)
    for average in (zero_padding_average, replication_padding_average):
        A, B = average(As, Bs, weights)
        assert torch.allclose(A, expected[0]) and torch.allclose(B, expected[1])


@pytest.mark.parametrize("ranks", RANK_MIXES)
@pytest.mark.parametrize("seed", range(3))
def test_truncations_of_one_adapter_come_back_whole_by_replication_and_shrunk_by_zeros(ranks, seed):
    """Clients that return their download untouched: replication rebuilds the server adapter exactly;
    zero-padding shrinks rank slot i by the total weight of the clients that hold it."""
    g = torch.Generator().manual_seed(seed)
    server_A, server_B = random_factors(g, 7, 5, max(ranks))
    clients = [truncate_factors(server_A, server_B, rank) for rank in ranks]
    As, Bs = [A for A, _ in clients], [B for _, B in clients]
    weights = random_weights(g, len(ranks))
    A_rep, B_rep = replication_padding_average(As, Bs, weights)
    assert torch.allclose(A_rep, server_A) and torch.allclose(B_rep, server_B)
    A_zero, B_zero = zero_padding_average(As, Bs, weights)
    mass = torch.tensor(weights, dtype=torch.float64) @ slot_holders(ranks, max(ranks))
    assert torch.allclose(A_zero, mass[:, None] * server_A) and torch.allclose(B_zero, server_B * mass[None, :])
    if len(set(ranks)) > 1:
        assert float(mass.min()) < 1.0  # the check is not vacuous: some slot is shrunk


def test_replication_averages_a_slot_over_its_holders_only():
    g = torch.Generator().manual_seed(5)
    ranks, weights = [1, 3, 3], [0.5, 0.2, 0.3]
    clients = [random_factors(g, 4, 6, r) for r in ranks]
    A, B = replication_padding_average([a for a, _ in clients], [b for _, b in clients], weights)
    expected_row_2 = (0.2 * clients[1][0][2] + 0.3 * clients[2][0][2]) / 0.5
    assert torch.allclose(A[2], expected_row_2)
    expected_row_0 = sum(w * c[0][0] for w, c in zip(weights, clients, strict=True))
    assert torch.allclose(A[0], expected_row_0)
    with pytest.raises(ValueError, match=r"rank slots \[1, 2\] are held by no client"):
        replication_padding_average([a for a, _ in clients], [b for _, b in clients], [1.0, 0.0, 0.0])
    previous = random_factors(g, 4, 6, 3)
    A_kept, B_kept = replication_padding_average([a for a, _ in clients], [b for _, b in clients], [1.0, 0.0, 0.0],
                                                 previous=previous)
    assert torch.equal(A_kept[1:], previous[0][1:]) and torch.equal(B_kept[:, 1:], previous[1][:, 1:])
    assert torch.allclose(A_kept[0], clients[0][0][0])  # the held slot: its one holder with weight


def test_on_a_real_layer_replication_rebuilds_the_layer_update_and_zero_padding_does_not():
    """MiniLM's first query weight as the server's update (its best rank-8 factors), downloaded by clients
    of ranks 2, 4 and 8 and sent back unchanged: the rebuilt update is the server's with replication,
    and with zero-padding it loses part of the rank-8 client's components."""
    from fedlora_edu.assets.models import load_classifier

    model, _ = load_classifier(num_labels=2, seed=0)
    query = next(module for name, module in model.named_modules() if name.endswith("layer.0.attention.self.query"))
    weight = query.weight
    server_A, server_B = truncated_factors(weight.detach().double(), 8)
    ranks, weights = [2, 4, 8], [0.5, 0.3, 0.2]
    clients = [truncate_factors(server_A, server_B, rank) for rank in ranks]
    As, Bs = [A for A, _ in clients], [B for _, B in clients]
    target = server_B @ server_A
    A_rep, B_rep = replication_padding_average(As, Bs, weights)
    assert torch.allclose(B_rep @ A_rep, target, atol=1e-10)
    A_zero, B_zero = zero_padding_average(As, Bs, weights)
    lost = float(torch.linalg.matrix_norm(B_zero @ A_zero - target) / torch.linalg.matrix_norm(target))
    assert lost > 0.1
    # and the ideal update of the clients' products is neither: it mixes ranks (eq. 4's average of B_k A_k)
    assert not torch.allclose(ideal_update(As, Bs, weights), target, atol=1e-3)


def test_the_tail_penalty_has_a_gradient_on_the_tail_only():
    g = torch.Generator().manual_seed(2)
    A, B = random_factors(g, 6, 5, 8)
    A.requires_grad_(True)
    B.requires_grad_(True)
    penalty = rank_tail_penalty(A, B, gamma=0.5)
    start = tail_start(8, 0.5)
    expected = torch.linalg.matrix_norm(B[:, start:]) * torch.linalg.matrix_norm(A[start:])
    assert start == 4 and torch.allclose(penalty, expected)
    penalty.backward()
    assert A.grad[start:].abs().sum() > 0 and B.grad[:, start:].abs().sum() > 0
    assert torch.equal(A.grad[:start], torch.zeros_like(A.grad[:start]))
    assert torch.equal(B.grad[:, :start], torch.zeros_like(B.grad[:, :start]))
    assert tail_start(8, 0.99) == 7 and tail_start(1, 0.99) == 0  # the tail is never empty


def test_training_on_the_penalty_shrinks_the_tail_and_pruning_follows():
    """A few gradient steps on the penalty alone: the tail shrinks, so the client prunes its rank."""
    g = torch.Generator().manual_seed(3)
    A, B = (t.requires_grad_(True) for t in random_factors(g, 6, 5, 8))
    gamma = 0.75
    before = float(rank_tail_penalty(A, B, gamma).detach())
    optimizer = torch.optim.SGD([A, B], lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        rank_tail_penalty(A, B, gamma).backward()
        optimizer.step()
    after = float(rank_tail_penalty(A, B, gamma).detach())
    assert after < before
    assert pruned_rank(8, before, after, gamma) == 6
    assert pruned_rank(8, after, before, gamma) == 8  # a tail that grew keeps the rank
    assert pruned_rank(2, before, after, 0.4, min_rank=2) == 2  # never below min_rank
    with pytest.raises(ValueError, match="gamma must be in"):
        pruned_rank(8, 1.0, 0.5, 1.5)
