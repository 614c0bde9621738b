"""Experiment-and-explanation exercises for Part III (heterogeneity, survey section 4, eqs. 12 to 16).

One pair per chapter, as in :mod:`fedlora_edu.teaching.experiments`: a toy federation in pure
torch (float64, a few small matrices, the same numbers for the same seed), an exercise where the
student writes a measurement on top of it (checked against the package's own measurement on the
same seeds, with a hint for the usual measuring mistakes), then an exercise where the student
returns the letter of the explanation that fits the numbers (a hint per wrong letter, pointing at
what the numbers show).

Every toy is our choice, made to show one claim of its chapter in a few milliseconds: clients'
"adapters" are small matrices or vectors drawn around planted targets, and "training" is either a
few steps of gradient descent (the personalized-LoRA toy) or a noisy copy of the client's target
(a client that fitted its few examples). What each toy plants and what it leaves to chance is in
its docstring; the tests in ``tests/test_heterogeneity_experiments.py`` check, on several seeds,
that every effect the right explanation relies on holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.heterogeneity.clustering import kmeans
from fedlora_edu.heterogeneity.ranks import replication_padding_average, zero_padding_average
from fedlora_edu.heterogeneity.structure import masked_mean
from fedlora_edu.teaching.checking import Exercise, case_seed, close
from fedlora_edu.teaching.experiments import Question, explanation_exercise

_F64 = torch.float64


def _generator(seed: int, label: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, label))


def _weights(gen: torch.Generator, clients: int, low: int = 20, high: int = 200) -> list[float]:
    """Client weights p_k = n_k / sum_j n_j, with sizes n_k drawn from ``low`` to ``high - 1``."""
    sizes = torch.randint(low, high, (clients,), generator=gen).to(_F64)
    return (sizes / sizes.sum()).tolist()


def _tensor_problem(answer: object, shape: tuple[int, ...], what: str) -> str | None:
    if not isinstance(answer, Tensor) or tuple(answer.shape) != shape:
        return f"return a torch.Tensor of shape {shape}: {what}"
    return None


def _explanation(name: str, chapter: str, question: str, options: dict[str, str], right: str,
                 wrong_hints: dict[str, str]) -> Exercise:
    """The letter exercise, through :func:`fedlora_edu.teaching.experiments.explanation_exercise`: ``right``
    passes, every other letter gets its hint from ``wrong_hints``; the question joins ``QUESTIONS``."""
    return explanation_exercise(name, Question(question.removesuffix(" (one letter)"), options, right, wrong_hints),
                                chapter)


# ----- heterogeneous ranks (eq. 12): zero padding against replication padding -------------------------------
RANK_TOY_RANKS = (1, 2, 2, 4, 4, 8)
"""The clients' ranks r_k in :func:`toy_rank_clients`: slots 4 to 7 are held by the rank-8 client only."""


def toy_rank_clients(seed: int) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """Six clients of the ranks :data:`RANK_TOY_RANKS` that agree on every rank slot they hold, up to noise.

    Our toy: one planted adapter of rank 8 (A* 8 x 10, B* 12 x 8, every component B*_i A*_i of
    about the same size); client k holds its first r_k components plus small noise (a tenth of
    their size), as clients of different budgets that learned the same directions would. Returns
    ``(As, Bs, weights)``, A_k r_k x 10 and B_k 12 x r_k, weights from drawn sizes.
    """
    m, n, r_max = 12, 10, max(RANK_TOY_RANKS)
    gen = _generator(seed, "toy rank clients")
    A_star = torch.randn(r_max, n, generator=gen, dtype=_F64) / n ** 0.5
    B_star = torch.randn(m, r_max, generator=gen, dtype=_F64) / m ** 0.5
    As, Bs = [], []
    for r in RANK_TOY_RANKS:
        As.append(A_star[:r] + 0.1 * torch.randn(r, n, generator=gen, dtype=_F64) / n ** 0.5)
        Bs.append(B_star[:, :r] + 0.1 * torch.randn(m, r, generator=gen, dtype=_F64) / m ** 0.5)
    return As, Bs, _weights(gen, len(RANK_TOY_RANKS))


def _component_sizes(A: Tensor, B: Tensor) -> Tensor:
    """|| B[:, i] A[i, :] ||_F = || B[:, i] || || A[i, :] || for every rank slot i."""
    return torch.linalg.vector_norm(B, dim=0) * torch.linalg.vector_norm(A, dim=1)


def _slot_reference(seed: int) -> Tensor:
    As, Bs, weights = toy_rank_clients(seed)
    return torch.stack([_component_sizes(*zero_padding_average(As, Bs, weights)),
                        _component_sizes(*replication_padding_average(As, Bs, weights))])


