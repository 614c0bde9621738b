"""Mixtures of LoRA experts (survey section 4.2, "Heterogeneous Structure", eq. 14): FedLEASE and FedMoE.

PerFIT (:mod:`~fedlora_edu.heterogeneity.structure`) gives each client a personal structure *inside*
one adapter. The two methods here give each client a personal structure *over several* adapters,
LoRA experts, mixed by a router. In the survey's eq. 14,

    min over theta and {A_k} of  sum_k p_k f_k(theta(A_k); D_k)   subject to  R_k(A_k) <= B_k,

theta is a set of E LoRA experts (A_e, B_e), and client k's architecture A_k is which experts it
holds and how its router mixes them. Every adapted layer computes, for an input token x,

    y = W' x + sum_e g_e(x) (alpha / r) B_e A_e x,       g(x) = the router's gates, sum_e g_e(x) = 1,

with W' frozen; the router (one per layer, a linear map of the token, no bias) sees the layer's own
input token by token (per-token routing, as in a mixture-of-experts layer). What differs is who
holds which expert and how the gates are formed:

- **FedLEASE** (Wang, Bian, Zhang, Xu, NeurIPS 2025, arXiv 2509.15087; :class:`FedLEASE`): one
  expert per cluster of clients, the clusters found once from briefly trained adapters by their B
  matrices (:func:`lease_clusters`), and every client routes over all M experts with an adaptive
  top-M router (:func:`adaptive_top_m_gates`) that uses between 1 and M of them per token;
- **FedMoE** (Mei, Cai, Zhou, Wang, Xu 2024, arXiv 2408.11304; :class:`FedMoE`): each client holds
  a sub-mixture, the experts its data activate most (:func:`select_experts`), trains and sends only
  those, and the server averages each expert over the clients that hold it
  (:func:`modular_average`).

The machinery: the E experts of a layer sit side by side in one peft LoRA layer of rank E r
(:func:`stack_experts`), and :func:`mixture_installed` turns that layer into the mixture above
for as long as a client trains or is evaluated (a forward hook scales each expert's r components by
its gate), then restores the model. Taught in ``book/part3/structure.ipynb``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors, tensor_bytes
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import (
    BOTH,
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    normalized_weights,
)
from fedlora_edu.foundations.training import BatchSampler, local_train, set_trainable, trim_batch
from fedlora_edu.heterogeneity.clustering import (
    agglomerative,
    b_cosine_distances,
    choose_num_clusters,
    cluster_averages,
    silhouette,
)

ROUTER = "lora_router"
"""The name a router takes as a submodule of its LoRA layer while a mixture is installed (with ``lora_`` in it,
so that it is not mistaken for the task head, :func:`fedlora_edu.core.adapters.head_parameters`)."""


def _positive_int(value: object, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------
# The experts of a layer as one LoRA adapter
# ----------------------------------------------------------------------------------------
def stack_experts(experts: Sequence[Factors], slots: int) -> Factors:
    """E experts (A_e r x n, B_e m x r) as one adapter of rank ``slots`` x r.

    A = [A_1; ...; A_E; 0] (stacked rows), B = [B_1 ... B_E 0] (side by side): expert e occupies
    components e r .. (e + 1) r - 1; slots beyond E are zero.
    """
    if not experts:
        raise ValueError("experts is empty: need at least one expert")
    if _positive_int(slots, "slots") < len(experts):
        raise ValueError(f"slots must be at least the {len(experts)} experts, got {slots}")
    a0, b0 = experts[0]
    for e, (a, b) in enumerate(experts):
        if a.shape != a0.shape or b.shape != b0.shape:
            raise ValueError(f"expert {e} has A {tuple(a.shape)}, B {tuple(b.shape)}; expert 0 has "
                             f"A {tuple(a0.shape)}, B {tuple(b0.shape)}")
    free = slots - len(experts)
    a = torch.cat([a for a, _ in experts] + [a0.new_zeros(free * a0.shape[0], a0.shape[1])], dim=0)
    b = torch.cat([b for _, b in experts] + [b0.new_zeros(b0.shape[0], free * b0.shape[1])], dim=1)
    return a, b


def unstack_experts(adapter: Factors, count: int, rank: int) -> list[Factors]:
    """The first ``count`` experts of rank ``rank`` of a stacked adapter (the inverse of :func:`stack_experts`)."""
    a, b = adapter
    _positive_int(count, "count")
    _positive_int(rank, "rank")
    if count * rank > a.shape[0]:
        raise ValueError(f"count x rank = {count * rank} exceeds the adapter's rank {a.shape[0]}")
    return [(a[e * rank:(e + 1) * rank].clone(), b[:, e * rank:(e + 1) * rank].clone()) for e in range(count)]


def uniform_mixture(experts: Sequence[Factors], slots: int) -> Factors:
    """The experts' mean, (1 / E) sum_e (alpha / r) B_e A_e, as one adapter of rank ``slots`` x r.

    A plain LoRA layer of that rank, at its scaling alpha / (slots r), computes
    (alpha / (slots r)) sum_e B_e A_e; with B scaled by slots / E it computes the mean above: a
    router-free model of the experts (the server's).
    """
    a, b = stack_experts(experts, slots)
    return a, b * (slots / len(experts))


# ----------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------
def expanded_slots(own: int, num_experts: int) -> list[int]:
    """FedLEASE's 2M - 1 routing slots: the expert each slot stands for.

    The first M slots all stand for the client's own (cluster's) expert, the other M - 1 for the
    other experts, one each, in increasing order.
    """
    _positive_int(num_experts, "num_experts")
    if isinstance(own, bool) or not isinstance(own, int) or not 0 <= own < num_experts:
        raise ValueError(f"own must be an expert index in 0..{num_experts - 1}, got {own!r}")
    return [own] * num_experts + [e for e in range(num_experts) if e != own]


def adaptive_top_m_gates(logits: Tensor, own: int, num_experts: int) -> Tensor:
    """FedLEASE's adaptive top-M gates: top-M over the 2M - 1 expanded slots, summed per expert.

    ``logits`` [..., 2M - 1] are the router's scores of the slots (:func:`expanded_slots`). The M
    largest are kept and softmax-normalised; an expert's gate is the sum of the weights of its
    slots that were kept. Only M - 1 slots stand for other experts, so the top M always keep one of
    the own expert's slots: a token uses its own expert and between 0 and M - 1 others, 1 to M
    experts in all, as many as the router's scores put above the own expert's remaining slots.
    Returns [..., M], each row summing to one.
    """
    width = 2 * num_experts - 1
    if logits.shape[-1] != width:
        raise ValueError(f"logits must have 2M - 1 = {width} entries in their last dimension, got {logits.shape[-1]}")
    slot_expert = torch.tensor(expanded_slots(own, num_experts), device=logits.device)
    top = logits.topk(num_experts, dim=-1)
    weights = torch.softmax(top.values, dim=-1)
    gates = logits.new_zeros(*logits.shape[:-1], num_experts)
    return gates.scatter_add(-1, slot_expert[top.indices], weights)


def sub_mixture_gates(logits: Tensor, selected: Sequence[int]) -> Tensor:
    """FedMoE's gates over a client's sub-mixture: softmax over the selected experts' logits, zero elsewhere.

    ``logits`` [..., E] score every expert of the global mixture; an expert the client does not
    hold gets gate 0 (and its logit no gradient).
    """
    count = logits.shape[-1]
    chosen = sorted({int(e) for e in selected})
    if not chosen or chosen[0] < 0 or chosen[-1] >= count:
        raise ValueError(f"selected must name at least one expert in 0..{count - 1}, got {list(selected)!r}")
    held = torch.zeros(count, dtype=torch.bool, device=logits.device)
    held[chosen] = True
    return torch.softmax(logits.masked_fill(~held, float("-inf")), dim=-1)


def mixture_output(x: Tensor, base_weight: Tensor, experts: Sequence[Factors], gates: Tensor,
                   scaling: float) -> Tensor:
    """The reference of eq. (mixture): W' x + sum_e g_e(x) s B_e A_e x, token by token (x [..., n], gates [..., E])."""
    if gates.shape[-1] != len(experts):
        raise ValueError(f"gates has {gates.shape[-1]} entries per token for {len(experts)} experts")
    out = x @ base_weight.T
    for e, (a, b) in enumerate(experts):
        out = out + gates[..., e:e + 1] * scaling * (x @ a.T @ b.T)
    return out


