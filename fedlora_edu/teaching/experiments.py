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

import torch
from torch import Tensor

from fedlora_edu.core.factors import discordance, ideal_update
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.teaching.checking import Exercise, case_seed, close

TOY_SHAPE = (12, 10, 2)
"""m, n and the rank r of the toy federation's adapter."""


def toy_local_training(seed: int, steps: int, *, clients: int = 4, lr: float = 0.1,
                       start_b: str = "small") -> tuple[list[Tensor], list[Tensor], list[float]]:
    """One round of the toy federation: every client's ``(A_k, B_k)`` after ``steps`` gradient steps.

    The clients' targets ``T_k`` (m x n, rank 3, float64) and the shared start are drawn from
    ``seed``; ``start_b="small"`` starts B at small random values, ``"zero"`` at zero, as LoRA
    initializes it. Returns ``(As, Bs, weights)`` with weights ``p_k`` proportional to drawn sizes.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if start_b not in ("small", "zero"):
        raise ValueError(f"start_b must be 'small' or 'zero', got {start_b!r}")
    m, n, r = TOY_SHAPE
    gen = torch.Generator().manual_seed(derive_seed(seed, "toy federation"))
    targets = [torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen,
                                                                                  dtype=torch.float64) / 3
               for _ in range(clients)]
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
            A, B = A - lr * (B.T @ gap), B - lr * (gap @ A.T)
        As.append(A)
        Bs.append(B)
    return As, Bs, (sizes / sizes.sum()).tolist()


def _relative_discordance(As: list[Tensor], Bs: list[Tensor], weights: list[float], start: Tensor) -> float:
    """Discordance over the size of the ideal update, both measured from the round's start ``B0 A0``."""
    return discordance(As, Bs, weights) / float(torch.linalg.matrix_norm(ideal_update(As, Bs, weights) - start))


def _growth_reference(seed: int, steps: list[int]) -> Tensor:
    values = []
    for t in steps:
        A0s, B0s, _ = toy_local_training(seed, 0)
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


_GROWTH_OPTIONS = {
    "a": "The clients' learning rates differ, so their factors drift apart.",
    "b": "Each client's A_k and B_k move away from the shared start together, and the product of the averages "
         "misses the cross terms sum_k p_k (B_k - avg B)(A_k - avg A), which grow as both factors drift.",
    "c": "Rounding errors accumulate with every local step.",
    "d": "The discordance does not grow: it is the same after any number of local steps.",
}


def _why_reference() -> str:
    return "b"


def _hint_why(case: tuple, answer: object) -> str | None:
    if not isinstance(answer, str) or answer.strip().lower() not in _GROWTH_OPTIONS:
        return f"return one letter among {sorted(_GROWTH_OPTIONS)}"
    return {
        "a": "every client here runs the same learning rate (toy_local_training's lr): what differs is their target",
        "c": "the toy runs in float64, where rounding is near 1e-16; your numbers are many orders larger",
        "d": "look at your measurement again: does it stay the same from 1 step to 16?",
    }.get(answer.strip().lower())


def _normalise_letter(answer: object) -> object:
    return answer.strip().lower() if isinstance(answer, str) else answer


EXPERIMENT_EXERCISES: dict[str, Exercise] = {
    "discordance_growth": Exercise(
        "discordance_growth", "discordance / || sum_k p_k B_k A_k - B0 A0 ||_F after each number of local steps "
        "(toy_local_training)",
        _growth_reference, _growth_cases, _hint_growth, chapter="part2/aggregation_discordance", kind="experiment",
    ),
    "discordance_growth_explained": Exercise(
        "discordance_growth_explained", "why the relative discordance grows with local steps (one letter)",
        _why_reference, lambda seed: [()], _hint_why, chapter="part2/aggregation_discordance", kind="experiment",
        canonical=_normalise_letter,
    ),
}
"""Experiment-and-explanation exercises by name (merged into ``EXERCISES``)."""

GROWTH_OPTIONS = dict(_GROWTH_OPTIONS)
"""The explanations offered for ``discordance_growth_explained``, by letter (printed in the notebook)."""

