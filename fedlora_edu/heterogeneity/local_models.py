"""A personal full-parameter model beside a shared LoRA adapter (survey eq. 13): pFedLoRA.

In pFedLoRA (Yi, Yu, Wang, Liu, Li 2023, arXiv 2310.13283) each client owns a full local model of
its own, never shared, and all clients share a small homogeneous adapter, aggregated by FedAvg;
training alternates between the two ("iterative training"): the local model with the adapter
frozen, then the adapter with the local model frozen. Survey eq. 13 with theta the shared adapter
and theta_k the client's own full parameters.

On one pre-trained foundation model the client's "full local model" is the model with a dense,
full-rank update D_k of every adapted layer: W' + D_k + (alpha / r) B A. The simulator serves a
client a set of LoRA factors (:meth:`PFedLoRA.personal_model`), so D_k is held *exactly* as
``width`` further LoRA components whose A is the identity: a model of rank R = r + width computes
(alpha / R)([B', B_p][A; I]) x = (alpha / r) B A x + D_k x with B' = (R / r) B and B_p = (R / alpha) D_k.
:class:`_Blocks` trains each block at its own scale, so the shared adapter learns exactly as a
rank-r adapter would and D_k as dense weights would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import ClientStart, LocalResult, Payload, ServerState, Strategy, Upload, collect_factors
from fedlora_edu.foundations.training import local_train


class _Blocks(nn.Module):
    """The parametrisation of a stacked factor: its first ``rank`` components (the shared adapter) times
    ``shared_scale``, the rest (the personal block) times ``personal_scale``; a block that does not train
    this phase is detached. ``dim`` is the components' dimension (0 for A, 1 for B)."""

    def __init__(self, rank: int, dim: int, shared_scale: float, personal_scale: float,
                 train_shared: bool, train_personal: bool) -> None:
        super().__init__()
        self.rank, self.dim = rank, dim
        self.shared_scale, self.personal_scale = shared_scale, personal_scale
        self.train_shared, self.train_personal = train_shared, train_personal

    def forward(self, X: Tensor) -> Tensor:
        shared, personal = X.split([self.rank, X.shape[self.dim] - self.rank], dim=self.dim)
        shared = shared if self.train_shared else shared.detach()
        personal = personal if self.train_personal else personal.detach()
        return torch.cat([shared * self.shared_scale, personal * self.personal_scale], dim=self.dim)

    def stored(self, effective: Tensor) -> Tensor:
        """The stored values whose forward is ``effective``: each block divided by its scale."""
        shared, personal = effective.split([self.rank, effective.shape[self.dim] - self.rank], dim=self.dim)
        return torch.cat([shared / self.shared_scale, personal / self.personal_scale], dim=self.dim)


