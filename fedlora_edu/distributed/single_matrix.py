"""Single low-rank matrix aggregation (survey section 3.1, eq. 5): FFA-LoRA, CoLR, RoLoRA and LoRA-A2.

The survey's first family against aggregation discordance trains and sends only one of
the two LoRA factors per round, while the other one is the same on every client. Then
averaging the trained factor is the ideal aggregation exactly (eq. 5):

    sum_k p_k B_k A = (sum_k p_k B_k) A        or        sum_k p_k B A_k = B (sum_k p_k A_k).

The family's four methods:

- :class:`FFALoRA` (Sun et al. 2024): A stays at its random initialisation for good and only
  B trains (:func:`ffa_aggregate`).
- :class:`CoLR` (Nguyen et al. 2024): a fresh shared random factor every round, drawn
  from a seed the server broadcasts (:func:`colr_fresh_adapters`); the round's product
  is folded into the frozen weight W' (:func:`colr_merge`).
- :class:`RoLoRA` (Chen et al. 2024): B trains in odd rounds and A in even rounds
  (:func:`alternating_side`), so both factors learn but never in the same round.
- :class:`LoRAA2` (Koo et al. 2024): RoLoRA's alternation plus adaptive rank selection:
  each client scores the rank components of the factor it trained
  (:func:`rank_importance`), keeps its budget of the most important ones across the whole
  model (:func:`select_top_ranks`) and sends only those; the server adds the weighted,
  masked updates (:func:`masked_update_average`).

Notation of the survey: A is r x n, B is m x r, p_k are client weights summing to one;
products are unscaled (LoRA's alpha / r multiplies every term alike). ``side`` names the
factor that trains in a round, ``"A"`` or ``"B"``.

Taught in ``book/part2/single_matrix.ipynb`` (FFA-LoRA first in
``book/part2/aggregation_discordance.ipynb``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.checks import check_factors, check_weights
from fedlora_edu.core.factors import average_tensors
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    collect_factors,
    normalized_weights,
)

SIDES = ("A", "B")
SEED_BYTES = 8
"""A seed crosses the network as one 64-bit integer."""
INDEX_DTYPE = torch.int16
"""LoRA-A2 sends the positions of its selected rank components as 16-bit integers (ranks < 32768)."""


# ----------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------
def check_side(side: str) -> str:
    """Validate the name of the factor that trains: ``"A"`` or ``"B"``."""
    if side not in SIDES:
        raise ValueError(f"side must be 'A' or 'B', got {side!r}")
    return side


def _check_shared(frozen: Tensor, trained: Sequence[Tensor], side: str) -> None:
    """The frozen factor and every client's trained factor must multiply (B_k A or B A_k)."""
    if len(trained) == 0:
        raise ValueError("trained is empty: need at least one client's factor")
    if side == "B":
        check_factors([frozen] * len(trained), list(trained))
    else:
        check_factors(list(trained), [frozen] * len(trained))


def alternating_side(round_index: int) -> str:
    """RoLoRA's and LoRA-A2's schedule: which factor trains in a round.

    ``round_index`` counts from 0 as the simulator does. Rounds 1, 3, 5, ... in the
    survey's 1-based count (``round_index`` 0, 2, 4, ...) train B, the even rounds train A.
    B must come first: with the standard initialisation B = 0 (survey eq. 9) the gradient
    of A, proportional to B^T, is zero, so a first A round would learn nothing.
    """
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be an integer >= 0, got {round_index!r}")
    return "B" if round_index % 2 == 0 else "A"


def single_matrix_average(
    frozen: Tensor, trained: Sequence[Tensor], weights: Sequence[float], side: str
) -> Tensor:
    """Survey eq. 5: the weighted average of the one factor that trained.

    With ``side == "B"`` the clients trained B_k against the shared ``frozen`` A, and
    (sum_k p_k B_k) A equals sum_k p_k B_k A exactly; with ``side == "A"`` they trained A_k
    against the shared B, and B (sum_k p_k A_k) equals sum_k p_k B A_k. Either way the
    discordance of eq. 4 is zero.
    """
    check_side(side)
    _check_shared(frozen, trained, side)
    return average_tensors(list(trained), check_weights(weights, len(trained)))


