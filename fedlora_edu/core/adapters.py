"""Each adapted layer's LoRA factors (A, B) of a peft model, as plain tensors.

peft stores A (r x n) as ``lora_A[adapter].weight`` and B (m x r) as
``lora_B[adapter].weight``, the survey's notation exactly, and scales the product by
``alpha / r`` (survey eq. 2). The federated simulator moves adapters between the
server and the clients through these functions; the base weight W' is changed only
by methods that fold something into it (FLoRA's merge, FedEx-LoRA's residual).

Clients of different ranks share one peft model of the largest rank: a rank-r_k
adapter occupies the first r_k rows of A and columns of B, and the rest is zero.

Taught in ``book/part1/fedlora.ipynb``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Factors = tuple[Tensor, Tensor]
"""One layer's LoRA factors ``(A, B)``: A is r x n, B is m x r (survey eq. 2)."""

ADAPTER = "default"


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` by module name, in a fixed order."""
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if not layers:
        raise ValueError("model has no peft LoRA layers; wrap it with fedlora_edu.assets.models.add_lora first")
    return layers


def model_rank(model: nn.Module) -> int:
    """The rank r of the model's LoRA layers (the largest any client may use)."""
    first = next(iter(lora_layers(model).values()))
    return int(first.r[ADAPTER])


def lora_scaling(model: nn.Module) -> float:
    """The factor ``alpha / r`` that multiplies B A in every layer (survey eq. 2)."""
    scalings = {float(layer.scaling[ADAPTER]) for layer in lora_layers(model).values()}
    if len(scalings) != 1:
        raise ValueError(f"layers use different LoRA scalings {sorted(scalings)}; expected one")
    return scalings.pop()


def get_lora_factors(model: nn.Module, rank: int | None = None) -> dict[str, Factors]:
    """Copy every layer's ``(A, B)``, keeping the first ``rank`` components (default: all)."""
    out: dict[str, Factors] = {}
    for name, layer in lora_layers(model).items():
        a = layer.lora_A[ADAPTER].weight.detach()
        b = layer.lora_B[ADAPTER].weight.detach()
        r = a.shape[0] if rank is None else rank
        if r < 1 or r > a.shape[0]:
            raise ValueError(f"rank must be in 1..{a.shape[0]}, got {rank!r}")
        out[name] = (a[:r].clone(), b[:, :r].clone())
    return out


def set_lora_factors(model: nn.Module, factors: Mapping[str, Factors]) -> None:
    """Write ``(A, B)`` into every layer; a lower-rank adapter is zero-padded to the model's rank."""
    layers = lora_layers(model)
    missing = set(layers) - set(factors)
    extra = set(factors) - set(layers)
    if missing or extra:
        raise ValueError(f"factors do not match the model's LoRA layers: missing {sorted(missing)[:3]}, "
                         f"unknown {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            a_param = layer.lora_A[ADAPTER].weight
            b_param = layer.lora_B[ADAPTER].weight
            a, b = factors[name]
            r = a.shape[0]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != a_param.shape[1] or b.shape[0] != b_param.shape[0] \
                    or b.shape[1] != r or r > a_param.shape[0]:
                raise ValueError(
                    f"factors for {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a layer with "
                    f"A {tuple(a_param.shape)} (r x n) and B {tuple(b_param.shape)} (m x r)"
                )
            a_param.zero_()
            b_param.zero_()
            a_param[:r].copy_(a)
            b_param[:, :r].copy_(b)


def base_weight(model: nn.Module, name: str) -> Tensor:
    """The frozen pre-trained weight W' (m x n) of one adapted layer."""
    return lora_layers(model)[name].get_base_layer().weight


def add_to_base_weights(model: nn.Module, deltas: Mapping[str, Tensor]) -> None:
    """W' <- W' + delta for each named layer (FLoRA's merge, FedEx-LoRA's residual, eq. 7)."""
    layers = lora_layers(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in layers:
                raise ValueError(f"unknown LoRA layer name {name!r}")
            weight = layers[name].get_base_layer().weight
            if delta.shape != weight.shape:
                raise ValueError(f"delta for {name} has shape {tuple(delta.shape)}, W' has {tuple(weight.shape)}")
            weight.add_(delta.to(weight.device, weight.dtype))


def effective_weight(model: nn.Module, name: str) -> Tensor:
    """W = W' + (alpha / r) B A of one layer: the weight the model really applies (eq. 2)."""
    layer = lora_layers(model)[name]
    a = layer.lora_A[ADAPTER].weight
    b = layer.lora_B[ADAPTER].weight
    return (layer.get_base_layer().weight + float(layer.scaling[ADAPTER]) * b @ a).detach()


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters that are not LoRA factors: the task head."""
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if "lora_" not in name and parameter.requires_grad
    }


def get_head_state(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the head's parameters."""
    return {name: parameter.detach().clone() for name, parameter in head_parameters(model).items()}


def set_head_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Write the head's parameters."""
    parameters = head_parameters(model)
    if set(parameters) != set(state):
        raise ValueError(f"head state keys {sorted(state)} do not match the model's {sorted(parameters)}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])


def tensor_bytes(tensors: Mapping[str, Tensor] | list[Tensor]) -> int:
    """Bytes of dense tensors as sent over the wire (numel x element size)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return int(sum(t.numel() * t.element_size() for t in values))


def full_model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter of the base model: what full-model FedAvg sends each way."""
    return int(sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" not in name))
