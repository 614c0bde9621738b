"""Exercises of the second kind: run a small experiment, report what it measured, choose the explanation.

The experiment runs on a toy federation small enough for any laptop: each client fits a LoRA
update ``B A`` (rank r) to its own target matrix ``T_k`` by full-batch gradient descent on
``1/2 || B A - T_k ||_F^2``, all clients from one shared start, the way a round of FedIT starts
every client from the server's adapter. :func:`toy_local_training` is that round; the student
writes the measurement on top of it, and :func:`fedlora_edu.teaching.exercises.check` compares the
numbers with the package's own measurement (same seed, so the same numbers), then checks the
chosen explanation; a wrong choice gets a hint that points at what the numbers show.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora_edu.assets.models import load_classifier
from fedlora_edu.core.factors import discordance, fedit_average, ideal_update
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.distributed.client_init import fedloru_global_weight
from fedlora_edu.distributed.corrective import fedex_residual
from fedlora_edu.distributed.full_size import flexlora, flora_stack
from fedlora_edu.distributed.rank_clustering import rank_vectors
from fedlora_edu.distributed.server_init import spectrum_share
from fedlora_edu.efficiency.compression import dequantize, pack_codes, quantize
from fedlora_edu.efficiency.layers import allocation_matrix
from fedlora_edu.efficiency.sparse import top_k_mask
from fedlora_edu.efficiency.split import named_share, update_attack
from fedlora_edu.teaching.checking import Exercise, case_seed, close, random_clients

TOY_SHAPE = (12, 10, 2)
"""m, n and the rank r of the toy federation's adapter."""


def toy_local_training(seed: int, steps: int, *, clients: int = 4, lr: float = 0.1,
                       start_b: str = "small", trained: str = "both") -> tuple[list[Tensor], list[Tensor], list[float]]:
    """One round of the toy federation: every client's ``(A_k, B_k)`` after ``steps`` gradient steps.

    The clients' targets ``T_k`` (m x n, rank 3, float64) and the shared start are drawn from
    ``seed``; ``start_b="small"`` starts B at small random values, ``"zero"`` at zero, as LoRA
    initializes it. ``trained="both"`` trains both factors; ``"B"`` keeps A frozen at the shared
    start, as FFA-LoRA does. Returns ``(As, Bs, weights)`` with weights ``p_k`` proportional to drawn
    sizes. :func:`toy_targets` returns the targets.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if start_b not in ("small", "zero"):
        raise ValueError(f"start_b must be 'small' or 'zero', got {start_b!r}")
    if trained not in ("both", "B"):
        raise ValueError(f"trained must be 'both' or 'B', got {trained!r}")
    targets, gen = _targets(seed, clients)
    m, n, r = TOY_SHAPE
    A0 = torch.randn(r, n, generator=gen, dtype=torch.float64) / n ** 0.5
    B0 = 0.1 * torch.randn(m, r, generator=gen, dtype=torch.float64)
    if start_b == "zero":
        B0 = torch.zeros_like(B0)
    sizes = torch.randint(20, 200, (clients,), generator=gen).double()
    As, Bs = [], []
    for target in targets:
        A, B = A0.clone(), B0.clone()
        for _ in range(steps):
            gap = B @ A - target
            A, B = (A if trained == "B" else A - lr * (B.T @ gap)), B - lr * (gap @ A.T)
        As.append(A)
        Bs.append(B)
    return As, Bs, (sizes / sizes.sum()).tolist()


def _targets(seed: int, clients: int) -> tuple[list[Tensor], torch.Generator]:
    m, n, _ = TOY_SHAPE
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy federation"))
    targets = [torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen,
                                                                                  dtype=torch.float64) / 3
               for _ in range(clients)]
    return targets, gen


def toy_targets(seed: int, clients: int = 4) -> list[Tensor]:
    """The targets ``T_k`` (m x n, rank 3) the clients of :func:`toy_local_training` fit."""
    return _targets(seed, clients)[0]


def _relative_discordance(As: list[Tensor], Bs: list[Tensor], weights: list[float], start: Tensor) -> float:
    """Discordance over the size of the ideal update, both measured from the round's start ``B0 A0``."""
    return discordance(As, Bs, weights) / float(torch.linalg.matrix_norm(ideal_update(As, Bs, weights) - start))


def _growth_reference(seed: int, steps: list[int]) -> Tensor:
    A0s, B0s, _ = toy_local_training(seed, 0)
    values = []
    for t in steps:
        As, Bs, weights = toy_local_training(seed, t)
        values.append(_relative_discordance(As, Bs, weights, B0s[0] @ A0s[0]))
    return torch.tensor(values, dtype=torch.float64)


def _growth_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 130 + offset), steps) for offset, steps in enumerate([[1, 2, 4, 8, 16], [1, 3, 9]])]


def _hint_growth(case: tuple, answer: object) -> str | None:
    seed, steps = case
    if not isinstance(answer, Tensor) or answer.shape != (len(steps),):
        return f"return a torch.Tensor with one value per entry of steps: {len(steps)} values"
    absolute = []
    relative_to_total = []
    for t in steps:
        A0s, B0s, _ = toy_local_training(seed, 0)
        As, Bs, weights = toy_local_training(seed, t)
        absolute.append(discordance(As, Bs, weights))
        relative_to_total.append(discordance(As, Bs, weights) / float(torch.linalg.matrix_norm(
            ideal_update(As, Bs, weights))))
    if close(answer, torch.tensor(absolute, dtype=torch.float64)):
        return "this is the discordance itself: divide it by || sum_k p_k B_k A_k - B0 A0 ||_F, the ideal update's size"
    if close(answer, torch.tensor(relative_to_total, dtype=torch.float64)):
        return "measure the ideal update from the round's start: subtract B0 A0 (the clients' common start)"
    return None


# ----- the explanations: one letter, a hint per wrong letter ----------------------------------------
@dataclass(frozen=True)
class Question:
    """Which explanation fits the measurement: the options by letter, the right one, a hint per wrong one."""
    text: str
    options: dict[str, str]
    answer: str
    hints: dict[str, str]


def _normalise_letter(answer: object) -> object:
    return answer.strip().lower() if isinstance(answer, str) else answer


def explanation_exercise(name: str, question: Question, chapter: str) -> Exercise:
    """The exercise ``name``: a function of no argument that returns the letter of the explanation.

    Registers ``question`` in :data:`QUESTIONS` (so :func:`show_options` prints it).
    """
    if question.answer not in question.options or set(question.hints) != set(question.options) - {question.answer}:
        raise ValueError(f"{name}: the answer must be an option and every other option needs a hint")
    QUESTIONS[name] = question

    def hints(case: tuple, answer: object) -> str | None:
        letter = _normalise_letter(answer)
        if letter not in question.options:
            return f"return one letter among {sorted(question.options)}"
        return question.hints.get(letter)  # type: ignore[arg-type]

    return Exercise(name, question.text + " (one letter)", lambda: question.answer, lambda seed: [()], hints,
                    chapter=chapter, kind="experiment", canonical=_normalise_letter)


QUESTIONS: dict[str, Question] = {}
"""Every explanation exercise's question by name; :func:`show_options` prints one in a notebook."""


def show_options(name: str) -> None:
    """Print the question ``name`` and its options, one per line, for the student to choose from."""
    if name not in QUESTIONS:
        raise ValueError(f"unknown question {name!r}; choose one of {sorted(QUESTIONS)}")
    question = QUESTIONS[name]
    print(question.text)
    for letter, text in question.options.items():
        print(f"  ({letter}) {text}")


