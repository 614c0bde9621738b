"""Clustering (survey section 4.3, eq. 16): group the clients by their adapters, aggregate within each group.

When clients hold different tasks or languages, one global adapter averages away what each group
needs. Clustering methods find the groups and keep one adapter per group (survey eq. 16: the
objective sums each cluster's clients' losses under that cluster's adapter). The server sees
only the uploaded adapters, never the clients' task labels, so the groups are found from the
adapters themselves:

- FL-TAC (Ping et al. 2024, arXiv 2404.15384): every uploaded adapter flattened to one vector,
  k-means with k the number of tasks (:func:`flatten_adapters`, :func:`kmeans`), then a
  sample-size-weighted average within each cluster (:func:`cluster_averages`); each client gets
  its cluster's adapter back. As in the authors' code (siqi2000/FL-TAC, commit 5c0e1949,
  ``fltac/server.py``: scikit-learn's KMeans with ``n_init=10``), the best of ten k-means++
  starts; ours is written here in torch, so its draws differ from scikit-learn's.
- FedLEASE (Wang et al. 2025, NeurIPS, arXiv 2509.15087): the distance between two clients is
  the mean over layers of 1 - cos(B_i, B_j), B matrices only (:func:`b_cosine_distances`),
  grouped by agglomerative clustering (:func:`agglomerative`) with the number of clusters chosen
  automatically. The summaries we could read do not say the linkage or the rule that picks the
  number; ours are average linkage and the largest mean silhouette (:func:`choose_num_clusters`).

:func:`matched_accuracy` scores a clustering against planted groups (the best one-to-one
matching of clusters to groups), which is how a chapter asks whether clustering recovered the
tasks it was built to have. :class:`FLTAC` runs FL-TAC in the simulator.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.checks import check_weights
from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import (
    ClientStart,
    Payload,
    ServerState,
    Strategy,
    Upload,
    collect_factors,
)


def _check_count(value: object, name: str, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{name} must be an integer in 1..{most}, got {value!r}")
    return value


def flatten_adapters(adapters: Sequence[Mapping[str, Factors]]) -> Tensor:
    """One row per client: every layer's A and B (layers in name order) flattened and concatenated, float64."""
    if len(adapters) == 0:
        raise ValueError("adapters is empty: need at least one client")
    names = sorted(adapters[0])
    rows = []
    for k, adapter in enumerate(adapters):
        if sorted(adapter) != names:
            raise ValueError(f"client {k} adapts layers {sorted(adapter)}, client 0 adapts {names}")
        rows.append(torch.cat([t.detach().reshape(-1).double().cpu() for name in names for t in adapter[name]]))
    sizes = {row.numel() for row in rows}
    if len(sizes) != 1:
        raise ValueError(f"the clients' adapters have different sizes {sorted(sizes)}: clustering needs one rank")
    return torch.stack(rows)


