"""Part III's experiment-and-explanation exercises: each measuring mistake gets its hint, each wrong letter its
hint, and every effect a right explanation relies on holds on several seeds."""

from __future__ import annotations

import pytest
import torch

from fedlora_edu.heterogeneity.clustering import kmeans
from fedlora_edu.heterogeneity.ranks import replication_padding_average, slot_holders, zero_padding_average
from fedlora_edu.heterogeneity.structure import masked_mean
from fedlora_edu.teaching import heterogeneity_experiments as hx
from fedlora_edu.teaching.exercises import EXERCISES, ExerciseFailed, check

F64 = torch.float64
SEEDS = range(10)


def _fails(name, function, hint_fragment):
    with pytest.raises(ExerciseFailed, match=hint_fragment):
        check(name, function)


def test_every_chapter_of_part3_has_a_measurement_and_an_explanation():
    chapters = {}
    for name, exercise in hx.HETEROGENEITY_EXPERIMENTS.items():
        assert EXERCISES[name] is exercise and exercise.kind == "experiment"
        chapters.setdefault(exercise.chapter, []).append(name)
    assert sorted(chapters) == sorted(f"part3/{c}" for c in (
        "heterogeneous_ranks", "personalized", "dual_adapters", "structure", "hypernetwork", "clustering",
        "languages", "at_a_glance"))
    assert all(len(names) == 2 and names[1].endswith("_explained") for names in chapters.values())


@pytest.mark.parametrize("name, right, options", [
    ("rank_slots_explained", "b", hx.SLOT_OPTIONS),
    ("factor_spread_explained", "b", hx.SPREAD_OPTIONS),
    ("dual_mix_explained", "c", hx.MIX_OPTIONS),
    ("masked_mean_explained", "b", hx.HOLDER_OPTIONS),
    ("cluster_count_explained", "c", hx.CLUSTER_OPTIONS),
    ("family_grouping_explained", "d", hx.GROUPING_OPTIONS),
    ("new_client_explained", "b", hx.NEW_CLIENT_OPTIONS),
    ("worst_client_explained", "c", hx.SUMMARY_OPTIONS),
])
def test_every_wrong_letter_gets_its_own_hint(name, right, options):
    assert "passed" in check(name, lambda: f" {right.upper()} ")
    exercise = EXERCISES[name]
    hints = set()
    for letter in options:
        if letter != right:
            hint = exercise.hints((), letter)
            assert hint and hint not in hints, (letter, hint)
            hints.add(hint)
            with pytest.raises(ExerciseFailed, match="hint: "):
                check(name, lambda letter=letter: letter)
    _fails(name, lambda: "z", "one letter")
    _fails(name, lambda: 2, "one letter")


# ----- the measurements' mistakes --------------------------------------------------------------------------
def _sizes(A, B):
    return B.norm(dim=0) * A.norm(dim=1)


def test_rank_slot_mistakes():
    def rows(seed, weights_of=lambda w: w, size=_sizes):
        As, Bs, w = hx.toy_rank_clients(seed)
        return torch.stack([size(*zero_padding_average(As, Bs, weights_of(w))),
                            size(*replication_padding_average(As, Bs, weights_of(w)))])

    _fails("rank_slots", lambda seed: rows(seed).flip(0), "rows are swapped")
    _fails("rank_slots", lambda seed: rows(seed, size=lambda A, B: A.norm(dim=1)), "row i of A alone")
    _fails("rank_slots", lambda seed: rows(seed, weights_of=lambda w: None), "weights p_k are missing")
    _fails("rank_slots", lambda seed: rows(seed)[0], "shape")


def _spreads(seed, steps, *, relative=True, uniform=False):
    out = []
    for t in steps:
        As, Bs, w = hx.toy_lora_clients(seed, t)
        w = [1 / len(As)] * len(As) if uniform else w
        row = []
        for X in (As, Bs):
            mean = sum(p * x for p, x in zip(w, X, strict=True))
            spread = sum(p * (x - mean).norm() for p, x in zip(w, X, strict=True))
            row.append(float(spread / (sum(p * x.norm() for p, x in zip(w, X, strict=True)) if relative else 1)))
        out.append(row)
    return torch.tensor(out, dtype=F64)


def test_factor_spread_mistakes():
    assert "passed" in check("factor_spread", _spreads)
    _fails("factor_spread", lambda seed, steps: _spreads(seed, steps).flip(1), "columns are swapped")
    _fails("factor_spread", lambda seed, steps: _spreads(seed, steps, relative=False), "divide by")
    _fails("factor_spread", lambda seed, steps: _spreads(seed, steps, uniform=True), "weights p_k are missing")
    _fails("factor_spread", lambda seed, steps: _spreads(seed, steps).T, "shape")