QUESTIONS["discordance_growth_explained"] = Question(
    "Why does the relative discordance grow with the number of local steps?",
    {
        "a": "The clients' learning rates differ, so their factors drift apart.",
        "b": "Each client's A_k and B_k move away from the shared start together, and the product of the averages "
             "misses the cross terms sum_k p_k (B_k - avg B)(A_k - avg A), which grow as both factors drift.",
        "c": "Rounding errors accumulate with every local step.",
        "d": "The discordance does not grow: it is the same after any number of local steps.",
    },
    "b",
    {
        "a": "every client here runs the same learning rate (toy_local_training's lr): what differs is their target",
        "c": "the toy runs in float64, where rounding is near 1e-16; your numbers are many orders larger",
        "d": "look at your measurement again: does it stay the same from 1 step to 16?",
    },
)


# ----- Part I, federated learning: FedAvg's fixed point and local steps -------------------------------
TOY_FEDAVG_ROUNDS = 200
"""Rounds of :func:`toy_fedavg`: enough for every run of the exercise to reach its fixed point."""


def toy_fedavg(seed: int, local_steps: int, *, rounds: int = TOY_FEDAVG_ROUNDS, clients: int = 4,
               lr: float = 0.1) -> tuple[Tensor, Tensor]:
    """FedAvg on a toy least-squares federation: ``(the server's final model, the global optimum)``.

    Client k holds ``n_k`` examples ``X_k`` (5 features) with labels ``y_k = X_k w_k`` from its own
    ``w_k``, and minimises ``f_k(w) = ||X_k w - y_k||^2 / (2 n_k)``. The federation's objective is
    ``sum_k p_k f_k`` with ``p_k = n_k / n`` (survey eq. 1); its optimum ``w*`` is solved in closed
    form. Every round, every client takes ``local_steps`` gradient steps from the server's model and
    the server averages the results with ``p_k`` (FedAvg), from ``w = 0``.
    """
    if not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"local_steps must be an integer >= 1, got {local_steps!r}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy fedavg"))
    data = []
    for _ in range(clients):
        n = int(torch.randint(10, 60, (1,), generator=gen))
        X = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        data.append((X, X @ (2 * torch.randn(5, generator=gen, dtype=torch.float64))))
    p = torch.tensor([X.shape[0] for X, _ in data], dtype=torch.float64)
    p = p / p.sum()
    hessian = sum(p_k * X.T @ X / X.shape[0] for p_k, (X, _) in zip(p, data, strict=True))
    w_star = torch.linalg.solve(hessian, sum(p_k * X.T @ y / X.shape[0] for p_k, (X, y) in zip(p, data, strict=True)))
    w = torch.zeros(5, dtype=torch.float64)
    for _ in range(rounds):
        local = []
        for X, y in data:
            v = w.clone()
            for _ in range(local_steps):
                v = v - lr * X.T @ (X @ v - y) / X.shape[0]
            local.append(v)
        w = sum(p_k * v for p_k, v in zip(p, local, strict=True))
    return w, w_star


def _fedavg_drift_reference(seed: int, steps: list[int]) -> Tensor:
    values = []
    for t in steps:
        w, w_star = toy_fedavg(seed, t)
        values.append(float(torch.linalg.vector_norm(w - w_star) / torch.linalg.vector_norm(w_star)))
    return torch.tensor(values, dtype=torch.float64)


def _fedavg_drift_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 140), [1, 2, 4, 8]), (case_seed(seed, 141), [1, 3, 6])]


def _hint_fedavg_drift(case: tuple, answer: object) -> str | None:
    seed, steps = case
    if not isinstance(answer, Tensor) or answer.shape != (len(steps),):
        return f"return a torch.Tensor with one value per entry of steps: {len(steps)} values"
    runs = [toy_fedavg(seed, t) for t in steps]
    if close(answer, torch.tensor([float(torch.linalg.vector_norm(w - s)) for w, s in runs], dtype=torch.float64)):
        return "this is the distance itself: divide it by ||w*|| to make seeds comparable"
    return None


QUESTIONS["fedavg_drift_explained"] = Question(
    "With one local step FedAvg reaches the global optimum; with more it settles further away. Why?",
    {
        "a": "More local steps need more rounds: the runs have not converged yet.",
        "b": "Each client's local steps pull the model toward its own optimum; the average of those local models is "
             "not where the federation's gradient vanishes, so FedAvg settles at a biased fixed point (client drift). "
             "With one step, the average of the clients' steps is a gradient step on the global objective.",
        "c": "The learning rate is too large for several local steps, so training diverges.",
        "d": "Rounding errors grow with the number of local steps.",
    },
    "b",
    {
        "a": "run toy_fedavg with more rounds (rounds=...): the distance stays put, the runs are at a fixed point",
        "c": "a diverging run would grow without bound; your distances are finite and stable over rounds",
        "d": "the toy is in float64: rounding is near 1e-16, your distances are many orders larger",
    },
)


# ----- Part II, single matrix: FFA-LoRA's trade ---------------------------------------------------------
def _ffa_reference(seed: int, steps: list[int]) -> Tensor:
    targets = toy_targets(seed)
    rows = []
    for t in steps:
        fits = {}
        for trained in ("both", "B"):  # the frozen-A run last: its discordance is measured below
            As, Bs, weights = toy_local_training(seed, t, trained=trained)
            fits[trained] = sum(float(torch.linalg.matrix_norm(B @ A - T) / torch.linalg.matrix_norm(T))
                                for A, B, T in zip(As, Bs, targets, strict=True)) / len(targets)
        rows.append([discordance(As, Bs, weights), fits["B"] - fits["both"]])
    return torch.tensor(rows, dtype=torch.float64)


def _ffa_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 150), [4, 16, 64]), (case_seed(seed, 151), [8, 32])]


def _hint_ffa(case: tuple, answer: object) -> str | None:
    seed, steps = case
    if not isinstance(answer, Tensor) or answer.shape != (len(steps), 2):
        return f"return a torch.Tensor of shape ({len(steps)}, 2): per number of steps, [discordance, fit gap]"
    expected = _ffa_reference(seed, steps)
    if close(answer[:, 1], -expected[:, 1]):
        return "the fit gap's sign is flipped: FFA-LoRA's error minus the error when both factors train"
    if not close(answer[:, 0], expected[:, 0]):
        return "measure the discordance of the run that keeps A frozen (trained='B')"
    return None


QUESTIONS["ffa_tradeoff_explained"] = Question(
    "FFA-LoRA (A frozen) shows no discordance but fits the clients' targets worse. Why?",
    {
        "a": "Every client shares the frozen A, so sum_k p_k B_k A = (sum_k p_k B_k) A exactly; but B A can only "
             "reach the rows spanned by A's r rows, so part of each target stays out of reach.",
        "b": "Its B matrices are equal across clients, which removes the discordance.",
        "c": "It trains fewer numbers, which makes every step smaller, and given enough steps it fits as well.",
        "d": "The discordance is zero only by chance on these seeds.",
    },
    "a",
    {
        "b": "the clients' B_k differ (each fits its own target): it is A that they share",
        "c": "look at the gap from 16 to 64 steps: it stays about the same, the frozen A bounds what B A can fit",
        "d": "(sum_k p_k B_k) A equals sum_k p_k B_k A for any B_k when A is shared: it is zero on every seed",
    },
)