def _kmeans_once(points: Tensor, k: int, generator: torch.Generator, iterations: int) -> tuple[Tensor, float]:
    """Lloyd's algorithm from a k-means++ start; (labels, within-cluster sum of squares)."""
    count = points.shape[0]
    centers = [points[int(torch.randint(count, (1,), generator=generator))]]
    for _ in range(1, k):
        distance = torch.cdist(points, torch.stack(centers)).min(dim=1).values ** 2
        if float(distance.sum()) == 0.0:  # fewer distinct points than clusters: repeat one
            centers.append(points[int(torch.randint(count, (1,), generator=generator))])
            continue
        centers.append(points[int(torch.multinomial(distance / distance.sum(), 1, generator=generator))])
    center = torch.stack(centers)
    labels = torch.full((count,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(points, center).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = points[labels == j]
            if len(members):
                center[j] = members.mean(dim=0)
    inertia = float(((points - center[labels]) ** 2).sum())
    return labels, inertia


def kmeans(points: Tensor, k: int, *, seed: int = 0, starts: int = 10, iterations: int = 300) -> Tensor:
    """k-means labels (0..k-1) of the rows of ``points``: the best of ``starts`` k-means++ starts (least inertia).

    Labels are renumbered in order of first appearance, so the same partition always gets the
    same labels.
    """
    if points.ndim != 2:
        raise ValueError(f"points must be a matrix (one row per client), got shape {tuple(points.shape)}")
    k = _check_count(k, "k", points.shape[0])
    starts = _check_count(starts, "starts", 10_000)
    generator = torch.Generator().manual_seed(seed)
    best = min((_kmeans_once(points.double(), k, generator, iterations) for _ in range(starts)), key=lambda r: r[1])
    return _first_appearance(best[0])


def _first_appearance(labels: Tensor) -> Tensor:
    order = {}
    for label in labels.tolist():
        order.setdefault(label, len(order))
    return torch.tensor([order[label] for label in labels.tolist()], dtype=torch.long)


def cluster_averages(adapters: Sequence[Mapping[str, Factors]], weights: Sequence[float],
                     labels: Sequence[int] | Tensor) -> dict[int, dict[str, Factors]]:
    """Per cluster, the weighted average of its clients' A and of their B, weights p_k renormalised within it.

    ``weights`` are the clients' p_k (summing to one over all clients); within cluster c the
    average uses p_k / sum_{j in c} p_j.
    """
    p = check_weights(weights, len(adapters))
    labels = [int(label) for label in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    if len(labels) != len(adapters):
        raise ValueError(f"labels has {len(labels)} entries for {len(adapters)} clients")
    out: dict[int, dict[str, Factors]] = {}
    for cluster in sorted(set(labels)):
        members = [k for k, label in enumerate(labels) if label == cluster]
        mass = sum(p[k] for k in members)
        share = [p[k] / mass if mass > 0 else 1.0 / len(members) for k in members]
        out[cluster] = {
            name: fedit_average([adapters[k][name][0] for k in members], [adapters[k][name][1] for k in members], share)
            for name in adapters[members[0]]
        }
    return out


def b_cosine_distances(adapters: Sequence[Mapping[str, Factors]]) -> Tensor:
    """FedLEASE's client distance: d(i, j) = mean over layers of 1 - cos(B_i, B_j), each B flattened (K x K)."""
    if len(adapters) == 0:
        raise ValueError("adapters is empty: need at least one client")
    names = sorted(adapters[0])
    per_layer = []
    for name in names:
        flat = torch.stack([adapter[name][1].detach().reshape(-1).double().cpu() for adapter in adapters])
        unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
        per_layer.append(1.0 - unit @ unit.T)
    distances = torch.stack(per_layer).mean(dim=0)
    distances.fill_diagonal_(0.0)
    return distances.clamp(min=0.0)


def agglomerative(distances: Tensor, num_clusters: int) -> Tensor:
    """Average-linkage agglomerative clustering of a K x K distance matrix into ``num_clusters`` groups.

    Starts from one cluster per client and repeatedly merges the two clusters with the smallest
    mean pairwise distance. Labels in order of first appearance.
    """
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be a square matrix, got shape {tuple(distances.shape)}")
    count = distances.shape[0]
    num_clusters = _check_count(num_clusters, "num_clusters", count)
    clusters = [[k] for k in range(count)]
    while len(clusters) > num_clusters:
        best, pair = None, (0, 1)
        for i, j in itertools.combinations(range(len(clusters)), 2):
            linkage = float(distances[clusters[i]][:, clusters[j]].mean())
            if best is None or linkage < best:
                best, pair = linkage, (i, j)
        i, j = pair
        clusters[i] = clusters[i] + clusters[j]
        del clusters[j]
    labels = torch.empty(count, dtype=torch.long)
    for index, members in enumerate(clusters):
        labels[members] = index
    return _first_appearance(labels)


def silhouette(distances: Tensor, labels: Sequence[int] | Tensor) -> float:
    """Mean silhouette of a clustering from its distance matrix (0 for a client alone in its cluster)."""
    labels = torch.as_tensor(labels)
    scores = []
    for k in range(len(labels)):
        same = (labels == labels[k]).nonzero().flatten()
        same = same[same != k]
        if len(same) == 0:
            scores.append(0.0)
            continue
        inside = float(distances[k, same].mean())
        outside = min(float(distances[k, labels == other].mean()) for other in set(labels.tolist())
                      if other != int(labels[k]))
        scores.append((outside - inside) / max(inside, outside) if max(inside, outside) > 0 else 0.0)
    return float(sum(scores) / len(scores))


def choose_num_clusters(distances: Tensor, most: int | None = None) -> int:
    """The number of clusters (2..most, default K - 1) whose average-linkage clustering has the largest silhouette."""
    count = distances.shape[0]
    if count < 3:
        raise ValueError(f"choosing a number of clusters needs at least 3 clients, got {count}")
    most = count - 1 if most is None else _check_count(most, "most", count - 1)
    if most < 2:
        raise ValueError(f"most must be at least 2, got {most}")
    return max(range(2, most + 1), key=lambda c: silhouette(distances, agglomerative(distances, c)))


def matched_accuracy(labels: Sequence[int] | Tensor, groups: Sequence[int] | Tensor) -> float:
    """The share of clients whose cluster matches their planted group, under the best one-to-one matching."""
    labels = [int(v) for v in torch.as_tensor(labels).tolist()]
    groups = [int(v) for v in torch.as_tensor(groups).tolist()]
    if len(labels) != len(groups) or not labels:
        raise ValueError(f"labels ({len(labels)}) and groups ({len(groups)}) must be equally long and not empty")
    clusters, truth = sorted(set(labels)), sorted(set(groups))
    if len(clusters) > 8 or len(truth) > 8:
        raise ValueError("matched_accuracy tries every matching: at most 8 clusters and 8 groups")
    slots = truth + [None] * max(0, len(clusters) - len(truth))
    best = 0
    for assignment in itertools.permutations(slots, len(clusters)):
        mapping = dict(zip(clusters, assignment, strict=True))
        best = max(best, sum(mapping[label] == group for label, group in zip(labels, groups, strict=True)))
    return best / len(labels)


# ----------------------------------------------------------------------------------------
# FL-TAC as a strategy of the simulator
# ----------------------------------------------------------------------------------------
def _like_server(adapter: Mapping[str, Factors], server: ServerState) -> dict[str, Factors]:
    """``adapter`` on the device and in the dtype of the server's adapter, layer by layer."""
    return {n: (a.to(server.adapters[n][0]), b.to(server.adapters[n][1])) for n, (a, b) in adapter.items()}


class FLTAC(Strategy):
    """FL-TAC (Ping, Mao, Liu, Zhang, Ding 2024, arXiv 2404.15384): one adapter per task, found by k-means.

    Every round the server flattens the uploaded adapters (:func:`flatten_adapters`), groups
    them by k-means with ``num_clusters`` clusters (the number of tasks; the best of ten
    k-means++ starts, seeded from the run's seed and the round), averages each cluster with the
    clients' weights renormalised within it (:func:`cluster_averages`), and sends each client
    of the round its cluster's adapter back: that is where the client starts its next round,
    and its personal model (:meth:`personal_model`). The server never sees task labels.

    As in the authors' code (siqi2000/FL-TAC@5c0e1949, ``fltac/server.py``), clustering is over
    the adapters received in the round. Our choices: a round with fewer uploads than clusters
    uses as many clusters as uploads; a client that has not taken part yet starts from the
    server's adapter; and the server's own adapter, which the shared test set evaluates, is
    the weighted average of all the round's uploads (FedIT's), since FL-TAC's clients each
    hold their own task and the paper serves no single global model.
    """

    name = "FL-TAC"
    paper = "Ping et al. 2024, arXiv 2404.15384"
    chapter = "book/part3/clustering"

    @dataclass
    class State:
        """Each client's cluster adapter and cluster label from its last round, and every round's labels."""

        assigned: dict[int, dict[str, Factors]] = field(default_factory=dict)
        cluster_of: dict[int, int] = field(default_factory=dict)
        history: list[dict[int, int]] = field(default_factory=list)

    def __init__(self, num_clusters: int = 2, *, starts: int = 10) -> None:
        super().__init__(None)
        if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
            raise ValueError(f"num_clusters must be an integer >= 1, got {num_clusters!r}")
        self.num_clusters = num_clusters
        self.kmeans_starts = _check_count(starts, "starts", 10_000)

    def _start_adapters(self, server: ServerState, client_id: int) -> dict[str, Factors]:
        own = server.method_state.assigned.get(client_id)
        source = own if own is not None else server.adapters
        return {name: (a.clone(), b.clone()) for name, (a, b) in source.items()}

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        start.adapters = self._start_adapters(server, client_id)
        tensors = {f"{n}.A": a for n, (a, _) in start.adapters.items()}
        tensors.update({f"{n}.B": b for n, (_, b) in start.adapters.items()})
        tensors.update({f"head.{k}": v for k, v in server.head.items()})
        start.download = Payload(tensors)
        return start

    def assign(self, uploads: list[Upload], adapters: list[dict[str, Factors]], server: ServerState,
               round_index: int) -> list[int]:
        """The cluster of each of the round's uploads (``adapters[i]`` is upload i's, layer by layer): k-means
        over the flattened adapters with ``num_clusters`` clusters, or as many as there are uploads if fewer.
        The one step a variant changes (a chapter's oracle assigns the planted groups instead)."""
        k = min(self.num_clusters, len(uploads))
        return kmeans(flatten_adapters(adapters), k, seed=derive_seed(server.seed, "fl-tac k-means", round_index),
                      starts=self.kmeans_starts).tolist()

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads, require_both=True)
        uploaded = [{n: (As[k], Bs[k]) for n, (As, Bs) in per_layer.items()} for k in range(len(uploads))]
        labels = [int(label) for label in self.assign(uploads, uploaded, server, round_index)]
        if len(labels) != len(uploads):
            raise ValueError(f"assign gave {len(labels)} labels for {len(uploads)} uploads")
        averages = cluster_averages(uploaded, weights, labels)
        state = server.method_state
        for upload, label in zip(uploads, labels, strict=True):
            state.assigned[upload.client_id] = _like_server(averages[label], server)
            state.cluster_of[upload.client_id] = label
        state.history.append({upload.client_id: label for upload, label in zip(uploads, labels, strict=True)})
        # the server's own adapter: every upload in one cluster, which is FedIT's average
        server.adapters = _like_server(cluster_averages(uploaded, weights, [0] * len(uploads))[0], server)
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """The client's cluster adapter (None, the server's adapter, before it ever took part)."""
        if client_id not in server.method_state.assigned:
            return None
        return self._start_adapters(server, client_id), {k: v.clone() for k, v in server.head.items()}
