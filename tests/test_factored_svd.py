"""Property tests of the factored SVD (QR of the stacked factors) against the dense SVD of the product.

Singular vectors are unique only up to sign (and up to rotation inside repeated or zero
singular values), so the tests compare what is unique: singular values, products, the
redistributed adapters B_k A_k and Eckart-Young errors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_edu.core.factors import ideal_update
from fedlora_edu.core.svd import factored_svd, truncated_factors, truncated_factors_factored
from fedlora_edu.distributed.full_size import FlexLoRA, flexlora, flora_stack


def clients(seed: int, m: int, n: int, ranks: list[int], deficient: bool = False):
    """Random float64 client factors A_k (r_k x n), B_k (m x r_k) and weights p_k.

    With ``deficient`` every B_k is built from the same two columns, so the stacked B and
    the sum have rank at most 2 whatever R is (zero singular values and a singular R_B).
    """
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in ranks]
    if deficient:
        basis = torch.randn(m, 2, generator=g, dtype=torch.float64)
        Bs = [basis @ torch.randn(2, r, generator=g, dtype=torch.float64) for r in ranks]
    else:
        Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for r in ranks]
    raw = torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.1
    return As, Bs, (raw / raw.sum()).tolist()


cases = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(1, 14),  # m
    st.integers(1, 14),  # n
    st.lists(st.integers(1, 6), min_size=1, max_size=5),  # heterogeneous ranks r_k; R = sum can exceed min(m, n)
    st.booleans(),  # rank-deficient stack
)


def padded(values: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([values, values.new_zeros(length - values.shape[0])])


@settings(max_examples=80, deadline=None)
@given(cases)
def test_factored_svd_has_the_dense_singular_values_and_product(case):
    seed, m, n, ranks, deficient = case
    As, Bs, p = clients(seed, m, n, ranks, deficient)
    a_stack, b_stack = flora_stack(As, Bs, p)
    u, s, vh = factored_svd(b_stack, a_stack)
    k = min(m, n, sum(ranks))
    assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
    dense = torch.linalg.svdvals(ideal_update(As, Bs, p))  # min(m, n) values; the rest beyond k are zero
    scale = 1.0 + float(dense[0])
    torch.testing.assert_close(padded(s, min(m, n)), dense, atol=1e-9 * scale, rtol=0)
    assert bool((s[:-1] >= s[1:]).all())  # descending, like the dense SVD
    torch.testing.assert_close((u * s) @ vh, b_stack @ a_stack, atol=1e-9 * scale, rtol=0)
    # U and V have orthonormal columns wherever the singular value is not zero
    live = s > 1e-8 * scale
    eye = torch.eye(int(live.sum()), dtype=torch.float64)
    torch.testing.assert_close(u[:, live].T @ u[:, live], eye, atol=1e-8, rtol=0)
    torch.testing.assert_close(vh[live] @ vh[live].T, eye, atol=1e-8, rtol=0)


@settings(max_examples=80, deadline=None)
@given(cases)
def test_flexlora_factored_redistributes_the_same_adapters_as_dense(case):
    seed, m, n, ranks, deficient = case
    As, Bs, p = clients(seed, m, n, ranks, deficient)
    target = ideal_update(As, Bs, p)
    a_stack, b_stack = flora_stack(As, Bs, p)
    singular = torch.linalg.svdvals(target)
    scale = 1.0 + float(singular[0])
    wanted = sorted({1, 2, min(ranks), max(ranks), min(m, n) + 1})
    factored = flexlora(As, Bs, p, wanted)
    dense = flexlora(As, Bs, p, wanted, method="dense")
    for r, (a_f, b_f), (a_d, b_d) in zip(wanted, factored, dense, strict=True):
        assert a_f.shape == (r, n) and b_f.shape == (m, r)
        # The best rank-r approximation is unique only when sigma_r > sigma_(r+1).
        if r < len(singular) and float(singular[r - 1] - singular[r]) < 1e-6 * scale:
            continue
        torch.testing.assert_close(b_f @ a_f, b_d @ a_d, atol=1e-8 * scale, rtol=0)
        # flexlora takes the dense SVD when R >= min(m, n); the factored route itself is exact there too.
        a_q, b_q = truncated_factors_factored(b_stack, a_stack, r)
        torch.testing.assert_close(b_q @ a_q, b_d @ a_d, atol=1e-8 * scale, rtol=0)
        # Eckart-Young: the error is the tail of the singular values, for both routes.
        tail = float(singular[r:].square().sum().sqrt())
        assert float(torch.linalg.matrix_norm(target - b_f @ a_f)) == pytest.approx(tail, abs=1e-8 * scale)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 12), st.integers(2, 12), st.integers(1, 4))
def test_truncation_is_the_best_rank_r_approximation(seed, m, n, r):
    """Eckart-Young from the other side: no random rank-r matrix comes closer than the truncation."""
    As, Bs, p = clients(seed, m, n, [3, 2, 4])
    a_stack, b_stack = flora_stack(As, Bs, p)
    target = b_stack @ a_stack
    a, b = truncated_factors_factored(b_stack, a_stack, r)
    best = float(torch.linalg.matrix_norm(target - b @ a))
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(20):
        other = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g,
                                                                                  dtype=torch.float64)
        # the best multiple of a random rank-r matrix is still rank r
        coefficient = float((other * target).sum() / (other * other).sum().clamp_min(1e-300))
        assert best <= float(torch.linalg.matrix_norm(target - coefficient * other)) + 1e-9


def test_factored_and_dense_factors_agree_with_the_sign_convention():
    As, Bs, p = clients(5, 30, 20, [4, 4, 4])
    a_stack, b_stack = flora_stack(As, Bs, p)
    a_f, b_f = truncated_factors_factored(b_stack, a_stack, 6)
    a_d, b_d = truncated_factors(b_stack @ a_stack, 6)
    torch.testing.assert_close(a_f, a_d, atol=1e-9, rtol=0)
    torch.testing.assert_close(b_f, b_d, atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(a_f, dim=1), torch.linalg.vector_norm(b_f, dim=0))


def test_zero_update_and_padding():
    As = [torch.zeros(2, 5, dtype=torch.float64)] * 2
    Bs = [torch.zeros(4, 2, dtype=torch.float64)] * 2
    (a, b), = flexlora(As, Bs, [0.5, 0.5], [6])
    assert a.shape == (6, 5) and b.shape == (4, 6)
    assert float(b.abs().max()) == 0.0 and float(a.abs().max()) == 0.0


def test_float32_matches_dense_at_a_realistic_layer_shape():
    g = torch.Generator().manual_seed(0)
    m, n, ranks = 384, 384, [8] * 10  # R = 80: the embedded MiniLM's layer size, ten clients of rank 8
    As = [torch.randn(r, n, generator=g) * 0.05 for r in ranks]
    Bs = [torch.randn(m, r, generator=g) * 0.05 for r in ranks]
    p = [0.1] * 10
    s_dense = torch.linalg.svdvals(ideal_update(As, Bs, p))
    a_stack, b_stack = flora_stack(As, Bs, p)
    _, s, _ = factored_svd(b_stack, a_stack)
    torch.testing.assert_close(s, s_dense[: s.shape[0]], atol=1e-5 * float(s_dense[0]), rtol=0)
    assert float(s_dense[s.shape[0]:].max()) < 1e-5 * float(s_dense[0])
    (a_f, b_f), = flexlora(As, Bs, p, [8])
    (a_d, b_d), = flexlora(As, Bs, p, [8], method="dense")
    torch.testing.assert_close(b_f @ a_f, b_d @ a_d, atol=1e-5 * float(s_dense[0]), rtol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same R"):
        factored_svd(torch.ones(4, 3), torch.ones(2, 5))
    with pytest.raises(ValueError, match="matrices"):
        factored_svd(torch.ones(4), torch.ones(4, 5))
    with pytest.raises(ValueError, match="R = 0"):
        factored_svd(torch.ones(4, 0), torch.ones(0, 5))
    with pytest.raises(ValueError, match="rank"):
        truncated_factors_factored(torch.ones(4, 2), torch.ones(2, 5), 0)
    As, Bs, p = clients(0, 4, 5, [2, 2])
    with pytest.raises(ValueError, match="method"):
        flexlora(As, Bs, p, [2], method="randomized")
    with pytest.raises(ValueError, match="method"):
        FlexLoRA(method="qr")
