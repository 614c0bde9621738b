"""Property tests of the corrective mechanisms (survey 3.1, eq. 7): LoRA-FAIR, with FedEx-LoRA reused.

Pure functions on random float64 matrices first (the factored objective against a dense
reference and autograd, monotone descent, the norm penalty's threshold, the least-squares
optimum, what a correction of B cannot reach), then LoRA-FAIR through the real simulator
on the embedded MiniLM, and bad input.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import TINY, recording
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.factors import discordance, fedit_average, ideal_update
from fedlora_edu.core.strategy import normalized_weights
from fedlora_edu.distributed import corrective
from fedlora_edu.distributed.corrective import (
    LoRAFAIR,
    corrected_residual,
    lora_fair_correction,
    lora_fair_objective,
    lora_fair_solve,
)
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.registry import METHODS, make_strategy

warnings.filterwarnings("ignore", category=FutureWarning)

cases = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(2, 5),  # clients
    st.integers(1, 10),  # m
    st.integers(1, 10),  # n
    st.integers(1, 5),  # r
)


def clients(seed: int, count: int, m: int, n: int, r: int):
    """Random client factors A_k (r x n), B_k (m x r) and weights p_k."""
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for _ in range(count)]
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(count)]
    raw = torch.rand(count, generator=g, dtype=torch.float64) + 0.1
    return As, Bs, (raw / raw.sum()).tolist()


def gradient_at_zero(As, Bs, p, similarity: str) -> torch.Tensor:
    """d S / d dB at dB = 0, by autograd on the dense measure (independent of the solver's formulas)."""
    a_bar, b_bar = fedit_average(As, Bs, p)
    ideal = ideal_update(As, Bs, p)
    delta = torch.zeros_like(b_bar, requires_grad=True)
    corrected = (b_bar + delta) @ a_bar
    if similarity == "cosine":
        measure = 1 - (ideal * corrected).sum() / (ideal.norm() * corrected.norm())
    else:
        measure = (ideal - corrected).pow(2).sum() / ideal.pow(2).sum()
    measure.backward()
    return delta.grad


def reachable_part(As, Bs, p) -> float:
    """|| R A-bar^+ A-bar ||_F: the part of FedIT's residual R inside A-bar's row space (what dB can reach)."""
    a_bar, b_bar = fedit_average(As, Bs, p)
    residual = ideal_update(As, Bs, p) - b_bar @ a_bar
    return float(torch.linalg.matrix_norm(residual @ torch.linalg.pinv(a_bar) @ a_bar))


# ----------------------------------------------------------------------------------------
# The objective and the solver
# ----------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(cases, st.sampled_from(corrective.SIMILARITIES), st.sampled_from([0.0, 0.01, 0.1]))
def test_factored_objective_equals_the_dense_reference_and_never_increases(case, similarity, lam):
    As, Bs, p = clients(*case)
    result = lora_fair_solve(As, Bs, p, similarity=similarity, regularization=lam)
    assume(result.objectives)  # dW = 0 or A-bar = 0: nothing to solve
    start = lora_fair_objective(As, Bs, p, torch.zeros_like(Bs[0]), similarity=result.similarity,
                                regularization=lam)
    end = lora_fair_objective(As, Bs, p, result.delta_b, similarity=result.similarity, regularization=lam)
    assert result.objectives[0] == pytest.approx(start, rel=1e-7, abs=1e-10)
    assert result.objectives[-1] == pytest.approx(end, rel=1e-7, abs=1e-10)
    assert all(later <= earlier for earlier, later in zip(result.objectives, result.objectives[1:], strict=False))


@settings(max_examples=60, deadline=None)
@given(cases)
def test_frobenius_correction_is_strictly_closer_whenever_the_residual_is_reachable(case):
    As, Bs, p = clients(*case)
    before = corrected_residual(As, Bs, p)
    assume(before > 1e-8 and reachable_part(As, Bs, p) > 1e-6 * before)
    delta_b = lora_fair_correction(As, Bs, p, similarity="frobenius", regularization=0.0)
    after = corrected_residual(As, Bs, p, delta_b)
    assert after < before
    assert before == pytest.approx(discordance(As, Bs, p), rel=1e-12)  # dB = 0 is FedIT's discordance
    # No correction of B gets below the part of the residual outside A-bar's row space.
    a_bar, b_bar = fedit_average(As, Bs, p)
    residual = ideal_update(As, Bs, p) - b_bar @ a_bar
    unreachable = float(torch.linalg.matrix_norm(residual - residual @ torch.linalg.pinv(a_bar) @ a_bar))
    assert after >= unreachable * (1 - 1e-9) - 1e-12 * before


@settings(max_examples=60, deadline=None)
@given(cases, st.sampled_from(corrective.SIMILARITIES))
def test_the_norm_penalty_is_a_threshold_on_the_gradient(case, similarity):
    """dB = 0 exactly when ||grad S(0)||_F <= lambda; above it the measure strictly improves."""
    As, Bs, p = clients(*case)
    assume(corrected_residual(As, Bs, p) > 1e-8)
    grad = float(torch.linalg.matrix_norm(gradient_at_zero(As, Bs, p, similarity)))
    assume(grad > 1e-8)
    above = lora_fair_solve(As, Bs, p, similarity=similarity, regularization=2.0 * grad)
    assert torch.count_nonzero(above.delta_b) == 0
    below = lora_fair_solve(As, Bs, p, similarity=similarity, regularization=0.5 * grad)
    assert float(torch.linalg.matrix_norm(below.delta_b)) > 0
    zero = torch.zeros_like(below.delta_b)
    assert lora_fair_objective(As, Bs, p, below.delta_b, similarity=similarity, regularization=0.0) < \
        lora_fair_objective(As, Bs, p, zero, similarity=similarity, regularization=0.0)
    if similarity == "frobenius":
        assert corrected_residual(As, Bs, p, below.delta_b) < corrected_residual(As, Bs, p)


@settings(max_examples=40, deadline=None)
@given(cases, st.sampled_from(corrective.SIMILARITIES), st.sampled_from([0.0, 0.01]))
def test_clients_that_agree_get_no_correction(case, similarity, lam):
    seed, count, m, n, r = case
    As, Bs, p = clients(seed, 1, m, n, r)
    As, Bs = As * count, Bs * count
    p = [1.0 / count] * count
    delta_b = lora_fair_correction(As, Bs, p, similarity=similarity, regularization=lam)
    if lam > 0:  # the norm penalty absorbs the rounding-level gradient: exactly zero
        assert torch.count_nonzero(delta_b) == 0
    else:  # without it, only rounding is left to correct
        assert float(delta_b.abs().max()) <= 1e-12 * (1 + float(Bs[0].abs().max()))
    assert float(corrective.fedex_residual(As, Bs, p).abs().max()) < 1e-12


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.integers(1, 8), st.integers(1, 3))
def test_without_penalty_the_frobenius_solution_is_least_squares(seed, count, m, r):
    n = 2 * r + 3  # A-bar r x n with n well above r: full row rank and well conditioned
    As, Bs, p = clients(seed, count, m, n, r)
    a_bar, b_bar = fedit_average(As, Bs, p)
    assume(float(torch.linalg.svdvals(a_bar).min()) > 0.3)
    closed_form = (ideal_update(As, Bs, p) - b_bar @ a_bar) @ torch.linalg.pinv(a_bar)
    delta_b = lora_fair_correction(As, Bs, p, similarity="frobenius", regularization=0.0, steps=5000,
                                   tolerance=0.0)
    scale = float(torch.linalg.matrix_norm(closed_form)) + 1e-12
    assert float(torch.linalg.matrix_norm(delta_b - closed_form)) < 1e-5 * scale


