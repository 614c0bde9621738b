"""Property tests of rank clustering aggregation (survey 3.1, eq. 8): FedInc.

Pure functions on random float64 matrices first (the stacked adapter at N = total rank,
the k-means objective, determinism, identical clients, FedIT as a special case, empty
clusters, the within-cluster pitfall), then the strategy through the real simulator on the
embedded MiniLM, and bad input.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_edu import adapters as adapter_io
from fedlora_edu.adapters import tensor_bytes
from fedlora_edu.aggregation import FedIT, fedit_average, flora_stack, ideal_update
from fedlora_edu.methods import METHODS, make_strategy
from fedlora_edu.profiles import get_profile
from fedlora_edu.rank_clustering import (
    FedInc,
    _reseed_empty,
    cluster_residual,
    clusters_to_factors,
    fedinc_aggregate,
    rank_vectors,
    round_seed,
    weighted_kmeans,
)
from fedlora_edu.simulator import build_federation
from fedlora_edu.strategy import normalized_weights, split_factors

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
# Eq. 8 and the limits that pin down the weighting
# ----------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(cases)
def test_total_rank_clusters_reproduce_the_stacked_adapter(case):
    """The issue's test: N = sum_k r_k, nothing merged, gives FLoRA's stack product = the ideal update."""
    As, Bs, p = clients(*case)
    total = sum(case[1])
    A, B = fedinc_aggregate(As, Bs, p, total, seed=case[0])
    assert A.shape == (total, case[3]) and B.shape == (case[2], total)
    a_stack, b_stack = flora_stack(As, Bs, p)
    torch.testing.assert_close(B @ A, b_stack @ a_stack, **TOL)
    torch.testing.assert_close(B @ A, ideal_update(As, Bs, p), **TOL)
    assert cluster_residual(As, Bs, p, A, B) < 1e-9


def test_without_the_cluster_mass_total_rank_would_be_k_times_too_large():
    """The test above can fail: centroids used unscaled give sum_k B_k A_k, not sum_k p_k B_k A_k."""
    As, Bs, p = clients(3, [2, 2, 2], 6, 5)
    Z, w, _ = rank_vectors(As, Bs, p)
    clustering = weighted_kmeans(Z, w, Z.shape[0])
    unscaled_a, unscaled_b = clustering.centroids[:, :5], clustering.centroids[:, 5:].T
    wrong = unscaled_b @ unscaled_a
    torch.testing.assert_close(wrong, sum(b @ a for a, b in zip(As, Bs, strict=True)), **TOL)
    assert float(torch.linalg.matrix_norm(wrong - ideal_update(As, Bs, p))) > 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 5), st.integers(2, 9), st.integers(2, 9))
def test_identical_clients_with_n_equal_r_return_their_adapter(seed, count, r, m, n):
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(r, n, generator=g, dtype=torch.float64)
    B0 = torch.randn(m, r, generator=g, dtype=torch.float64)
    raw = torch.rand(count, generator=g, dtype=torch.float64) + 0.1
    p = (raw / raw.sum()).tolist()
    A, B = fedinc_aggregate([A0] * count, [B0] * count, p, r, seed=seed)
    torch.testing.assert_close(B @ A, B0 @ A0, atol=1e-9, rtol=1e-9)
    # The same components, in some order: every original row of A is a row of the result.
    order = torch.cdist(A0, A).argmin(1)
    assert sorted(order.tolist()) == list(range(r))
    torch.testing.assert_close(A[order], A0, **TOL)
    torch.testing.assert_close(B[:, order], B0, **TOL)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 5), st.integers(2, 9), st.integers(2, 9))
def test_clients_near_a_common_start_make_fedinc_with_n_equal_r_exactly_fedit(seed, count, r, m, n):
    """The pitfall: when k-means groups components by index, centroids are FedIT's averages."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 * torch.arange(1, r + 1, dtype=torch.float64)  # components 10 apart or more
    A0 = scale[:, None] * torch.ones(r, n, dtype=torch.float64)
    B0 = torch.ones(m, r, dtype=torch.float64) * scale[None, :]
    As = [A0 + 0.01 * torch.randn(r, n, generator=g, dtype=torch.float64) for _ in range(count)]
    Bs = [B0 + 0.01 * torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(count)]
    raw = torch.rand(count, generator=g, dtype=torch.float64) + 0.1
    p = (raw / raw.sum()).tolist()
    A, B = fedinc_aggregate(As, Bs, p, r, seed=seed)
    a_bar, b_bar = fedit_average(As, Bs, p)
    torch.testing.assert_close(B @ A, b_bar @ a_bar, atol=1e-9, rtol=1e-9)
    assert cluster_residual(As, Bs, p, A, B) > 0  # ... and so carries FedIT's discordance


