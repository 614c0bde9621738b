"""What every exercise check shares: the exercise record, random clients, comparison and feedback.

:mod:`fedlora_edu.teaching.exercises` (Parts I and III) and
:mod:`fedlora_edu.teaching.method_exercises` (Parts II and IV) define the exercises on top of this;
:func:`fedlora_edu.teaching.exercises.check` is what a notebook calls.

Notation (survey section 2): ``A_k`` is ``r_k x n``, ``B_k`` is ``m x r_k``, ``dW_k = B_k A_k``,
weights ``p_k >= 0`` sum to 1.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora_edu.core.seeds import derive_seed


class ExerciseFailed(AssertionError):
    """A student's answer differs from the reference; the message says how."""


GRADE_REPORT_ENV = "FEDLORA_GRADE_REPORT"
"""When this environment variable names a file, :func:`check` appends each outcome to it as a JSON line
(``{"exercise": ..., "outcome": "passed" | "failed" | "not attempted"}``): how
:mod:`fedlora_edu.teaching.grading` learns what a submission's checks said."""


def record(name: str, outcome: str) -> None:
    report = os.environ.get(GRADE_REPORT_ENV)
    if report:
        with open(report, "a", encoding="utf-8") as log:
            log.write(json.dumps({"exercise": name, "outcome": outcome}) + "\n")


@dataclass(frozen=True)
class Exercise:
    """One exercise: what to write, the reference answer and the inputs it is checked on."""

    name: str
    equation: str
    reference: Callable
    cases: Callable[[int], list[tuple]]
    hints: Callable[[tuple, object], str | None]
    chapter: str = ""
    """The book chapter whose method this is, as ``part2/full_size`` (``book/<chapter>.ipynb``)."""
    kind: str = "method"
    """``"method"``: write a method's core; ``"experiment"``: measure something and explain it."""
    canonical: Callable[[object], object] | None = None
    """Applied to the answer and to the reference before they are compared, where several answers are right
    (an SVD's factors up to signs: compared through their product and the norms of their components)."""


def random_clients(seed: int, ranks: list[int], m: int = 7, n: int = 5,
                   ) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """Clients' factors (A_k r_k x n, B_k m x r_k, float64) and weights p_k summing to one, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n, generator=gen, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(m, r, generator=gen, dtype=torch.float64) for r in ranks]
    raw = torch.rand(len(ranks), generator=gen, dtype=torch.float64) + 0.1
    weights = (raw / raw.sum()).tolist()
    return As, Bs, weights


def case_seed(seed: int, case: int) -> int:
    return derive_seed(seed, "exercise case", case)


def same_rank_cases(seed: int) -> list[tuple]:
    return [random_clients(case_seed(seed, 0), [3, 3, 3]), random_clients(case_seed(seed, 1), [2, 2]),
            random_clients(case_seed(seed, 2), [4] * 5, m=3, n=9)]


def any_rank_cases(seed: int) -> list[tuple]:
    return same_rank_cases(seed) + [random_clients(case_seed(seed, 3), [1, 4, 2], m=6, n=8)]


def close(answer: object, expected: Tensor) -> bool:
    """Same shape and values, to float rounding (exactly, for masks and counts)."""
    if not (isinstance(answer, Tensor) and answer.shape == expected.shape):
        return False
    if not expected.is_floating_point():
        return torch.equal(answer.to(expected.dtype), expected)
    return torch.allclose(answer.to(expected.dtype), expected, rtol=1e-6, atol=1e-8)


def matches(answer: object, expected: object) -> bool:
    """An answer equal to the expected one: tensors to float rounding, tuples, lists and dicts item by item."""
    if isinstance(expected, dict):
        return isinstance(answer, dict) and set(answer) == set(expected) and all(
            matches(answer[name], expected[name]) for name in expected
        )
    if isinstance(expected, (tuple, list)):
        return isinstance(answer, (tuple, list)) and len(answer) == len(expected) and all(
            matches(a, e) for a, e in zip(answer, expected, strict=True)
        )
    if isinstance(expected, str):
        return isinstance(answer, str) and answer == expected
    if isinstance(expected, float):
        return isinstance(answer, float) and abs(answer - expected) <= 1e-6 * max(1.0, abs(expected))
    return close(answer, expected)


def describe(value: object) -> str:
    """A short description of an answer or an expected value: its type and shape, never its values."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple):
        return "a tuple of (" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
        return f"a list of {len(value)} tensors of shapes " + ", ".join(str(tuple(v.shape)) for v in value)
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "a dict of " + ", ".join(f"{name!r}: {describe(v)}" for name, v in value.items())
    return f"a {type(value).__name__}"


def how_far(answer: object, expected: object) -> str:
    """How far a wrong answer is from the expected one, in numbers that do not give the answer away."""
    if isinstance(expected, (tuple, list)) and isinstance(answer, (tuple, list)) and len(answer) == len(expected):
        parts = [how_far(a, e) for a, e in zip(answer, expected, strict=True)]
        return "; ".join(f"item {i}: {part}" for i, part in enumerate(parts, start=1) if part)
    if isinstance(expected, dict) and isinstance(answer, dict) and set(answer) == set(expected):
        parts = {name: how_far(answer[name], expected[name]) for name in expected}
        return "; ".join(f"{name!r}: {part}" for name, part in parts.items() if part)
    if isinstance(expected, Tensor) and isinstance(answer, Tensor) and answer.shape == expected.shape:
        if not expected.is_floating_point():
            wrong = int((answer.to(expected.dtype) != expected).sum())
            return f"{wrong} of {expected.numel()} entries differ"
        gap = (answer.to(expected.dtype) - expected).abs()
        scale = float(expected.abs().max()) or 1.0
        return f"largest difference {float(gap.max()):.3g} (the expected values reach {scale:.3g})"
    if isinstance(expected, float) and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        gap = abs(float(answer) - expected)
        return f"off by {gap:.3g} (relative {gap / max(abs(expected), 1e-12):.2g})"
    return f"expected {describe(expected)}, got {describe(answer)}"


def run_check(exercise: Exercise, function: Callable, seed: int) -> tuple[str, str]:
    """(outcome, the line a check returns); raises :class:`ExerciseFailed` for a wrong answer.

    For each case the reference is computed first, on its own copy of the inputs, and the
    student's function gets another copy, so an answer that changes its inputs in place can
    corrupt neither the reference nor the hints.
    """
    name = exercise.name
    cases = exercise.cases(seed)
    for index, case in enumerate(cases, start=1):
        where = f"{name}: case {index} of {len(cases)} (inputs: {describe(case)[len('a tuple of '):]})"
        expected = exercise.reference(*copy.deepcopy(case))
        try:
            answer = function(*copy.deepcopy(case))
        except NotImplementedError:
            return "not attempted", f"{name}: not attempted yet ({exercise.equation})"
        except Exception as error:  # the student's code failed: say where and why, as a check failure
            raise ExerciseFailed(f"{where}: your function raised {type(error).__name__}: {error}") from error
        if exercise.canonical is not None:
            expected = exercise.canonical(expected)
            try:
                shown = exercise.canonical(answer)
            except Exception:  # an answer of the wrong form: the hints say what form is expected
                shown = answer
        else:
            shown = answer
        if not matches(shown, expected):
            hint = exercise.hints(copy.deepcopy(case), answer)
            raise ExerciseFailed(
                f"{where} differs from {exercise.equation}: {how_far(shown, expected)}"
                + (f"; hint: {hint}" if hint else "")
            )
    return "passed", f"{name}: passed all {len(cases)} cases ({exercise.equation})"