@settings(max_examples=60, deadline=None)
@given(cases, st.sampled_from([0.0, 0.01, 0.1]))
def test_the_cosine_correction_raises_the_cosine_up_to_the_row_space_bound(case, lam):
    """Eq. 8 with the paper's cosine: cos(dW, (B-bar + dB) A-bar) never falls below FedIT's, by at least
    lambda ||dB||_F, and never exceeds ||P||_F / ||dW||_F, P the projection of dW on A-bar's row space."""
    As, Bs, p = clients(*case)
    result = lora_fair_solve(As, Bs, p, similarity="cosine", regularization=lam)
    assume(result.objectives and result.similarity == "cosine")  # the cosine is defined at dB = 0
    a_bar, b_bar = fedit_average(As, Bs, p)
    ideal = ideal_update(As, Bs, p)

    def cosine(product):
        return float((ideal * product).sum() / (ideal.norm() * product.norm()))

    before, after = cosine(b_bar @ a_bar), cosine((b_bar + result.delta_b) @ a_bar)
    assert after >= before + lam * float(torch.linalg.matrix_norm(result.delta_b)) - 1e-9
    bound = float(torch.linalg.matrix_norm(ideal @ torch.linalg.pinv(a_bar) @ a_bar) / ideal.norm())
    assert after <= bound + 1e-9


