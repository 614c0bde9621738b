"""FedBiOT (survey 5, compression): a layer-dropped emulator distilled on public data; adapters plugged back in."""

from __future__ import annotations

import pytest
import torch
from helpers import recording, tiny_federation

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.efficiency.layers import _layer_module, layer_of
from fedlora_edu.efficiency.offsite import (
    FedBiOT,
    build_emulator,
    distill_emulator,
    emulator_bytes,
    emulator_gap,
    emulator_installed,
    emulator_kl,
    kept_layers,
    public_data,
)
from fedlora_edu.foundations.training import trim_batch


@pytest.fixture(scope="module")
def probe_federation():
    """The tiny federation (BBC News) with the frozen probe head: the KL compares meaningful class distributions."""
    return tiny_federation("iid", head="probe")


def test_the_emulator_keeps_evenly_spaced_blocks_first_and_last_included():
    assert kept_layers(4, 0.2) == [0, 1, 3]
    assert kept_layers(4, 0.5) == [0, 3]
    assert kept_layers(4, 0.0) == [0, 1, 2, 3]
    thirty = kept_layers(30, 0.2)
    assert len(thirty) == 24 and thirty[0] == 0 and thirty[-1] == 29
    assert kept_layers(3, 0.9) == [0]
    with pytest.raises(ValueError, match="drop_ratio"):
        kept_layers(4, 1.0)


