"""Corrective mechanisms (survey section 3.1, "Corrective Mechanism", eq. 7): FedEx-LoRA and LoRA-FAIR.

FedIT averages A and B separately. That keeps the clients' next start simple (every
client continues from the averaged factors, "Avg-Initial" in Bian et al.'s words), but
the product of the averages is not the average of the products (eq. 4):

    avg(B) avg(A)  !=  sum_k p_k B_k A_k .

The survey's corrective family keeps the separate averages and *corrects* them towards
the ideal update instead of replacing them:

- **FedEx-LoRA** (Singhal, Ponkshe, Vepakomma 2024, arXiv 2410.09432), eq. 7: the server
  computes the exact residual R = sum_k p_k B_k A_k - avg(B) avg(A) and folds it into the
  frozen weight, W' <- W' + s R, so that W' + s avg(B) avg(A) is the ideal aggregate to
  the last bit. The price: R is a full-size m x n matrix per adapted layer that every
  client downloads (:func:`fedex_residual`, :class:`FedExLoRA`).
- **LoRA-FAIR** (Bian, Wang, Zhang, Xu 2024, ICCV 2025, arXiv 2411.14961): the server keeps
  avg(A) fixed and learns a correction dB of avg(B) so that (avg(B) + dB) avg(A) is as
  similar as possible to the ideal update, with a penalty on dB that keeps the clients'
  next start close to the plain average (:func:`lora_fair_correction`,
  :class:`LoRAFAIR`). Nothing is added to the wire: clients download A and B as in FedIT.
  The price is server computation, and the correction can only move the product within
  the row space of avg(A), so it is not exact.

**What LoRA-FAIR's implementation rests on.** Of the paper itself (arXiv 2411.14961, read as
the arXiv HTML pages https://arxiv.org/html/2411.14961v2 and v3) only the abstract and the
opening of the introduction were within reach of this project's tools; its method section,
eq. 8 and its implementation details were not. The authors' repository
(github.com/jmbian/LoRA-FAIR) exists but could not be read offline; what is known of a fork of
their vision code base is collected in the project's METHOD_SOURCES notes, and it differs from
ours in four choices, each ours and its effect on accuracy not yet measured: the fork's penalty
is squared (lambda ||dB||_F^2, ours is not, as the summary below writes it), its similarity is
the mean of column-wise cosines (ours the cosine of the whole matrices), it starts dB
Xavier-uniform (ours at zero, so that no correction is the starting point) and runs SGD at
learning rate 0.01 for up to 1000 iterations with early stopping (ours a fixed number of
proximal-gradient steps, :func:`lora_fair_solve`). The
form of the server problem and its settings come from the survey (section 3.1: a corrective
term dB that refines B "by optimizing the similarity between the ideal aggregated LoRA
weights dW and the corrected LoRA weights (B + dB) A") and from a detailed third-party summary
of the paper (en.papernotes.org, "LoRA-FAIR ... ICCV 2025"), which states: keep A-bar fixed;
argmin over dB of S(dW, (B-bar + dB) A-bar) + lambda ||dB|| with dW = sum_k p_k B_k A_k and
S the cosine similarity (eq. 8); the server solves it by SGD; lambda = 0.01; clients start
the next round from (A-bar, B-bar + dB) with W_0 unchanged (Avg-Initial); correcting B beat
correcting A or both in the paper's ablation; with lambda = 0 the cosine reached 0.9998 while
the similarity of B-bar' to B-bar fell to 0.9715. A second summary (a Portuguese reading note
of the ICCV PDF) agrees that eq. 6 forms the ideal update, eq. 8 gives dB, and B-bar' =
B-bar + dB replaces B-bar. Everything else in :func:`lora_fair_solve` is our choice and is
said so there; the solver's step count and learning rate are not known to us.

Notation of the survey: A_k is r x n, B_k is m x r, p_k are weights summing to one;
products are unscaled (LoRA's alpha / r multiplies every term alike).

Taught in ``book/part2/corrective.ipynb`` (FedEx-LoRA first in
``book/part2/aggregation_discordance.ipynb``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora_edu.core.checks import check_factors
from fedlora_edu.core.factors import fedit_average, ideal_update
from fedlora_edu.core.strategy import Payload, ServerState, Strategy, Upload, collect_factors, normalized_weights
from fedlora_edu.core.threads import one_thread
from fedlora_edu.distributed.full_size import flora_stack

SIMILARITIES = ("cosine", "frobenius")
"""How LoRA-FAIR measures the gap to the ideal update: the paper's cosine, or a squared Frobenius distance."""

