"""Clustering (survey 4.3, eq. 16): FL-TAC's k-means and FedLEASE's B-cosine grouping recover planted groups."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedlora_edu.heterogeneity.clustering import (
    agglomerative,
    b_cosine_distances,
    choose_num_clusters,
    cluster_averages,
    flatten_adapters,
    kmeans,
    matched_accuracy,
    silhouette,
)

LAYERS = ("layer.4.query", "layer.5.value")


def planted(seed: int, groups: list[int], noise: float = 0.05, m: int = 8, n: int = 6, r: int = 2):
    """One adapter per client around its group's centre: clients of a group did the same task."""
    g = torch.Generator().manual_seed(seed)
    centres = {group: {name: (torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)) for name in LAYERS}
               for group in sorted(set(groups))}
    return [{name: (a + noise * torch.randn(a.shape, generator=g), b + noise * torch.randn(b.shape, generator=g))
             for name, (a, b) in centres[group].items()} for group in groups]


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_on_flattened_adapters_recovers_planted_tasks(seed):
    groups = [0, 1, 2, 0, 1, 2, 2, 0, 1]
    adapters = planted(seed, groups)
    points = flatten_adapters(adapters)
    assert points.shape == (9, 2 * (2 * 6 + 8 * 2))
    labels = kmeans(points, 3, seed=seed)
    assert matched_accuracy(labels, groups) == 1.0
    assert torch.equal(labels, kmeans(points, 3, seed=seed))  # deterministic for a seed
    assert labels.tolist()[:3] == [0, 1, 2]  # renumbered in order of first appearance


@pytest.mark.parametrize("seed", range(5))
def test_b_cosine_distances_and_average_linkage_recover_planted_tasks_and_their_number(seed):
    groups = [0, 0, 1, 1, 1, 2, 2, 3, 3, 0]
    adapters = planted(seed, groups, noise=0.1)
    distances = b_cosine_distances(adapters)
    assert distances.shape == (10, 10) and torch.allclose(distances, distances.T)
    assert float(distances.diagonal().abs().max()) == 0.0
    assert choose_num_clusters(distances) == 4
    assert matched_accuracy(agglomerative(distances, 4), groups) == 1.0


def test_b_cosine_distance_ignores_a_and_the_scale_of_b():
    (adapter,) = planted(0, [0])
    scaled = {name: (torch.randn_like(a), 3.0 * b) for name, (a, b) in adapter.items()}
    opposite = {name: (a, -b) for name, (a, b) in adapter.items()}
    distances = b_cosine_distances([adapter, scaled, opposite])
    assert distances[0, 1] == pytest.approx(0.0, abs=1e-12) and distances[0, 2] == pytest.approx(2.0)


def test_cluster_averages_renormalise_the_weights_within_each_cluster():
    adapters = planted(1, [0, 1, 0])
    weights, labels = [0.2, 0.5, 0.3], [0, 1, 0]
    averages = cluster_averages(adapters, weights, labels)
    for name in LAYERS:
        expected = (0.2 * adapters[0][name][0] + 0.3 * adapters[2][name][0]) / 0.5
        assert torch.allclose(averages[0][name][0], expected)
        assert torch.equal(averages[1][name][1], adapters[1][name][1])  # a cluster of one is that client
    with pytest.raises(ValueError, match="labels has 2 entries for 3 clients"):
        cluster_averages(adapters, weights, [0, 1])