# ----- Part II, full size and at a glance: how far each aggregation lands from the ideal update -------
def _aggregation_errors_reference(seed: int, steps: list[int]) -> Tensor:

    A0s, B0s, _ = toy_local_training(seed, 0)
    start = B0s[0] @ A0s[0]
    rows = []
    for t in steps:
        As, Bs, weights = toy_local_training(seed, t)
        ideal = ideal_update(As, Bs, weights)
        size = float(torch.linalg.matrix_norm(ideal - start))
        A_avg, B_avg = fedit_average(As, Bs, weights)
        A_stack, B_stack = flora_stack(As, Bs, weights)
        (A_flex, B_flex), = flexlora(As, Bs, weights, [TOY_SHAPE[2]])
        rows.append([float(torch.linalg.matrix_norm(B @ A - ideal)) / size
                     for A, B in ((A_avg, B_avg), (A_stack, B_stack), (A_flex, B_flex))])
    return torch.tensor(rows, dtype=torch.float64)


def _aggregation_errors_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 160), [1, 4, 16]), (case_seed(seed, 161), [2, 8])]


def _hint_aggregation_errors(case: tuple, answer: object) -> str | None:
    seed, steps = case
    if not isinstance(answer, Tensor) or answer.shape != (len(steps), 3):
        return f"return a torch.Tensor of shape ({len(steps)}, 3): per number of steps, FedIT, FLoRA, FlexLoRA"
    expected = _aggregation_errors_reference(seed, steps)
    if close(answer[:, [0, 2, 1]], expected):
        return "the columns are FedIT, FLoRA, FlexLoRA, in that order"
    return None


QUESTIONS["aggregation_errors_explained"] = Question(
    "FLoRA lands on the ideal update, FlexLoRA near it, FedIT furthest. Why this order?",
    {
        "a": "FLoRA's stacks hold every client's factors, so their product is the ideal update (rank up to K r); "
             "FlexLoRA keeps the best rank-r approximation of it (Eckart-Young), and FedIT's avg(B) avg(A) is "
             "another rank-r matrix, so it can be no closer than FlexLoRA's.",
        "b": "FlexLoRA trains longer than FedIT.",
        "c": "FedIT's error is rounding; FlexLoRA's and FLoRA's are smaller because they work in float64.",
        "d": "The order changes from seed to seed.",
    },
    "a",
    {
        "b": "all three aggregate the same uploads of the same local training: only the server's step differs",
        "c": "every method here runs in float64; FedIT's error is many orders above rounding",
        "d": "Eckart-Young makes FlexLoRA's error at most FedIT's for any uploads; try other seeds",
    },
)


# ----- Part II, rank clustering: what a rank vector z = [a, b] does not see ----------------------------
def toy_adapter(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A client's rank-3 adapter ``(A, B)`` (A 3 x 5, B 6 x 3) and a random 3 x 3 rotation ``Q``, from ``seed``."""
    As, Bs, _ = random_clients(derive_seed(seed, "toy adapter"), [3], m=6, n=5)
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy rotation"))
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    return As[0], Bs[0], q


def _symmetry_cases(seed: int) -> list[tuple]:
    return [toy_adapter(case_seed(seed, 170 + offset)) for offset in range(2)]


def _symmetry_reference(A: Tensor, B: Tensor, rotation: Tensor) -> Tensor:

    r = A.shape[0]
    scale = torch.diag(torch.linspace(0.5, 2.0, r, dtype=torch.float64))
    transforms = {"sign": -torch.eye(r, dtype=torch.float64), "scale": scale, "rotation": rotation}
    Z = rank_vectors([A], [B], [1.0])[0]
    rows = []
    for G in transforms.values():
        A_new, B_new = G @ A, B @ torch.linalg.inv(G)
        Z_new = rank_vectors([A_new], [B_new], [1.0])[0]
        rows.append([float(torch.linalg.matrix_norm(B_new @ A_new - B @ A) / torch.linalg.matrix_norm(B @ A)),
                     float(torch.linalg.matrix_norm(Z_new - Z) / torch.linalg.matrix_norm(Z))])
    return torch.tensor(rows, dtype=torch.float64)


def _hint_symmetry(case: tuple, answer: object) -> str | None:
    if not isinstance(answer, Tensor) or answer.shape != (3, 2):
        return "return a torch.Tensor of shape (3, 2): rows sign, scale, rotation; columns product change, z change"
    A, B, rotation = case
    expected = _symmetry_reference(A, B, rotation)
    if close(answer[:, [1, 0]], expected):
        return "the columns are swapped: first the product's relative change, then the rank vectors'"
    return None


QUESTIONS["rank_vector_symmetry_explained"] = Question(
    "Re-factoring an adapter as (G A, B G^-1) leaves B A unchanged but moves its rank vectors. What follows?",
    {
        "a": "Nothing: k-means on z only sees the products B A.",
        "b": "A rank vector z = [a_i, b_i] describes one factorization, not the update: two clients with the same "
             "B A can send components that k-means puts in different clusters, so FedInc's clusters depend on how "
             "each client's training happened to factor its update.",
        "c": "The products change too, by rounding, so the change is harmless.",
        "d": "Only a rotation moves z; signs and scales leave it unchanged.",
    },
    "b",
    {
        "a": "k-means runs on the rows of Z, which your second column shows moving while B A stays put",
        "c": "your first column is at rounding level while the second is of order one: the products do not move",
        "d": "look at the sign and scale rows of your measurement: z moves there as well",
    },
)


# ----- Part II, server initialization: where a pre-trained weight keeps its energy ---------------------
@functools.lru_cache(maxsize=1)
def pretrained_query_weight() -> Tensor:
    """The query projection of the embedded encoder's first layer (MiniLM), float64, as loaded offline."""
    model, _ = load_classifier(num_labels=2, seed=0)
    weights = [p for name, p in model.named_parameters() if name.endswith("layer.0.attention.self.query.weight")]
    if len(weights) != 1:
        raise RuntimeError("the embedded encoder has no single layer-0 query weight")
    return weights[0].detach().to(torch.float64).clone()


def gaussian_like(weight: Tensor, seed: int = 0) -> Tensor:
    """A Gaussian matrix with ``weight``'s shape and entry standard deviation (a weight with no structure)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "gaussian like"))
    return torch.randn(weight.shape, generator=gen, dtype=torch.float64) * float(weight.std())


def _spectrum_reference(ranks: list[int]) -> Tensor:

    weight = pretrained_query_weight()
    return torch.tensor([[spectrum_share(w, r) for r in ranks] for w in (weight, gaussian_like(weight))],
                        dtype=torch.float64)


def _hint_spectrum(case: tuple, answer: object) -> str | None:
    (ranks,) = case
    if not isinstance(answer, Tensor) or answer.shape != (2, len(ranks)):
        return f"return a torch.Tensor of shape (2, {len(ranks)}): the pre-trained weight's row, then the Gaussian's"
    weight = pretrained_query_weight()
    plain = torch.tensor([[float(torch.linalg.svdvals(w)[:r].sum() / torch.linalg.svdvals(w).sum()) for r in ranks]
                          for w in (weight, gaussian_like(weight))], dtype=torch.float64)
    if close(answer, plain):
        return "the share of ||W||_F^2 sums the squared singular values, not the singular values"
    return None


QUESTIONS["spectrum_share_explained"] = Question(
    "The pre-trained weight holds more of its energy in its top-r directions than a Gaussian matrix of the same "
    "shape and scale. What does FeDeRA make of it?",
    {
        "a": "Nothing: both matrices have the same singular values.",
        "b": "Pre-training concentrates a weight's energy in a few directions; FeDeRA starts the adapter on them "
             "(B A = the top-r part, W' = W - B A), so training moves the directions that already matter, where "
             "a random start spreads the adapter evenly.",
        "c": "The Gaussian matrix is larger in norm, so its shares are smaller.",
        "d": "FeDeRA needs the smallest singular directions, which a pre-trained weight has fewer of.",
    },
    "b",
    {
        "a": "compare your two rows: the pre-trained weight's shares are larger at every rank",
        "c": "the share is a ratio: scaling a matrix does not change it, and the Gaussian has the weight's scale",
        "d": "FeDeRA keeps the top-r singular directions (the largest), as eq. 10's U[:, :r] and S[:r] say",
    },
)


# ----- Part II, client initialization: the rank FedLoRU accumulates ------------------------------------
def toy_global_adapters(seed: int, count: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` rank-r global adapters ``(A_t, B_t)``, one per accumulation round (random, the toy's shapes)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    m, n, r = TOY_SHAPE
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy global adapters"))
    return [(torch.randn(r, n, generator=gen, dtype=torch.float64), torch.randn(m, r, generator=gen,
                                                                                dtype=torch.float64))
            for _ in range(count)]


def _accumulated_rank_reference(seed: int, counts: list[int]) -> Tensor:

    ranks = []
    for count in counts:
        adapters = toy_global_adapters(seed, count)
        update = fedloru_global_weight(torch.zeros(TOY_SHAPE[0], TOY_SHAPE[1], dtype=torch.float64), adapters, 1.0)
        ranks.append(float(torch.linalg.matrix_rank(update)))
    return torch.tensor(ranks, dtype=torch.float64)


def _accumulated_rank_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 180), [1, 2, 3, 4, 5, 6]), (case_seed(seed, 181), [2, 7])]


def _hint_accumulated_rank(case: tuple, answer: object) -> str | None:
    seed, counts = case
    if not isinstance(answer, Tensor) or answer.shape != (len(counts),):
        return f"return a torch.Tensor with one rank per entry of counts: {len(counts)} values"
    if close(answer, torch.tensor([float(TOY_SHAPE[2])] * len(counts), dtype=torch.float64)):
        return "this is the rank of one adapter; measure the rank of the sum of the first T adapters' B_t A_t"
    return None


QUESTIONS["accumulated_rank_explained"] = Question(
    "FedLoRU sends rank-r adapters, yet its merged update reaches a higher rank. Why, and where does it stop?",
    {
        "a": "Each accumulation round merges B_t A_t into W', and a sum of T rank-r matrices has rank up to T r; "
             "it stops at min(m, n), the most any m x n matrix has.",
        "b": "The rank grows because of rounding in the merge.",
        "c": "Every merged adapter has rank T r.",
        "d": "It does not: the merged update stays at rank r.",
    },
    "a",
    {
        "b": "the ranks you measured grow in steps of exactly r: rounding would not do that",
        "c": "each adapter is m x r times r x n: its rank is at most r",
        "d": "your measurement grows with the number of accumulated rounds",
    },
)


# ----- Part I, LoRA: what rank r can fit -----------------------------------------------------------------
def toy_lora_fit(seed: int, rank: int, *, steps: int = 400, lr: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """One client's LoRA of rank ``rank`` trained on the toy's first target: ``(A, B, T)`` after ``steps`` steps.

    Gradient descent on ``1/2 ||B A - T||_F^2`` from A random and B small (T is ``toy_targets(seed)[0]``,
    12 x 10 of rank 3).
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    target = toy_targets(seed)[0]
    m, n, _ = TOY_SHAPE
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy lora fit"))
    A = torch.randn(rank, n, generator=gen, dtype=torch.float64) / n ** 0.5
    B = 0.1 * torch.randn(m, rank, generator=gen, dtype=torch.float64)
    for _ in range(steps):
        gap = B @ A - target
        A, B = A - lr * (B.T @ gap), B - lr * (gap @ A.T)
    return A, B, target


def _lora_fit_reference(seed: int, ranks: list[int]) -> Tensor:
    rows = []
    for r in ranks:
        A, B, target = toy_lora_fit(seed, r)
        sigma = torch.linalg.svdvals(target)
        rows.append([float(torch.linalg.matrix_norm(B @ A - target) / torch.linalg.matrix_norm(target)),
                     float(sigma[r:].square().sum().sqrt() / sigma.square().sum().sqrt())])
    return torch.tensor(rows, dtype=torch.float64)


def _lora_fit_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 190), [1, 2, 3, 4]), (case_seed(seed, 191), [2, 5])]