@settings(max_examples=60, deadline=None)
@given(cases, st.data())
def test_residual_is_the_weighted_within_cluster_covariance(case, data):
    """W_n b-bar a-bar^T - sum_j w_j b_j a_j^T = -sum_j w_j (b_j - b-bar)(a_j - a-bar)^T, cluster by cluster."""
    As, Bs, p = clients(*case)
    n = case[3]
    Z, w, _ = rank_vectors(As, Bs, p)
    count = data.draw(st.integers(1, Z.shape[0]))
    clustering = weighted_kmeans(Z, w, count, seed=case[0])
    A, B = clusters_to_factors(clustering, n)
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


def test_empty_clusters_are_handled_without_nan():
    """Fewer distinct vectors than clusters: some clusters get no mass and give zero components."""
    z = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
    Z = torch.cat([z, z, z])  # 6 vectors, 2 distinct
    result = weighted_kmeans(Z, torch.ones(6), 4, seed=0)
    assert bool(torch.isfinite(result.centroids).all())
    assert int((result.masses > 0).sum()) == 2 and result.objective[-1] == pytest.approx(0.0, abs=1e-12)
    # As an adapter: identical clients of rank 2 asked for 4 clusters give their own product.
    A0, B0 = z[:, :2], z[:, 2:].T.reshape(1, 2)
    A, B = fedinc_aggregate([A0] * 3, [B0] * 3, [0.2, 0.3, 0.5], 4)
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


# ----------------------------------------------------------------------------------------
# Through the simulator, on the embedded MiniLM
# ----------------------------------------------------------------------------------------
TINY = get_profile("smoke").with_overrides(
    num_clients=3, clients_per_round=3, rounds=1, local_steps=2, batch_size=4, max_length=16,
    train_examples=60, test_examples=20, rank=4,
)


@pytest.fixture(scope="module")
def federation():
    return build_federation("bbc_news", scheme="iid", profile=TINY, seed=0)


class RecordingFedInc(FedInc):
    """FedInc that keeps every round's uploads."""

    def aggregate(self, server, uploads, round_index):
        self.rounds = getattr(self, "rounds", [])
        self.rounds.append(uploads)
        super().aggregate(server, uploads, round_index)


def layer_uploads(uploads, name):
    As, Bs = [], []
    for upload in uploads:
        a, b = split_factors(upload.payload, [name])
        As.append(a[name])
        Bs.append(b[name])
    return As, Bs


def test_effective_weight_is_the_base_plus_scaled_product_of_the_clustered_factors(federation):
    strategy = RecordingFedInc()
    history = federation.run(strategy, rounds=2, progress=False)
    model, server = federation.last_model, federation.last_server
    pristine = federation.fresh_model()
    uploads = strategy.rounds[-1]
    p = normalized_weights(uploads)
    assert server.extra["fedinc_clusters"] == TINY.rank
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
        # On the real layer too, N = K r (no merging) is the ideal update, N = r is not.
        total = sum(x.shape[0] for x in As)
        full_a, full_b = fedinc_aggregate(As, Bs, p, total)
        ideal = ideal_update(As, Bs, p)
        assert float((full_b @ full_a - ideal).abs().max()) <= 1e-5 * float(ideal.abs().max())
        assert cluster_residual(As, Bs, p, a, b) > 1e-3 * float(torch.linalg.matrix_norm(ideal))
    # The k-means objective of every layer and round never increased.
    for record in server.extra["fedinc"]:
        for layer in record.values():
            objective = layer["objective"]
            assert all(y <= x + 1e-9 * (1 + x) for x, y in zip(objective, objective[1:], strict=False))
            assert sum(layer["masses"]) == pytest.approx(TINY.rank)  # r components of weight p_k per client
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


def test_registry_and_rank_check_at_run(federation):
    assert METHODS["FedInc"] is FedInc and isinstance(make_strategy("FedInc", num_clusters=2), FedInc)
    with pytest.raises(ValueError, match="num_clusters = 5 exceeds the model's LoRA rank 4"):
        federation.run(FedInc(num_clusters=5), rounds=1, progress=False)