# ----------------------------------------------------------------------------------------
# Aggregation and selection
# ----------------------------------------------------------------------------------------
def modular_average(uploads: Sequence[Mapping[int, tuple[Tensor, ...]]], weights: Sequence[float],
                    previous: Sequence[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
    """Each expert averaged over the uploads that carry it; an expert nobody sent keeps its value.

    ``uploads[k]`` maps expert index -> that expert's tensors as client k sent them ((A, B), or
    (A, B, router row)); ``weights`` are the p_k of the uploads. Expert e becomes
    sum_{k holds e} p_k theta_ke / sum_{k holds e} p_k, tensor by tensor (A and B averaged
    separately, as FedIT does); ``previous`` holds every expert's current value.
    """
    if len(uploads) != len(weights):
        raise ValueError(f"weights has {len(weights)} entries for {len(uploads)} uploads")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)!r}")
    out = []
    for e, old in enumerate(previous):
        holders = [(w, sent[e]) for w, sent in zip(weights, uploads, strict=True) if e in sent]
        mass = sum(w for w, _ in holders)
        if not holders or mass <= 0:
            out.append(tuple(t.clone() for t in old))
            continue
        out.append(tuple(sum(w / mass * module[i].double() for w, module in holders).to(t)
                         for i, t in enumerate(old)))
    unknown = {e for sent in uploads for e in sent} - set(range(len(previous)))
    if unknown:
        raise ValueError(f"uploads carry experts {sorted(unknown)} beyond the {len(previous)} experts")
    return out