def _hint_lora_fit(case: tuple, answer: object) -> str | None:
    seed, ranks = case
    if not isinstance(answer, Tensor) or answer.shape != (len(ranks), 2):
        return f"return a torch.Tensor of shape ({len(ranks)}, 2): per rank, [trained error, Eckart-Young bound]"
    expected = _lora_fit_reference(seed, ranks)
    if close(answer[:, 0], expected[:, 0]) and not close(answer[:, 1], expected[:, 1]):
        return ("the bound is sqrt(sum_{i > r} sigma_i^2) / sqrt(sum_i sigma_i^2): the discarded singular values, "
                "squared")
    return None


QUESTIONS["lora_rank_fit_explained"] = Question(
    "The trained LoRA's error equals the bound at every rank and vanishes from r = 3 on. Why?",
    {
        "a": "The target has rank 3: a rank-r product B A can be any matrix of rank at most r, so training reaches the "
             "best rank-r approximation (Eckart-Young), whose error is the discarded singular values, and nothing "
             "once r reaches the target's rank.",
        "b": "Larger ranks train longer.",
        "c": "The bound is a coincidence of these seeds.",
        "d": "LoRA always fits exactly; the error at r = 1 and 2 is rounding.",
    },
    "a",
    {
        "b": "every rank trains the same number of steps here",
        "c": "the trained error and the bound agree on every seed and rank: try others",
        "d": "the errors at r = 1 and 2 are of order one, far above float64 rounding",
    },
)


# ----- Part I, FedLoRA: one local step is one centralised step -------------------------------------------
def toy_central_training(seed: int, steps: int, *, clients: int = 4, lr: float = 0.1) -> tuple[Tensor, Tensor]:
    """Centralised training on the toy federation's data: ``(A, B)`` after ``steps`` gradient steps.

    Gradient descent on ``sum_k p_k 1/2 ||B A - T_k||_F^2`` (all clients' targets, FedAvg's weights) from the
    shared start of :func:`toy_local_training`, at the same learning rate.
    """
    As0, Bs0, weights = toy_local_training(seed, 0, clients=clients)
    targets = toy_targets(seed, clients)
    A, B = As0[0].clone(), Bs0[0].clone()
    for _ in range(steps):
        gap = B @ A - sum(p * T for p, T in zip(weights, targets, strict=True))
        A, B = A - lr * (B.T @ gap), B - lr * (gap @ A.T)
    return A, B


def _fedit_central_reference(seed: int, steps: list[int]) -> Tensor:

    As0, Bs0, _ = toy_local_training(seed, 0)
    start = Bs0[0] @ As0[0]
    values = []
    for t in steps:
        A_avg, B_avg = fedit_average(*toy_local_training(seed, t))
        A_c, B_c = toy_central_training(seed, t)
        values.append(float(torch.linalg.matrix_norm(B_avg @ A_avg - B_c @ A_c)
                            / torch.linalg.matrix_norm(B_c @ A_c - start)))
    return torch.tensor(values, dtype=torch.float64)


def _fedit_central_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 200), [1, 2, 4, 16]), (case_seed(seed, 201), [1, 8])]


