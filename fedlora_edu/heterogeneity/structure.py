"""Personalized LoRA by structure (survey section 4.2, "Heterogeneous Structure", eq. 14): PerFIT.

Where FedSA-LoRA, FedDPA and CE-LoRA (:mod:`~fedlora_edu.heterogeneity.personalized`) give each
client personal *values*, PerFIT gives each client a personal *architecture*: which entries of a
shared LoRA adapter it trains and uses. Eq. 14 of the survey,

    min over theta and {A_k} of  sum_k p_k f_k(theta(A_k); D_k)   subject to  R_k(A_k) <= B_k,

has one shared adapter theta = (A, B); client k's architecture A_k (here a binary mask over the
entries of A and B) picks the part of it client k's model uses, theta(A_k) = A_k * theta, and
R_k counts what that part costs (here: trainable numbers), kept within the client's budget B_k.
Taught, and measured client by client, in ``book/part3/structure.ipynb``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors, tensor_bytes
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    normalized_weights,
)
from fedlora_edu.foundations.training import BatchSampler, local_train, trim_batch

Masks = dict[str, tuple[Tensor, Tensor]]
"""A binary mask per LoRA layer, shaped as its (A, B): 1 where the entry is part of the client's structure."""


def taylor_importance(value: Tensor, gradient: Tensor) -> Tensor:
    """First-order Taylor importance of each entry, |theta_e * dL/dtheta_e|.

    The loss changes by about -theta_e * dL/dtheta_e when entry e is set to zero (a first-order
    Taylor expansion of L around theta), so the size of that product estimates what pruning the
    entry costs. PerFIT scores LoRA entries this way (``METHOD_SOURCES.md``).
    """
    if value.shape != gradient.shape:
        raise ValueError(f"value {tuple(value.shape)} and gradient {tuple(gradient.shape)} must have the same shape")
    return (value * gradient).abs()


def prune_to_budget(importance: Mapping[str, Tensor], mask: Mapping[str, Tensor], keep: int) -> dict[str, Tensor]:
    """The mask that keeps the ``keep`` most important entries among those ``mask`` still keeps.

    ``importance`` and ``mask`` hold one tensor per key (every factor of every layer), compared
    together: the layers compete for the budget, as in a search over the whole adapter. Pruning
    only removes: an entry the mask has already dropped never comes back. Ties are broken by
    position (the first in the keys' order and in row-major order wins), so the result is
    deterministic.
    """
    if set(importance) != set(mask):
        raise ValueError("importance and mask must have the same keys")
    keys = list(mask)
    kept_now = int(sum(int(mask[key].sum()) for key in keys))
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= kept_now:
        raise ValueError(f"keep must be an integer between 0 and the {kept_now} entries kept now, got {keep!r}")
    for key in keys:
        if importance[key].shape != mask[key].shape:
            raise ValueError(f"importance and mask of {key!r} differ in shape")
    scores = torch.cat([torch.where(mask[key].bool(), importance[key].double(), torch.tensor(-1.0, dtype=torch.float64))
                        .flatten() for key in keys])
    # Stable descending sort: among equal scores the earlier position comes first.
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[order] = True
    out, offset = {}, 0
    for key in keys:
        size = mask[key].numel()
        out[key] = flat[offset:offset + size].view(mask[key].shape).to(mask[key].dtype)
        offset += size
    return out


def masked_mean(values: list[Tensor], masks: list[Tensor], weights: list[float], previous: Tensor) -> Tensor:
    """PerFIT's entry-wise aggregation: each entry averaged over the clients whose structure keeps it.

    theta_e = sum_k p_k m_ke theta_ke / sum_k p_k m_ke over the round's clients k (weights p_k),
    and the previous global value where no client kept entry e. With every mask full it is
    FedAvg's weighted mean.
    """
    if not (len(values) == len(masks) == len(weights)) or not values:
        raise ValueError("need one value, mask and weight per client, and at least one client")
    numerator = torch.zeros_like(previous, dtype=torch.float64)
    denominator = torch.zeros_like(previous, dtype=torch.float64)
    for value, mask, weight in zip(values, masks, weights, strict=True):
        numerator += weight * mask.double() * value.double()
        denominator += weight * mask.double()
    mean = numerator / denominator.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(denominator > 0, mean, previous.double()).to(previous.dtype)


