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

:class:`HyperFloRA` runs this in the simulator, with the descriptor of
:func:`mean_feature_descriptor`. Taught in ``book/part3/hypernetwork.ipynb``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.strategy import ClientStart, LocalResult, Payload, ServerState, Strategy, Upload, split_factors
from fedlora_edu.foundations.training import trim_batch


def with_descriptor_once(payload: Payload, client_state: Any, descriptor_bytes: int) -> Payload:
    """``payload`` with a client's data descriptor counted on its first upload only.

    ``client_state`` has a ``sent_descriptor`` flag, set here: a client computes its descriptor
    once and sends it once (HyperFloRA, CE-LoRA), so later uploads carry only the payload.
    """
    if client_state.sent_descriptor:
        return payload
    client_state.sent_descriptor = True
    return Payload(payload.tensors, payload.nbytes + descriptor_bytes)


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


@torch.no_grad()
def mean_feature_descriptor(model: nn.Module, data: Any, batch_size: int = 64) -> Tensor:
    """r_k: the mean of the frozen encoder's sentence features over a client's examples (our choice).

    ``model`` is a mean-pooling classifier with LoRA whose B is zero (so its features are the
    pre-trained encoder's) and ``data`` a client's examples (``ClientData``, cached frozen
    layers used where it carries them). The result is a vector of the encoder's width, computed
    on the client; only this vector leaves it.
    """
    if len(data) == 0:
        raise ValueError("a client with no examples has no descriptor")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = None
    for start in range(0, len(data), batch_size):
        batch = trim_batch(data.subset(list(range(start, min(start + batch_size, len(data))))), device)
        features = model.pooled(batch["input_ids"], batch["attention_mask"], batch.get("hidden_states"))
        part = features.double().sum(dim=0).cpu()
        total = part if total is None else total + part
    model.train(was_training)
    return (total / len(data)).float()


class HyperFloRA(Strategy):
    """HyperFloRA (Lu et al. 2024, SDM): a server hypernetwork h(psi; r_k) generates client k's adapter (eq. 15).

    Before round 1 every client computes its descriptor r_k (:func:`mean_feature_descriptor`)
    and the server builds a :class:`LoRAHypernetwork` over the model's adapted layers. Each
    round, client k downloads h(psi; r_k) (A and B), trains both, and uploads them; for each
    upload the server takes one step of :func:`hypernetwork_update` with Adam at
    ``server_learning_rate``. Client k's model is h(psi; r_k) (:meth:`personal_model`), for any
    client with a descriptor, whether it trained or not: ``held_out`` clients are never sampled
    and are served from their descriptor alone, like clients that join after training
    (:meth:`generate` serves any descriptor).

    Our choices where the paper's details are unknown (see the module docstring): the
    descriptor, pFedHN's update, Adam on the server, and the server's own adapter, which the
    shared test set evaluates: h(psi; mean of the descriptors of all clients). The descriptor
    of each client is counted in the bytes of its first upload (it is sent once, before its
    first download). The head, when it trains, is averaged as FedAvg does.
    """

    name = "HyperFloRA"
    paper = "Lu et al. 2024, SDM (HyperFloRA); the update of pFedHN, Shamsian et al. 2021, ICML"
    chapter = "book/part3/hypernetwork"

    @dataclass
    class State:
        """The hypernetwork, its optimiser, every client's descriptor, and the server's step sizes per round."""

        hypernetwork: LoRAHypernetwork | None = None
        optimizer: torch.optim.Optimizer | None = None
        descriptors: dict[int, Tensor] = field(default_factory=dict)
        moved: list[float] = field(default_factory=list)

    @dataclass
    class ClientState:
        """Whether the client has sent its descriptor yet."""

        sent_descriptor: bool = False

    def __init__(self, *, hidden: int = 64, server_learning_rate: float = 1e-3,
                 held_out: Sequence[int] = ()) -> None:
        super().__init__(None)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        if not (isinstance(server_learning_rate, (int, float)) and server_learning_rate > 0):
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate!r}")
        self.hidden = hidden
        self.server_learning_rate = float(server_learning_rate)
        self.held_out = sorted({int(k) for k in held_out})
        self.descriptor_bytes = 0  # set by prepare

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        if len(self.held_out) >= federation.num_clients or any(not 0 <= k < federation.num_clients
                                                                for k in self.held_out):
            raise ValueError(f"held_out {self.held_out} must name some, not all, of the "
                             f"{federation.num_clients} clients")
        state = server.method_state
        state.descriptors = {k: mean_feature_descriptor(model, data) for k, data in enumerate(federation.clients)}
        shapes = {name: (b.shape[0], a.shape[1]) for name, (a, b) in server.adapters.items()}
        size = next(iter(state.descriptors.values())).numel()
        self.descriptor_bytes = 4 * size  # one float32 vector per client
        state.hypernetwork = LoRAHypernetwork(size, shapes, server.rank, hidden=self.hidden, seed=seed).double()
        state.optimizer = torch.optim.Adam(state.hypernetwork.parameters(), lr=self.server_learning_rate)
        server.adapters = self._server_adapter(server)

    def sample_clients(self, round_index: int, num_clients: int, clients_per_round: int,
                       rng: np.random.Generator) -> list[int]:
        """Uniform sampling among the clients that are not held out."""
        pool = [k for k in range(num_clients) if k not in self.held_out]
        return sorted(rng.choice(pool, size=min(clients_per_round, len(pool)), replace=False).tolist())

    def generate(self, server: ServerState, descriptor: Tensor) -> dict[str, Factors]:
        """h(psi; descriptor): the adapter the hypernetwork gives a client with this descriptor."""
        hypernetwork = server.method_state.hypernetwork
        if hypernetwork is None:
            raise ValueError("the hypernetwork does not exist before prepare (run the strategy in a federation)")
        with torch.no_grad():
            generated = hypernetwork(descriptor.double())
        return {name: (a.to(server.adapters[name][0]), b.to(server.adapters[name][1]))
                for name, (a, b) in generated.items()}

    def _server_adapter(self, server: ServerState) -> dict[str, Factors]:
        descriptors = server.method_state.descriptors
        return self.generate(server, torch.stack(list(descriptors.values())).mean(dim=0))

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        adapters = self.generate(server, server.method_state.descriptors[client_id])
        tensors = {f"{name}.A": a for name, (a, _) in adapters.items()}
        tensors.update({f"{name}.B": b for name, (_, b) in adapters.items()})
        tensors.update({f"head.{key}": value for key, value in server.head.items()})
        return ClientStart(adapters, {key: value.clone() for key, value in server.head.items()}, Payload(tensors))

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        payload = super().client_upload(result, client_state, round_index)
        return with_descriptor_once(payload, client_state, self.descriptor_bytes)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        state = server.method_state
        names = list(server.adapters)
        moved = []
        for upload in uploads:
            a, b = split_factors(upload.payload, names)
            trained = {name: (a[name], b[name]) for name in names}
            moved.append(hypernetwork_update(state.hypernetwork, state.optimizer,
                                             state.descriptors[upload.client_id].double(), trained))
        state.moved.append(float(np.mean(moved)))
        server.adapters = self._server_adapter(server)
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]]:
        """h(psi; r_k), for every client with a descriptor (trained or held out), and the server's head."""
        return (self.generate(server, server.method_state.descriptors[client_id]),
                {key: value.clone() for key, value in server.head.items()})