def test_a_residual_outside_the_row_space_of_a_bar_is_not_corrected():
    """Discordance > 0 is not enough: dB moves the product only within A-bar's row space."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 6, 8, 2
    a_bar = torch.zeros(r, n, dtype=torch.float64)
    a_bar[:, :r] = torch.randn(r, r, generator=g, dtype=torch.float64)
    spread_a = torch.zeros(r, n, dtype=torch.float64)
    spread_a[:, r:] = torch.randn(r, n - r, generator=g, dtype=torch.float64)  # rows orthogonal to A-bar's
    b_bar = torch.randn(m, r, generator=g, dtype=torch.float64)
    spread_b = torch.randn(m, r, generator=g, dtype=torch.float64)
    As, Bs, p = [a_bar + spread_a, a_bar - spread_a], [b_bar + spread_b, b_bar - spread_b], [0.5, 0.5]
    assert discordance(As, Bs, p) > 0.1
    for similarity in corrective.SIMILARITIES:
        delta_b = lora_fair_correction(As, Bs, p, similarity=similarity, regularization=0.0)
        assert float(delta_b.abs().max()) < 1e-12
        assert corrected_residual(As, Bs, p, delta_b) == pytest.approx(discordance(As, Bs, p), rel=1e-9)


def test_the_cosine_aligns_direction_and_can_lengthen_the_frobenius_gap():
    """The paper's cosine ignores length: it raises the similarity but may move the product farther away."""
    As, Bs, p = clients(50, 5, 1, 6, 4)  # found by a search over seeds: such cases are rare, not absent
    before = corrected_residual(As, Bs, p)
    result = lora_fair_solve(As, Bs, p, similarity="cosine", regularization=0.0)
    zero = torch.zeros_like(result.delta_b)
    assert lora_fair_objective(As, Bs, p, result.delta_b, regularization=0.0) < \
        lora_fair_objective(As, Bs, p, zero, regularization=0.0) - 1e-3
    assert corrected_residual(As, Bs, p, result.delta_b) > 1.1 * before
    frobenius = lora_fair_correction(As, Bs, p, similarity="frobenius", regularization=0.0)
    assert corrected_residual(As, Bs, p, frobenius) < before


def test_inputs_keep_their_dtype_and_zero_steps_is_fedit():
    As, Bs, p = clients(0, 3, 5, 4, 2)
    As32, Bs32 = [a.float() for a in As], [b.float() for b in Bs]
    delta_b = lora_fair_correction(As32, Bs32, p)
    assert delta_b.dtype == torch.float32 and delta_b.shape == Bs32[0].shape
    assert torch.count_nonzero(lora_fair_correction(As, Bs, p, steps=0)) == 0


