"""Property tests of the aggregation contract (survey eq. 4 to 7) on random client matrices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_edu.core.checks import check_weights
from fedlora_edu.core.factors import discordance, fedit_average, ideal_update
from fedlora_edu.core.svd import truncated_factors
from fedlora_edu.distributed.corrective import fedex_residual
from fedlora_edu.distributed.full_size import flexlora, flora_stack
from fedlora_edu.distributed.single_matrix import ffa_aggregate
from fedlora_edu.registry import make_strategy

TOL = dict(atol=1e-9, rtol=1e-9)


def clients(seed: int, count: int, m: int, n: int, ranks: list[int]):
    """Random float64 client factors A_k (r_k x n), B_k (m x r_k) and weights p_k."""
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in ranks[:count]]
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for r in ranks[:count]]
    raw = torch.rand(count, generator=g, dtype=torch.float64) + 0.1
    return As, Bs, (raw / raw.sum()).tolist()


shapes = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(1, 5),  # clients
    st.integers(1, 12),  # m
    st.integers(1, 12),  # n
    st.lists(st.integers(1, 6), min_size=5, max_size=5),  # ranks
)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_ideal_update_is_weighted_sum_of_products(case):
    seed, count, m, n, ranks = case
    As, Bs, p = clients(seed, count, m, n, ranks)
    expected = torch.zeros(m, n, dtype=torch.float64)
    for k in range(count):
        for i in range(m):
            for j in range(n):
                expected[i, j] += p[k] * sum(Bs[k][i, s] * As[k][s, j] for s in range(As[k].shape[0]))
    torch.testing.assert_close(ideal_update(As, Bs, p), expected, **TOL)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_flora_stack_product_equals_ideal_update_for_any_ranks(case):
    seed, count, m, n, ranks = case
    As, Bs, p = clients(seed, count, m, n, ranks)
    a, b = flora_stack(As, Bs, p)
    assert a.shape == (sum(ranks[:count]), n) and b.shape == (m, sum(ranks[:count]))
    torch.testing.assert_close(b @ a, ideal_update(As, Bs, p), **TOL)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_fedex_residual_closes_the_gap(case):
    seed, count, m, n, ranks = case
    equal = [ranks[0]] * 5
    As, Bs, p = clients(seed, count, m, n, equal)
    a_bar, b_bar = fedit_average(As, Bs, p)
    residual = fedex_residual(As, Bs, p)
    torch.testing.assert_close(b_bar @ a_bar + residual, ideal_update(As, Bs, p), **TOL)
    assert discordance(As, Bs, p) == pytest.approx(float(torch.linalg.matrix_norm(residual)), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_flexlora_gives_best_rank_r_approximation(case):
    seed, count, m, n, ranks = case
    As, Bs, p = clients(seed, count, m, n, ranks)
    target = ideal_update(As, Bs, p)
    singular = torch.linalg.svdvals(target)
    wanted = [1, 2, 3]
    for r, (a, b) in zip(wanted, flexlora(As, Bs, p, wanted), strict=True):
        assert a.shape == (r, n) and b.shape == (m, r)
        # Eckart-Young: the error of the best rank-r approximation is the tail of singular values.
        error = torch.linalg.matrix_norm(target - b @ a)
        assert float(error) == pytest.approx(float(singular[r:].square().sum().sqrt()), abs=1e-7)


def test_flexlora_prefixes_nest_and_pad():
    As, Bs, p = clients(1, 3, 6, 5, [2, 2, 2])
    (a2, b2), (a6, b6) = flexlora(As, Bs, p, [2, 6])
    torch.testing.assert_close(a6[:2], a2, **TOL)
    torch.testing.assert_close(b6[:, :2], b2, **TOL)
    torch.testing.assert_close(b6 @ a6, ideal_update(As, Bs, p), **TOL)  # rank 6 >= rank of the sum


def test_truncated_factors_are_balanced():
    delta = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a, b = truncated_factors(delta, 3)
    torch.testing.assert_close(torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=0), **TOL)


def test_ffa_lora_has_zero_discordance_and_fedit_does_not():
    As, Bs, p = clients(7, 4, 8, 6, [3] * 5)
    shared_a = As[0]
    assert discordance([shared_a] * 4, Bs, p) == pytest.approx(0.0, abs=1e-12)
    b_bar = ffa_aggregate(shared_a, Bs, p)
    torch.testing.assert_close(b_bar @ shared_a, ideal_update([shared_a] * 4, Bs, p), **TOL)
    assert discordance(As, Bs, p) > 1e-3


def test_two_client_example_of_eq_4():
    a1, a2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    b1, b2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    separate = 0.5 * (b1 + b2) @ (0.5 * (a1 + a2))
    ideal = 0.5 * (b1 @ a1 + b2 @ a2)
    torch.testing.assert_close(ideal_update([a1, a2], [b1, b2], [0.5, 0.5]), ideal)
    gap = float(torch.linalg.matrix_norm(separate - ideal))
    assert discordance([a1, a2], [b1, b2], [0.5, 0.5]) == pytest.approx(gap)


@pytest.mark.parametrize(
    "weights, message",
    [([0.5, 0.6], "sum to 1"), ([-0.5, 1.5], "non-negative"), ([1.0], "entries")],
)
def test_bad_weights_are_named(weights, message):
    As, Bs, _ = clients(0, 2, 4, 4, [2, 2])
    with pytest.raises(ValueError, match="weights") as error:
        ideal_update(As, Bs, weights)
    assert message in str(error.value)


def test_mismatched_shapes_are_named():
    As, Bs, p = clients(0, 2, 4, 5, [2, 2])
    with pytest.raises(ValueError, match="As\\[1\\]"):
        ideal_update([As[0], torch.randn(2, 6)], Bs, p)
    with pytest.raises(ValueError, match="Bs\\[1\\]"):
        ideal_update(As, [Bs[0], torch.randn(3, 2)], p)
    with pytest.raises(ValueError, match="same r_k"):
        ideal_update(As, [Bs[0], torch.randn(4, 3)], p)
    with pytest.raises(ValueError, match="ranks must match"):
        fedit_average([As[0], torch.randn(3, 5)], [Bs[0], torch.randn(4, 3)], p)
    with pytest.raises(ValueError, match="empty"):
        ideal_update([], [], [])


def test_bad_rank_and_method_are_named():
    As, Bs, p = clients(0, 2, 4, 5, [2, 2])
    with pytest.raises(ValueError, match="ranks"):
        flexlora(As, Bs, p, [0])
    with pytest.raises(ValueError, match="rank"):
        truncated_factors(torch.ones(3, 3), 0)
    with pytest.raises(ValueError, match="method"):
        make_strategy("FedAwesome")
    with pytest.raises(ValueError, match="rank"):
        make_strategy("FedIT", rank=0)


def test_check_weights_accepts_a_tensor():
    assert check_weights(torch.tensor([0.25, 0.75]), 2) == [0.25, 0.75]