def _hint_slots(case: tuple, answer: object) -> str | None:
    (seed,) = case
    r_max = max(RANK_TOY_RANKS)
    problem = _tensor_problem(answer, (2, r_max), "row 0 zero padding, row 1 replication, one column per slot")
    if problem:
        return problem
    As, Bs, weights = toy_rank_clients(seed)
    expected = _slot_reference(seed)
    if close(answer, expected.flip(0)):
        return "the rows are swapped: row 0 is zero padding, row 1 replication padding"
    averages = [zero_padding_average(As, Bs, weights), replication_padding_average(As, Bs, weights)]
    if close(answer, torch.stack([torch.linalg.vector_norm(A, dim=1) for A, _ in averages])):
        return ("this is the size of row i of A alone: the slot's component is B[:, i] A[i, :], of norm "
                "||B[:, i]|| ||A[i, :]||")
    if close(answer, torch.stack([_component_sizes(*zero_padding_average(As, Bs, None)),
                                  _component_sizes(*replication_padding_average(As, Bs, None))])):
        return "the client weights p_k are missing: pass weights to both averages"
    return None


SLOT_OPTIONS = {
    "a": "The clients' components in the high slots are smaller: high slots hold less.",
    "b": "Zero padding averages slot i over every client, those without it counting as zeros, so row i of A and "
         "column i of B both shrink by the total weight of the slot's holders, and the component by its square; "
         "replication padding averages slot i over its holders only, so it keeps their size.",
    "c": "Replication padding inflates the high slots by copying them into the low-rank clients.",
    "d": "A slot held by few clients is averaged over few noisy values, and noise makes an average smaller.",
}
"""The explanations offered for ``rank_slots_explained``, by letter."""


# ----- personalized LoRA (eq. 13, FedSA-LoRA): which factor differs between clients ---------------------------
def toy_lora_clients(seed: int, steps: int, *, clients: int = 4, lr: float = 0.2,
                     ) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """Clients that each fit their own target from LoRA's start: every ``(A_k, B_k)`` after ``steps`` steps.

    Our toy: client k's target T_k (12 x 10, rank 3) is drawn independently of the others, at the
    size of a fine-tuning update (singular values about 0.5); every client starts from the same
    random A0 (rows of norm about 1) and B0 = 0, as LoRA starts, and runs ``steps`` steps of
    gradient descent on 1/2 || B A - T_k ||_F^2 at rate ``lr``. Nothing is shared but the start.
    Returns ``(As, Bs, weights)``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    m, n, r = 12, 10, 2
    gen = _generator(seed, "toy lora clients")
    targets = [torch.randn(m, 3, generator=gen, dtype=_F64) @ torch.randn(3, n, generator=gen, dtype=_F64) / 20
               for _ in range(clients)]
    A0 = torch.randn(r, n, generator=gen, dtype=_F64) / n ** 0.5
    As, Bs = [], []
    for target in targets:
        A, B = A0.clone(), torch.zeros(m, r, dtype=_F64)
        for _ in range(steps):
            gap = B @ A - target
            A, B = A - lr * (B.T @ gap), B - lr * (gap @ A.T)
        As.append(A)
        Bs.append(B)
    return As, Bs, _weights(gen, clients)


def _relative_spread(factors: list[Tensor], weights: list[float]) -> float:
    """sum_k p_k || X_k - sum_j p_j X_j ||_F / sum_k p_k || X_k ||_F: how far the clients' factors differ.

    0 when every factor is zero (B before the first step): nothing differs.
    """
    mean = sum(p * X for p, X in zip(weights, factors, strict=True))
    spread = sum(p * float(torch.linalg.matrix_norm(X - mean)) for p, X in zip(weights, factors, strict=True))
    size = sum(p * float(torch.linalg.matrix_norm(X)) for p, X in zip(weights, factors, strict=True))
    return spread / size if size > 0 else 0.0


def _spread_reference(seed: int, steps: list[int]) -> Tensor:
    rows = []
    for t in steps:
        As, Bs, weights = toy_lora_clients(seed, t)
        rows.append([_relative_spread(As, weights), _relative_spread(Bs, weights)])
    return torch.tensor(rows, dtype=_F64)


def _spread_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 300 + offset), steps) for offset, steps in enumerate([[5, 20, 80], [10, 40]])]


def _hint_spread(case: tuple, answer: object) -> str | None:
    seed, steps = case
    problem = _tensor_problem(answer, (len(steps), 2), "one row per number of steps, columns (A, B)")
    if problem:
        return problem
    if close(answer, _spread_reference(seed, steps).flip(1)):
        return "the columns are swapped: column 0 is A's spread, column 1 is B's"
    absolute, unweighted = [], []
    for t in steps:
        As, Bs, weights = toy_lora_clients(seed, t)
        plain = [1.0 / len(As)] * len(As)
        absolute.append([_relative_spread(X, weights) * sum(p * float(torch.linalg.matrix_norm(x))
                                                            for p, x in zip(weights, X, strict=True))
                         for X in (As, Bs)])
        unweighted.append([_relative_spread(As, plain), _relative_spread(Bs, plain)])
    if close(answer, torch.tensor(absolute, dtype=_F64)):
        return ("divide by sum_k p_k ||X_k||_F: A starts at its full size and B at zero, so spreads are only "
                "comparable relative to each factor's size")
    if close(answer, torch.tensor(unweighted, dtype=_F64)):
        return "the client weights p_k are missing: the mean and the sums over clients are weighted by p_k"
    return None


SPREAD_OPTIONS = {
    "a": "A has fewer entries than B, so it varies less.",
    "b": "Every client starts from the same A0 and from B = 0. A's gradient is B^T (B A - T_k), small while B is "
         "small, so early on B does most of the fitting and takes up what differs between the clients' targets, "
         "while the A's stay near their common start; trained long enough to fit, the A's drift apart too.",
    "c": "The clients' targets share their row space, so the clients agree on A.",
    "d": "Both factors differ between clients by about as much.",
}
"""The explanations offered for ``factor_spread_explained``, by letter."""


# ----- dual adapters (eq. 13, FedDPA): mixing a global and a local adapter -----------------------------------
MIX_WEIGHTS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
"""The local weights a printed in the notebook."""


def _rank_r(matrix: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) of the best rank-r approximation of ``matrix``, the singular values split evenly."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


def toy_dual_client(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One client's global and local adapter and its clean target: ``(A_g, B_g, A_l, B_l, T)``.

    Our toy: eight clients whose targets (12 x 10) share a rank-2 part and differ by a personal
    rank-2 part; client 0 is the one we serve. The global adapter is the best rank-4 fit of the
    clients' average target (what FedAvg over many clients converges to: no noise, but the average
    client); the local adapter is the best rank-4 fit of client 0's target seen through the noise of
    its few examples (i.i.d. noise added to T before the fit). Updates are B A, without LoRA's
    alpha / r (our choice: it would scale every error alike).
    """
    m, n, r, clients = 12, 10, 4, 8
    gen = _generator(seed, "toy dual client")

    def low_rank(size: float) -> Tensor:
        return size * torch.randn(m, 2, generator=gen, dtype=_F64) @ torch.randn(2, n, generator=gen, dtype=_F64)

    shared = low_rank(0.5)
    targets = [shared + low_rank(0.3) for _ in range(clients)]
    A_g, B_g = _rank_r(sum(targets) / clients, r)
    noisy = targets[0] + 0.4 * torch.randn(m, n, generator=gen, dtype=_F64)
    A_l, B_l = _rank_r(noisy, r)
    return A_g, B_g, A_l, B_l, targets[0]


