"""Exercises on the cores of the methods of Part I (FedAvg), Part II (section 3) and Part IV (section 5).

Each one asks for the step that defines a method, as a small function, and is checked by
:func:`fedlora_edu.teaching.exercises.check` against the package's own implementation on random
inputs. Where several answers are right (an SVD's factors are defined up to the signs of their
components; FLoRA's weights can sit on either stack), the check compares what every right answer
shares: the product ``B A`` and, for a balanced split, the norms of the components.

Notation (survey section 2): ``A_k`` is ``r_k x n``, ``B_k`` is ``m x r_k``, ``dW_k = B_k A_k``,
weights ``p_k >= 0`` sum to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora_edu.core.factors import fedit_average, ideal_update
from fedlora_edu.distributed.client_init import fedloru_global_weight
from fedlora_edu.distributed.corrective import fedex_residual
from fedlora_edu.distributed.full_size import flexlora, flora_stack
from fedlora_edu.distributed.rank_clustering import rank_vectors
from fedlora_edu.distributed.server_init import svd_init
from fedlora_edu.distributed.single_matrix import colr_merge
from fedlora_edu.efficiency.compression import forward_gradient, top_k_encode
from fedlora_edu.efficiency.layers import aggregate_by_layer, knapsack
from fedlora_edu.efficiency.privacy import clip_update, update_norm
from fedlora_edu.efficiency.sparse import sparse_bytes, top_k_mask
from fedlora_edu.efficiency.split import nearest_token_attack, step_bytes
from fedlora_edu.foundations.fedavg import fedavg
from fedlora_edu.simulation.metrics import gain_recovered
from fedlora_edu.teaching.checking import (
    Exercise,
    any_rank_cases,
    case_seed,
    close,
    matches,
    same_rank_cases,
)
from fedlora_edu.teaching.comparison import pareto_front


def _is_pair(answer: object) -> bool:
    return isinstance(answer, tuple) and len(answer) == 2 and all(isinstance(x, Tensor) for x in answer)


def _pair_form(answer: object, rows: int, n: int, m: int) -> str | None:
    """What is wrong with the form of an (A, B) answer with A ``rows x n`` and B ``m x rows``, or None."""
    if not _is_pair(answer):
        return "return a pair of tensors (A, B), A first"
    A_ans, B_ans = answer
    if A_ans.shape == (m, rows) and B_ans.shape == (rows, n):
        return "the pair is in the wrong order: return (A, B), A first"
    if A_ans.shape == (n, rows) and B_ans.shape == (m, rows):
        return f"A is transposed: A is r x n = {rows} x {n} (each row one component), B is m x r"
    if A_ans.shape != (rows, n) or B_ans.shape != (m, rows):
        return f"A is {rows} x {n} and B is {m} x {rows}; got {tuple(A_ans.shape)} and {tuple(B_ans.shape)}"
    return None


def _balanced_form(pair: object) -> object:
    """What every balanced split of one truncated SVD shares: B A and each component's norm in A and in B."""
    A, B = pair
    return (B @ A, torch.sort(A.norm(dim=1)).values, torch.sort(B.norm(dim=0)).values)


def _product_form(pair: object) -> object:
    """What every FLoRA stack shares: the product and the stacks' shapes."""
    A, B = pair
    return (B @ A, torch.tensor(A.shape, dtype=torch.float64), torch.tensor(B.shape, dtype=torch.float64))


# ----- Part I: FedAvg (survey eq. 1) ---------------------------------------------------------------
def _fedavg_cases(seed: int) -> list[tuple]:
    """Clients' models as state dicts of two tensors, and their numbers of examples n_k."""
    cases = []
    for offset, (clients, sizes) in enumerate([(3, [10, 30, 60]), (2, [5, 5]), (4, [1, 100, 7, 20])]):
        gen = torch.Generator().manual_seed(case_seed(seed, 70 + offset))
        states = [{"weight": torch.randn(3, 4, generator=gen, dtype=torch.float64),
                   "bias": torch.randn(3, generator=gen, dtype=torch.float64)} for _ in range(clients)]
        cases.append((states, sizes))
    return cases


def _fedavg_reference(states: list[dict[str, Tensor]], sizes: list[int]) -> dict[str, Tensor]:
    total = sum(sizes)
    return fedavg(states, [n / total for n in sizes])


def _hint_fedavg(case: tuple, answer: object) -> str | None:
    states, sizes = case
    if not isinstance(answer, dict) or set(answer) != set(states[0]):
        return f"return a dict with the same names as each client's state: {sorted(states[0])}"
    plain = {name: sum(s[name] for s in states) / len(states) for name in states[0]}
    if all(close(answer[name], plain[name]) for name in plain):
        return "this is the plain mean: weight client k by p_k = n_k / n"
    summed = {name: sum(n * s[name] for n, s in zip(sizes, states, strict=True)) for name in states[0]}
    if all(close(answer[name], summed[name]) for name in summed):
        return "the weights n_k do not sum to one: divide by n = sum_k n_k"
    return None


# ----- Part I: LoRA's merge (survey eq. 2) -----------------------------------------------------------
def _merge_cases(seed: int) -> list[tuple]:
    cases = []
    for offset, (m, n, r, alpha) in enumerate([(6, 4, 2, 16.0), (3, 8, 1, 1.0), (5, 5, 4, 8.0)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 80 + offset))
        cases.append((torch.randn(m, n, generator=gen, dtype=torch.float64),
                      torch.randn(r, n, generator=gen, dtype=torch.float64),
                      torch.randn(m, r, generator=gen, dtype=torch.float64), alpha))
    return cases