def _hint_fedit_central(case: tuple, answer: object) -> str | None:
    seed, steps = case
    if not isinstance(answer, Tensor) or answer.shape != (len(steps),):
        return f"return a torch.Tensor with one value per entry of steps: {len(steps)} values"
    return None


QUESTIONS["fedit_one_step_explained"] = Question(
    "After one local step FedIT's averaged adapter is the centralised one exactly; after more it is not. Why?",
    {
        "a": "A gradient is linear in the data, so the average of the clients' one-step updates from a common start "
             "is one step on the weighted objective; from the second step on each client's gradient depends on its "
             "own moved factors, and the product of averaged factors is not the average of products.",
        "b": "The centralised run uses a different learning rate.",
        "c": "Rounding makes the two differ after many steps.",
        "d": "FedIT samples different clients each step.",
    },
    "a",
    {
        "b": "both runs use lr = 0.1 from the same start (toy_central_training's docstring)",
        "c": "the gap after several steps is far above float64 rounding",
        "d": "here every client trains every step of the round; nothing is sampled",
    },
)


# ----- Part II, full size: what each server sends back ------------------------------------------------------
def _download_reference(seed: int, clients: list[int]) -> Tensor:

    rows = []
    for K in clients:
        As, Bs, weights = toy_local_training(seed, 1, clients=K)
        sent = (fedit_average(As, Bs, weights), flora_stack(As, Bs, weights),
                flexlora(As, Bs, weights, [TOY_SHAPE[2]])[0])
        rows.append([float(sum(x.numel() for x in pair)) for pair in sent])
    return torch.tensor(rows, dtype=torch.float64)


def _download_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 210), [1, 2, 4, 8]), (case_seed(seed, 211), [3, 6])]


def _hint_download(case: tuple, answer: object) -> str | None:
    seed, clients = case
    if not isinstance(answer, Tensor) or answer.shape != (len(clients), 3):
        return f"return a torch.Tensor of shape ({len(clients)}, 3): per K, numbers sent by FedIT, FLoRA, FlexLoRA"
    expected = _download_reference(seed, clients)
    if close(answer * 4, expected) or close(answer, expected * 4):
        return "count numbers (tensor.numel()), not bytes"
    return None


QUESTIONS["download_size_explained"] = Question(
    "FLoRA's download grows with the number of clients; FedIT's and FlexLoRA's do not. Why?",
    {
        "a": "FLoRA sends the stacks themselves, r_k rows and columns per client, so its download is "
             "(sum_k r_k)(m + n); FedIT averages to one rank-r pair and FlexLoRA re-factors the ideal update to "
             "rank r, r (m + n) each.",
        "b": "FLoRA sends the dense m x n update.",
        "c": "FedIT compresses its download.",
        "d": "The sizes depend on the clients' data.",
    },
    "a",
    {
        "b": "m x n here is 120 numbers; compare with what you counted for FLoRA at K = 8",
        "c": "FedIT sends two plain averaged factors: count them",
        "d": "the sizes depend only on m, n, the ranks and K: the data never enter them",
    },
)


# ----- Part II, corrective: the rank of FedEx-LoRA's residual ---------------------------------------------
def _residual_rank_reference(seed: int, clients: list[int]) -> Tensor:

    return torch.tensor([float(torch.linalg.matrix_rank(fedex_residual(*toy_local_training(seed, 8, clients=K))))
                         for K in clients], dtype=torch.float64)


def _residual_rank_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 220), [2, 3, 4, 5]), (case_seed(seed, 221), [2, 6])]


def _hint_residual_rank(case: tuple, answer: object) -> str | None:
    seed, clients = case
    if not isinstance(answer, Tensor) or answer.shape != (len(clients),):
        return f"return a torch.Tensor with one rank per entry of clients: {len(clients)} values"
    if close(answer, torch.tensor([float(min(K * TOY_SHAPE[2], 10)) for K in clients], dtype=torch.float64)):
        return "K r is a bound, not the measurement: take torch.linalg.matrix_rank of the residual itself"
    return None


QUESTIONS["residual_rank_explained"] = Question(
    "FedEx-LoRA's residual has rank (K - 1) r, not K r. Why?",
    {
        "a": "The residual is sum_k p_k (B_k - avg B)(A_k - avg A); the K weighted deviations B_k - avg B sum to "
             "zero, so only K - 1 of them are independent: the residual's column space has dimension at most "
             "(K - 1) r.",
        "b": "One client's update is always zero.",
        "c": "The numerical rank drops one block by rounding.",
        "d": "The residual is FedIT's product, of rank r.",
    },
    "a",
    {
        "b": "every client trains 8 steps from the start on its own target: none is zero",
        "c": "the rank falls short by exactly r = 2 for every K: rounding would not be that regular",
        "d": "FedIT's product has rank r = 2; your ranks grow with K",
    },
)


# ----- Part IV, sparse: how much a top-k payload keeps ---------------------------------------------------
def random_mask(tensors: dict[str, Tensor], density: float, seed: int = 0) -> dict[str, Tensor]:
    """Masks keeping ``ceil(density x total)`` entries chosen uniformly at random over all ``tensors`` together."""
    total = sum(t.numel() for t in tensors.values())
    k = int(torch.tensor(density * total).ceil())
    gen = torch.Generator().manual_seed(derive_seed(seed, "random mask"))
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[:k]] = True
    masks, start = {}, 0
    for name, t in tensors.items():
        masks[name] = keep[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return masks


def toy_adapter_change(seed: int, steps: int = 16) -> dict[str, Tensor]:
    """What client 0 of the toy federation changed in a round: ``{"A": A - A0, "B": B - B0}``."""
    As0, Bs0, _ = toy_local_training(seed, 0)
    As, Bs, _ = toy_local_training(seed, steps)
    return {"A": As[0] - As0[0], "B": Bs[0] - Bs0[0]}


def _kept_energy_reference(seed: int, densities: list[float]) -> Tensor:

    change = toy_adapter_change(seed)
    total = sum(float(t.square().sum()) for t in change.values())
    rows = []
    for masks_of in (lambda d: top_k_mask(change, d), lambda d: random_mask(change, d, seed)):
        row = []
        for density in densities:
            masks = masks_of(density)
            row.append(sum(float(change[name][masks[name]].square().sum()) for name in change) / total)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def _kept_energy_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 230), [0.05, 0.1, 0.25, 0.5]), (case_seed(seed, 231), [0.2])]


def _hint_kept_energy(case: tuple, answer: object) -> str | None:
    seed, densities = case
    if not isinstance(answer, Tensor) or answer.shape != (2, len(densities)):
        return f"return a torch.Tensor of shape (2, {len(densities)}): the top-k row, then the random row"
    expected = _kept_energy_reference(seed, densities)
    if close(answer.flip(0), expected):
        return "the rows are swapped: top-k first, then the random mask"
    return None


def _unheld_layers_reference(client_counts: list[int], num_layers: int, budget: int, rounds: int,
                             seed: int) -> Tensor:
    measured, formula = [], []
    for clients in client_counts:
        unheld = [~allocation_matrix([budget] * clients, num_layers, seed + t).any(axis=0) for t in range(rounds)]
        measured.append(float(sum(int(row.sum()) for row in unheld)) / (rounds * num_layers))
        formula.append((1 - budget / num_layers) ** clients)
    return torch.tensor([measured, formula], dtype=torch.float64)


def _unheld_layers_cases(seed: int) -> list[tuple]:
    return [([1, 2, 4, 8], 6, 2, 200, case_seed(seed, 240)), ([1, 3], 4, 1, 50, case_seed(seed, 241))]


