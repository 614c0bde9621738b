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

import collections
import functools
import importlib
import json
import math
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
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


# ----- any Python value a strategy keeps, as an ArrayRecord and a JSON layout ----------------------------

TRUSTED_MODULES = ("fedlora_edu", "torch", "functools", "collections", "math", "operator")
"""The packages whose classes and functions :func:`decode_value` rebuilds by name; anything else is refused."""

LAYOUT_VERSION = 1


def encode_value(value: Any, name: str = "value", references: Mapping[int, str] | None = None
                 ) -> tuple[dict[str, Tensor], str]:
    """``value`` as named tensors and a JSON layout that says how to put it back together (:func:`decode_value`).

    For what a strategy keeps between rounds (a client's state, the settings its ``prepare`` derived):
    None, numbers (NaN and infinities included), strings, tensors (dtype, device and ``requires_grad``
    kept; a ``Parameter`` stays one), NumPy arrays and scalars, lists, tuples, sets, dicts with any such
    keys, ``torch.dtype``, ``torch.device``, ``torch.Size``, objects and dataclasses of a class in
    :data:`TRUSTED_MODULES`, a torch ``nn.Module`` (its parameters, buffers, submodules and attributes;
    no hooks), a function of those modules by its name and a ``functools.partial`` of one. Every tensor
    arrives bit for bit; two references to one tensor arrive as two copies. Anything else raises a
    TypeError naming where it sits (``name.field[key]``). ``name`` starts those paths.

    ``references`` maps ``id(obj)`` to a name for objects both sides already hold (the federation a
    Flower process loads, its clients' data): such an object is sent as its name, and
    :func:`decode_value` puts the receiver's own object in its place.
    """
    tensors: dict[str, Tensor] = {}
    layout = {"version": LAYOUT_VERSION, "value": _encode(value, name, tensors, dict(references or {}))}
    return tensors, json.dumps(layout, allow_nan=True)


def decode_value(tensors: Mapping[str, Tensor], layout: str, references: Mapping[str, Any] | None = None) -> Any:
    """The value :func:`encode_value` took apart, rebuilt from its tensors and layout.

    ``references`` gives the receiver's object for each name the sender used in its ``references``;
    a name it lacks raises a KeyError.
    """
    parsed = json.loads(layout)
    if parsed.get("version") != LAYOUT_VERSION:
        raise ValueError(f"layout version {parsed.get('version')!r}, expected {LAYOUT_VERSION}")
    return _decode(parsed["value"], tensors, dict(references or {}))


def _trusted(path: str) -> bool:
    return path.split(".", 1)[0] in TRUSTED_MODULES


