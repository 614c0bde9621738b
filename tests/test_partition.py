"""Tests for fedlora_edu.partition: the client splits behind the survey's eq. 1."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedlora_edu.foundations import partition as part  # noqa: E402

FAST = settings(max_examples=40, deadline=None)


def balanced_labels(num_classes: int = 5, per_class: int = 40) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def assert_disjoint_and_covering(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "every example is placed exactly once"
    assert np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices are sorted and unique within a client"


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = part.label_histogram(labels, parts, int(labels.max()) + 1).astype(float)
    probs = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
    return float(terms.sum(axis=1).mean())


label_arrays = st.lists(st.integers(0, 6), min_size=20, max_size=200).map(np.array)


@FAST
@given(labels=label_arrays, num_clients=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_iid_disjoint_covering_and_balanced(labels, num_clients, seed):
    parts = part.iid(labels, num_clients, seed=seed)
    assert len(parts) == num_clients
    assert_disjoint_and_covering(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(
    labels=label_arrays,
    num_clients=st.integers(1, 6),
    alpha=st.sampled_from([0.5, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_disjoint_covering_min_size(labels, num_clients, alpha, seed):
    parts = part.dirichlet_label_skew(labels, num_clients, alpha=alpha, seed=seed, min_size=1)
    assert len(parts) == num_clients
    assert_disjoint_and_covering(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


@FAST
@given(
    labels=label_arrays,
    num_clients=st.integers(1, 6),
    alpha=st.sampled_from([0.5, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_quantity_disjoint_covering_min_size(labels, num_clients, alpha, seed):
    parts = part.quantity_skew(labels, num_clients, alpha=alpha, seed=seed, min_size=2)
    assert len(parts) == num_clients
    assert_disjoint_and_covering(parts, len(labels))
    assert min(len(p) for p in parts) >= 2


@FAST
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_shards_give_exactly_k_classes(data, seed):
    num_classes = data.draw(st.integers(1, 8), label="num_classes")
    k = data.draw(st.integers(1, num_classes), label="classes_per_client")
    min_clients = -(-num_classes // k)  # every class must land somewhere
    num_clients = data.draw(st.integers(min_clients, min_clients + 6), label="num_clients")
    labels = np.repeat(np.arange(num_classes), 3 * num_clients)
    labels = np.random.default_rng(seed).permutation(labels)
    parts = part.pathological_shards(labels, num_clients, classes_per_client=k, seed=seed)
    assert len(parts) == num_clients
    assert_disjoint_and_covering(parts, len(labels))
    for p in parts:
        assert len(np.unique(labels[p])) == k


@pytest.mark.parametrize(
    ("scheme", "kwargs"),
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3}),
        ("shards", {"classes_per_client": 2}),
        ("quantity", {"alpha": 0.5}),
    ],
)
def test_same_seed_same_split_other_seed_other_split(scheme, kwargs):
    labels = balanced_labels()
    first = part.partition(labels, scheme, 8, seed=3, **kwargs)
    again = part.partition(labels, scheme, 8, seed=3, **kwargs)
    other = part.partition(labels, scheme, 8, seed=4, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_min_size_is_honoured_with_small_alpha():
    labels = balanced_labels(num_classes=10, per_class=30)
    parts = part.dirichlet_label_skew(labels, 10, alpha=0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    assert_disjoint_and_covering(parts, len(labels))


def test_small_alpha_is_more_skewed_than_large_alpha():
    labels = balanced_labels(num_classes=10, per_class=100)
    for seed in range(3):
        skewed = part.dirichlet_label_skew(labels, 10, alpha=0.1, seed=seed)
        mixed = part.dirichlet_label_skew(labels, 10, alpha=100.0, seed=seed)
        assert mean_label_entropy(labels, skewed) < mean_label_entropy(labels, mixed) - 0.5
    # Large alpha is close to IID: entropy near log(10).
    assert mean_label_entropy(labels, mixed) > 0.9 * np.log(10)


def test_small_alpha_quantity_skew_gives_unequal_sizes():
    labels = balanced_labels(num_classes=4, per_class=250)
    unequal = part.client_weights(part.quantity_skew(labels, 10, alpha=0.2, seed=0))
    equal = part.client_weights(part.quantity_skew(labels, 10, alpha=1000.0, seed=0))
    assert unequal.max() / unequal.min() > equal.max() / equal.min()
    assert np.allclose(equal, 0.1, atol=0.02)


def test_natural_groups_by_sorted_source():
    sources = ["nyt", "bbc", "nyt", "cnn", "bbc", "bbc"]
    parts = part.natural(sources)
    assert [p.tolist() for p in parts] == [[1, 4, 5], [3], [0, 2]]
    via_dispatch = part.partition([0] * 6, "natural", 3, sources=sources)
    assert [p.tolist() for p in via_dispatch] == [[1, 4, 5], [3], [0, 2]]


@given(sources=st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=100))
@FAST
def test_natural_each_client_has_one_source(sources):
    parts = part.natural(sources)
    assert len(parts) == len(set(sources))
    assert_disjoint_and_covering(parts, len(sources))
    for p in parts:
        assert len({sources[i] for i in p}) == 1


@FAST
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=20).filter(lambda s: sum(s) > 0))
def test_client_weights_are_n_k_over_n_and_sum_to_one(sizes):
    parts = [np.arange(s) for s in sizes]
    weights = part.client_weights(parts)
    assert np.isclose(weights.sum(), 1.0)
    assert np.allclose(weights, np.array(sizes) / sum(sizes))


def test_label_histogram_counts():
    labels = [0, 1, 1, 2, 2, 2]
    counts = part.label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]


def test_plot_has_one_bar_per_client_and_labelled_axes():
    labels = balanced_labels(num_classes=3, per_class=20)
    parts = part.dirichlet_label_skew(labels, 4, alpha=0.5, seed=0)
    ax = part.plot_label_histograms(labels, parts, label_names=["a", "b", "c"])
    try:
        assert isinstance(ax, matplotlib.axes.Axes)
        assert len(ax.containers) == 3  # one stack layer per class
        assert all(len(container) == 4 for container in ax.containers)  # one bar per client
        assert ax.get_ylabel() == "client"
        assert ax.get_xlabel() == "examples"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
        # Bar lengths add up to each client's size.
        totals = np.sum([[bar.get_width() for bar in c] for c in ax.containers], axis=0)
        assert totals.tolist() == [len(p) for p in parts]
    finally:
        plt.close(ax.figure)


def test_plot_draws_on_a_given_axes():
    fig, given_ax = plt.subplots()
    try:
        ax = part.plot_label_histograms(
            [0, 1, 0, 1], [np.array([0, 1]), np.array([2, 3])], ax=given_ax
        )
        assert ax is given_ax
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["class 0", "class 1"]
    finally:
        plt.close(fig)


LABELS = balanced_labels(num_classes=5, per_class=4)  # 20 examples


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda: part.iid(LABELS, 0), "num_clients"),
        (lambda: part.iid(LABELS, 21), "num_clients"),
        (lambda: part.iid(LABELS, 2.5), "num_clients"),
        (lambda: part.iid([], 2), "labels"),
        (lambda: part.iid([[0, 1]], 1), "labels"),
        (lambda: part.iid([0, -1], 1), "labels"),
        (lambda: part.iid(["a", "b"], 1), "labels"),
        (lambda: part.dirichlet_label_skew(LABELS, 4, alpha=0), "alpha"),
        (lambda: part.dirichlet_label_skew(LABELS, 4, alpha=-1.0), "alpha"),
        (lambda: part.dirichlet_label_skew(LABELS, 4, alpha=float("nan")), "alpha"),
        (lambda: part.dirichlet_label_skew(LABELS, 4, alpha=1.0, min_size=6), "min_size"),
        (lambda: part.dirichlet_label_skew(LABELS, 4, alpha=1.0, min_size=-1), "min_size"),
        (lambda: part.quantity_skew(LABELS, 4, alpha=0.0), "alpha"),
        (lambda: part.quantity_skew(LABELS, 4, alpha=1.0, min_size=6), "min_size"),
        (lambda: part.quantity_skew(LABELS, 0, alpha=1.0), "num_clients"),
        (lambda: part.pathological_shards(LABELS, 4, classes_per_client=0), "classes_per_client"),
        (lambda: part.pathological_shards(LABELS, 4, classes_per_client=6), "classes_per_client"),
        (lambda: part.pathological_shards(LABELS, 2, classes_per_client=2), "classes_per_client"),
        (lambda: part.pathological_shards(LABELS, 20, classes_per_client=5), "num_clients"),
        (lambda: part.pathological_shards(LABELS, 30, classes_per_client=1), "num_clients"),
        (lambda: part.partition(LABELS, "random", 4), "scheme"),
        (lambda: part.partition(LABELS, "natural", 4), "sources"),
        (lambda: part.partition(LABELS, "natural", 4, sources=["a"] * 3), "sources"),
        (lambda: part.partition(LABELS, "natural", 4, sources=["a", "b"] * 10), "num_clients"),
        (lambda: part.natural([]), "sources"),
        (lambda: part.natural("abc"), "sources"),
        (lambda: part.client_weights([]), "partitions"),
        (lambda: part.client_weights([[], []]), "partitions"),
        (lambda: part.label_histogram(LABELS, [np.arange(20)], 3), "num_classes"),
        (lambda: part.label_histogram(LABELS, [np.array([25])], 5), "partitions"),
        (lambda: part.plot_label_histograms(LABELS, [np.arange(20)], ["a"]), "label_names"),
    ],
)
def test_bad_input_names_the_parameter(call, parameter):
    with pytest.raises(ValueError, match=parameter):
        call()


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(ValueError, match="scheme") as error:
        part.partition(LABELS, "label_skew", 4)
    for scheme in part.SCHEMES:
        assert repr(scheme) in str(error.value)


def test_draws_that_never_meet_min_size_are_topped_up():
    """100 clients, alpha 0.1, 1,780 examples (the gpu profile): no whole draw gives every client
    2 examples, so the last draw is repaired; the split stays label-skewed."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=1780)
    parts = part.dirichlet_label_skew(labels, 100, alpha=0.1, seed=0, min_size=2)
    assert min(len(p) for p in parts) >= 2
    assert sorted(np.concatenate(parts).tolist()) == list(range(1780))
    dominant = [np.bincount(labels[p], minlength=5).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.7  # still one dominant class per client on average
    sizes = part.quantity_skew(labels, 100, alpha=0.05, seed=1, min_size=3)
    assert min(len(p) for p in sizes) >= 3
