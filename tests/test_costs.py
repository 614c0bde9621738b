"""The one cost-accounting path (efficiency/costs.py): compute, memory and bytes of a client's round, for any method."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY
from torch import nn

from fedlora_edu import make_strategy
from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.efficiency.costs import (
    OPTIMIZER_STATES,
    _Tally,
    client_costs,
    costs_by_rank,
    ranks_within_memory,
)
from fedlora_edu.foundations.lora import lora_parameter_count


@pytest.fixture(scope="module")
def costs(shards_federation):
    return {name: client_costs(shards_federation, make_strategy(name, **options))
            for name, options in (("FedIT", {}), ("FFA-LoRA", {}), ("FedSA-LoRA", {}), ("CE-LoRA", {}),
                                  ("FedDPA", {"rank": TINY.rank // 2}))}


def test_trainable_numbers_and_weights_are_what_the_model_holds(shards_federation, costs):
    model = shards_federation.fresh_model()
    layers = adapter_io.lora_layers(model)
    lora = sum(lora_parameter_count(lay.lora_B[adapter_io.ADAPTER].weight.shape[0],
                                    lay.lora_A[adapter_io.ADAPTER].weight.shape[1], TINY.rank)
               for lay in layers.values())
    head = sum(t.numel() for t in adapter_io.get_head_state(model).values())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fedit = costs["FedIT"]
    assert fedit.trainable_parameters == lora + head and fedit.weight_bytes == weights
    assert fedit.trainable_bytes == 4 * fedit.trainable_parameters  # float32
    assert fedit.optimizer_bytes == (1 + OPTIMIZER_STATES) * fedit.trainable_bytes
    assert fedit.peak_bytes == fedit.weight_bytes + fedit.optimizer_bytes + fedit.activation_bytes
    # FFA-LoRA freezes A: only B (m x r per layer) and the head train
    b_only = sum(lay.lora_B[adapter_io.ADAPTER].weight.numel() for lay in layers.values())
    assert costs["FFA-LoRA"].trainable_parameters == b_only + head
    # CE-LoRA trains one r x r matrix C per layer besides A and B, and holds it as a weight
    extra = len(layers) * TINY.rank ** 2
    assert costs["CE-LoRA"].trainable_parameters == fedit.trainable_parameters + extra
    assert costs["CE-LoRA"].weight_bytes == fedit.weight_bytes + 4 * extra


def test_compute_follows_what_each_method_trains(costs):
    fedit, ffa, dpa = costs["FedIT"], costs["FFA-LoRA"], costs["FedDPA"]
    assert fedit.flops > 0 and fedit.flops_per_step == fedit.flops / fedit.steps
    assert ffa.flops < fedit.flops  # no gradient for A: the backward pass skips dL/dA
    assert costs["FedSA-LoRA"].flops == fedit.flops  # the same training, a different upload
    # FedDPA from round 2: a first phase for the local adapter, then the global one: about twice FedIT's compute
    assert dpa.flops > 1.8 * fedit.flops


def test_bytes_are_the_simulators_count_of_the_payloads(shards_federation, costs):
    fedit, fedsa = costs["FedIT"], costs["FedSA-LoRA"]
    assert fedit.bytes_up == fedit.trainable_bytes  # FedIT sends everything that trained: A, B and the head
    layers = adapter_io.lora_layers(shards_federation.fresh_model())
    b_bytes = 4 * sum(lay.lora_B[adapter_io.ADAPTER].weight.numel() for lay in layers.values())
    assert fedsa.bytes_up == fedit.bytes_up - b_bytes  # FedSA-LoRA keeps B
    assert costs["CE-LoRA"].bytes_up < fedit.bytes_up / 10  # r x r matrices (and a descriptor once)


def test_activations_are_the_tensors_saved_for_backward_weights_excluded():
    layer = nn.Linear(10, 5)
    x = torch.randn(3, 10)
    tally = _Tally()
    tally.weight_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda tensor: tensor):
        tally.new_forward()
        layer(x).sum().backward()  # the weight's gradient needs x, saved: 3 x 10 float32; the weight is not counted
    assert tally.activation_bytes == 3 * 10 * 4
    with torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda tensor: tensor):
        tally.new_forward()
        torch.relu(layer(torch.randn(2, 10))).sum().backward()  # a smaller batch, then relu's output too
    assert tally.activation_bytes == 3 * 10 * 4  # the peak over forward passes, not their sum


def test_client_costs_checks_its_arguments_and_leaves_the_strategy_alone(shards_federation):
    strategy = make_strategy("FedIT")
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="rounds"):
            client_costs(shards_federation, strategy, rounds=bad)
    with pytest.raises(ValueError, match="clients_per_round"):
        client_costs(shards_federation, strategy, clients_per_round=2)
    client_costs(shards_federation, strategy, rounds=1, local_steps=1)
    assert type(strategy).__name__ == "FedIT"


def test_a_client_below_the_models_rank_trains_its_own_rank_and_costs_about_the_same(shards_federation, costs):
    """FSLoRA's sketches of half the rank train in the rank-R model with the other components at zero: they are
    counted as rank r/2 trainables, like FedIT at half the rank on the same batches, and the FLOPs the simulator
    ran differ from that run's by well under 1% (the frozen model's arithmetic dominates)."""
    half = TINY.rank // 2
    sketched = client_costs(shards_federation, make_strategy("FSLoRA", sketch=half / TINY.rank))
    small = client_costs(shards_federation, make_strategy("FedIT", rank=half))
    assert sketched.trainable_parameters == small.trainable_parameters < costs["FedIT"].trainable_parameters
    assert sketched.flops == costs["FedIT"].flops  # what ran: the rank-R model
    assert 0 < sketched.flops - small.flops < 0.01 * small.flops


def test_a_local_step_needs_more_memory_at_a_higher_rank_by_what_the_factors_and_their_activations_add(
        shards_federation):
    peaks = {rank: cost.peak_bytes for rank, cost in costs_by_rank(shards_federation, [2, 1, TINY.rank, 1]).items()}
    assert list(peaks) == [1, 2, TINY.rank] and peaks[1] < peaks[2] < peaks[TINY.rank]
    one = client_costs(shards_federation, make_strategy("FedIT", rank=1), rounds=1)
    two = client_costs(shards_federation, make_strategy("FedIT", rank=2), rounds=1)
    layers = adapter_io.lora_layers(shards_federation.fresh_model(rank=1))
    per_rank = sum(lay.lora_B[adapter_io.ADAPTER].weight.shape[0] + lay.lora_A[adapter_io.ADAPTER].weight.shape[1]
                   for lay in layers.values())  # m + n numbers per layer for each rank
    # one more rank: m + n more numbers per layer, each held as a weight, a gradient and two moments
    assert two.weight_bytes - one.weight_bytes == 4 * per_rank
    assert two.optimizer_bytes - one.optimizer_bytes == 4 * (1 + OPTIMIZER_STATES) * per_rank
    assert two.activation_bytes > one.activation_bytes  # x A^T (r numbers per token and layer) is saved too
    assert peaks[1] == one.peak_bytes and peaks[2] == two.peak_bytes
    with pytest.raises(ValueError, match="ranks must be integers >= 1"):
        costs_by_rank(shards_federation, [0, 2])


def test_each_client_gets_the_largest_rank_its_memory_holds_and_none_below_the_smallest():
    peaks = {1: 100, 2: 150, 4: 250, 8: 450}
    assert ranks_within_memory([99, 100, 149, 150, 449, 450, 10**6], peaks) == [0, 1, 1, 2, 4, 8, 8]
    assert ranks_within_memory([], peaks) == []
    with pytest.raises(ValueError, match="budgets must be integers >= 0"):
        ranks_within_memory([-1], peaks)
    with pytest.raises(ValueError, match="peak_by_rank must hold"):
        ranks_within_memory([10], {})