class PFedLoRA(Strategy):
    """pFedLoRA (Yi et al. 2023, arXiv 2310.13283): a shared LoRA adapter, a personal full-parameter model.

    Every client of a round runs two phases (the paper's iterative training):

    1. its *local model* trains with the shared adapter frozen: the dense update D_k of every adapted
       layer (its full parameters), started at zero and kept by the client from round to round;
    2. the *shared adapter* trains with the local model frozen, from the server's adapter, as plain
       rank-r LoRA on top of W' + D_k; the client uploads it (A and B, as FedIT does).

    The server averages the uploaded adapters with the clients' weights p_k (FedAvg, as the paper
    states), A and B each. D_k never leaves the client: the bytes are FedIT's at rank r. Client k's
    model (:meth:`personal_model`) is W' + D_k + (alpha / r) B A with the server's adapter; the
    server's own model (the shared test set) is W' + (alpha / r) B A.

    The paper's setting is model-heterogeneous: each client's local model may be a different
    network (CNNs there), and only the adapter's shape is common. Our choices, on one pre-trained
    model: the local model is the pre-trained one with a full-rank update of every adapted layer
    (held exactly as ``width`` identity-A components of a rank-(r + width) LoRA layer, see the
    module docstring; ``width`` must be the adapted layers' input size, 384 for the embedded
    MiniLM, checked); phase 1 takes ``local_steps`` steps (the profile's by default) at
    ``local_learning_rate`` (default: the profile's rate / 100, as dense weights take far smaller
    steps than LoRA factors), the head frozen; phase 2 is the simulator's local training; the
    model is built at rank r + ``width`` (``PFedLoRA(rank=r)``).
    """

    name = "pFedLoRA"
    paper = "Yi et al. 2023, arXiv 2310.13283"
    chapter = "book/part3/personalized"
    batched_training = False

    @dataclass
    class ClientState:
        """The client's id, its local model's dense updates D_k by layer (None before its first round), the loss."""

        client_id: int | None = None
        personal: dict[str, Tensor] | None = None
        personal_loss: float | None = None

    def __init__(self, rank: int | None = None, *, width: int = 384, local_steps: int | None = None,
                 local_learning_rate: float | None = None) -> None:
        super().__init__(rank)
        for label, value in (("width", width), ("local_steps", local_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if local_learning_rate is not None and not local_learning_rate > 0:
            raise ValueError(f"local_learning_rate must be > 0, got {local_learning_rate!r}")
        self.width = width
        self.local_steps = local_steps
        self.local_learning_rate = local_learning_rate
        self._clients: Any = None
        self._phase1: dict[str, Any] = {}

    def max_rank(self, num_clients: int) -> int | None:
        return None if self.rank is None else self.rank + self.width

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return server.rank - self.width

    def init_server(self, server: ServerState, seed: int) -> None:
        r = server.rank - self.width
        if r < 1:
            raise ValueError(f"pFedLoRA's model rank {server.rank} leaves no room for an adapter beside width="
                             f"{self.width} personal components: build it with PFedLoRA(rank=r)")
        server.adapters = {name: self._stacked((a[:r], b[:, :r]), None) for name, (a, b) in server.adapters.items()}

    def _stacked(self, shared: Factors, dense: Tensor | None, scaling: float | None = None) -> Factors:
        """[A; I], [B, B_p] in the model's units: B_p = D_k / s (s the layer's scaling), zero without D_k."""
        a, b = shared
        n = a.shape[1]
        if n != self.width:
            raise ValueError(f"pFedLoRA's width={self.width} must be the adapted layers' input size, here {n}")
        personal = torch.zeros(b.shape[0], n, dtype=b.dtype, device=b.device) if dense is None \
            else dense.to(b) / scaling
        return (torch.cat([a, torch.eye(n, dtype=a.dtype, device=a.device)], dim=0), torch.cat([b, personal], dim=1))

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        profile = federation.profile
        self._clients = federation.clients
        self._phase1 = {"steps": self.local_steps or profile.local_steps, "batch_size": profile.batch_size,
                        "learning_rate": self.local_learning_rate or profile.learning_rate / 100,
                        "device": federation.device, "seed": seed}

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        """The default download (the shared adapter, rank r, and the head); the client adds its own D_k."""
        client_state.client_id = client_id
        start = super().client_start(server, client_id, client_state, round_index)
        personal = client_state.personal or {}
        start.adapters = {name: self._stacked(factors, personal.get(name), server.scaling)
                          for name, factors in start.adapters.items()}
        return start

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Phase 1, the local model (D_k) with the adapter frozen; then phase 2, the adapter, runs inside."""
        if self._clients is None:
            raise ValueError("pFedLoRA needs prepare (run it in a federation): its first phase trains on the "
                             "client's data")
        layers = adapter_io.lora_layers(model)
        R = next(iter(start.adapters.values()))[0].shape[0]
        r = R - self.width
        modules = {(name, side): getattr(layer, f"lora_{side}")[adapter_io.ADAPTER]
                   for name, layer in layers.items() for side in "AB"}
        scaling = {name: layer.scaling[adapter_io.ADAPTER] for name, layer in layers.items()}
        training = [parameter for parameter in model.parameters() if parameter.requires_grad]

        def parametrise(train_shared: bool, train_personal: bool) -> None:
            for (name, side), module in modules.items():
                blocks = _Blocks(r, 0 if side == "A" else 1, 1.0 if side == "A" else R / r,
                                 1.0 if side == "A" else 1.0 / scaling[name], train_shared,
                                 train_personal and side == "B")
                effective = module.weight.detach().clone()
                parametrize.register_parametrization(module, "weight", blocks)
                with torch.no_grad():
                    module.parametrizations.weight.original.copy_(blocks.stored(effective))
                module.parametrizations.weight.original.requires_grad_(True)

        def unparametrise() -> None:
            for module in modules.values():
                if parametrize.is_parametrized(module, "weight"):
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

        k = client_state.client_id
        try:
            for parameter in training:  # phase 1: D_k only, not the head, not the shared adapter
                parameter.requires_grad_(False)
            parametrise(train_shared=False, train_personal=True)
            settings = self._phase1
            client_state.personal_loss = local_train(
                model, self._clients[k], steps=settings["steps"], batch_size=settings["batch_size"],
                learning_rate=settings["learning_rate"], device=settings["device"],
                seed=derive_seed(settings["seed"], "pFedLoRA local model batches", round_index, k))
            client_state.personal = {
                name: modules[(name, "B")].parametrizations.weight.original[:, r:].detach().clone()
                for name in layers}  # D_k itself: the personal block's stored values are in weight units
            unparametrise()
            for parameter in training:  # phase 2: the adapter (and a head that trains), D_k frozen
                parameter.requires_grad_(True)
            parametrise(train_shared=True, train_personal=False)
            with warnings.catch_warnings():  # the simulator's loop reads .grad of the (non-leaf) parametrised weights
                warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
                yield
        finally:
            unparametrise()
            for parameter in training:
                parameter.requires_grad_(True)

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The shared adapter only (its first r components) and the head: D_k stays on the client."""
        r = result.rank - self.width
        shared = {name: (a[:r], b[:, :r]) for name, (a, b) in result.adapters.items()}
        return super().client_upload(dataclasses.replace(result, adapters=shared, rank=r), client_state, round_index)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads)  # the shared adapters, zero-padded to the model's rank
        r = server.rank - self.width
        server.adapters = {name: self._stacked(fedit_average([a[:r] for a in a_list], [b[:, :r] for b in b_list],
                                                             weights), None)
                           for name, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """W' + D_k + (alpha / r) B A: the server's adapter with the client's dense updates; None before it has them."""
        if client_state.personal is None:
            return None
        r = server.rank - self.width
        return ({name: self._stacked((a[:r], b[:, :r]), client_state.personal[name], server.scaling)
                 for name, (a, b) in server.adapters.items()},
                {key: value.clone() for key, value in server.head.items()})
