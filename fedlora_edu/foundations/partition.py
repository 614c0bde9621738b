"""How clients' data differ: splitting one data set among K clients.

The survey (arXiv 2505.13502, section 2.1, eq. 1) writes federated learning as

    min_W f(W) = sum_{k=1}^{K} p_k f_k(W; D_k),    p_k = n_k / n,

where client k holds the local data set D_k of n_k examples. Section 4 ("Heterogeneity") is
about clients whose D_k are not drawn from the same distribution (non-IID). The partitioners
here build the D_k from one labelled data set, from identical clients to very different ones:

* :func:`iid`: every client sees the same distribution (the baseline).
* :func:`dirichlet_label_skew`: per class, client shares ~ Dir(alpha) (Hsu, Qi and Brown 2019,
  arXiv 1909.06335); small alpha, few classes per client.
* :func:`pathological_shards`: each client holds exactly k classes (McMahan et al. 2017, the
  FedAvg paper's "pathological non-IID" split).
* :func:`quantity_skew`: client sizes ~ Dir(alpha), labels IID within (Li et al. 2022,
  "Federated Learning on Non-IID Data Silos", arXiv 2102.02079).
* :func:`natural`: one client per real source (a news outlet), non-IID by nature.

Every partitioner returns one sorted array of example indices per client; the arrays are
disjoint and together cover every example. The chapter
"book/part1/federated_learning.ipynb" (clients and their data) teaches this module.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "SCHEMES",
    "client_weights",
    "dirichlet_label_skew",
    "iid",
    "label_histogram",
    "natural",
    "partition",
    "pathological_shards",
    "plot_label_histograms",
    "quantity_skew",
]

SCHEMES = ("iid", "dirichlet", "shards", "quantity", "natural")

# Rejection sampling for the Dirichlet partitioners gives up after this many draws.
_MAX_TRIES = 100


def _as_labels(labels: Sequence[int]) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D sequence of ints, got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        if not (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array))):
            raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    if array.min() < 0:
        raise ValueError(f"labels must be non-negative, got {int(array.min())}")
    return array.astype(np.int64)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_num_clients(num_clients: object, n: int) -> int:
    num_clients = _check_int(num_clients, "num_clients", 1)
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} is more than the {n} examples to share")
    return num_clients


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    return float(alpha)


def _check_min_size(min_size: object, num_clients: int, n: int) -> int:
    min_size = _check_int(min_size, "min_size", 0)
    if min_size * num_clients > n:
        raise ValueError(
            f"min_size={min_size} is infeasible: {num_clients} clients x {min_size} examples "
            f"> {n} examples"
        )
    return min_size


def _finish(parts: Sequence[np.ndarray | list[int]]) -> list[np.ndarray]:
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def iid(labels: Sequence[int], num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """Split the examples uniformly at random into ``num_clients`` near-equal clients.

    The IID baseline of the survey's eq. 1 (arXiv 2505.13502, section 2.1): every D_k is drawn
    from the same distribution, so every f_k estimates the same f and p_k = 1/K (sizes differ
    by at most one). Taught in the chapter "book/part1/federated_learning.ipynb".
    """
    label_array = _as_labels(labels)
    num_clients = _check_num_clients(num_clients, len(label_array))
    rng = np.random.default_rng(seed)
    return _finish(np.array_split(rng.permutation(len(label_array)), num_clients))


def _dirichlet_cut(
    members: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Cut a shuffled index array into ``num_clients`` pieces with shares ~ Dir(alpha)."""
    shares = rng.dirichlet(np.full(num_clients, alpha))
    cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
    return np.split(rng.permutation(members), cuts)


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random examples from the largest clients to those below ``min_size``.

    Used when no whole draw met ``min_size`` (many clients, small alpha): the draw keeps its
    skew except for the few examples moved, and every client can train.
    """
    parts = [rng.permutation(part) for part in parts]
    for client in range(len(parts)):
        while len(parts[client]) < min_size:
            donor = int(np.argmax([len(part) for part in parts]))
            parts[client] = np.append(parts[client], parts[donor][-1])
            parts[donor] = parts[donor][:-1]
    return parts


def dirichlet_label_skew(
    labels: Sequence[int],
    num_clients: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Label-skewed clients: for each class, its examples go to clients in shares ~ Dir(alpha).

    Hsu, Qi and Brown (2019, arXiv 1909.06335); the standard non-IID benchmark behind the
    survey's section 4 (arXiv 2505.13502). alpha -> infinity approaches IID; alpha around 0.1
    leaves each client with one or two dominant classes. The whole draw is repeated until every
    client has at least ``min_size`` examples; after 100 draws the last one is topped up by
    moving single examples from the largest clients to the smaller ones. Taught in the chapter
    "book/part1/federated_learning.ipynb".
    """
    label_array = _as_labels(labels)
    n = len(label_array)
    num_clients = _check_num_clients(num_clients, n)
    alpha = _check_alpha(alpha)
    min_size = _check_min_size(min_size, num_clients, n)
    rng = np.random.default_rng(seed)
    members_by_class = [np.flatnonzero(label_array == c) for c in np.unique(label_array)]
    for _ in range(_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in members_by_class:
            for client, piece in enumerate(_dirichlet_cut(members, num_clients, alpha, rng)):
                parts[client].append(piece)
        merged = [np.concatenate(pieces) for pieces in parts]
        if min(len(part) for part in merged) >= min_size:
            return _finish(merged)
    return _finish(_top_up(merged, min_size, rng))


def pathological_shards(
    labels: Sequence[int], num_clients: int, *, classes_per_client: int, seed: int = 0
) -> list[np.ndarray]:
    """Each client holds examples of exactly ``classes_per_client`` classes.

    The "pathological non-IID" split of McMahan et al. (2017, FedAvg, AISTATS), cited by the
    survey (arXiv 2505.13502) for FedAvg. McMahan et al. sort by label and deal out equal
    shards, which can give a client two shards of one class; here the classes are placed first
    so the count is exact: in a random order of the C classes, client j (in a random client
    order) takes the ``classes_per_client`` classes that follow position ``j *
    classes_per_client`` (wrapping around), so every class goes to about
    ``num_clients * classes_per_client / C`` clients. Each class's examples are then dealt
    evenly, at random, among the clients that hold it. Needs ``num_clients *
    classes_per_client >= C`` so that every example is placed. Taught in the chapter
    "book/part1/federated_learning.ipynb".
    """
    label_array = _as_labels(labels)
    n = len(label_array)
    num_clients = _check_num_clients(num_clients, n)
    classes = np.unique(label_array)
    num_classes = len(classes)
    classes_per_client = _check_int(classes_per_client, "classes_per_client", 1)
    if classes_per_client > num_classes:
        raise ValueError(
            f"classes_per_client={classes_per_client} is more than the {num_classes} classes "
            f"present in labels"
        )
    if num_clients * classes_per_client < num_classes:
        raise ValueError(
            f"classes_per_client={classes_per_client} with num_clients={num_clients} leaves some "
            f"of the {num_classes} classes on no client; need num_clients * classes_per_client "
            f">= {num_classes}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    client_order = rng.permutation(num_clients)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for slot in range(num_clients * classes_per_client):
        client = int(client_order[slot // classes_per_client])
        holders[int(order[slot % num_classes])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        members = rng.permutation(np.flatnonzero(label_array == c))
        if len(members) < len(clients):
            raise ValueError(
                f"num_clients={num_clients}: class {c} has {len(members)} examples but "
                f"{len(clients)} clients must share it; use fewer clients or classes_per_client"
            )
        for client, piece in zip(clients, np.array_split(members, len(clients)), strict=True):
            parts[client].append(piece)
    return _finish([np.concatenate(pieces) for pieces in parts])


def quantity_skew(
    labels: Sequence[int],
    num_clients: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Clients of unequal size: shares of all examples ~ Dir(alpha), labels IID within.

    Quantity skew in the taxonomy of Li et al. (2022, arXiv 2102.02079). The label mix is the
    same everywhere, but the weights p_k = n_k / n of the survey's eq. 1 (arXiv 2505.13502)
    become very unequal for small alpha. The draw is repeated until every client has at least
    ``min_size`` examples; after 100 draws the last one is topped up from the largest clients. Taught in the chapter
    "book/part1/federated_learning.ipynb".
    """
    label_array = _as_labels(labels)
    n = len(label_array)
    num_clients = _check_num_clients(num_clients, n)
    alpha = _check_alpha(alpha)
    min_size = _check_min_size(min_size, num_clients, n)
    rng = np.random.default_rng(seed)
    everyone = np.arange(n)
    for _ in range(_MAX_TRIES):
        parts = _dirichlet_cut(everyone, num_clients, alpha, rng)
        if min(len(part) for part in parts) >= min_size:
            return _finish(parts)
    return _finish(_top_up(parts, min_size, rng))


def natural(sources: Sequence[Hashable]) -> list[np.ndarray]:
    """One client per distinct source (for instance a news outlet), ordered by source name.

    Real federations are split by who produced the data, not by a random draw: this is the
    non-IID setting of the survey's section 4 (arXiv 2505.13502) as it occurs in practice.
    Client k holds every example whose source is the k-th name in sorted order. Taught in the
    chapter "book/part1/federated_learning.ipynb".
    """
    if isinstance(sources, str):
        raise ValueError("sources must be a sequence with one source per example, got a str")
    source_list = list(sources)
    if not source_list:
        raise ValueError("sources must be non-empty")
    names = sorted(set(source_list))
    index = {name: k for k, name in enumerate(names)}
    client_of = np.fromiter((index[s] for s in source_list), dtype=np.int64, count=len(source_list))
    return _finish([np.flatnonzero(client_of == k) for k in range(len(names))])


def partition(
    labels: Sequence[int],
    scheme: str,
    num_clients: int,
    *,
    seed: int = 0,
    sources: Sequence[Hashable] | None = None,
    **kwargs: Any,
) -> list[np.ndarray]:
    """Split examples among clients by the named scheme (one switch for a chapter's profile).

    ``scheme`` is one of ``"iid"`` (:func:`iid`), ``"dirichlet"``
    (:func:`dirichlet_label_skew`, needs ``alpha=``), ``"shards"`` (:func:`pathological_shards`,
    needs ``classes_per_client=``), ``"quantity"`` (:func:`quantity_skew`, needs ``alpha=``) or
    ``"natural"`` (:func:`natural`, needs ``sources=``; ``num_clients`` must equal the number of
    distinct sources). Extra keyword arguments go to the partitioner. Builds the D_k of the
    survey's eq. 1 (arXiv 2505.13502). Taught in the chapter
    "book/part1/federated_learning.ipynb".
    """
    if scheme == "iid":
        return iid(labels, num_clients, seed=seed, **kwargs)
    if scheme == "dirichlet":
        return dirichlet_label_skew(labels, num_clients, seed=seed, **kwargs)
    if scheme == "shards":
        return pathological_shards(labels, num_clients, seed=seed, **kwargs)
    if scheme == "quantity":
        return quantity_skew(labels, num_clients, seed=seed, **kwargs)
    if scheme == "natural":
        if sources is None:
            raise ValueError('sources is required for scheme="natural" (one source per example)')
        if len(sources) != len(labels):
            raise ValueError(
                f"sources has {len(sources)} entries but labels has {len(labels)}; "
                "give one source per example"
            )
        parts = natural(sources)
        if num_clients != len(parts):
            raise ValueError(
                f'num_clients={num_clients} but scheme="natural" gives one client per distinct '
                f"source: {len(parts)} here"
            )
        return parts
    raise ValueError(f"scheme must be one of {', '.join(map(repr, SCHEMES))}; got {scheme!r}")


def client_weights(partitions: Sequence[Sequence[int]]) -> np.ndarray:
    """Client weights p_k = n_k / n of the survey's eq. 1 (arXiv 2505.13502, section 2.1).

    FedAvg (McMahan et al. 2017) averages client updates with these weights. They sum to 1.
    Taught in the chapter "book/part1/federated_learning.ipynb".
    """
    if len(partitions) == 0:
        raise ValueError("partitions must hold at least one client")
    sizes = np.array([len(part) for part in partitions], dtype=np.float64)
    if sizes.sum() == 0:
        raise ValueError("partitions must hold at least one example in total")
    return sizes / sizes.sum()


def label_histogram(
    labels: Sequence[int], partitions: Sequence[Sequence[int]], num_classes: int
) -> np.ndarray:
    """Counts of each class on each client: an array of shape (clients, classes).

    Row k is the label distribution of D_k in the survey's eq. 1 (arXiv 2505.13502); how far
    the rows differ is how non-IID the federation is. Taught in the chapter
    "book/part1/federated_learning.ipynb".
    """
    label_array = _as_labels(labels)
    num_classes = _check_int(num_classes, "num_classes", 1)
    if label_array.max() >= num_classes:
        raise ValueError(
            f"num_classes={num_classes} but labels contain class {int(label_array.max())}"
        )
    if len(partitions) == 0:
        raise ValueError("partitions must hold at least one client")
    rows = []
    for part in partitions:
        index = np.asarray(part, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(label_array)):
            raise ValueError(f"partitions index outside 0..{len(label_array) - 1}")
        rows.append(np.bincount(label_array[index], minlength=num_classes))
    return np.stack(rows)


def plot_label_histograms(
    labels: Sequence[int],
    partitions: Sequence[Sequence[int]],
    label_names: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Draw one horizontal bar per client, stacked by class: the picture of non-IID data.

    Shows the rows of :func:`label_histogram` (the D_k of the survey's eq. 1, arXiv
    2505.13502): IID clients have the same colour mix, label-skewed clients do not, and bar
    lengths show the weights p_k. Returns the Axes (one bar container per class, one bar per
    client). Taught in the chapter "book/part1/federated_learning.ipynb".
    """
    import matplotlib.pyplot as plt

    label_array = _as_labels(labels)
    num_classes = int(label_array.max()) + 1
    if label_names is not None:
        if isinstance(label_names, str) or len(label_names) < num_classes:
            raise ValueError(
                f"label_names must name all {num_classes} classes, got {label_names!r}"
            )
        num_classes = len(label_names)
    if label_names is None:
        names = [f"class {c}" for c in range(num_classes)]
    else:
        names = [str(name) for name in label_names]
    counts = label_histogram(label_array, partitions, num_classes)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, max(2.0, 0.3 * len(partitions) + 1.0)))
    colours = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    clients = np.arange(len(partitions))
    left = np.zeros(len(partitions))
    for c in range(num_classes):
        ax.barh(clients, counts[:, c], left=left, color=colours(c % colours.N), label=names[c])
        left += counts[:, c]
    if len(clients) <= 30:  # beyond that the tick labels overlap
        ax.set_yticks(clients)
    ax.invert_yaxis()  # client 0 on top
    ax.set_ylabel("client")
    ax.set_xlabel("examples")
    ax.legend(title="class", bbox_to_anchor=(1.01, 1.0), loc="upper left", fontsize="small")
    return ax
