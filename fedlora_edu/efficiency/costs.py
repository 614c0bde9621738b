"""What a method costs a client, counted in one place: bytes, compute and memory of a round of local training.

Part IV compares every method of the book on the same axes, so the costs are counted by one
path that every method goes through, never estimated by hand in a chapter:
:func:`client_costs` runs a method in a federation (the simulator's sequential loop, the
reference path) and, around each client's local training, counts

- **compute**: the floating-point operations of the forward and backward passes of every local
  step (torch's ``FlopCounterMode``: matrix products and attention, 2 per multiply-add; the
  optimiser's elementwise update is not counted), including any training a method runs inside
  its own ``local_training`` context (FedDPA's first phase, for instance). A client whose rank
  r_k is below the model's R trains, in the simulator, inside the rank-R model with its other
  components held at zero, where a device would run rank r_k: its trainable LoRA numbers are
  counted at r_k / R, but its FLOPs are those the simulator ran. The difference is small, because
  the frozen model's arithmetic dominates a step: on the test federation, FedIT at rank 2 and at
  rank 4 differ by well under 1% (tests/test_costs.py). torch attributes the backward pass to
  modules too loosely to subtract the LoRA matrices' share exactly. The model's weights are
  counted as the simulator holds them (the zero components of a low-rank client, a few kilobytes,
  included);
- **memory** of a local step, in bytes: the model's weights (frozen and trainable), a gradient
  and AdamW's two moment estimates per trainable number, and the largest total of tensors saved
  for the backward pass during one forward pass (the activations; counted through autograd's
  saved-tensor hooks, so the figure is the same on any device). Allocator overhead and
  temporary buffers are not counted: the figure is what the method needs, not what a
  particular allocator reserves;
- **bytes** up and down of the client's round: the simulator's own count of what is serialized
  (each method's :class:`~fedlora_edu.core.strategy.Payload`), read from the run's history.

The memory of a local step grows with the LoRA rank; :func:`costs_by_rank` counts it at
each rank and :func:`ranks_within_memory` gives each client the largest rank its memory budget
holds (Part III's clients that differ in resources, budgets drawn by
:func:`fedlora_edu.federations.memory_budgets`).

Our choice of what "a client's cost" is: one client per round, ``rounds`` rounds (the last one is
reported, so that a method whose later rounds differ from its first, FedDPA's for instance, is
counted in its steady state).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.strategy import ClientStart, Strategy
from fedlora_edu.distributed.discordance import FedIT

OPTIMIZER_STATES = 2
"""Numbers AdamW keeps per trainable number (first and second moments), as every method's clients here use AdamW."""


@dataclass(frozen=True)
class ClientCost:
    """One client's cost in one round of a method (see the module docstring for what each figure counts)."""

    method: str
    steps: int
    flops: int
    trainable_parameters: int
    weight_bytes: int
    trainable_bytes: int
    activation_bytes: int
    bytes_up: int
    bytes_down: int

    @property
    def flops_per_step(self) -> float:
        """The round's forward and backward FLOPs over its local steps."""
        return self.flops / self.steps

    @property
    def optimizer_bytes(self) -> int:
        """A gradient and AdamW's two moments per trainable number."""
        return (1 + OPTIMIZER_STATES) * self.trainable_bytes

    @property
    def peak_bytes(self) -> int:
        """Weights, gradients, optimiser state and the saved activations of one step, together."""
        return self.weight_bytes + self.optimizer_bytes + self.activation_bytes


class _Tally:
    """Counts, while active, the FLOPs of a client's training and the bytes each forward pass saves for backward."""

    def __init__(self) -> None:
        self.flops = 0
        self.activation_bytes = 0
        self.trainable = 0
        self.trainable_bytes = 0
        self.weight_bytes = 0
        self._current = 0
        self._seen: set[tuple[int, int]] = set()
        self.weight_storages: set[int] = set()

    def new_forward(self, *_: Any) -> None:
        self._current = 0
        self._seen = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in self._seen and key[0] not in self.weight_storages:  # a weight (or a view of one) is no activation
            self._seen.add(key)
            self._current += key[1]
            self.activation_bytes = max(self.activation_bytes, self._current)
        return tensor

    def parameters(self, model: nn.Module, rank_share: float) -> None:
        """Weights and trainable numbers as the client trains (parametrised factors included).

        A trainable LoRA factor counts ``rank_share`` (r_k / R) of its numbers: the rest are the
        zero components of a client below the model's rank.
        """
        seen: set[int] = set()
        self.weight_bytes = self.trainable = 0
        self.trainable_bytes = 0
        for name, parameter in model.named_parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            self.weight_bytes += parameter.numel() * parameter.element_size()
            if parameter.requires_grad:
                share = rank_share if _is_lora(name) else 1.0
                count = round(parameter.numel() * share)
                self.trainable += count
                self.trainable_bytes += count * parameter.element_size()


