"""Compressed learning (survey 5.3): quantized and top-k uploads, CG-FedLLM's autoencoder, FwdLLM's forward gradients.

What defines each: the bytes counted are the bytes of the tensors sent; a quantized change is within a step of the
change and unbiased; a top-k payload holds exactly k values and k indices; the autoencoder's codes are what is
decoded; FwdLLM's estimate correlates with the true gradient and no backward pass runs through the model.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import recording

from fedlora_edu import make_strategy
from fedlora_edu.core.adapters import lora_layers, tensor_bytes
from fedlora_edu.efficiency.compression import (
    CGFedLLM,
    FwdLLM,
    QuantizedUpdates,
    TopKUpdates,
    UpdateAutoencoder,
    decode_update,
    dequantize,
    encode_update,
    flatten_factors,
    forward_gradient,
    pack_codes,
    perturbation_directions,
    pretrain_autoencoder,
    quantize,
    to_chunks,
    top_k_decode,
    top_k_encode,
    unpack_codes,
)


def _head_bytes(server):
    return sum(v.numel() * v.element_size() for v in server.head.values())


def _same_adapters(first, second, atol):
    return all(torch.allclose(first[n][i], second[n][i], atol=atol) for n in first for i in (0, 1))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 11])
def test_codes_pack_into_bits_and_back(bits):
    codes = torch.randint(0, 2 ** bits, (7, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).reshape(codes.shape), codes)
    with pytest.raises(ValueError, match="fit"):
        pack_codes(torch.tensor([2 ** bits]), bits)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantization_is_within_a_step_and_stochastic_rounding_is_unbiased(bits):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=generator)
    codes, low, step = quantize(x, bits, stochastic=False)
    assert float((dequantize(codes, low, step) - x).abs().max()) <= step / 2 + 1e-6
    assert int(codes.max()) <= 2 ** bits - 1 and low == float(x.min())
    draws = torch.stack([dequantize(*quantize(x, bits, generator=generator)) for _ in range(2000)])
    assert float((draws - x).abs().max()) < step + 1e-6
    assert float((draws.mean(0) - x).abs().max()) < 4 * step / math.sqrt(2000) + 1e-6  # E[decoded] = x
    constant = quantize(torch.full((3,), 0.5), bits)
    assert constant[2] == 0.0 and torch.equal(dequantize(*constant), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 0)


def test_quantized_uploads_count_packed_codes_and_add_the_decoded_mean_change(federation):
    bits = 3
    strategy = recording(QuantizedUpdates)(bits)
    history = federation.run(strategy, rounds=1, progress=False, seed=2)
    server = federation.last_server
    expected = sum(math.ceil(t.numel() * bits / 8) + 8 for t in flatten_factors(server.adapters).values())
    for _, _, payload, _ in strategy.sent:
        assert payload.nbytes == tensor_bytes(payload.tensors) == expected + _head_bytes(server)
    assert history["bytes_up"].iloc[0] == len(strategy.sent) * (expected + _head_bytes(server))
    fedit = federation.run(make_strategy("FedIT"), rounds=1, progress=False, seed=2)
    assert not math.isnan(fedit["train_loss"].iloc[0])
    dense = federation.last_server.adapters
    # The quantized average is within a step of each client's change from FedIT's average (same start and batches).
    before, uploads = strategy.rounds[0]
    steps = [max(float(u.payload.tensors[f"{k}.grid"][1]) for k in flatten_factors(before)) for u in uploads]
    assert _same_adapters(server.adapters, dense, atol=max(steps) + 1e-6)
    assert not _same_adapters(server.adapters, dense, atol=1e-7)


def test_sixteen_bits_are_fedit_to_the_grid(federation):
    federation.run(QuantizedUpdates(16, stochastic=False), rounds=1, local_steps=1, progress=False, seed=3,
                   evaluate=False)
    quantized = federation.last_server.adapters
    federation.run(make_strategy("FedIT"), rounds=1, local_steps=1, progress=False, seed=3, evaluate=False)
    assert _same_adapters(quantized, federation.last_server.adapters, atol=1e-5)


@pytest.mark.parametrize("density", [0.01, 0.2, 1.0])
def test_top_k_sends_exactly_k_values_and_indices_of_the_largest_entries(density):
    generator = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(4, 9, generator=generator), "b": 2 * torch.randn(9, 4, generator=generator)}
    total = sum(t.numel() for t in tensors.values())
    values, indices = top_k_encode(tensors, density)
    k = math.ceil(density * total)
    assert values.numel() == indices.numel() == k and indices.dtype == torch.int32
    decoded = top_k_decode(values, indices, {key: t.shape for key, t in tensors.items()})
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    kept = torch.cat([d.reshape(-1) for d in decoded.values()])
    assert int((kept != 0).sum()) == k and torch.equal(kept[indices.long()], flat[indices.long()])
    if density < 1:
        assert kept.abs().max() == flat.abs().max()
        assert float(values.abs().min()) >= float(flat[kept == 0].abs().max())


def test_top_k_uploads_hold_exactly_k_entries_and_cost_eight_bytes_each(federation):
    density = 0.05
    strategy = recording(TopKUpdates)(density)
    federation.run(strategy, rounds=2, progress=False, seed=1)
    server = federation.last_server
    k = math.ceil(density * sum(t.numel() for t in flatten_factors(server.adapters).values()))
    for _, _, payload, _ in strategy.sent:
        assert payload.tensors["values"].numel() == payload.tensors["indices"].numel() == k
        assert payload.nbytes == k * 8 + _head_bytes(server)
    before, uploads = strategy.rounds[-1]
    moved = sum(int((server.adapters[n][i] != before[n][i]).sum()) for n in before for i in (0, 1))
    assert 0 < moved <= len(uploads) * k  # only entries some client sent move


def test_top_k_at_density_one_is_fedit(federation):
    federation.run(TopKUpdates(1.0), rounds=1, local_steps=1, progress=False, seed=4, evaluate=False)
    sparse = federation.last_server.adapters
    federation.run(make_strategy("FedIT"), rounds=1, local_steps=1, progress=False, seed=4, evaluate=False)
    assert _same_adapters(sparse, federation.last_server.adapters, atol=1e-6)


def test_error_feedback_keeps_what_was_not_sent():
    strategy = TopKUpdates(0.25, error_feedback=True)
    state = strategy.new_client_state()
    generator = torch.Generator().manual_seed(0)
    changes = [{"x.A": torch.randn(2, 6, generator=generator), "x.B": torch.randn(6, 2, generator=generator)}
               for _ in range(2)]
    sent = strategy.decode(strategy.encode(changes[0], state), {k: v.shape for k, v in changes[0].items()}, None)
    for key in changes[0]:
        assert torch.allclose(sent[key] + state.residual[key], changes[0][key])
    residual = {key: value.clone() for key, value in state.residual.items()}
    sent = strategy.decode(strategy.encode(changes[1], state), {k: v.shape for k, v in changes[1].items()}, None)
    for key in changes[1]:
        assert torch.allclose(sent[key] + state.residual[key], changes[1][key] + residual[key])
    with pytest.raises(ValueError, match="density"):
        TopKUpdates(0)


def test_the_autoencoder_learns_updates_of_a_low_dimensional_family_and_codes_are_what_is_decoded():
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 32, generator=generator)  # chunks that live in a 4-dimensional subspace
    updates = [{"w": (torch.randn(40, 4, generator=generator) @ basis)} for _ in range(3)]
    autoencoder = UpdateAutoencoder(chunk=32, code=4, hidden=64, seed=0)
    test = {"w": torch.randn(40, 4, generator=generator) @ basis}
    shapes = {"w": test["w"].shape}

    def relative_error():
        decoded = decode_update(encode_update(test, autoencoder.encoder, 32), autoencoder.decoder, shapes)
        return float((decoded["w"] - test["w"]).norm() / test["w"].norm())

    before = relative_error()
    losses = pretrain_autoencoder(autoencoder, updates, steps=400, learning_rate=1e-2, seed=0)
    assert losses[-1] < 0.1 * losses[0]
    assert relative_error() < 0.3 < before
    codes = encode_update(test, autoencoder.encoder, 32)
    rows, scale = to_chunks(test["w"], 32)
    assert codes["w.code"].shape == (rows.shape[0], 4) and float(codes["w.scale"]) == pytest.approx(scale)
    with pytest.raises(ValueError, match="smaller"):
        UpdateAutoencoder(chunk=8, code=8)


def test_cg_fedllm_warms_up_dense_then_sends_codes_the_server_decodes(federation):
    chunk, code = 32, 4
    strategy = recording(CGFedLLM)(chunk, code, 32, warmup_rounds=1, pretrain_steps=20)
    history = federation.run(strategy, rounds=2, progress=False, seed=0, evaluate=False)
    server = federation.last_server
    factors = flatten_factors(server.adapters)
    dense = sum(t.numel() * 4 for t in factors.values()) + _head_bytes(server)
    coded = sum(math.ceil(t.numel() / chunk) * code * 4 + 4 for t in factors.values()) + _head_bytes(server)
    clients = history["clients"]
    assert history["bytes_up"].tolist() == [clients[0] * dense, clients[1] * coded]
    autoencoder = server.method_state.autoencoder
    assert server.method_state.trained and len(server.method_state.pretrain_losses) == 20
    encoder_bytes = sum(p.numel() * 4 for p in autoencoder.encoder.parameters())
    assert history["bytes_down"][1] - history["bytes_down"][0] == clients[1] * encoder_bytes  # the encoder, once
    before, uploads = strategy.rounds[-1]
    weights = [u.num_examples / sum(v.num_examples for v in uploads) for u in uploads]
    decoded = [decode_update(u.payload.tensors, autoencoder.decoder, {k: v.shape for k, v in factors.items()})
               for u in uploads]
    for name, (a, b) in server.adapters.items():
        mean_a, mean_b = (sum(p * d[f"{name}.{side}"] for p, d in zip(weights, decoded, strict=True)) for side in "AB")
        assert torch.allclose(a, before[name][0] + mean_a, atol=1e-6)
        assert torch.allclose(b, before[name][1] + mean_b, atol=1e-6)


def test_forward_gradient_correlates_with_the_true_gradient_on_a_small_layer():
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    x, y = torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)

    def loss():
        return torch.nn.functional.cross_entropy(layer(x), y)

    true = torch.autograd.grad(loss(), list(layer.parameters()))
    parameters = [p for p in layer.parameters()]
    originals = [p.detach().clone() for p in parameters]
    directions = perturbation_directions([p.shape for p in parameters], 400, generator)
    estimate, _ = forward_gradient(loss, parameters, directions)
    assert all(torch.equal(p, x) for p, x in zip(parameters, originals, strict=True))  # restored exactly
    cosine = torch.cosine_similarity(torch.cat([e.reshape(-1) for e in estimate]),
                                     torch.cat([g.reshape(-1) for g in true]), dim=0)
    assert cosine > 0.6
    one, _ = forward_gradient(loss, parameters, directions[:1])
    single = torch.cosine_similarity(torch.cat([e.reshape(-1) for e in one]),
                                     torch.cat([g.reshape(-1) for g in true]), dim=0)
    assert single < cosine  # one direction is a noisy estimate; many average out
    previous = [g.clone() for g in true]
    chosen = perturbation_directions([p.shape for p in parameters], 20, generator, previous=previous, candidates=10)
    plain = perturbation_directions([p.shape for p in parameters], 20, generator)

    def mean_cosine(directions):
        return float(torch.stack([torch.cosine_similarity(d[0].reshape(-1), previous[0].reshape(-1), dim=0)
                                  for d in directions]).mean())

    assert mean_cosine(chosen) > mean_cosine(plain) + 0.1  # discriminative sampling leans to the last gradient


def test_fwdllm_runs_no_backward_pass_and_steps_by_the_mean_estimate(federation):
    calls = []

    class Watched(recording(FwdLLM)):
        @contextlib.contextmanager
        def local_training(self, model, start, client_state, round_index):
            hooks = [layer.lora_B["default"].weight.register_hook(lambda g: calls.append(1))
                     for layer in lora_layers(model).values()]
            try:
                with super().local_training(model, start, client_state, round_index):
                    yield
            finally:
                for hook in hooks:
                    hook.remove()

    strategy = Watched(2, server_learning_rate=0.1)
    history = federation.run(strategy, rounds=1, progress=False, seed=0, evaluate=False)
    assert calls == [] and history["engine"].iloc[0] == "sequential"
    assert math.isfinite(history["train_loss"].iloc[0])
    server = federation.last_server
    before, uploads = strategy.rounds[0]
    for (_, result, payload, _), start in zip(strategy.sent, strategy.starts[0].values(), strict=True):
        for name, (a, b) in result.adapters.items():  # the simulator's optimiser moved nothing
            assert torch.equal(a, start.adapters[name][0]) and torch.equal(b, start.adapters[name][1])
        assert payload.nbytes == tensor_bytes(payload.tensors)
    weights = [u.num_examples / sum(v.num_examples for v in uploads) for u in uploads]
    for name, (_, b) in server.adapters.items():
        mean_b = sum(p * u.payload.tensors[f"gradient.{name}.B"] for p, u in zip(weights, uploads, strict=True))
        assert torch.allclose(b, before[name][1] - 0.1 * mean_b, atol=1e-7)
        assert mean_b.abs().max() > 0
    with pytest.raises(ValueError, match="perturbations"):
        FwdLLM(0)


def test_fwdllm_paces_its_steps_by_the_variance_of_the_estimates():
    from fedlora_edu.core.strategy import Payload, ServerState, Upload
    from fedlora_edu.efficiency.compression import estimate_variance

    generator = torch.Generator().manual_seed(0)

    def round_uploads(count):
        return [Upload(k, 10 + k, Payload({"gradient.x.A": torch.randn(2, 3, generator=generator),
                                           "gradient.x.B": torch.randn(3, 2, generator=generator)}), 2)
                for k in range(count)]

    estimates = [{"A": torch.ones(2), "B": torch.zeros(1)}, {"A": 3 * torch.ones(2), "B": torch.zeros(1)}]
    assert estimate_variance(estimates) == pytest.approx(2 * 2 / 3)  # halves' means 1 and 3: variance 2 on 2 of 3
    assert math.isnan(estimate_variance(estimates[:1]))
    strategy = FwdLLM(1, server_learning_rate=1.0, variance_threshold=1e9)
    server = ServerState({"x": (torch.zeros(2, 3), torch.zeros(3, 2))}, {}, 1.0, 2, method_state=strategy.new_state())
    first = round_uploads(2)
    strategy.variance_threshold = 0.0  # nothing is precise enough: keep the estimates, do not step
    strategy.aggregate(server, first, 0)
    assert server.method_state.stepped == [False] and len(server.method_state.kept) == 2
    assert not server.adapters["x"][0].any()
    second = round_uploads(2)
    strategy.variance_threshold = 1e9  # now precise enough: step with the mean of all four, weighted by n_k
    strategy.aggregate(server, second, 1)
    assert server.method_state.stepped == [False, True] and server.method_state.kept == []
    everything = first + second
    total = sum(u.num_examples for u in everything)
    mean = sum(u.num_examples / total * u.payload.tensors["gradient.x.A"] for u in everything)
    assert torch.allclose(server.adapters["x"][0], -mean, atol=1e-6)
    assert len(server.method_state.variances) == 2 and all(v > 0 for v in server.method_state.variances)
    with pytest.raises(ValueError, match="variance_threshold"):
        FwdLLM(variance_threshold=-1)


def test_registered_in_the_efficiency_branch():
    from fedlora_edu.registry import methods_in

    assert set(methods_in("fedlora_edu.efficiency.compression")) == {"Quantized", "Top-k", "CG-FedLLM", "FwdLLM"}
    assert isinstance(make_strategy("FwdLLM", perturbations=2), FwdLLM)