class _Masked(nn.Module):
    """The parametrisation W -> M * W of a LoRA factor: pruned entries are zero and get no gradient."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask.to(weight)


def apply_masks(adapters: Mapping[str, Factors], masks: Masks) -> dict[str, Factors]:
    """theta(A_k): every factor multiplied entry-wise by the client's mask."""
    return {name: (a * masks[name][0].to(a), b * masks[name][1].to(b)) for name, (a, b) in adapters.items()}


def kept_entries(masks: Masks) -> int:
    """R_k(A_k): the trainable numbers a structure keeps (entries of A and B over every layer)."""
    return int(sum(int(ma.sum()) + int(mb.sum()) for ma, mb in masks.values()))


def mask_bytes(masks: Masks) -> int:
    """The size of a structure sent as a bitmap: one bit per entry of the expanded adapter."""
    return int(sum(math.ceil((ma.numel() + mb.numel()) / 8) for ma, mb in masks.values()))


class PerFIT(Strategy):
    """PerFIT (Zhang et al. 2024, arXiv 2402.16919): a personal sparse structure of one shared LoRA adapter.

    Survey eq. 14, with theta a LoRA adapter of *expanded* rank R = ``expansion`` x r and client
    k's architecture A_k a binary mask over its entries, within a budget B_k: the number of
    trainable entries of a rank-r_k LoRA adapter, sum over layers of r_k (m + n) (r_k = r unless
    ``budgets`` gives client k its own, for clients that differ in resources).

    As the paper describes it (abstract and summary in ``METHOD_SOURCES.md``; no code was found):

    - **search** (the client's first round): the client expands its trainable space (rank R),
      trains it, scores every entry by its first-order Taylor importance |theta * grad|
      (:func:`taylor_importance`) and prunes the least important, iteratively, in
      ``prune_stages`` stages with training between them, down to its budget
      (:func:`prune_to_budget`); the mask it ends with is its structure A_k, sent once;
    - **training**: from then on it trains only the entries its structure keeps, starting from
      the global adapter seen through its mask, theta(A_k) = A_k * theta, and uploads those
      entries;
    - **aggregation**: the server averages every entry over the clients that keep it, weighted
      by p_k (:func:`masked_mean`); an entry nobody kept this round keeps its value.

    Client k's model (:meth:`personal_model`) is the global adapter through its mask, W' + s
    (A_k^B * B)(A_k^A * A), "the global aggregated LoRA transformed into a personalized LoRA with
    the searched structure". The server's dense adapter is no client's model: PerFIT serves
    each client its personal model.

    Our choices, where the paper's details are unknown:

    - Search in the client's first round only (a one-time cost, like the structure's bitmap);
      ``prune_stages`` stages of ``search_steps`` local steps each (the profile's local steps by
      default), then the round's ordinary training with the final structure. The keep-count
      falls linearly from all R (m + n) entries per layer to the budget over the stages.
    - Importance: |theta * grad| summed over ``importance_batches`` mini-batches of the client's
      data at the end of each stage; one budget for the whole adapter, so layers and factors
      compete for it (the search is over the whole structure).
    - The expanded adapter runs at the model's scaling alpha / R, as peft gives a larger-rank
      LoRA, and with the profile's learning rate.
    - Bytes: the first download is the dense expanded adapter and the head; after that the
      server sends only the entries the client's structure keeps (it knows the structure), as
      the client sends only those; float32 values, the structure's bitmap once with the first
      upload, the head dense.
    - The head is shared and averaged as FedIT's is (on the book's testbed it is the frozen probe).
    """

    name = "PerFIT"
    paper = "Zhang et al. 2024, arXiv 2402.16919"
    chapter = "book/part3/structure"
    batched_training = False

    @dataclass
    class State:
        """Every client's structure, as the server received it with that client's first upload."""

        masks: dict[int, Masks] = field(default_factory=dict)

    @dataclass
    class ClientState:
        """The client's id, its structure (None before its search) and how many entries each stage kept."""

        client_id: int | None = None
        masks: Masks | None = None
        kept_by_stage: list[int] = field(default_factory=list)
        sent_structure: bool = False

    def __init__(self, rank: int | None = None, *, expansion: int = 2, prune_stages: int = 3,
                 search_steps: int | None = None, importance_batches: int = 2,
                 budgets: Mapping[int, int] | None = None) -> None:
        super().__init__(rank)
        for label, value, low in (("expansion", expansion, 1), ("prune_stages", prune_stages, 1),
                                  ("importance_batches", importance_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if search_steps is not None and (isinstance(search_steps, bool) or not isinstance(search_steps, int)
                                         or search_steps < 1):
            raise ValueError(f"search_steps must be an integer >= 1, got {search_steps!r}")
        budgets = dict(budgets or {})
        for client, r_k in budgets.items():
            if isinstance(r_k, bool) or not isinstance(r_k, int) or r_k < 1:
                raise ValueError(f"budgets[{client!r}] must be a rank >= 1, got {r_k!r}")
            if rank is not None and r_k > expansion * rank:
                raise ValueError(f"budgets[{client!r}] = {r_k} exceeds the expanded rank {expansion * rank}")
        self.expansion = expansion
        self.prune_stages = prune_stages
        self.search_steps = search_steps
        self.importance_batches = importance_batches
        self.budgets = budgets
        self._clients: Any = None
        self._settings: dict[str, Any] = {}

    # ----- set-up -------------------------------------------------------------------
    def max_rank(self, num_clients: int) -> int | None:
        return None if self.rank is None else self.expansion * self.rank

    def client_rank(self, client_id: int, server: ServerState) -> int:
        """Every client works in the expanded adapter, rank R (its structure, not its rank, is its own)."""
        return server.rank

    def budget_rank(self, server: ServerState, client_id: int) -> int:
        """r_k: the rank whose LoRA adapter's size is client k's budget B_k."""
        r_k = self.budgets.get(client_id, server.rank // self.expansion)
        if not 1 <= r_k <= server.rank:
            raise ValueError(f"client {client_id}'s budget rank {r_k} must be between 1 and the expanded rank "
                             f"{server.rank}")
        return r_k

    def budget(self, server: ServerState, client_id: int) -> int:
        """B_k: the trainable numbers of a rank-r_k LoRA adapter, sum over layers of r_k (m + n)."""
        r_k = self.budget_rank(server, client_id)
        return int(sum(r_k * (a.shape[1] + b.shape[0]) for a, b in server.adapters.values()))

    def init_server(self, server: ServerState, seed: int) -> None:
        if server.rank < self.expansion:
            raise ValueError(f"PerFIT's expanded rank {server.rank} is below expansion={self.expansion}: "
                             "the budget rank R / expansion would be 0")

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        profile = federation.profile
        self._clients = federation.clients
        self._settings = {"steps": self.search_steps or profile.local_steps, "batch_size": profile.batch_size,
                          "learning_rate": profile.learning_rate, "device": federation.device, "seed": seed,
                          "budgets": {k: self.budget(server, k) for k in range(len(federation.clients))}}

    # ----- client side --------------------------------------------------------------
    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        """First round: the dense expanded adapter. After: the global adapter through the client's structure."""
        client_state.client_id = client_id
        start = super().client_start(server, client_id, client_state, round_index)
        if client_state.masks is not None:
            start.adapters = apply_masks(start.adapters, client_state.masks)
            tensors = {f"{n}.A": a for n, (a, _) in start.adapters.items()}
            tensors.update({f"{n}.B": b for n, (_, b) in start.adapters.items()})
            head = {f"head.{key}": value for key, value in server.head.items()}
            tensors.update(head)
            start.download = Payload(tensors, nbytes=4 * kept_entries(client_state.masks) + tensor_bytes(head))
        return start

    def _importance(self, model: nn.Module, modules: dict[tuple[str, str], nn.Module], client_id: int,
                    stage: int) -> dict[tuple[str, str], Tensor]:
        """|theta * grad| of every stored factor entry, summed over ``importance_batches`` batches."""
        settings = self._settings
        data = self._clients[client_id]
        sampler = BatchSampler(len(data), settings["batch_size"],
                               derive_seed(settings["seed"], "PerFIT importance", client_id, stage))
        totals = {key: torch.zeros_like(module.parametrizations.weight.original) for key, module in modules.items()}
        model.train()  # scored as it trains (dropout on), the loss the pruning is about
        for _ in range(self.importance_batches):
            model.zero_grad(set_to_none=True)
            model(**trim_batch(data.subset(sampler.next()), settings["device"])).loss.backward()
            for key, module in modules.items():
                original = module.parametrizations.weight.original
                if original.grad is not None:
                    totals[key] += taylor_importance(original.detach(), original.grad)
        model.zero_grad(set_to_none=True)
        return totals

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Train only the entries of the client's structure; in its first round, search the structure first."""
        if self._clients is None:
            raise ValueError("PerFIT needs prepare (run it in a federation): its search trains on the client's data")
        k = client_state.client_id
        layers = adapter_io.lora_layers(model)
        modules = {(name, side): getattr(layer, f"lora_{side}")[adapter_io.ADAPTER]
                   for name, layer in layers.items() for side in "AB"}
        masks = client_state.masks
        if masks is None:
            masks = {name: (torch.ones_like(layer.lora_A[adapter_io.ADAPTER].weight),
                            torch.ones_like(layer.lora_B[adapter_io.ADAPTER].weight)) for name, layer in layers.items()}
        try:
            for (name, side), module in modules.items():
                grad = module.weight.requires_grad
                parametrize.register_parametrization(module, "weight", _Masked(masks[name][0 if side == "A" else 1]))
                module.parametrizations.weight.original.requires_grad_(grad)
            if client_state.masks is None:
                settings = self._settings
                current = {key: modules[key].parametrizations.weight[0].mask for key in modules}
                total = int(sum(int(mask.sum()) for mask in current.values()))
                budget = settings["budgets"][k]
                client_state.kept_by_stage = [total]
                for stage in range(1, self.prune_stages + 1):
                    local_train(model, self._clients[k], steps=settings["steps"], batch_size=settings["batch_size"],
                                learning_rate=settings["learning_rate"], device=settings["device"],
                                seed=derive_seed(settings["seed"], "PerFIT search batches", k, stage))
                    keep = total - (total - budget) * stage // self.prune_stages
                    current = prune_to_budget(self._importance(model, modules, k, stage), current, keep)
                    for key, module in modules.items():
                        module.parametrizations.weight[0].mask.copy_(current[key])
                    client_state.kept_by_stage.append(keep)
                client_state.masks = {name: (current[(name, "A")].clone(), current[(name, "B")].clone())
                                      for name in layers}
            yield
        finally:
            for module in modules.values():
                if parametrize.is_parametrized(module, "weight"):
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The entries the structure keeps (the bitmap too, the first time) and the head."""
        if client_state.masks is None:
            raise ValueError("PerFIT's client trained outside local_training: it has no structure to send")
        adapters = apply_masks(result.adapters, client_state.masks)
        tensors = {f"{n}.A": a for n, (a, _) in adapters.items()}
        tensors.update({f"{n}.B": b for n, (_, b) in adapters.items()})
        head = {f"head.{key}": value for key, value in result.head.items()}
        tensors.update(head)
        nbytes = 4 * kept_entries(client_state.masks) + tensor_bytes(head)
        if not client_state.sent_structure:
            for n, (ma, mb) in client_state.masks.items():
                tensors[f"{n}.A.mask"], tensors[f"{n}.B.mask"] = ma.bool(), mb.bool()
            nbytes += mask_bytes(client_state.masks)
            client_state.sent_structure = True
        return Payload(tensors, nbytes=nbytes)

    # ----- server side --------------------------------------------------------------
    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        state = server.method_state
        for u in uploads:
            if f"{next(iter(server.adapters))}.A.mask" in u.payload.tensors:
                state.masks[u.client_id] = {n: (u.payload.tensors[f"{n}.A.mask"].float(),
                                                u.payload.tensors[f"{n}.B.mask"].float()) for n in server.adapters}
            if u.client_id not in state.masks:
                raise ValueError(f"client {u.client_id} uploaded without the server knowing its structure")
        weights = normalized_weights(uploads)
        merged = {}
        for n, (a, b) in server.adapters.items():
            merged[n] = tuple(
                masked_mean([u.payload.tensors[f"{n}.{side}"].to(old) for u in uploads],
                            [state.masks[u.client_id][n][i] for u in uploads], weights, old)
                for i, (side, old) in enumerate((("A", a), ("B", b))))
        server.adapters = merged
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """theta(A_k): the global adapter through client k's structure (None, the global model, before its search)."""
        if client_state.masks is None:
            return None
        return apply_masks(server.adapters, client_state.masks), {k: v.clone() for k, v in server.head.items()}
