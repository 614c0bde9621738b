"""Every FedLoRA method of the book, by the name the survey gives it: the one registry.

The survey's taxonomy (arXiv 2505.13502, Figure 2) is the package's map: each branch is a
subpackage (:mod:`fedlora_edu.distributed` for section 3, :mod:`fedlora_edu.heterogeneity`
for section 4, :mod:`fedlora_edu.efficiency` for section 5), each leaf of the taxonomy a
module, each method one class in it. This module only collects them, and it is the only
module that imports the methods, so that a chapter, an exercise or a benchmark can ask for
any method by name::

    from fedlora_edu import make_strategy
    strategy = make_strategy("FlexLoRA", ranks=[4, 8, 16])

:func:`method_map` lists, for every method, its module, the chapter that teaches it and its
paper; the README's "Where each method lives" table is checked against it by the tests.
"""

from __future__ import annotations

from types import ModuleType

from fedlora_edu.core.strategy import Strategy
from fedlora_edu.distributed.client_init import (
    AvgInitial,
    FedLoRU,
    FRLoRA,
    LocalInitial,
    MFedLoRU,
    PFedLoRU,
    ReInitial,
)
from fedlora_edu.distributed.corrective import FedExLoRA, LoRAFAIR
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.distributed.full_size import FedPipe, FlexLoRA, FLoRA
from fedlora_edu.distributed.rank_clustering import FedInc
from fedlora_edu.distributed.server_init import FeDeRA, SLoRA, StandardInit
from fedlora_edu.distributed.single_matrix import CoLR, FFALoRA, LoRAA2, RoLoRA
from fedlora_edu.efficiency.compression import CGFedLLM, FwdLLM, QuantizedUpdates, TopKUpdates
from fedlora_edu.efficiency.layers import FedFMSL, FedPiLot, FedRA, FibecFed
from fedlora_edu.efficiency.offsite import FedBiOT
from fedlora_edu.efficiency.privacy import DPFedAvg
from fedlora_edu.efficiency.sparse import FLASC, HAFL, FSLoRA
from fedlora_edu.efficiency.split import SplitFederatedLoRA, SplitLoRA, SplitMethod
from fedlora_edu.heterogeneity.clustering import FLTAC
from fedlora_edu.heterogeneity.experts import FedLEASE, FedMoE
from fedlora_edu.heterogeneity.hypernetwork import HyperFloRA
from fedlora_edu.heterogeneity.languages import FedHLT, FedLFC
from fedlora_edu.heterogeneity.local_models import PFedLoRA
from fedlora_edu.heterogeneity.personalized import CELoRA, FDLoRA, FedDPA, FedSALoRA
from fedlora_edu.heterogeneity.ranks import HetLoRA, ReplicationPadding
from fedlora_edu.heterogeneity.structure import PerFIT

# One entry per method class, in the order of the survey's sections; add a new method's class
# here (its ``name`` is the key).
METHOD_CLASSES: tuple[type[Strategy], ...] = (
    # 3.1 server aggregation
    FedIT,
    FFALoRA, CoLR, RoLoRA, LoRAA2,
    FLoRA, FlexLoRA, FedPipe,
    FedExLoRA, LoRAFAIR,
    FedInc,
    # 3.2 initialization
    StandardInit, FeDeRA, SLoRA,
    AvgInitial, ReInitial, LocalInitial, FedLoRU, PFedLoRU, MFedLoRU, FRLoRA,
    # 4.1 heterogeneous rank
    HetLoRA, ReplicationPadding,
    # 4.2 personalized LoRA (a personal structure, eq. 14: PerFIT and the mixtures of LoRA experts; eq. 15)
    FedDPA, FDLoRA, FedSALoRA, CELoRA, PFedLoRA, PerFIT, FedLEASE, FedMoE, HyperFloRA,
    # 4.3 clustering (searched: FL-TAC; known in advance, languages: FedLFC, FedHLT)
    FLTAC, FedLFC, FedHLT,
    # 5 efficiency: sparse learning (HAFL by rank-1 component, FSLoRA's sketches); at the layer level
    FLASC, HAFL, FSLoRA,
    FibecFed, FedPiLot, FedFMSL, FedRA,
    # 5 efficiency: split learning (the client keeps the embeddings and the head; the client keeps the first blocks)
    SplitFederatedLoRA, SplitLoRA,
    # 5 efficiency: compressed learning (quantized and top-k uploads as baselines; FedBiOT's compressed model)
    # and forward-only training
    QuantizedUpdates, TopKUpdates, CGFedLLM, FedBiOT, FwdLLM,
    # privacy as a cost: user-level differential privacy around a method whose upload is its factors
    DPFedAvg,
)

METHODS: dict[str, type[Strategy]] = {cls.name: cls for cls in METHOD_CLASSES}
BRANCHES = ("distributed", "heterogeneity", "efficiency")
"""The survey's three branches (sections 3, 4 and 5), one subpackage each."""


def make_strategy(name: str, **kwargs: object) -> Strategy:
    """Build any of the book's methods by its survey name (``"FedIT"``, ``"CoLR"``, ...)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)  # type: ignore[arg-type]


def own_loop(strategy: Strategy) -> str | None:
    """The function a method runs in when ``Federation.run`` cannot play its round, None when it can.

    Split learning exchanges activations and gradients every local step, so it runs in
    :func:`fedlora_edu.efficiency.split.run_split`; every other registered method runs in the simulator's round.
    On Flower the same split loop runs as messages (:func:`fedlora_edu.flower.split.serve_split`).
    """
    return "fedlora_edu.efficiency.split.run_split" if isinstance(strategy, SplitMethod) else None


def methods_in(module: ModuleType | str) -> dict[str, type[Strategy]]:
    """The registered methods defined in ``module`` (a module or its dotted name), by name."""
    module_name = module if isinstance(module, str) else module.__name__
    return {name: cls for name, cls in METHODS.items() if cls.__module__ == module_name}


def methods_in_branch(branch: str) -> dict[str, type[Strategy]]:
    """The registered methods of one branch of the taxonomy (``"distributed"``, ``"heterogeneity"``,
    ``"efficiency"``: the subpackage their modules live in), by name, in registry order."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    return {name: cls for name, cls in METHODS.items() if cls.__module__.startswith(f"fedlora_edu.{branch}.")}


def method_map() -> list[dict[str, str]]:
    """One row per method: ``method``, ``module``, ``chapter`` and ``paper``, in registry order."""
    return [{"method": cls.name, "module": cls.__module__, "chapter": cls.chapter, "paper": cls.paper}
            for cls in METHOD_CLASSES]


def method_map_markdown() -> str:
    """:func:`method_map` as the Markdown table the README shows (``python -c "from fedlora_edu.registry
    import method_map_markdown; print(method_map_markdown())"`` regenerates it)."""
    lines = ["| method | module | chapter | paper |", "| --- | --- | --- | --- |"]
    lines += [f"| {row['method']} | `{row['module']}` | `{row['chapter']}` | {row['paper']} |" for row in method_map()]
    return "\n".join(lines) + "\n"
