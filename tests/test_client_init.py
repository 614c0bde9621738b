"""Property tests of client-side initialisation (survey 3.2, eq. 11): LoRA-FAIR's three strategies,
FedLoRU, pFedLoRU and mFedLoRU, FRLoRA.

Pure functions on random float64 matrices first, then the strategies through the real simulator on
the embedded MiniLM: eq. 11 in the effective weights, Re-Initial = FedLoRU(tau=1), Avg-Initial =
FedIT, Local-Initial's copied start, pFedLoRU's private module, mFedLoRU's nested updates of
heterogeneous ranks, FRLoRA's SVD start, and bad input.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import TINY, random_factors, random_weights, rank_of_change, recording
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.strategy import ServerState, normalized_weights, split_factors
from fedlora_edu.distributed.client_init import (
    SEED_BYTES,
    AvgInitial,
    FedLoRU,
    FRLoRA,
    LocalInitial,
    MFedLoRU,
    NestedUpdate,
    PFedLoRU,
    ReInitial,
    accumulation_round,
    check_tau,
    choose_local_initial_client,
    default_nested_ranks,
    fedloru_global_weight,
    frlora_residual,
    gaussian_reinit,
    initialization_drift,
    mfedloru_aggregate,
    nested_update,
    principal_factors,
    update_dispersion,
)
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.registry import METHODS, make_strategy, methods_in

warnings.filterwarnings("ignore", category=FutureWarning)

TOL = dict(atol=1e-9, rtol=1e-9)

shapes = st.tuples(st.integers(0, 10_000), st.integers(2, 9), st.integers(2, 9), st.integers(1, 4))  # seed, m, n, r


# ----------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------
def test_accumulation_schedule_counts_rounds_from_one():
    assert [accumulation_round(t, 2) for t in range(6)] == [False, True, False, True, False, True]
    assert all(accumulation_round(t, 1) for t in range(5))
    assert [accumulation_round(t, 3) for t in range(6)] == [False, False, True, False, False, True]


def test_gaussian_reinit_is_eq9_seeded_and_has_peft_scale():
    shapes_ = {"q": (torch.zeros(8, 3000), torch.ones(5, 8)), "v": (torch.zeros(2, 7), torch.ones(3, 2))}
    first = gaussian_reinit(shapes_, seed=1, round_index=2)
    again = gaussian_reinit(shapes_, seed=1, round_index=2)
    other = gaussian_reinit(shapes_, seed=1, round_index=3)
    for name in shapes_:
        assert torch.equal(first[name][0], again[name][0])
        assert not torch.equal(first[name][0], other[name][0])
        assert float(first[name][1].abs().max()) == 0.0  # B = 0
        assert first[name][0].shape == shapes_[name][0].shape and first[name][1].shape == shapes_[name][1].shape
    a = first["q"][0].double()
    assert float(a.mean()) == pytest.approx(0.0, abs=3e-3)
    assert float(a.std()) == pytest.approx(1 / math.sqrt(3 * 3000), rel=0.03)  # peft's A has std 1/sqrt(3n)


@settings(max_examples=50, deadline=None)
@given(shapes, st.integers(1, 4), st.floats(0.1, 4.0))
def test_fedloru_global_weight_is_eq11(case, merges, scaling):
    seed, m, n, r = case
    g = torch.Generator().manual_seed(seed)
    pretrained = torch.randn(m, n, generator=g, dtype=torch.float64)
    accumulated = [random_factors(g, m, n, r) for _ in range(merges)]
    expected = pretrained + scaling * sum(b @ a for a, b in accumulated)
    torch.testing.assert_close(fedloru_global_weight(pretrained, accumulated, scaling), expected, **TOL)
    assert torch.equal(fedloru_global_weight(pretrained, [], scaling), pretrained)


def test_accumulated_low_rank_updates_reach_a_higher_rank():
    g = torch.Generator().manual_seed(0)
    m, n, r = 12, 10, 2
    accumulated = [random_factors(g, m, n, r) for _ in range(3)]
    update = fedloru_global_weight(torch.zeros(m, n, dtype=torch.float64), accumulated, 1.0)
    assert int(torch.linalg.matrix_rank(update)) == 3 * r  # each cycle rank r, the sum rank 3 r


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 99), min_size=1, max_size=8, unique=True), st.integers(0, 1000), st.integers(0, 50))
def test_local_initial_client_is_one_of_the_uploaders_and_seeded(ids, seed, round_index):
    c = choose_local_initial_client(ids, seed, round_index)
    assert c in ids
    assert c == choose_local_initial_client(ids, seed, round_index)


def test_local_initial_choice_is_uniform_over_seeds():
    counts = {k: 0 for k in (3, 5, 9)}
    for seed in range(600):
        counts[choose_local_initial_client([3, 5, 9], seed, 1)] += 1
    assert all(150 < c < 250 for c in counts.values()), counts


@settings(max_examples=50, deadline=None)
@given(shapes, st.floats(0.25, 4.0))
def test_principal_factors_are_the_top_singular_part(case, scaling):
    seed, m, n, r = case
    r = min(r, m, n)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    a, b = principal_factors(weight, r, scaling)
    assert a.shape == (r, n) and b.shape == (m, r)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(scaling * b @ a, u[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-9, rtol=1e-9)
    # Eckart-Young: what is left is exactly the tail of the spectrum.
    left = torch.linalg.matrix_norm(weight - scaling * b @ a)
    assert float(left) == pytest.approx(float(s[r:].square().sum().sqrt()), abs=1e-9)
    # Balanced split: orthogonal rows of A and columns of B, each carrying S_r / s.
    torch.testing.assert_close(a @ a.T, torch.diag(s[:r] / scaling), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(b.T @ b, torch.diag(s[:r] / scaling), atol=1e-9, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.1, 4.0))
def test_frlora_residual_is_the_change_of_the_product(case, scaling):
    seed, m, n, r = case
    g = torch.Generator().manual_seed(seed)
    a0, b0 = random_factors(g, m, n, r)
    a1, b1 = random_factors(g, m, n, r)
    torch.testing.assert_close(frlora_residual(a1, b1, a0, b0, scaling), scaling * (b1 @ a1 - b0 @ a0), **TOL)
    assert float(frlora_residual(a0, b0, a0, b0, scaling).abs().max()) == 0.0


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 4))
def test_drift_and_dispersion_match_their_definitions(case, clients):
    seed, m, n, r = case
    g = torch.Generator().manual_seed(seed)
    reference = {"layer": random_factors(g, m, n, r)}
    starts = [{"layer": random_factors(g, m, n, r)} for _ in range(clients)]
    trained = [{"layer": random_factors(g, m, n, r)} for _ in range(clients)]
    p = random_weights(g, clients)
    scaling = 2.0

    def product(f):
        a, b = f["layer"]
        return scaling * b @ a

    expected_drift = sum(float(torch.linalg.matrix_norm(product(s) - product(reference))) for s in starts) / clients
    assert initialization_drift(starts, reference, scaling) == pytest.approx(expected_drift, rel=1e-9)
    assert initialization_drift([reference], reference, scaling) == 0.0
    updates = [product(t) - product(s) for s, t in zip(starts, trained, strict=True)]
    mean = sum(w * d for w, d in zip(p, updates, strict=True))
    spread = math.sqrt(sum(w * float(torch.linalg.matrix_norm(d - mean)) ** 2 for w, d in zip(p, updates, strict=True)))
    expected_dispersion = spread / float(torch.linalg.matrix_norm(mean))
    assert update_dispersion(starts, trained, p, scaling) == pytest.approx(expected_dispersion, rel=1e-7)
    same = update_dispersion([starts[0]] * clients, [trained[0]] * clients, p, scaling)
    assert same == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(shapes, st.integers(1, 4))
def test_nested_update_is_the_factor_plus_a_rank_rk_product(case, nested_rank):
    seed, m, n, r = case
    g = torch.Generator().manual_seed(seed)
    a, b = random_factors(g, m, n, r)
    a_left, a_right = (torch.randn(r, nested_rank, generator=g, dtype=torch.float64),
                       torch.randn(nested_rank, n, generator=g, dtype=torch.float64))
    b_left, b_right = (torch.randn(m, nested_rank, generator=g, dtype=torch.float64),
                       torch.randn(nested_rank, r, generator=g, dtype=torch.float64))
    new_a, new_b = nested_update(a, a_left, a_right), nested_update(b, b_left, b_right)
    torch.testing.assert_close(new_a, a + a_left @ a_right, **TOL)
    torch.testing.assert_close(new_b, b + b_left @ b_right, **TOL)
    assert new_a.shape == a.shape and new_b.shape == b.shape
    assert rank_of_change(new_a, a) <= nested_rank
    assert rank_of_change(new_b, b) <= nested_rank


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(1, 4))
def test_nested_parametrisation_starts_at_the_factor_and_trains_only_the_nested_pair(case, nested_rank):
    """NestedUpdate on a linear layer's weight: the layer computes with factor + left @ right, starts
    exactly at the factor, only left and right get gradients, and removing it restores the factor."""
    seed, m, n, _ = case
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(n, m, bias=False).double()
    factor = layer.weight.detach().clone()
    nest = NestedUpdate(factor, nested_rank, g)
    parametrize.register_parametrization(layer, "weight", nest)
    layer.parametrizations.weight.original.requires_grad_(False)
    assert torch.equal(layer.weight, factor)  # left starts at zero
    assert nest.left.shape == (m, nested_rank) and nest.right.shape == (nested_rank, n)
    with torch.no_grad():
        nest.left.normal_(generator=g)
    torch.testing.assert_close(layer.weight, nested_update(factor, nest.left, nest.right), **TOL)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert nest.left.grad is not None and nest.right.grad is not None
    assert layer.parametrizations.weight.original.grad is None
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert torch.equal(layer.weight, factor)


@settings(max_examples=50, deadline=None)
@given(shapes, st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_mfedloru_aggregate_averages_the_clients_factors_for_any_mix_of_ranks(case, nested_ranks):
    seed, m, n, r = case
    g = torch.Generator().manual_seed(seed)
    a, b = random_factors(g, m, n, r)
    p = random_weights(g, len(nested_ranks))
    a_updates = [(torch.randn(r, rk, generator=g, dtype=torch.float64), torch.randn(rk, n, generator=g,
                                                                                   dtype=torch.float64))
                 for rk in nested_ranks]
    b_updates = [(torch.randn(m, rk, generator=g, dtype=torch.float64), torch.randn(rk, r, generator=g,
                                                                                   dtype=torch.float64))
                 for rk in nested_ranks]
    new_a, new_b = mfedloru_aggregate(a, b, a_updates, b_updates, p)
    # The clients' factors A_k = A + A_left_k A_right_k, averaged with p_k (FedLoRU's server step).
    clients_a = [nested_update(a, left, right) for left, right in a_updates]
    clients_b = [nested_update(b, left, right) for left, right in b_updates]
    torch.testing.assert_close(new_a, sum(w * x for w, x in zip(p, clients_a, strict=True)), **TOL)
    torch.testing.assert_close(new_b, sum(w * x for w, x in zip(p, clients_b, strict=True)), **TOL)
    assert rank_of_change(new_a, a) <= min(sum(nested_ranks), r, n)
    # No client moved: the factors stay.
    zero_a = [(torch.zeros_like(left), right) for left, right in a_updates]
    zero_b = [(left, torch.zeros_like(right)) for left, right in b_updates]
    unchanged = mfedloru_aggregate(a, b, zero_a, zero_b, p)
    assert torch.equal(unchanged[0], a) and torch.equal(unchanged[1], b)


def test_default_nested_ranks_are_three_tiers():
    assert default_nested_ranks(8, 7) == [8, 4, 2, 8, 4, 2, 8]
    assert default_nested_ranks(2, 3) == [2, 1, 1]
    assert default_nested_ranks(1, 2) == [1, 1]


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    for tau in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="tau"):
            check_tau(tau)
        with pytest.raises(ValueError, match="tau"):
            FedLoRU(tau=tau)
        with pytest.raises(ValueError, match="tau"):
            PFedLoRU(tau=tau)
    with pytest.raises(ValueError, match="round_index"):
        accumulation_round(-1, 2)
    with pytest.raises(ValueError, match="rank"):
        FedLoRU(rank=0)
    with pytest.raises(ValueError, match="rank"):
        PFedLoRU(personal_rank=0)
    with pytest.raises(ValueError, match="rank"):
        principal_factors(torch.randn(3, 4), 0, 1.0)
    with pytest.raises(ValueError, match="exceeds"):
        principal_factors(torch.randn(3, 4), 4, 1.0)
    with pytest.raises(ValueError, match="scaling"):
        principal_factors(torch.randn(3, 4), 2, 0.0)
    with pytest.raises(ValueError, match="matrix"):
        principal_factors(torch.randn(3), 1, 1.0)
    with pytest.raises(ValueError, match="client_ids is empty"):
        choose_local_initial_client([], 0, 0)
    with pytest.raises(ValueError, match="W' is"):
        fedloru_global_weight(torch.zeros(3, 4), [(torch.zeros(2, 5), torch.zeros(3, 2))], 1.0)
    with pytest.raises(ValueError, match="same r_k"):
        fedloru_global_weight(torch.zeros(3, 4), [(torch.zeros(2, 4), torch.zeros(3, 1))], 1.0)
    with pytest.raises(ValueError, match="r x n and m x r"):
        gaussian_reinit({"q": (torch.zeros(2, 4), torch.zeros(3, 3))}, 0, 0)
    with pytest.raises(ValueError, match="one per client"):
        update_dispersion([], [], [], 1.0)
    with pytest.raises(ValueError, match="starts is empty"):
        initialization_drift([], {}, 1.0)
    for ranks in ([0, 2], [1.5], [True], "4"):
        with pytest.raises(ValueError, match="ranks"):
            MFedLoRU(ranks=ranks)
    for tau in (0, 1.5):
        with pytest.raises(ValueError, match="tau"):
            MFedLoRU(tau=tau)
    with pytest.raises(ValueError, match="rank"):
        MFedLoRU(rank=0)
    with pytest.raises(ValueError, match="ranks has 2 entries for 3 clients"):
        MFedLoRU(ranks=[1, 2]).max_rank(3)
    factor = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="left"):
        nested_update(factor, torch.zeros(4, 2), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="right"):
        nested_update(factor, torch.zeros(3, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same r_k"):
        nested_update(factor, torch.zeros(3, 2), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="matrices"):
        nested_update(factor, torch.zeros(3), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="rank"):
        NestedUpdate(factor, 0, torch.Generator())
    a, b = torch.zeros(2, 5), torch.zeros(3, 2)
    pair_a, pair_b = (torch.zeros(2, 1), torch.zeros(1, 5)), (torch.zeros(3, 1), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="A_updates"):
        mfedloru_aggregate(a, b, [pair_a, pair_a], [pair_b], [0.5, 0.5])
    with pytest.raises(ValueError, match="A_updates"):
        mfedloru_aggregate(a, b, [], [], [])
    with pytest.raises(ValueError, match="weights"):
        mfedloru_aggregate(a, b, [pair_a], [pair_b], [0.7])
    with pytest.raises(ValueError, match="nested rank"):
        mfedloru_aggregate(a, b, [pair_a], [(torch.zeros(3, 2), torch.zeros(2, 2))], [1.0])
    with pytest.raises(ValueError, match="rank"):
        default_nested_ranks(0, 3)
    with pytest.raises(ValueError, match="num_clients"):
        default_nested_ranks(4, 0)
    with pytest.raises(ValueError, match="different layers"):
        initialization_drift([{"q": (torch.zeros(1, 2), torch.zeros(2, 1))}], {"v": (torch.zeros(1, 2),
                                                                                      torch.zeros(2, 1))}, 1.0)


def test_registry_names_match():
    assert set(methods_in("fedlora_edu.distributed.client_init")) == {
        "Avg-Initial", "Re-Initial", "Local-Initial", "FedLoRU", "pFedLoRU", "mFedLoRU", "FRLoRA"}
    for name, cls in methods_in("fedlora_edu.distributed.client_init").items():
        assert cls.name == name and METHODS[name] is cls
    assert make_strategy("FedLoRU", tau=3).tau == 3
    assert ReInitial().tau == 1
    assert make_strategy("mFedLoRU", ranks=[1, 2], tau=3).ranks == [1, 2]


# ----------------------------------------------------------------------------------------
# Through the simulator, on the embedded MiniLM
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def federation(shards_federation):
    """This module's clients hold two BBC topics each: their updates disagree, as the methods assume."""
    return shards_federation


