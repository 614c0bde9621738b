"""HetLoRA through the simulator: truncated downloads, the tail penalty in the loss, self-pruning, padded averages."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, recording

from fedlora_edu.core.strategy import split_factors
from fedlora_edu.heterogeneity.ranks import (
    HetLoRA,
    ReplicationPadding,
    rank_tail_penalty,
    replication_padding_average,
    sparsity_weights,
    zero_padding_average,
)

RANKS = [1, 2, 4]


def tails(strategy, gamma):
    """Per upload (round, client): the trained factors' total tail penalty."""
    with torch.no_grad():
        return {(t, result.client_id): float(sum(rank_tail_penalty(a, b, gamma) for a, b in result.adapters.values()))
                for t, result, _, _ in strategy.sent}


def test_clients_train_at_their_rank_and_the_server_averages_zero_padded_with_sparsity_weights(federation):
    strategy = recording(HetLoRA)(RANKS, penalty=0.0)
    history = federation.run(strategy, rounds=2, progress=False)
    assert (history["engine"] == "sequential").all()  # the penalty hook needs the sequential loop
    for t, starts in strategy.starts.items():
        for k, start in starts.items():
            assert all(a.shape[0] == RANKS[k] and b.shape[1] == RANKS[k] for a, b in start.adapters.values()), (t, k)
    server = federation.last_server
    uploads = strategy.uploads
    layers = list(server.adapters)
    for name in layers:
        As = [split_factors(u.payload, [name])[0][name] for u in uploads]
        Bs = [split_factors(u.payload, [name])[1][name] for u in uploads]
        expected = zero_padding_average(As, Bs, sparsity_weights(As, Bs), max_rank=max(RANKS))
        a, b = server.adapters[name]
        assert torch.allclose(a, expected[0]) and torch.allclose(b, expected[1])
    assert server.method_state.ranks == dict(enumerate(RANKS)) and server.method_state.pruned == []


def test_the_tail_penalty_reaches_the_loss_and_shrinks_the_tail(federation):
    gamma = 0.5
    runs = {}
    for penalty in (0.0, 5.0):
        strategy = recording(HetLoRA)([4, 4, 4], penalty=penalty, gamma=gamma, min_rank=4)  # min_rank: no pruning
        runs[penalty] = (strategy, federation.run(strategy, rounds=3, seed=0, progress=False))
    free, penalised = tails(runs[0.0][0], gamma), tails(runs[5.0][0], gamma)
    later = [key for key in free if key[0] >= 1]  # from round 2 on B != 0, so the tail has a gradient
    assert later and all(penalised[key] < free[key] for key in later)
    assert runs[5.0][1]["train_loss"].iloc[-1] != pytest.approx(runs[0.0][1]["train_loss"].iloc[-1])


def test_a_client_whose_tail_shrank_prunes_and_downloads_its_new_rank(federation):
    strategy = recording(HetLoRA)([4, 4, 4], penalty=5.0, gamma=0.5, min_rank=2)
    federation.run(strategy, rounds=3, progress=False)
    state = federation.last_server.method_state
    assert state.pruned, "a penalty this strong must make some client prune"
    for round_index, client, old, new in state.pruned:
        assert new == max(2, int(0.5 * old)) < old
        later = [starts[client] for t, starts in strategy.starts.items() if t > round_index and client in starts]
        for start in later[:1]:  # the next download is truncated to the new rank
            assert all(a.shape[0] <= new for a, _ in start.adapters.values())
    assert all(rank >= 2 for rank in state.ranks.values())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="weighting must be"):
        HetLoRA(weighting="norms")
    with pytest.raises(ValueError, match="gamma must be in"):
        HetLoRA(gamma=1.0)
    with pytest.raises(ValueError, match="penalty must be a number"):
        HetLoRA(penalty=-1.0)
    with pytest.raises(ValueError, match="ranks has 2 entries for 3 clients"):
        HetLoRA([2, 4]).max_rank(TINY.num_clients)


def test_replication_padding_averages_each_slot_over_its_holders(federation):
    strategy = recording(ReplicationPadding)(RANKS, penalty=0.0)
    federation.run(strategy, rounds=2, progress=False)
    server = federation.last_server
    for name in server.adapters:
        As = [split_factors(u.payload, [name])[0][name] for u in strategy.uploads]
        Bs = [split_factors(u.payload, [name])[1][name] for u in strategy.uploads]
        expected = replication_padding_average(As, Bs, sparsity_weights(As, Bs), max_rank=max(RANKS))
        zero = zero_padding_average(As, Bs, sparsity_weights(As, Bs), max_rank=max(RANKS))
        a, b = server.adapters[name]
        assert torch.allclose(a, expected[0]) and torch.allclose(b, expected[1])
        assert not torch.allclose(b, zero[1])  # the slots only the rank-4 client holds keep their size
