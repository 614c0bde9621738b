"""Property tests of rank clustering aggregation (survey 3.1, eq. 8): FedInc.

Pure functions on random float64 matrices first (the stacked adapter at N = total rank, in
the survey's form and in our weighted variant; what each form does with client weights and
cluster sizes; identical clients; FedIT as a special case; empty clusters; the k-means
objective and determinism), then the strategy through the real simulator on the embedded
MiniLM, and bad input.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TINY, recording
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.factors import fedit_average, ideal_update
from fedlora_edu.core.strategy import normalized_weights, split_factors
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.distributed.full_size import flora_stack
from fedlora_edu.distributed.rank_clustering import (
    FedInc,
    _reseed_empty,
    cluster_residual,
    clusters_to_factors,
    fedinc_aggregate,
    rank_vectors,
    round_seed,
    weighted_kmeans,
)
from fedlora_edu.registry import METHODS, make_strategy

warnings.filterwarnings("ignore", category=FutureWarning)

TOL = dict(atol=1e-9, rtol=1e-9)

cases = st.tuples(
    st.integers(0, 10_000),  # seed
    st.lists(st.integers(1, 5), min_size=1, max_size=4),  # ranks r_k (heterogeneous)
    st.integers(1, 9),  # m
    st.integers(1, 9),  # n
)


def clients(seed: int, ranks: list[int], m: int, n: int):
    """Random client factors of the given ranks and random weights p_k."""
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for r in ranks]
    raw = torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.1
    return As, Bs, (raw / raw.sum()).tolist()


# ----------------------------------------------------------------------------------------
# Eq. 8 as the survey prints it (the default), our weighted variant, and their limits
# ----------------------------------------------------------------------------------------
def matching(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each row of ``targets``, the index of the nearest row of ``rows`` (a permutation when they match)."""
    return torch.cdist(targets, rows).argmin(1)


@settings(max_examples=80, deadline=None)
@given(cases)
def test_total_rank_clusters_reproduce_the_stacked_adapter(case):
    """The issue's test: N = sum_k r_k, nothing merged, gives back the clients' stacked adapter.

    Survey form (default): the factors themselves, A = [A_1; ...; A_K] and B = [B_1, ..., B_K]
    up to the order of the components, so B A = sum_k B_k A_k (the sum, not the average).
    Weighted variant: B A = FLoRA's weighted stack product = the ideal update sum_k p_k B_k A_k.
    """
    As, Bs, p = clients(*case)
    total, m, n = sum(case[1]), case[2], case[3]
    A, B = fedinc_aggregate(As, Bs, p, total, seed=case[0])
    assert A.shape == (total, n) and B.shape == (m, total)
    a_stack, b_stack = torch.cat(As), torch.cat(Bs, dim=1)
    order = matching(torch.cat([A, B.T], dim=1), torch.cat([a_stack, b_stack.T], dim=1))
    assert sorted(order.tolist()) == list(range(total))
    torch.testing.assert_close(A[order], a_stack, **TOL)
    torch.testing.assert_close(B[:, order], b_stack, **TOL)
    torch.testing.assert_close(B @ A, sum(b @ a for a, b in zip(As, Bs, strict=True)), **TOL)

    A_w, B_w = fedinc_aggregate(As, Bs, p, total, seed=case[0], weighted=True)
    a_flora, b_flora = flora_stack(As, Bs, p)
    torch.testing.assert_close(B_w @ A_w, b_flora @ a_flora, **TOL)
    torch.testing.assert_close(B_w @ A_w, ideal_update(As, Bs, p), **TOL)
    assert cluster_residual(As, Bs, p, A_w, B_w) < 1e-9


