"""pFedLoRA (fedlora_edu.heterogeneity.local_models): a shared adapter, a personal full-parameter update per client."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import TINY, recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.heterogeneity.local_models import PFedLoRA, _Blocks

WIDTH = 384  # the embedded MiniLM's hidden size: the adapted layers' input size


def test_only_the_shared_adapter_travels_and_costs_fedits_bytes(shards_federation):
    strategy = recording(PFedLoRA)(rank=TINY.rank)
    history = shards_federation.run(strategy, rounds=2, progress=False, evaluate_clients=True)
    fedit = shards_federation.run(FedIT(), rounds=2, progress=False, evaluate_clients=True)
    assert (history["bytes_up"] == fedit["bytes_up"]).all() and (history["bytes_down"] == fedit["bytes_down"]).all()
    for _, _, payload, _ in strategy.sent:
        for key, tensor in payload.tensors.items():
            assert key.startswith("head.") or TINY.rank in tensor.shape, (key, tuple(tensor.shape))
    for starts in strategy.starts.values():
        for start in starts.values():
            assert all(key.startswith("head.") or TINY.rank in t.shape for key, t in start.download.tensors.items())
    assert history["client_accuracy"].notna().all()


class _Watching(PFedLoRA):
    """Records, for each client's round, the personal block before phase 1 and after phase 2, and the uploaded
    shared adapter against the one it started from."""

    @contextlib.contextmanager
    def local_training(self, model, start, client_state, round_index):
        r = self.rank
        before = {n: b[:, r:].clone() for n, (_, b) in start.adapters.items()}
        with super().local_training(model, start, client_state, round_index):
            yield
            after = {n: b[:, r:].clone() for n, (_, b) in adapter_io.get_lora_factors(model).items()}
            shared = {n: (a[:r].clone(), b[:, :r].clone()) for n, (a, b) in adapter_io.get_lora_factors(model).items()}
        self.__dict__.setdefault("seen", []).append((round_index, client_state.client_id, before, after, shared, start,
                                                     {n: d.clone() for n, d in client_state.personal.items()}))


def test_phase_one_trains_the_dense_update_and_phase_two_the_shared_adapter_only(shards_federation):
    strategy = _Watching(rank=TINY.rank)
    shards_federation.run(strategy, rounds=2, progress=False)
    server = shards_federation.last_server
    r = TINY.rank
    assert strategy.seen
    for round_index, _client, before, after, shared, start, personal in strategy.seen:
        for n in before:
            # phase 2 left D_k as phase 1 made it: the model's personal block is D_k / s
            assert torch.allclose(after[n] * server.scaling, personal[n], atol=1e-6)
            if round_index == 0:
                assert not before[n].any()  # D_k starts at zero
            assert not torch.allclose(after[n], before[n])  # phase 1 changed D_k
            # phase 2 changed the shared adapter (B starts at zero in round 1)
            assert not torch.allclose(shared[n][1], start.adapters[n][1][:, :r])
        # the identity block of A never changes
        assert all(torch.equal(a[r:], torch.eye(WIDTH)) for a, _ in start.adapters.values())


def test_personal_model_is_w_plus_dense_plus_the_shared_adapter_on_a_real_layer(shards_federation):
    strategy = PFedLoRA(rank=TINY.rank)
    shards_federation.run(strategy, rounds=1, progress=False)
    server = shards_federation.last_server
    state = strategy.ClientState(client_id=0, personal=None)
    assert strategy.personal_model(server, 0, state) is None
    generator = torch.Generator().manual_seed(0)
    layers = list(server.adapters)
    dense = {n: 1e-2 * torch.randn(server.adapters[n][1].shape[0], WIDTH, generator=generator) for n in layers}
    state.personal = dense
    adapters, head = strategy.personal_model(server, 0, state)
    model = shards_federation.fresh_model(rank=server.rank)
    adapter_io.set_lora_factors(model, adapters)
    r = TINY.rank
    for n in layers:
        a, b = server.adapters[n]
        expected = adapter_io.base_weight(model, n) + dense[n] + server.scaling * (b[:, :r] @ a[:r])
        assert torch.allclose(adapter_io.effective_weight(model, n), expected, atol=1e-5)
    # the server's own model: W' + (alpha / r) B A, no personal block
    adapter_io.set_lora_factors(model, server.adapters)
    a, b = server.adapters[layers[0]]
    assert torch.allclose(adapter_io.effective_weight(model, layers[0]),
                          adapter_io.base_weight(model, layers[0]) + server.scaling * (b[:, :r] @ a[:r]), atol=1e-5)


def test_blocks_train_the_shared_adapter_as_rank_r_lora_and_the_dense_block_as_weights():
    """Gradients through the stacked rank-R factors equal those of plain rank-r LoRA at alpha / r for (A, B), and
    those of a dense update for D; a frozen block gets none."""
    g = torch.Generator().manual_seed(1)
    m, n, r, alpha = 5, 4, 2, 8.0
    R = r + n
    s = alpha / R
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(m, r, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(m, n, generator=g, dtype=torch.float64, requires_grad=True)
    target = (x @ (alpha / r * B @ A + D).T).pow(2).sum()
    target.backward()
    for train_shared, train_personal in ((True, False), (False, True)):
        a_blocks = _Blocks(r, 0, 1.0, 1.0, train_shared, False)
        b_blocks = _Blocks(r, 1, R / r, 1.0 / s, train_shared, train_personal)
        effective_a = torch.cat([A.detach(), torch.eye(n, dtype=torch.float64)])
        effective_b = torch.cat([(R / r) * B.detach(), D.detach() / s], dim=1)
        stored_a = a_blocks.stored(effective_a).requires_grad_(True)
        stored_b = b_blocks.stored(effective_b).requires_grad_(True)
        assert torch.allclose(b_blocks(stored_b), effective_b) and torch.allclose(stored_b[:, r:], D)
        (x @ (s * b_blocks(stored_b) @ a_blocks(stored_a)).T).pow(2).sum().backward()
        if train_shared:
            assert torch.allclose(stored_a.grad[:r], A.grad) and torch.allclose(stored_b.grad[:, :r], B.grad)
            assert not stored_b.grad[:, r:].any() and not stored_a.grad[r:].any()
        else:
            assert torch.allclose(stored_b.grad[:, r:], D.grad)
            assert not stored_b.grad[:, :r].any() and stored_a.grad is None  # A has no trainable block here


def test_settings_are_checked(shards_federation):
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        PFedLoRA(width=0)
    with pytest.raises(ValueError, match="local_learning_rate must be > 0"):
        PFedLoRA(local_learning_rate=0.0)
    with pytest.raises(ValueError, match="width=100 must be the adapted layers' input size"):
        shards_federation.run(PFedLoRA(rank=2, width=100), rounds=1, progress=False)
    with pytest.raises(ValueError, match="leaves no room for an adapter"):
        shards_federation.run(PFedLoRA(rank=None), rounds=1, progress=False)
