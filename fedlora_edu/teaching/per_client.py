"""Per-client measurement of personalization: what each client is served, what it keeps, over seeds.

Part III evaluates every method twice (survey section 4; issue 14's protocol): the server's model
on the shared test set, and each client's *served* model (its personal model, its cluster's model,
or the server's where the method has none) on the client's own held-out split. This module holds
what the Part III study (``studies/part3.py``) and the chapter "Part III at a glance" share:

- :func:`keeping_client_states`: a strategy class that keeps every client's state, so the served
  models can be rebuilt after a run without changing the simulator;
- :func:`served_accuracies`: each client's served model scored on its own held-out split;
- :func:`numbers_kept`: how many floating-point numbers a state holds (tensors, modules and
  optimiser moments, found recursively): the price of personal state in memory;
- :class:`PerClientComparison`: the stored study read seed by seed: the mean over clients, the
  worst client and the server's accuracy, each with its 95% interval over seeds, compared with a
  reference method on the same seeds (paired), and verdicts on the survey's claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedlora_edu.core.adapters import lora_layers, set_head_state, set_lora_factors
from fedlora_edu.foundations.training import evaluate
from fedlora_edu.simulation.metrics import Interval, interval, paired_difference
from fedlora_edu.studies import load_study
from fedlora_edu.teaching.comparison import Measure, final_accuracy, side_of, verdict_of, where_and_when


def keeping_client_states(cls: type) -> type:
    """A subclass of the strategy class ``cls`` whose instances keep every client state they create.

    The simulator creates one state per client at the start of a run (``new_client_state``), in
    client order; after ``federation.run``, ``strategy.client_states[-K:]`` are that run's K states.
    """

    class Keeping(cls):  # type: ignore[misc, valid-type]
        def new_client_state(self):
            state = super().new_client_state()
            self.__dict__.setdefault("client_states", []).append(state)
            return state

    Keeping.__name__ = Keeping.__qualname__ = f"Keeping{cls.__name__}"
    return Keeping


def served_accuracies(federation, strategy, server, client_states: Sequence[Any], *,
                      base: torch.nn.Module | None = None) -> tuple[list[float], list[bool]]:
    """Each client's served model on its own held-out split, and whether that model is personal.

    The served model is ``strategy.personal_model(server, k, state_k)`` where the method has one
    for client k, else the server's adapter and head, evaluated inside ``strategy.serving`` (a
    router over LoRA experts, for the methods that have one). Its frozen weights W' are the
    pre-trained ones, or those of ``base`` where given: pass the run's model
    (``federation.last_model``, right after the run) for a method that changes W' as it goes
    (FLoRA merges each round's stack into W', FedEx-LoRA adds a residual), since the server's
    state holds only the last round's change.
    """
    if federation.client_tests is None:
        raise ValueError("served_accuracies needs a federation built with client_tests (a held-out split per client)")
    if len(client_states) != federation.num_clients:
        raise ValueError(f"client_states has {len(client_states)} entries for {federation.num_clients} clients")
    models: dict[int, torch.nn.Module] = {}
    accuracies, personal = [], []
    for k in range(federation.num_clients):
        served = strategy.personal_model(server, k, client_states[k])
        adapters, head = served if served is not None else (server.adapters, server.head)
        rank = next(iter(adapters.values()))[0].shape[0]
        if rank not in models:
            models[rank] = federation.fresh_model(rank=rank)
            if base is not None:
                _copy_base_weights(models[rank], base)
        set_lora_factors(models[rank], adapters)
        set_head_state(models[rank], head)
        with strategy.serving(models[rank], server, k, client_states[k]):
            accuracies.append(evaluate(models[rank], federation.client_tests[k])[0])
        personal.append(served is not None)
    return accuracies, personal


def _copy_base_weights(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """W' of every LoRA layer of ``model`` set to that of ``source`` (the same base model, any rank)."""
    targets = lora_layers(model)
    try:
        sources = lora_layers(source)
    except ValueError:  # no LoRA layers at all
        sources = {}
    if set(targets) != set(sources):
        raise ValueError("base must be a model of the same federation: its LoRA layers differ from the served model's")
    with torch.no_grad():
        for name, layer in targets.items():
            layer.get_base_layer().weight.copy_(sources[name].get_base_layer().weight)


def numbers_kept(state: Any) -> int:
    """How many floating-point numbers ``state`` holds: tensors, module parameters and buffers, optimiser
    moments, found through dataclasses, objects, dicts, lists and tuples (each object counted once).

    Integer and boolean tensors (masks, indices) are not counted: they are structure, not numbers
    the method learns. Python floats are not counted either (a handful of scalars).
    """
    seen: set[int] = set()

    def count(value: Any) -> int:
        if value is None or isinstance(value, (str, bytes, int, float, bool)):
            return 0
        if id(value) in seen:
            return 0
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            return value.numel() if value.is_floating_point() else 0
        if isinstance(value, torch.nn.Module):
            return sum(count(tensor) for tensor in value.state_dict(keep_vars=True).values())
        if isinstance(value, torch.optim.Optimizer):
            return sum(count(moments) for moments in value.state.values())
        if isinstance(value, dict):
            return sum(count(item) for item in value.values())
        if isinstance(value, (list, tuple, set, frozenset)):
            return sum(count(item) for item in value)
        if dataclasses.is_dataclass(value):
            return sum(count(getattr(value, f.name)) for f in dataclasses.fields(value))
        if hasattr(value, "__dict__"):
            return sum(count(item) for item in vars(value).values())
        return 0

    return count(state)