def _name_of(thing: Any) -> str | None:
    """``module:qualname`` of a class or function that can be found again by that name, else None."""
    module, qualname = getattr(thing, "__module__", None), getattr(thing, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname or not _trusted(module):
        return None
    try:
        found = _resolve(f"{module}:{qualname}")
    except (ImportError, AttributeError, ValueError):
        return None
    return f"{module}:{qualname}" if found is thing else None


def _resolve(name: str) -> Any:
    module, _, qualname = name.partition(":")
    if not _trusted(module):
        raise ValueError(f"{name} is not in a trusted module ({', '.join(TRUSTED_MODULES)})")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _bare_module_keys() -> frozenset[str]:
    bare = torch.nn.Module.__new__(torch.nn.Module)
    torch.nn.Module.__init__(bare)
    return frozenset(vars(bare))


_MODULE_INTERNALS = _bare_module_keys()
_MODULE_KEPT = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"})


def _encode(value: Any, path: str, tensors: dict[str, Tensor], references: dict[int, str]) -> Any:
    if id(value) in references:
        return {"reference": references[id(value)]}

    def inner(item: Any, where: str) -> Any:
        return _encode(item, where, tensors, references)

    if value is None or isinstance(value, (bool, str)) or type(value) in (int, float):
        return value if not isinstance(value, float) or math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value
        return {"tensor": key, "device": str(value.device), "grad": bool(value.requires_grad),
                "parameter": isinstance(value, torch.nn.Parameter)}
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.array(value))
        return {"numpy": key, "scalar": isinstance(value, np.generic)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if type(value) in (list, tuple, set, frozenset):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return {type(value).__name__: [inner(item, f"{path}[{i}]") for i, item in enumerate(items)]}
    if type(value) in (dict, collections.OrderedDict):
        return {"dict": [[inner(key, f"{path}<key {key!r}>"), inner(item, f"{path}[{key!r}]")]
                         for key, item in value.items()], "ordered": type(value) is collections.OrderedDict}
    if isinstance(value, functools.partial):
        return {"partial": inner(value.func, f"{path}.func"),
                "args": inner(list(value.args), f"{path}.args"),
                "keywords": inner(dict(value.keywords), f"{path}.keywords")}
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__") or \
            isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        name = _name_of(value)
        if name is None:
            raise TypeError(f"{path} holds {value!r}, which the Flower adapter cannot carry: a class or function "
                            f"is sent by name, and only one defined at the top of {', '.join(TRUSTED_MODULES)}")
        return {"named": name}
    cls_name = _name_of(type(value))
    if cls_name is None or not hasattr(value, "__dict__"):
        raise TypeError(f"{path} holds a {type(value).__name__}, which the Flower adapter cannot carry (None, "
                        f"numbers, strings, tensors, containers of them, and objects of a class of "
                        f"{', '.join(TRUSTED_MODULES)} only)")
    attributes = vars(value)
    if isinstance(value, torch.nn.Module):
        hooks = [key for key in _MODULE_INTERNALS - _MODULE_KEPT if attributes.get(key)]
        if hooks:
            raise TypeError(f"{path} is a module with {hooks[0]} set, which the Flower adapter cannot carry")
        own = {key: item for key, item in attributes.items() if key not in _MODULE_INTERNALS or key == "training"}
        return {"module": cls_name, "attributes": inner(own, path),
                "parameters": inner(dict(value._parameters), f"{path}.parameters"),
                "buffers": inner(dict(value._buffers), f"{path}.buffers"),
                "non_persistent": sorted(value._non_persistent_buffers_set),
                "modules": inner(dict(value._modules), path)}
    return {"object": cls_name,
            "attributes": {key: inner(item, f"{path}.{key}") for key, item in attributes.items()}}


def _decode(layout: Any, tensors: Mapping[str, Tensor], references: dict[str, Any]) -> Any:
    if layout is None or isinstance(layout, (bool, int, float, str)):
        return layout
    if "reference" in layout:
        if layout["reference"] not in references:
            raise KeyError(f"the receiver holds no {layout['reference']!r} to stand for the sender's")
        return references[layout["reference"]]

    def inner(item: Any) -> Any:
        return _decode(item, tensors, references)

    if "float" in layout:
        return float(layout["float"])
    if "tensor" in layout:
        tensor = tensors[layout["tensor"]]
        if layout["device"] != "cpu" and torch.device(layout["device"]).type == "cuda" and torch.cuda.is_available():
            tensor = tensor.to(layout["device"])
        if layout["parameter"]:
            return torch.nn.Parameter(tensor, requires_grad=layout["grad"])
        return tensor.requires_grad_(layout["grad"])
    if "numpy" in layout:
        array = tensors[layout["numpy"]].numpy()
        return array[()] if layout["scalar"] else array
    if "dtype" in layout:
        return getattr(torch, layout["dtype"])
    if "device" in layout:
        return torch.device(layout["device"])
    if "size" in layout:
        return torch.Size(layout["size"])
    for kind, build in (("list", list), ("tuple", tuple), ("set", set), ("frozenset", frozenset)):
        if kind in layout:
            return build(inner(item) for item in layout[kind])
    if "dict" in layout:
        pairs = [(inner(key), inner(item)) for key, item in layout["dict"]]
        return collections.OrderedDict(pairs) if layout["ordered"] else dict(pairs)
    if "partial" in layout:
        return functools.partial(inner(layout["partial"]), *inner(layout["args"]),
                                 **inner(layout["keywords"]))
    if "named" in layout:
        return _resolve(layout["named"])
    if "module" in layout:
        cls = _resolve(layout["module"])
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ValueError(f"{layout['module']} is not a torch module class")
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        vars(module).update(inner(layout["attributes"]))
        module._parameters.update(inner(layout["parameters"]))
        module._buffers.update(inner(layout["buffers"]))
        module._non_persistent_buffers_set.update(layout["non_persistent"])
        module._modules.update(inner(layout["modules"]))
        return module
    if "object" in layout:
        cls = _resolve(layout["object"])
        if not isinstance(cls, type):
            raise ValueError(f"{layout['object']} is not a class")
        instance = cls.__new__(cls)
        vars(instance).update({key: inner(item) for key, item in layout["attributes"].items()})
        return instance
    raise ValueError(f"a layout entry of no known kind: {sorted(layout)}")