def test_silhouette_and_matched_accuracy_on_small_cases():
    distances = torch.tensor([[0.0, 0.1, 1.0], [0.1, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert silhouette(distances, [0, 0, 1]) == pytest.approx((0.9 / 1.0 + 0.9 / 1.0 + 0.0) / 3)
    assert matched_accuracy([1, 1, 0], [0, 0, 1]) == 1.0  # the names of clusters do not matter
    assert matched_accuracy([0, 0, 0], [0, 1, 2]) == pytest.approx(1 / 3)


def test_bad_arguments_are_named():
    adapters = planted(0, [0, 1])
    with pytest.raises(ValueError, match="k must be an integer in 1..2"):
        kmeans(flatten_adapters(adapters), 3)
    with pytest.raises(ValueError, match="different sizes"):
        flatten_adapters([adapters[0], planted(0, [0], r=3)[0]])
    with pytest.raises(ValueError, match="at least 3 clients"):
        choose_num_clusters(b_cosine_distances(adapters))
    with pytest.raises(ValueError, match="adapts layers"):
        flatten_adapters([adapters[0], {"other": adapters[1][LAYERS[0]]}])


def test_fl_tac_sends_each_client_its_clusters_average(shards_federation):
    from helpers import recording

    from fedlora_edu.core.seeds import derive_seed
    from fedlora_edu.core.strategy import normalized_weights, split_factors
    from fedlora_edu.heterogeneity.clustering import FLTAC

    strategy = recording(FLTAC)(num_clusters=2)
    history = shards_federation.run(strategy, rounds=2, progress=False, evaluate_clients=True)
    names = list(shards_federation.last_server.adapters)
    first_uploads = strategy.rounds[0][1]
    uploaded = []
    for upload in first_uploads:
        a, b = split_factors(upload.payload, names)
        uploaded.append({n: (a[n], b[n]) for n in names})
    labels = kmeans(flatten_adapters(uploaded), 2, seed=derive_seed(0, "fl-tac k-means", 0))
    averages = cluster_averages(uploaded, normalized_weights(first_uploads), labels)
    assert len(set(labels.tolist())) == 2
    for upload, label in zip(first_uploads, labels.tolist(), strict=True):
        start = strategy.starts[1][upload.client_id]  # round 2 starts from the client's cluster adapter
        for n in names:
            assert torch.allclose(start.adapters[n][0], averages[label][n][0].to(start.adapters[n][0]))
            assert torch.allclose(start.adapters[n][1], averages[label][n][1].to(start.adapters[n][1]))
    state = shards_federation.last_server.method_state
    assert len(state.history) == 2 and set(state.history[0]) == {u.client_id for u in first_uploads}
    client = first_uploads[0].client_id
    personal, _ = strategy.personal_model(shards_federation.last_server, client, None)
    assert all(torch.equal(personal[n][0], state.assigned[client][n][0]) for n in names)
    assert history["client_accuracy"].notna().all()
    with pytest.raises(ValueError, match="num_clusters must be an integer >= 1"):
        FLTAC(num_clusters=0)


def test_fl_tac_with_one_cluster_is_fedit_and_a_variant_may_assign_the_clusters(shards_federation):
    from fedlora_edu.distributed.discordance import FedIT
    from fedlora_edu.heterogeneity.clustering import FLTAC

    one = shards_federation.run(FLTAC(num_clusters=1), rounds=2, progress=False, seed=2, evaluate_clients=True)
    fedit = shards_federation.run(FedIT(), rounds=2, progress=False, seed=2, evaluate_clients=True)
    columns = ["accuracy", "client_accuracy", "bytes_up", "bytes_down", "train_loss"]
    pd.testing.assert_frame_equal(one[columns], fedit[columns])

    class ByParity(FLTAC):
        """Clusters by the parity of the client's id, whatever the adapters say."""

        def assign(self, uploads, adapters, server, round_index):
            return [upload.client_id % 2 for upload in uploads]

    shards_federation.run(ByParity(num_clusters=2), rounds=2, progress=False, seed=2)
    for labels in shards_federation.last_server.method_state.history:
        assert all(label == client % 2 for client, label in labels.items())

    class Short(FLTAC):
        def assign(self, uploads, adapters, server, round_index):
            return [0]

    with pytest.raises(ValueError, match="assign gave 1 labels"):
        shards_federation.run(Short(num_clusters=2), rounds=1, progress=False)