@settings(max_examples=40, deadline=None)
@given(cases, st.data())
def test_survey_form_ignores_the_client_weights(case, data):
    """Eq. 8 has no weights: any p_k give the same adapter; the weighted variant depends on them."""
    As, Bs, p = clients(*case)
    total = sum(case[1])
    clusters = data.draw(st.integers(1, total))
    uniform = [1.0 / len(As)] * len(As)
    one = fedinc_aggregate(As, Bs, p, clusters, seed=case[0])
    two = fedinc_aggregate(As, Bs, uniform, clusters, seed=case[0])
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    # With equal weights 1/K the variant finds the same clusters and only scales them: a cluster of
    # c_n vectors has mass W_n = c_n / K, and each factor is multiplied by sqrt(W_n).
    A_w, B_w = fedinc_aggregate(As, Bs, uniform, clusters, seed=case[0], weighted=True)
    Z, _, _ = rank_vectors(As, Bs, uniform)
    counts = weighted_kmeans(Z, torch.ones(total, dtype=torch.float64), clusters, seed=case[0],
                             restarts=5).masses
    torch.testing.assert_close(A_w, (counts / len(As)).sqrt()[:, None] * one[0], **TOL)


@settings(max_examples=60, deadline=None)
@given(cases, st.data())
def test_survey_form_counts_every_cluster_once_whatever_its_size(case, data):
    """Centroid unscaled: a cluster adds its members' mean product minus their covariance, whatever its size."""
    As, Bs, p = clients(*case)
    n = case[3]
    Z, _, _ = rank_vectors(As, Bs, p)
    ones = torch.ones(Z.shape[0], dtype=torch.float64)
    clusters = data.draw(st.integers(1, Z.shape[0]))
    clustering = weighted_kmeans(Z, ones, clusters, seed=case[0])
    A, B = clusters_to_factors(clustering, n)
    expected = torch.zeros(case[2], n, dtype=torch.float64)
    for c in range(clusters):
        members = Z[clustering.assignment == c]
        if len(members) == 0:
            continue
        a, b = members[:, :n], members[:, n:]
        mean_product = b.T @ a / len(members)
        covariance = (b - b.mean(0)).T @ (a - a.mean(0)) / len(members)
        expected += mean_product - covariance
    torch.testing.assert_close(B @ A, expected, **TOL)


@pytest.mark.parametrize("weighted", [False, True])
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 5), st.integers(2, 9), st.integers(2, 9))
def test_identical_clients_with_n_equal_r_return_their_adapter(weighted, seed, count, r, m, n):
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(r, n, generator=g, dtype=torch.float64)
    B0 = torch.randn(m, r, generator=g, dtype=torch.float64)
    raw = torch.rand(count, generator=g, dtype=torch.float64) + 0.1
    p = (raw / raw.sum()).tolist()
    A, B = fedinc_aggregate([A0] * count, [B0] * count, p, r, seed=seed, weighted=weighted)
    torch.testing.assert_close(B @ A, B0 @ A0, atol=1e-9, rtol=1e-9)
    # The same components, in some order: every original row of A is a row of the result.
    order = torch.cdist(A0, A).argmin(1)
    assert sorted(order.tolist()) == list(range(r))
    torch.testing.assert_close(A[order], A0, **TOL)
    torch.testing.assert_close(B[:, order], B0, **TOL)