def _merge_reference(W: Tensor, A: Tensor, B: Tensor, alpha: float) -> Tensor:
    """The merged weight through the package's factored update: W + (alpha / r) sum of one client's B A."""
    return W + (alpha / A.shape[0]) * ideal_update([A], [B], [1.0])


def _hint_merge(case: tuple, answer: object) -> str | None:
    W, A, B, alpha = case
    if not isinstance(answer, Tensor):
        return f"return a torch.Tensor shaped like W, {tuple(W.shape)}"
    if answer.shape != W.shape:
        return f"the merged weight has W's shape {tuple(W.shape)} (B A is m x n), got {tuple(answer.shape)}"
    if close(answer, W + B @ A):
        return f"the scaling alpha / r is missing (here {alpha} / {A.shape[0]})"
    if close(answer, W + alpha * (B @ A)):
        return "scale by alpha / r, not alpha"
    if close(answer, (alpha / A.shape[0]) * (B @ A)):
        return "the frozen W is missing: the merged layer computes W + (alpha / r) B A"
    return None


# ----- Part II, single matrix: CoLR (survey eq. 5) ----------------------------------------------------
def _colr_cases(seed: int) -> list[tuple]:
    """CoLR's round: the shared random B_t and the clients' trained A_k (one rank), weights p_k."""
    cases = []
    for index, (As, Bs, weights) in enumerate(same_rank_cases(seed)):
        cases.append((Bs[index % len(Bs)], As, weights))
    return cases


def _colr_reference(B_t: Tensor, As: list[Tensor], weights: list[float]) -> Tensor:
    return colr_merge(B_t, As, weights, "A")


def _hint_colr(case: tuple, answer: object) -> str | None:
    B_t, As, weights = case
    m, n = B_t.shape[0], As[0].shape[1]
    if not isinstance(answer, Tensor):
        return f"return a torch.Tensor of shape (m, n) = ({m}, {n})"
    if answer.shape == As[0].shape:
        return "this is the averaged A; the server folds the m x n product B_t (sum_k p_k A_k) into W'"
    if answer.shape == (n, m):
        return "the product is transposed: B_t (m x r) times the averaged A (r x n) is m x n"
    if answer.shape == (m, n) and close(answer, B_t @ (sum(As) / len(As))):
        return "this is the plain mean of the A_k: weight each by p_k"
    return None