def _mix_reference(seed: int, mix_weights: list[float]) -> Tensor:
    A_g, B_g, A_l, B_l, target = toy_dual_client(seed)
    return torch.tensor([float(torch.linalg.matrix_norm((1 - a) * (B_g @ A_g) + a * (B_l @ A_l) - target))
                         for a in mix_weights], dtype=_F64)


def _mix_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 310), [0.0, 0.25, 0.5, 0.75, 1.0]), (case_seed(seed, 311), [0.1, 0.3, 0.9])]


def _hint_mix(case: tuple, answer: object) -> str | None:
    seed, mix_weights = case
    problem = _tensor_problem(answer, (len(mix_weights),), "one error per local weight a")
    if problem:
        return problem
    expected = _mix_reference(seed, mix_weights)
    if close(answer, _mix_reference(seed, [1 - a for a in mix_weights])):
        return "the weights are swapped: a weighs the local adapter, 1 - a the global one"
    if close(answer, expected ** 2):
        return "this is the squared norm: take the Frobenius norm itself"
    A_g, B_g, A_l, B_l, target = toy_dual_client(seed)
    if close(answer, torch.tensor([float(torch.linalg.matrix_norm((1 - a) * (B_g @ A_g) + a * (B_l @ A_l)))
                                   for a in mix_weights], dtype=_F64)):
        return "this is the size of the mixed update: measure its distance to the client's target T"
    return None


MIX_OPTIONS = {
    "a": "The more local the better: the local adapter was fitted on the client's own data.",
    "b": "The global adapter alone is best: it was trained on many clients' data.",
    "c": "The global adapter has no noise but fits the average client (a bias); the local adapter fits this client "
         "but carries the noise of its few examples (a variance). A mix trades one for the other, so the error is "
         "smallest between the two.",
    "d": "A mix of two rank-r adapters has rank 2r: the extra rank is what lowers the error.",
}
"""The explanations offered for ``dual_mix_explained``, by letter."""


# ----- heterogeneous structure (eq. 14, PerFIT): averaging over the clients that keep an entry ---------------
STRUCTURE_CLIENTS = 6
"""Clients in :func:`toy_masked_clients`; row h - 1 of its entries is kept by exactly h of them."""


