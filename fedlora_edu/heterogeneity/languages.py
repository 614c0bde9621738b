"""Clusters known in advance (survey section 4.3, eq. 16): clients grouped by language, or placed in a language tree.

In a multilingual federation the server may know each client's language (a client declares it,
or it is the deployment's): the assignment of eq. 16 is then given rather than searched, and
what remains is how to aggregate. :class:`FedLFC` keeps one adapter per language family;
:class:`FedHLT` keeps one per node of a language tree and serves each client a combination along
its path. Both build on FL-TAC's cluster averages (:mod:`.clustering`). The federation they are
made for is :func:`fedlora_edu.federations.build_multilingual` (ParlSpeech samples in four
languages, with :data:`fedlora_edu.federations.LANGUAGE_TREE`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.strategy import ClientStart, Payload, ServerState, Strategy, Upload, collect_factors
from fedlora_edu.heterogeneity.clustering import _like_server, cluster_averages


def _check_groups(groups: Sequence[object], label: str) -> list:
    groups = list(groups)
    if not groups:
        raise ValueError(f"{label} is empty: give one entry per client")
    return groups


class FedLFC(Strategy):
    """FedLFC (Guo et al. 2024, Findings of NAACL): one adapter per language family, averaged within it.

    Survey eq. 16 with the assignment alpha_{k,n} given, not searched: the clients of a
    multilingual federation are grouped by the family of their language, and the server keeps one
    adapter per group. Each round, every group with uploads gets the weighted average of its
    clients' adapters (A and B each, the weights p_k renormalised within the group, as
    :func:`cluster_averages` does); a client starts from, and is served, its group's adapter.
    ``groups[k]`` is client k's group (for instance ``[language_path(l)[1] for l in
    federation.client_languages]`` with :func:`fedlora_edu.federations.language_path`).

    What is known of the paper (``METHOD_SOURCES.md``: the abstract; its code was not readable
    offline): LoRA-only federated fine-tuning, LoRA modules aggregated within language-family
    clusters. Our choices: a group that has not had an upload yet serves the server's adapter;
    the server's own adapter, which the shared test set evaluates, is the weighted average of
    all the round's uploads (FedIT's), since no single global model is served; the head is
    shared and averaged as FedIT's (on the testbed it is the frozen probe).
    """

    name = "FedLFC"
    paper = "Guo et al. 2024, Findings of NAACL"
    chapter = "book/part3/languages"

    @dataclass
    class State:
        """Each group's adapter (from the last round with an upload of that group)."""

        adapters: dict[object, dict[str, Factors]] = field(default_factory=dict)

    federation_attribute = "client_families"
    """Where :meth:`prepare` finds the groups when none were given (set by ``build_multilingual``)."""

    def __init__(self, groups: Sequence[object] | None = None) -> None:
        super().__init__(None)
        self.given = None if groups is None else _check_groups(groups, "groups")
        self.groups = self.given

    def prepare(self, federation: Any, model: Any, server: ServerState, seed: int) -> None:
        groups = self.given if self.given is not None else getattr(federation, self.federation_attribute, None)
        if groups is None:
            raise ValueError(f"{self.name} needs each client's group: pass groups= (paths= for FedHLT), or run it on a "
                             f"federation that names them (fedlora_edu.federations.build_multilingual sets "
                             f"{self.federation_attribute})")
        self.set_groups(list(groups))
        if len(self.groups) != len(federation.clients):
            raise ValueError(f"groups names {len(self.groups)} clients, the federation has {len(federation.clients)}")

    def set_groups(self, groups: list) -> None:
        """Client k's group is ``groups[k]``."""
        self.groups = _check_groups(groups, "groups")

    def served(self, server: ServerState, client_id: int) -> dict[str, Factors] | None:
        """Client k's adapter: its group's, or None before the group's first upload."""
        return server.method_state.adapters.get(self.groups[client_id])

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        own = self.served(server, client_id)
        start.adapters = {n: (a.clone(), b.clone()) for n, (a, b) in (own or server.adapters).items()}
        tensors = {f"{n}.A": a for n, (a, _) in start.adapters.items()}
        tensors.update({f"{n}.B": b for n, (_, b) in start.adapters.items()})
        tensors.update({f"head.{k}": v for k, v in server.head.items()})
        start.download = Payload(tensors)
        return start

    def _uploaded(self, server: ServerState, uploads: list[Upload]) -> tuple[list[float], list[dict[str, Factors]]]:
        weights, per_layer = collect_factors(server, uploads, require_both=True)
        return weights, [{n: (As[k], Bs[k]) for n, (As, Bs) in per_layer.items()} for k in range(len(uploads))]

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, uploaded = self._uploaded(server, uploads)
        names = sorted(set(self.groups), key=str)
        labels = [names.index(self.groups[upload.client_id]) for upload in uploads]
        for label, average in cluster_averages(uploaded, weights, labels).items():
            server.method_state.adapters[names[label]] = _like_server(average, server)
        server.adapters = _like_server(cluster_averages(uploaded, weights, [0] * len(uploads))[0], server)
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        own = self.served(server, client_id)
        if own is None:
            return None
        return {n: (a.clone(), b.clone()) for n, (a, b) in own.items()}, {k: v.clone() for k, v in server.head.items()}