DEFAULT_REGULARIZATION = 0.01
"""lambda, the weight on ||dB||: 0.01, the paper's value as its summaries report it (module docstring)."""

DEFAULT_STEPS = 100
"""Most gradient steps the server takes per layer and round (ours: the paper solves eq. 8 by SGD, with a step
count and learning rate we could not read)."""

RELATIVE_TOLERANCE = 1e-6
"""The solver stops early once a step lowers the objective by less than this fraction of its value."""


# ----------------------------------------------------------------------------------------
# FedEx-LoRA
# ----------------------------------------------------------------------------------------
def fedex_residual(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """FedEx-LoRA (Singhal et al. 2024), eq. 7: R = sum_k p_k B_k A_k - avg(B) avg(A).

    Folding R into the frozen weight (W' <- W' + R) makes W' + avg(B) avg(A) equal the
    ideal aggregation exactly. R is full-size (m x n): that is its communication cost.
    """
    a_bar, b_bar = fedit_average(As, Bs, weights)
    return ideal_update(As, Bs, weights) - b_bar @ a_bar


# ----------------------------------------------------------------------------------------
# LoRA-FAIR: validation
# ----------------------------------------------------------------------------------------
def check_similarity(similarity: object) -> str:
    """Validate LoRA-FAIR's similarity measure: ``"cosine"`` (the paper's) or ``"frobenius"``."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    return str(similarity)


def check_regularization(regularization: object) -> float:
    """Validate the weight lambda of the penalty lambda ||dB||_F: a finite number >= 0."""
    if isinstance(regularization, bool) or not isinstance(regularization, int | float) \
            or not math.isfinite(regularization) or regularization < 0:
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization!r}")
    return float(regularization)


def check_steps(steps: object) -> int:
    """Validate the number of server gradient steps: an integer >= 0 (0 returns dB = 0)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return steps


# ----------------------------------------------------------------------------------------
# LoRA-FAIR: the pure functions
# ----------------------------------------------------------------------------------------
@dataclass
class CorrectionResult:
    """What :func:`lora_fair_solve` returns for one layer.

    ``delta_b`` is dB (m x r, the dtype of the inputs); ``objectives`` the value of the
    objective before the first step and after every accepted step (non-increasing);
    ``similarity`` the measure really used (``"frobenius"`` where the cosine was undefined,
    see :func:`lora_fair_solve`).
    """

    delta_b: Tensor
    objectives: list[float] = field(default_factory=list)
    similarity: str = "cosine"

    @property
    def steps_taken(self) -> int:
        return max(0, len(self.objectives) - 1)


def _measure(similarity: str, inner: Tensor, x2: Tensor, d2: float) -> Tensor:
    """The first term of the objective from <D, Y A>, ||Y A||^2 and ||D||^2 (see :func:`lora_fair_solve`)."""
    if similarity == "cosine":
        return 1.0 - inner / math.sqrt(d2) / x2.clamp_min(torch.finfo(x2.dtype).tiny).sqrt()
    return (d2 - 2.0 * inner + x2) / d2


def _measure_gradient(similarity: str, y: Tensor, c: Tensor, g: Tensor, d2: float) -> Tensor:
    """d(measure)/dY at Y = avg(B) + dB, with C = D avg(A)^T and G = avg(A) avg(A)^T."""
    yg = y @ g
    inner, x2 = (c * y).sum(), (yg * y).sum()
    if similarity == "cosine":
        norm_x = x2.sqrt()
        return -(c / (math.sqrt(d2) * norm_x) - inner * yg / (math.sqrt(d2) * norm_x ** 3))
    return 2.0 * (yg - c) / d2


def lora_fair_solve(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float],
    *,
    similarity: str = "cosine",
    regularization: float = DEFAULT_REGULARIZATION,
    steps: int = DEFAULT_STEPS,
    tolerance: float = RELATIVE_TOLERANCE,
) -> CorrectionResult:
    """LoRA-FAIR's server problem for one layer (Bian et al. 2024, arXiv 2411.14961, eq. 8; survey 3.1).

    With A-bar, B-bar FedIT's averages and dW = sum_k p_k B_k A_k the ideal update (survey
    eq. 4), LoRA-FAIR keeps A-bar and solves

        min over dB of   S(dW, (B-bar + dB) A-bar)  +  lambda ||dB||_F

    (the form of eq. 8 as the survey and the paper's summaries give it; we could not read the
    paper's method section, see the module docstring). ``similarity="cosine"`` (the paper's
    choice, default): S = 1 - cos(dW, (B-bar + dB) A-bar), cos(X, Y) = <X, Y>_F /
    (||X||_F ||Y||_F); the paper calls S the cosine similarity, and a similarity that is
    minimised must enter as a dissimilarity: 1 - cos and -cos have the same minimisers. It
    aligns the direction of the corrected update with the ideal one and leaves its length free.
    ``similarity="frobenius"`` (ours, for comparison): S = ||dW - (B-bar + dB) A-bar||_F^2 /
    ||dW||_F^2, a relative squared error (so lambda means the same for both); with lambda = 0
    its minimiser is the least-squares dB* = (dW - B-bar A-bar) A-bar^+.

    Choices where what we could read of the paper leaves room, and why:

    - The penalty is lambda ||dB||_F (the norm itself, as eq. 8 is written, not its square; the
      summaries do not name the norm, we take Frobenius), lambda = 0.01 by default (the paper's
      value). Being a norm, it keeps dB exactly zero when the gradient of S at dB = 0 is smaller
      than lambda, in particular when the clients agree.
    - The solver is proximal gradient descent, run to convergence (the paper uses SGD, with a
      number of steps and a learning rate we do not know; the problem has no data, so the
      gradient is exact and "stochastic" has nothing to sample): a gradient step on S followed
      by the proximal step of the norm,
      dB <- dB * max(0, 1 - t lambda / ||dB||_F), with a backtracking step size t, so the
      objective never increases. It starts from dB = 0 and stops after ``steps`` accepted
      steps, or earlier once a step lowers the objective by less than ``tolerance`` (default a
      millionth) of its value; ``tolerance=0`` runs until a step changes nothing. The paper
      gives no step count; 100 is ours (on MiniLM's layers it converges in about five).
    - The ideal update is never formed as an m x n matrix: with the stacks of
      :func:`~fedlora_edu.distributed.full_size.flora_stack` (dW = B_s A_s), everything S needs is
      C = dW A-bar^T = B_s (A_s A-bar^T) (m x r), G = A-bar A-bar^T (r x r) and
      ||dW||_F^2 = tr((B_s^T B_s)(A_s A_s^T)), so a step costs O(m r^2), not O(m n r).
      Arithmetic is in float64 on the CPU, single-threaded; dB comes back in the inputs' dtype
      and on their device.
    - Where the cosine is undefined (B-bar A-bar = 0 while dW is not) the layer is solved with
      the Frobenius measure instead (``result.similarity`` says so); where dW = 0 nothing can
      be aligned with it and dB = 0.

    Equal ranks only (A-bar and B-bar are elementwise averages, as in FedIT).
    """
    check_similarity(similarity)
    lam = check_regularization(regularization)
    check_steps(steps)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    with one_thread():
        return _solve(As, Bs, weights, similarity, lam, steps, float(tolerance))


