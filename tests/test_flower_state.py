"""A client's state on Flower: carried bit for bit, where it lives, and which methods the adapter runs.

In-process and quick (no deployment): the round trip of a client state through a Flower RecordDict
(what ``Context.state`` is) and of any value a strategy keeps through
:func:`~fedlora_edu.flower.records.encode_value`, and :func:`check_supported`'s and
:func:`state_placement`'s answer for every registered method. That every method's history equals
the simulator's through Flower's messages is tests/test_flower_every_method.py (split learning's,
run_split's: tests/test_flower_split.py); that a
deployment keeps the state between rounds, tests/test_flower_deployment.py. Skipped only when
Flower (the ``flower`` extra) is not installed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")

from flwr.app import RecordDict  # noqa: E402

from fedlora_edu.flower import records  # noqa: E402
from fedlora_edu.flower.apps import (  # noqa: E402
    CLIENT_STATE_METHODS,
    check_supported,
    keeps_client_state,
    load_client_state,
    save_client_state,
    state_placement,
)
from fedlora_edu.flower.records import decode_value, encode_value  # noqa: E402
from fedlora_edu.heterogeneity.experts import ExpertRouter, adaptive_top_m_gates  # noqa: E402
from fedlora_edu.registry import METHODS, make_strategy  # noqa: E402


@dataclass
class Everything:
    nothing: object = None
    count: int = 0
    weight: float = 0.0
    flag: bool = False
    label: str = ""
    matrix: torch.Tensor | None = None
    factors: dict | None = None


class Holding:
    """A stand-in strategy whose client state is :class:`Everything`."""

    name = "Holding"

    def new_client_state(self):
        return Everything()


@pytest.fixture(autouse=True)
def trusted(monkeypatch):
    """This file's classes may be rebuilt by name, as the package's are (``records.TRUSTED_MODULES``)."""
    monkeypatch.setattr(records, "TRUSTED_MODULES", (*records.TRUSTED_MODULES, __name__))


def test_a_client_state_survives_the_context_bit_for_bit():
    torch.manual_seed(0)
    state = Everything(None, 3, 0.1 + 0.2, True, "b", torch.randn(3, 4),
                       {"layer.0": torch.randn(5, 2), "layer.1": torch.randn(2, 5).double()})
    records = RecordDict()
    save_client_state(state, records)
    back = load_client_state(Holding(), records)
    assert (back.nothing, back.count, back.weight, back.flag, back.label) == (None, 3, 0.1 + 0.2, True, "b")
    assert torch.equal(back.matrix, state.matrix) and back.matrix.dtype == state.matrix.dtype
    assert back.factors.keys() == state.factors.keys()
    for name, value in state.factors.items():
        assert torch.equal(back.factors[name], value) and back.factors[name].dtype == value.dtype
    # Saved again with a field emptied: the old tensors must not come back.
    back.matrix, back.factors = None, {"layer.0": torch.zeros(1)}
    save_client_state(back, records)
    again = load_client_state(Holding(), records)
    assert again.matrix is None and list(again.factors) == ["layer.0"]


def test_a_context_without_a_state_gives_a_fresh_one():
    fresh = load_client_state(Holding(), RecordDict())
    assert fresh == Everything()


@dataclass
class Nested:
    inner: Everything = field(default_factory=Everything)
    pairs: dict = field(default_factory=dict)


def test_any_value_a_strategy_keeps_crosses_bit_for_bit():
    """Nested dataclasses, factor tuples, tuple keys, a module with a partial, NumPy values and NaN; references."""
    torch.manual_seed(0)
    router = ExpertRouter(torch.randn(3, 5), functools.partial(adaptive_top_m_gates, own=1, num_experts=2), 4)
    shared = [torch.ones(2)]
    value = Nested(Everything(count=2, weight=math.nan, factors={"l": torch.randn(2, 3)}),
                   {("layer", "A"): (torch.randn(2, 2), torch.randn(2, 1).double()), 3: router, "np": np.arange(3),
                    "scalar": np.float32(0.5), "inf": -math.inf, "set": {2, 1}, "data": shared,
                    "dtype": torch.float16, "device": torch.device("cpu"), "size": torch.Size([2, 3])})
    tensors, layout = encode_value(value, "Nested", {id(shared): "shared"})
    mine = [torch.zeros(1)]
    back = decode_value({k: v.clone() for k, v in tensors.items()}, layout, {"shared": mine})
    assert type(back) is Nested and type(back.inner) is Everything and back.inner.count == 2
    assert math.isnan(back.inner.weight) and torch.equal(back.inner.factors["l"], value.inner.factors["l"])
    a, b = back.pairs[("layer", "A")]
    assert torch.equal(a, value.pairs[("layer", "A")][0]) and b.dtype == torch.float64
    assert torch.equal(b, value.pairs[("layer", "A")][1])
    copy = back.pairs[3]
    assert type(copy) is ExpertRouter and copy.slots == 4 and copy.training == router.training
    assert isinstance(copy.weight, torch.nn.Parameter) and torch.equal(copy.weight, router.weight)
    x = torch.randn(7, 5)
    assert torch.equal(copy.gates(copy.logits(x)), router.gates(router.logits(x)))  # the partial came back
    assert np.array_equal(back.pairs["np"], np.arange(3)) and back.pairs["scalar"] == np.float32(0.5)
    assert back.pairs["inf"] == -math.inf and back.pairs["set"] == {1, 2}
    assert back.pairs["data"] is mine  # the receiver's own object, not a copy of the sender's
    assert (back.pairs["dtype"], back.pairs["device"], back.pairs["size"]) == (
        torch.float16, torch.device("cpu"), torch.Size([2, 3]))
    with pytest.raises(KeyError, match="shared"):
        decode_value(tensors, layout)


def test_a_value_that_cannot_cross_is_named_where_it_sits():
    @dataclass
    class Odd:  # defined in a function: it cannot be found again by its name
        pairs: list | None = None

    with pytest.raises(TypeError, match=r"Everything\.nothing\[1\] holds a object"):
        save_client_state(Everything(nothing=[1, object()]), RecordDict())
    with pytest.raises(TypeError, match=r"^Odd holds a Odd"):
        save_client_state(Odd(), RecordDict())
    with pytest.raises(TypeError, match=r"value\['rule'\] holds <function"):
        encode_value({"rule": lambda x: x})
    stored = RecordDict()
    save_client_state(Everything(count=1), stored)
    with pytest.raises(TypeError):
        save_client_state(Everything(nothing=object()), stored)
    assert load_client_state(Holding(), stored).count == 1  # a failed save leaves the stored state as it was


def test_every_method_is_accepted_and_split_learning_refuses_only_client_evaluation():
    refused = []
    for name in METHODS:
        strategy = make_strategy(name)
        check_supported(strategy)
        try:
            check_supported(strategy, evaluate_clients=True)
        except ValueError as error:
            assert str(error).startswith(f"strategy {name} is split learning"), error
            refused.append(name)
            continue
        placement = state_placement(strategy)
        assert placement == ("none" if not keeps_client_state(strategy)
                             else "supernode" if name in CLIENT_STATE_METHODS else "server"), (name, placement)
    assert refused == ["SplitFedLoRA", "SplitLoRA"]
    for name in CLIENT_STATE_METHODS:  # each names a registered method that keeps client state
        assert name in METHODS and keeps_client_state(make_strategy(name)), name
    counts = {p: sum(state_placement(make_strategy(n)) == p for n in METHODS) for p in ("none", "supernode", "server")}
    print(f"client state on Flower: {counts}")
    assert counts["supernode"] >= 2 and counts["server"] >= 1


def test_a_placement_that_depends_on_the_settings():
    """DP-FedAvg keeps its state where the method it wraps does; HAFL's truncation needs the server's ranking."""
    from fedlora_edu.efficiency.privacy import DPFedAvg

    assert state_placement(DPFedAvg()) == "supernode"  # around FedIT
    assert state_placement(DPFedAvg(make_strategy("FLoRA"))) == "server"
    assert state_placement(make_strategy("HAFL")) == "supernode"  # the freezing scheme, the registered default
    assert state_placement(make_strategy("HAFL", scheme="truncation")) == "server"