@pytest.mark.parametrize("weighted", [False, True])
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 5), st.integers(2, 9), st.integers(2, 9))
def test_clients_near_a_common_start_make_fedinc_with_n_equal_r_exactly_fedit(weighted, seed, count, r, m, n):
    """The pitfall: when k-means groups components by index, centroids are FedIT's averages
    (with equal client weights in the survey form, with the weights p_k in the variant)."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 * torch.arange(1, r + 1, dtype=torch.float64)  # components 10 apart or more
    A0 = scale[:, None] * torch.ones(r, n, dtype=torch.float64)
    B0 = torch.ones(m, r, dtype=torch.float64) * scale[None, :]
    As = [A0 + 0.01 * torch.randn(r, n, generator=g, dtype=torch.float64) for _ in range(count)]
    Bs = [B0 + 0.01 * torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(count)]
    raw = torch.rand(count, generator=g, dtype=torch.float64) + 0.1
    p = (raw / raw.sum()).tolist()
    A, B = fedinc_aggregate(As, Bs, p, r, seed=seed, weighted=weighted)
    a_bar, b_bar = fedit_average(As, Bs, p if weighted else [1.0 / count] * count)
    torch.testing.assert_close(B @ A, b_bar @ a_bar, atol=1e-9, rtol=1e-9)
    assert cluster_residual(As, Bs, p, A, B) > 0  # ... and so carries a FedIT discordance


@settings(max_examples=60, deadline=None)
@given(cases, st.data())
def test_weighted_residual_is_the_weighted_within_cluster_covariance(case, data):
    """Variant: W_n b-bar a-bar^T - sum_j w_j b_j a_j^T = -sum_j w_j (b_j - b-bar)(a_j - a-bar)^T, per cluster."""
    As, Bs, p = clients(*case)
    n = case[3]
    Z, w, _ = rank_vectors(As, Bs, p)
    count = data.draw(st.integers(1, Z.shape[0]))
    clustering = weighted_kmeans(Z, w, count, seed=case[0])
    A, B = clusters_to_factors(clustering, n, weighted=True)
    covariance = torch.zeros(case[2], n, dtype=torch.float64)
    for j in range(Z.shape[0]):
        mu = clustering.centroids[clustering.assignment[j]]
        covariance += w[j] * torch.outer(Z[j, n:] - mu[n:], Z[j, :n] - mu[:n])
    torch.testing.assert_close(ideal_update(As, Bs, p) - B @ A, covariance, atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------------------
# The k-means itself
# ----------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 6), st.data())
def test_kmeans_objective_never_increases_and_ends_at_a_lloyd_fixed_point(seed, count, dim, data):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(count, dim, generator=g, dtype=torch.float64)
    w = torch.rand(count, generator=g, dtype=torch.float64) + 0.05
    clusters = data.draw(st.integers(1, count))
    result = weighted_kmeans(Z, w, clusters, seed=seed, iterations=100)
    history = result.objective
    assert len(history) == result.iterations + 1
    assert all(later <= earlier + 1e-12 * (1 + earlier) for earlier, later in zip(history, history[1:], strict=False))
    # The reported objective is the weighted sum of squared distances to the assigned centroids.
    recomputed = float((w * (Z - result.centroids[result.assignment]).square().sum(1)).sum())
    assert recomputed == pytest.approx(history[-1], rel=1e-9, abs=1e-12)
    if result.converged:  # a Lloyd fixed point: nearest-centroid assignment, weighted-mean centroids
        distances = torch.cdist(Z, result.centroids).square()
        assigned = distances.gather(1, result.assignment[:, None])[:, 0]
        assert bool((assigned <= distances.min(1).values + 1e-9).all())
        for c in range(clusters):
            members = result.assignment == c
            if members.any():
                mean = (w[members, None] * Z[members]).sum(0) / w[members].sum()
                torch.testing.assert_close(result.centroids[c], mean, **TOL)
    torch.testing.assert_close(result.masses.sum(), w.sum(), **TOL)
    # Restarts keep the best of several seedings, the first of which is the single run's.
    best = weighted_kmeans(Z, w, clusters, seed=seed, iterations=100, restarts=4)
    assert best.objective[-1] <= history[-1] + 1e-12 * (1 + history[-1])


def test_kmeans_is_deterministic_for_a_seed_and_seeds_matter():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(40, 5, generator=g, dtype=torch.float64)
    w = torch.rand(40, generator=g, dtype=torch.float64)
    first = weighted_kmeans(Z, w, 6, seed=7)
    again = weighted_kmeans(Z, w, 6, seed=7)
    assert torch.equal(first.assignment, again.assignment) and torch.equal(first.centroids, again.centroids)
    assert first.objective == again.objective
    others = {tuple(weighted_kmeans(Z, w, 6, seed=s).assignment.tolist()) for s in range(8)}
    assert len(others) > 1  # the seed really drives the k-means++ draw
    As, Bs, p = clients(5, [3, 3, 3], 6, 4)
    one = fedinc_aggregate(As, Bs, p, 3, seed=11)
    two = fedinc_aggregate(As, Bs, p, 3, seed=11)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_kmeans_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    labels = torch.arange(30) % 3
    Z = centres[labels] + 0.1 * torch.randn(30, 2, generator=g, dtype=torch.float64)
    result = weighted_kmeans(Z, torch.ones(30), 3, seed=0)
    # Same partition as the truth, up to renaming the clusters.
    pairs = {(int(a), int(b)) for a, b in zip(labels, result.assignment, strict=True)}
    assert len(pairs) == 3


@pytest.mark.parametrize("weighted", [False, True])
def test_empty_clusters_are_handled_without_nan(weighted):
    """Fewer distinct vectors than clusters: some clusters get no mass and give zero components."""
    z = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
    Z = torch.cat([z, z, z])  # 6 vectors, 2 distinct
    result = weighted_kmeans(Z, torch.ones(6), 4, seed=0)
    assert bool(torch.isfinite(result.centroids).all())
    assert int((result.masses > 0).sum()) == 2 and result.objective[-1] == pytest.approx(0.0, abs=1e-12)
    A_empty, B_empty = clusters_to_factors(result, 2, weighted=weighted)
    empty = result.masses == 0
    assert bool((A_empty[empty] == 0).all()) and bool((B_empty[:, empty] == 0).all())
    # As an adapter: identical clients of rank 2 asked for 4 clusters give their own product.
    A0, B0 = z[:, :2], z[:, 2:].T.reshape(1, 2)
    A, B = fedinc_aggregate([A0] * 3, [B0] * 3, [0.2, 0.3, 0.5], 4, weighted=weighted)
    assert A.shape == (4, 2) and bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())
    torch.testing.assert_close(B @ A, B0 @ A0, **TOL)


def test_an_emptied_cluster_is_reseeded_with_the_farthest_vector():
    """The Lloyd step's repair (rare with k-means++ seeds, so tested directly): an empty cluster takes the
    vector farthest from its centroid, from a cluster that keeps a member, and the objective drops."""
    points = torch.tensor([[0.0], [3.0], [10.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    centroids = torch.tensor([[2.0], [2.0], [10.0]], dtype=torch.float64)  # cluster 1 duplicates cluster 0
    assignment = torch.tensor([0, 0, 2])
    before = float((w * (points - centroids[assignment]).square().sum(1)).sum())
    repaired = _reseed_empty(points, w, centroids, assignment, 3)
    # Costs w_j d_j^2: point 0 pays 1 * 4, point 1 pays 2 * 1: point 0 moves.
    assert repaired.tolist() == [1, 0, 2] and centroids[1].tolist() == [0.0]
    after = float((w * (points - centroids[repaired]).square().sum(1)).sum())
    assert after < before
    # Nothing to move (every vector on its centroid): the cluster stays empty.
    flat = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    kept = _reseed_empty(flat, torch.ones(2, dtype=torch.float64), flat.clone(), torch.tensor([0, 0]), 2)
    assert kept.tolist() == [0, 0]


def test_rank_vectors_concatenate_rows_of_a_and_columns_of_b():
    As, Bs, p = clients(2, [2, 3], 4, 3)
    Z, w, owner = rank_vectors(As, Bs, p)
    assert Z.shape == (5, 3 + 4)
    torch.testing.assert_close(Z[3], torch.cat([As[1][1], Bs[1][:, 1]]), rtol=0, atol=0)
    assert w.tolist() == pytest.approx([p[0]] * 2 + [p[1]] * 3) and owner.tolist() == [0, 0, 1, 1, 1]


def test_dtype_and_device_follow_the_inputs():
    As, Bs, p = clients(4, [2, 2], 5, 3)
    A, B = fedinc_aggregate([a.float() for a in As], [b.float() for b in Bs], p, 2)
    assert A.dtype == torch.float32 and B.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------
def test_bad_input_is_named():
    As, Bs, p = clients(0, [2, 2], 4, 3)
    with pytest.raises(ValueError, match="num_clusters"):
        fedinc_aggregate(As, Bs, p, 0)
    with pytest.raises(ValueError, match=r"num_clusters must be an integer in 1\.\.4"):
        fedinc_aggregate(As, Bs, p, 5)
    with pytest.raises(ValueError, match="num_clusters"):
        fedinc_aggregate(As, Bs, p, True)
    with pytest.raises(ValueError, match="num_clusters"):
        fedinc_aggregate(As, Bs, p, 2.0)
    with pytest.raises(ValueError, match="Bs"):
        fedinc_aggregate(As, [Bs[0], Bs[1][:, :1]], p, 2)
    with pytest.raises(ValueError, match="n = 3 columns"):
        fedinc_aggregate([As[0], As[1][:, :2]], Bs, p, 2)
    with pytest.raises(ValueError, match="sum to 1"):
        fedinc_aggregate(As, Bs, [0.5, 0.6], 2)
    with pytest.raises(ValueError, match="empty"):
        fedinc_aggregate([], [], [], 1)
    with pytest.raises(ValueError, match="Z must be a matrix"):
        weighted_kmeans(torch.ones(4), torch.ones(4), 2)
    with pytest.raises(ValueError, match="weights has 3 entries"):
        weighted_kmeans(torch.ones(4, 2), torch.ones(3), 2)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans(torch.ones(4, 2), -torch.ones(4), 2)
    with pytest.raises(ValueError, match="iterations"):
        weighted_kmeans(torch.ones(4, 2), torch.ones(4), 2, iterations=-1)
    with pytest.raises(ValueError, match="seed"):
        weighted_kmeans(torch.ones(4, 2), torch.ones(4), 2, seed=-1)
    with pytest.raises(ValueError, match="restarts"):
        weighted_kmeans(torch.ones(4, 2), torch.ones(4), 2, restarts=0)
    with pytest.raises(ValueError, match="restarts"):
        FedInc(restarts=0)
    with pytest.raises(ValueError, match="finite"):
        weighted_kmeans(torch.tensor([[float("nan")], [0.0]]), torch.ones(2), 1)
    with pytest.raises(ValueError, match="A .* and B .* must be"):
        cluster_residual(As, Bs, p, As[0], Bs[0][:, :1])
    with pytest.raises(ValueError, match="num_clusters"):
        FedInc(num_clusters=0)
    with pytest.raises(ValueError, match="num_clusters"):
        FedInc(rank=4, num_clusters=5)
    with pytest.raises(ValueError, match="iterations"):
        FedInc(iterations=0)
    with pytest.raises(ValueError, match="weighted"):
        FedInc(weighted=1)
    with pytest.raises(ValueError, match="weighted"):
        fedinc_aggregate(As, Bs, p, 2, weighted="yes")


# ----------------------------------------------------------------------------------------
# Through the simulator, on the embedded MiniLM
# ----------------------------------------------------------------------------------------
def layer_uploads(uploads, name):
    As, Bs = [], []
    for upload in uploads:
        a, b = split_factors(upload.payload, [name])
        As.append(a[name])
        Bs.append(b[name])
    return As, Bs


def test_effective_weight_is_the_base_plus_scaled_product_of_the_clustered_factors(federation):
    strategy = recording(FedInc)()
    history = federation.run(strategy, rounds=2, progress=False)
    model, server = federation.last_model, federation.last_server
    pristine = federation.fresh_model()
    uploads = strategy.uploads
    p = normalized_weights(uploads)
    assert server.method_state.clusters == TINY.rank
    for name in adapter_io.lora_layers(model):
        As, Bs = layer_uploads(uploads, name)
        a, b = server.adapters[name]
        assert a.shape[0] == TINY.rank and b.shape[1] == TINY.rank
        # The server's factors are the pure function of the last round's uploads, with the round's seed.
        expected_a, expected_b = fedinc_aggregate(As, Bs, p, TINY.rank, seed=round_seed(0, 1))
        torch.testing.assert_close(a, expected_a, rtol=0, atol=0)
        torch.testing.assert_close(b, expected_b, rtol=0, atol=0)
        # FedInc changes no frozen weight: W = W'_0 + s B A.
        base = adapter_io.base_weight(pristine, name).detach()
        torch.testing.assert_close(adapter_io.base_weight(model, name).detach(), base, rtol=0, atol=0)
        torch.testing.assert_close(adapter_io.effective_weight(model, name), base + server.scaling * (b @ a),
                                   atol=1e-6, rtol=1e-5)
        # On the real layer too, N = K r (no merging) is the clients' stack: in the survey form the sum
        # of their updates, in the weighted variant the ideal update; N = r is neither.
        total = sum(x.shape[0] for x in As)
        ideal = ideal_update(As, Bs, p)
        full_a, full_b = fedinc_aggregate(As, Bs, p, total)
        summed = sum(y @ x for x, y in zip(As, Bs, strict=True))
        assert float((full_b @ full_a - summed).abs().max()) <= 1e-5 * float(summed.abs().max())
        full_a, full_b = fedinc_aggregate(As, Bs, p, total, weighted=True)
        assert float((full_b @ full_a - ideal).abs().max()) <= 1e-5 * float(ideal.abs().max())
        assert cluster_residual(As, Bs, p, a, b) > 1e-3 * float(torch.linalg.matrix_norm(ideal))
    # The k-means objective of every layer and round never increased.
    for record in server.method_state.records:
        for layer in record.values():
            objective = layer["objective"]
            assert all(y <= x + 1e-9 * (1 + x) for x, y in zip(objective, objective[1:], strict=False))
            # Survey form: every vector weighs one, so the masses count the clients' K r components.
            assert sum(layer["masses"]) == pytest.approx(TINY.clients_per_round * TINY.rank)
    assert (history["server_seconds"] > 0).all()


def test_bytes_are_fedits_at_rank_n_and_runs_are_deterministic(federation):
    fedit = federation.run(FedIT(), rounds=2, progress=False)
    fedinc = federation.run(FedInc(), rounds=2, progress=False)
    again = federation.run(FedInc(), rounds=2, progress=False)
    assert fedinc["bytes_up"].tolist() == fedit["bytes_up"].tolist()
    assert fedinc["bytes_down"].tolist() == fedit["bytes_down"].tolist()
    assert fedinc["accuracy"].tolist() == again["accuracy"].tolist()
    # N = 2 < r = 4: the global adapter, and so every client's training and payload, has rank 2.
    half = federation.run(FedInc(num_clusters=2), rounds=2, progress=False)
    server = federation.last_server
    assert all(a.shape[0] == 2 and b.shape[1] == 2 for a, b in server.adapters.values())
    adapter_full = tensor_bytes([t for a, b in server.adapters.values() for t in (a, b)]) * 2  # rank 4 is twice
    clients = TINY.clients_per_round
    assert (fedit["bytes_up"] - half["bytes_up"] == clients * adapter_full // 2).all()


def test_weighted_variant_through_the_simulator_is_the_pure_function(federation):
    strategy = recording(FedInc)(weighted=True)
    federation.run(strategy, rounds=1, progress=False)
    server, uploads = federation.last_server, strategy.uploads
    p = normalized_weights(uploads)
    for name, (a, b) in server.adapters.items():
        As, Bs = layer_uploads(uploads, name)
        expected_a, expected_b = fedinc_aggregate(As, Bs, p, TINY.rank, seed=round_seed(0, 0), weighted=True)
        torch.testing.assert_close(a, expected_a, rtol=0, atol=0)
        torch.testing.assert_close(b, expected_b, rtol=0, atol=0)
    for layer in server.method_state.records[0].values():
        assert sum(layer["masses"]) == pytest.approx(TINY.rank)  # each of a client's r components weighs p_k


def test_registry_and_rank_check_at_run(federation):
    assert METHODS["FedInc"] is FedInc and isinstance(make_strategy("FedInc", num_clusters=2), FedInc)
    with pytest.raises(ValueError, match="num_clusters = 5 exceeds the model's LoRA rank 4"):
        federation.run(FedInc(num_clusters=5), rounds=1, progress=False)


def test_heterogeneous_ranks_train_their_share_of_the_centroids_and_are_all_clustered(federation):
    """Survey 4.1: with ranks r_k, client k downloads and sends r_k components; k-means pools every one."""
    ranks = [1, 2, 4]
    strategy = recording(FedInc)(ranks=ranks)
    federation.run(strategy, rounds=2, progress=False)
    server = federation.last_server
    assert server.rank == max(ranks) and all(a.shape[0] == max(ranks) for a, _ in server.adapters.values())
    for t, starts in strategy.starts.items():
        for k, start in starts.items():
            assert all(a.shape[0] == ranks[k] and b.shape[1] == ranks[k] for a, b in start.adapters.values()), (t, k)
    for _, result, payload, _ in strategy.sent:
        assert all(payload.tensors[f"{n}.A"].shape[0] == ranks[result.client_id] for n in server.adapters)
    for record in server.method_state.records:
        for layer in record.values():
            assert sum(layer["masses"]) == sum(ranks[u.client_id] for u in strategy.uploads)  # every component
    with pytest.raises(ValueError, match="ranks has 2 entries"):
        federation.run(FedInc(ranks=[1, 2]), rounds=1, progress=False)
    with pytest.raises(ValueError, match="ranks"):
        FedInc(ranks=[0, 2, 3])