def toy_masked_clients(seed: int) -> tuple[list[Tensor], list[Tensor], list[float], Tensor]:
    """Six clients' values of one factor with their structures: ``(values, masks, weights, truth)``.

    Our toy: every client estimates the same true values (6 x 24, entries of size about 1) with noise
    of 0.3 per entry; its mask keeps a different set of entries, arranged so that every entry of
    row h - 1 is kept by exactly h clients (drawn at random), from 1 to 6.
    """
    clients, columns = STRUCTURE_CLIENTS, 24
    gen = _generator(seed, "toy masked clients")
    truth = torch.randn(clients, columns, generator=gen, dtype=_F64)
    values = [truth + 0.3 * torch.randn(clients, columns, generator=gen, dtype=_F64) for _ in range(clients)]
    masks = [torch.zeros(clients, columns, dtype=torch.bool) for _ in range(clients)]
    for row in range(clients):
        for column in range(columns):
            for k in torch.randperm(clients, generator=gen)[: row + 1].tolist():
                masks[k][row, column] = True
    return values, masks, _weights(gen, clients), truth


def _holder_errors(estimate: Tensor, truth: Tensor) -> Tensor:
    return (estimate - truth).abs().mean(dim=1)


def _holder_reference(seed: int) -> Tensor:
    values, masks, weights, truth = toy_masked_clients(seed)
    plain = sum(p * m.double() * v for p, m, v in zip(weights, masks, values, strict=True))
    return torch.stack([_holder_errors(masked_mean(values, masks, weights, torch.zeros_like(truth)), truth),
                        _holder_errors(plain, truth)])


def _hint_holders(case: tuple, answer: object) -> str | None:
    (seed,) = case
    problem = _tensor_problem(answer, (2, STRUCTURE_CLIENTS), "row 0 the masked mean, row 1 the plain average, "
                                                              "one column per number of holders")
    if problem:
        return problem
    expected = _holder_reference(seed)
    if close(answer, expected.flip(0)):
        return "the rows are swapped: row 0 is the masked mean (eq. 14), row 1 the plain average"
    values, masks, weights, truth = toy_masked_clients(seed)
    plain = sum(p * m.double() * v for p, m, v in zip(weights, masks, values, strict=True))
    masked = masked_mean(values, masks, weights, torch.zeros_like(truth))
    if close(answer, torch.stack([((masked - truth) ** 2).mean(dim=1), ((plain - truth) ** 2).mean(dim=1)])):
        return "these are squared errors: take the mean absolute error |estimate - truth| of each row's entries"
    unmasked = sum(p * v for p, v in zip(weights, values, strict=True))
    if close(answer[1], _holder_errors(unmasked, truth)):
        return "the plain average must see the structures too: a pruned entry is uploaded as a zero (m_k * theta_k)"
    return None


HOLDER_OPTIONS = {
    "a": "The masked mean is worse where few clients keep an entry: it averages fewer values, while the plain "
         "average always averages all six.",
    "b": "The plain average counts an entry a client pruned as a zero, so an entry kept by few clients is pulled "
         "towards zero by the weight of the clients that dropped it. The masked mean divides by the weight of the "
         "holders only, and is off by about the noise of the values it averages; when every client keeps the "
         "entry the two are the same.",
    "c": "The two differ by chance: the noise decides which one is closer.",
    "d": "Entries kept by few clients matter little, so the plain average may as well shrink them.",
}
"""The explanations offered for ``masked_mean_explained``, by letter."""


# ----- clustering (eq. 16, FL-TAC): how many clusters -------------------------------------------------------
GROUPS, GROUP_SIZE = 3, 4
"""Planted groups in :func:`toy_grouped_clients` and clients in each."""


def toy_grouped_clients(seed: int) -> tuple[Tensor, list[float], Tensor]:
    """Twelve clients from three planted groups: ``(uploads, weights, targets)``, one row per client.

    Our toy: three group targets (vectors of 20, entries of size 1.5); client k's own target is its
    group's plus a small personal part (0.15 per entry); what it uploads is its own target seen
    through the noise of its few examples (0.6 per entry), as adapters trained on little data are.
    Clients 0-3 are group 0, 4-7 group 1, 8-11 group 2 (the server is not told). The clients' sizes
    are drawn from 60 to 139, not far apart: with very unequal weights a cluster's average is
    mostly its heaviest client's noisy upload, an effect this toy leaves out.
    """
    dim = 20
    gen = _generator(seed, "toy grouped clients")
    centers = 1.5 * torch.randn(GROUPS, dim, generator=gen, dtype=_F64)
    targets = centers.repeat_interleave(GROUP_SIZE, dim=0)
    targets = targets + 0.15 * torch.randn(targets.shape, generator=gen, dtype=_F64)
    uploads = targets + 0.6 * torch.randn(targets.shape, generator=gen, dtype=_F64)
    return uploads, _weights(gen, GROUPS * GROUP_SIZE, 60, 140), targets


def _served(vectors: Tensor, weights: list[float], labels: list[int]) -> Tensor:
    """Every client's cluster average, weights p_k renormalised within the cluster (FL-TAC's aggregation)."""
    p = torch.tensor(weights, dtype=_F64)
    label = torch.tensor(labels)
    out = torch.empty_like(vectors)
    for cluster in label.unique().tolist():
        members = label == cluster
        out[members] = (p[members, None] * vectors[members]).sum(dim=0) / p[members].sum()
    return out


