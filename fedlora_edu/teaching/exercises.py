"""Checkers for the exercises in ``exercises/``: a student's function against the package's.

Each exercise asks the student to write one equation of the survey as a function. :func:`check`
calls that function on random inputs (several clients, unequal ranks where the method allows them,
unequal client weights ``p_k``) and compares it with the reference implementation in
:mod:`fedlora_edu.core.factors`, :mod:`fedlora_edu.distributed.corrective`,
:mod:`fedlora_edu.foundations.lora` or, for Part III, :mod:`fedlora_edu.heterogeneity`. When it
differs, the error says which case failed and, for the mistakes students make most often
(ignoring ``p_k``, a transposed product, FedIT's product in place of the ideal one, a missing
``alpha / r``, zero padding in place of replication, a B that left its client), what the answer
looks like instead.

Notation (survey section 2): ``A_k`` is ``r_k x n``, ``B_k`` is ``m x r_k``, ``dW_k = B_k A_k``,
weights ``p_k >= 0`` sum to 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fedlora_edu.core.factors import average_tensors, discordance, fedit_average, ideal_update
from fedlora_edu.distributed.corrective import fedex_residual
from fedlora_edu.foundations.lora import LoRALinear
from fedlora_edu.heterogeneity.clustering import cluster_averages
from fedlora_edu.heterogeneity.personalized import FedDPA, similarity_weights
from fedlora_edu.heterogeneity.ranks import replication_padding_average, zero_padding_average
from fedlora_edu.heterogeneity.structure import masked_mean
from fedlora_edu.teaching.checking import (
    GRADE_REPORT_ENV,
    Exercise,
    ExerciseFailed,
    any_rank_cases,
    case_seed,
    close,
    matches,
    random_clients,
    record,
    run_check,
    same_rank_cases,
)
from fedlora_edu.teaching.experiments import EXPERIMENT_EXERCISES
from fedlora_edu.teaching.heterogeneity_experiments import HETEROGENEITY_EXPERIMENTS
from fedlora_edu.teaching.method_exercises import METHOD_EXERCISES

__all__ = ["EXERCISES", "GRADE_REPORT_ENV", "Exercise", "ExerciseFailed", "check"]


def _hint_weighted_sum(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    if not isinstance(answer, Tensor):
        return f"return a torch.Tensor of shape (m, n), not {type(answer).__name__}"
    m, n = Bs[0].shape[0], As[0].shape[1]
    if answer.shape == (n, m):
        return "the shape is n x m: dW_k = B_k A_k is m x n (B_k is m x r, A_k is r x n)"
    if answer.shape != (m, n):
        return f"the shape is {tuple(answer.shape)}, dW is {m} x {n}"
    plain = sum(B @ A for A, B in zip(As, Bs, strict=True)) / len(As)
    if close(answer, plain):
        return "this is the plain mean: weight each client's B_k A_k by p_k"
    A_avg = sum(p * A for p, A in zip(weights, As, strict=True))
    B_avg = sum(p * B for p, B in zip(weights, Bs, strict=True))
    if close(answer, B_avg @ A_avg):
        return "this is avg(B) avg(A), FedIT's product; the ideal update multiplies first, then averages"
    return None


def _hint_average(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    if not (isinstance(answer, tuple) and len(answer) == 2):
        return "return a pair (A_avg, B_avg)"
    A_ans, B_ans = answer
    if isinstance(A_ans, Tensor) and A_ans.shape == Bs[0].shape:
        return "the pair is in the wrong order: return (A_avg, B_avg), A first"
    plain = sum(As) / len(As)
    if close(A_ans, plain):
        return "A_avg is the plain mean: weight each A_k by p_k"
    return None


def _hint_discordance(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    if isinstance(answer, Tensor):
        return "return a Python float (use .item())"
    A_avg, B_avg = fedit_average(As, Bs, weights)
    gap = B_avg @ A_avg - ideal_update(As, Bs, weights)
    if isinstance(answer, float) and abs(answer - float(gap.norm() ** 2)) < 1e-6 * max(1.0, answer):
        return "this is the squared norm: take the Frobenius norm itself"
    return None


def _hint_residual(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    expected = fedex_residual(As, Bs, weights)
    if isinstance(answer, Tensor) and answer.shape == expected.shape and close(-answer, expected):
        return "the sign is flipped: avg(B) avg(A) + R must equal the ideal update"
    if isinstance(answer, Tensor) and answer.shape == expected.T.shape:
        return "R is transposed: it is added to the m x n frozen weight"
    return None


def _lora_cases(seed: int) -> list[tuple]:
    cases = []
    for offset, (m, n, r, alpha) in enumerate([(6, 4, 2, 4.0), (3, 8, 1, 1.0), (5, 5, 4, 16.0)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 10 + offset))
        x = torch.randn(3, n, generator=gen, dtype=torch.float64)
        W = torch.randn(m, n, generator=gen, dtype=torch.float64)
        A = torch.randn(r, n, generator=gen, dtype=torch.float64)
        B = torch.randn(m, r, generator=gen, dtype=torch.float64)
        cases.append((x, W, A, B, alpha))
    return cases


def _lora_reference(x: Tensor, W: Tensor, A: Tensor, B: Tensor, alpha: float) -> Tensor:
    """Survey eq. 2 through the package's own layer, loaded with this W, A and B."""
    m, n = W.shape
    layer = LoRALinear(torch.nn.Linear(n, m, bias=False, dtype=W.dtype), rank=A.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.base.weight.copy_(W)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    with torch.no_grad():
        return layer(x)


def _hint_lora(case: tuple, answer: object) -> str | None:
    x, W, A, B, alpha = case
    if not isinstance(answer, Tensor):
        return f"return a torch.Tensor, not {type(answer).__name__}"
    r = A.shape[0]
    if close(answer, x @ W.T + x @ A.T @ B.T):
        return f"the scaling alpha / r is missing (here {alpha} / {r})"
    if close(answer, x @ W.T + alpha * (x @ A.T @ B.T)):
        return "scale by alpha / r, not alpha"
    if close(answer, (alpha / r) * (x @ A.T @ B.T)):
        return "the frozen path x W^T is missing: h = W x + (alpha / r) B A x"
    return None

# ----- Part III: heterogeneity (survey section 4) ---------------------------------------------------
def _mixed_rank_cases(seed: int) -> list[tuple]:
    """Clients of unequal ranks (HetLoRA's setting), and one case of equal ranks."""
    return [random_clients(case_seed(seed, 20), [1, 4, 2]), random_clients(case_seed(seed, 21), [2, 3], m=4, n=6),
            random_clients(case_seed(seed, 22), [3, 1, 1, 2], m=5, n=3), random_clients(case_seed(seed, 23), [3, 3])]


def _pair_problem(answer: object, As: list[Tensor], Bs: list[Tensor]) -> str | None:
    """What is wrong with the form of an (A, B) answer padded to the largest rank, or None."""
    if not (isinstance(answer, tuple) and len(answer) == 2 and all(isinstance(x, Tensor) for x in answer)):
        return "return a pair of tensors (A, B), A first"
    A_ans, B_ans = answer
    r_max, n, m = max(a.shape[0] for a in As), As[0].shape[1], Bs[0].shape[0]
    r_min = min(a.shape[0] for a in As)
    if A_ans.shape == (m, r_max) and B_ans.shape == (r_max, n):
        return "the pair is in the wrong order: return (A, B), A first"
    if r_min < r_max and A_ans.shape[0] == r_min:
        return "you truncated every client to the smallest rank; pad every client to the largest r_k instead"
    if A_ans.shape != (r_max, n) or B_ans.shape != (m, r_max):
        return f"A is r_max x n = {r_max} x {n} and B is m x r_max = {m} x {r_max}"
    return None


def _padding_hint(case: tuple, answer: object, *, other: Callable, other_hint: str, own: Callable,
                  unweighted_hint: str) -> str | None:
    """A padding answer's hint: its form, then the other padding rule in its place, then no weights p_k."""
    As, Bs, weights = case
    problem = _pair_problem(answer, As, Bs)
    if problem:
        return problem
    if matches(answer, other(As, Bs, weights)):
        return other_hint
    if matches(answer, own(As, Bs, None)):
        return unweighted_hint
    return None


def _hint_zero_padding(case: tuple, answer: object) -> str | None:
    return _padding_hint(
        case, answer, other=replication_padding_average, own=zero_padding_average,
        other_hint=("each rank slot was averaged over the clients that hold it (replication padding); zero padding "
                    "averages every slot over all clients, a client without the slot counting as zeros"),
        unweighted_hint="this is the plain mean: weight each padded client by p_k")


def _hint_replication(case: tuple, answer: object) -> str | None:
    return _padding_hint(
        case, answer, other=zero_padding_average, own=replication_padding_average,
        other_hint=("this is zero padding: a slot held by few clients shrinks; divide each slot by the total weight "
                    "p_k of the clients that hold it"),
        unweighted_hint="the client weights p_k are missing: each slot is the p-weighted average over its holders")


def _fedsa_reference(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> list[Tensor]:
    """FedSA-LoRA's client models after aggregation: B_k (sum_j p_j A_j) for every client k."""
    A_shared = average_tensors(list(As), list(weights))
    return [B @ A_shared for B in Bs]


def _hint_fedsa(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    if not isinstance(answer, (list, tuple)) or not all(isinstance(x, Tensor) for x in answer):
        return "return a list of tensors, one m x n update B_k A for every client k"
    if len(answer) != len(As):
        return f"return one update per client: {len(As)} clients here, got {len(answer)}"
    A_avg, B_avg = fedit_average(As, Bs, weights)
    if all(close(x, B_avg @ A_avg) for x in answer):
        return "you averaged B too (FedIT's global model): in FedSA-LoRA each B_k stays on client k"
    if all(close(x, B @ A) for x, A, B in zip(answer, As, Bs, strict=True)):
        return "each client kept its own A_k: the server averages the A's and sends that A back to everyone"
    if matches(list(answer), _fedsa_reference(As, Bs, [1.0 / len(As)] * len(As))):
        return "the shared A is the plain mean: weight each A_k by p_k"
    return None


def _masked_cases(seed: int) -> list[tuple]:
    """Clients' values of one factor with 0/1 masks (some entries kept by nobody), weights p_k, previous values."""
    cases = []
    for offset, (clients, shape) in enumerate([(3, (4, 5)), (2, (3, 3)), (4, (2, 6))]):
        gen = torch.Generator().manual_seed(case_seed(seed, 30 + offset))
        values = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(clients)]
        masks = [torch.rand(shape, generator=gen) < 0.5 for _ in range(clients)]
        masks[0][0, 0] = True  # at least one kept entry
        for mask in masks:
            mask[-1, -1] = False  # an entry nobody keeps
        raw = torch.rand(clients, generator=gen, dtype=torch.float64) + 0.1
        previous = torch.randn(shape, generator=gen, dtype=torch.float64)
        cases.append((values, masks, (raw / raw.sum()).tolist(), previous))
    return cases


def _hint_masked_mean(case: tuple, answer: object) -> str | None:
    values, masks, weights, previous = case
    if not isinstance(answer, Tensor):
        return f"return a torch.Tensor shaped like previous, not {type(answer).__name__}"
    if answer.shape != previous.shape:
        return f"the result has the shape of one client's values, {tuple(previous.shape)}"
    kept = sum(w * m.double() for w, m in zip(weights, masks, strict=True))
    summed = sum(w * m.double() * v for w, m, v in zip(weights, masks, values, strict=True))
    nobody = kept == 0
    if close(answer[~nobody], summed[~nobody]):
        return ("each entry is divided by 1, not by the total weight of the clients that kept it: "
                "sum_k p_k m_ke theta_ke / sum_k p_k m_ke")
    if close(answer[~nobody], masked_mean(values, masks, weights, previous)[~nobody]) and not close(
            answer[nobody], previous[nobody]):
        return "an entry that no client kept keeps its previous value (it was not trained this round)"
    return None



def _dual_cases(seed: int) -> list[tuple]:
    """A global and a local adapter of one rank r, the local weight a and alpha."""
    cases = []
    for offset, (m, n, r, a, alpha) in enumerate([(6, 4, 2, 0.5, 16.0), (3, 7, 1, 0.25, 8.0), (5, 5, 3, 0.8, 3.0)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 40 + offset))
        A_g, A_l = (torch.randn(r, n, generator=gen, dtype=torch.float64) for _ in range(2))
        B_g, B_l = (torch.randn(m, r, generator=gen, dtype=torch.float64) for _ in range(2))
        cases.append((A_g, B_g, A_l, B_l, a, alpha))
    return cases


def _feddpa_reference(A_g: Tensor, B_g: Tensor, A_l: Tensor, B_l: Tensor, a: float, alpha: float) -> Tensor:
    """FedDPA's personal update through the package: its stacked rank-2r factors at the layer's alpha / (2r)."""
    r = A_g.shape[0]
    A, B = FedDPA(rank=r, local_weight=a).mixture({"layer": (A_g, B_g)}, {"layer": (A_l, B_l)})["layer"]
    return (alpha / (2 * r)) * (B @ A)


def _hint_feddpa(case: tuple, answer: object) -> str | None:
    A_g, B_g, A_l, B_l, a, alpha = case
    if not isinstance(answer, Tensor):
        return f"return a torch.Tensor of shape (m, n), not {type(answer).__name__}"
    s = alpha / A_g.shape[0]
    if close(answer, s * (a * (B_g @ A_g) + (1 - a) * (B_l @ A_l))):
        return "the weights are swapped: a weighs the local adapter, 1 - a the global one"
    if close(answer, (1 - a) * (B_g @ A_g) + a * (B_l @ A_l)):
        return f"the scaling alpha / r is missing (here {alpha} / {A_g.shape[0]})"
    if close(answer, s * (B_g @ A_g + B_l @ A_l)):
        return "this is the plain sum of the two updates: weigh them by 1 - a and a"
    if close(answer, (alpha / (2 * A_g.shape[0])) * ((1 - a) * (B_g @ A_g) + a * (B_l @ A_l))):
        return "each adapter has rank r: scale by alpha / r, not alpha / (2 r)"
    return None


def _similarity_cases(seed: int) -> list[tuple]:
    """Data and parameter similarities between K clients (cosines), their sizes, a temperature and a data share."""
    cases = []
    for offset, (clients, temperature, share) in enumerate([(4, 0.1, 0.5), (3, 1.0, 0.0), (5, 0.5, 0.8)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 50 + offset))
        similarities = []
        for _ in range(2):
            vectors = torch.randn(clients, 6, generator=gen, dtype=torch.float64)
            unit = vectors / vectors.norm(dim=1, keepdim=True)
            similarities.append(unit @ unit.T)
        sizes = torch.randint(20, 200, (clients,), generator=gen).to(torch.float64)
        cases.append((similarities[0], similarities[1], sizes, temperature, share))
    return cases


def _similarity_reference(data_similarity: Tensor, parameter_similarity: Tensor, sizes: Tensor,
                          temperature: float, data_share: float) -> Tensor:
    return similarity_weights(data_similarity, parameter_similarity, sizes, temperature=temperature,
                              data_share=data_share)


def _hint_similarity(case: tuple, answer: object) -> str | None:
    data_similarity, parameter_similarity, sizes, temperature, share = case
    if not isinstance(answer, Tensor) or answer.shape != data_similarity.shape:
        return f"return a K x K tensor (row i: the weights of client i's C-bar), K = {len(sizes)}"
    combined = share * data_similarity + (1 - share) * parameter_similarity
    if close(answer, torch.softmax(combined / temperature, dim=1)):
        return "the sizes are missing: client j also counts by p_j = n_j / sum_l n_l (FedAvg's weight)"
    if close(answer.T, _similarity_reference(*case)):
        return "the rows and columns are swapped: each row i (client i's weights over all j) sums to one"
    if close(answer, _similarity_reference(data_similarity, parameter_similarity, sizes, 1.0, share)):
        return f"the temperature is missing: divide the similarities by it (here {temperature})"
    return None


def _cluster_cases(seed: int) -> list[tuple]:
    """Flattened client adapters (rows), weights p_k over all clients, cluster labels 0..C-1."""
    cases = []
    for offset, labels in enumerate([[0, 1, 0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1, 2, 2, 1]]):
        gen = torch.Generator().manual_seed(case_seed(seed, 60 + offset))
        vectors = torch.randn(len(labels), 5, generator=gen, dtype=torch.float64)
        raw = torch.rand(len(labels), generator=gen, dtype=torch.float64) + 0.1
        cases.append((vectors, (raw / raw.sum()).tolist(), labels))
    return cases


def _cluster_reference(vectors: Tensor, weights: list[float], labels: list[int]) -> Tensor:
    """FL-TAC's cluster averages through the package (each row as a rank-1 "A", a zero "B")."""
    adapters = [{"v": (row[None, :], row.new_zeros(1, 1))} for row in vectors]
    averages = cluster_averages(adapters, weights, labels)
    return torch.cat([averages[c]["v"][0] for c in sorted(averages)], dim=0)


def _hint_cluster(case: tuple, answer: object) -> str | None:
    vectors, weights, labels = case
    clusters = sorted(set(labels))
    if not isinstance(answer, Tensor) or answer.shape != (len(clusters), vectors.shape[1]):
        return f"return a tensor with one row per cluster, in the order of the labels 0..{len(clusters) - 1}: " \
               f"{len(clusters)} x {vectors.shape[1]}"
    p = torch.tensor(weights, dtype=torch.float64)
    unnormalised = torch.stack([sum(p[k] * vectors[k] for k in range(len(labels)) if labels[k] == c) for c in clusters])
    if close(answer, unnormalised):
        return "the weights inside a cluster do not sum to one: divide by the cluster's total weight"
    plain = torch.stack([vectors[[k for k in range(len(labels)) if labels[k] == c]].mean(dim=0) for c in clusters])
    if close(answer, plain):
        return "this is the plain mean of each cluster: weight its clients by p_k (renormalised within it)"
    return None


_BASICS: dict[str, Exercise] = {
    "ideal_update": Exercise(
        "ideal_update", "survey eq. 4, right side: sum_k p_k B_k A_k",
        ideal_update, any_rank_cases, _hint_weighted_sum, chapter="part1/fedlora",
    ),
    "fedit_average": Exercise(
        "fedit_average", "survey eq. 4, left side: (sum_k p_k A_k, sum_k p_k B_k)",
        fedit_average, same_rank_cases, _hint_average, chapter="part1/fedlora",
    ),
    "discordance": Exercise(
        "discordance", "|| avg(B) avg(A) - sum_k p_k B_k A_k ||_F",
        discordance, same_rank_cases, _hint_discordance, chapter="part2/aggregation_discordance",
    ),
    "fedex_residual": Exercise(
        "fedex_residual", "survey eq. 7: R = sum_k p_k B_k A_k - avg(B) avg(A)",
        fedex_residual, same_rank_cases, _hint_residual, chapter="part2/corrective",
    ),
    "lora_forward": Exercise(
        "lora_forward", "survey eq. 2: h = W x + (alpha / r) B A x, for a batch x of rows",
        _lora_reference, _lora_cases, _hint_lora, chapter="part1/lora",
    ),
    "zero_padding_average": Exercise(
        "zero_padding_average", "HetLoRA (eq. 12): (sum_k p_k pad(A_k), sum_k p_k pad(B_k)), zeros to the largest r_k",
        lambda As, Bs, weights: zero_padding_average(As, Bs, weights), _mixed_rank_cases, _hint_zero_padding,
        chapter="part3/heterogeneous_ranks",
    ),
    "replication_padding_average": Exercise(
        "replication_padding_average", "replication padding (eq. 12): each rank slot averaged over its holders",
        lambda As, Bs, weights: replication_padding_average(As, Bs, weights), _mixed_rank_cases, _hint_replication,
        chapter="part3/heterogeneous_ranks",
    ),
    "fedsa_personal_updates": Exercise(
        "fedsa_personal_updates", "FedSA-LoRA (eq. 13): B_k (sum_j p_j A_j) for every client k",
        _fedsa_reference, same_rank_cases, _hint_fedsa, chapter="part3/personalized",
    ),
    "masked_mean": Exercise(
        "masked_mean", "PerFIT (eq. 14): sum_k p_k m_ke theta_ke / sum_k p_k m_ke, previous value where nobody kept e",
        masked_mean, _masked_cases, _hint_masked_mean, chapter="part3/structure",
    ),
    "feddpa_personal_update": Exercise(
        "feddpa_personal_update", "FedDPA (eq. 13): (alpha / r) ((1 - a) B_g A_g + a B_l A_l)",
        _feddpa_reference, _dual_cases, _hint_feddpa, chapter="part3/dual_adapters",
    ),
    "ce_lora_weights": Exercise(
        "ce_lora_weights", "CE-LoRA: w_ij = p_j exp(s_ij / T) / sum_l p_l exp(s_il / T), s = d S_dat + (1 - d) S_par",
        _similarity_reference, _similarity_cases, _hint_similarity, chapter="part3/personalized",
    ),
    "cluster_averages": Exercise(
        "cluster_averages", "FL-TAC (eq. 16): per cluster c, sum_{k in c} p_k v_k / sum_{k in c} p_k",
        _cluster_reference, _cluster_cases, _hint_cluster, chapter="part3/clustering",
    ),
}

EXERCISES: dict[str, Exercise] = {**_BASICS, **METHOD_EXERCISES, **EXPERIMENT_EXERCISES, **HETEROGENEITY_EXPERIMENTS}
"""Every exercise :func:`check` knows, by name: Parts I and III here, Parts I, II and IV's method cores in
:mod:`fedlora_edu.teaching.method_exercises`, experiments to run and explain in
:mod:`fedlora_edu.teaching.experiments`."""


def check(name: str, function: Callable, *, seed: int = 0) -> str:
    """Check a student's ``function`` for exercise ``name``; return a line saying it passed.

    For each case the reference is computed first, on its own copy of the inputs, and the
    student's function gets another copy, so an answer that changes its inputs in place
    (``A.mul_(p)``) can neither corrupt the reference nor the hints. Raises
    :class:`ExerciseFailed` naming the failing case, the shapes, how far off the answer is and,
    where one applies, a hint; an exception raised by the student's function (other than
    ``NotImplementedError``) becomes an :class:`ExerciseFailed` with the case and its message.
    A function that still raises ``NotImplementedError`` is reported as not attempted (no
    error), so a starter notebook runs from top to bottom.
    """
    if name not in EXERCISES:
        raise ValueError(f"unknown exercise {name!r}; choose one of {sorted(EXERCISES)}")
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    try:
        outcome, message = run_check(EXERCISES[name], function, seed)
    except ExerciseFailed:
        record(name, "failed")
        raise
    record(name, outcome)
    return message


