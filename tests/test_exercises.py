"""The exercises' checker accepts the reference solutions and rejects the usual mistakes."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT

from fedlora_edu.teaching.exercises import EXERCISES, ExerciseFailed, check
from fedlora_edu.teaching.handouts import solution_namespace


class _Solutions:
    """The answers of every teacher's notebook (exercises/source/*.ipynb), by name."""

    def __init__(self, paths):
        for path in paths:
            self.__dict__.update({name: value for name, value in solution_namespace(path).items()
                                  if name in EXERCISES})


SOLUTIONS = _Solutions(sorted((ROOT / "exercises" / "source").glob("*.ipynb")))


def test_every_exercise_has_an_answer_in_a_teachers_notebook():
    assert sorted(vars(SOLUTIONS)) == sorted(EXERCISES)


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_reference_solution_passes(name):
    assert check(name, getattr(SOLUTIONS, name)).startswith(f"{name}: passed")


@pytest.mark.parametrize("seed", [1, 7, 123])
def test_solutions_pass_on_other_seeds(seed):
    for name in EXERCISES:
        assert "passed" in check(name, getattr(SOLUTIONS, name), seed=seed)


def test_not_attempted_is_reported_not_raised():
    def stub(*args):
        raise NotImplementedError

    assert "not attempted" in check("ideal_update", stub)


def _fails(name, function, hint_fragment):
    with pytest.raises(ExerciseFailed, match=hint_fragment):
        check(name, function)


def test_unweighted_mean_is_caught():
    _fails("ideal_update", lambda As, Bs, w: sum(B @ A for A, B in zip(As, Bs, strict=True)) / len(As), "plain mean")


def test_fedit_product_in_place_of_ideal_is_caught():
    def fedit_product(As, Bs, w):
        A_avg, B_avg = SOLUTIONS.fedit_average(As, Bs, w)
        return B_avg @ A_avg

    _fails("ideal_update", fedit_product, "FedIT's product")


def test_transposed_update_is_caught():
    _fails("ideal_update", lambda As, Bs, w: SOLUTIONS.ideal_update(As, Bs, w).T, "n x m")


def test_swapped_pair_is_caught():
    _fails("fedit_average", lambda As, Bs, w: SOLUTIONS.fedit_average(As, Bs, w)[::-1], "wrong order")


def test_squared_norm_is_caught():
    _fails("discordance", lambda As, Bs, w: SOLUTIONS.discordance(As, Bs, w) ** 2, "squared norm")


def test_flipped_residual_is_caught():
    _fails("fedex_residual", lambda As, Bs, w: -SOLUTIONS.fedex_residual(As, Bs, w), "sign is flipped")


def test_missing_scaling_is_caught():
    _fails("lora_forward", lambda x, W, A, B, alpha: x @ W.T + x @ A.T @ B.T, "alpha / r is missing")


def test_lora_reference_matches_peft_convention():
    """The checker's eq. 2 reference is the package's layer, which tests/test_lora.py ties to peft;
    here: it equals the formula written out, so the checker cannot drift from the equation."""
    x, W, A, B, alpha = EXERCISES["lora_forward"].cases(0)[0]
    expected = x @ W.T + (alpha / A.shape[0]) * (x @ A.T @ B.T)
    assert torch.allclose(EXERCISES["lora_forward"].reference(x, W, A, B, alpha), expected)


def test_a_wrong_answer_without_a_known_mistake_still_fails():
    _fails("fedex_residual", lambda As, Bs, w: torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=As[0].dtype),
           "case 1 of")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown exercise"):
        check("fedavg_magic", SOLUTIONS.ideal_update)
    with pytest.raises(TypeError, match="callable"):
        check("ideal_update", 3)


def test_an_answer_that_changes_its_inputs_in_place_is_judged_on_its_value():
    """The reference runs first on its own copy: an in-place answer cannot corrupt it (issue 16)."""

    def right_but_in_place(As, Bs, weights):
        for A, p in zip(As, weights, strict=True):
            A.mul_(p)  # scales the student's copy only
        return sum(B @ A for A, B in zip(As, Bs, strict=True))

    def wrong_and_in_place(As, Bs, weights):
        for A in As:
            A.mul_(1.0 / len(As))  # the plain mean, written in place
        return sum(B @ A for A, B in zip(As, Bs, strict=True))

    assert "passed" in check("ideal_update", right_but_in_place)
    _fails("ideal_update", wrong_and_in_place, "plain mean")


def test_an_error_in_the_answer_is_reported_with_its_case():
    def broken(As, Bs, weights):
        return As[0] @ Bs[0]  # r x n times m x r: the shapes do not chain

    with pytest.raises(ExerciseFailed, match=r"ideal_update: case 1 of 4 \(inputs: .*\): your function raised "
                                             r"RuntimeError") as failure:
        check("ideal_update", broken)
    assert isinstance(failure.value.__cause__, RuntimeError)


def test_a_wrong_value_says_how_far_off_without_the_answer():
    def off(As, Bs, weights):
        return 1.01 * SOLUTIONS.ideal_update(As, Bs, weights)

    with pytest.raises(ExerciseFailed, match=r"largest difference [0-9.e-]+ \(the expected values reach"):
        check("ideal_update", off)
    with pytest.raises(ExerciseFailed, match=r"off by [0-9.e-]+ \(relative 0\.01\)"):
        check("discordance", lambda As, Bs, w: 1.01 * SOLUTIONS.discordance(As, Bs, w))


