"""Every FedLoRA method of the book, by the name the survey gives it.

The survey's taxonomy (arXiv 2505.13502, Figure 2) is the package's map: each branch is a
module and each method one class in it. This registry only collects them, so that a
chapter, an exercise or a benchmark can ask for any method by name::

    from fedlora_edu.methods import make_strategy
    strategy = make_strategy("FlexLoRA", ranks=[4, 8, 16])

Section 3.1, server aggregation: :mod:`fedlora_edu.aggregation` (FedIT, FFA-LoRA, FLoRA,
FlexLoRA, FedEx-LoRA), :mod:`fedlora_edu.single_matrix` (CoLR, RoLoRA, LoRA-A2),
:mod:`fedlora_edu.full_size` (FedPipe), :mod:`fedlora_edu.corrective` (LoRA-FAIR; FedEx-LoRA
re-exported), :mod:`fedlora_edu.rank_clustering` (FedInc). Section 3.2, initialization:
:mod:`fedlora_edu.server_init` (standard init, FeDeRA, SLoRA), :mod:`fedlora_edu.client_init`
(Avg-Initial, Re-Initial, Local-Initial, FedLoRU, pFedLoRU, mFedLoRU, FRLoRA).

Taught across Part II; the table of every method is in ``book/part2/at_a_glance.ipynb``.
"""

from __future__ import annotations

from fedlora_edu.aggregation import FedExLoRA, FedIT, FFALoRA, FlexLoRA, FLoRA
from fedlora_edu.client_init import AvgInitial, FedLoRU, FRLoRA, LocalInitial, MFedLoRU, PFedLoRU, ReInitial
from fedlora_edu.corrective import LoRAFAIR
from fedlora_edu.full_size import FedPipe
from fedlora_edu.rank_clustering import FedInc
from fedlora_edu.server_init import FeDeRA, SLoRA, StandardInit
from fedlora_edu.single_matrix import CoLR, LoRAA2, RoLoRA
from fedlora_edu.strategy import Strategy

# One entry per method class; add a new method's class here (its ``name`` is the key).
METHOD_CLASSES: tuple[type[Strategy], ...] = (
    FedIT, FFALoRA, FLoRA, FlexLoRA, FedExLoRA,
    LoRAFAIR,
    CoLR, RoLoRA, LoRAA2,
    FedPipe,
    StandardInit, FeDeRA, SLoRA,
    FedInc,
    AvgInitial, ReInitial, LocalInitial, FedLoRU, PFedLoRU, MFedLoRU, FRLoRA,
)

METHODS: dict[str, type[Strategy]] = {cls.name: cls for cls in METHOD_CLASSES}


def make_strategy(name: str, **kwargs: object) -> Strategy:
    """Build any of the book's methods by its survey name (``"FedIT"``, ``"CoLR"``, ...)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)  # type: ignore[arg-type]
