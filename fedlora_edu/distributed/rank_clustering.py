"""Rank clustering aggregation (survey section 3.1, eq. 8): FedInc.

FedInc (Huangsiyuan Qin and Ying Li, "FedInc: One-shot Federated Tuning for Collaborative
Incident Recognition", ICANN 2024, Springer LNCS, pp. 174-185, doi 10.1007/978-3-031-72347-6_12;
no arXiv version) treats one *rank component* of a LoRA adapter as the smallest unit of
aggregation. Component i of client k is the pair (row i of A_k, column i of B_k); concatenated
it is one vector

    z = [a, b] in R^(n + m),        C_k = [A_k, B_k^T] in R^(r_k x (n + m)),

and B_k A_k = sum_i b_i a_i^T is the sum of the rank-one products of its components. The
server pools the sum_k r_k vectors of the round's clients, clusters them into N clusters by
k-means (eq. 8, min sum_n sum_{z in Z_n} ||z - mu_n||^2) and turns the N centroids back into
a rank-N adapter: centroid n gives row n of A and column n of B.

The pure functions, then the strategy:

- :func:`rank_vectors`: the clients' components as vectors z with their clients' weights.
- :func:`weighted_kmeans`: k-means written out in torch (weighted k-means++ seeding, Lloyd
  iterations, empty clusters re-seeded), deterministic for a seed; weights all one is eq. 8.
- :func:`fedinc_clustering`, :func:`clusters_to_factors`, :func:`fedinc_aggregate`: eq. 8 end to end,
  ``(As, Bs, weights) -> (A, B)`` of rank N.
- :func:`cluster_residual`: ||B A - sum_k p_k B_k A_k||_F of the result.
- :class:`FedInc`: the strategy the simulator runs, one clustering per adapted layer.

Taught in ``book/part2/rank_clustering.ipynb``.

**Sources.** The paper's own text was not within reach (it is not in any corpus this
project could search, and Springer's page is paywalled); everything below rests on the
survey's description (arXiv 2505.13502, section 3.1, "Rank Clustering Aggregation", eq. 8):
FedInc takes "each rank of LoRA as the smallest semantic unit", merges A (r x n) and B
(m x r) into C in R^(r x (m + n)), collects the vectors {z_i}, i = 1..K r, from K clients,
clusters them into N clusters by eq. 8 (every vector counted once, no weights), and "the
final set of centroids {mu_n} is used as the aggregated parameters and can be further
decomposed into the newly updated matrices A and B with a new rank r = N".

**The default: eq. 8 as the survey prints it** (``weighted=False``). Every vector has
weight one (plain k-means; the clients' weights p_k do not enter), and centroid
mu_n = [a-bar_n, b-bar_n], the plain mean of its cluster, gives row n of A and column n of B
as it is, unscaled (a cluster left without members gives a zero component). What follows
from the text, checked by the unit tests:

1. N = sum_k r_k (every vector its own cluster) returns the clients' factors stacked,
   A = [A_1; ...; A_K] and B = [B_1, ..., B_K] up to the order of the components, so
   B A = sum_k B_k A_k: the *sum* of the clients' updates, not their average
   sum_k p_k B_k A_k (for K clients of equal weight, K times it).
2. Each cluster contributes the product of its mean component whatever its size: a
   component that all K clients share counts once (averaged), one that a single client
   found also counts once, at full strength. The survey form is a union of distinct
   components, not an average of updates.
3. If k-means groups the components by their index i (one per client, as happens when the
   clients stay close to a common start), the centroids are the clients' plain averages, and
   FedInc with N = r *is* FedIT with equal client weights, discordance included.
4. k-means does not know that (a, b) and (-a, -b), or (c a, b / c), give the same product: it
   clusters factors, not products.

**A variant of ours** (``weighted=True``; not in the survey). Each vector of client k carries
the weight p_k (weighted k-means: objective sum_j w_j ||z_j - mu_{c(j)}||^2, centroid the
weighted mean), and centroid n is scaled by the square root of its cluster's mass
W_n = sum_{j in Z_n} w_j on each factor, a_n = sqrt(W_n) a-bar_n, b_n = sqrt(W_n) b-bar_n, so
that the cluster stands for W_n b-bar_n a-bar_n^T. Then N = sum_k r_k gives exactly the
ideal update sum_k p_k B_k A_k (FLoRA's weighted stack), clustering by index gives FedIT with
the weights p_k, and inside a cluster the gap to its members' products is the weighted
covariance -sum_j w_j (b_j - b-bar)(a_j - a-bar)^T, the discordance of eq. 4 within the
cluster. With equal client weights and K vectors in every cluster (as when N = r and
k-means groups by index) the two forms give the same adapter.

**Choices where the survey leaves room**, stated where they are made:

5. *The k-means.* Weighted k-means++ seeding, Lloyd iterations until no assignment changes
   (at most ``iterations``, default 50), best of ``restarts`` seedings (default 5: eq. 8 asks
   for the minimum, and one seeding often lands in a poor local one), all from one seeded
   generator, so a seed fixes the result.
6. *Which layers.* Every adapted layer is clustered on its own (the survey does not say).
7. *The rank N in the simulator.* The model is built with LoRA rank r (the profile's, or
   ``rank``); the global adapter must fit it, so ``num_clusters`` must be at most r
   (default r). With N < r the global adapter and every client's training use rank N from
   round 1 on. A larger N (up to sum_k r_k) is studied with the pure function.
8. *Rounds.* The paper is one-shot (one round of collaboration, by its title); the strategy
   clusters every round, as the survey presents the method among multi-round aggregators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora_edu.core.checks import check_factors, check_ranks, check_weights
from fedlora_edu.core.factors import ideal_update
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import ServerState, Strategy, Upload, collect_factors
from fedlora_edu.core.threads import one_thread

DEFAULT_ITERATIONS = 50
"""Lloyd iterations at most; k-means stops earlier when no assignment changes."""
DEFAULT_RESTARTS = 5
"""k-means runs from this many k-means++ seedings and keeps the lowest objective (eq. 8 asks for the minimum)."""


# ----------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------
def rank_vectors(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """The clients' rank components as vectors z = [a, b] (eq. 8, left): ``(Z, w, owner)``.

    ``Z`` is (sum_k r_k) x (n + m): row j is row i of A_k followed by column i of B_k, the
    clients in order, then i = 0..r_k - 1 (C_k = [A_k, B_k^T] stacked). ``w[j]`` is p_k of
    the client it came from and ``owner[j]`` that client's index k. Clients may have
    different ranks r_k.
    """
    check_factors(As, Bs)
    p = check_weights(weights, len(As))
    Z = torch.cat([torch.cat([a, b.T], dim=1) for a, b in zip(As, Bs, strict=True)], dim=0)
    w = torch.cat([torch.full((a.shape[0],), p_k, dtype=torch.float64) for a, p_k in zip(As, p, strict=True)])
    owner = torch.cat([torch.full((a.shape[0],), k, dtype=torch.long) for k, a in enumerate(As)])
    return Z, w, owner


@dataclass
class Clustering:
    """The result of :func:`weighted_kmeans` on M weighted vectors.

    ``centroids`` (N x d, the weighted mean of each cluster; an empty cluster keeps its
    last position), ``assignment`` (M cluster indices), ``masses`` (N: the total weight of
    each cluster), ``objective`` (the weighted k-means objective sum_j w_j ||z_j -
    mu_{c(j)}||^2 after the seeding's assignment and after every Lloyd iteration's centroid
    update), the number of Lloyd ``iterations`` run, and whether the assignment ``converged``
    (every vector at its nearest centroid, every centroid its cluster's weighted mean).
    """

    centroids: Tensor
    assignment: Tensor
    masses: Tensor
    objective: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False


def _check_count(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _squared_distances(Z: Tensor, centroids: Tensor) -> Tensor:
    """M x N squared Euclidean distances (float64, clamped at zero against rounding)."""
    return (Z.square().sum(1, keepdim=True) - 2.0 * Z @ centroids.T + centroids.square().sum(1)[None, :]).clamp_min(0)


def _objective(Z: Tensor, w: Tensor, centroids: Tensor, assignment: Tensor) -> float:
    return float((w * (Z - centroids[assignment]).square().sum(1)).sum())


def _kmeans_plus_plus(Z: Tensor, w: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """Weighted k-means++ seeding (Arthur and Vassilvitskii 2007): each new centre drawn with
    probability proportional to w_j D(z_j)^2, D the distance to the nearest centre so far."""
    chosen = [int(torch.multinomial(w / w.sum(), 1, generator=generator))]
    nearest = (Z - Z[chosen[0]]).square().sum(1)
    for _ in range(1, num_clusters):
        mass = w * nearest
        if float(mass.sum()) > 0:
            j = int(torch.multinomial(mass / mass.sum(), 1, generator=generator))
        else:  # fewer distinct points (with weight) than clusters: any unused index, lowest first
            unused = [i for i in range(Z.shape[0]) if i not in chosen]
            j = unused[0]
        chosen.append(j)
        nearest = torch.minimum(nearest, (Z - Z[j]).square().sum(1))
    return Z[chosen].clone()


def weighted_kmeans(
    Z: Tensor, weights: Tensor | Sequence[float], num_clusters: int, *, seed: int = 0,
    iterations: int = DEFAULT_ITERATIONS, restarts: int = 1,
) -> Clustering:
    """Weighted k-means of the rows of ``Z`` into ``num_clusters`` clusters (survey eq. 8).

    Minimises sum_j w_j ||z_j - mu_{c(j)}||^2 by Lloyd's algorithm: weighted k-means++
    seeding from a generator seeded with ``seed``, then at most ``iterations`` rounds of
    (assign every vector to its nearest centroid, move every centroid to its cluster's
    weighted mean), stopping when no assignment changes. Ties go to the lower cluster
    index. A cluster left with no mass takes the vector farthest from its centroid (among
    clusters of more than one vector), which lowers the objective; if every vector already
    sits on its centroid the cluster stays empty (mass 0). Each step can only lower the
    objective, so ``objective`` never increases. With ``restarts`` > 1 the whole procedure
    runs from that many seedings (drawn one after another from the same generator) and the
    run with the lowest final objective is kept (the first on ties), the usual guard against
    a bad seeding. Computed in float64; the same ``seed`` gives the same clustering. With all
    weights equal it is the plain k-means of eq. 8.
    """
    if not isinstance(Z, Tensor) or Z.ndim != 2:
        raise ValueError(f"Z must be a matrix of vectors (M x d), got {getattr(Z, 'shape', type(Z).__name__)}")
    if Z.shape[0] == 0:
        raise ValueError("Z has no vectors to cluster")
    _check_count("num_clusters", num_clusters, 1, Z.shape[0])
    _check_count("iterations", iterations, 0)
    _check_count("seed", seed, 0)
    _check_count("restarts", restarts, 1)
    points = Z.detach().to("cpu", torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).cpu()
    if w.shape[0] != points.shape[0]:
        raise ValueError(f"weights has {w.shape[0]} entries for {points.shape[0]} vectors")
    if not bool(torch.isfinite(points).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError("Z and weights must be finite")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")

    generator = torch.Generator().manual_seed(seed)
    best: Clustering | None = None
    with one_thread():
        for _ in range(restarts):
            result = _lloyd(points, w, _kmeans_plus_plus(points, w, num_clusters, generator), iterations)
            if best is None or result.objective[-1] < best.objective[-1]:
                best = result
    return best  # type: ignore[return-value]


def _lloyd(points: Tensor, w: Tensor, centroids: Tensor, iterations: int) -> Clustering:
    """Lloyd iterations from the given centroids (see :func:`weighted_kmeans`)."""
    num_clusters = centroids.shape[0]
    assignment = _squared_distances(points, centroids).argmin(1)
    history = [_objective(points, w, centroids, assignment)]
    done, converged = 0, False
    while done < iterations:
        done += 1
        assignment = _reseed_empty(points, w, centroids, assignment, num_clusters)
        masses = torch.zeros(num_clusters, dtype=torch.float64).index_add_(0, assignment, w)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, w[:, None] * points)
        filled = masses > 0
        centroids[filled] = sums[filled] / masses[filled, None]
        history.append(_objective(points, w, centroids, assignment))
        distances = _squared_distances(points, centroids)
        # A vector moves only to a strictly closer centroid: no churn on ties.
        current = distances.gather(1, assignment[:, None])[:, 0]
        nearest = distances.argmin(1)
        moved = torch.where(distances.gather(1, nearest[:, None])[:, 0] < current, nearest, assignment)
        converged = torch.equal(moved, assignment)
        if converged or done == iterations:  # stop with centroids that are the means of the assignment
            break
        assignment = moved
    masses = torch.zeros(num_clusters, dtype=torch.float64).index_add_(0, assignment, w)
    return Clustering(centroids, assignment, masses, history, done, converged)


def _reseed_empty(points: Tensor, w: Tensor, centroids: Tensor, assignment: Tensor, num_clusters: int) -> Tensor:
    """Give every cluster without mass the weighted vector farthest from its centroid."""
    masses = torch.zeros(num_clusters, dtype=torch.float64).index_add_(0, assignment, w)
    empty = (masses <= 0).nonzero().flatten().tolist()
    if not empty:
        return assignment
    assignment = assignment.clone()
    for cluster in empty:
        counts = torch.bincount(assignment, minlength=num_clusters)
        cost = w * (points - centroids[assignment]).square().sum(1)
        movable = (counts[assignment] > 1) & (w > 0) & (cost > 0)
        if not bool(movable.any()):
            continue
        j = int(torch.where(movable, cost, torch.full_like(cost, -1.0)).argmax())
        centroids[cluster] = points[j]
        assignment[j] = cluster
    return assignment


def clusters_to_factors(clustering: Clustering, n: int, *, weighted: bool = False) -> tuple[Tensor, Tensor]:
    """The rank-N adapter of the centroids: (A, B), row n of A and column n of B from centroid n.

    ``weighted=False`` (the survey's eq. 8, see the module docstring): the centroid as it is,
    a_n = a-bar_n and b_n = b-bar_n; a cluster without members gives a zero component.
    ``weighted=True`` (our variant): each factor scaled by the square root of the cluster's
    mass W_n, a_n = sqrt(W_n) a-bar_n and b_n = sqrt(W_n) b-bar_n, so that the component is
    W_n b-bar_n a-bar_n^T (mass 0 gives zero). ``n`` is the width of A (the first n entries
    of a vector z are its a part).
    """
    if weighted:
        factor = clustering.masses.clamp_min(0).sqrt()
    else:
        factor = (clustering.masses > 0).to(clustering.centroids.dtype)
    scaled = factor[:, None] * clustering.centroids
    return scaled[:, :n].clone(), scaled[:, n:].T.clone()


def fedinc_clustering(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], num_clusters: int,
    seed: int = 0, iterations: int = DEFAULT_ITERATIONS, restarts: int = DEFAULT_RESTARTS,
    *, weighted: bool = False,
) -> Clustering:
    """The k-means of survey eq. 8 over the clients' rank components: the step before the centroids become factors.

    The clients' sum_k r_k vectors z = [a, b] (:func:`rank_vectors`) are clustered into
    ``num_clusters`` = N clusters by k-means (:func:`weighted_kmeans`, best of ``restarts``
    seedings); ``weighted=False`` counts every vector once (eq. 8), ``weighted=True`` gives
    client k's vectors the weight p_k (our variant, see the module docstring).
    """
    if not isinstance(weighted, bool):
        raise ValueError(f"weighted must be True or False, got {weighted!r}")
    Z, w, _ = rank_vectors(As, Bs, weights)
    total = Z.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= total:
        raise ValueError(f"num_clusters must be an integer in 1..{total} (the clients' total rank), "
                         f"got {num_clusters!r}")
    return weighted_kmeans(Z, w if weighted else torch.ones_like(w), num_clusters, seed=seed,
                           iterations=iterations, restarts=restarts)


def fedinc_aggregate(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], num_clusters: int,
    seed: int = 0, iterations: int = DEFAULT_ITERATIONS, restarts: int = DEFAULT_RESTARTS,
    *, weighted: bool = False,
) -> tuple[Tensor, Tensor]:
    """FedInc (Qin and Li 2024), survey eq. 8: cluster the rank components, centroids become the adapter.

    :func:`fedinc_clustering` clusters the clients' rank components into ``num_clusters`` = N
    clusters and centroid n gives row n of A (N x n) and column n of B (m x N)
    (:func:`clusters_to_factors`). Returns (A, B) in the dtype and device of the inputs.

    ``weighted=False`` (default) is eq. 8 as the survey prints it: every vector counts once,
    the weights p_k are not used, and the centroids are the factors as they are. With
    N = sum_k r_k it returns the clients' stacked factors, B A = sum_k B_k A_k (the sum of
    the updates). ``weighted=True`` is our variant: vectors of client k weigh p_k and each
    centroid is scaled by the square root of its cluster's mass; with N = sum_k r_k,
    B A = sum_k p_k B_k A_k exactly. With fewer clusters each cluster contributes the product
    of its mean vector, not the mean of its products (module docstring, :func:`cluster_residual`).
    """
    clustering = fedinc_clustering(As, Bs, weights, num_clusters, seed, iterations, restarts, weighted=weighted)
    a, b = clusters_to_factors(clustering, As[0].shape[1], weighted=weighted)
    return a.to(As[0]), b.to(Bs[0])


def cluster_residual(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], A: Tensor, B: Tensor
) -> float:
    """||B A - sum_k p_k B_k A_k||_F: how far an aggregated adapter is from the ideal update (eq. 4, right)."""
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must be r x n and m x r")
    ideal = ideal_update(As, Bs, weights)
    if (B.shape[0], A.shape[1]) != tuple(ideal.shape):
        raise ValueError(f"B A is {B.shape[0]} x {A.shape[1]} but the clients' updates are {tuple(ideal.shape)}")
    return float(torch.linalg.matrix_norm(B.to(ideal) @ A.to(ideal) - ideal))


# ----------------------------------------------------------------------------------------
# Strategy
# ----------------------------------------------------------------------------------------
def round_seed(seed: int, round_index: int) -> int:
    """The k-means seed of round ``round_index`` of a run with ``seed`` (a pure function of both)."""
    return derive_seed(seed, "FedInc k-means", round_index)


class FedInc(Strategy):
    """FedInc (Qin and Li 2024, ICANN): rank clustering aggregation, survey section 3.1, eq. 8.

    Clients train and send A and B as in FedIT. For every adapted layer the server pools the
    round's rank components [a, b], clusters them into ``num_clusters`` = N clusters by
    k-means (:func:`fedinc_aggregate`, seeded per round from the run's seed) and broadcasts
    the rank-N adapter of the centroids, which every client trains in the next round. Bytes
    up and down are FedIT's at rank N. ``weighted=False`` (default) is eq. 8 as the survey
    prints it (plain k-means, centroids unscaled); ``weighted=True`` is our variant (weights
    p_k, centroids scaled by the square root of their cluster's mass), see the module docstring.

    ``num_clusters`` defaults to the model's LoRA rank r and must not exceed it (the global
    adapter has to fit the model the simulator builds); with N < r every round, from the
    first, trains rank N. ``iterations`` bounds the Lloyd iterations and ``restarts`` is the
    number of k-means++ seedings tried (the lowest objective is kept). The paper is one-shot
    (a single round); the simulator runs it every round, as the survey presents it. Each
    round's k-means objective and cluster masses (member counts when unweighted) are kept in
    ``server.method_state.records``. Taught in ``book/part2/rank_clustering.ipynb``.

    ``ranks`` gives client k a rank r_k of its own (survey section 4.1 names FedInc among the
    aggregations that take heterogeneous ranks): client k downloads and trains the first r_k of
    the N centroid components (all N if r_k >= N), and the server clusters whatever mix of
    components arrives, as it always does. The model is then built at the largest r_k, and N
    defaults to it. Run so in ``book/part3/heterogeneous_ranks.ipynb``.
    """

    name = "FedInc"
    paper = "Qin and Li 2024, ICANN"
    chapter = "book/part2/rank_clustering"

    @dataclass
    class State:
        """N, the number of clusters (the global rank), and per round each layer's k-means record."""

        clusters: int = 0
        records: list[dict[str, dict]] = field(default_factory=list)

    def __init__(self, rank: int | None = None, num_clusters: int | None = None,
                 iterations: int = DEFAULT_ITERATIONS, restarts: int = DEFAULT_RESTARTS,
                 weighted: bool = False, ranks: Sequence[int] | None = None) -> None:
        super().__init__(rank)
        self.ranks = None if ranks is None else check_ranks(ranks, len(ranks))
        if num_clusters is not None:
            _check_count("num_clusters", num_clusters, 1, rank)
        if not isinstance(weighted, bool):
            raise ValueError(f"weighted must be True or False, got {weighted!r}")
        self.num_clusters = num_clusters
        self.iterations = _check_count("iterations", iterations, 1)
        self.restarts = _check_count("restarts", restarts, 1)
        self.weighted = weighted

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return self.ranks[client_id] if self.ranks is not None else super().client_rank(client_id, server)

    def max_rank(self, num_clients: int) -> int | None:
        return max(self.ranks) if self.ranks is not None else self.rank

    def prepare(self, federation: object, model: torch.nn.Module, server: ServerState, seed: int) -> None:
        if self.ranks is not None and len(self.ranks) != federation.num_clients:
            raise ValueError(f"ranks has {len(self.ranks)} entries for a federation of "
                             f"{federation.num_clients} clients")

    def init_server(self, server: ServerState, seed: int) -> None:
        clusters = server.rank if self.num_clusters is None else self.num_clusters
        if clusters > server.rank:
            raise ValueError(f"num_clusters = {clusters} exceeds the model's LoRA rank {server.rank}: the "
                             "rank-N adapter of the centroids must fit the model")
        server.method_state.clusters = clusters
        server.adapters = {name: (a[:clusters].clone(), b[:, :clusters].clone())
                           for name, (a, b) in server.adapters.items()}

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads)
        clusters = server.method_state.clusters
        seed = round_seed(server.seed, round_index)
        adapters, record = {}, {}
        for name, (a_list, b_list) in per_layer.items():
            total_rank = sum(a.shape[0] for a in a_list)
            clustering = fedinc_clustering(a_list, b_list, weights, min(clusters, total_rank), seed, self.iterations,
                                           self.restarts, weighted=self.weighted)
            a, b = clusters_to_factors(clustering, a_list[0].shape[1], weighted=self.weighted)
            adapters[name] = (a.to(a_list[0]), b.to(b_list[0]))
            record[name] = {"objective": clustering.objective, "masses": clustering.masses.tolist(),
                            "iterations": clustering.iterations, "converged": clustering.converged}
        server.adapters = adapters
        server.method_state.records.append(record)
        self.aggregate_head(server, uploads)