def ffa_aggregate(A: Tensor, Bs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """FFA-LoRA (Sun et al. 2024), eq. 5: with A frozen and shared, sum_k p_k B_k A = (sum_k p_k B_k) A.

    Returns the averaged B; its product with the shared A equals the ideal update exactly.
    """
    check_factors([A] * len(Bs), Bs)
    return average_tensors(list(Bs), check_weights(weights, len(Bs)))


def fresh_factor(shape: tuple[int, int], fan_in: int, generator: torch.Generator) -> Tensor:
    """A random factor drawn like peft's A: uniform on [-1/sqrt(n), 1/sqrt(n)] with n = ``fan_in``.

    (peft's Kaiming-uniform with a = sqrt(5) has exactly this bound.) CoLR draws its shared
    frozen factor this way from the round's seed, so every client can regenerate it.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive sizes, got {shape!r}")
    if not isinstance(fan_in, int) or fan_in < 1:
        raise ValueError(f"fan_in must be an integer >= 1, got {fan_in!r}")
    bound = fan_in ** -0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def round_seed(seed: int, round_index: int) -> int:
    """The seed CoLR's server broadcasts for round ``round_index`` (a pure function of both)."""
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    return derive_seed(seed, "CoLR shared factor", round_index)


def colr_fresh_adapters(
    shapes: Mapping[str, Factors], seed: int, round_index: int, trained: str = "A"
) -> dict[str, Factors]:
    """CoLR's adapter at the start of round ``round_index``: the shared random factor and a zero trained one.

    One generator seeded with :func:`round_seed` draws the frozen factor of every layer,
    in the order of ``shapes`` (only the shapes, dtypes and devices of its (A, B) are
    used), so a client that knows the seed regenerates exactly the server's factors.
    ``trained="A"``: B is random (bound 1/sqrt(n), the scale of peft's A) and A zero;
    ``trained="B"``: A is random and B zero.
    """
    check_side(trained)
    generator = torch.Generator().manual_seed(round_seed(seed, round_index))
    adapters: dict[str, Factors] = {}
    for name, (a, b) in shapes.items():
        fan_in = int(a.shape[1])
        if trained == "A":
            adapters[name] = (torch.zeros_like(a), fresh_factor((int(b.shape[0]), int(b.shape[1])), fan_in,
                                                                 generator).to(b))
        else:
            adapters[name] = (fresh_factor((int(a.shape[0]), int(a.shape[1])), fan_in, generator).to(a),
                              torch.zeros_like(b))
    return adapters


def colr_merge(frozen: Tensor, trained: Sequence[Tensor], weights: Sequence[float], side: str) -> Tensor:
    """CoLR's round update, the m x n product the server folds into W'.

    ``side == "A"`` (CoLR as published): every client trained A_k against the round's
    shared random B_t, and the update is B_t (sum_k p_k A_k) = sum_k p_k B_t A_k.
    ``side == "B"``: the mirror image, (sum_k p_k B_k) A_t. Both equal the ideal update
    of survey eq. 4 exactly.
    """
    average = single_matrix_average(frozen, trained, weights, side)
    return frozen @ average if side == "A" else average @ frozen


def rank_importance(frozen: Tensor, before: Tensor, after: Tensor, side: str) -> Tensor:
    """LoRA-A2's importance score of every rank component i of one layer (a vector of r scores).

    The score is how much component i changed the layer's update dW = B A this round
    (Koo et al. 2024, eq. 2): with B trained against the frozen A it is
    ||(B'_{:,i} - B_{:,i}) A_{i,:}||_F, with A trained against the frozen B it is
    ||B_{:,i} (A'_{i,:} - A_{i,:})||_F. Each term is a rank-one matrix, so its Frobenius
    norm is the product of the two vectors' norms, which is how it is computed here.
    """
    check_side(side)
    if before.shape != after.shape:
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} must have the same shape")
    if side == "B":
        check_factors([frozen], [after])
        return torch.linalg.vector_norm(after - before, dim=0) * torch.linalg.vector_norm(frozen, dim=1)
    check_factors([after], [frozen])
    return torch.linalg.vector_norm(frozen, dim=0) * torch.linalg.vector_norm(after - before, dim=1)