class FedHLT(FedLFC):
    """FedHLT (Guo et al. 2024, WWW companion): an adapter per node of a language tree, aggregated by position.

    Each client sits at a leaf of a tree (its language), under its family, under the root:
    ``paths[k]`` is client k's path from the root to its leaf, for instance ("root", "Germanic",
    "de") (:func:`fedlora_edu.federations.language_path`). The server keeps one adapter per node.
    Each round, every node with uploads from clients below it gets their weighted average (A and
    B each, the weights p_k renormalised among those clients): the root averages everyone (FedIT's
    average, also the server's own adapter), a family node its languages, a leaf its language.
    A client starts from, and is served, the mean of the adapters on its path (root, family,
    language), A and B each, with equal weights: what its language learned, pulled towards what
    its family and everyone learned.

    What is known of the paper (``METHOD_SOURCES.md``: the abstract only): it extends FedLFC with
    a hierarchical language tree; the server keeps LoRA parameters for each node and aggregates
    clients' LoRA by their positions in the tree. Our choices: the equal-weight mean over the
    path (the abstract does not say how a client combines the nodes above it); nodes without
    an upload yet are left out of the mean; the head as in :class:`FedLFC`.
    """

    name = "FedHLT"
    paper = "Guo et al. 2024, WWW companion"
    federation_attribute = "client_paths"

    def __init__(self, paths: Sequence[Sequence[object]] | None = None) -> None:
        super().__init__(None if paths is None else _checked_paths(paths))

    def set_groups(self, groups: list) -> None:
        """Client k's path from the root to its leaf is ``groups[k]``."""
        self.paths = _checked_paths(groups)
        self.groups = [path[-1] for path in self.paths]

    def served(self, server: ServerState, client_id: int) -> dict[str, Factors] | None:
        nodes = [server.method_state.adapters[node] for node in self.paths[client_id]
                 if node in server.method_state.adapters]
        if not nodes:
            return None
        share = [1.0 / len(nodes)] * len(nodes)
        return {n: fedit_average([node[n][0] for node in nodes], [node[n][1] for node in nodes], share)
                for n in nodes[0]}

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, uploaded = self._uploaded(server, uploads)
        nodes = sorted({node for upload in uploads for node in self.paths[upload.client_id]}, key=str)
        for node in nodes:
            below = [i for i, upload in enumerate(uploads) if node in self.paths[upload.client_id]]
            average = cluster_averages([uploaded[i] for i in below], _renormalised([weights[i] for i in below]),
                                       [0] * len(below))[0]
            server.method_state.adapters[node] = _like_server(average, server)
        server.adapters = _like_server(cluster_averages(uploaded, weights, [0] * len(uploads))[0], server)
        self.aggregate_head(server, uploads)


def _checked_paths(paths: Sequence[Sequence[object]]) -> list[tuple]:
    """The paths as tuples, checked: each from one common root, and together a tree (one parent per node)."""
    paths = [tuple(path) for path in _check_groups(paths, "paths")]
    if any(len(path) < 1 for path in paths):
        raise ValueError("every path names at least one node (the root)")
    if len({path[0] for path in paths}) != 1:
        raise ValueError(f"every path starts at the same root, got {sorted({path[0] for path in paths}, key=str)}")
    parents: dict[object, object] = {}
    for path in paths:
        for parent, node in itertools.pairwise(path):
            if parents.setdefault(node, parent) != parent:
                raise ValueError(f"node {node!r} has two parents, {parents[node]!r} and {parent!r}: not a tree")
    return paths


def _renormalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)