def _solve(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], similarity: str, lam: float,
           steps: int, tolerance: float) -> CorrectionResult:
    """The body of :func:`lora_fair_solve` (arguments already validated)."""
    a_bar, b_bar = fedit_average(As, Bs, weights)
    a_stack, b_stack = flora_stack(As, Bs, weights)
    dtype, device = b_bar.dtype, b_bar.device
    cpu = torch.device("cpu")  # r x r and m x r matrices: the CPU is the right place, whatever the device
    a_bar64, b_bar64 = a_bar.to(cpu, torch.float64), b_bar.to(cpu, torch.float64)
    a_s, b_s = a_stack.to(cpu, torch.float64), b_stack.to(cpu, torch.float64)
    c = b_s @ (a_s @ a_bar64.T)  # dW A-bar^T, m x r
    g = a_bar64 @ a_bar64.T  # A-bar A-bar^T, r x r
    d2 = float(((b_s.T @ b_s) * (a_s @ a_s.T)).sum())  # ||dW||_F^2 = tr((B_s^T B_s)(A_s A_s^T))
    zero = torch.zeros_like(b_bar)
    scale_g = float(torch.linalg.eigvalsh(g).max()) if g.numel() else 0.0
    if not d2 > 0 or not scale_g > 0 or steps == 0:
        return CorrectionResult(zero, [], similarity)
    x2_start = float(((b_bar64 @ g) * b_bar64).sum())
    if similarity == "cosine" and not x2_start > 0:
        similarity = "frobenius"

    def objective(delta: Tensor) -> float:
        y = b_bar64 + delta
        measure = _measure(similarity, (c * y).sum(), ((y @ g) * y).sum(), d2)
        return float(measure) + lam * float(torch.linalg.matrix_norm(delta))

    def smooth(delta: Tensor) -> float:
        y = b_bar64 + delta
        return float(_measure(similarity, (c * y).sum(), ((y @ g) * y).sum(), d2))

    # Initial step: 1/L for the Frobenius measure (L = 2 lambda_max(G) / ||dW||^2); for the cosine,
    # whose curvature scales like lambda_max(G) / ||Y A-bar||^2, the matching guess. Backtracking fixes either.
    step = d2 / (2.0 * scale_g) if similarity == "frobenius" else x2_start / scale_g
    delta = torch.zeros_like(b_bar64)
    objectives = [objective(delta)]
    for _ in range(steps):
        f_now = smooth(delta)
        gradient = _measure_gradient(similarity, b_bar64 + delta, c, g, d2)
        accepted = None
        for _ in range(60):  # backtracking: halve the step until the proximal-gradient condition holds
            moved = delta - step * gradient
            norm = float(torch.linalg.matrix_norm(moved))
            candidate = moved * max(0.0, 1.0 - step * lam / norm) if norm > 0 else moved
            change = candidate - delta
            bound = f_now + float((gradient * change).sum()) + float((change * change).sum()) / (2.0 * step)
            value = objective(candidate)
            if smooth(candidate) <= bound + 1e-15 * abs(f_now) and value <= objectives[-1]:
                accepted = candidate
                break
            step /= 2.0
        if accepted is None or float(torch.linalg.matrix_norm(accepted - delta)) == 0.0:
            break
        delta = accepted
        objectives.append(objective(delta))
        if objectives[-2] - objectives[-1] <= tolerance * abs(objectives[-1]):
            break  # converged: a step no longer changes the objective in its first digits
        step *= 2.0  # let the step grow again after an accepted one
    return CorrectionResult(delta.to(dtype=dtype, device=device), objectives, similarity)