def test_the_installed_emulator_runs_the_chosen_blocks_only_and_leaves_the_model_as_it_was(probe_federation):
    model = probe_federation.fresh_model(seed=0)
    emulator = build_emulator(model, 4, 0.5)
    assert emulator.layers == [0, 1, 2, 3] and emulator.kept == [0, 3] and emulator.dropped == [1, 2]
    assert sorted(emulator.weights) == [0, 3]
    for i in emulator.kept:
        emulator.weights[i] = {name: value + 0.01 for name, value in emulator.weights[i].items()}
    before = {name: value.clone() for name, value in model.state_dict().items()}
    seen = {}

    def record(index):
        def hook(module, args, output):
            seen[index] = (args[0], output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [_layer_module(model, i).register_forward_hook(record(i)) for i in range(6)]
    batch = trim_batch(probe_federation.test.subset(list(range(4))), torch.device("cpu"))
    batch.pop("labels")
    with torch.no_grad(), emulator_installed(model, emulator):
        model(**batch)
        for i in emulator.dropped:  # a dropped block passes its input on
            assert torch.equal(seen[i][0], seen[i][1])
        for i in emulator.kept:  # a kept block holds the emulator's weights
            block = dict(_layer_module(model, i).named_parameters())
            for name, value in emulator.weights[i].items():
                assert torch.equal(block[name], value)
    for handle in handles:
        handle.remove()
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_distillation_lowers_the_kl_to_the_full_model_on_held_out_public_text(probe_federation):
    model = probe_federation.fresh_model(seed=0)
    public = public_data("tweet_sentiment", 96, probe_federation.profile.max_length)
    train, held_out = public.subset(list(range(32, 96))), public.subset(list(range(32)))
    emulator = build_emulator(model, 4, 0.2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kl_before, gap_before = emulator_kl(model, emulator, held_out), emulator_gap(model, emulator, held_out)
    losses = distill_emulator(model, emulator, train, steps=12, batch_size=8, learning_rate=1e-4)
    kl_after, gap_after = emulator_kl(model, emulator, held_out), emulator_gap(model, emulator, held_out)
    assert len(losses) == 12
    assert kl_after < kl_before and gap_after < gap_before
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # the full model


def test_fedbiot_trains_the_adapter_on_the_emulator_and_plugs_it_into_the_full_model(probe_federation):
    strategy = recording(FedBiOT)(distill_steps=4, public_examples=24)
    history = probe_federation.run(strategy, rounds=2, progress=False, seed=2)
    server = probe_federation.last_server
    state = server.method_state
    assert state.emulator.layers == [0, 1, 2, 3] and state.emulator.kept == [0, 1, 3]
    adapter = [name for name in server.adapters if layer_of(name) in (4, 5)]
    for _, _, payload, _ in strategy.sent:  # up: the adapter's factors and the head, nothing of the emulator
        sent = {key.rsplit(".", 1)[0] for key in payload.tensors if not key.startswith("head.")}
        assert sent == set(adapter)
        assert payload.nbytes == sum(len(v.numpy().tobytes()) for v in payload.tensors.values())
        assert payload.nbytes == 4 * sum(server.adapters[n][0].numel() + server.adapters[n][1].numel()
                                         for n in adapter) + 4 * sum(v.numel() for v in server.head.values())
    first, second = strategy.starts[0], strategy.starts[1]
    for k in first:  # down: the emulator once, in the client's first download
        assert first[k].download.nbytes == second[k].download.nbytes + state.emulator_bytes
        assert second[k].download.nbytes == sum(len(v.numpy().tobytes()) for v in second[k].download.tensors.values())
    model = probe_federation.fresh_model(seed=2)  # the run's initial adapter
    classifier_numbers = sum(p.numel() for n, p in model.named_parameters()
                             if "lora_" not in n and not n.endswith(("classifier.weight", "classifier.bias")))
    block_numbers = sum(p.numel() for n, p in _layer_module(model, 2).named_parameters() if "lora_" not in n)
    assert state.emulator_bytes == emulator_bytes(model, state.emulator) == 4 * (classifier_numbers - block_numbers)
    initial = adapter_io.get_lora_factors(model)
    for name, (a, b) in server.adapters.items():
        if name in adapter:
            assert not torch.equal(b, initial[name][1])
        else:  # the emulator's blocks carry no trained adapter
            assert torch.equal(b, initial[name][1]) and torch.equal(a, initial[name][0])
    batch = trim_batch(probe_federation.test, torch.device("cpu"))
    batch.pop("labels")
    with torch.no_grad():
        plain = model(**batch).logits
        adapter_io.set_lora_factors(model, server.adapters)  # the full model's own module names
        plugged = model(**batch).logits
    assert not torch.allclose(plain, plugged)
    assert history["accuracy"].notna().all()


def test_with_cached_bottom_blocks_the_clients_read_the_emulators_output_and_the_cache_comes_back():
    federation = tiny_federation("iid", adapted_layers=2)
    cached = [data.hidden.clone() for data in federation.clients]
    seen = []

    class Watching(FedBiOT):
        def local_training(self, model, start, client_state, round_index):
            context = super().local_training(model, start, client_state, round_index)
            outer = self

            class Wrapped:
                def __enter__(self):
                    context.__enter__()
                    seen.append(federation.clients[client_state.client_id].hidden is
                                client_state.server_state.hidden[client_state.client_id])
                    return outer

                def __exit__(self, *error):
                    return context.__exit__(*error)

            return Wrapped()

    federation.run(Watching(distill_steps=2, public_examples=12), rounds=1, progress=False, seed=0)
    state = federation.last_server.method_state
    assert seen and all(seen)
    assert all(torch.equal(data.hidden, before) for data, before in zip(federation.clients, cached, strict=True))
    assert not torch.allclose(state.hidden[0], cached[0])  # the emulator's bottom differs from the full model's


def test_the_clients_cached_inputs_are_the_emulators_bottom_without_dropout():
    """The cached inputs are what a client's emulator gives at inference: eval mode, no dropout (as the federation)."""
    from fedlora_edu.efficiency.offsite import _bottom, _classifier

    federation = tiny_federation("iid", adapted_layers=2)
    federation.run(FedBiOT(distill_steps=2, public_examples=12), rounds=1, progress=False, seed=0)
    state, model = federation.last_server.method_state, federation.last_model
    model.eval()
    with torch.no_grad(), emulator_installed(model, state.emulator):
        expected = [_bottom(_classifier(model), data) for data in federation.clients]
    for k in range(federation.num_clients):
        assert torch.allclose(state.hidden[k], expected[k], atol=1e-6), k


def test_the_client_adds_the_proximal_gradient_and_trains_the_adapter_only(probe_federation):
    from fedlora_edu.core.strategy import ServerState

    strategy = FedBiOT(proximal=0.5, distill_steps=1, public_examples=12)
    model = probe_federation.fresh_model(seed=0)
    server = ServerState(adapters=adapter_io.get_lora_factors(model), head=adapter_io.get_head_state(model),
                         scaling=adapter_io.lora_scaling(model), rank=adapter_io.model_rank(model),
                         method_state=strategy.new_state())
    strategy.prepare(probe_federation, model, server, 0)
    client_state = strategy.new_client_state()
    start = strategy.client_start(server, 0, client_state, 0)
    adapter_io.set_lora_factors(model, start.adapters)
    layers = adapter_io.lora_layers(model)
    with strategy.local_training(model, start, client_state, 0):
        trainable = {layer_of(name) for name, layer in layers.items()
                     if layer.lora_B[adapter_io.ADAPTER].weight.requires_grad}
        assert trainable == {4, 5}  # the emulator's blocks carry no trained LoRA
        b = layers[next(name for name in layers if layer_of(name) == 5)].lora_B[adapter_io.ADAPTER].weight
        with torch.no_grad():
            b.add_(0.1)  # 0.1 away from where the round started
        batch = trim_batch(probe_federation.clients[0].subset([0, 1, 2, 3]), torch.device("cpu"))
        model(**batch).loss.backward()
        plain = b.grad.clone()
        torch.optim.SGD([b], lr=0.0).step()  # the client's hook runs before every optimiser step
        assert torch.allclose(b.grad, plain + 2 * 0.5 * 0.1 * torch.ones_like(b), atol=1e-6)
    assert all(layer.lora_B[adapter_io.ADAPTER].weight.requires_grad for layer in layers.values())  # restored


# ----- re-alignment on the server (the lower level of the bi-level problem), every realign_every rounds -------------


def _watching_emulator(cls):
    """A FedBiOT that copies the emulator each client downloads, by round: ``emulators[t]``."""

    class Watching(recording(cls)):
        def client_start(self, server, client_id, client_state, round_index):
            weights = server.method_state.emulator.weights
            self.__dict__.setdefault("emulators", {})[round_index] = {
                i: {key: value.clone() for key, value in block.items()} for i, block in weights.items()}
            return super().client_start(server, client_id, client_state, round_index)

    return Watching


def _same(first, second):
    return all(torch.equal(first[i][key], second[i][key]) for i in first for key in first[i])


def test_realigning_every_other_round_changes_the_emulator_and_the_clients_download_the_new_blocks(probe_federation):
    from fedlora_edu.core.seeds import derive_seed

    strategy = _watching_emulator(FedBiOT)(distill_steps=2, public_examples=12, realign_every=2)
    history = probe_federation.run(strategy, rounds=3, progress=False, seed=2)
    state = probe_federation.last_server.method_state
    emulators = strategy.emulators
    assert _same(emulators[0], emulators[1])  # not re-aligned after round 1
    assert not _same(emulators[1], emulators[2])  # re-aligned after round 2, before round 3
    assert state.version == 1 and [r["round"] for r in state.realignments] == [2]
    # the re-alignment is distill_emulator's steps from where the emulator stood, seeded by the run and the round
    model = probe_federation.fresh_model(seed=2)
    again = build_emulator(model, state.emulator.layers[-1] + 1, 0.2)
    again.weights = emulators[1]
    public = public_data("tweet_sentiment", 12, probe_federation.profile.max_length, seed=2)
    train = public.subset(list(range(len(public) // 3, len(public))))
    losses = distill_emulator(model, again, train, steps=2, batch_size=16, learning_rate=1e-4,
                              seed=derive_seed(2, "FedBiOT realign", 1))
    assert losses == pytest.approx(state.realignments[0]["losses"])
    assert all(torch.allclose(again.weights[i][key], emulators[2][i][key], atol=1e-6)
               for i in again.weights for key in again.weights[i])
    # down: round 3 carries the re-aligned blocks, as serialized; round 2 only the adapter
    blocks = [value for block in emulators[2].values() for value in block.values()]
    assert state.update_bytes == sum(len(v.numpy().tobytes()) for v in blocks)
    assert state.update_bytes == 4 * sum(p.numel() for i in state.emulator.kept
                                         for name, p in _layer_module(model, i).named_parameters()
                                         if "lora_" not in name)
    for k, start in strategy.starts[2].items():
        plain = sum(len(v.numpy().tobytes()) for v in start.download.tensors.values())
        assert start.download.nbytes == plain + state.update_bytes
        assert strategy.starts[1][k].download.nbytes == plain
        assert strategy.starts[0][k].download.nbytes == plain + state.emulator_bytes
    assert history["bytes_down"].tolist() == [sum(s.download.nbytes for s in strategy.starts[t].values())
                                              for t in range(3)]
    assert history["server_seconds"].iloc[1] >= state.realignments[0]["seconds"]  # counted as server time


def test_without_realignment_the_emulator_stays_and_is_downloaded_once(probe_federation):
    strategy = _watching_emulator(FedBiOT)(distill_steps=2, public_examples=12)
    assert strategy.realign_every == 0
    probe_federation.run(strategy, rounds=2, progress=False, seed=1)
    state = probe_federation.last_server.method_state
    assert _same(strategy.emulators[0], strategy.emulators[1]) and _same(strategy.emulators[1], state.emulator.weights)
    assert state.version == 0 and not state.realignments and state.model is None
    for k, start in strategy.starts[1].items():
        assert start.download.nbytes == sum(len(v.numpy().tobytes()) for v in start.download.tensors.values())
        assert strategy.starts[0][k].download.nbytes == start.download.nbytes + state.emulator_bytes
    with pytest.raises(ValueError, match="realign_every"):
        FedBiOT(realign_every=-1)


def test_with_cached_bottom_blocks_a_realigned_emulator_recomputes_the_clients_inputs():
    from fedlora_edu.efficiency.offsite import Emulator, _bottom, _classifier

    federation = tiny_federation("iid", adapted_layers=2)
    cached = [data.hidden.clone() for data in federation.clients]
    strategy = _watching_emulator(FedBiOT)(distill_steps=2, public_examples=12, realign_every=1)
    federation.run(strategy, rounds=2, progress=False, seed=0)
    state = federation.last_server.method_state
    assert [r["round"] for r in state.realignments] == [1, 2] and state.version == 2
    assert state.hidden_version == {k: 1 for k in range(federation.num_clients)}  # round 2 read the re-aligned one
    assert all(torch.equal(data.hidden, before) for data, before in zip(federation.clients, cached, strict=True))
    # round 2's clients read the bottom blocks through the emulator they downloaded (re-aligned once), no dropout
    model = federation.last_model
    model.eval()
    downloaded = Emulator(state.emulator.layers, state.emulator.kept, strategy.emulators[1])
    with torch.no_grad(), emulator_installed(model, downloaded):
        expected = [_bottom(_classifier(model), data) for data in federation.clients]
    assert not _same(strategy.emulators[0], strategy.emulators[1])
    for k in range(federation.num_clients):
        assert torch.allclose(state.hidden[k], expected[k], atol=1e-6)
        assert not torch.allclose(state.hidden[k], cached[k])
