"""Tensors, LoRA factors and payloads as Flower records, and back, bit for bit.

A Flower :class:`~flwr.app.Message` carries a :class:`~flwr.app.RecordDict`: named
:class:`~flwr.app.ArrayRecord` (arrays, serialised as NumPy ``.npy`` bytes, so a float32
tensor arrives with the same bits), :class:`~flwr.app.ConfigRecord` (scalars, strings, lists) and
:class:`~flwr.app.MetricRecord`. These functions are the only place the adapter converts; what
a record holds is decided by :mod:`fedlora_edu.flower.apps`.

Taught in ``book/flower/real_federation.ipynb`` (the simulator it stands beside:
``book/part1/federated_learning.ipynb``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from fedlora_edu.core.adapters import Factors


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord holding each tensor under its name (moved to the CPU, detached)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        record[name] = Array(tensor.detach().cpu().contiguous().numpy())
    return record


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord by name, as writable torch tensors."""
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def factors_to_tensors(factors: Mapping[str, Factors]) -> dict[str, Tensor]:
    """Every layer's ``(A, B)`` as ``{"<layer>.A": A, "<layer>.B": B}`` (the payloads' naming)."""
    tensors: dict[str, Tensor] = {}
    for name, (a, b) in factors.items():
        tensors[f"{name}.A"] = a
        tensors[f"{name}.B"] = b
    return tensors


def tensors_to_factors(tensors: Mapping[str, Tensor], names: list[str] | None = None) -> dict[str, Factors]:
    """The inverse of :func:`factors_to_tensors`, layers in the order of ``names`` (default: sorted).

    Every layer must have both A and B. The order matters to the last float bit where layers are
    summed over (the simulator's measurements), so the server passes its own adapter order.
    """
    if names is None:
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    missing = [n for n in names if f"{n}.A" not in tensors or f"{n}.B" not in tensors]
    if missing:
        raise ValueError(f"layers without both factors: {missing[:3]}")
    return {n: (tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in names}