def _mix(seed, weights, local_first=False, power=1, with_target=True):
    A_g, B_g, A_l, B_l, T = hx.toy_dual_client(seed)
    out = []
    for a in weights:
        a = 1 - a if local_first else a
        mixed = (1 - a) * (B_g @ A_g) + a * (B_l @ A_l)
        out.append(float((mixed - (T if with_target else 0)).norm()) ** power)
    return torch.tensor(out, dtype=F64)


def test_dual_mix_mistakes():
    assert "passed" in check("dual_mix", _mix)
    _fails("dual_mix", lambda seed, a: _mix(seed, a, local_first=True), "weights are swapped")
    _fails("dual_mix", lambda seed, a: _mix(seed, a, power=2), "squared norm")
    _fails("dual_mix", lambda seed, a: _mix(seed, a, with_target=False), "distance to the client's target")
    _fails("dual_mix", lambda seed, a: _mix(seed, a).tolist(), "torch.Tensor")


def _holders(seed, *, power=1, see_masks=True):
    values, masks, w, truth = hx.toy_masked_clients(seed)
    masked = masked_mean(values, masks, w, torch.zeros_like(truth))
    plain = sum(p * (m.double() if see_masks else 1) * v for p, m, v in zip(w, masks, values, strict=True))
    return torch.stack([((masked - truth).abs() ** power).mean(dim=1), ((plain - truth).abs() ** power).mean(dim=1)])


def test_masked_error_mistakes():
    assert "passed" in check("masked_errors", _holders)
    _fails("masked_errors", lambda seed: _holders(seed).flip(0), "rows are swapped")
    _fails("masked_errors", lambda seed: _holders(seed, power=2), "squared errors")
    _fails("masked_errors", lambda seed: _holders(seed, see_masks=False), "a pruned entry is uploaded as a zero")
    _fails("masked_errors", lambda seed: _holders(seed).T, "shape")


def _served(vectors, weights, labels):
    p, labels = torch.tensor(weights, dtype=F64), torch.as_tensor(labels)
    out = torch.empty_like(vectors)
    for c in labels.unique():
        members = labels == c
        out[members] = (p[members, None] * vectors[members]).sum(dim=0) / p[members].sum()
    return out


def _clusters(seed, ks, *, against="targets", uniform=False, power=1):
    uploads, w, targets = hx.toy_grouped_clients(seed)
    w = [1.0] * len(w) if uniform else w
    reference = uploads if against == "uploads" else targets
    return torch.tensor([float(((_served(uploads, w, kmeans(uploads, k, seed=0)) - reference).norm(dim=1) ** power)
                               .mean()) for k in ks], dtype=F64)


def test_cluster_error_mistakes():
    assert "passed" in check("cluster_errors", _clusters)
    _fails("cluster_errors", lambda seed, ks: _clusters(seed, ks, against="uploads"), "against the uploads")
    _fails("cluster_errors", lambda seed, ks: _clusters(seed, ks, uniform=True), "plain mean of each cluster")
    _fails("cluster_errors", lambda seed, ks: _clusters(seed, ks, power=2), "squared distances")
    _fails("cluster_errors", lambda seed, ks: _clusters(seed, ks)[:1], "shape")


def _families(seed, *, against="targets"):
    rows = []
    for informative in (True, False):
        uploads, w, targets = hx.toy_language_clients(seed, informative)
        reference = uploads if against == "uploads" else targets
        rows.append([float((_served(uploads, w, labels) - reference).norm(dim=1).mean())
                     for labels in ([0] * len(hx.FAMILIES), list(hx.FAMILIES))])
    return torch.tensor(rows, dtype=F64)


def test_family_grouping_mistakes():
    assert "passed" in check("family_grouping", _families)
    _fails("family_grouping", lambda seed: _families(seed).flip(1), "columns are swapped")
    _fails("family_grouping", lambda seed: _families(seed).flip(0), "rows are swapped")
    _fails("family_grouping", lambda seed: _families(seed, against="uploads"), "against the uploads")
    _fails("family_grouping", lambda seed: _families(seed)[0], "shape")


def _new_clients(seed, *, intercept=True):
    rows = []
    for related in (True, False):
        d, adapters, new, targets = hx.toy_described_clients(seed, related)
        ones = (lambda x: torch.cat([torch.ones(len(x), 1, dtype=F64), x], dim=1)) if intercept else (lambda x: x)
        predicted = ones(new) @ torch.linalg.pinv(ones(d)) @ adapters  # the least-squares map, another way
        rows.append([float((predicted - targets).norm(dim=1).mean()),
                     float((adapters.mean(dim=0) - targets).norm(dim=1).mean())])
    return torch.tensor(rows, dtype=F64)


def test_new_client_mistakes():
    assert "passed" in check("new_client_errors", _new_clients)
    _fails("new_client_errors", lambda seed: _new_clients(seed).flip(1), "columns are swapped")
    _fails("new_client_errors", lambda seed: _new_clients(seed).flip(0), "rows are swapped")
    _fails("new_client_errors", lambda seed: _new_clients(seed, intercept=False), "no constant term")
    _fails("new_client_errors", lambda seed: 1.0, "shape")