def lora_fair_correction(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float],
    *,
    similarity: str = "cosine",
    regularization: float = DEFAULT_REGULARIZATION,
    steps: int = DEFAULT_STEPS,
    tolerance: float = RELATIVE_TOLERANCE,
) -> Tensor:
    """LoRA-FAIR's correction dB (m x r) of FedIT's averaged B (Bian et al. 2024, arXiv 2411.14961).

    The server sends A-bar and B-bar + dB; their product is closer to sum_k p_k B_k A_k than
    FedIT's B-bar A-bar. See :func:`lora_fair_solve` for the objective, the solver and the
    choices made; this returns its ``delta_b``. Taught in ``book/part2/corrective.ipynb``.
    """
    return lora_fair_solve(As, Bs, weights, similarity=similarity, regularization=regularization,
                           steps=steps, tolerance=tolerance).delta_b


def lora_fair_objective(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float],
    delta_b: Tensor,
    *,
    similarity: str = "cosine",
    regularization: float = DEFAULT_REGULARIZATION,
) -> float:
    """LoRA-FAIR's objective S(dW, (B-bar + dB) A-bar) + lambda ||dB||_F, computed densely (the reference).

    Forms the m x n matrices; :func:`lora_fair_solve` computes the same value from factors.
    """
    check_similarity(similarity)
    lam = check_regularization(regularization)
    a_bar, b_bar = fedit_average(As, Bs, weights)
    if delta_b.shape != b_bar.shape:
        raise ValueError(f"delta_b has shape {tuple(delta_b.shape)}; it corrects B-bar, {tuple(b_bar.shape)}")
    ideal = ideal_update(As, Bs, weights).double()
    corrected = (b_bar.double() + delta_b.double()) @ a_bar.double()
    if similarity == "cosine":
        measure = 1.0 - float((ideal * corrected).sum() / (torch.linalg.matrix_norm(ideal)
                                                           * torch.linalg.matrix_norm(corrected)))
    else:
        measure = float(torch.linalg.matrix_norm(ideal - corrected) ** 2 / torch.linalg.matrix_norm(ideal) ** 2)
    return measure + lam * float(torch.linalg.matrix_norm(delta_b.double()))