def test_the_corrective_branch_is_registered():
    assert METHODS["LoRA-FAIR"] is LoRAFAIR and METHODS["FedEx-LoRA"] is corrective.FedExLoRA
    assert isinstance(make_strategy("LoRA-FAIR", similarity="frobenius"), LoRAFAIR)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    As, Bs, p = clients(0, 2, 4, 5, 2)
    with pytest.raises(ValueError, match="similarity"):
        lora_fair_correction(As, Bs, p, similarity="l1")
    for bad in (-0.1, math.nan, math.inf, True, "0.01"):
        with pytest.raises(ValueError, match="regularization"):
            lora_fair_correction(As, Bs, p, regularization=bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            lora_fair_correction(As, Bs, p, steps=bad)
    with pytest.raises(ValueError, match="tolerance"):
        lora_fair_solve(As, Bs, p, tolerance=-1.0)
    with pytest.raises(ValueError, match="weights"):
        lora_fair_correction(As, Bs, [0.5, 0.6])
    with pytest.raises(ValueError, match="same r_k"):
        lora_fair_correction(As, [torch.zeros(4, 3, dtype=torch.float64)] * 2, p)
    with pytest.raises(ValueError, match="ranks must match"):
        lora_fair_correction([As[0], torch.zeros(3, 5, dtype=torch.float64)],
                             [Bs[0], torch.zeros(4, 3, dtype=torch.float64)], p)
    with pytest.raises(ValueError, match="As is empty"):
        lora_fair_correction([], [], [])
    with pytest.raises(ValueError, match="delta_b"):
        corrected_residual(As, Bs, p, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="delta_b"):
        lora_fair_objective(As, Bs, p, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="similarity"):
        LoRAFAIR(similarity="cos")
    with pytest.raises(ValueError, match="regularization"):
        LoRAFAIR(regularization=-1)
    with pytest.raises(ValueError, match="steps"):
        LoRAFAIR(steps=-3)
    with pytest.raises(ValueError, match="rank"):
        LoRAFAIR(rank=0)


# ----------------------------------------------------------------------------------------
# Through the simulator, on the embedded MiniLM
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def federation(shards_federation):
    """This module's clients hold two BBC topics each: their updates disagree, as the methods assume."""
    return shards_federation


class WrongSignLoRAFAIR(LoRAFAIR):
    """A deliberately wrong variant: subtracts the correction (the tests below must catch it)."""

    def aggregate(self, server, uploads, round_index):
        super().aggregate(server, uploads, round_index)
        corrections = server.method_state.corrections
        server.adapters = {n: (a, b - 2 * corrections[n].delta_b) for n, (a, b) in server.adapters.items()}


@pytest.fixture(scope="module")
def runs(federation):
    """One round of FedIT, LoRA-FAIR (the paper's cosine), LoRA-FAIR (Frobenius, lambda = 0) and the wrong variant."""
    out = {}
    variants = {"FedIT": FedIT(), "cosine": recording(LoRAFAIR)(),
                "frobenius": recording(LoRAFAIR)(similarity="frobenius", regularization=0.0),
                "wrong": recording(WrongSignLoRAFAIR)(similarity="frobenius", regularization=0.0)}
    for label, strategy in variants.items():
        history = federation.run(strategy, rounds=1, progress=False)
        out[label] = (strategy, history, federation.last_model, federation.last_server)
    return out


def distances_to_ideal(federation, runs, label) -> dict[str, tuple[float, float]]:
    """Per layer: (|| W - (W' + s ideal) ||_F of this run, the same for FedIT) on the same uploads."""
    strategy, _, model, server = runs[label]
    pristine = federation.fresh_model()
    p = normalized_weights(strategy.uploads)
    out = {}
    for layer in adapter_io.lora_layers(model):
        As = [u.payload.tensors[f"{layer}.A"] for u in strategy.uploads]
        Bs = [u.payload.tensors[f"{layer}.B"] for u in strategy.uploads]
        target = adapter_io.base_weight(pristine, layer).detach() + server.scaling * ideal_update(As, Bs, p)
        mine = float(torch.linalg.matrix_norm(adapter_io.effective_weight(model, layer) - target))
        fedit = float(torch.linalg.matrix_norm(adapter_io.effective_weight(runs["FedIT"][2], layer) - target))
        out[layer] = (mine, fedit)
    return out


@pytest.mark.parametrize("label", ["cosine", "frobenius"])
def test_effective_weight_is_base_plus_corrected_product(federation, runs, label):
    strategy, _, model, server = runs[label]
    pristine = federation.fresh_model()
    p = normalized_weights(strategy.uploads)
    corrected_layers = 0
    for layer in adapter_io.lora_layers(model):
        As = [u.payload.tensors[f"{layer}.A"] for u in strategy.uploads]
        Bs = [u.payload.tensors[f"{layer}.B"] for u in strategy.uploads]
        a_bar, b_bar = fedit_average(As, Bs, p)
        delta_b = server.method_state.corrections[layer].delta_b
        expected = adapter_io.base_weight(pristine, layer).detach() + server.scaling * (b_bar + delta_b) @ a_bar
        torch.testing.assert_close(adapter_io.effective_weight(model, layer), expected, atol=1e-6, rtol=1e-5)
        # W' itself is untouched: LoRA-FAIR folds nothing into the frozen weight.
        torch.testing.assert_close(adapter_io.base_weight(model, layer), adapter_io.base_weight(pristine, layer))
        corrected_layers += int(float(delta_b.abs().max()) > 0)
    if label == "frobenius":
        assert corrected_layers == len(server.adapters)


def test_frobenius_lora_fair_is_closer_to_the_ideal_weight_than_fedit_in_every_layer(federation, runs):
    for layer, (mine, fedit) in distances_to_ideal(federation, runs, "frobenius").items():
        assert fedit > 1e-6, layer  # the check is not vacuous: FedIT does leave a gap
        assert mine < fedit, layer


def test_cosine_lora_fair_is_never_farther_than_fedit_here(federation, runs):
    distances = distances_to_ideal(federation, runs, "cosine")
    for layer, (mine, fedit) in distances.items():
        assert mine <= fedit + 1e-6, layer
    assert sum(m ** 2 for m, _ in distances.values()) <= sum(f ** 2 for _, f in distances.values())


def test_the_wrong_sign_variant_fails_the_check(federation, runs):
    distances = distances_to_ideal(federation, runs, "wrong")
    assert all(mine > fedit for mine, fedit in distances.values())


def test_bytes_are_fedits(runs):
    fedit = runs["FedIT"][1]
    server = runs["FedIT"][3]
    adapter = tensor_bytes([t for a, b in server.adapters.values() for t in (a, b)])
    expected = TINY.clients_per_round * (adapter + tensor_bytes(server.head))
    for label in ("cosine", "frobenius"):
        history = runs[label][1]
        assert history["bytes_up"].tolist() == fedit["bytes_up"].tolist() == [expected]
        assert history["bytes_down"].tolist() == fedit["bytes_down"].tolist() == [expected]
        assert (history["server_seconds"] > 0).all()