def _is_lora(name: str) -> bool:
    """Whether a parameter or module name is one of the LoRA factors (``lora_A``/``lora_B``)."""
    return any(f"lora_{side}.{adapter_io.ADAPTER}" in name for side in "AB")


def _counted(strategy: Strategy, tallies: list[_Tally]) -> Strategy:
    """A copy of ``strategy`` whose clients' local training is counted, one :class:`_Tally` per client and round."""
    cls = type(strategy)

    class Counted(cls):  # type: ignore[misc, valid-type]
        @contextlib.contextmanager
        def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                           round_index: int) -> Iterator[None]:
            tally = _Tally()
            tallies.append(tally)
            tally.weight_storages = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
            rank_share = next(iter(start.adapters.values()))[0].shape[0] / adapter_io.model_rank(model)
            hook = model.register_forward_pre_hook(tally.new_forward)
            try:
                with FlopCounterMode(display=False) as counter, \
                        torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda tensor: tensor), \
                        cls.local_training(self, model, start, client_state, round_index):
                    tally.parameters(model, rank_share)
                    yield
                tally.flops = int(counter.get_total_flops())
            finally:
                hook.remove()

    Counted.__name__ = Counted.__qualname__ = f"Counted{cls.__name__}"
    Counted.name = cls.name
    counted = copy.copy(strategy)
    counted.__class__ = Counted
    return counted


def client_costs(federation: Any, strategy: Strategy, *, rounds: int = 2, seed: int = 0,
                 **run_options: Any) -> ClientCost:
    """Run ``strategy`` for ``rounds`` rounds of one client each and count the last client's round.

    ``federation`` is a :class:`~fedlora_edu.simulation.federation.Federation`; ``run_options``
    go to its ``run`` (``local_steps``, ``batch_size``, ``learning_rate``). The strategy passed
    in is not changed: a copy of it runs.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    for reserved in ("rounds", "clients_per_round", "engine", "seed", "progress"):
        if reserved in run_options:
            raise ValueError(f"client_costs sets {reserved} itself; it cannot be passed")
    tallies: list[_Tally] = []
    history = federation.run(_counted(strategy, tallies), rounds=rounds, clients_per_round=1, engine="sequential",
                             seed=seed, progress=False, **run_options)
    if len(tallies) != rounds:
        raise RuntimeError(f"expected one counted client per round, got {len(tallies)} in {rounds} rounds")
    last, row = tallies[-1], history.iloc[-1]
    steps = run_options.get("local_steps", federation.profile.local_steps)
    return ClientCost(method=strategy.name, steps=int(steps), flops=last.flops, trainable_parameters=last.trainable,
                      weight_bytes=last.weight_bytes, trainable_bytes=last.trainable_bytes,
                      activation_bytes=last.activation_bytes, bytes_up=int(row["bytes_up"]),
                      bytes_down=int(row["bytes_down"]))


def costs_by_rank(federation: Any, ranks: Sequence[int], *, seed: int = 0, **run_options: Any) -> dict[int, ClientCost]:
    """The cost of one client's round of LoRA training at each rank in ``ranks`` (FedIT, the model built at that rank).

    Each is :func:`client_costs` of one round; its :attr:`ClientCost.peak_bytes` is the memory of a
    local step at that rank (weights, a gradient and AdamW's moments per trainable number, and the
    saved activations, all of which grow with r), what :func:`ranks_within_memory` compares budgets
    with. ``run_options`` go to the federation's ``run`` (``local_steps=1, evaluate=False`` is
    enough for memory: a step's memory does not depend on how many follow it).
    """
    chosen = sorted(set(ranks))
    if not chosen or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in chosen):
        raise ValueError(f"ranks must be integers >= 1, got {list(ranks)!r}")
    return {rank: client_costs(federation, FedIT(rank=rank), rounds=1, seed=seed, **run_options) for rank in chosen}


def ranks_within_memory(budgets: Sequence[int], peak_by_rank: Mapping[int, int]) -> list[int]:
    """For each client's memory budget, the largest rank whose counted local step fits in it.

    ``peak_by_rank`` maps ranks to the bytes a local step needs at that rank
    (``{r: cost.peak_bytes}`` of :func:`costs_by_rank`); only those ranks are candidates. A client whose budget holds
    none of them gets 0: it cannot train at any rank and should not be sampled (a method that
    needs r_k >= 1 rejects it, rather than the client silently training beyond its memory).
    """
    if not peak_by_rank:
        raise ValueError("peak_by_rank must hold at least one rank")
    ordered = sorted(peak_by_rank.items())
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budgets must be integers >= 0 (bytes), got {budget!r}")
    return [max((rank for rank, peak in ordered if peak <= budget), default=0) for budget in budgets]
