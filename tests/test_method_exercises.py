"""Method-core exercises of Parts I, II and IV: right answers of every form pass, each usual mistake gets its hint."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedlora_edu.teaching.exercises import EXERCISES, ExerciseFailed, check
from fedlora_edu.teaching.method_exercises import METHOD_EXERCISES


def _fails(name, function, hint_fragment):
    with pytest.raises(ExerciseFailed, match=hint_fragment):
        check(name, function)


def _ideal(As, Bs, w):
    return sum(p * (B @ A) for p, A, B in zip(w, As, Bs, strict=True))


def _avg(tensors, w):
    return sum(p * t for p, t in zip(w, tensors, strict=True))


def _balanced(delta, rank, *, flip=False):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = S[:rank].sqrt()
    sign = -1.0 if flip else 1.0
    return sign * root[:, None] * Vh[:rank], sign * U[:, :rank] * root[None, :]


def test_every_method_exercise_names_its_chapter_and_is_registered():
    for name, exercise in METHOD_EXERCISES.items():
        assert EXERCISES[name] is exercise and exercise.kind == "method"
        assert exercise.chapter.split("/")[0] in {"part1", "part2", "part4"}, name


def test_right_answers_of_other_forms_pass():
    # FLoRA with the weights on B instead of A; SVD factors with every sign flipped
    assert "passed" in check("flora_stack", lambda As, Bs, w: (
        torch.cat(list(As)), torch.cat([p * B for p, B in zip(w, Bs, strict=True)], dim=1)))
    assert "passed" in check("flexlora_factors", lambda As, Bs, w, r: _balanced(_ideal(As, Bs, w), r, flip=True))
    assert "passed" in check("svd_init", lambda W, r: _balanced(W, r, flip=True))
    assert "passed" in check("sparse_payload_bytes", lambda tensors, masks: float(min(
        8 * sum(int(m.sum()) for m in masks.values()), 4 * sum(t.numel() for t in tensors.values()))))


def test_fedavg_mistakes():
    _fails("fedavg_average", lambda states, sizes: {k: sum(s[k] for s in states) / len(states) for k in states[0]},
           "plain mean")
    _fails("fedavg_average", lambda states, sizes: {
        k: sum(n * s[k] for n, s in zip(sizes, states, strict=True)) for k in states[0]}, "divide by n")
    _fails("fedavg_average", lambda states, sizes: [states[0]], "return a dict")


def test_lora_merge_mistakes():
    _fails("lora_merge", lambda W, A, B, alpha: W + B @ A, "scaling alpha / r is missing")
    _fails("lora_merge", lambda W, A, B, alpha: W + alpha * (B @ A), "not alpha")
    _fails("lora_merge", lambda W, A, B, alpha: (alpha / A.shape[0]) * (B @ A), "frozen W is missing")


def test_colr_mistakes():
    _fails("colr_update", lambda B_t, As, w: _avg(As, w), "averaged A")
    _fails("colr_update", lambda B_t, As, w: (B_t @ _avg(As, w)).T, "transposed")
    _fails("colr_update", lambda B_t, As, w: B_t @ (sum(As) / len(As)), "plain mean")


def test_flora_mistakes():
    _fails("flora_stack", lambda As, Bs, w: (torch.cat(list(As)), torch.cat(list(Bs), dim=1)),
           "weights p_k are missing")
    _fails("flora_stack", lambda As, Bs, w: (torch.cat([p * A for p, A in zip(w, As, strict=True)]),
                                             torch.cat([p * B for p, B in zip(w, Bs, strict=True)], dim=1)), "twice")
    _fails("flora_stack", lambda As, Bs, w: (torch.cat(list(Bs), dim=1), torch.cat(list(As))), "wrong order")


def test_flexlora_mistakes():
    def all_in_b(As, Bs, w, r):
        U, S, Vh = torch.linalg.svd(_ideal(As, Bs, w), full_matrices=False)
        return Vh[:r], U[:, :r] * S[:r]

    def fedit(As, Bs, w, r):
        return _balanced(_avg(Bs, w) @ _avg(As, w), r)

    _fails("flexlora_factors", all_in_b, "all of S sits in B")
    _fails("flexlora_factors", fedit, "FedIT's product")
    _fails("flexlora_factors", lambda As, Bs, w, r: _balanced(_ideal(As, Bs, [1 / len(As)] * len(As)), r),
           "plain mean")
    _fails("flexlora_factors", lambda As, Bs, w, r: _balanced(_ideal(As, Bs, w), r + 1), "A is")


def test_lora_fair_mistakes():
    def residual(As, Bs, w):
        return _ideal(As, Bs, w) - _avg(Bs, w) @ _avg(As, w)

    _fails("lora_fair_least_squares", lambda As, Bs, w: residual(As, Bs, w) @ _avg(As, w).T, "pseudo-inverse")
    _fails("lora_fair_least_squares", lambda As, Bs, w: -residual(As, Bs, w) @ torch.linalg.pinv(_avg(As, w)),
           "sign is flipped")
    _fails("lora_fair_least_squares", lambda As, Bs, w: residual(As, Bs, w), "m x r")


def test_svd_init_mistakes():
    def smallest(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = S[-r:].sqrt()
        return root[:, None] * Vh[-r:], U[:, -r:] * root[None, :]

    def all_in_b(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Vh[:r], U[:, :r] * S[:r]

    _fails("svd_init", smallest, "smallest singular values")
    _fails("svd_init", all_in_b, "not split evenly")
    _fails("svd_init", lambda W, r: _balanced(W, r)[::-1], "wrong order")


def test_fedloru_mistakes():
    _fails("fedloru_weight", lambda W, acc, s: W + sum(b @ a for a, b in acc), "scaling")
    _fails("fedloru_weight", lambda W, acc, s: W + s * (acc[-1][1] @ acc[-1][0]), "only the last adapter")
    _fails("fedloru_weight", lambda W, acc, s: s * sum(b @ a for a, b in acc), "pre-trained W' is missing")


def test_rank_vector_mistakes():
    _fails("rank_vectors", lambda As, Bs, w: torch.cat([torch.cat([b.T, a], 1) for a, b in zip(As, Bs, strict=True)]),
           r"\[b_i, a_i\]")
    _fails("rank_vectors", lambda As, Bs, w: torch.cat([torch.cat([a, b.T], 1) for a, b in zip(As, Bs, strict=True)]).T,
           "transposed")


def test_gain_mistakes():
    _fails("gain_recovered", lambda acc, probe, c: acc / c, "subtract it")
    _fails("gain_recovered", lambda acc, probe, c: (acc - probe) / c, "centralized - probe")
    _fails("gain_recovered", lambda acc, probe, c: (acc - probe).clamp_min(0) / (c - probe), "do not clip")


def test_top_k_mistakes():
    def per_tensor(tensors, d):
        out = {}
        for name, t in tensors.items():
            k = int(torch.tensor(d * t.numel()).ceil())
            out[name] = t.abs() >= torch.topk(t.abs().reshape(-1), k).values.min()
        return out

    def signed(tensors, d):
        flat = torch.cat([t.reshape(-1) for t in tensors.values()])
        k = int(torch.tensor(d * flat.numel()).ceil())
        threshold = torch.topk(flat, k).values.min()
        return {name: t >= threshold for name, t in tensors.items()}

    def floor_k(tensors, d):
        flat = torch.cat([t.reshape(-1).abs() for t in tensors.values()])
        threshold = torch.topk(flat, max(1, int(d * flat.numel()) - 1)).values.min()
        return {name: t.abs() >= threshold for name, t in tensors.items()}

    _fails("flasc_top_k", per_tensor, "per tensor")
    _fails("flasc_top_k", signed, "magnitude")
    _fails("flasc_top_k", floor_k, "exactly k")


def test_payload_byte_mistakes():
    _fails("sparse_payload_bytes", lambda tensors, masks: 4 * sum(int(m.sum()) for m in masks.values()), "index")
    _fails("sparse_payload_bytes", lambda tensors, masks: 8 * sum(int(m.sum()) for m in masks.values()), "densely")
    _fails("sparse_payload_bytes", lambda tensors, masks: "many", "as an int")


def _layerwise(current, uploads, weights, *, renormalise=True, keep_unheld=True):
    out = {}
    for name, (a, b) in current.items():
        held = [(w, upload[name]) for w, upload in zip(weights, uploads, strict=True) if name in upload]
        if not held:
            out[name] = (a, b) if keep_unheld else (torch.zeros_like(a), torch.zeros_like(b))
            continue
        total = sum(w for w, _ in held) if renormalise else 1.0
        out[name] = (sum(w / total * fa for w, (fa, _) in held), sum(w / total * fb for w, (_, fb) in held))
    return out


def test_layerwise_average_mistakes():
    assert "passed" in check("layerwise_average", _layerwise)
    _fails("layerwise_average", lambda c, u, w: _layerwise(c, u, w, renormalise=False), "renormalise")
    _fails("layerwise_average", lambda c, u, w: _layerwise(c, u, w, keep_unheld=False), "keeps its value")


def test_layer_knapsack_mistakes():
    def brute(values, costs, capacity):
        best = max((subset for size in range(len(values) + 1) for subset in itertools.combinations(range(len(values)),
                                                                                                     size)
                    if sum(costs[i] for i in subset) <= capacity), key=lambda subset: sum(values[i] for i in subset))
        return tuple(reversed(best))  # any order, a tuple

    def greedy(values, costs, capacity):
        chosen, spent = [], 0
        for i in sorted(range(len(values)), key=lambda i: values[i] / costs[i], reverse=True):
            if spent + costs[i] <= capacity:
                chosen.append(i)
                spent += costs[i]
        return chosen

    assert "passed" in check("layer_knapsack", brute)
    _fails("layer_knapsack", greedy, "greedy")
    _fails("layer_knapsack", lambda values, costs, capacity: list(range(len(values))), "more than the budget")


def test_the_toy_federation_starts_where_lora_does_and_its_discordance_grows():
    from fedlora_edu.core.factors import discordance
    from fedlora_edu.teaching.experiments import _growth_reference, toy_local_training

    assert discordance(*toy_local_training(0, 1, start_b="zero")) < 1e-12  # with B0 = 0, A does not move in step 1
    for seed in range(3):
        curve = _growth_reference(seed, [1, 4, 16])
        assert bool((curve[1:] > curve[:-1]).all()), curve
    with pytest.raises(ValueError, match="steps"):
        toy_local_training(0, -1)


def _top_k(tensors, density, *, by_magnitude=True, per_tensor=False):
    if per_tensor:
        values, indices, start = [], [], 0
        for t in tensors.values():
            k = int(torch.ceil(torch.tensor(density * t.numel())).item())
            chosen = torch.topk(t.reshape(-1).abs(), k).indices
            values.append(t.reshape(-1)[chosen])
            indices.append(chosen + start)
            start += t.numel()
        return torch.cat(values), torch.cat(indices).to(torch.int32)
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    k = int(torch.ceil(torch.tensor(density * flat.numel())).item())
    chosen = torch.topk(flat.abs() if by_magnitude else flat, k).indices
    return flat[chosen], chosen


def test_top_k_payload_mistakes():
    assert "passed" in check("top_k_payload", _top_k)  # int64 positions, in any order, pass
    _fails("top_k_payload", lambda t, d: _top_k(t, d, by_magnitude=False), "magnitude")
    _fails("top_k_payload", lambda t, d: _top_k(t, d, per_tensor=True), "all tensors together")
    _fails("top_k_payload", lambda t, d: (_top_k(t, d)[0].abs(), _top_k(t, d)[1]), "sign")


def _forward_estimate(weight, inputs, labels, directions, step, *, central=True, mean=True):
    def loss(w):
        return float(torch.nn.functional.cross_entropy(inputs @ w.T, labels))

    total = torch.zeros_like(weight)
    for v in directions:
        if central:
            total += (loss(weight + step * v) - loss(weight - step * v)) / (2 * step) * v
        else:
            total += (loss(weight + step * v) - loss(weight)) / step * v
    return total / len(directions) if mean else total


def test_forward_gradient_mistakes():
    assert "passed" in check("forward_gradient_estimate", _forward_estimate)
    _fails("forward_gradient_estimate", lambda *case: _forward_estimate(*case, mean=False), "average")
    _fails("forward_gradient_estimate", lambda *case: _forward_estimate(*case, central=False), "central")

    def autograd(weight, inputs, labels, directions, step):
        w = weight.clone().requires_grad_(True)
        return torch.autograd.grad(torch.nn.functional.cross_entropy(inputs @ w.T, labels), w)[0]

    _fails("forward_gradient_estimate", autograd, "autograd")


def test_quantization_error_experiment_and_its_mistakes():
    from fedlora_edu.teaching.experiments import _quantization_error_reference

    measured = _quantization_error_reference(0, [1, 2, 4, 8])
    errors, sizes = measured
    assert all(a > b for a, b in itertools.pairwise(errors.tolist()))  # each bit more, less error
    assert float(errors[2] / errors[3]) > 8  # about 2 ** 4 from 4 to 8 bits
    steps = (sizes[1:] - sizes[:-1]) / torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert float(steps.max() - steps.min()) <= 2  # bytes grow linearly with the bits (up to the packing's rounding)
    assert "passed" in check("quantization_error", lambda seed, bits: _quantization_error_reference(seed, bits))
    _fails("quantization_error", lambda seed, bits: _quantization_error_reference(seed, bits).flip(0), "swapped")

    def without_grid(seed, bits):
        answer = _quantization_error_reference(seed, bits).clone()
        answer[1] -= 16  # two factors, 8 bytes of grid each
        return answer

    _fails("quantization_error", without_grid, "grid")
    assert "passed" in check("quantization_error_explained", lambda: "a")


def test_dp_clip_mistakes():
    from fedlora_edu.efficiency.privacy import clip_update, update_norm

    assert "passed" in check("dp_clip", lambda change, clip: clip_update(change, clip)[0])

    def always_to_c(change, clip):
        norm = update_norm(change)
        return {key: value * clip / norm for key, value in change.items()}

    def per_tensor(change, clip):
        return {key: value * min(1.0, clip / float(value.norm())) for key, value in change.items()}

    def by_square(change, clip):
        return {key: value * min(1.0, clip / update_norm(change) ** 2) for key, value in change.items()}

    _fails("dp_clip", always_to_c, "inside the ball")
    _fails("dp_clip", per_tensor, "one vector")
    _fails("dp_clip", by_square, "not by its square")
    _fails("dp_clip", lambda change, clip: list(change.values()), "same keys")


def test_noise_in_product_experiment_and_its_mistakes():
    from fedlora_edu.efficiency.privacy import expected_product_error
    from fedlora_edu.teaching.experiments import _noise_in_product_reference, toy_noisy_factors

    scales = [1e-3, 1e-2, 1e-1, 1.0]
    both, b_only = _noise_in_product_reference(0, scales)
    assert all(x > y for x, y in zip(both.tolist(), b_only.tolist(), strict=True))  # both factors: always worse
    ratios = (b_only[1:] / b_only[:-1]).tolist()
    assert all(abs(ratio - 10) < 1e-9 for ratio in ratios)  # B only: exactly linear in the scale
    assert float(both[-1] / both[-2]) > 15  # both: the noise product takes over (100 for it alone)
    factors = toy_noisy_factors(0)
    size = float(torch.linalg.matrix_norm(factors["B"] @ factors["A"]))
    for row, noise_on in ((both, "AB"), (b_only, "B")):  # one draw, near the closed form's root mean square
        expected = torch.tensor([expected_product_error(factors["A"], factors["B"], s, noise_on) / size
                                 for s in scales], dtype=torch.float64)
        assert float((row / expected - 1).abs().max()) < 0.3
    assert "passed" in check("noise_in_product", lambda seed, s: _noise_in_product_reference(seed, s))
    _fails("noise_in_product", lambda seed, s: _noise_in_product_reference(seed, s).flip(0), "swapped")
    _fails("noise_in_product", lambda seed, s: _noise_in_product_reference(seed, s) ** 2, "not its square")
    assert "passed" in check("noise_in_product_explained", lambda: "a")
    _fails("noise_in_product_explained", lambda: "d", "add in square")


def test_cut_step_bytes_mistakes():
    from fedlora_edu.efficiency.split import step_bytes

    assert "passed" in check("cut_step_bytes", lambda *case: list(step_bytes(*case)))  # a list passes too
    _fails("cut_step_bytes", lambda *case: tuple(v // 4 for v in step_bytes(*case)), "bytes, not numbers")
    _fails("cut_step_bytes", lambda *case: step_bytes(*case)[::-1], "swapped")

    def without_labels(examples, width, hidden, placement):
        up, down = step_bytes(examples, width, hidden, placement)
        return (up - 4 * examples if placement == "blocks" else up, down)

    _fails("cut_step_bytes", without_labels, "label")

    def labels_up_with_the_head(examples, width, hidden, placement):
        up, down = step_bytes(examples, width, hidden, placement)
        return (up + 4 * examples if placement == "head" else up, down)

    _fails("cut_step_bytes", labels_up_with_the_head, "never leave")

    def gradient_down_with_the_head(examples, width, hidden, placement):
        up, down = step_bytes(examples, width, hidden, placement)
        return (up, down + 4 * examples * width * hidden if placement == "head" else down)

    _fails("cut_step_bytes", gradient_down_with_the_head, "no gradient comes down")


def test_nearest_token_mistakes():
    import torch.nn.functional as F

    from fedlora_edu.efficiency.split import nearest_token_attack

    assert "passed" in check("nearest_token", nearest_token_attack)
    _fails("nearest_token", lambda r, ids, a: (F.normalize(a, dim=1) @ F.normalize(r, dim=1).T).argmax(dim=1),
           "token id")
    _fails("nearest_token", lambda r, ids, a: ids[torch.cdist(a, r).argmin(dim=1)], "cosine")
    _fails("nearest_token", lambda r, ids, a: ids[(a @ r.T).argmax(dim=1)], "normalise")


def test_update_leakage_experiment_and_its_mistakes():
    from fedlora_edu.efficiency.split import named_share, update_attack
    from fedlora_edu.teaching.experiments import _update_leakage_reference, toy_update

    measured = _update_leakage_reference(0, [1, 4, 8, 16, 64])
    assert measured[:3].tolist() == [1.0, 1.0, 1.0] and measured[3] < 1.0 and measured[4] < measured[3]
    assert "passed" in check("update_leakage", _update_leakage_reference)

    def named_eight(seed, counts):
        shares = []
        for count in counts:
            toy = toy_update(seed, count)
            shares.append(named_share(update_attack(toy["dictionary"], toy["rows"], 8), toy["ids"]))
        return torch.tensor(shares, dtype=torch.float64)

    _fails("update_leakage", named_eight, "as many tokens as the update mixes")
    _fails("update_leakage", lambda seed, counts: 100 * _update_leakage_reference(seed, counts), "between 0 and 1")
    assert "passed" in check("update_leakage_explained", lambda: "a")
    _fails("update_leakage_explained", lambda: "b", "names as many")