def _cluster_error_reference(seed: int, ks: list[int]) -> Tensor:
    uploads, weights, targets = toy_grouped_clients(seed)
    errors = []
    for k in ks:
        served = _served(uploads, weights, kmeans(uploads, k, seed=0).tolist())
        errors.append(float(torch.linalg.vector_norm(served - targets, dim=1).mean()))
    return torch.tensor(errors, dtype=_F64)


def _cluster_error_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 320), [1, 2, 3, 6, 12]), (case_seed(seed, 321), [3, 1])]


def _hint_cluster_errors(case: tuple, answer: object) -> str | None:
    seed, ks = case
    problem = _tensor_problem(answer, (len(ks),), "one mean error per number of clusters k")
    if problem:
        return problem
    uploads, weights, targets = toy_grouped_clients(seed)
    against_uploads, plain, squared = [], [], []
    for k in ks:
        labels = kmeans(uploads, k, seed=0).tolist()
        served = _served(uploads, weights, labels)
        against_uploads.append(float(torch.linalg.vector_norm(served - uploads, dim=1).mean()))
        plain.append(float(torch.linalg.vector_norm(_served(uploads, [1.0] * len(weights), labels) - targets,
                                                    dim=1).mean()))
        squared.append(float((torch.linalg.vector_norm(served - targets, dim=1) ** 2).mean()))
    if close(answer, torch.tensor(against_uploads, dtype=_F64)):
        return ("you measured against the uploads: measure against each client's target (the upload is its noisy "
                "estimate; against it, every client alone would be perfect)")
    if close(answer, torch.tensor(plain, dtype=_F64)):
        return "this is the plain mean of each cluster: weight its clients by p_k, renormalised within it"
    if close(answer, torch.tensor(squared, dtype=_F64)):
        return "these are squared distances: average || served_k - target_k || itself over the clients"
    return None


CLUSTER_OPTIONS = {
    "a": "The more clusters the better: with more clusters each client is served something closer to its own.",
    "b": "One global average is best: it averages the most clients, so it cancels the most noise.",
    "c": "With k = 3 each cluster gathers the clients of one planted group, so its average cancels their noise "
         "without mixing groups. Fewer clusters mix groups, and the average is far from every group's target; "
         "more clusters average fewer clients, and more of their noise stays.",
    "d": "k-means cannot find the groups through the noise, so the number of clusters hardly matters.",
}
"""The explanations offered for ``cluster_count_explained``, by letter."""