def _summary(seed, *, worst=torch.max, weighted_mean=False, plain_global=False):
    uploads, w, targets = hx.toy_skewed_clients(seed)
    p = torch.tensor(w, dtype=F64)
    served = uploads.mean(dim=0) if plain_global else (p[:, None] * uploads).sum(dim=0)
    rows = []
    for errors in ((served - targets).norm(dim=1), (uploads - targets).norm(dim=1)):
        rows.append(torch.stack([(p * errors).sum() if weighted_mean else errors.mean(), worst(errors)]))
    return torch.stack(rows)


def test_client_summary_mistakes():
    assert "passed" in check("client_summary", _summary)
    _fails("client_summary", lambda seed: _summary(seed).flip(1), "columns are swapped")
    _fails("client_summary", lambda seed: _summary(seed).flip(0), "rows are swapped")
    _fails("client_summary", lambda seed: _summary(seed, worst=torch.min), "not the smallest")
    _fails("client_summary", lambda seed: _summary(seed, weighted_mean=True), "counts every client once")
    _fails("client_summary", lambda seed: _summary(seed, plain_global=True), "p-weighted average of the uploads")
    _fails("client_summary", lambda seed: _summary(seed)[0], "shape")


# ----- the effects each right explanation relies on, on several seeds --------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_zero_padding_shrinks_a_slot_by_its_holders_weight_squared_and_replication_does_not(seed):
    slots = hx._slot_reference(seed)
    _, _, weights = hx.toy_rank_clients(seed)
    mass = torch.tensor(weights, dtype=F64) @ slot_holders(hx.RANK_TOY_RANKS, max(hx.RANK_TOY_RANKS))
    assert torch.allclose(slots[0], mass ** 2 * slots[1])  # explanation b, exactly
    assert bool((slots[0, 4:] < 0.25 * slots[1, 4:]).all())  # the slots only the rank-8 client holds shrink
    assert slots[1, 4:].mean() > 0.4 * slots[1, :4].mean()  # replication's high slots keep their size


@pytest.mark.parametrize("seed", SEEDS)
def test_the_as_agree_early_and_drift_apart_with_long_training(seed):
    spread = hx._spread_reference(seed, [5, 20, 320])
    assert spread[0, 1] > 5 * spread[0, 0] and spread[1, 1] > 1.2 * spread[1, 0]
    assert spread[2, 0] > 0.5 * spread[2, 1]
    assert hx._spread_reference(seed, [0]).abs().max() < 1e-12  # one A0 for every client, and B0 = 0


@pytest.mark.parametrize("seed", SEEDS)
def test_the_best_mix_lies_strictly_between_the_two_adapters(seed):
    errors = hx._mix_reference(seed, hx.MIX_WEIGHTS)
    assert 0 < int(errors.argmin()) < len(hx.MIX_WEIGHTS) - 1
    assert min(errors[0], errors[-1]) > 1.01 * errors.min()


@pytest.mark.parametrize("seed", SEEDS)
def test_the_plain_average_pulls_rarely_kept_entries_towards_zero(seed):
    errors = hx._holder_reference(seed)
    assert errors[1, 0] > 1.1 * errors[0, 0]
    assert torch.allclose(errors[0, -1], errors[1, -1])  # kept by everyone: the same average


@pytest.mark.parametrize("seed", SEEDS)
def test_the_planted_number_of_groups_serves_clients_best(seed):
    ks = [1, 2, 3, 4, 6, 12]
    errors = hx._cluster_error_reference(seed, ks)
    assert ks[int(errors.argmin())] == hx.GROUPS and errors[0] > 1.5 * errors[2]


@pytest.mark.parametrize("seed", SEEDS)
def test_family_averages_help_only_where_the_family_marks_a_difference(seed):
    (global_i, family_i), (global_u, family_u) = hx._grouping_reference(seed).tolist()
    assert family_i < global_i / 1.15 and family_u > global_u


@pytest.mark.parametrize("seed", SEEDS)
def test_a_map_from_descriptors_helps_only_where_adapters_depend_on_them(seed):
    (map_r, average_r), (map_u, average_u) = hx._new_client_reference(seed).tolist()
    assert map_r < average_r / 1.2 and map_u > average_u


@pytest.mark.parametrize("seed", SEEDS)
def test_personalization_helps_the_worst_client_most(seed):
    (global_mean, global_worst), (personal_mean, personal_worst) = hx._summary_reference(seed).tolist()
    assert personal_mean < global_mean and global_worst > 2 * global_mean
    assert global_worst - personal_worst > 3 * (global_mean - personal_mean)


def test_the_toys_are_deterministic_and_refuse_bad_steps():
    assert torch.equal(hx._slot_reference(3), hx._slot_reference(3))
    assert not torch.equal(hx.toy_grouped_clients(0)[0], hx.toy_grouped_clients(1)[0])
    with pytest.raises(ValueError, match="steps"):
        hx.toy_lora_clients(0, -1)