def averaged(uploads, layer):
    a, b = zip(*(tuple(split_factors(u.payload, [layer])[i][layer] for i in (0, 1)) for u in uploads), strict=True)
    return fedit_average(list(a), list(b), normalized_weights(uploads))


def test_fedloru_global_weight_is_w_prime_plus_the_accumulated_products(federation):
    """Eq. 11 in the real model: W_4 = W' + s (B_2 A_2 + B_4 A_4) with tau = 2, the B_t A_t FedIT's averages."""
    strategy = recording(FedLoRU)(tau=2)
    federation.run(strategy, rounds=4, progress=False)
    model, server = federation.last_model, federation.last_server
    pristine = federation.fresh_model()
    assert server.method_state.merge_rounds == [2, 4]
    for layer in adapter_io.lora_layers(model):
        pretrained = adapter_io.base_weight(pristine, layer).detach()
        merges = [averaged(strategy.rounds[t - 1][1], layer) for t in (2, 4)]
        expected = fedloru_global_weight(pretrained, merges, server.scaling)
        actual = adapter_io.effective_weight(model, layer)
        assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4)
        # The test can fail: dropping one accumulation, or adding round 3's average, misses the weight.
        only_last = fedloru_global_weight(pretrained, merges[1:], server.scaling)
        with_round3 = fedloru_global_weight(pretrained, merges + [averaged(strategy.rounds[2][1], layer)],
                                            server.scaling)
        assert not torch.allclose(actual, only_last, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(actual, with_round3, atol=1e-5, rtol=1e-4)
        # The accumulated update has rank above r although each cycle's is at most r.
        update = (actual - pretrained).double()
        assert int(torch.linalg.matrix_rank(update, rtol=1e-4)) > TINY.rank
    # After the accumulation of round 4 the adapter is fresh: eq. 9, B = 0.
    assert all(float(b.abs().max()) == 0.0 for _, b in server.adapters.values())
    # Between accumulations the clients start from the average (round 2 starts from round 1's average).
    for k, start in strategy.starts[1].items():
        for layer, (a, b) in start.adapters.items():
            a1, b1 = averaged(strategy.rounds[0][1], layer)
            assert torch.equal(a, a1) and torch.equal(b, b1), k


def test_re_initial_is_fedloru_with_tau_1(federation):
    reinit = federation.run(ReInitial(), rounds=3, progress=False)
    reinit_weights = {n: adapter_io.effective_weight(federation.last_model, n)
                      for n in adapter_io.lora_layers(federation.last_model)}
    assert federation.last_server.method_state.merge_rounds == [1, 2, 3]
    tau1 = federation.run(FedLoRU(tau=1), rounds=3, progress=False)
    for column in ("accuracy", "test_loss", "bytes_up", "bytes_down"):
        assert tau1[column].tolist() == reinit[column].tolist()
    for name, weight in reinit_weights.items():
        assert torch.equal(adapter_io.effective_weight(federation.last_model, name), weight)
    federation.run(FedLoRU(tau=2), rounds=3, progress=False)  # a different tau is a different method
    assert any(not torch.allclose(adapter_io.effective_weight(federation.last_model, n), w, atol=1e-6)
               for n, w in reinit_weights.items())


def test_re_initial_starts_every_round_from_eq9_and_counts_seed_and_merges(federation):
    strategy = recording(ReInitial)()
    history = federation.run(strategy, rounds=2, progress=False)
    server = federation.last_server
    head_bytes = tensor_bytes(server.head)
    adapter_bytes = tensor_bytes([t for ab in server.adapters.values() for t in ab])
    for k, start in strategy.starts[1].items():
        fresh = gaussian_reinit(start.adapters, 0, 1)
        for layer, (a, b) in start.adapters.items():
            assert torch.equal(a, fresh[layer][0]) and float(b.abs().max()) == 0.0, k
    clients = TINY.clients_per_round
    # Round 1: head and the initial adapter. Round 2: head, the seed of the fresh adapter, round 1's merge.
    assert history["bytes_down"].tolist() == [clients * (head_bytes + adapter_bytes),
                                              clients * (head_bytes + SEED_BYTES + adapter_bytes)]
    assert history["bytes_up"].tolist() == [clients * (head_bytes + adapter_bytes)] * 2


def test_avg_initial_is_fedit(federation):
    fedit = federation.run(FedIT(), rounds=2, progress=False)
    fedit_adapters = federation.last_server.adapters
    avg = federation.run(AvgInitial(), rounds=2, progress=False)
    assert avg["method"].iloc[0] == "Avg-Initial"
    for column in ("accuracy", "test_loss", "bytes_up", "bytes_down", "discordance"):
        assert avg[column].tolist() == fedit[column].tolist()
    for name, (a, b) in federation.last_server.adapters.items():
        assert torch.equal(a, fedit_adapters[name][0]) and torch.equal(b, fedit_adapters[name][1])


def test_local_initial_starts_every_client_from_one_clients_previous_adapter(federation):
    strategy = recording(LocalInitial)()
    federation.run(strategy, rounds=3, progress=False)
    chosen = federation.last_server.method_state.chosen_clients
    assert len(chosen) == 3
    scaling = federation.last_server.scaling
    for t in (1, 2):
        previous_uploads = strategy.rounds[t - 1][1]
        c = chosen[t - 1]
        assert c in [u.client_id for u in previous_uploads]
        assert c == choose_local_initial_client([u.client_id for u in previous_uploads], 0, t - 1)
        source = next(u for u in previous_uploads if u.client_id == c)
        a_c, b_c = split_factors(source.payload, list(strategy.rounds[t][0]))
        others = [u for u in previous_uploads if u.client_id != c]
        for k, start in strategy.starts[t].items():
            for layer, (a, b) in start.adapters.items():
                assert torch.equal(a, a_c[layer]) and torch.equal(b, b_c[layer]), (t, k)
                # exactly one client's: no other uploader's adapter is what the clients got
                assert all(not torch.equal(a, split_factors(u.payload, [layer])[0][layer]) for u in others)
        # The global model is FedIT's average, and the clients' start is not it: an initialisation drift.
        starts = [start.adapters for start in strategy.starts[t].values()]
        assert initialization_drift(starts, strategy.rounds[t][0], scaling) > 1e-4
    # Round 1 starts from the server's initial adapter.
    initial = federation.fresh_model()
    first = adapter_io.get_lora_factors(initial)
    for start in strategy.starts[0].values():
        assert all(torch.equal(start.adapters[n][0], first[n][0]) for n in first)


def test_pfedloru_personal_module_never_leaves_the_client(federation):
    strategy = recording(PFedLoRU)(rank=2, personal_rank=2, tau=2)
    history = federation.run(strategy, rounds=3, progress=False, evaluate_clients=True)
    server = federation.last_server
    g, total = 2, 4
    head_bytes = tensor_bytes(server.head)
    layers = list(server.adapters)
    global_bytes = tensor_bytes([t for ab in server.adapters.values() for t in ab])
    assert all(a.shape[0] == g and b.shape[1] == g for a, b in server.adapters.values())
    for _, result, payload, state in strategy.sent:
        expected_keys = {f"{n}.{side}" for n in layers for side in "AB"} | {f"head.{k}" for k in server.head}
        assert set(payload.tensors) == expected_keys
        assert payload.nbytes == global_bytes + head_bytes
        for n in layers:
            a, b = result.adapters[n]
            assert a.shape[0] == total
            assert torch.equal(payload.tensors[f"{n}.A"], a[:g]) and torch.equal(payload.tensors[f"{n}.B"], b[:, :g])
            personal_a, personal_b = state.personal[n]
            assert torch.equal(personal_a, a[g:]) and torch.equal(personal_b, b[:, g:])
            assert float(personal_b.abs().max()) > 0  # the personal module did train
            # no column of an uploaded B and no row of an uploaded A is one of the personal module's
            for key, tensor in payload.tensors.items():
                if key.endswith(".B"):
                    assert not any(torch.equal(col, p) for col in tensor.T for p in personal_b.T), key
                if key.endswith(".A"):
                    assert not any(torch.equal(row, p) for row in tensor for p in personal_a), key
    assert (history["bytes_up"] == TINY.clients_per_round * (global_bytes + head_bytes)).all()
    assert history["client_accuracy"].notna().all()
    # The personal model is the global module followed by the client's own module.
    k = strategy.sent[-1][1].client_id
    personal, head = strategy.personal_model(server, k, strategy.sent[-1][3])
    for n, (a, b) in personal.items():
        assert torch.equal(a[:g], server.adapters[n][0]) and torch.equal(a[g:], strategy.sent[-1][3].personal[n][0])
        assert b.shape[1] == total


def test_pfedloru_rank_split_must_leave_both_modules(federation):
    with pytest.raises(ValueError, match="cannot be split"):
        federation.run(PFedLoRU(personal_rank=TINY.rank), rounds=1, progress=False)
    assert PFedLoRU(rank=3, personal_rank=2).max_rank(3) == 5
    assert PFedLoRU(rank=3).max_rank(3) == 6


def test_mfedloru_on_a_real_layer_is_w_prime_plus_s_times_the_averaged_nested_factors(federation):
    """The pure function on a MiniLM layer: W' + s B_t A_t with A_t = A + sum_k p_k A_left_k A_right_k."""
    model = federation.fresh_model()
    factors = adapter_io.get_lora_factors(model)
    layer = next(iter(factors))
    a, b = (t.double() for t in factors[layer])
    a = a + 0.01  # a non-trivial starting point (peft's B is zero)
    b = b + 0.01
    r, n, m = a.shape[0], a.shape[1], b.shape[0]
    g = torch.Generator().manual_seed(3)
    nested_ranks, p = [1, 2, r], [0.2, 0.3, 0.5]
    a_updates = [(torch.randn(r, rk, generator=g, dtype=torch.float64) * 0.1,
                  torch.randn(rk, n, generator=g, dtype=torch.float64) * 0.1) for rk in nested_ranks]
    b_updates = [(torch.randn(m, rk, generator=g, dtype=torch.float64) * 0.1,
                  torch.randn(rk, r, generator=g, dtype=torch.float64) * 0.1) for rk in nested_ranks]
    new_a, new_b = mfedloru_aggregate(a, b, a_updates, b_updates, p)
    adapter_io.set_lora_factors(model, {**factors, layer: (new_a.float(), new_b.float())})
    scaling = adapter_io.lora_scaling(model)
    pretrained = adapter_io.base_weight(model, layer).detach().double()
    mean_a = sum(w * nested_update(a, *u) for w, u in zip(p, a_updates, strict=True))
    mean_b = sum(w * nested_update(b, *u) for w, u in zip(p, b_updates, strict=True))
    expected = pretrained + scaling * mean_b @ mean_a
    actual = adapter_io.effective_weight(model, layer).double()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert float((actual - pretrained - scaling * b @ a).abs().max()) > 1e-3  # the nested updates moved it


def test_mfedloru_global_weight_is_w_prime_plus_the_accumulated_products(federation):
    """mFedLoRU's eq. 11 in the real model, with clients of nested ranks 1, 2, 4 and tau = 2:
    W_4 = W' + s (B_2 A_2 + B_4 A_4), each (A_t, B_t) rebuilt from round t's nested uploads."""
    ranks = [1, 2, TINY.rank]
    strategy = recording(MFedLoRU)(ranks=ranks, tau=2)
    history = federation.run(strategy, rounds=4, progress=False)
    model, server = federation.last_model, federation.last_server
    pristine = federation.fresh_model()
    assert server.method_state.merge_rounds == [2, 4]

    def rebuilt(t, layer):
        """(A_t, B_t): round t's start adapter plus the p_k-weighted nested updates of its uploads."""
        start, uploads = strategy.rounds[t - 1]
        a, b = start[layer]
        pairs = {side: [(u.payload.tensors[f"{layer}.{side}_left"], u.payload.tensors[f"{layer}.{side}_right"])
                        for u in uploads] for side in "AB"}
        return mfedloru_aggregate(a, b, pairs["A"], pairs["B"], normalized_weights(uploads))

    for layer in adapter_io.lora_layers(model):
        pretrained = adapter_io.base_weight(pristine, layer).detach()
        merges = [rebuilt(t, layer) for t in (2, 4)]
        expected = fedloru_global_weight(pretrained, merges, server.scaling)
        actual = adapter_io.effective_weight(model, layer)
        assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4)
        # The test can fail: leaving out an accumulation misses the weight.
        assert not torch.allclose(actual, fedloru_global_weight(pretrained, merges[1:], server.scaling),
                                  atol=1e-5, rtol=1e-4)
    # Every client changed A and B by products of its own rank r_k, and sent exactly those factors.
    head_bytes = tensor_bytes(server.head)
    seen = set()
    for round_index, result, payload, _ in strategy.sent:
        rk = ranks[result.client_id]
        seen.add(rk)
        start_adapters = strategy.starts[round_index][result.client_id].adapters
        expected_bytes = head_bytes
        for layer, (a0, b0) in start_adapters.items():
            a_left, a_right = payload.tensors[f"{layer}.A_left"], payload.tensors[f"{layer}.A_right"]
            b_left, b_right = payload.tensors[f"{layer}.B_left"], payload.tensors[f"{layer}.B_right"]
            assert a_left.shape == (TINY.rank, rk) and a_right.shape == (rk, a0.shape[1])
            assert b_left.shape == (b0.shape[0], rk) and b_right.shape == (rk, TINY.rank)
            # the client's trained factors are exactly its start plus the nested products it sent
            a_trained, b_trained = result.adapters[layer]
            torch.testing.assert_close(a_trained, nested_update(a0, a_left, a_right), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(b_trained, nested_update(b0, b_left, b_right), atol=1e-6, rtol=1e-5)
            assert float((b_left @ b_right).abs().max()) > 0  # B moved (A may not: B starts at zero)
            size = a_left.element_size()
            nested = sum(t.numel() for t in (a_left, a_right, b_left, b_right)) * size
            expected_bytes += min(nested, (a0.numel() + b0.numel()) * size)
        assert payload.nbytes == expected_bytes
        assert not any(key.endswith((".A", ".B")) for key in payload.tensors)  # A_k, B_k are not sent
    assert seen == set(ranks)
    assert (history["bytes_up"] < history["bytes_down"]).all()  # ranks 1 and 2 send less than A and B


def test_mfedloru_clients_train_only_rank_rk_factors_in_the_sequential_loop(federation, monkeypatch):
    """The optimiser of client k holds the nested factors (r x r_k, r_k x n, m x r_k, r_k x r per layer) and
    the head, nothing of rank r; the engine is not used; no parametrisation outlives a client."""
    import fedlora_edu.foundations.training as training

    made = []
    real_adamw = training.adamw

    def recording_adamw(parameters, learning_rate):
        made.append([tuple(p.shape) for p in parameters])
        return real_adamw(parameters, learning_rate)

    monkeypatch.setattr(training, "adamw", recording_adamw)
    ranks = [1, 2, 3]
    history = federation.run(MFedLoRU(ranks=ranks, tau=2), rounds=1, progress=False)
    assert (history["engine"] == "sequential").all()
    with pytest.raises(ValueError, match="local_training"):
        federation.run(MFedLoRU(ranks=ranks), rounds=1, progress=False, engine="batched")
    model = federation.last_model
    layers = adapter_io.lora_layers(model)
    head = sorted(tuple(p.shape) for p in adapter_io.head_parameters(model).values())
    r = TINY.rank
    for rk, shapes in zip(ranks, made, strict=True):
        nested = [shape for shape in shapes if shape not in head]
        expected = []
        for layer in layers.values():
            n, m = layer.lora_A[adapter_io.ADAPTER].weight.shape[1], layer.lora_B[adapter_io.ADAPTER].weight.shape[0]
            expected += [(r, rk), (rk, n), (m, rk), (rk, r)]
        assert sorted(nested) == sorted(expected)
    assert not any(parametrize.is_parametrized(module) for module in model.modules())


def test_mfedloru_nested_ranks_default_to_tiers_and_must_fit_the_global_rank(federation):
    server = ServerState(adapters={}, head={}, scaling=1.0, rank=8)
    assert [MFedLoRU().nested_rank(k, server) for k in range(4)] == [8, 4, 2, 8]
    assert [MFedLoRU(ranks=[3, 1, 2]).nested_rank(k, server) for k in range(3)] == [3, 1, 2]
    assert MFedLoRU(rank=3).client_rank(1, server) == 3  # every client holds the full rank-r adapter
    with pytest.raises(ValueError, match="ranks: every nested rank"):
        federation.run(MFedLoRU(ranks=[1, 2, TINY.rank + 1]), rounds=1, progress=False)
    with pytest.raises(ValueError, match="ranks has"):
        federation.run(MFedLoRU(ranks=[1, 2]), rounds=1, progress=False)


def test_frlora_restarts_from_the_top_singular_vectors_and_sums_the_residuals(federation):
    strategy = recording(FRLoRA)()
    federation.run(strategy, rounds=2, progress=False)
    model, server = federation.last_model, federation.last_server
    pristine = federation.fresh_model()
    r, s = TINY.rank, server.scaling
    for layer in adapter_io.lora_layers(model):
        pretrained = adapter_io.base_weight(pristine, layer).detach().double()
        u, sv, vh = torch.linalg.svd(pretrained, full_matrices=False)
        top = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
        init_a, init_b = None, None
        for t in (0, 1):
            for start in strategy.starts[t].values():
                a, b = start.adapters[layer]
                torch.testing.assert_close(s * (b.double() @ a.double()), top, atol=1e-4, rtol=1e-4)
                rows = a.double() @ a.double().T  # orthogonal rows: the singular directions themselves
                torch.testing.assert_close(rows, torch.diag(sv[:r] / s), atol=1e-4, rtol=1e-4)
                assert not any(key.endswith(f"{layer}.A") for key in start.download.tensors)  # A_0 is not downloaded
                init_a, init_b = a, b
        # W = W_pre + sum_t s (avg(B_t) avg(A_t) - B_0 A_0).
        expected = pretrained.clone()
        for _, uploads in strategy.rounds:
            a_bar, b_bar = averaged(uploads, layer)
            expected += frlora_residual(a_bar, b_bar, init_a, init_b, s).double()
        actual = adapter_io.effective_weight(model, layer).double()
        assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)
        assert float((actual - pretrained).abs().max()) > 1e-4  # the layer did move
        # The frozen weight is the residual: W' = W - s B_0 A_0.
        frozen = adapter_io.base_weight(model, layer).double()
        torch.testing.assert_close(frozen + s * init_b.double() @ init_a.double(), actual, atol=1e-4, rtol=1e-4)


def test_frlora_needs_prepare():
    strategy = FRLoRA()
    server = ServerState(adapters={"q": (torch.zeros(2, 3), torch.zeros(3, 2))}, head={}, scaling=1.0, rank=2,
                         method_state=strategy.new_state())
    with pytest.raises(ValueError, match="prepare"):
        strategy.client_start(server, 0, strategy.new_client_state(), 0)