def _hint_unheld_layers(case: tuple, answer: object) -> str | None:
    client_counts = case[0]
    if not isinstance(answer, Tensor) or answer.shape != (2, len(client_counts)):
        return f"return a torch.Tensor of shape (2, {len(client_counts)}): the measured row, then (1 - b / L) ** K"
    expected = _unheld_layers_reference(*case)
    if close(answer.flip(0), expected):
        return "the rows are swapped: the measured share first, then the formula"
    if close(answer[1], expected[1]) and close(1 - answer[0], expected[0]):
        return "count the (round, layer) pairs that NO client holds, not those some client holds"
    return None


QUESTIONS["unheld_layers_explained"] = Question(
    "With a fixed number of layers per client, the share of layers no client holds in a round falls as the round "
    "has more clients, and matches (1 - b / L) ** K. Why, and what happens to such a layer?",
    {
        "a": "Each client holds a given layer with probability b / L, independently of the others, so nobody holds it "
             "with probability (1 - b / L) ** K, which falls geometrically with K; a layer nobody holds keeps its "
             "value that round, so with few clients per round some layers stall.",
        "b": "The allocation matrix gives every layer to at least one client, so the share is zero.",
        "c": "With more clients each client holds more layers.",
        "d": "The share does not depend on the number of clients; it is 1 - b / L.",
    },
    "a",
    {
        "b": "look at your measured row: it is not zero for one or two clients",
        "c": "every row of the allocation matrix holds exactly b ones, whatever K is",
        "d": "1 - b / L is the share for one client: compare your row for K = 1 with the others",
    },
)


QUESTIONS["kept_energy_explained"] = Question(
    "At each density the top-k mask keeps more of the change's squared norm than a random mask of the same size. "
    "Why, and what does the random mask keep?",
    {
        "a": "Top-k keeps the k largest entries, so no other choice of k entries keeps more of the squared norm; a "
             "random mask keeps about the density's share of it on average.",
        "b": "Top-k keeps more entries than the random mask.",
        "c": "The random mask keeps the smallest entries.",
        "d": "The change is sparse, so any mask keeps almost all of it.",
    },
    "a",
    {
        "b": "both keep exactly ceil(density x total) entries: count them",
        "c": "it draws entries uniformly: compare its row with the densities themselves",
        "d": "look at the random row: a sparse change would make it far from the density",
    },
)


# ----- Part IV, compression: what a bit buys ----------------------------------------------------------------------
def _quantization_error_reference(seed: int, bits: list[int]) -> Tensor:
    change = toy_adapter_change(seed)
    norm = math.sqrt(sum(float(t.square().sum()) for t in change.values()))
    errors, sizes = [], []
    for b in bits:
        squared, nbytes = 0.0, 0
        for value in change.values():
            codes, low, step = quantize(value, b, stochastic=False)
            squared += float((dequantize(codes, low, step).double() - value.double()).square().sum())
            nbytes += pack_codes(codes, b).numel() + 8
        errors.append(math.sqrt(squared) / norm)
        sizes.append(float(nbytes))
    return torch.tensor([errors, sizes], dtype=torch.float64)


def _quantization_error_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 260), [1, 2, 4, 8]), (case_seed(seed, 261), [3, 6])]


def _hint_quantization_error(case: tuple, answer: object) -> str | None:
    seed, bits = case
    if not isinstance(answer, Tensor) or answer.shape != (2, len(bits)):
        return f"return a torch.Tensor of shape (2, {len(bits)}): the error row, then the bytes row"
    expected = _quantization_error_reference(seed, bits)
    if close(answer.flip(0), expected):
        return "the rows are swapped: the relative error first, then the bytes"
    change = toy_adapter_change(seed)
    if close(answer[1], torch.tensor([float(sum(math.ceil(t.numel() * b / 8) for t in change.values()))
                                      for b in bits], dtype=torch.float64)):
        return "each factor also sends its grid: low and step, two float32 numbers (8 bytes)"
    if close(answer[1], torch.tensor([float(sum(t.numel() * b for t in change.values()) + 64 * len(change))
                                      for b in bits], dtype=torch.float64)):
        return "count bytes, not bits: ceil(numel x b / 8) bytes of packed codes per factor"
    return None


QUESTIONS["quantization_error_explained"] = Question(
    "Rounding to the nearest level, each bit more roughly halves the relative error of the decoded change, while the "
    "bytes grow by one eighth of a byte per entry. Why?",
    {
        "a": "b bits give 2^b - 1 steps between the minimum and the maximum, so one bit more halves the step and with "
             "it the largest rounding error (half a step); the codes cost b / 8 bytes per entry, so each bit adds the "
             "same number of bytes.",
        "b": "Each bit more keeps twice as many entries of the change.",
        "c": "The error halves because the grid's minimum and maximum are sent with more precision.",
        "d": "The bytes double with each bit, like the number of levels.",
    },
    "a",
    {
        "b": "quantization keeps every entry: it is top-k that keeps some entries",
        "c": "low and step are two float32 numbers whatever the bits: look at what changes with b",
        "d": "look at your bytes row: it grows by the same amount for each bit, it does not double",
    },
)


# ----- Part IV, the cost of a federation: what a rank costs a step ---------------------------------------------------
def _lora_flops(batch: int, m: int, n: int, r: int, *, backward: bool = True, input_grad: bool = True) -> float:
    """The FLOPs FlopCounterMode counts for y = x W^T + (x A^T) B^T summed: forward, and backward unless told not."""
    from torch.utils.flop_counter import FlopCounterMode

    weight = torch.ones(m, n, dtype=torch.float64)  # frozen
    a = torch.ones(r, n, dtype=torch.float64, requires_grad=True)
    b = torch.ones(m, r, dtype=torch.float64, requires_grad=True)
    inputs = torch.ones(batch, n, dtype=torch.float64, requires_grad=input_grad)  # an adapted layer below: True
    with FlopCounterMode(display=False) as counter:
        loss = (inputs @ weight.T + (inputs @ a.T) @ b.T).sum()
        if backward:
            loss.backward()
    return float(counter.get_total_flops())


def _lora_step_flops_reference(batch: int, m: int, n: int, ranks: list[int]) -> Tensor:
    return torch.tensor([_lora_flops(batch, m, n, r) for r in ranks], dtype=torch.float64)


def _lora_step_flops_cases(seed: int) -> list[tuple]:
    # FLOPs depend on shapes only: the seed picks the shapes
    gen = torch.Generator().manual_seed(case_seed(seed, 290))
    m, n = (int(x) for x in torch.randint(64, 257, (2,), generator=gen))
    return [(16, 384, 384, [1, 2, 4, 8, 16, 32]), (int(torch.randint(2, 33, (1,), generator=gen)), m, n, [1, 4, 8])]


def _hint_lora_step_flops(case: tuple, answer: object) -> str | None:
    batch, m, n, ranks = case
    if not isinstance(answer, Tensor) or answer.shape != (len(ranks),):
        return f"return a torch.Tensor of shape ({len(ranks)},): one FLOP count per rank"
    if close(answer, torch.tensor([_lora_flops(batch, m, n, r, backward=False) for r in ranks], dtype=torch.float64)):
        return "count the backward pass too: call .backward() inside the FlopCounterMode block"
    if close(answer, torch.tensor([_lora_flops(batch, m, n, r, input_grad=False) for r in ranks], dtype=torch.float64)):
        return "the input requires a gradient (an adapter below it is trained), so dL/dx runs through W too"
    if close(answer, 2 * _lora_step_flops_reference(*case)) or close(answer, _lora_step_flops_reference(*case) / 2):
        return "count 2 FLOPs per multiply-add, as FlopCounterMode does: read get_total_flops() as it is"
    return None


