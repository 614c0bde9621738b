"""FedPipe: quantization bounds, payload sizes, reduction to exact full-size aggregation, and the simulator."""

from __future__ import annotations

import math
import warnings

import helpers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.factors import ideal_update
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.distributed.full_size import (
    FedPipe,
    FlexLoRA,
    FLoRA,
    dequantize,
    fake_quantize,
    fedpipe_aggregate,
    flexlora,
    quantization_error_bound,
    quantize,
    quantize_factors,
    quantized_nbytes,
)
from fedlora_edu.registry import methods_in

warnings.filterwarnings("ignore", category=FutureWarning)

bit_widths = st.sampled_from([2, 3, 4, 6, 8, 12, 16])


def clients(seed: int, m: int, n: int, ranks: list[int]):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n, generator=g) for r in ranks]
    Bs = [torch.randn(m, r, generator=g) for r in ranks]
    raw = torch.rand(len(ranks), generator=g) + 0.1
    return As, Bs, (raw / raw.sum()).tolist()


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 9), st.integers(1, 9), bit_widths, st.floats(1e-3, 1e3))
def test_quantization_error_is_within_half_a_step(seed, rows, cols, bits, magnitude):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * magnitude
    x[0, 0] = 0.0 if rows > 1 and seed % 3 == 0 else x[0, 0]
    codes, scales = quantize(x, bits)
    levels = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int32 and int(codes.abs().max()) <= levels
    error = (dequantize(codes, scales) - x).abs().amax(dim=1)
    bound = quantization_error_bound(x, bits)
    slack = 4 * torch.finfo(x.dtype).eps * x.abs().amax(dim=1)  # float32 rounding of the values themselves
    assert bool((error <= bound + slack).all())
    # One more bit halves the bound (the step is max|x| / (2^(b-1) - 1)).
    if bits < 16:
        ratio = quantization_error_bound(x, bits + 1) / bound.clamp_min(1e-30)
        expected = levels / (2**bits - 1)
        assert torch.allclose(ratio[bound > 0], torch.full_like(ratio[bound > 0], expected), rtol=1e-5)


def test_zero_rows_and_full_precision_are_exact():
    x = torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    torch.testing.assert_close(fake_quantize(x, 4)[0], torch.zeros(2))
    torch.testing.assert_close(fake_quantize(x, 32), x, rtol=0, atol=0)
    assert float(quantization_error_bound(x, 32).max()) == 0.0
    # Values on the grid come back exactly: -3 is the row's maximum, 1 = -3 * (-1/3) is not on a 2-bit grid.
    torch.testing.assert_close(fake_quantize(x, 2)[1], torch.tensor([0.0, -3.0]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), bit_widths)
def test_payload_bytes_are_the_quantized_size(rows, cols, bits):
    assert quantized_nbytes((rows, cols), bits) == math.ceil(rows * cols * bits / 8) + 4 * rows
    assert quantized_nbytes((rows, cols), 32) == 4 * rows * cols
    a, b = torch.randn(rows, cols), torch.randn(cols, rows)  # A is r x n, B is m x r with r = rows
    _, _, nbytes = quantize_factors(a, b, bits)
    assert nbytes == 2 * (math.ceil(rows * cols * bits / 8) + 4 * rows)  # one scale per rank component
    if cols >= 2 and bits <= 8:  # a row of n >= 2 entries of <= 8 bits plus its scale beats float32
        assert nbytes < 4 * (a.numel() + b.numel())


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 12), st.integers(2, 12),
       st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_full_precision_fedpipe_is_exact_full_size_aggregation(seed, m, n, ranks):
    As, Bs, p = clients(seed, m, n, ranks)
    wanted = [1, max(ranks), m + n]
    got = fedpipe_aggregate(As, Bs, p, [32] * len(ranks), wanted)
    for (a, b), (a_ref, b_ref) in zip(got, flexlora(As, Bs, p, wanted), strict=True):
        torch.testing.assert_close(a, a_ref, rtol=0, atol=0)
        torch.testing.assert_close(b, b_ref, rtol=0, atol=0)
    a_full, b_full = got[-1]  # rank >= min(m, n): the exact sum_k p_k B_k A_k
    torch.testing.assert_close(b_full @ a_full, ideal_update(As, Bs, p), atol=1e-4, rtol=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 10), st.integers(2, 10),
       st.lists(bit_widths, min_size=1, max_size=4))