# ----- Part II, full size: FLoRA's stack and FlexLoRA's SVD (survey eq. 6) ----------------------------
def _hint_flora(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    rows, n, m = sum(a.shape[0] for a in As), As[0].shape[1], Bs[0].shape[0]
    problem = _pair_form(answer, rows, n, m)
    if problem:
        return problem
    A_ans, B_ans = answer
    if close(B_ans @ A_ans, sum(B @ A for A, B in zip(As, Bs, strict=True))):
        return "the weights p_k are missing: scale each client's A_k (or its B_k, not both) by p_k"
    if close(B_ans @ A_ans, sum(p * p * (B @ A) for p, A, B in zip(weights, As, Bs, strict=True))):
        return "p_k is applied twice: scale A_k or B_k, not both"
    return None


def _flexlora_cases(seed: int) -> list[tuple]:
    """Clients of one or several ranks and a rank r to hand out, at most the smallest r_k, m and n."""
    cases = []
    for index, (As, Bs, weights) in enumerate(any_rank_cases(seed)):
        smallest = min(min(a.shape[0] for a in As), As[0].shape[1], Bs[0].shape[0])  # no zero components
        cases.append((As, Bs, weights, max(1, smallest - index % 2)))
    return cases


def _flexlora_reference(As: list[Tensor], Bs: list[Tensor], weights: list[float], rank: int) -> tuple[Tensor, Tensor]:
    return flexlora(As, Bs, weights, [rank])[0]


def _hint_flexlora(case: tuple, answer: object) -> str | None:
    As, Bs, weights, rank = case
    problem = _pair_form(answer, rank, As[0].shape[1], Bs[0].shape[0])
    if problem:
        return problem
    A_ans, B_ans = answer
    expected = _flexlora_reference(As, Bs, weights, rank)
    if close(B_ans @ A_ans, expected[1] @ expected[0]):
        if torch.allclose(A_ans.norm(dim=1), torch.ones(rank, dtype=A_ans.dtype), atol=1e-6):
            return "the product is right but all of S sits in B (A's rows have norm 1): put sqrt(S) on each side"
        return "the product is right but the singular values are not split evenly: A = sqrt(S_r) V_r^T, " \
               "B = U_r sqrt(S_r)"
    A_avg, B_avg = fedit_average(As, Bs, weights)
    fedit = _balanced_form(flexlora([A_avg], [B_avg], [1.0], [rank])[0])
    if matches(_balanced_form(answer), fedit):
        return "this is the SVD of FedIT's product avg(B) avg(A); FlexLoRA takes the SVD of sum_k p_k B_k A_k"
    plain = _balanced_form(flexlora(As, Bs, [1.0 / len(As)] * len(As), [rank])[0])
    if matches(_balanced_form(answer), plain):
        return "this is the SVD of the plain mean: weight each client's B_k A_k by p_k"
    return None


# ----- Part II, corrective: LoRA-FAIR without its penalty (survey eq. 7) ------------------------------
def _lora_fair_reference(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> Tensor:
    """The least-squares correction: argmin over dB of || R - dB avg(A) ||_F = R avg(A)^+, R FedEx-LoRA's residual."""
    A_avg, _ = fedit_average(As, Bs, weights)
    return fedex_residual(As, Bs, weights) @ torch.linalg.pinv(A_avg)


def _hint_lora_fair(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    m, r = Bs[0].shape
    if not isinstance(answer, Tensor):
        return f"return dB, a torch.Tensor of shape (m, r) = ({m}, {r})"
    if answer.shape != (m, r):
        return f"dB corrects avg(B), so it is m x r = {m} x {r}; got {tuple(answer.shape)}"
    A_avg, _ = fedit_average(As, Bs, weights)
    residual = fedex_residual(As, Bs, weights)
    if close(answer, residual @ A_avg.T):
        return "avg(A)^T is not the inverse: avg(A) is r x n with r < n, use its pseudo-inverse (torch.linalg.pinv)"
    if close(answer, -(residual @ torch.linalg.pinv(A_avg))):
        return "the sign is flipped: avg(B) + dB should move avg(B) avg(A) toward sum_k p_k B_k A_k"
    return None


# ----- Part II, server initialization: FeDeRA (survey eq. 10) -----------------------------------------
def _svd_init_cases(seed: int) -> list[tuple]:
    cases = []
    for offset, (m, n, r) in enumerate([(6, 4, 2), (5, 8, 3), (7, 7, 1)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 90 + offset))
        cases.append((torch.randn(m, n, generator=gen, dtype=torch.float64), r))
    return cases


def _svd_init_reference(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    return svd_init(W, rank)


def _hint_svd_init(case: tuple, answer: object) -> str | None:
    W, rank = case
    problem = _pair_form(answer, rank, W.shape[1], W.shape[0])
    if problem:
        return problem
    A_ans, B_ans = answer
    A_ref, B_ref = svd_init(W, rank)
    if close(B_ans @ A_ans, B_ref @ A_ref):
        return "the product is right but the singular values are not split evenly: A = sqrt(S_r) V_r^T, " \
               "B = U_r sqrt(S_r) (this package's balanced reading of eq. 10)"
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    if close(B_ans @ A_ans, u[:, -rank:] @ torch.diag(s[-rank:]) @ vh[-rank:]):
        return "these are the smallest singular values; torch.linalg.svd sorts them largest first: keep the first r"
    return None


# ----- Part II, client initialization: FedLoRU's accumulation (survey eq. 11) -------------------------
def _fedloru_cases(seed: int) -> list[tuple]:
    cases = []
    for offset, (m, n, r, rounds, scaling) in enumerate([(6, 4, 2, 3, 2.0), (4, 7, 1, 1, 0.5), (5, 5, 3, 4, 1.0)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 100 + offset))
        W = torch.randn(m, n, generator=gen, dtype=torch.float64)
        accumulated = [(torch.randn(r, n, generator=gen, dtype=torch.float64),
                        torch.randn(m, r, generator=gen, dtype=torch.float64)) for _ in range(rounds)]
        cases.append((W, accumulated, scaling))
    return cases


def _hint_fedloru(case: tuple, answer: object) -> str | None:
    W, accumulated, scaling = case
    if not isinstance(answer, Tensor) or answer.shape != W.shape:
        return f"return a torch.Tensor shaped like W', {tuple(W.shape)}"
    if close(answer, W + sum(b @ a for a, b in accumulated)):
        return f"the scaling s = alpha / r is missing (here {scaling})"
    last_a, last_b = accumulated[-1]
    if close(answer, W + scaling * (last_b @ last_a)):
        return "only the last adapter was merged: W' accumulates every accumulation round's B_t A_t"
    if close(answer, scaling * sum(b @ a for a, b in accumulated)):
        return "the pre-trained W' is missing: the accumulated updates are added to it"
    return None


# ----- Part II, rank clustering: FedInc's rank vectors (survey eq. 8) ---------------------------------
def _rank_vectors_reference(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> Tensor:
    return rank_vectors(As, Bs, weights)[0]


def _hint_rank_vectors(case: tuple, answer: object) -> str | None:
    As, Bs, weights = case
    rows, n, m = sum(a.shape[0] for a in As), As[0].shape[1], Bs[0].shape[0]
    if not isinstance(answer, Tensor):
        return f"return Z, one torch.Tensor of shape (sum_k r_k, n + m) = ({rows}, {n + m})"
    if answer.shape == (n + m, rows):
        return "Z is transposed: one row per rank component, [a_i, b_i] of length n + m"
    if answer.shape != (rows, n + m):
        return f"Z has one row per rank component of every client: {rows} x {n + m}, got {tuple(answer.shape)}"
    swapped = torch.cat([torch.cat([b.T, a], dim=1) for a, b in zip(As, Bs, strict=True)], dim=0)
    if close(answer, swapped):
        return "each row is [b_i, a_i]; eq. 8 writes z_i = [a_i, b_i]: row i of A_k first, then column i of B_k"
    return None


# ----- Part II at a glance: gain recovered -------------------------------------------------------------
def _gain_cases(seed: int) -> list[tuple]:
    cases = []
    for offset, count in enumerate([5, 3, 8]):
        gen = torch.Generator().manual_seed(case_seed(seed, 110 + offset))
        probe = 0.2 + 0.2 * float(torch.rand((), generator=gen, dtype=torch.float64))
        centralized = probe + 0.1 + 0.3 * float(torch.rand((), generator=gen, dtype=torch.float64))
        accuracies = probe - 0.05 + (centralized - probe + 0.1) * torch.rand(count, generator=gen, dtype=torch.float64)
        cases.append((accuracies, probe, centralized))
    return cases


def _gain_reference(accuracies: Tensor, probe: float, centralized: float) -> Tensor:
    return torch.as_tensor(gain_recovered(accuracies.numpy(), probe, centralized), dtype=torch.float64)


def _hint_gain(case: tuple, answer: object) -> str | None:
    accuracies, probe, centralized = case
    if not isinstance(answer, Tensor) or answer.shape != accuracies.shape:
        return f"return a torch.Tensor with one share per accuracy, shape {tuple(accuracies.shape)}"
    if close(answer, accuracies / centralized):
        return "this is the share of centralised LoRA's accuracy; the gain is measured from the probe: subtract it"
    if close(answer, (accuracies - probe) / centralized):
        return "divide by the gain centralised LoRA makes over the probe, centralized - probe"
    if close(answer, (accuracies - probe).clamp_min(0) / (centralized - probe)):
        return "do not clip: a method below the probe recovers a negative share, and that is worth seeing"
    return None


# ----- Part IV, sparse: FLASC's top-k payload ----------------------------------------------------------
def _top_k_cases(seed: int) -> list[tuple]:
    """A client's adapter as named tensors of different scales, and a density."""
    cases = []
    for offset, (density, scales) in enumerate([(0.25, (1.0, 3.0)), (0.1, (1.0, 1.0, 0.2)), (0.5, (2.0,))]):
        gen = torch.Generator().manual_seed(case_seed(seed, 120 + offset))
        tensors = {f"layer{i}.{side}": scale * torch.randn(shape, generator=gen, dtype=torch.float64)
                   for i, scale in enumerate(scales) for side, shape in (("A", (2, 7)), ("B", (5, 2)))}
        cases.append((tensors, density))
    return cases


def _hint_top_k(case: tuple, answer: object) -> str | None:
    tensors, density = case
    if not isinstance(answer, dict) or set(answer) != set(tensors):
        return f"return a dict of boolean masks with the same names as the tensors: {sorted(tensors)}"
    if not all(isinstance(mask, Tensor) and mask.shape == tensors[name].shape for name, mask in answer.items()):
        return "each mask has the shape of its tensor"
    per_tensor = {name: top_k_mask({name: t}, density)[name] for name, t in tensors.items()}
    if all(torch.equal(answer[name].bool(), per_tensor[name]) for name in tensors):
        return "this is a top-k per tensor; FLASC keeps the largest entries over the whole adapter (one threshold)"
    total = sum(t.numel() for t in tensors.values())
    kept = sum(int(mask.bool().sum()) for mask in answer.values())
    k = int(torch.ceil(torch.tensor(density * total)).item())
    if kept != k:
        return f"keep exactly k = ceil(density x total) = {k} entries over all tensors together, kept {kept}"
    signed = torch.cat([t.reshape(-1) for t in tensors.values()])
    if torch.equal(torch.cat([answer[name].bool().reshape(-1) for name in tensors]),
                   torch.zeros_like(signed, dtype=torch.bool).index_fill_(0, torch.topk(signed, k).indices, True)):
        return "rank the entries by magnitude (abs), not by signed value: a large negative entry matters as much"
    return None


def _top_k_reference(tensors: dict[str, Tensor], density: float) -> dict[str, Tensor]:
    return top_k_mask(tensors, density)


def _bytes_cases(seed: int) -> list[tuple]:
    """Tensors with their top-k masks, at densities on both sides of where sending everything is cheaper."""
    cases = []
    for offset, density in enumerate([0.1, 0.3, 0.8]):
        tensors = _top_k_cases(seed)[offset % 3][0]
        cases.append((tensors, top_k_mask(tensors, density)))
    return cases


def _bytes_reference(tensors: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
    return torch.tensor(float(sparse_bytes(tensors, masks)), dtype=torch.float64)


def _bytes_form(answer: object) -> object:
    """Bytes as a number: an int or float answer becomes a scalar tensor."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float, Tensor)):
        return answer
    return torch.as_tensor(float(answer), dtype=torch.float64)


def _hint_bytes(case: tuple, answer: object) -> str | None:
    tensors, masks = case
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return f"return the number of bytes as an int, not {type(answer).__name__}"
    kept = sum(int(m.sum()) for m in masks.values())
    dense = sum(t.numel() for t in tensors.values()) * 4
    if answer == kept * 4:
        return "each kept entry also needs its index (4 bytes) so the server knows where it goes"
    if answer == kept * 8 and kept * 8 > dense:
        return "here sending every entry densely is cheaper than values plus indices: send whichever is fewer bytes"
    return None


def _layerwise_cases(seed: int) -> list[tuple]:
    """A global adapter of a few modules, the modules each client trained (a subset), and the clients' p_k; in each
    case one module nobody trained."""
    cases = []
    for offset, (modules, held) in enumerate([(3, [[0], [0, 1], [1]]), (4, [[0, 1], [1], [0, 1, 2], [2]]),
                                              (2, [[0], [0]])]):
        gen = torch.Generator().manual_seed(case_seed(seed, 140 + offset))
        names = [f"layer{i}.query" for i in range(modules)]
        current = {name: (torch.randn(2, 5, generator=gen, dtype=torch.float64),
                          torch.randn(4, 2, generator=gen, dtype=torch.float64)) for name in names}
        uploads = [{names[i]: (torch.randn(2, 5, generator=gen, dtype=torch.float64),
                               torch.randn(4, 2, generator=gen, dtype=torch.float64)) for i in kept} for kept in held]
        raw = torch.rand(len(held), generator=gen, dtype=torch.float64) + 0.1
        cases.append((current, uploads, (raw / raw.sum()).tolist()))
    return cases


def _layerwise_reference(current: dict, uploads: list, weights: list) -> dict:
    return aggregate_by_layer(current, uploads, weights)[0]


def _hint_layerwise(case: tuple, answer: object) -> str | None:
    current, uploads, weights = case
    if not isinstance(answer, dict) or set(answer) != set(current):
        return f"return a dict with every module of the global adapter: {sorted(current)}"
    unheld = [name for name in current if not any(name in upload for upload in uploads)]
    if any(not matches(answer[name], current[name]) for name in unheld):
        return "a module no client trained keeps its value (the global adapter's A and B, unchanged)"
    plain = {name: tuple(sum(w * upload[name][i] for w, upload in zip(weights, uploads, strict=True)
                             if name in upload) for i in (0, 1))
             for name in current if name not in unheld}
    if all(matches(answer[name], plain[name]) for name in plain):
        return "renormalise p_k over the clients that trained the module: divide by the sum of their weights"
    return None


def _knapsack_cases(seed: int) -> list[tuple]:
    """Layers' scores (distinct, so one choice is best) and memory costs, and a client's budget."""
    cases = []
    for offset, (items, capacity) in enumerate([(4, 10), (6, 17), (5, 3)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 150 + offset))
        values = (torch.rand(items, generator=gen, dtype=torch.float64) * 10).tolist()
        costs = torch.randint(1, 9, (items,), generator=gen).tolist()
        cases.append((values, costs, capacity))
    # One where taking layers by score per cost misses the best pair.
    return [([10.0, 7.1, 6.9], [6, 5, 5], 10)] + cases


def _knapsack_reference(values: list, costs: list, capacity: int) -> Tensor:
    return torch.tensor(knapsack(values, costs, capacity), dtype=torch.int64)


def _chosen_form(answer: object) -> object:
    """A choice of items as a sorted integer tensor (any order, list or tuple of ints)."""
    if isinstance(answer, Tensor):
        answer = answer.tolist()
    if isinstance(answer, (list, tuple, set)) and all(isinstance(i, int) and not isinstance(i, bool) for i in answer):
        return torch.tensor(sorted(answer), dtype=torch.int64)
    return answer


def _hint_knapsack(case: tuple, answer: object) -> str | None:
    values, costs, capacity = case
    chosen = _chosen_form(answer)
    if not isinstance(chosen, Tensor):
        return "return the chosen layers' indices as a list of ints"
    if sum(costs[i] for i in chosen.tolist()) > capacity:
        return "the chosen layers' costs add up to more than the budget"
    by_ratio = sorted(range(len(values)), key=lambda i: values[i] / costs[i], reverse=True)
    greedy, spent = [], 0
    for i in by_ratio:
        if spent + costs[i] <= capacity:
            greedy.append(i)
            spent += costs[i]
    if torch.equal(chosen, torch.tensor(sorted(greedy), dtype=torch.int64)):
        return "taking layers by score per cost is greedy, not the best choice: try every subset that fits"
    return None


# ----- Part IV, compression: a top-k payload and FwdLLM's forward gradient ------------------------------
def _top_k_payload_cases(seed: int) -> list[tuple]:
    """A client's change as named float32 tensors of different scales, and a density (FLASC's cases, in float32)."""
    return [({name: t.float() for name, t in tensors.items()}, density) for tensors, density in _top_k_cases(seed)]


def _top_k_payload_reference(tensors: dict[str, Tensor], density: float) -> tuple[Tensor, Tensor]:
    return top_k_encode(tensors, density)


def _payload_form(answer: object) -> object:
    """A payload up to the order of its entries: (values, positions as int64), sorted by position."""
    values, indices = answer
    order = torch.argsort(torch.as_tensor(indices).long())
    return (torch.as_tensor(values).float()[order], torch.as_tensor(indices).long()[order])


def _hint_top_k_payload(case: tuple, answer: object) -> str | None:
    tensors, density = case
    if not (isinstance(answer, tuple) and len(answer) == 2 and all(isinstance(x, Tensor) for x in answer)):
        return "return a pair of tensors (values, indices), values first"
    values, indices = answer
    total = sum(t.numel() for t in tensors.values())
    k = int(torch.ceil(torch.tensor(density * total)).item())
    if values.numel() != k or indices.numel() != k:
        return f"the payload holds exactly k = ceil(density x total) = {k} values and {k} indices"
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    if torch.equal(torch.sort(indices.long()).values, torch.sort(torch.topk(flat, k).indices).values):
        return "rank the entries by magnitude (abs), not by signed value: a large negative entry matters as much"
    per_tensor_counts = [int(torch.ceil(torch.tensor(density * t.numel())).item()) for t in tensors.values()]
    if sum(per_tensor_counts) == k and not torch.equal(
            torch.sort(indices.long()).values, torch.sort(top_k_encode(tensors, density)[1].long()).values):
        return "one threshold over all tensors together, not a top-k per tensor"
    if not torch.allclose(values.float(), flat[indices.long()].float()):
        return "values[i] is the entry at position indices[i], with its sign"
    return None


def _forward_gradient_cases(seed: int) -> list[tuple]:
    """A small classifier layer: weight (classes x features), features, labels, Gaussian directions, a step h."""
    cases = []
    for offset, (classes, features, count) in enumerate([(3, 5, 4), (2, 4, 1), (4, 6, 16)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 250 + offset))
        weight = torch.randn(classes, features, generator=gen, dtype=torch.float64)
        inputs = torch.randn(12, features, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, classes, (12,), generator=gen)
        directions = [torch.randn(classes, features, generator=gen, dtype=torch.float64) for _ in range(count)]
        cases.append((weight, inputs, labels, directions, 0.01))
    return cases


def _layer_loss(weight: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(inputs @ weight.T, labels)


def _forward_gradient_reference(weight: Tensor, inputs: Tensor, labels: Tensor, directions: list[Tensor],
                                step: float) -> Tensor:
    parameter = weight.clone()
    estimate, _ = forward_gradient(lambda: _layer_loss(parameter, inputs, labels), [parameter],
                                   [[v] for v in directions], step)
    return estimate[0]


def _hint_forward_gradient(case: tuple, answer: object) -> str | None:
    weight, inputs, labels, directions, step = case
    if not isinstance(answer, Tensor) or answer.shape != weight.shape:
        return f"return one tensor with the weight's shape {tuple(weight.shape)}: the estimate of dL/dW"
    expected = _forward_gradient_reference(*case)
    if close(answer, expected * len(directions)) and len(directions) > 1:
        return "average over the directions (divide by their number), do not sum"
    if close(answer, expected * 2 * step):
        return "divide the difference of the two losses by 2 h: that is the slope along v"
    one_sided = sum((float(_layer_loss(weight + step * v, inputs, labels)) - float(_layer_loss(weight, inputs, labels)))
                    / step * v for v in directions) / len(directions)
    if close(answer, one_sided):
        return "use the central difference (f(W + h v) - f(W - h v)) / (2 h), as FwdLLM does, not a one-sided one"
    true = weight.clone().requires_grad_(True)
    gradient = torch.autograd.grad(_layer_loss(true, inputs, labels), true)[0]
    if close(answer, gradient):
        return "that is autograd's gradient: estimate it from the loss at W + h v and W - h v for each direction v"
    return None


# ----- Part IV, privacy: DP-FedAvg's clipping -----------------------------------------------------------------------
def _clip_cases(seed: int) -> list[tuple]:
    """A client's change (named float64 tensors) and a clip norm: above, below and far above the change's norm."""
    cases = []
    for offset, (scale, ratio) in enumerate([(1.0, 0.5), (0.1, 4.0), (10.0, 0.01)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 270 + offset))
        change = {"q.A": scale * torch.randn(3, 6, generator=gen, dtype=torch.float64),
                  "q.B": scale * torch.randn(5, 3, generator=gen, dtype=torch.float64),
                  "v.B": 3 * scale * torch.randn(5, 3, generator=gen, dtype=torch.float64)}
        cases.append((change, ratio * update_norm(change)))
    return cases


def _clip_reference(change: dict[str, Tensor], clip_norm: float) -> dict[str, Tensor]:
    return clip_update(change, clip_norm)[0]


def _hint_clip(case: tuple, answer: object) -> str | None:
    change, clip_norm = case
    if not (isinstance(answer, dict) and set(answer) == set(change)):
        return "return a dict with the same keys as the change, one clipped tensor per key"
    norm = update_norm(change)
    if all(close(answer[k], change[k] * clip_norm / norm) for k in change) and norm < clip_norm:
        return "a change already inside the ball (norm <= C) is sent as it is: scale by min(1, C / norm)"
    per_tensor = {k: v * min(1.0, clip_norm / float(v.norm())) for k, v in change.items()}
    if all(close(answer[k], per_tensor[k]) for k in change):
        return "clip the whole change as one vector (its norm over all tensors together), not each tensor alone"
    if all(close(answer[k], change[k] * min(1.0, clip_norm / norm ** 2)) for k in change):
        return "divide by the norm, not by its square: the clipped change has norm exactly C when it is clipped"
    if all(isinstance(answer[k], Tensor) for k in change) and update_norm(answer) > clip_norm * (1 + 1e-6):
        return "the clipped change's norm must be at most C"
    return None


# ----- Part IV, the cost of a federation: the Pareto front -------------------------------------------------------
def _pareto_cases(seed: int) -> list[tuple]:
    """Points (cost, value) with ties: costs and values drawn on a coarse grid, so equal coordinates occur."""
    gen = torch.Generator().manual_seed(case_seed(seed, 300))
    cases = [([1.0, 2.0, 5.0, 1.0, 1.0], [0.6, 0.5, 0.9, 0.4, 0.6])]
    for count in (6, 12):
        costs = torch.randint(1, 6, (count,), generator=gen).double()
        values = torch.randint(0, 5, (count,), generator=gen).double() / 4
        cases.append((costs.tolist(), values.tolist()))
    return cases


def _pareto_reference(costs: list[float], values: list[float]) -> Tensor:
    return torch.tensor(pareto_front(costs, values), dtype=torch.bool)


def _pareto_form(answer: object) -> object:
    """A front as a bool tensor (a list of booleans is accepted)."""
    try:
        return torch.as_tensor(answer).bool()
    except (TypeError, ValueError, RuntimeError):
        return answer


def _hint_pareto(case: tuple, answer: object) -> str | None:
    costs, values = case
    answer = _pareto_form(answer)
    if not isinstance(answer, Tensor) or answer.shape != (len(costs),):
        return f"return one boolean per point ({len(costs)} of them), True where the point is on the front"
    flipped = torch.tensor(pareto_front([-c for c in costs], values), dtype=torch.bool)
    if torch.equal(answer, flipped):
        return "lower cost is better: a point is beaten by one that costs less (or the same) and is worth more"
    strict = torch.tensor([not any(c2 < c and v2 > v for c2, v2 in zip(costs, values, strict=True))
                           for c, v in zip(costs, values, strict=True)], dtype=torch.bool)
    if torch.equal(answer, strict):
        return "a point is also beaten by one with the same cost and a higher value (or the same value, a lower cost)"
    points = list(zip(costs, values, strict=True))
    ties_out = torch.tensor([not any(j != i and c2 <= c and v2 >= v for j, (c2, v2) in enumerate(points))
                             for i, (c, v) in enumerate(points)], dtype=torch.bool)
    if torch.equal(answer, ties_out):
        return "two points equal in both coordinates are both on the front: neither beats the other"
    return None


# ----- Part IV, split learning: the bytes of a step at the cut, the learned inversion ---------------------------------
def _step_bytes_cases(seed: int) -> list[tuple]:
    """(examples, width, hidden, placement): batches of the testbed's and of other shapes, both placements."""
    return [(16, 32, 384, "blocks"), (16, 32, 384, "head"), (1, 7, 384, "blocks"), (3, 20, 64, "head"),
            (8, 24, 768, "blocks")]


def _step_bytes_form(answer: object) -> object:
    """The pair (bytes up, bytes down) as an int64 tensor, whatever number types it holds."""
    up, down = answer
    return torch.tensor([int(up), int(down)], dtype=torch.int64)


def _hint_step_bytes(case: tuple, answer: object) -> str | None:
    examples, width, hidden, placement = case
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2):
        return "return a pair (bytes up, bytes down)"
    up, down = (int(value) for value in answer)
    expected_up, expected_down = step_bytes(examples, width, hidden, placement)
    if 4 * up == expected_up and 4 * down == expected_down:
        return "count bytes, not numbers: float32 and int32 take 4 bytes each"
    if (up, down) == (expected_down, expected_up):
        return "the pair is swapped: bytes up (client to server) first"
    if placement == "blocks" and up in (expected_up - 4 * examples, expected_up - 8 * examples):
        return ("with the head on the server, each sequence's length and its label go up with the activations "
                "(one int32 each)")
    if placement == "head" and up == expected_up + 4 * examples:
        return "with the head on the client, the labels never leave it"
    if placement == "head" and up == expected_up - 4 * examples:
        return "send each sequence's length (int32) with the embeddings: the server rebuilds the mask from it"
    if placement == "head" and up == expected_up - 4 * examples * hidden:
        return "with the head on the client, the features' gradient (examples x hidden) goes up too"
    if placement == "head" and down == expected_down + 4 * examples * width * hidden:
        return "nothing before the cut trains when the client keeps only the embeddings: no gradient comes down"
    return None


def _nearest_token_cases(seed: int) -> list[tuple]:
    """Public activations with their token ids (a token may appear several times), and activations to invert."""
    cases = []
    for offset, (references, vocabulary, queries, dim) in enumerate([(40, 12, 15, 8), (25, 25, 10, 5),
                                                                      (60, 9, 30, 16)]):
        gen = torch.Generator().manual_seed(case_seed(seed, 290 + offset))
        reference = torch.randn(references, dim, generator=gen) * (torch.rand(references, 1, generator=gen) * 3 + 0.2)
        ids = torch.randint(100, 100 + vocabulary, (references,), generator=gen)
        chosen = torch.randint(0, references, (queries,), generator=gen)
        activations = (reference[chosen] * (torch.rand(queries, 1, generator=gen) * 2 + 0.5)
                       + 0.3 * torch.randn(queries, dim, generator=gen))
        cases.append((reference, ids, activations))
    return cases


def _hint_nearest_token(case: tuple, answer: object) -> str | None:
    reference, ids, activations = case
    if not isinstance(answer, Tensor) or answer.shape != (activations.shape[0],):
        return f"return one token id per activation: a tensor of {activations.shape[0]} integers"
    cosine = torch.nn.functional.normalize(activations, dim=1) @ torch.nn.functional.normalize(reference, dim=1).T
    if torch.equal(answer.long(), cosine.argmax(dim=1)):
        return "that is the position of the nearest reference: return its token id, reference_ids[position]"
    if torch.equal(answer.long(), ids[torch.cdist(activations, reference).argmin(dim=1)]):
        return "compare directions (cosine), not distances: scale differs from token to token"
    if torch.equal(answer.long(), ids[(activations @ reference.T).argmax(dim=1)]):
        return "normalise both sides before the dot product: that is the cosine"
    if torch.equal(answer.long(), ids[cosine.argmin(dim=1)]):
        return "the nearest neighbour has the largest cosine (argmax), not the smallest"
    return None


METHOD_EXERCISES: dict[str, Exercise] = {
    "fedavg_average": Exercise(
        "fedavg_average", "FedAvg (eq. 1): sum_k p_k W_k with p_k = n_k / sum_l n_l, per tensor of the state dict",
        _fedavg_reference, _fedavg_cases, _hint_fedavg, chapter="part1/federated_learning",
    ),
    "lora_merge": Exercise(
        "lora_merge", "LoRA (eq. 2) merged for inference: W + (alpha / r) B A",
        _merge_reference, _merge_cases, _hint_merge, chapter="part1/lora",
    ),
    "colr_update": Exercise(
        "colr_update", "CoLR (eq. 5 with A trained): B_t (sum_k p_k A_k), folded into W'",
        _colr_reference, _colr_cases, _hint_colr, chapter="part2/single_matrix",
    ),
    "flora_stack": Exercise(
        "flora_stack", "FLoRA (eq. 6): A = [p_1 A_1; ...; p_K A_K], B = [B_1, ..., B_K], so B A = sum_k p_k B_k A_k",
        lambda As, Bs, weights: flora_stack(As, Bs, weights), any_rank_cases, _hint_flora,
        chapter="part2/full_size", canonical=_product_form,
    ),
    "flexlora_factors": Exercise(
        "flexlora_factors", "FlexLoRA (eq. 6): the best rank-r factors of sum_k p_k B_k A_k, sqrt(S) on each side",
        _flexlora_reference, _flexlora_cases, _hint_flexlora, chapter="part2/full_size", canonical=_balanced_form,
    ),
    "lora_fair_least_squares": Exercise(
        "lora_fair_least_squares", "LoRA-FAIR's correction without its penalty: dB = R avg(A)^+, "
        "R = sum_k p_k B_k A_k - avg(B) avg(A)",
        _lora_fair_reference, same_rank_cases, _hint_lora_fair, chapter="part2/corrective",
    ),
    "svd_init": Exercise(
        "svd_init", "FeDeRA (eq. 10): A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r) from the SVD of W",
        _svd_init_reference, _svd_init_cases, _hint_svd_init, chapter="part2/server_initialization",
        canonical=_balanced_form,
    ),
    "fedloru_weight": Exercise(
        "fedloru_weight", "FedLoRU (eq. 11): W_T = W' + s sum_t B_t A_t over the accumulation rounds",
        lambda W, accumulated, scaling: fedloru_global_weight(W, accumulated, scaling), _fedloru_cases,
        _hint_fedloru, chapter="part2/client_initialization",
    ),
    "rank_vectors": Exercise(
        "rank_vectors", "FedInc (eq. 8): Z with one row z = [a_i, b_i] per rank component of every client",
        _rank_vectors_reference, any_rank_cases, _hint_rank_vectors, chapter="part2/rank_clustering",
    ),
    "gain_recovered": Exercise(
        "gain_recovered", "share of centralised LoRA's gain over the probe: (acc - probe) / (centralized - probe)",
        _gain_reference, _gain_cases, _hint_gain, chapter="part2/at_a_glance",
    ),
    "flasc_top_k": Exercise(
        "flasc_top_k", "FLASC: masks keeping the ceil(d x total) largest-magnitude entries over the whole adapter",
        _top_k_reference, _top_k_cases, _hint_top_k, chapter="part4/sparse",
    ),
    "sparse_payload_bytes": Exercise(
        "sparse_payload_bytes", "a sparse payload's bytes: 4 for the value and 4 for the index of each kept entry, "
        "or 4 per entry sent densely, whichever is fewer",
        _bytes_reference, _bytes_cases, _hint_bytes, chapter="part4/sparse", canonical=_bytes_form,
    ),
    "layerwise_average": Exercise(
        "layerwise_average", "FedRA's aggregation (eq. 4 per module): each module's A and B averaged over the clients "
        "that trained it, p_k renormalised over them; a module nobody trained unchanged",
        _layerwise_reference, _layerwise_cases, _hint_layerwise, chapter="part4/layers",
    ),
    "layer_knapsack": Exercise(
        "layer_knapsack", "Fed-piLot's choice: the layers of largest total score whose memory fits the budget "
        "(0/1 knapsack)",
        _knapsack_reference, _knapsack_cases, _hint_knapsack, chapter="part4/layers", canonical=_chosen_form,
    ),
    "top_k_payload": Exercise(
        "top_k_payload", "a top-k upload: the values and positions (in the tensors' concatenated flattening) of the "
        "ceil(d x total) entries of largest magnitude over all tensors together",
        _top_k_payload_reference, _top_k_payload_cases, _hint_top_k_payload, chapter="part4/compression",
        canonical=_payload_form,
    ),
    "forward_gradient_estimate": Exercise(
        "forward_gradient_estimate", "FwdLLM: the mean over directions v of (f(W + h v) - f(W - h v)) / (2 h) v, "
        "f the layer's cross-entropy",
        _forward_gradient_reference, _forward_gradient_cases, _hint_forward_gradient, chapter="part4/compression",
    ),
    "pareto_front": Exercise(
        "pareto_front", "the Pareto front of lower cost and higher value: True for each point that no other point "
        "beats on both (cost at most, value at least, one strictly)",
        _pareto_reference, _pareto_cases, _hint_pareto, chapter="part4/cost", canonical=_pareto_form,
    ),
    "dp_clip": Exercise(
        "dp_clip", "DP-FedAvg's clipping: the change times min(1, C / ||change||), the norm over all its tensors "
        "together",
        _clip_reference, _clip_cases, _hint_clip, chapter="part4/privacy",
    ),
    "cut_step_bytes": Exercise(
        "cut_step_bytes", "split learning: the bytes up and down of one step's messages at the cut (float32 "
        "activations, features and gradients; int32 lengths and labels)",
        lambda examples, width, hidden, placement: step_bytes(examples, width, hidden, placement), _step_bytes_cases,
        _hint_step_bytes, chapter="part4/split", canonical=_step_bytes_form,
    ),
    "nearest_token": Exercise(
        "nearest_token", "the learned inversion: each activation gets the token id of its nearest reference "
        "activation by cosine",
        lambda reference, ids, activations: nearest_token_attack(reference, ids, activations), _nearest_token_cases,
        _hint_nearest_token, chapter="part4/split",
    ),
}
"""The exercises of Parts I, II and IV on a method's core, by name (merged into ``EXERCISES``)."""
