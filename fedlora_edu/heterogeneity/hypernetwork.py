"""Hypernetwork (survey section 4.2, eq. 15): a server network that maps a client's descriptor to its adapter.

HyperFloRA (Lu et al. 2024, SDM) gives each client k a vector r_k computed from its local data
and trains, on the server, a hypernetwork psi whose output h(psi; r_k) is client k's LoRA
adapter: min_psi sum_k p_k f_k(h(psi; r_k); D_k) (eq. 15). A client that never trains still gets
an adapter, from its descriptor alone.

We could not find the paper's text or code (``METHOD_SOURCES.md``), so every detail below is
our choice, taken from the hypernetwork method this family builds on, pFedHN (Shamsian, Navon,
Fetaya, Chechik 2021, ICML):

- the descriptor r_k is given (a chapter uses the mean of the client's frozen sentence
  features); :class:`LoRAHypernetwork` maps it through a small trunk to one (A, B) per layer, A
  r x n and B m x r, the B heads starting at zero so that every generated adapter starts with
  B = 0, as LoRA does;
- after client k trains from h(psi; r_k) and returns theta_k, the server moves psi along
  -(d theta / d psi)^T (theta_start - theta_k) (:func:`hypernetwork_update`): the
  chain rule applied to the client's own update, as pFedHN does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedlora_edu.core.adapters import Factors


class LoRAHypernetwork(nn.Module):
    """h(psi; r): a descriptor of size ``descriptor_size`` to one LoRA adapter (A r x n, B m x r) per layer.

    ``shapes`` maps each adapted layer's name to its (m, n). A trunk of ``hidden`` units (one
    hidden layer, ReLU) feeds one linear head per layer and factor. A's heads start at peft's
    scale for A (their bias uniform in +-1/sqrt(n), their weights small), B's heads at exactly
    zero, so a fresh hypernetwork gives every client B = 0 and the pre-trained model.
    """

    def __init__(self, descriptor_size: int, shapes: Mapping[str, tuple[int, int]], rank: int, *,
                 hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        for value, name in ((descriptor_size, "descriptor_size"), (rank, "rank"), (hidden, "hidden")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not shapes:
            raise ValueError("shapes is empty: name at least one adapted layer and its (m, n)")
        generator = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.shapes = {name: (int(m), int(n)) for name, (m, n) in shapes.items()}
        self.trunk = nn.Sequential(nn.Linear(descriptor_size, hidden), nn.ReLU())
        self.a_heads = nn.ModuleDict()
        self.b_heads = nn.ModuleDict()
        self._keys = {name: f"layer{i}" for i, name in enumerate(self.shapes)}  # ModuleDict keys cannot hold dots
        with torch.no_grad():
            for layer in self.trunk:
                if isinstance(layer, nn.Linear):
                    layer.weight.uniform_(-descriptor_size ** -0.5, descriptor_size ** -0.5, generator=generator)
                    layer.bias.zero_()
            for name, (m, n) in self.shapes.items():
                a_head = nn.Linear(hidden, rank * n)
                a_head.weight.uniform_(-(n * hidden) ** -0.5, (n * hidden) ** -0.5, generator=generator)
                a_head.bias.uniform_(-n ** -0.5, n ** -0.5, generator=generator)
                b_head = nn.Linear(hidden, m * rank)
                b_head.weight.zero_()
                b_head.bias.zero_()
                self.a_heads[self._keys[name]] = a_head
                self.b_heads[self._keys[name]] = b_head

    def forward(self, descriptor: Tensor) -> dict[str, Factors]:
        """The adapter h(psi; r) of one descriptor (a vector): {layer: (A, B)}."""
        if descriptor.ndim != 1:
            raise ValueError(f"descriptor must be a vector, got shape {tuple(descriptor.shape)}")
        features = self.trunk(descriptor.to(self.trunk[0].weight.dtype))
        out = {}
        for name, (m, n) in self.shapes.items():
            key = self._keys[name]
            out[name] = (self.a_heads[key](features).reshape(self.rank, n),
                         self.b_heads[key](features).reshape(m, self.rank))
        return out


def hypernetwork_update(hypernetwork: LoRAHypernetwork, optimizer: torch.optim.Optimizer, descriptor: Tensor,
                        trained: Mapping[str, Factors]) -> float:
    """One server step for one client: psi moves along -(d theta / d psi)^T (theta_start - theta_k).

    ``trained`` is the client's adapter after local training, started from
    ``hypernetwork(descriptor)``. The surrogate loss sum <theta(psi), stopgrad(theta_start -
    theta_k)> has exactly that gradient (pFedHN's update); ``optimizer`` (over the hypernetwork's
    parameters) takes the step. Returns the size of the client's change, ||theta_start - theta_k||.
    """
    optimizer.zero_grad()
    generated = hypernetwork(descriptor)
    if set(generated) != set(trained):
        raise ValueError(f"trained adapts layers {sorted(trained)}, the hypernetwork {sorted(generated)}")
    surrogate = torch.zeros((), dtype=hypernetwork.trunk[0].weight.dtype)
    moved = 0.0
    for name, (a, b) in generated.items():
        a_k, b_k = trained[name]
        delta_a = (a - a_k.to(a)).detach()
        delta_b = (b - b_k.to(b)).detach()
        surrogate = surrogate + (a * delta_a).sum() + (b * delta_b).sum()
        moved += float(delta_a.square().sum() + delta_b.square().sum())
    surrogate.backward()
    optimizer.step()
    return moved ** 0.5