def test_aggregate_error_is_bounded_by_the_bit_widths(seed, m, n, bits):
    """||sum p_k (B^ A^ - B A)||_F <= sum p_k (||dB|| ||A|| + ||B|| ||dA|| + ||dB|| ||dA||), dX <= step / 2."""
    ranks = [3] * len(bits)
    As, Bs, p = clients(seed, m, n, ranks)
    (a, b), = fedpipe_aggregate(As, Bs, p, bits, [m + n])  # full rank: the only error is quantization
    bound = 0.0
    for a_k, b_k, bits_k, p_k in zip(As, Bs, bits, p, strict=True):
        d_a = float(quantization_error_bound(a_k, bits_k).square().mul(n).sum().sqrt())  # Frobenius bound
        d_b = float(quantization_error_bound(b_k.T, bits_k).square().mul(m).sum().sqrt())
        norm_a, norm_b = float(torch.linalg.matrix_norm(a_k)), float(torch.linalg.matrix_norm(b_k))
        bound += p_k * (d_b * norm_a + norm_b * d_a + d_b * d_a)
    error = float(torch.linalg.matrix_norm(b @ a - ideal_update(As, Bs, p)))
    assert error <= bound * (1 + 1e-4) + 1e-4
    if min(bits) >= 8:
        assert error < 0.05 * float(torch.linalg.matrix_norm(ideal_update(As, Bs, p)))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bits"):
        FedPipe(bits=1)
    with pytest.raises(ValueError, match="bits\\[1\\]"):
        FedPipe(bits=[8, 33])
    with pytest.raises(ValueError, match="bits is empty"):
        FedPipe(bits=[])
    with pytest.raises(ValueError, match="method"):
        FedPipe(method="svd")
    with pytest.raises(ValueError, match="matrix"):
        quantize(torch.ones(3), 4)
    with pytest.raises(TypeError, match="tensor"):
        quantize([[1.0]], 4)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[math.nan]]), 4)
    with pytest.raises(ValueError, match="full precision"):
        quantize(torch.ones(2, 2), 32)
    As, Bs, p = clients(0, 4, 4, [2, 2])
    with pytest.raises(ValueError, match="bits has 1 entries"):
        fedpipe_aggregate(As, Bs, p, [8], [2])
    assert methods_in("fedlora_edu.distributed.full_size") == {"FLoRA": FLoRA, "FlexLoRA": FlexLoRA, "FedPipe": FedPipe}


# ----- on the real model, through the simulator ------------------------------------------
def test_fedpipe_at_full_precision_runs_like_flexlora(federation):
    pipe = federation.run(FedPipe(bits=32), rounds=2, progress=False)
    pipe_weights = {n: adapter_io.effective_weight(federation.last_model, n) for n in federation.last_server.adapters}
    flex = federation.run(FlexLoRA(), rounds=2, progress=False)
    for name, weight in pipe_weights.items():
        torch.testing.assert_close(adapter_io.effective_weight(federation.last_model, name), weight,
                                   atol=1e-6, rtol=1e-5)
    assert pipe["accuracy"].tolist() == flex["accuracy"].tolist()
    assert pipe["bytes_up"].tolist() == flex["bytes_up"].tolist()


def test_fedpipe_uploads_are_counted_at_their_bit_width(federation):
    fedit = federation.run(FedIT(), rounds=1, progress=False)
    model = federation.fresh_model()
    factors = adapter_io.get_lora_factors(model)
    head_bytes = adapter_io.tensor_bytes(adapter_io.get_head_state(model))
    bits = [4, 8, 16]
    pipe = federation.run(FedPipe(bits=bits), rounds=1, progress=False)
    expected = sum(
        head_bytes + sum(quantize_factors(a, b, bits_k)[2] for a, b in factors.values()) for bits_k in bits
    )
    assert int(pipe.loc[0, "bytes_up"]) == expected
    assert int(pipe.loc[0, "bytes_up"]) < int(fedit.loc[0, "bytes_up"])
    assert int(pipe.loc[0, "bytes_down"]) == int(fedit.loc[0, "bytes_down"])  # the download stays float32


def test_flora_clients_download_every_stack_they_missed(federation):
    """A client that skipped rounds must apply every stack merged since it last took part (its own W'
    follows the server's): one client per round, so most clients miss some. Counted as the stacks, or
    one dense m x n change per layer where that is smaller."""
    strategy = helpers.recording(FLoRA)()
    history = federation.run(strategy, rounds=5, clients_per_round=1, progress=False)
    model = federation.fresh_model()
    factors = adapter_io.get_lora_factors(model)
    head_bytes = adapter_io.tensor_bytes(adapter_io.get_head_state(model))
    stack_bytes = sum(adapter_io.tensor_bytes([a, b]) for a, b in factors.values())  # one client of rank r
    dense_bytes = sum(a.shape[1] * b.shape[0] * a.element_size() for a, b in factors.values())
    last_seen = {}  # client -> number of merges it has applied
    missed_any = False
    for t in range(5):
        (client,) = strategy.starts[t]
        missed = t - last_seen.get(client, 0)  # merges made before round t: t
        missed_any |= missed > 1
        expected = head_bytes + min(missed * stack_bytes, dense_bytes if missed else 0)
        assert strategy.starts[t][client].download.nbytes == expected == history.loc[t, "bytes_down"]
        last_seen[client] = t
    assert missed_any  # the run really had a client come back after missing a merge
