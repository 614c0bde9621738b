"""Experiment-and-explanation exercises: each measurement's usual mistakes get their hint, every wrong letter
gets its own, and the effect each right explanation relies on holds on several seeds."""

from __future__ import annotations

import pytest
import torch

from fedlora_edu.core.factors import discordance, ideal_update
from fedlora_edu.teaching import experiments as ex
from fedlora_edu.teaching.exercises import EXERCISES, ExerciseFailed, check


def _fails(name, function, hint_fragment):
    with pytest.raises(ExerciseFailed, match=hint_fragment):
        check(name, function)


def test_every_question_has_its_measurement_a_chapter_and_a_hint_for_every_wrong_letter():
    for name, question in ex.QUESTIONS.items():
        if name not in ex.EXPERIMENT_EXERCISES:  # Part III's questions: tests/test_heterogeneity_experiments.py
            continue
        measurement = name.removesuffix("_explained")
        assert EXERCISES[measurement].kind == EXERCISES[name].kind == "experiment"
        assert EXERCISES[measurement].chapter == EXERCISES[name].chapter
        assert "passed" in check(name, lambda q=question: f" {q.answer.upper()} ")
        for letter in set(question.options) - {question.answer}:
            _fails(name, lambda letter=letter: letter, "hint: ")
        _fails(name, lambda: "zz", "one letter")


def test_show_options_prints_the_question_and_rejects_an_unknown_one(capsys):
    ex.show_options("fedavg_drift_explained")
    assert "(b)" in capsys.readouterr().out
    ex.show_options("rank_slots_explained")  # Part III's questions are registered too
    assert "(b)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown question"):
        ex.show_options("nope")


def test_measurement_mistakes_get_their_hints():
    def absolute_growth(seed, steps):
        return torch.tensor([discordance(*ex.toy_local_training(seed, t)) for t in steps], dtype=torch.float64)

    def growth_from_zero(seed, steps):
        rounds = [ex.toy_local_training(seed, t) for t in steps]
        return torch.tensor([discordance(*r) / ideal_update(*r).norm().item() for r in rounds], dtype=torch.float64)

    _fails("discordance_growth", absolute_growth, "divide it by")
    _fails("discordance_growth", growth_from_zero, "subtract B0 A0")
    _fails("fedavg_drift", lambda seed, steps: torch.tensor(
        [float((lambda w, s: (w - s).norm())(*ex.toy_fedavg(seed, t))) for t in steps], dtype=torch.float64), "divide")
    _fails("ffa_tradeoff", lambda seed, steps: ex._ffa_reference(seed, steps) * torch.tensor([1.0, -1.0]), "sign")
    _fails("aggregation_errors", lambda seed, steps: ex._aggregation_errors_reference(seed, steps)[:, [0, 2, 1]],
           "in that order")
    _fails("rank_vector_symmetry", lambda A, B, Q: ex._symmetry_reference(A, B, Q)[:, [1, 0]], "swapped")
    _fails("accumulated_rank", lambda seed, counts: torch.full((len(counts),), 2.0, dtype=torch.float64),
           "rank of one adapter")


@pytest.mark.parametrize("seed", range(4))
def test_the_effects_the_explanations_rely_on_hold(seed):
    drift = ex._fedavg_drift_reference(seed, [1, 2, 4, 8])
    assert drift[0] < 1e-6 and bool((drift[1:] > drift[:-1]).all())  # one step is gradient descent; more drift
    ffa = ex._ffa_reference(seed, [16, 64])
    assert bool((ffa[:, 0] < 1e-12).all()) and bool((ffa[:, 1] > 0.1).all())
    errors = ex._aggregation_errors_reference(seed, [1, 4, 16])
    assert bool((errors[:, 1] < 1e-12).all()) and bool((errors[:, 2] <= errors[:, 0] + 1e-12).all())
    symmetry = ex._symmetry_reference(*ex.toy_adapter(seed))
    assert bool((symmetry[:, 0] < 1e-12).all()) and bool((symmetry[:, 1] > 0.1).all())
    ranks = ex._accumulated_rank_reference(seed, [1, 2, 3, 4, 5, 6])
    assert ranks.tolist() == [float(min(2 * t, 10)) for t in range(1, 7)]


def test_the_pretrained_weight_holds_more_of_its_energy_on_top_than_a_gaussian_one():
    shares = ex._spectrum_reference([1, 4, 16, 64])
    assert bool((shares[0] > shares[1]).all())


def test_the_toys_reject_bad_arguments():
    with pytest.raises(ValueError, match="local_steps"):
        ex.toy_fedavg(0, 0)
    with pytest.raises(ValueError, match="trained"):
        ex.toy_local_training(0, 1, trained="A")
    with pytest.raises(ValueError, match="count"):
        ex.toy_global_adapters(0, 0)


def test_more_measurement_mistakes_get_their_hints():
    _fails("lora_rank_fit", lambda seed, ranks: ex._lora_fit_reference(seed, ranks) * torch.tensor([1.0, 0.5]),
           "discarded singular values")
    _fails("download_size", lambda seed, clients: ex._download_reference(seed, clients) * 4, "not bytes")
    _fails("residual_rank", lambda seed, clients: torch.tensor([float(min(2 * K, 10)) for K in clients],
                                                               dtype=torch.float64), "a bound")
    _fails("kept_energy", lambda seed, densities: ex._kept_energy_reference(seed, densities).flip(0), "swapped")
    _fails("fedit_one_step", lambda seed, steps: torch.zeros(len(steps) + 1, dtype=torch.float64), "one value per")


@pytest.mark.parametrize("seed", range(4))
def test_more_effects_hold(seed):
    fit = ex._lora_fit_reference(seed, [1, 2, 3, 4])
    assert torch.allclose(fit[:, 0], fit[:, 1], atol=1e-6) and bool((fit[2:, 0] < 1e-6).all())
    gap = ex._fedit_central_reference(seed, [1, 4, 16])
    assert gap[0] < 1e-9 and bool((gap[1:] > 1e-3).all())  # equal after one step, not after several
    sizes = ex._download_reference(seed, [1, 2, 4])
    assert sizes[:, 1].tolist() == [44.0, 88.0, 176.0] and sizes[:, 0].tolist() == sizes[:, 2].tolist() == [44.0] * 3
    assert ex._residual_rank_reference(seed, [2, 3, 4, 5]).tolist() == [2.0, 4.0, 6.0, 8.0]  # (K - 1) r
    kept = ex._kept_energy_reference(seed, [0.05, 0.1, 0.25, 0.5])
    assert bool((kept[0] >= kept[1]).all())
