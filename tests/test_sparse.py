"""Sparse learning (survey 5.1): FLASC's global top-k both ways; with everything sent and SGD at rate 1, FedIT."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import recording

from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.efficiency.sparse import FLASC, INDEX_BYTES, VALUE_BYTES, sparse_bytes, top_k_mask


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
def test_top_k_keeps_the_largest_entries_over_all_tensors_together(density):
    generator = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(4, 9, generator=generator), "b": 3 * torch.randn(7, 2, generator=generator),
               "c": torch.zeros(5)}
    masks = top_k_mask(tensors, density)
    total = sum(t.numel() for t in tensors.values())
    kept = [t[masks[n]].abs() for n, t in tensors.items()]
    dropped = [t[~masks[n]].abs() for n, t in tensors.items()]
    assert sum(int(m.sum()) for m in masks.values()) == math.ceil(density * total)
    if density < 1:
        assert torch.cat(kept).min() >= torch.cat(dropped).max()  # one threshold for every tensor
    assert sparse_bytes(tensors, masks) == min(math.ceil(density * total) * (VALUE_BYTES + INDEX_BYTES),
                                               total * VALUE_BYTES)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="density"):
            top_k_mask(tensors, bad)


def test_flasc_sending_everything_with_sgd_at_rate_one_is_fedit(federation):
    """One round (from the same start): server - (server - sum_k p_k trained_k) is FedIT's average, up to rounding.
    (Over more rounds AdamW on the clients can amplify that rounding where a gradient is near zero.)"""
    flasc = federation.run(FLASC(1.0, 1.0, server_optimizer="sgd", server_learning_rate=1.0), rounds=1,
                           progress=False, seed=4)
    flasc_server = federation.last_server
    fedit = federation.run(FedIT(), rounds=1, progress=False, seed=4)
    fedit_server = federation.last_server
    for name, (a, b) in fedit_server.adapters.items():
        assert torch.allclose(flasc_server.adapters[name][0], a, atol=1e-6)
        assert torch.allclose(flasc_server.adapters[name][1], b, atol=1e-6)
    assert torch.allclose(torch.tensor(flasc["train_loss"].values), torch.tensor(fedit["train_loss"].values), atol=1e-5)


def test_flasc_sends_top_k_each_way_and_steps_the_server_optimiser(federation):
    strategy = recording(FLASC)(0.1, 0.05)
    history = federation.run(strategy, rounds=2, progress=False, seed=1)
    server = federation.last_server
    total = sum(a.numel() + b.numel() for a, b in server.adapters.values())
    head = sum(v.numel() for v in server.head.values()) * VALUE_BYTES
    down_k, up_k = math.ceil(0.1 * total), math.ceil(0.05 * total)
    for starts in strategy.starts.values():
        for start in starts.values():
            nonzero = sum(int((a != 0).sum() + (b != 0).sum()) for a, b in start.adapters.values())
            assert nonzero <= down_k
            assert start.download.nbytes == min(down_k * 8, total * 4) + head
    for _, _, payload, _ in strategy.sent:
        deltas = [v for key, v in payload.tensors.items() if key.startswith("delta.")]
        assert sum(int((d != 0).sum()) for d in deltas) <= up_k
        assert payload.nbytes == min(up_k * 8, total * 4) + head
    assert (history["bytes_up"] == federation.profile.clients_per_round * (min(up_k * 8, total * 4) + head)).all()
    before, uploads = strategy.rounds[-1]
    moved = max(float((server.adapters[n][i] - before[n][i]).abs().max()) for n in server.adapters for i in (0, 1))
    assert 0 < moved < 10 * strategy.server_learning_rate  # an AdamW step moves an entry by about the rate


def test_flasc_names_bad_arguments():
    with pytest.raises(ValueError, match="density_down"):
        FLASC(0.0)
    with pytest.raises(ValueError, match="server_optimizer"):
        FLASC(server_optimizer="adam")
    with pytest.raises(ValueError, match="server_learning_rate"):
        FLASC(server_learning_rate=-1)


def test_a_sketch_keeps_m_of_r_components_each_as_often_as_the_others():
    from fedlora_edu.efficiency.sparse import sketch_indices

    draws = [sketch_indices(8, 3, seed) for seed in range(3000)]
    assert all(len(d) == 3 and d == sorted(set(d)) for d in draws) and sketch_indices(8, 3, 5) == draws[5]
    frequency = torch.bincount(torch.tensor([i for d in draws for i in d]), minlength=8) / len(draws)
    assert torch.allclose(frequency, torch.full((8,), 3 / 8), atol=0.04)  # so E[S] = (r / m) (m / r) I = I
    with pytest.raises(ValueError, match="between 1 and 8"):
        sketch_indices(8, 9, 0)


def test_fslora_with_the_whole_rank_is_fedit(federation):
    from fedlora_edu.efficiency.sparse import FSLoRA

    federation.run(FSLoRA(1.0), rounds=1, progress=False, seed=2)
    sketched = federation.last_server
    federation.run(FedIT(), rounds=1, progress=False, seed=2)
    for name, (a, b) in federation.last_server.adapters.items():
        assert torch.allclose(sketched.adapters[name][0], a, atol=1e-6)
        assert torch.allclose(sketched.adapters[name][1], b, atol=1e-6)


def test_fslora_trains_the_sketch_and_adds_each_change_at_its_components(federation):
    from fedlora_edu.efficiency.sparse import FSLoRA

    strategy = recording(FSLoRA)([0.5, 0.25, 0.5, 0.75, 0.5, 0.25, 0.5, 1.0][:federation.num_clients])
    history = federation.run(strategy, rounds=2, progress=False, seed=3)
    server = federation.last_server
    rank = server.rank
    before, uploads = strategy.rounds[-1]
    for t, starts in strategy.starts.items():
        global_before = strategy.rounds[t][0]
        for k, start in starts.items():
            kept = max(1, round(strategy.share(k) * rank))
            sketch = start.download.tensors["sketch"].long().tolist()
            assert len(sketch) == kept
            for name, (a, b) in start.adapters.items():
                assert a.shape[0] == kept  # a rank-m_k adapter: m_k rows of A, m_k columns of B scaled by r / m_k
                assert torch.allclose(a, global_before[name][0][sketch])
                assert torch.allclose(b, global_before[name][1][:, sketch] * (rank / kept))
    weights = [u.num_examples / sum(v.num_examples for v in uploads) for u in uploads]
    for name, (a, b) in server.adapters.items():
        expected_a, expected_b = before[name][0].clone(), before[name][1].clone()
        for p, upload in zip(weights, uploads, strict=True):
            sketch = upload.payload.tensors["sketch"].long().tolist()
            expected_a[sketch] += p * upload.payload.tensors[f"{name}.dA"]
            expected_b[:, sketch] += p * upload.payload.tensors[f"{name}.dB"]
        assert torch.allclose(a, expected_a, atol=1e-6) and torch.allclose(b, expected_b, atol=1e-6)
    head = sum(v.numel() for v in server.head.values()) * 4
    for _, result, payload, _ in strategy.sent:  # up: the chosen rows and columns, dense; the indices are the server's
        kept = max(1, round(strategy.share(result.client_id) * rank))
        assert payload.nbytes == 4 * kept * sum(a.shape[1] + b.shape[0] for a, b in server.adapters.values()) + head
    assert history["bytes_up"].notna().all()
    with pytest.raises(ValueError, match="sketch"):
        FSLoRA(0.0)