# ----- measures of one run, per seed (a stored study's rows) ----------------------------------------
server_accuracy = final_accuracy
"""The server's model on the shared test set after the last round (a study's final accuracy, per seed)."""


def clients_mean(rows: pd.DataFrame) -> pd.Series:
    """The mean over clients of each client's served model on its own held-out split."""
    return rows["client_accuracies"].apply(np.mean)


def worst_client(rows: pd.DataFrame) -> pd.Series:
    """The lowest of the clients' accuracies on their own held-out splits."""
    return rows["client_accuracies"].apply(np.min)


def clients_spread(rows: pd.DataFrame) -> pd.Series:
    """The standard deviation over clients of their accuracies on their own held-out splits."""
    return rows["client_accuracies"].apply(np.std)


def probe_clients_mean(rows: pd.DataFrame) -> pd.Series:
    """The mean over clients of the probe (the frozen start every run shares) on their own held-out splits."""
    return rows["probe_client_accuracies"].apply(np.mean)


def megabytes_per_round(rows: pd.DataFrame) -> pd.Series:
    """Bytes up and down, summed over a round's clients, averaged over the rounds, in MB."""
    return (rows["bytes_up"].apply(np.mean) + rows["bytes_down"].apply(np.mean)) / 1e6


class PerClientComparison:
    """The stored study ``name`` (default ``"part3"``), seed by seed, ready to compare methods per client."""

    def __init__(self, name: str = "part3") -> None:
        self.study = load_study(name)  # FileNotFoundError when it never ran
        self.seeds = sorted(int(seed) for seed in self.study["seed"].unique())
        self.methods = list(dict.fromkeys(self.study["method"]))

    @property
    def stale(self) -> int:
        """How many stored rows measured code that has changed since."""
        return int(self.study.attrs["stale"])

    def runs(self, method: str) -> pd.DataFrame:
        """The method's runs, one row per seed of the study (a ValueError names a missing method or seed)."""
        rows = self.study[self.study["method"] == method]
        if rows.empty:
            raise ValueError(f"the stored study has no runs of {method!r}; it has {self.methods}")
        rows = rows.set_index("seed").reindex(self.seeds)
        if rows["final_accuracy"].isna().any():
            missing = [seed for seed, value in rows["final_accuracy"].items() if pd.isna(value)]
            raise ValueError(f"the stored study lacks runs of {method!r} for seeds {missing}")
        return rows

    def interval(self, method: str, measure: Measure = clients_mean) -> Interval:
        """The mean over seeds of ``measure`` for ``method``, with its 95% interval."""
        return interval(measure(self.runs(method)))

    def difference(self, method: str, reference: str, measure: Measure = clients_mean) -> Interval:
        """``measure`` of ``method`` minus ``reference``'s, paired seed by seed."""
        return paired_difference(measure(self.runs(method)), measure(self.runs(reference)))

    def side(self, method: str, reference: str, measure: Measure = clients_mean) -> str | None:
        """``"ahead"`` or ``"behind"`` of ``reference`` when the paired interval excludes zero, else None."""
        return side_of(self.difference(method, reference, measure))

    def verdict(self, methods: Sequence[str], reference: str, expected: str, measure: Measure = clients_mean) -> str:
        """"agrees" when every method is on the ``expected`` side of ``reference``, "disagrees" when one is on
        the other side, "not distinguishable here" otherwise."""
        return verdict_of([self.side(method, reference, measure) for method in methods], expected)

    def table(self, methods: Sequence[str], reference: str = "FedIT") -> pd.DataFrame:
        """Per method, as means over seeds with 95% intervals: the clients' mean and worst client on their own
        splits, the server's accuracy on the shared test set, each paired with ``reference``; and MB per round."""
        rows = []
        for method in methods:
            row: dict[str, object] = {"method": method}
            for label, measure in (("clients, mean", clients_mean), ("worst client", worst_client),
                                   ("server, shared test", server_accuracy)):
                row[label] = str(self.interval(method, measure))
                if method != reference:
                    gap = self.difference(method, reference, measure)
                    row[f"{label} vs {reference}"] = f"{side_of(gap) or 'not distinguishable'} ({gap.mean:+.3f})"
                else:
                    row[f"{label} vs {reference}"] = "reference"
            row["MB / round"] = float(megabytes_per_round(self.runs(method)).mean())
            rows.append(row)
        return pd.DataFrame(rows).set_index("method")

    def provenance(self) -> str:
        """One line: how many runs, on which machines, at which commits and dates, and how many are stale."""
        return (f"stored study {self.study.attrs['name']}: {len(self.study)} runs of {len(self.methods)} methods over "
                f"seeds {self.seeds}, {where_and_when(self.study)}; rows whose code has changed since: {self.stale}")