QUESTIONS["lora_step_flops_explained"] = Question(
    "A LoRA layer's forward and backward FLOPs grow with the rank r, but on a 384 x 384 layer going from rank 1 to "
    "rank 32 adds far less than 32 times rank 1's cost. Why?",
    {
        "a": "The frozen product x W^T and its backward dL/dx cost 2 b m n FLOPs each whatever r is; the adapter adds "
             "about 2 b r (m + n) per product, small next to b m n while r is much smaller than m and n.",
        "b": "FlopCounterMode does not count the adapter's matrices, only the frozen weight.",
        "c": "A higher rank makes the adapter's matrices sparser, so they cost fewer FLOPs each.",
        "d": "The backward pass of a LoRA layer skips the frozen weight entirely, so only r matters there.",
    },
    "a",
    {
        "b": "look at your counts: they do grow with r, so the adapter's products are counted",
        "c": "the factors here are dense (every entry one): their products cost in proportion to r",
        "d": "the input needs its gradient for the layers below, and dL/dx = dL/dy W goes through the frozen weight",
    },
)


# ----- Part IV, privacy: noise in the product -----------------------------------------------------------------------
def toy_noisy_factors(seed: int, m: int = 48, r: int = 4, n: int = 64) -> dict[str, Tensor]:
    """A rank-r adapter and one draw of standard normal noise for each factor (float64).

    ``A`` (r x n) as peft draws it (uniform on +-1/sqrt(n)), ``B`` (m x r) as after some training
    (normal, standard deviation 0.02), ``noise_A`` and ``noise_B`` of their shapes. Scaled by s, the
    noise is what a DP server adds to the factors at s per number.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy noisy factors"))
    a = (torch.rand(r, n, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(n)
    b = 0.02 * torch.randn(m, r, generator=gen, dtype=torch.float64)
    return {"A": a, "B": b, "noise_A": torch.randn(r, n, generator=gen, dtype=torch.float64),
            "noise_B": torch.randn(m, r, generator=gen, dtype=torch.float64)}


def _noise_in_product_reference(seed: int, scales: list[float]) -> Tensor:
    factors = toy_noisy_factors(seed)
    a, b, noise_a, noise_b = factors["A"], factors["B"], factors["noise_A"], factors["noise_B"]
    product = b @ a
    size = float(torch.linalg.matrix_norm(product))
    both = [float(torch.linalg.matrix_norm((b + s * noise_b) @ (a + s * noise_a) - product)) / size for s in scales]
    b_only = [float(torch.linalg.matrix_norm((b + s * noise_b) @ a - product)) / size for s in scales]
    return torch.tensor([both, b_only], dtype=torch.float64)


def _noise_in_product_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 280), [1e-3, 1e-2, 1e-1, 1.0]), (case_seed(seed, 281), [0.05, 0.5])]


def _hint_noise_in_product(case: tuple, answer: object) -> str | None:
    seed, scales = case
    if not isinstance(answer, Tensor) or answer.shape != (2, len(scales)):
        return f"return a torch.Tensor of shape (2, {len(scales)}): noise on both factors first, then on B only"
    expected = _noise_in_product_reference(seed, scales)
    if close(answer.flip(0), expected):
        return "the rows are swapped: noise on both factors first, then on B only"
    factors = toy_noisy_factors(seed)
    size = float(torch.linalg.matrix_norm(factors["B"] @ factors["A"]))
    if close(answer * size, expected):
        return "divide by ||B A||_F: the error relative to the adapter's product"
    if close(answer, expected ** 2):
        return "take the Frobenius norm itself, not its square"
    return None


QUESTIONS["noise_in_product_explained"] = Question(
    "With noise on B only, the relative error of B A grows in proportion to the noise; with noise on both factors it "
    "is larger at every scale and grows faster once the noise is large. Why?",
    {
        "a": "(B + s N_B)(A + s N_A) - B A = s (N_B A + B N_A) + s^2 N_B N_A: the last term, noise times noise, grows "
             "with the square of the scale; with A frozen only s N_B A is left, linear in s.",
        "b": "Noise on A is larger than noise on B because A has more entries than B.",
        "c": "B A is computed in float32, and its rounding error grows with the noise.",
        "d": "Noise on both factors cancels out on average, so the error only grows by chance.",
    },
    "a",
    {
        "b": "every entry gets noise of the same scale s here: look at the term that is quadratic in s",
        "c": "everything here is float64; the errors you measured are far larger than rounding",
        "d": "each noise has mean zero, but the error is a norm: the terms add in square, they do not cancel",
    },
)


# ----- Part IV, split learning: how much an update's span gives away -----------------------------------------------
TOY_VOCABULARY = (400, 48, 8)
"""The toy update's vocabulary size, the dimension of a token vector and the number of rows of an update (2 r)."""


def toy_update(seed: int, tokens: int) -> dict[str, Tensor]:
    """A toy vocabulary and an update that mixes ``tokens`` of its token vectors, as one gradient step of the first
    block's A does (every row a combination of the input token vectors).

    Returns ``{"dictionary": vocabulary x dim, "rows": 2r x dim, "ids": the tokens mixed}`` (float64 vectors from
    ``seed``; the tokens distinct).
    """
    vocabulary, dim, rows = TOY_VOCABULARY
    if not isinstance(tokens, int) or not 1 <= tokens <= vocabulary:
        raise ValueError(f"tokens must be an integer in 1..{vocabulary}, got {tokens!r}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy update"))
    dictionary = torch.randn(vocabulary, dim, generator=gen, dtype=torch.float64)
    ids = torch.randperm(vocabulary, generator=gen)[:tokens]
    mix = torch.randn(rows, tokens, generator=gen, dtype=torch.float64)
    return {"dictionary": dictionary, "rows": mix @ dictionary[ids], "ids": ids}


def _update_leakage_reference(seed: int, counts: list[int]) -> Tensor:
    shares = []
    for count in counts:
        toy = toy_update(seed, count)
        shares.append(named_share(update_attack(toy["dictionary"], toy["rows"], count), toy["ids"]))
    return torch.tensor(shares, dtype=torch.float64)


def _update_leakage_cases(seed: int) -> list[tuple]:
    return [(case_seed(seed, 300), [1, 4, 8, 16, 64]), (case_seed(seed, 301), [2, 6, 32])]


def _hint_update_leakage(case: tuple, answer: object) -> str | None:
    seed, counts = case
    if not isinstance(answer, Tensor) or answer.shape != (len(counts),):
        return f"return a torch.Tensor with one share per entry of counts: {len(counts)} values"
    if bool((answer > 1).any()):
        return "a share lies between 0 and 1: the share of the mixed tokens the attack names"
    rows = TOY_VOCABULARY[2]
    fixed = []
    for count in counts:
        toy = toy_update(seed, count)
        fixed.append(named_share(update_attack(toy["dictionary"], toy["rows"], rows), toy["ids"]))
    if close(answer, torch.tensor(fixed, dtype=torch.float64)):
        return "let the attack name as many tokens as the update mixes (count), not as many as it has rows"
    return None