# ----- languages (eq. 16 with known groups, FedLFC): grouping by a label ------------------------------------
FAMILIES = (0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
"""The language family of each client in :func:`toy_language_clients` (two languages of three clients each)."""


def toy_language_clients(seed: int, informative: bool) -> tuple[Tensor, list[float], Tensor]:
    """Twelve clients with a family label: ``(uploads, weights, targets)``, one row per client.

    Our toy: with ``informative``, a client's target is a shared part plus its family's part
    (entries of size 1) plus a small personal part (0.2); without, there is no family part, so
    the label marks no difference between the targets. Uploads are the targets seen through
    noise (0.7 per entry). The labels are :data:`FAMILIES` in both; sizes are drawn from 60 to 139, as
    in :func:`toy_grouped_clients`.
    """
    dim, clients = 20, len(FAMILIES)
    gen = _generator(seed, f"toy language clients {'informative' if informative else 'uninformative'}")
    shared = torch.randn(dim, generator=gen, dtype=_F64)
    family_parts = torch.randn(2, dim, generator=gen, dtype=_F64)
    targets = shared + 0.2 * torch.randn(clients, dim, generator=gen, dtype=_F64)
    if informative:
        targets = targets + family_parts[list(FAMILIES)]
    uploads = targets + 0.7 * torch.randn(clients, dim, generator=gen, dtype=_F64)
    return uploads, _weights(gen, clients, 60, 140), targets


def _grouping_errors(uploads: Tensor, weights: list[float], targets: Tensor) -> list[float]:
    return [float(torch.linalg.vector_norm(_served(uploads, weights, labels) - targets, dim=1).mean())
            for labels in ([0] * len(FAMILIES), list(FAMILIES))]


def _grouping_reference(seed: int) -> Tensor:
    return torch.tensor([_grouping_errors(*toy_language_clients(seed, informative))
                         for informative in (True, False)], dtype=_F64)


def _hint_grouping(case: tuple, answer: object) -> str | None:
    (seed,) = case
    problem = _tensor_problem(answer, (2, 2), "rows (informative, uninformative), columns (global, family)")
    if problem:
        return problem
    expected = _grouping_reference(seed)
    if close(answer, expected.flip(1)):
        return "the columns are swapped: column 0 is the global average, column 1 the family averages"
    if close(answer, expected.flip(0)):
        return "the rows are swapped: row 0 is the informative federation, row 1 the uninformative one"
    rows = []
    for informative in (True, False):
        uploads, weights, targets = toy_language_clients(seed, informative)
        rows.append(_grouping_errors(uploads, weights, uploads))
    if close(answer, torch.tensor(rows, dtype=_F64)):
        return "you measured against the uploads: measure against each client's target"
    return None


GROUPING_OPTIONS = {
    "a": "Grouping by family always helps: a smaller group's average is closer to its clients.",
    "b": "Grouping never helps: the global average averages the most clients.",
    "c": "The two federations differ by chance.",
    "d": "A family's average helps where the clients of a family share a target that differs from the other "
         "family's: it removes the gap between families. Where the label says nothing about the target there "
         "is no gap to remove, and a family's average averages half as many clients, so more of their noise stays.",
}
"""The explanations offered for ``family_grouping_explained``, by letter."""


# ----- hypernetworks (eq. 15, HyperFloRA): an adapter for a new client from its descriptor ------------------
def toy_described_clients(seed: int, related: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ten training clients and ten new ones: ``(descriptors, adapters, new_descriptors, new_targets)``.

    Our toy: descriptors are vectors of 3 (a client's mean features, say); with ``related`` a
    client's adapter (a vector of 20) is a shared part plus a linear function of its descriptor;
    without, the same shared part plus a personal part of the same size that has nothing to do with
    the descriptor. The training clients' adapters carry noise (0.3 per entry, trained on little
    data); a new client's target is noise-free.
    """
    q, dim, clients = 3, 20, 10
    gen = _generator(seed, f"toy described clients {'related' if related else 'unrelated'}")
    shared = torch.randn(dim, generator=gen, dtype=_F64)
    M = torch.randn(q, dim, generator=gen, dtype=_F64) / q ** 0.5
    descriptors = torch.randn(2 * clients, q, generator=gen, dtype=_F64)
    personal = descriptors @ M if related else torch.randn(2 * clients, dim, generator=gen, dtype=_F64)
    targets = shared + personal
    adapters = targets[:clients] + 0.3 * torch.randn(clients, dim, generator=gen, dtype=_F64)
    return descriptors[:clients], adapters, descriptors[clients:], targets[clients:]


def _least_squares_prediction(descriptors: Tensor, adapters: Tensor, new: Tensor, intercept: bool = True) -> Tensor:
    X = torch.cat([torch.ones(len(descriptors), 1, dtype=_F64), descriptors], dim=1) if intercept else descriptors
    Y = torch.cat([torch.ones(len(new), 1, dtype=_F64), new], dim=1) if intercept else new
    return Y @ torch.linalg.lstsq(X, adapters).solution


def _new_client_errors(related: bool, seed: int, intercept: bool = True) -> list[float]:
    descriptors, adapters, new, targets = toy_described_clients(seed, related)
    predicted = _least_squares_prediction(descriptors, adapters, new, intercept)
    average = adapters.mean(dim=0).expand_as(targets)
    return [float(torch.linalg.vector_norm(x - targets, dim=1).mean()) for x in (predicted, average)]


def _new_client_reference(seed: int) -> Tensor:
    return torch.tensor([_new_client_errors(related, seed) for related in (True, False)], dtype=_F64)


def _hint_new_clients(case: tuple, answer: object) -> str | None:
    (seed,) = case
    problem = _tensor_problem(answer, (2, 2), "rows (related, unrelated), columns (least-squares map, average)")
    if problem:
        return problem
    expected = _new_client_reference(seed)
    if close(answer, expected.flip(1)):
        return "the columns are swapped: column 0 is the fitted map, column 1 the average"
    if close(answer, expected.flip(0)):
        return "the rows are swapped: row 0 is the federation where adapters depend on descriptors"
    if close(answer, torch.tensor([_new_client_errors(related, seed, intercept=False) for related in (True, False)],
                                  dtype=_F64)):
        return ("the map has no constant term: add a column of ones to the descriptors (the adapters share a part "
                "that no descriptor explains)")
    return None


NEW_CLIENT_OPTIONS = {
    "a": "A fitted map always beats the average: it has more parameters.",
    "b": "Where a client's adapter depends on its descriptor, the fitted map gives each new client an adapter of its "
         "own, closer than the average, which gives every new client the same one. Where it does not, the map fits "
         "differences between the training clients that say nothing about a new client, and loses to the average.",
    "c": "The average always wins: it uses every training client's adapter, the map only a few numbers per client.",
    "d": "The map wins because it was fitted on the new clients too.",
}
"""The explanations offered for ``new_client_explained``, by letter."""


# ----- Part III at a glance: the mean over clients and the worst client -------------------------------------
SKEW_SIZES = (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0, 2.0)
"""How far each client of :func:`toy_skewed_clients` is from the shared target (per entry of its personal part)."""


def toy_skewed_clients(seed: int) -> tuple[Tensor, list[float], Tensor]:
    """Eight clients, some near a shared target and one far from it: ``(uploads, weights, targets)``.

    Our toy: a shared target (a vector of 20) plus a personal part in a random direction, of size
    per entry :data:`SKEW_SIZES` (most clients close to the crowd, one far from it), the clients
    closer to the crowd holding more data (the weights are drawn, then sorted); uploads are the
    targets through noise (0.3 per entry). One global adapter is the p-weighted average of the
    uploads; a personal adapter is the client's own upload.
    """
    dim, clients = 20, len(SKEW_SIZES)
    gen = _generator(seed, "toy skewed clients")
    shared = torch.randn(dim, generator=gen, dtype=_F64)
    sizes = torch.tensor(SKEW_SIZES, dtype=_F64)[:, None]
    targets = shared + sizes * torch.randn(clients, dim, generator=gen, dtype=_F64)
    uploads = targets + 0.3 * torch.randn(clients, dim, generator=gen, dtype=_F64)
    return uploads, sorted(_weights(gen, clients), reverse=True), targets


def _summary_reference(seed: int) -> Tensor:
    uploads, weights, targets = toy_skewed_clients(seed)
    p = torch.tensor(weights, dtype=_F64)
    global_errors = torch.linalg.vector_norm((p[:, None] * uploads).sum(dim=0) - targets, dim=1)
    personal_errors = torch.linalg.vector_norm(uploads - targets, dim=1)
    return torch.stack([torch.stack([e.mean(), e.max()]) for e in (global_errors, personal_errors)])


def _hint_summary(case: tuple, answer: object) -> str | None:
    (seed,) = case
    problem = _tensor_problem(answer, (2, 2), "rows (global, personal), columns (mean over clients, worst client)")
    if problem:
        return problem
    expected = _summary_reference(seed)
    if close(answer, expected.flip(1)):
        return "the columns are swapped: column 0 is the mean over clients, column 1 the worst client"
    if close(answer, expected.flip(0)):
        return "the rows are swapped: row 0 is the global adapter, row 1 the personal ones"
    uploads, weights, targets = toy_skewed_clients(seed)
    p = torch.tensor(weights, dtype=_F64)
    global_errors = torch.linalg.vector_norm((p[:, None] * uploads).sum(dim=0) - targets, dim=1)
    personal_errors = torch.linalg.vector_norm(uploads - targets, dim=1)
    if close(answer, torch.stack([torch.stack([e.mean(), e.min()]) for e in (global_errors, personal_errors)])):
        return "the worst client has the largest error, not the smallest"
    if close(answer, torch.stack([torch.stack([(p * e).sum(), e.max()]) for e in (global_errors, personal_errors)])):
        return ("this mean weighs clients by p_k: a personalization result counts every client once "
                "(a plain mean over clients)")
    plain = torch.linalg.vector_norm(uploads.mean(dim=0) - targets, dim=1)
    if close(answer[0], torch.stack([plain.mean(), plain.max()])):
        return "the global adapter is the p-weighted average of the uploads, not their plain mean"
    return None


SUMMARY_OPTIONS = {
    "a": "Personal adapters help every client by about the same amount, so the mean over clients says it all.",
    "b": "Personal adapters are worse on average: each is trained on one client's data only.",
    "c": "One global adapter sits near the weighted average of the clients' targets, so its error falls on the "
         "clients farthest from it; a personal adapter's error is its own noise, about the same for everyone. The "
         "worst client gains far more than the mean shows.",
    "d": "The global adapter's worst client and its mean error are close: heterogeneity spreads its error evenly.",
}
"""The explanations offered for ``worst_client_explained``, by letter."""


# ----- the exercises ----------------------------------------------------------------------------------------------
def _one_seed(offset: int):
    return lambda seed: [(case_seed(seed, offset),), (case_seed(seed, offset + 1),)]


HETEROGENEITY_EXPERIMENTS: dict[str, Exercise] = {
    "rank_slots": Exercise(
        "rank_slots", "|| B[:, i] A[i, :] ||_F for every rank slot i, after zero padding (row 0) and replication "
        "padding (row 1) of toy_rank_clients",
        _slot_reference, _one_seed(340), _hint_slots, chapter="part3/heterogeneous_ranks", kind="experiment",
    ),
    "rank_slots_explained": _explanation(
        "rank_slots_explained", "part3/heterogeneous_ranks", "why zero padding's high slots are small (one letter)",
        SLOT_OPTIONS, "b", {
            "a": "the clients hold every slot at about the same size: look at the replication row, which does not "
                 "fall with i",
            "c": "replication's slots keep the size the holders gave them (about the same in every slot): it is zero "
                 "padding's row that falls",
            "d": "the clients agree on each slot up to small noise; and the replication row averages the same few "
                 "holders without shrinking",
        }),
    "factor_spread": Exercise(
        "factor_spread", "sum_k p_k ||X_k - avg X||_F / sum_k p_k ||X_k||_F for X = A and X = B after each number "
        "of steps (toy_lora_clients)",
        _spread_reference, _spread_cases, _hint_spread, chapter="part3/personalized", kind="experiment",
    ),
    "factor_spread_explained": _explanation(
        "factor_spread_explained", "part3/personalized", "why the A's agree early on and the B's do not (one letter)",
        SPREAD_OPTIONS, "b", {
            "a": "A is 2 x 10 and B is 12 x 2: about as many entries, and the spreads are relative to each factor's "
                 "size",
            "c": "the targets are drawn independently for every client (toy_lora_clients): nothing is shared but "
                 "the start",
            "d": "look at your numbers after 5 and 20 steps: B's spread is several times A's",
        }),
    "dual_mix": Exercise(
        "dual_mix", "|| (1 - a) B_g A_g + a B_l A_l - T ||_F for each local weight a (toy_dual_client)",
        _mix_reference, _mix_cases, _hint_mix, chapter="part3/dual_adapters", kind="experiment",
    ),
    "dual_mix_explained": _explanation(
        "dual_mix_explained", "part3/dual_adapters", "why the best mix is between the two adapters (one letter)",
        MIX_OPTIONS, "c", {
            "a": "look at a = 1: the local adapter alone is worse than a mix; it was fitted to noisy examples",
            "b": "look at a = 0: the global adapter alone is worse than a mix; it fits the average client, not "
                 "this one",
            "d": "the mix is not trained: its rank adds no fit. At a = 0 and a = 1 the error is that of one rank-r "
                 "adapter; in between, the two adapters' errors (a bias and noise) partly cancel",
        }),
    "masked_errors": Exercise(
        "masked_errors", "mean |estimate - truth| over the entries kept by h clients, h = 1..6, for the masked mean "
        "(row 0) and the plain average (row 1) of toy_masked_clients",
        _holder_reference, _one_seed(350), _hint_holders, chapter="part3/structure", kind="experiment",
    ),
    "masked_mean_explained": _explanation(
        "masked_mean_explained", "part3/structure", "why the server averages over the holders (one letter)",
        HOLDER_OPTIONS, "b", {
            "a": "compare the rows at 1 holder: the plain average's error is well above the masked mean's",
            "c": "at 6 holders the two are equal to the last digit, and at 1 holder the plain average is the worse "
                 "one on every seed: chance would not pick the same side every time",
            "d": "the entries' true values are all of the same size here; the plain average's error at 1 holder is "
                 "most of the value itself",
        }),
    "cluster_errors": Exercise(
        "cluster_errors", "mean over clients of || cluster average - target_k || for k-means with each k "
        "(toy_grouped_clients)",
        _cluster_error_reference, _cluster_error_cases, _hint_cluster_errors, chapter="part3/clustering",
        kind="experiment",
    ),
    "cluster_count_explained": _explanation(
        "cluster_count_explained", "part3/clustering", "why the error is smallest at k = 3 (one letter)",
        CLUSTER_OPTIONS, "c", {
            "a": "look at k = 12: every client alone is worse than k = 3, since its own upload carries its noise",
            "b": "look at k = 1: one average for three groups is far from every group's target",
            "d": "the error falls by about half or more from k = 1 to k = 3: k-means finds the groups",
        }),
    "family_grouping": Exercise(
        "family_grouping", "mean over clients of || served - target_k || for one global average and for family "
        "averages, in the informative and the uninformative federation (toy_language_clients)",
        _grouping_reference, _one_seed(360), _hint_grouping, chapter="part3/languages", kind="experiment",
    ),
    "family_grouping_explained": _explanation(
        "family_grouping_explained", "part3/languages", "when grouping by a known label helps (one letter)",
        GROUPING_OPTIONS, "d", {
            "a": "look at the second row: where the family says nothing about the target, the family averages are "
                 "worse than the global one",
            "b": "look at the first row: where the families' targets differ, the family averages are closer",
            "c": "the pattern holds on every seed: family averages win in the first row and lose in the second",
        }),
    "new_client_errors": Exercise(
        "new_client_errors", "mean over new clients of || prediction - target || for a least-squares map from "
        "descriptors (with a constant) and for the average, related and unrelated (toy_described_clients)",
        _new_client_reference, _one_seed(370), _hint_new_clients, chapter="part3/hypernetwork", kind="experiment",
    ),
    "new_client_explained": _explanation(
        "new_client_explained", "part3/hypernetwork", "when a map from descriptors beats the average (one letter)",
        NEW_CLIENT_OPTIONS, "b", {
            "a": "look at the second row: where adapters do not depend on descriptors, the map loses to the average",
            "c": "look at the first row: where adapters depend on descriptors, the map is far closer",
            "d": "the map is fitted on the training clients only; a new client gives its descriptor, nothing else",
        }),
    "client_summary": Exercise(
        "client_summary", "(mean over clients, worst client) of || served - target_k || for one global average "
        "(row 0) and personal adapters (row 1) of toy_skewed_clients",
        _summary_reference, _one_seed(380), _hint_summary, chapter="part3/at_a_glance", kind="experiment",
    ),
    "worst_client_explained": _explanation(
        "worst_client_explained", "part3/at_a_glance", "why a personalization result needs the worst client "
        "(one letter)", SUMMARY_OPTIONS, "c", {
            "a": "compare the gains: the worst client's error falls several times more than the mean error does",
            "b": "look at the means: the personal adapters are better on average here too",
            "d": "look at the first row: the global adapter's worst client is more than twice its mean",
        }),
}
"""Part III's experiment-and-explanation exercises by name (merged into ``EXERCISES``)."""