def select_experts(activation: Tensor, size: int) -> tuple[int, ...]:
    """FedMoE's sub-mixture: the ``size`` experts with the largest activation share, in increasing order.

    Ties go to the lower index. ``activation`` [E] is how much of the client's tokens each expert
    took (the mean gate over its tokens under the global router).
    """
    if activation.ndim != 1:
        raise ValueError(f"activation must be a vector (one share per expert), got shape {tuple(activation.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= activation.numel():
        raise ValueError(f"size must be an integer in 1..{activation.numel()}, got {size!r}")
    order = torch.sort(-activation.detach().double().cpu(), stable=True).indices[:size]
    return tuple(sorted(int(e) for e in order))


def recommend_experts(activation: Tensor, held: Sequence[int], margin: float = 0.0) -> tuple[int, ...]:
    """FedMoE's recommendation for a client: its held experts, with the most activated others swapped in.

    While the most activated expert the client does not hold has an activation share above
    (1 + ``margin``) times that of the least activated expert it holds, the two are swapped. With
    ``margin`` = 0 the result is the top ``len(held)`` (:func:`select_experts`, up to ties); a
    positive margin keeps the sub-mixture where the statistics barely tell experts apart.
    """
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    current = {int(e) for e in held}
    if activation.ndim != 1:
        raise ValueError(f"activation must be a vector (one share per expert), got shape {tuple(activation.shape)}")
    if not current or min(current) < 0 or max(current) >= activation.numel():
        raise ValueError(f"held must name experts in 0..{activation.numel() - 1}, got {list(held)!r}")
    share = activation.detach().double().cpu()
    while len(current) < share.numel():
        outside = max(sorted(set(range(share.numel())) - current), key=lambda e: float(share[e]))
        weakest = min(sorted(current), key=lambda e: float(share[e]))
        if not float(share[outside]) > (1 + margin) * float(share[weakest]):
            break
        current = (current - {weakest}) | {outside}
    return tuple(sorted(current))


def lease_clusters(adapters: Sequence[Mapping[str, Factors]], most: int,
                   num_clusters: int | None = None) -> tuple[list[int], Tensor, dict[int, float]]:
    """FedLEASE's grouping of the clients from their warm-up adapters: labels, distances, silhouette by count.

    d(i, j) = mean over layers of 1 - cos(B_i^l, B_j^l), B only (:func:`b_cosine_distances`);
    average-linkage agglomerative clustering (:func:`agglomerative`) into the number of clusters
    of largest mean silhouette among 2..``most`` (:func:`choose_num_clusters`), unless
    ``num_clusters`` fixes it. Fewer than three clients: one cluster each.
    """
    distances = b_cosine_distances(adapters)
    count = len(adapters)
    if count < 3:
        return list(range(count)), distances, {}
    most = min(_positive_int(most, "most", 2), count - 1)
    scores = {c: silhouette(distances, agglomerative(distances, c)) for c in range(2, most + 1)}
    chosen = choose_num_clusters(distances, most) if num_clusters is None else num_clusters
    return [int(v) for v in agglomerative(distances, chosen).tolist()], distances, scores


# ----------------------------------------------------------------------------------------
# Installing a mixture in a peft model
# ----------------------------------------------------------------------------------------
class ExpertRouter(nn.Module):
    """One layer's router: logits = W x (W: outputs x n, no bias), gates = ``rule(logits)``, padded to ``slots``."""

    def __init__(self, weight: Tensor, rule: Callable[[Tensor], Tensor], slots: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.rule = rule
        self.slots = _positive_int(slots, "slots")

    def logits(self, x: Tensor) -> Tensor:
        return x.to(self.weight.dtype) @ self.weight.T

    def gates(self, logits: Tensor) -> Tensor:
        gates = self.rule(logits)
        free = self.slots - gates.shape[-1]
        return torch.cat([gates, gates.new_zeros(*gates.shape[:-1], free)], dim=-1) if free else gates


class GateRecorder:
    """What the routers did over the tokens of the passes it saw, per layer (padding left out).

    ``usage(name)``: the mean gate of each expert; ``activation(name)``: the mean softmax of the
    router's logits over all its outputs (the experts' activation under the full router);
    ``experts_used(name)``: how many tokens used 1, 2, ... experts (index = count).
    """

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.tokens: dict[str, float] = {}
        self.gate_sum: dict[str, Tensor] = {}
        self.full_sum: dict[str, Tensor] = {}
        self.used: dict[str, Tensor] = {}

    def see_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")

    def add(self, name: str, logits: Tensor, gates: Tensor) -> None:
        with torch.no_grad():
            weight = torch.ones(logits.shape[:-1], device=logits.device)
            if self.mask is not None and tuple(self.mask.shape) == tuple(logits.shape[:-1]):
                weight = self.mask.to(weight)
            w = weight.unsqueeze(-1)
            full = torch.softmax(logits.float(), dim=-1)
            counts = (gates > 0).sum(dim=-1)
            used = torch.zeros(gates.shape[-1] + 1, dtype=torch.float64)
            used.index_add_(0, counts.flatten().cpu(), weight.flatten().double().cpu())
            self.tokens[name] = self.tokens.get(name, 0.0) + float(weight.sum())
            gate_sum = (gates.float() * w).reshape(-1, gates.shape[-1]).sum(0).cpu()
            self.gate_sum[name] = self.gate_sum.get(name, 0) + gate_sum
            self.full_sum[name] = self.full_sum.get(name, 0) + (full * w).reshape(-1, full.shape[-1]).sum(0).cpu()
            self.used[name] = self.used.get(name, 0) + used

    def usage(self, name: str) -> Tensor:
        return self.gate_sum[name] / self.tokens[name]

    def activation(self, name: str) -> Tensor:
        return self.full_sum[name] / self.tokens[name]

    def experts_used(self, name: str) -> Tensor:
        return self.used[name]


def _gate_hook(name: str, router: ExpertRouter, rank: int, recorder: GateRecorder | None,
               module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """lora_A's output, the r components of expert e scaled by g_e(x): lora_B then sums g_e B_e A_e x."""
    logits = router.logits(inputs[0])
    gates = router.gates(logits)
    if recorder is not None:
        recorder.add(name, logits, gates)
    return output * gates.repeat_interleave(rank, dim=-1).to(output.dtype)


@contextlib.contextmanager
def mixture_installed(model: nn.Module, routers: Mapping[str, ExpertRouter], expert_rank: int, *,
                      trainable: Mapping[str, Sequence[int]] | None = None,
                      recorder: GateRecorder | None = None) -> Iterator[None]:
    """Inside, every LoRA layer of ``model`` computes W' x + sum_e g_e(x) (alpha / r) B_e A_e x.

    The layer's adapter holds the experts stacked (:func:`stack_experts`, rank ``slots`` x r);
    ``routers[name]`` gives layer ``name``'s gates per token. The router becomes a submodule of its
    layer (so an optimiser built inside sees its weight), the layer's scaling becomes alpha / r,
    and with ``trainable`` only the named experts of each layer receive gradients (the others'
    are zeroed). ``recorder`` keeps the gates of every pass. All undone on exit.
    """
    expert_rank = _positive_int(expert_rank, "expert_rank")
    layers = adapter_io.lora_layers(model)
    missing = set(layers) - set(routers)
    if missing:
        raise ValueError(f"routers has no router for layers {sorted(missing)[:3]}")
    handles: list[Any] = []
    scalings: dict[str, float] = {}
    try:
        for name, layer in layers.items():
            a = layer.lora_A[adapter_io.ADAPTER].weight
            b = layer.lora_B[adapter_io.ADAPTER].weight
            router = routers[name].to(a.device)
            if router.slots * expert_rank != a.shape[0]:
                raise ValueError(f"layer {name} has rank {a.shape[0]}, not the router's {router.slots} slots x "
                                 f"expert_rank {expert_rank}")
            scalings[name] = layer.scaling[adapter_io.ADAPTER]
            layer.scaling[adapter_io.ADAPTER] = layer.lora_alpha[adapter_io.ADAPTER] / expert_rank
            layer.add_module(ROUTER, router)
            hook = functools.partial(_gate_hook, name, router, expert_rank, recorder)
            handles.append(layer.lora_A[adapter_io.ADAPTER].register_forward_hook(hook))
            if trainable is not None:
                keep = torch.zeros(router.slots, device=a.device, dtype=a.dtype)
                keep[list(trainable[name])] = 1
                keep = keep.repeat_interleave(expert_rank)
                handles.append(a.register_hook(lambda g, m=keep: g * m[:, None]))
                handles.append(b.register_hook(lambda g, m=keep: g * m[None, :]))
        if recorder is not None:
            handles.append(model.register_forward_pre_hook(recorder.see_mask, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            if name in scalings:
                layer.scaling[adapter_io.ADAPTER] = scalings[name]
            if ROUTER in layer._modules:
                delattr(layer, ROUTER)


def _expert_tensors(experts: Mapping[int, dict[str, Factors]] | Sequence[dict[str, Factors]],
                    indices: Sequence[int] | None = None) -> dict[str, Tensor]:
    """The tensors that carry experts: ``{layer}.expert{e}.A`` and ``.B``."""
    chosen = range(len(experts)) if indices is None else indices
    tensors = {}
    for e in chosen:
        for name, (a, b) in experts[e].items():
            tensors[f"{name}.expert{e}.A"], tensors[f"{name}.expert{e}.B"] = a, b
    return tensors


def _head_tensors(head: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"head.{key}": value for key, value in head.items()}


def _settings(federation: Any, steps: int | None, seed: int) -> dict[str, Any]:
    profile = federation.profile
    return {"steps": steps or profile.local_steps, "batch_size": profile.batch_size,
            "learning_rate": profile.learning_rate, "device": federation.device, "seed": seed}


# ----------------------------------------------------------------------------------------
# FedLEASE
# ----------------------------------------------------------------------------------------
class _ExpertSlots(Strategy):
    """What FedLEASE and FedMoE share: a model of expert slots of rank r each, stacked in one adapter
    (:func:`stack_experts`); ``slots_setting`` names the attribute that holds the number of slots."""

    slots_setting: ClassVar[str]

    @property
    def slots(self) -> int:
        """The model's expert slots."""
        return getattr(self, self.slots_setting)

    def max_rank(self, num_clients: int) -> int | None:
        return None if self.rank is None else self.slots * self.rank

    def expert_rank(self, server: ServerState) -> int:
        """r: each expert's rank, the model's rank over its expert slots."""
        if server.rank % self.slots:
            raise ValueError(f"the model's rank {server.rank} is not a multiple of {self.slots_setting}={self.slots}")
        return server.rank // self.slots


class FedLEASE(_ExpertSlots):
    """FedLEASE (Wang, Bian, Zhang, Xu, NeurIPS 2025, arXiv 2509.15087): experts by clusters, an adaptive top-M router.

    Survey eq. 14 with theta = M LoRA experts, one per cluster of clients, and client k's
    architecture its router over them. As the paper's abstract and summaries describe it
    (``METHOD_SOURCES.md``; no code was found):

    - **allocation** (once, before round 1, :meth:`prepare`): every client trains its own rank-r
      LoRA adapter briefly and uploads it; the server computes d(i, j) = mean over layers of
      1 - cos(B_i^l, B_j^l), on the B matrices only, clusters the clients by agglomerative
      hierarchical clustering with the number of clusters M chosen automatically
      (:func:`lease_clusters`), and makes one expert per cluster;
    - **training**: a sampled client downloads all M experts, trains its own cluster's expert and
      its router, with the other experts frozen but used, and uploads its cluster's expert; the
      server averages each expert over the round's clients of its cluster, weights p_k
      renormalised within it (:func:`modular_average`); an expert none of whose clients took part
      keeps its value;
    - **selection**: each client's router scores 2M - 1 slots per token, M standing for its own
      expert and one for each other expert, and keeps the top M (:func:`adaptive_top_m_gates`):
      a token uses its own expert and 0 to M - 1 others, as its scores decide.

    Client k's model (:meth:`personal_model`, :meth:`serving`) is the M experts mixed by its own
    router. The router never leaves the client.

    Our choices, where the paper's details are unknown:

    - the warm-up runs ``warmup_steps`` local steps (the profile's by default) from the model's
      initial A (its first r rows) and B = 0, for every client; each expert starts as its
      cluster's weighted average of the warm-up adapters (:func:`cluster_averages`);
    - linkage and the rule that picks M are :func:`lease_clusters`' (average linkage, largest
      mean silhouette among 2..``max_experts``); ``num_experts`` fixes M instead;
    - the router of every layer is a linear map of the layer's input token (no bias), per token,
      initialised with N(0, 1 / n) entries seeded by the run's seed and the client, and trained
      with the client's expert at the profile's rate; the experts run at scaling alpha / r;
    - the model holds ``max_experts`` slots of rank r (:func:`stack_experts`), the server's own
      adapter (scored on the shared test set) is the experts' mean (:func:`uniform_mixture`), and
      a client never sampled (no router yet) is served that mean;
    - bytes: the warm-up uploads (one rank-r adapter per client) are counted in the server's
      state (``warmup_bytes``), not in a round; each round a client downloads the M experts and
      the head and sends its own expert and the head, float32.
    """

    name = "FedLEASE"
    slots_setting = "max_experts"
    paper = "Wang et al. 2025, NeurIPS, arXiv 2509.15087"
    chapter = "book/part3/structure"
    batched_training = False

    @dataclass
    class State:
        """The experts (one per cluster), each client's cluster, the warm-up's distances, silhouettes and bytes."""

        experts: list[dict[str, Factors]] = field(default_factory=list)
        cluster_of: dict[int, int] = field(default_factory=dict)
        distances: Tensor | None = None
        silhouettes: dict[int, float] = field(default_factory=dict)
        warmup_bytes: int = 0

    @dataclass
    class ClientState:
        """The client's id and cluster, its routers (None before its first round) and the experts its tokens used."""

        client_id: int | None = None
        cluster: int | None = None
        num_experts: int = 0
        routers: dict[str, ExpertRouter] | None = None
        experts_used: dict[str, Tensor] = field(default_factory=dict)

    def __init__(self, rank: int | None = None, *, max_experts: int = 4, num_experts: int | None = None,
                 warmup_steps: int | None = None) -> None:
        super().__init__(rank)
        self.max_experts = _positive_int(max_experts, "max_experts", 2)
        if num_experts is not None and (isinstance(num_experts, bool) or not isinstance(num_experts, int)
                                        or not 1 <= num_experts <= max_experts):
            raise ValueError(f"num_experts must be an integer in 1..max_experts={max_experts}, got {num_experts!r}")
        self.num_experts = num_experts
        self.warmup_steps = None if warmup_steps is None else _positive_int(warmup_steps, "warmup_steps")
        self._settings: dict[str, Any] = {}

    def init_server(self, server: ServerState, seed: int) -> None:
        self.expert_rank(server)

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        """The allocation phase: every client's warm-up adapter, the clusters, one expert per cluster."""
        r = self.expert_rank(server)
        self._settings = _settings(federation, None, seed)
        steps = self.warmup_steps or federation.profile.local_steps
        start = {name: (a[:r].clone(), torch.zeros_like(b[:, :r])) for name, (a, b) in server.adapters.items()}
        layers = adapter_io.lora_layers(model)
        scalings = {name: layer.scaling[adapter_io.ADAPTER] for name, layer in layers.items()}
        warm = []
        try:
            set_trainable(model, BOTH)
            for layer in layers.values():  # a rank-r adapter at its own scaling alpha / r
                layer.scaling[adapter_io.ADAPTER] = layer.lora_alpha[adapter_io.ADAPTER] / r
            for k, data in enumerate(federation.clients):
                adapter_io.set_lora_factors(model, start)
                local_train(model, data, steps=steps, batch_size=self._settings["batch_size"],
                            learning_rate=self._settings["learning_rate"], rank=r, device=federation.device,
                            seed=derive_seed(seed, "FedLEASE warm-up", k))
                warm.append(adapter_io.get_lora_factors(model, rank=r))
        finally:
            for name, layer in layers.items():
                layer.scaling[adapter_io.ADAPTER] = scalings[name]
        labels, distances, scores = lease_clusters(warm, self.max_experts, self.num_experts)
        weights = [n / sum(federation.client_sizes) for n in federation.client_sizes]
        averages = cluster_averages(warm, weights, labels)
        state = server.method_state
        state.experts = [{n: (a.to(server.adapters[n][0]), b.to(server.adapters[n][1])) for n, (a, b) in
                          averages[c].items()} for c in sorted(averages)]
        state.cluster_of = dict(enumerate(labels))
        state.distances, state.silhouettes = distances, scores
        state.warmup_bytes = sum(tensor_bytes([t for pair in adapter.values() for t in pair]) for adapter in warm)
        server.adapters = self._server_adapters(state)
        adapter_io.set_lora_factors(model, server.adapters)

    def _server_adapters(self, state: Any) -> dict[str, Factors]:
        return {name: uniform_mixture([expert[name] for expert in state.experts], self.max_experts)
                for name in state.experts[0]}

    def _stacked(self, state: Any) -> dict[str, Factors]:
        return {name: stack_experts([expert[name] for expert in state.experts], self.max_experts)
                for name in state.experts[0]}

    def new_router(self, client_id: int, cluster: int, num_experts: int, layers: Mapping[str, Factors]
                   ) -> dict[str, ExpertRouter]:
        """A fresh router per layer for client k: 2M - 1 slots, N(0, 1 / n) weights seeded by the run and the client."""
        generator = torch.Generator().manual_seed(derive_seed(self._settings.get("seed", 0), "FedLEASE router",
                                                              client_id))
        rule = functools.partial(adaptive_top_m_gates, own=cluster, num_experts=num_experts)
        routers = {}
        for name, (a, _) in layers.items():
            n = a.shape[1]
            weight = torch.randn(2 * num_experts - 1, n, generator=generator, dtype=torch.float64) / math.sqrt(n)
            routers[name] = ExpertRouter(weight.to(a), rule, self.max_experts)
        return routers

    # ----- client side --------------------------------------------------------------
    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        """All M experts (stacked in the model's slots) and the head."""
        state = server.method_state
        client_state.client_id, client_state.cluster = client_id, state.cluster_of[client_id]
        client_state.num_experts = len(state.experts)
        tensors = _expert_tensors(state.experts)
        tensors.update(_head_tensors(server.head))
        return ClientStart(self._stacked(state), {k: v.clone() for k, v in server.head.items()}, Payload(tensors),
                           BOTH)

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Train the client's own expert and its router, the other experts used but frozen."""
        experts = client_state.num_experts
        if client_state.routers is None:
            client_state.routers = self.new_router(client_state.client_id, client_state.cluster, experts,
                                                   start.adapters)
        recorder = GateRecorder()
        rank = next(iter(start.adapters.values()))[0].shape[0] // self.max_experts
        with mixture_installed(model, client_state.routers, rank,
                               trainable={name: [client_state.cluster] for name in start.adapters}, recorder=recorder):
            yield
        client_state.experts_used = {name: recorder.experts_used(name)[:experts + 1] for name in start.adapters}

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The client's own expert (its cluster's) and the head."""
        c = client_state.cluster
        r = next(iter(result.adapters.values()))[0].shape[0] // self.max_experts
        own = {name: (a[c * r:(c + 1) * r].clone(), b[:, c * r:(c + 1) * r].clone())
               for name, (a, b) in result.adapters.items()}
        tensors = _expert_tensors({c: own}, [c])
        tensors.update(_head_tensors(result.head))
        return Payload(tensors)

    # ----- server side --------------------------------------------------------------
    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Each expert averaged over the round's clients of its cluster (p_k renormalised), the others kept."""
        state = server.method_state
        weights = normalized_weights(uploads)
        clusters = [state.cluster_of[u.client_id] for u in uploads]
        for name in state.experts[0]:
            per_upload = [{c: (u.payload.tensors[f"{name}.expert{c}.A"], u.payload.tensors[f"{name}.expert{c}.B"])}
                          for u, c in zip(uploads, clusters, strict=True)]
            merged = modular_average(per_upload, weights, [expert[name] for expert in state.experts])
            for expert, value in zip(state.experts, merged, strict=True):
                expert[name] = value
        server.adapters = self._server_adapters(state)
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """All M experts stacked (mixed by the client's router in :meth:`serving`); None before its first round."""
        if client_state is None or client_state.routers is None:
            return None
        return self._stacked(server.method_state), {k: v.clone() for k, v in server.head.items()}

    def serving(self, model: nn.Module, server: ServerState, client_id: int,
                client_state: Any) -> contextlib.AbstractContextManager[None]:
        """The client's router over the experts (nothing for a client never sampled: it is served the mean)."""
        if client_state is None or client_state.routers is None:
            return contextlib.nullcontext()
        return mixture_installed(model, client_state.routers, self.expert_rank(server))


# ----------------------------------------------------------------------------------------
# FedMoE
# ----------------------------------------------------------------------------------------
class FedMoE(_ExpertSlots):
    """FedMoE (Mei, Cai, Zhou, Wang, Xu 2024, arXiv 2408.11304): a sub-mixture of LoRA experts per client.

    Survey eq. 14 with theta a global mixture of E experts and client k's architecture its
    sub-mixture, the ``experts_per_client`` experts of each layer that it holds. As the paper's
    abstract and summary describe it (``METHOD_SOURCES.md``; no code was found; the paper mixes
    the feed-forward experts of a pre-trained MoE model, here the experts are LoRA adapters):

    - **stage 1** (once, :meth:`prepare`): every client observes the experts' activation on its
      data under the global router and takes the most activated ones, per layer, as its
      sub-mixture (:func:`select_experts`, a greedy search over the activation pattern);
    - **stage 2**: a sampled client downloads its experts and the router, trains only its experts
      and their router rows, its router restricted to them (:func:`sub_mixture_gates`), and sends
      them back with its activation statistics; the server averages each expert, and its router
      row, over the round's clients that hold it (*modular aggregation*, :func:`modular_average`);
      an expert nobody held keeps its value;
    - **global expert recommendation**: after aggregation the server recommends each client of
      the round the experts the *global* router, trained by all their holders, activates most on
      that client's tokens (the statistics it sent), and the client's sub-mixture becomes those.

    Client k's model (:meth:`personal_model`, :meth:`serving`) is its sub-mixture under the
    global router restricted to it.

    Our choices, where the paper's details are unknown:

    - the router of a layer is global, one row per expert (no bias), a linear map of the layer's
      input token; a row is part of its expert's module (sent and averaged with it); initialised
      N(0, 1 / n), seeded by the run; the gates are a softmax over the held experts (dense
      within the sub-mixture); experts run at scaling alpha / r;
    - the activation statistics are the mean, over the client's real tokens (padding left out),
      of the softmax of the full router's logits over all E experts: in stage 1 over
      ``probe_batches`` batches with the initial router and experts (B = 0, so only the router
      and the data decide), later over the batches the client trained on;
    - the recommendation (:func:`recommend_experts`), every ``recommend_every`` rounds, swaps a
      held expert for one the client does not hold when the latter's share exceeds the former's
      by more than ``margin`` (relative; 10% by default, so that statistics that barely tell the
      experts apart do not make the sub-mixture change every round); a recommended expert comes
      with the server's value;
    - bytes: in stage 1 a client sends E activation shares per layer (``search_bytes``); each round
      it downloads its experts, the whole router (E x n per layer: it scores every expert for the
      statistics) and the head, and sends its experts, their router rows, its statistics and the
      head, float32. The server's own adapter (scored on the shared test set) is the mean of all E
      experts (:func:`uniform_mixture`).
    """

    name = "FedMoE"
    slots_setting = "num_experts"
    paper = "Mei et al. 2024, arXiv 2408.11304"
    chapter = "book/part3/structure"
    batched_training = False

    @dataclass
    class State:
        """The experts, the global router (E x n per layer), each client's sub-mixture and statistics, and changes."""

        experts: list[dict[str, Factors]] = field(default_factory=list)
        router: dict[str, Tensor] = field(default_factory=dict)
        selected: dict[int, dict[str, tuple[int, ...]]] = field(default_factory=dict)
        activation: dict[int, dict[str, Tensor]] = field(default_factory=dict)
        recommendations: list[tuple[int, int, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
        search_bytes: int = 0

    @dataclass
    class ClientState:
        """The client's id, the sub-mixture it trained this round, its trained router rows and statistics."""

        client_id: int | None = None
        selected: dict[str, tuple[int, ...]] | None = None
        router: dict[str, Tensor] | None = None
        activation: dict[str, Tensor] | None = None

    def __init__(self, rank: int | None = None, *, num_experts: int = 4, experts_per_client: int = 2,
                 probe_batches: int = 2, recommend_every: int = 1, margin: float = 0.1) -> None:
        super().__init__(rank)
        self.num_experts = _positive_int(num_experts, "num_experts")
        if isinstance(experts_per_client, bool) or not isinstance(experts_per_client, int) \
                or not 1 <= experts_per_client <= num_experts:
            raise ValueError(f"experts_per_client must be an integer in 1..num_experts={num_experts}, "
                             f"got {experts_per_client!r}")
        self.experts_per_client = experts_per_client
        self.probe_batches = _positive_int(probe_batches, "probe_batches")
        self.recommend_every = _positive_int(recommend_every, "recommend_every")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        self.margin = float(margin)
        self._settings: dict[str, Any] = {}

    def init_server(self, server: ServerState, seed: int) -> None:
        """The E experts from the model's initial adapter (A random, B = 0) and a random global router."""
        r = self.expert_rank(server)
        state = server.method_state
        split = {name: unstack_experts(adapter, self.num_experts, r) for name, adapter in server.adapters.items()}
        state.experts = [{name: split[name][e] for name in split} for e in range(self.num_experts)]
        generator = torch.Generator().manual_seed(derive_seed(seed, "FedMoE router"))
        for name, (a, _) in server.adapters.items():
            n = a.shape[1]
            state.router[name] = (torch.randn(self.num_experts, n, generator=generator, dtype=torch.float64)
                                  / math.sqrt(n)).to(a)

    def routers(self, router: Mapping[str, Tensor], selected: Mapping[str, Sequence[int]]) -> dict[str, ExpertRouter]:
        """One :class:`ExpertRouter` per layer: the global rows, gates restricted to ``selected[layer]``."""
        return {name: ExpertRouter(weight, functools.partial(sub_mixture_gates, selected=tuple(selected[name])),
                                   self.num_experts) for name, weight in router.items()}

    def _sub_adapters(self, state: Any, selected: Mapping[str, Sequence[int]]) -> dict[str, Factors]:
        """The experts stacked, those not in the sub-mixture zero (the client does not have them)."""
        out = {}
        for name in state.router:
            experts = [state.experts[e][name] if e in selected[name] else
                       tuple(torch.zeros_like(t) for t in state.experts[e][name]) for e in range(self.num_experts)]
            out[name] = stack_experts(experts, self.num_experts)
        return out

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        """Stage 1: each client's activation pattern under the initial mixture, and its sub-mixture."""
        self._settings = _settings(federation, None, seed)
        state = server.method_state
        everything = {name: tuple(range(self.num_experts)) for name in state.router}
        adapter_io.set_lora_factors(model, self._sub_adapters(state, everything))
        for k, data in enumerate(federation.clients):
            recorder = GateRecorder()
            sampler = BatchSampler(len(data), self._settings["batch_size"], derive_seed(seed, "FedMoE search", k))
            model.eval()
            with torch.no_grad(), mixture_installed(model, self.routers(state.router, everything),
                                                    self.expert_rank(server), recorder=recorder):
                for _ in range(self.probe_batches):
                    batch = trim_batch(data.subset(sampler.next()), federation.device)
                    batch.pop("labels", None)
                    model(**batch)
            state.activation[k] = {name: recorder.activation(name) for name in state.router}
            state.selected[k] = {name: select_experts(share, self.experts_per_client)
                                 for name, share in state.activation[k].items()}
            state.search_bytes += tensor_bytes(list(state.activation[k].values()))
        server.adapters = self._server_adapters(state)

    def _server_adapters(self, state: Any) -> dict[str, Factors]:
        return {name: uniform_mixture([expert[name] for expert in state.experts], self.num_experts)
                for name in state.router}

    # ----- client side --------------------------------------------------------------
    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        """The client's experts (the rest zero), the whole router and the head."""
        state = server.method_state
        selected = {name: tuple(s) for name, s in state.selected[client_id].items()}
        client_state.client_id, client_state.selected = client_id, selected
        client_state.router = {name: weight.clone() for name, weight in state.router.items()}
        tensors = {}
        for name, held in selected.items():
            for e in held:
                tensors[f"{name}.expert{e}.A"], tensors[f"{name}.expert{e}.B"] = state.experts[e][name]
            tensors[f"{name}.router"] = state.router[name]
        tensors.update(_head_tensors(server.head))
        return ClientStart(self._sub_adapters(state, selected), {k: v.clone() for k, v in server.head.items()},
                           Payload(tensors), BOTH)

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Train the sub-mixture's experts and router rows only; record the activation statistics."""
        routers = self.routers(client_state.router, client_state.selected)
        recorder = GateRecorder()
        rank = next(iter(start.adapters.values()))[0].shape[0] // self.num_experts
        with mixture_installed(model, routers, rank, trainable=client_state.selected, recorder=recorder):
            yield
        client_state.router = {name: router.weight.detach().clone() for name, router in routers.items()}
        client_state.activation = {name: recorder.activation(name) for name in routers}

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The held experts, their router rows, the activation statistics and the head."""
        r = next(iter(result.adapters.values()))[0].shape[0] // self.num_experts
        tensors = {}
        for name, (a, b) in result.adapters.items():
            for e in client_state.selected[name]:
                tensors[f"{name}.expert{e}.A"] = a[e * r:(e + 1) * r].clone()
                tensors[f"{name}.expert{e}.B"] = b[:, e * r:(e + 1) * r].clone()
                tensors[f"{name}.router{e}"] = client_state.router[name][e].clone()
            tensors[f"{name}.activation"] = client_state.activation[name].to(a)
        tensors.update(_head_tensors(result.head))
        return Payload(tensors)

    # ----- server side --------------------------------------------------------------
    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Modular aggregation of experts and router rows over their holders, then the recommendations."""
        state = server.method_state
        weights = normalized_weights(uploads)
        for name, router in state.router.items():
            held = [{e: tuple(u.payload.tensors[f"{name}.{part}"] for part in (f"expert{e}.A", f"expert{e}.B",
                                                                                f"router{e}"))
                     for e in range(self.num_experts) if f"{name}.expert{e}.A" in u.payload.tensors} for u in uploads]
            merged = modular_average(held, weights, [(*expert[name], router[e]) for e, expert in
                                                     enumerate(state.experts)])
            for expert, (a, b, _) in zip(state.experts, merged, strict=True):
                expert[name] = (a, b)
            state.router[name] = torch.stack([row for _, _, row in merged])
        recommend = (round_index + 1) % self.recommend_every == 0
        for u in uploads:
            activation = {name: u.payload.tensors[f"{name}.activation"] for name in state.router}
            state.activation[u.client_id] = activation
            if not recommend:
                continue
            for name, share in activation.items():
                old = state.selected[u.client_id][name]
                new = recommend_experts(share, old, self.margin)
                if new != old:
                    state.recommendations.append((round_index, u.client_id, name, old, new))
                    state.selected[u.client_id][name] = new
        server.adapters = self._server_adapters(state)
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """The client's sub-mixture (its experts stacked, the rest zero; mixed in :meth:`serving`)."""
        selected = server.method_state.selected.get(client_id)
        if selected is None:
            return None
        return self._sub_adapters(server.method_state, selected), {k: v.clone() for k, v in server.head.items()}

    def serving(self, model: nn.Module, server: ServerState, client_id: int,
                client_state: Any) -> contextlib.AbstractContextManager[None]:
        """The global router restricted to the client's sub-mixture."""
        state = server.method_state
        selected = state.selected.get(client_id)
        if selected is None:
            return contextlib.nullcontext()
        return mixture_installed(model, self.routers(state.router, selected), self.expert_rank(server))
