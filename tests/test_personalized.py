"""Personalized LoRA (survey 4.2, eq. 13): FedSA-LoRA shares A and keeps every client's own B."""

from __future__ import annotations

import torch
from helpers import TINY, recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.factors import average_tensors
from fedlora_edu.core.strategy import normalized_weights
from fedlora_edu.heterogeneity.personalized import FedSALoRA


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