# ----- Part III (exercises/source/heterogeneity_basics.ipynb) -----------------------------------------
def test_replication_in_place_of_zero_padding_is_caught():
    _fails("zero_padding_average", SOLUTIONS.replication_padding_average, "averaged over the clients that hold it")


def test_zero_padding_in_place_of_replication_is_caught():
    _fails("replication_padding_average", SOLUTIONS.zero_padding_average, "this is zero padding")


def test_unweighted_padding_is_caught():
    def plain(As, Bs, weights):
        return SOLUTIONS.zero_padding_average(As, Bs, [1.0 / len(As)] * len(As))

    _fails("zero_padding_average", plain, "plain mean")
    _fails("replication_padding_average",
           lambda As, Bs, w: SOLUTIONS.replication_padding_average(As, Bs, [1.0 / len(As)] * len(As)),
           "weights p_k are missing")


def test_truncation_to_the_smallest_rank_is_caught():
    def truncated(As, Bs, weights):
        r = min(A.shape[0] for A in As)
        return (sum(p * A[:r] for p, A in zip(weights, As, strict=True)),
                sum(p * B[:, :r] for p, B in zip(weights, Bs, strict=True)))

    _fails("zero_padding_average", truncated, "truncated every client to the smallest rank")


def test_a_shared_b_in_fedsa_lora_is_caught():
    def fedit_model(As, Bs, weights):
        A = sum(p * A for p, A in zip(weights, As, strict=True))
        B = sum(p * B for p, B in zip(weights, Bs, strict=True))
        return [B @ A for _ in As]

    _fails("fedsa_personal_updates", fedit_model, "you averaged B too")
    _fails("fedsa_personal_updates", lambda As, Bs, w: [B @ A for A, B in zip(As, Bs, strict=True)],
           "kept its own A_k")
    _fails("fedsa_personal_updates", lambda As, Bs, w: SOLUTIONS.fedsa_personal_updates(As, Bs, w)[0],
           "return a list of tensors")


def test_masked_mean_mistakes_are_caught():
    def not_renormalised(values, masks, weights, previous):
        return sum(p * m.double() * v for p, m, v in zip(weights, masks, values, strict=True))

    def forgets_previous(values, masks, weights, previous):
        return SOLUTIONS.masked_mean(values, masks, weights, torch.zeros_like(previous))

    _fails("masked_mean", not_renormalised, "divided by 1")
    _fails("masked_mean", forgets_previous, "keeps its previous value")


def test_masked_mean_cases_hold_an_entry_nobody_kept_and_a_kept_one():
    for _values, masks, _weights, _previous in EXERCISES["masked_mean"].cases(0):
        kept = sum(m.double() for m in masks)
        assert (kept == 0).any() and (kept > 0).any()


# ----- Part III (exercises/source/personalization_basics.ipynb) --------------------------------------
def test_feddpa_mistakes_are_caught():
    def swapped(A_g, B_g, A_l, B_l, a, alpha):
        return SOLUTIONS.feddpa_personal_update(A_g, B_g, A_l, B_l, 1 - a, alpha)

    def unscaled(A_g, B_g, A_l, B_l, a, alpha):
        return (1 - a) * (B_g @ A_g) + a * (B_l @ A_l)

    def at_the_stacked_rank(A_g, B_g, A_l, B_l, a, alpha):
        return SOLUTIONS.feddpa_personal_update(A_g, B_g, A_l, B_l, a, alpha) / 2

    _fails("feddpa_personal_update", swapped, "weights are swapped")
    _fails("feddpa_personal_update", unscaled, "alpha / r is missing")
    _fails("feddpa_personal_update", at_the_stacked_rank, "not alpha / \\(2 r\\)")


def test_feddpa_reference_is_the_formula_written_out():
    """The checker's reference goes through FedDPA's stacked rank-2r factors; it equals eq. 13's mixture."""
    for A_g, B_g, A_l, B_l, a, alpha in EXERCISES["feddpa_personal_update"].cases(3):
        expected = (alpha / A_g.shape[0]) * ((1 - a) * (B_g @ A_g) + a * (B_l @ A_l))
        assert torch.allclose(EXERCISES["feddpa_personal_update"].reference(A_g, B_g, A_l, B_l, a, alpha), expected)


def test_ce_lora_weight_mistakes_are_caught():
    def no_sizes(data, parameters, sizes, temperature, share):
        return torch.softmax((share * data + (1 - share) * parameters) / temperature, dim=1)

    _fails("ce_lora_weights", no_sizes, "the sizes are missing")
    _fails("ce_lora_weights", lambda *case: SOLUTIONS.ce_lora_weights(*case).T, "rows and columns are swapped")
    _fails("ce_lora_weights", lambda d, p, n, t, s: SOLUTIONS.ce_lora_weights(d, p, n, 1.0, s),
           "the temperature is missing")


def test_cluster_average_mistakes_are_caught():
    def unnormalised(vectors, weights, labels):
        return torch.stack([sum(weights[k] * vectors[k] for k in range(len(labels)) if labels[k] == c)
                            for c in sorted(set(labels))])

    def plain(vectors, weights, labels):
        return SOLUTIONS.cluster_averages(vectors, [1.0 / len(labels)] * len(labels), labels)

    _fails("cluster_averages", unnormalised, "do not sum to one")
    _fails("cluster_averages", plain, "plain mean of each cluster")
    _fails("cluster_averages", lambda v, w, labels: v, "one row per cluster")
