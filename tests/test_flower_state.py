"""A client's state on Flower: kept in the SuperNode's context bit for bit, and which methods the adapter runs.

In-process and quick (no deployment): the round trip of a client state through a Flower RecordDict
(what ``Context.state`` is), and :func:`check_supported`'s answer for every registered method. That
a deployment really keeps the state between rounds is tests/test_flower_deployment.py's FedSA-LoRA
run. Skipped only when Flower (the ``flower`` extra) is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")

from flwr.app import RecordDict  # noqa: E402

from fedlora_edu.flower.apps import (  # noqa: E402
    CLIENT_STATE_METHODS,
    check_supported,
    keeps_client_state,
    load_client_state,
    save_client_state,
)
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

    def new_client_state(self):
        return Everything()


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


def test_a_field_the_context_cannot_hold_is_named():
    @dataclass
    class Odd:
        pairs: list | None = None

    with pytest.raises(TypeError, match=r"Odd\.pairs holds a list"):
        save_client_state(Odd(pairs=[1, 2]), RecordDict())


def test_fedsa_lora_and_every_stateless_method_are_accepted_the_others_are_refused_by_name():
    refused = []
    for name in METHODS:
        strategy = make_strategy(name)
        if not keeps_client_state(strategy) or name in CLIENT_STATE_METHODS:
            check_supported(strategy)
            continue
        with pytest.raises(ValueError, match="keeps per-client state") as error:
            check_supported(strategy)
        assert str(error.value).startswith(f"strategy {name} "), error.value
        assert "FedSA-LoRA" in str(error.value)  # says which stateful methods do run
        refused.append(name)
    assert "FedSA-LoRA" in CLIENT_STATE_METHODS and keeps_client_state(make_strategy("FedSA-LoRA"))
    assert refused, "some registered methods keep client state the adapter does not run yet"
    print(f"refused on Flower: {refused}")