def corrected_residual(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], delta_b: Tensor | None = None
) -> float:
    """|| (B-bar + dB) A-bar - sum_k p_k B_k A_k ||_F: what is left of the discordance after a correction.

    With ``delta_b=None`` (or zero) it is FedIT's discordance (survey eq. 4).
    """
    check_factors(As, Bs)
    a_bar, b_bar = fedit_average(As, Bs, weights)
    if delta_b is not None:
        if delta_b.shape != b_bar.shape:
            raise ValueError(f"delta_b has shape {tuple(delta_b.shape)}; it corrects B-bar, {tuple(b_bar.shape)}")
        b_bar = b_bar + delta_b
    return float(torch.linalg.matrix_norm(b_bar @ a_bar - ideal_update(As, Bs, weights)))


# ----------------------------------------------------------------------------------------
# The strategies
# ----------------------------------------------------------------------------------------
class FedExLoRA(Strategy):
    """FedEx-LoRA (Singhal et al. 2024), eq. 7: FedIT's averages plus the exact residual in W'.

    Each client downloads the averaged A and B and the full-size residual of every
    adapted layer (m x n each), which it adds to its frozen weight.
    """

    name = "FedEx-LoRA"
    paper = "Singhal, Ponkshe, Vepakomma 2024, arXiv 2410.09432"
    chapter = "book/part2/corrective"

    @dataclass
    class State:
        """Last round's residual of every layer (what the clients download and fold into W')."""

        residuals: dict[str, Tensor] = field(default_factory=dict)

    def client_start(self, server, client_id, client_state, round_index):
        start = super().client_start(server, client_id, client_state, round_index)
        residuals = server.method_state.residuals
        start.download = Payload(
            {**start.download.tensors, **{f"{n}.residual": r for n, r in residuals.items()}}
        )
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads)
        averaged = {n: fedit_average(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        residuals = {n: fedex_residual(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        server.adapters = averaged
        server.method_state.residuals = residuals
        server.base_deltas = {n: server.scaling * r for n, r in residuals.items()}
        self.aggregate_head(server, uploads)


def _client_factors(server: ServerState, uploads: list[Upload]) -> dict[str, tuple[list[Tensor], list[Tensor]]]:
    """Per layer, the clients' uploaded A's and B's (both must be there: LoRA-FAIR trains both)."""
    return collect_factors(server, uploads, require_both=True)[1]


class LoRAFAIR(Strategy):
    """LoRA-FAIR (Bian, Wang, Zhang, Xu 2024, ICCV 2025, arXiv 2411.14961): FedIT plus a server correction dB.

    Survey section 3.1, "Corrective Mechanism". Clients train A and B and upload both, as in
    FedIT. Per layer the server averages them (A-bar, B-bar), solves
    :func:`lora_fair_solve` for dB and sets the global adapter to (A-bar, B-bar + dB); every
    client starts the next round from it (Avg-Initial with the corrected B-bar', the paper's
    client-side initialization as its summaries describe it; see the module docstring).
    The frozen weight W' never changes and nothing but A and B crosses the network, so the
    bytes are FedIT's. ``similarity``, ``regularization`` and ``steps`` are passed to the
    solver (defaults: the paper's cosine and lambda = 0.01, 100 steps).

    After each round ``server.method_state.corrections`` holds the round's
    :class:`CorrectionResult` per layer (dB and the objective per step).
    Taught in ``book/part2/corrective.ipynb``.
    """

    name = "LoRA-FAIR"
    paper = "Bian, Wang, Zhang, Xu 2024, ICCV 2025, arXiv 2411.14961"
    chapter = "book/part2/corrective"

    @dataclass
    class State:
        """The last round's :class:`CorrectionResult` per layer (dB and the objective per step)."""

        corrections: dict[str, CorrectionResult] = field(default_factory=dict)

    def __init__(
        self,
        rank: int | None = None,
        similarity: str = "cosine",
        regularization: float = DEFAULT_REGULARIZATION,
        steps: int = DEFAULT_STEPS,
    ) -> None:
        super().__init__(rank)
        self.similarity = check_similarity(similarity)
        self.regularization = check_regularization(regularization)
        self.steps = check_steps(steps)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights = normalized_weights(uploads)
        adapters, results = {}, {}
        for name, (a_list, b_list) in _client_factors(server, uploads).items():
            a_bar, b_bar = fedit_average(a_list, b_list, weights)
            result = lora_fair_solve(a_list, b_list, weights, similarity=self.similarity,
                                     regularization=self.regularization, steps=self.steps)
            adapters[name] = (a_bar, b_bar + result.delta_b)
            results[name] = result
        server.adapters = adapters
        server.method_state.corrections = results
        self.aggregate_head(server, uploads)