QUESTIONS["update_leakage_explained"] = Question(
    "The attack names every token of an update that mixes up to 8 tokens, and a falling share beyond. Why?",
    {
        "a": "The update's 8 rows span at most 8 dimensions. Up to 8 token vectors fit in that span, so each lies "
             "in it entirely and the attack finds them; more tokens than dimensions cannot all lie in an "
             "8-dimensional span, so the span holds each present token only partly and absent tokens begin to rank "
             "above some of them.",
        "b": "The attack names only 8 tokens, whatever the update mixes.",
        "c": "Beyond 8 tokens, the update's rows are zero.",
        "d": "Token vectors of a larger vocabulary are longer, so they are harder to find.",
    },
    "a",
    {
        "b": "the attack names as many tokens as the update mixes (count): look at how it is called",
        "c": "the rows are combinations of the mixed token vectors: they are not zero, but what do they span?",
        "d": "the vocabulary is the same for every count: only the number of mixed tokens changes",
    },
)


EXPERIMENT_EXERCISES: dict[str, Exercise] = {
    "update_leakage": Exercise(
        "update_leakage", "per number of mixed tokens: the share of toy_update's tokens that update_attack names "
        "when it names as many as the update mixes",
        _update_leakage_reference, _update_leakage_cases, _hint_update_leakage, chapter="part4/split",
        kind="experiment",
    ),
    "discordance_growth": Exercise(
        "discordance_growth", "discordance / || sum_k p_k B_k A_k - B0 A0 ||_F after each number of local steps "
        "(toy_local_training)",
        _growth_reference, _growth_cases, _hint_growth, chapter="part2/aggregation_discordance", kind="experiment",
    ),
    "fedavg_drift": Exercise(
        "fedavg_drift", "||w_T - w*|| / ||w*|| after toy_fedavg with each number of local steps",
        _fedavg_drift_reference, _fedavg_drift_cases, _hint_fedavg_drift, chapter="part1/federated_learning",
        kind="experiment",
    ),
    "ffa_tradeoff": Exercise(
        "ffa_tradeoff", "per number of local steps: [FFA-LoRA's discordance, its mean relative fit error minus "
        "that of training both factors]",
        _ffa_reference, _ffa_cases, _hint_ffa, chapter="part2/single_matrix", kind="experiment",
    ),
    "aggregation_errors": Exercise(
        "aggregation_errors", "per number of local steps: || B A - ideal ||_F / || ideal - B0 A0 ||_F for FedIT, "
        "FLoRA and FlexLoRA (rank r)",
        _aggregation_errors_reference, _aggregation_errors_cases, _hint_aggregation_errors,
        chapter="part2/at_a_glance", kind="experiment",
    ),
    "rank_vector_symmetry": Exercise(
        "rank_vector_symmetry", "per re-factoring (sign, scale, rotation): relative change of B A and of Z",
        _symmetry_reference, _symmetry_cases, _hint_symmetry, chapter="part2/rank_clustering", kind="experiment",
    ),
    "spectrum_share": Exercise(
        "spectrum_share", "share of ||W||_F^2 in the top-r singular values, pre-trained query weight and "
        "gaussian_like of it, per rank",
        _spectrum_reference, lambda seed: [([1, 4, 16, 64],)], _hint_spectrum,
        chapter="part2/server_initialization", kind="experiment",
    ),
    "lora_rank_fit": Exercise(
        "lora_rank_fit", "per rank r: [relative error of toy_lora_fit's B A, the Eckart-Young bound]",
        _lora_fit_reference, _lora_fit_cases, _hint_lora_fit, chapter="part1/lora", kind="experiment",
    ),
    "fedit_one_step": Exercise(
        "fedit_one_step", "|| avg(B) avg(A) - B_c A_c ||_F / || B_c A_c - B0 A0 ||_F after each number of local steps",
        _fedit_central_reference, _fedit_central_cases, _hint_fedit_central, chapter="part1/fedlora",
        kind="experiment",
    ),
    "download_size": Exercise(
        "download_size", "per number of clients K: numbers sent back by FedIT, FLoRA and FlexLoRA (rank r)",
        _download_reference, _download_cases, _hint_download, chapter="part2/full_size", kind="experiment",
    ),
    "residual_rank": Exercise(
        "residual_rank", "per number of clients K: the numerical rank of FedEx-LoRA's residual after 8 local steps",
        _residual_rank_reference, _residual_rank_cases, _hint_residual_rank, chapter="part2/corrective",
        kind="experiment",
    ),
    "kept_energy": Exercise(
        "kept_energy", "share of the change's squared norm kept by top_k_mask and by random_mask, per density",
        _kept_energy_reference, _kept_energy_cases, _hint_kept_energy, chapter="part4/sparse", kind="experiment",
    ),
    "unheld_layers": Exercise(
        "unheld_layers", "per number of clients K: the share of (round, layer) pairs FedRA's allocation_matrix gives "
        "to no client, and (1 - b / L) ** K",
        _unheld_layers_reference, _unheld_layers_cases, _hint_unheld_layers, chapter="part4/layers",
        kind="experiment",
    ),
    "quantization_error": Exercise(
        "quantization_error", "per number of bits b: the relative error of the change quantized to the nearest level "
        "(one min-max grid per factor), and the bytes of its packed codes and grids",
        _quantization_error_reference, _quantization_error_cases, _hint_quantization_error,
        chapter="part4/compression", kind="experiment",
    ),
    "accumulated_rank": Exercise(
        "accumulated_rank", "numerical rank of sum_{t <= T} B_t A_t (toy_global_adapters) for each T",
        _accumulated_rank_reference, _accumulated_rank_cases, _hint_accumulated_rank,
        chapter="part2/client_initialization", kind="experiment",
    ),
    "lora_step_flops": Exercise(
        "lora_step_flops", "per rank r: the forward and backward FLOPs (FlopCounterMode) of y = x W^T + (x A^T) B^T "
        "summed, W frozen (m x n), A (r x n), B (m x r) and the batch x (b x n) requiring gradients",
        _lora_step_flops_reference, _lora_step_flops_cases, _hint_lora_step_flops, chapter="part4/cost",
        kind="experiment",
    ),
    "noise_in_product": Exercise(
        "noise_in_product", "per noise scale s: ||(B + s N_B)(A + s N_A) - B A||_F / ||B A||_F and "
        "||(B + s N_B) A - B A||_F / ||B A||_F (toy_noisy_factors)",
        _noise_in_product_reference, _noise_in_product_cases, _hint_noise_in_product, chapter="part4/privacy",
        kind="experiment",
    ),
}
"""Experiment-and-explanation exercises by name (merged into ``EXERCISES``): a measurement each, and its
explanation as a letter (``<name>_explained``)."""

_CHAPTERS = {"discordance_growth_explained": "part2/aggregation_discordance",
             "fedavg_drift_explained": "part1/federated_learning", "ffa_tradeoff_explained": "part2/single_matrix",
             "aggregation_errors_explained": "part2/at_a_glance",
             "rank_vector_symmetry_explained": "part2/rank_clustering",
             "spectrum_share_explained": "part2/server_initialization",
             "accumulated_rank_explained": "part2/client_initialization", "lora_rank_fit_explained": "part1/lora",
             "fedit_one_step_explained": "part1/fedlora", "download_size_explained": "part2/full_size",
             "residual_rank_explained": "part2/corrective", "kept_energy_explained": "part4/sparse",
             "unheld_layers_explained": "part4/layers", "quantization_error_explained": "part4/compression",
             "noise_in_product_explained": "part4/privacy", "update_leakage_explained": "part4/split",
             "lora_step_flops_explained": "part4/cost"}
EXPERIMENT_EXERCISES.update({name: explanation_exercise(name, QUESTIONS[name], chapter)
                             for name, chapter in _CHAPTERS.items()})