def select_top_ranks(scores: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """The ``count`` most important (layer, rank) components over all layers together.

    LoRA-A2 ranks the components of the whole model, not layer by layer, so a layer
    that needs more fine-tuning gets more of the budget (Koo et al. 2024, section 3.2).
    Returns, per layer, the increasing indices of its selected components (possibly
    none). Ties go to the earlier layer, then the lower index.
    """
    if not scores:
        raise ValueError("scores is empty: need at least one layer")
    total = sum(int(s.numel()) for s in scores.values())
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
        raise ValueError(f"count must be an integer in 1..{total} (the number of rank components), got {count!r}")
    for name, s in scores.items():
        if s.ndim != 1:
            raise ValueError(f"scores[{name!r}] must be a vector (one score per rank), got shape {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{name!r}] holds NaN or Inf")
    names = list(scores)
    flat = torch.cat([scores[n].detach().to(torch.float64).cpu() for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    position = torch.cat([torch.arange(scores[n].numel()) for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices[:count]
    chosen = {n: [] for n in names}
    for j in order.tolist():
        chosen[names[int(owner[j])]].append(int(position[j]))
    return {n: torch.tensor(sorted(chosen[n]), dtype=torch.long) for n in names}


def masked_update_average(
    current: Tensor,
    selections: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float],
    side: str,
) -> Tensor:
    """LoRA-A2's server step for one layer: current + sum_k p_k M_k * (X_k - current).

    ``current`` is the factor every client started from (B, m x r, or A, r x n);
    ``selections[k]`` is what client k sent: the indices of its selected components and
    their trained values (columns of B or rows of A). M_k masks the components client k
    did not select: they count as an unchanged component (a zero update) with the
    client's full weight p_k. This is the weighted average of the clients' masked
    factors current + M_k * (X_k - current); with the other factor shared, its product is
    their ideal aggregation (eq. 5), so the masking adds no discordance.
    """
    check_side(side)
    p = check_weights(weights, len(selections))
    axis = 1 if side == "B" else 0
    total = current.clone()
    for k, ((indices, values), w) in enumerate(zip(selections, p, strict=True)):
        indices = torch.as_tensor(indices, dtype=torch.long, device=current.device).reshape(-1)
        if indices.numel() == 0:
            continue
        if len(set(indices.tolist())) != indices.numel() or int(indices.min()) < 0 \
                or int(indices.max()) >= current.shape[axis]:
            raise ValueError(f"selections[{k}] indices must be distinct ranks in 0..{current.shape[axis] - 1}, "
                             f"got {indices.tolist()}")
        expected = list(current.shape)
        expected[axis] = indices.numel()
        if list(values.shape) != expected:
            raise ValueError(f"selections[{k}] values have shape {tuple(values.shape)}; {indices.numel()} selected "
                             f"{'columns of B' if side == 'B' else 'rows of A'} need {tuple(expected)}")
        values = values.to(current.device, current.dtype)
        if side == "B":
            total[:, indices] += w * (values - current[:, indices])
        else:
            total[indices] += w * (values - current[indices])
    return total


# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------
def _trained_by_layer(server: ServerState, uploads: list[Upload], side: str) -> dict[str, list[Tensor]]:
    """Per layer, the clients' uploaded copies of the factor that trained."""
    out: dict[str, list[Tensor]] = {}
    for name in server.adapters:
        key = f"{name}.{side}"
        missing = [u.client_id for u in uploads if key not in u.payload.tensors]
        if missing:
            raise ValueError(f"uploads of clients {missing} carry no {key}: the {side} round needs it")
        out[name] = [u.payload.tensors[key] for u in uploads]
    return out


class FFALoRA(Strategy):
    """FFA-LoRA (Sun et al. 2024, ICLR): A stays at its random initialisation; only B trains (eq. 5).

    A is derived from the shared seed, so clients never download it; each round moves
    B and the head only.
    """

    name = "FFA-LoRA"
    paper = "Sun, Li, Li, Ding 2024, ICLR, arXiv 2403.12313"
    chapter = "book/part2/aggregation_discordance"

    def trainable(self, round_index: int) -> frozenset[str]:
        return frozenset({"B"})

    def client_start(self, server, client_id, client_state, round_index):
        start = super().client_start(server, client_id, client_state, round_index)
        tensors = {k: v for k, v in start.download.tensors.items() if not k.endswith(".A")}
        start.download = Payload(tensors)
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads)
        server.adapters = {
            n: (server.adapters[n][0], ffa_aggregate(server.adapters[n][0], b_list, weights))
            for n, (_, b_list) in per_layer.items()
        }
        self.aggregate_head(server, uploads)


class RoLoRA(Strategy):
    """RoLoRA (Chen, Ju, Dalal, Zhu, Khisti 2024, arXiv 2409.02346): alternating minimisation of LoRA.

    Survey section 3.1, eq. 5. Round 1 (1-based; ``round_index`` 0) and every odd round
    train and send B with A frozen; even rounds train and send A with B frozen
    (:func:`alternating_side`). In each round the factor that did not train is the
    server's and the same on every client, so averaging the trained one is exact: zero
    discordance, and the upload is one factor instead of two. Unlike FFA-LoRA both
    factors learn, one round each.

    Choices where the paper leaves room: every client downloads the whole current
    adapter (a client may have missed the rounds that changed either factor); each
    round trains with the simulator's single learning rate and optimiser.
    Taught in ``book/part2/single_matrix.ipynb``.
    """

    name = "RoLoRA"
    paper = "Chen, Ju, Dalal, Zhu, Khisti 2024, arXiv 2409.02346"
    chapter = "book/part2/single_matrix"

    def trainable(self, round_index: int) -> frozenset[str]:
        return frozenset({alternating_side(round_index)})

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        side = alternating_side(round_index)
        weights = normalized_weights(uploads)
        adapters = {}
        for name, trained in _trained_by_layer(server, uploads, side).items():
            a, b = server.adapters[name]
            average = single_matrix_average(a if side == "B" else b, trained, weights, side)
            adapters[name] = (a, average) if side == "B" else (average, b)
        server.adapters = adapters
        self.aggregate_head(server, uploads)


class CoLR(Strategy):
    """CoLR, Correlated Low-rank Structure (Nguyen, Nguyen, Nguyen, Hoang, Le, Wong 2024, WWW, arXiv 2401.03748).

    Survey section 3.1, eq. 5. Every round the server draws a fresh random factor from a
    seed it broadcasts (:func:`colr_fresh_adapters`), the same on every
    client and frozen; the other factor starts at zero and is the only one that trains
    and is sent. The server averages it (exact, eq. 5) and *folds the round's product
    into the frozen weight*: W'_{t+1} = W'_t + s B_t (sum_k p_k A_k) (:func:`colr_merge`,
    ``server.base_deltas``), then starts the next round from a new random factor and a
    zero trained factor. The global model is W'_0 + s sum_t B_t avg(A_t).

    Why folding keeps the global update consistent when the random factor changes: the
    accumulated update lives in W', not in the adapter, so a new random factor never has
    to re-express old progress; each round's adapter starts at B_t 0 = 0, so the model
    the clients train from is exactly the global model; and within a round the shared
    factor makes the average exact. (Re-expressing the accumulated update in the new
    factor's span instead would lose everything outside a rank-r subspace.) The survey's
    "decomposing the full matrix W on the server" is this: the server keeps the full W'
    and every round's change to it is the product of a shared random factor and an
    averaged small one.

    ``trained="A"`` (default) is the paper's orientation: its update is
    Delta Q = B^(t) sum_u A_u^(t) with B^(t) shared, fresh each round and frozen, A trained
    (survey notation: B is m x r, A is r x n). ``trained="B"`` is the mirror image, a fresh
    frozen A (as FFA-LoRA, but redrawn every round) with B trained.

    Bytes down are counted at their real size: the next round's seed, the head, and for
    every merge the client has not applied yet (it may have missed rounds) the averaged
    trained factors plus that round's seed, or the dense accumulated m x n change per
    layer where that is smaller.

    Deviation from the reference code: the authors' code (NNHieu/CoLR-FedRec, commit
    d5ec0766f383ebfbe264712f0d9656ac555689f5, ``fedrec/fedmf_colr.py``: ``CoLREmbedding`` and
    ``FedMFCoLR.on_server_prepare``), written for the item embeddings of federated matrix
    factorisation, redraws the frozen factor every round as a Gaussian matrix made orthonormal
    by its SVD and multiplied by sqrt(m / r) (m the embedding size; in survey notation
    B^T B = (m / r) I_r), with LoRA constant 1, and multiplies A's gradient by sqrt(r / m); its
    server averages each row of A over the clients whose training touched that item. Ours
    draws B uniform on [-1/sqrt(n), 1/sqrt(n)] (:func:`fresh_factor`, peft's scale for a LoRA
    factor), applies s = alpha / r and weights clients by p_k. The frozen factor's scale times
    the constant sets how far a step on A moves the weight, CoLR's effective step size, so the
    two do not match at the same learning rate. Why ours: the survey does not say how the
    factor is drawn, and LoRA's usual scale and constant let one learning rate serve every
    method, so that the comparison is fair. The effect of the difference
    on accuracy is measured by ``studies/deviations.py`` (the authors' way, on the testbed, paired
    over seeds with this class's runs in ``studies/part2.py``) and reported in
    ``book/part2/single_matrix.ipynb``.
    Taught in ``book/part2/single_matrix.ipynb``.
    """

    name = "CoLR"
    paper = "Nguyen et al. 2024, WWW, arXiv 2401.03748"
    chapter = "book/part2/single_matrix"

    @dataclass
    class State:
        """Per round, the averaged trained factor of every layer (what a late client must apply)."""

        merges: list[dict[str, Tensor]] = field(default_factory=list)

    @dataclass
    class ClientState:
        """How many of the server's merges this client has applied to its W'."""

        merges_applied: int = 0

    def __init__(self, rank: int | None = None, trained: str = "A") -> None:
        super().__init__(rank)
        if trained not in SIDES:
            raise ValueError(f"trained must be 'A' (the paper's orientation) or 'B', got {trained!r}")
        self.trained = trained

    def trainable(self, round_index: int) -> frozenset[str]:
        return frozenset({self.trained})

    def init_server(self, server: ServerState, seed: int) -> None:
        server.adapters = colr_fresh_adapters(server.adapters, seed, 0, self.trained)

    def client_start(
        self, server: ServerState, client_id: int, client_state: Any, round_index: int
    ) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        merges = server.method_state.merges
        missed = merges[client_state.merges_applied:]
        tensors: dict[str, Tensor] = {f"head.{k}": v for k, v in server.head.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + SEED_BYTES  # this round's seed
        if missed:
            factored = sum(t.numel() * t.element_size() for m in missed for t in m.values()) + SEED_BYTES * len(missed)
            dense = sum(a.shape[1] * b.shape[0] * a.element_size() for a, b in server.adapters.values())
            nbytes += min(factored, dense)
            for j, merge in enumerate(missed):
                tensors.update({f"{name}.{self.trained}@merge{j}": t for name, t in merge.items()})
        client_state.merges_applied = len(merges)
        start.download = Payload(tensors, nbytes=nbytes)
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights = normalized_weights(uploads)
        side = self.trained
        deltas, averages = {}, {}
        for name, trained in _trained_by_layer(server, uploads, side).items():
            a, b = server.adapters[name]
            frozen = b if side == "A" else a
            averages[name] = single_matrix_average(frozen, trained, weights, side)
            deltas[name] = colr_merge(frozen, trained, weights, side)
        server.method_state.merges.append(averages)
        server.base_deltas = {name: server.scaling * delta for name, delta in deltas.items()}
        server.adapters = colr_fresh_adapters(server.adapters, server.seed, round_index + 1,
                                              self.trained)
        self.aggregate_head(server, uploads)


class LoRAA2(Strategy):
    """LoRA-A2, alternating freeze and adaptive rank selection (Koo, Jang, Ok 2024, ACL 2025, arXiv 2410.22815).

    Survey section 3.1, eq. 5. The factors alternate as in :class:`RoLoRA` (B in rounds
    1, 3, 5, ..., A in rounds 2, 4, ...). After local training, client k scores every
    rank component of the factor it trained by how much it changed the update B A
    (:func:`rank_importance`), selects its ``budget`` times the number of adapted layers
    most important components across the whole model (:func:`select_top_ranks`) and
    sends only those: their indices (16-bit) and values (columns of B or rows of A),
    counted at that size. The server adds the weighted masked updates
    (:func:`masked_update_average`). The shared frozen factor keeps every round exact.

    ``budget`` is the communication rank budget per layer, an int for every client or one
    int per client (the paper's heterogeneous clients); default half the rank. A budget
    equal to the rank sends everything, which is RoLoRA.

    Choices where the paper leaves room: the client trains all components of the round's
    factor and selects afterwards, scoring with its own update (the paper's mask is
    multiplied with the updated factor); a component a client did not send counts as
    unchanged with the client's full weight p_k (not renormalised over the clients that
    sent it), which keeps the aggregate equal to the ideal update of the masked clients;
    one learning rate for A and B (the paper borrows LoRA+'s two rates; the simulator has
    one).
    Taught in ``book/part2/single_matrix.ipynb``.
    """

    name = "LoRA-A2"
    paper = "Koo, Jang, Ok 2024, ACL 2025, arXiv 2410.22815"
    chapter = "book/part2/single_matrix"

    @dataclass
    class ClientState:
        """The round's starting factors and rank budget, kept to score the client's own update."""

        start: dict[str, Factors] = field(default_factory=dict)
        budget: int = 0

    def __init__(self, rank: int | None = None, budget: int | Sequence[int] | None = None) -> None:
        super().__init__(rank)
        if budget is not None:
            values = [budget] if isinstance(budget, int) and not isinstance(budget, bool) else list(budget)  # type: ignore[arg-type]
            if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
                raise ValueError(f"budget must be an integer >= 1 or a list of them (one per client), got {budget!r}")
            if rank is not None and max(values) > rank:
                raise ValueError(f"budget {max(values)} exceeds the rank {rank}: a client cannot send more ranks "
                                 "than the adapter has")
        self.budget = budget

    def max_rank(self, num_clients: int) -> int | None:
        if self.budget is not None and not isinstance(self.budget, int) and len(self.budget) != num_clients:
            raise ValueError(f"budget has {len(self.budget)} entries for {num_clients} clients")
        return self.rank

    def client_budget(self, client_id: int, server: ServerState) -> int:
        """The rank budget r_k of client k: how many components per layer, on average, it may send."""
        rank = self.client_rank(client_id, server)
        if self.budget is None:
            return max(1, rank // 2)
        value = self.budget if isinstance(self.budget, int) else self.budget[client_id]
        if value > rank:
            raise ValueError(f"budget {value} of client {client_id} exceeds the rank {rank}")
        return value

    def trainable(self, round_index: int) -> frozenset[str]:
        return frozenset({alternating_side(round_index)})

    def client_start(
        self, server: ServerState, client_id: int, client_state: Any, round_index: int
    ) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        # The client keeps its starting factors to score its own update (they never leave it).
        client_state.start = {name: (a.clone(), b.clone()) for name, (a, b) in start.adapters.items()}
        client_state.budget = self.client_budget(client_id, server)
        return start

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        side = alternating_side(round_index)
        started = client_state.start
        scores = {}
        for name, (a, b) in result.adapters.items():
            a0, b0 = started[name]
            scores[name] = rank_importance(a0, b0, b, side) if side == "B" else rank_importance(b0, a0, a, side)
        count = client_state.budget * len(scores)
        selected = select_top_ranks(scores, count)
        tensors: dict[str, Tensor] = {}
        for name, indices in selected.items():
            if indices.numel() == 0:
                continue
            a, b = result.adapters[name]
            tensors[f"{name}.{side}.ranks"] = indices.to(INDEX_DTYPE)
            tensors[f"{name}.{side}.values"] = b[:, indices] if side == "B" else a[indices]
        tensors.update({f"head.{k}": v for k, v in result.head.items()})
        return Payload(tensors)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        side = alternating_side(round_index)
        weights = normalized_weights(uploads)
        adapters = {}
        for name, (a, b) in server.adapters.items():
            selections = []
            for upload in uploads:
                indices = upload.payload.tensors.get(f"{name}.{side}.ranks")
                if indices is None:
                    selections.append((torch.zeros(0, dtype=torch.long), a.new_zeros(0)))
                else:
                    selections.append((indices.long(), upload.payload.tensors[f"{name}.{side}.values"]))
            updated = masked_update_average(b if side == "B" else a, selections, weights, side)
            adapters[name] = (a, updated) if side == "B" else (updated, b)
        server.adapters = adapters
        self.aggregate_head(server, uploads)

