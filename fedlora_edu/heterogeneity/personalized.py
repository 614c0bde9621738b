"""Personalized LoRA (survey section 4.2, eq. 13): a shared part every client learns from, a personal part it keeps.

The survey's Dual-LoRA family learns, for each client k, a global model theta shared by all and
a personal theta_k fitted to the client's own data (eq. 13). The methods differ in what is
shared and what stays. :class:`FedSALoRA` splits one LoRA adapter: A, which its authors find
to learn what the clients have in common, is shared; B, which learns what is client-specific,
never leaves the client. :class:`FedDPA` gives every client two adapters, a global one it shares
and a local one it keeps, mixed in its model; :class:`FDLoRA` synchronises the two every few rounds
and searches each client's mixing weight on its own data. :class:`CELoRA` factors the adapter in
three, B C A, keeps A and B on the client and shares only the small r x r matrix C, which the
server averages for each client with weights of its own (a personalised aggregation). Taught, and
measured client by client, in ``book/part3/personalized.ipynb`` (FedSA-LoRA, CE-LoRA) and
``book/part3/dual_adapters.ipynb`` (FedDPA, FDLoRA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.factors import average_tensors
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    normalized_weights,
)
from fedlora_edu.foundations.training import BatchSampler, local_train, trim_batch
from fedlora_edu.heterogeneity.hypernetwork import mean_feature_descriptor, with_descriptor_once


class FedSALoRA(Strategy):
    """FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): A shared, B personal.

    Every client trains both factors of its LoRA layers each round, from the global A and its
    *own* B (survey notation: A is r x n, B is m x r). It uploads A only; the server averages
    the uploaded A's with the clients' weights, A = sum_k p_k A_k (p_k = n_k / sum_j n_j over the
    round's clients), and sends that A back. B_k lives in the client's state and is never sent,
    so every client keeps a B of its own. Client k's model is W' + s B_k A.

    As the authors' code does it (Pengxin-Guo/FedSA-LoRA, commit fc276b5e, FederatedScope-LLM:
    ``personalization.local_param: ['lora_B']`` in ``federatedscope/llm/yamls/fedsa-lora.yaml``;
    the trainer uploads every parameter not matching it): peft's initialisation (A random,
    B = 0), both factors trained, A averaged with sample-size weights. Two choices are ours.
    (1) A separate B for every client: the authors' simulation runs with
    ``federate.share_local_model: True``, under which FederatedScope's simulated clients share
    one model object, so a client starts from the B the previously trained client left; a
    client of a real federation keeps its own, and so do ours. (2) The task head is shared and
    averaged, as in the authors' language-model configuration (their GLUE configuration keeps
    the classifier personal too); on the book's testbed the head is the frozen probe, so the
    choice does not arise there.

    What "the global model" is: the server holds the averaged A and the initial B (zero), so
    its model, W' + s 0 A, is the pre-trained one (on the testbed, the probe): FedSA-LoRA
    serves each client its personal model (:meth:`personal_model`), and only a client's own
    held-out data measures it.
    """

    name = "FedSA-LoRA"
    paper = "Guo et al. 2025, ICLR, arXiv 2410.01463"
    chapter = "book/part3/personalized"

    @dataclass
    class ClientState:
        """The client's own B of every adapted layer; None until its first round (it starts from the server's B)."""

        B: dict[str, Tensor] | None = None

    def _own(self, server: ServerState, client_state: Any) -> dict[str, Factors]:
        """The global A with the client's own B (the server's initial B before its first round)."""
        if client_state.B is None:
            return {name: (a.clone(), b.clone()) for name, (a, b) in server.adapters.items()}
        return {name: (a.clone(), client_state.B[name].to(b)) for name, (a, b) in server.adapters.items()}

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        start.adapters = self._own(server, client_state)
        tensors = {f"{name}.A": a for name, (a, _) in start.adapters.items()}
        tensors.update({f"head.{key}": value for key, value in server.head.items()})
        start.download = Payload(tensors)  # A and the head: B is already on the client
        return start

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        client_state.B = {name: b.detach().clone() for name, (_, b) in result.adapters.items()}
        tensors = {f"{name}.A": a for name, (a, _) in result.adapters.items()}
        tensors.update({f"head.{key}": value for key, value in result.head.items()})
        return Payload(tensors)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights = normalized_weights(uploads)
        server.adapters = {
            name: (average_tensors([u.payload.tensors[f"{name}.A"].to(a) for u in uploads], weights), b)
            for name, (a, b) in server.adapters.items()
        }
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """Client k's model: the global A with its own B (None, the global model, before it ever trained)."""
        if client_state.B is None:
            return None
        return self._own(server, client_state), {key: value.clone() for key, value in server.head.items()}


def similarity_weights(data_similarity: Tensor, parameter_similarity: Tensor, sizes: Tensor, *,
                       temperature: float, data_share: float) -> Tensor:
    """CE-LoRA's personalised aggregation weights w_ij (row i: the weights client i's C-bar takes).

    s_ij = data_share * data_similarity_ij + (1 - data_share) * parameter_similarity_ij and
    w_ij = p_j exp(s_ij / temperature) / sum_l p_l exp(s_il / temperature), with p_j = n_j / sum_l n_l.
    Each row sums to one. As the temperature grows every row tends to (p_j), FedAvg's weights;
    as it shrinks each row concentrates on the clients most similar to i (i itself, when its
    similarity to itself is the largest, as a cosine's is). The form is our choice: the paper
    says its server weighs clients by similarity in data and in parameter space and learns the
    weights, not how (``METHOD_SOURCES.md``).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= data_share <= 1.0:
        raise ValueError(f"data_share must be in [0, 1], got {data_share!r}")
    if data_similarity.shape != parameter_similarity.shape or data_similarity.shape != (len(sizes), len(sizes)):
        raise ValueError(f"similarities {tuple(data_similarity.shape)} and {tuple(parameter_similarity.shape)} "
                         f"must both be {len(sizes)} x {len(sizes)}, one row and column per client")
    if (sizes <= 0).any():
        raise ValueError("every client's size n_j must be > 0")
    combined = data_share * data_similarity + (1.0 - data_share) * parameter_similarity
    logits = combined.double() / temperature + torch.log(sizes.double() / sizes.double().sum())
    return torch.softmax(logits, dim=1)


def cosine_matrix(vectors: Tensor) -> Tensor:
    """Pairwise cosine similarities of the rows of ``vectors`` (a row of zeros is similar to nothing but itself)."""
    norms = vectors.double().norm(dim=1, keepdim=True)
    unit = vectors.double() / norms.clamp_min(torch.finfo(torch.float64).tiny)
    cosines = unit @ unit.T
    cosines.fill_diagonal_(1.0)
    return cosines


class _MixedA(nn.Module):
    """The parametrisation A -> C A of a LoRA layer's A: the layer computes B C A, and C trains."""

    def __init__(self, C: Tensor) -> None:
        super().__init__()
        self.C = nn.Parameter(C.detach().clone())

    def forward(self, A: Tensor) -> Tensor:
        return self.C @ A


class CELoRA(Strategy):
    """CE-LoRA (Li et al. 2025, arXiv 2503.23869): tri-matrix LoRA B C A, only C shared, aggregated per client.

    Client i's adapted layers compute W' + s B_i C_i A_i, with A_i (r x n) and B_i (m x r) as in
    LoRA and C_i a dense r x r matrix. As in the paper's Algorithm 1: each round the client trains
    A_i, C_i and B_i on its data from C-bar_i^{t-1}, the server's personalised aggregate for it
    (line 4), sends C_i only (line 5), keeps A_i and B_i for its next round (line 6); the server
    computes one C-bar_i per client from the C's it received (line 9). A round's upload is r^2
    numbers per layer instead of LoRA's r (m + n).

    Our choices, where the survey, the slides and the abstract leave the paper's details open
    (no code was found; ``METHOD_SOURCES.md``):

    - Start: every client starts from the server's A (random, the same for all, as a shared seed
      would give) and B = 0, and C = I, so that B C A = B A is LoRA's start. Those first A, B are
      downloaded once, in the client's first round (counted); after that a download is C-bar_i
      and the head.
    - Personalised aggregation (:func:`similarity_weights`): C-bar_i = sum_j w_ij C_j over every
      client the server has a C from (its latest), with w_ij = p_j exp(s_ij / temperature),
      normalised, and s_ij the mix (``data_share``) of two cosines: of the clients' data
      descriptors (:func:`~fedlora_edu.heterogeneity.hypernetwork.mean_feature_descriptor`, the
      mean frozen sentence feature, computed on the client and sent once with its first upload,
      counted) and of what the clients learned in C (C_j - I, all layers concatenated). The paper
      learns its weights; ours are fixed by the two similarities. ``temperature`` large makes
      C-bar FedAvg's weighted mean of the C's; small, each client's own C.
    - With partial participation a client absent this round is given its C-bar when next
      sampled, from the C's the server then holds.
    - The head is shared and averaged as FedIT's is (on the book's testbed it is the frozen probe).

    Client i's model (:meth:`personal_model`) is W' + s B_i C-bar_i A_i, what it would train from
    next, or its own C_i before the server has a C-bar for it. The server's own model is the
    starting one (B = 0): like FedSA-LoRA, CE-LoRA serves each client its personal model.
    """

    name = "CE-LoRA"
    paper = "Li et al. 2025, arXiv 2503.23869"
    chapter = "book/part3/personalized"

    @dataclass
    class State:
        """Each client's latest C and data descriptor, and the C-bar the server computed for it."""

        C: dict[int, dict[str, Tensor]] = field(default_factory=dict)
        sizes: dict[int, int] = field(default_factory=dict)
        descriptors: dict[int, Tensor] = field(default_factory=dict)
        C_bar: dict[int, dict[str, Tensor]] = field(default_factory=dict)
        weights: list[dict[int, dict[int, float]]] = field(default_factory=list)

    @dataclass
    class ClientState:
        """The client's own A and B (None before its first round), its latest C, and the C it trains from."""

        A: dict[str, Tensor] | None = None
        B: dict[str, Tensor] | None = None
        C: dict[str, Tensor] | None = None
        C_start: dict[str, Tensor] | None = None
        trained_C: dict[str, Tensor] | None = None
        sent_descriptor: bool = False

    def __init__(self, rank: int | None = None, *, temperature: float = 0.1, data_share: float = 0.5) -> None:
        super().__init__(rank)
        similarity_weights(torch.eye(1), torch.eye(1), torch.ones(1), temperature=temperature,
                           data_share=data_share)  # the same checks, before any run
        self.temperature = float(temperature)
        self.data_share = float(data_share)
        self.descriptor_bytes = 0  # set by prepare

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        state = server.method_state
        state.descriptors = {k: mean_feature_descriptor(model, data) for k, data in enumerate(federation.clients)}
        self.descriptor_bytes = 4 * next(iter(state.descriptors.values())).numel()  # one float32 vector

    def _identity(self, server: ServerState) -> dict[str, Tensor]:
        return {name: torch.eye(a.shape[0], dtype=a.dtype, device=a.device) for name, (a, _) in server.adapters.items()}

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        first = client_state.A is None
        if first:
            adapters = {name: (a.clone(), b.clone()) for name, (a, b) in server.adapters.items()}
        else:
            adapters = {name: (client_state.A[name].clone(), client_state.B[name].clone()) for name in server.adapters}
        C_bar = server.method_state.C_bar.get(client_id)
        client_state.C_start = ({name: c.clone() for name, c in C_bar.items()} if C_bar is not None
                                else client_state.C or self._identity(server))
        tensors = {f"{name}.C": c for name, c in client_state.C_start.items()} if C_bar is not None else {}
        if first:
            tensors.update({f"{name}.A": a for name, (a, _) in adapters.items()})
            tensors.update({f"{name}.B": b for name, (_, b) in adapters.items()})
        tensors.update({f"head.{key}": value for key, value in server.head.items()})
        return ClientStart(adapters, {key: value.clone() for key, value in server.head.items()}, Payload(tensors),
                           self.trainable(round_index))

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Train A, C and B: every layer's A is parametrised as C A with C a trainable r x r matrix.

        On a normal exit the client keeps its trained A (the stored A, not C A) and C; on any
        exit the parametrisations are removed and each layer's A holds the stored value again.
        """
        if client_state.C_start is None:
            raise ValueError("CE-LoRA's local training needs client_start first (the C it trains from)")
        modules = {name: layer.lora_A[adapter_io.ADAPTER] for name, layer in adapter_io.lora_layers(model).items()}
        mixers: dict[str, _MixedA] = {}
        try:
            for name, module in modules.items():
                mixers[name] = _MixedA(client_state.C_start[name].to(module.weight))
                parametrize.register_parametrization(module, "weight", mixers[name])
            yield
            client_state.trained_C = {name: mixer.C.detach().clone() for name, mixer in mixers.items()}
            client_state.A = {name: modules[name].parametrizations.weight.original.detach().clone()
                              for name in mixers}
        finally:
            for name in mixers:
                parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        trained, client_state.trained_C = client_state.trained_C, None
        if trained is None:
            raise ValueError("CE-LoRA's client trained outside local_training: no C to send")
        client_state.C = trained
        client_state.B = {name: b.detach().clone() for name, (_, b) in result.adapters.items()}
        tensors = {f"{name}.C": c for name, c in trained.items()}
        tensors.update({f"head.{key}": value for key, value in result.head.items()})
        return with_descriptor_once(Payload(tensors), client_state, self.descriptor_bytes)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        state = server.method_state
        names = list(server.adapters)
        for upload in uploads:
            missing = [name for name in names if f"{name}.C" not in upload.payload.tensors]
            if missing:
                raise ValueError(f"client {upload.client_id}'s upload carries no C for {missing[0]}")
            state.C[upload.client_id] = {name: upload.payload.tensors[f"{name}.C"].detach().clone() for name in names}
            state.sizes[upload.client_id] = upload.num_examples
        clients = sorted(state.C)
        if not state.descriptors:
            raise ValueError("CE-LoRA has no data descriptors: prepare was not called (run it in a federation)")
        descriptors = torch.stack([state.descriptors[k] for k in clients])
        learned = torch.stack([torch.cat([(state.C[k][name] - torch.eye(state.C[k][name].shape[0]).to(
            state.C[k][name])).flatten() for name in names]) for k in clients])
        weights = similarity_weights(cosine_matrix(descriptors), cosine_matrix(learned),
                                     torch.tensor([state.sizes[k] for k in clients], dtype=torch.float64),
                                     temperature=self.temperature, data_share=self.data_share)
        state.C_bar = {
            i: {name: average_tensors([state.C[j][name] for j in clients], weights[row].tolist()) for name in names}
            for row, i in enumerate(clients)}
        state.weights.append({i: {j: float(weights[row, col]) for col, j in enumerate(clients)}
                              for row, i in enumerate(clients)})
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """B_i C-bar_i A_i (its own C_i before the server has a C-bar for it); None before it ever trained."""
        if client_state.A is None or client_state.C is None:
            return None
        C = server.method_state.C_bar.get(client_id, client_state.C)
        adapters = {name: ((C[name].to(a) @ client_state.A[name].to(a)), client_state.B[name].to(b))
                    for name, (a, b) in server.adapters.items()}
        return adapters, {key: value.clone() for key, value in server.head.items()}


class _Phase1Mix(nn.Module):
    """FedDPA's first phase as a parametrisation of a stacked factor: the global half frozen and weighted.

    The layer holds the global adapter in components 0..r-1 and the local one in r..2r-1. For A,
    ``forward`` returns [A_g (no gradient); A_l]; for B, [w_g B_g (no gradient), w_l B_l]. Only the
    local half receives gradients (FedDPA's stop-gradient on the global adapter).
    """

    def __init__(self, rank: int, side: str, global_weight: float = 1.0, local_weight: float = 1.0) -> None:
        super().__init__()
        self.rank, self.side = rank, side
        self.global_weight, self.local_weight = global_weight, local_weight

    def forward(self, X: Tensor) -> Tensor:
        r = self.rank
        if self.side == "A":
            return torch.cat([X[:r].detach(), X[r:]], dim=0)
        return torch.cat([self.global_weight * X[:, :r].detach(), self.local_weight * X[:, r:]], dim=1)


class FedDPA(Strategy):
    """FedDPA (Yang et al., NeurIPS 2024, arXiv 2403.19211): a global and a local adapter per client.

    Survey eq. 13 with theta the global LoRA adapter (A_g, B_g), shared and averaged, and theta_k a
    local adapter (A_l, B_l) of the same rank r that never leaves client k. As the authors' code runs
    FedDPA-T (Lydia-yang/FedDPA, commit cf638c11, ``--local_model True``):

    - round 1 trains the global adapter only;
    - from round 2, a sampled client first trains its local adapter with the global one frozen, in
      the mixture y = W'x + a s B_l A_l x + (1 - a) s B_g A_g x (a = ``local_weight``, 0.5 in the
      code; s = alpha / r); the local adapter starts fresh (A_l random, B_l = 0) the first time and
      is resumed afterwards; then it trains the global adapter alone, as plain LoRA from the
      server's, and uploads it;
    - the server averages the uploaded global adapters with *uniform* weights, as the code does
      (its data-size weighting is commented out).

    Client k's model (:meth:`personal_model`) is the mixture above with its own local adapter.

    Our choices. (1) The first phase takes as many steps, with the same batch size and learning
    rate, as the second, taken from the federation's profile (``local_steps``/``learning_rate``
    override them); ``federation.run(local_steps=...)`` sets the second phase only. (2) The
    authors' inference weights each test input by its similarity to the client's training inputs
    (``--auto``); the simulator scores one model per client, so the mixture keeps the training
    weight a. (3) The two adapters live in one LoRA layer of rank 2r (components 0..r-1 global,
    r..2r-1 local), so the model is built with rank 2 ``rank`` (``FedDPA(rank=r)``; with
    ``rank=None`` each adapter gets half of the model's rank). At that layer's scaling
    alpha / (2r), the stacked factors [A_g; A_l], [2(1 - a) B_g, 2a B_l] compute the mixture
    exactly; the global adapter trains alone at alpha / r (the layer's scaling doubled during
    that phase), and the server keeps it twice, [A_g; A_g], [B_g, B_g], so that its own model,
    scored on the shared test set, is W' + (alpha / r) B_g A_g. The simulator's discordance
    columns are computed at the layer's scaling, half the global adapter's.
    """

    name = "FedDPA"
    paper = "Yang et al. 2024, NeurIPS, arXiv 2403.19211"
    chapter = "book/part3/dual_adapters"
    batched_training = False

    @dataclass
    class ClientState:
        """The client's id, its local adapter (None before its first local phase) and that phase's loss."""

        client_id: int | None = None
        local: dict[str, Factors] | None = None
        local_loss: float | None = None

    def __init__(self, rank: int | None = None, *, local_weight: float = 0.5, local_steps: int | None = None,
                 learning_rate: float | None = None) -> None:
        super().__init__(rank)
        if isinstance(local_weight, bool) or not isinstance(local_weight, (int, float)) or not 0 < local_weight < 1:
            raise ValueError(f"local_weight must be a number strictly between 0 and 1, got {local_weight!r}")
        if local_steps is not None and (isinstance(local_steps, bool) or not isinstance(local_steps, int)
                                        or local_steps < 1):
            raise ValueError(f"local_steps must be an integer >= 1, got {local_steps!r}")
        if learning_rate is not None and not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        self.local_weight = float(local_weight)
        self.local_steps = local_steps
        self.learning_rate = learning_rate
        self._clients: Any = None
        self._phase1: dict[str, Any] = {}

    def max_rank(self, num_clients: int) -> int | None:
        return None if self.rank is None else 2 * self.rank

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return server.rank // 2

    def init_server(self, server: ServerState, seed: int) -> None:
        if server.rank % 2:
            raise ValueError(f"FedDPA stacks two adapters of equal rank in the model; its rank {server.rank} is odd")
        server.adapters = self._twice({name: (a[: server.rank // 2], b[:, : server.rank // 2])
                                       for name, (a, b) in server.adapters.items()})

    @staticmethod
    def _twice(global_adapter: dict[str, Factors]) -> dict[str, Factors]:
        return {name: (torch.cat([a, a], dim=0), torch.cat([b, b], dim=1)) for name, (a, b) in global_adapter.items()}

    def prepare(self, federation: Any, model: nn.Module, server: ServerState, seed: int) -> None:
        profile = federation.profile
        self._clients = federation.clients
        self._phase1 = {"steps": self.local_steps or profile.local_steps, "batch_size": profile.batch_size,
                        "learning_rate": self.learning_rate or profile.learning_rate, "device": federation.device,
                        "seed": seed}

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        """The default download (the global adapter, its first r components by :meth:`client_rank`), and the id."""
        client_state.client_id = client_id  # local_training's first phase trains on this client's data
        return super().client_start(server, client_id, client_state, round_index)

    def _fresh_local(self, global_adapter: dict[str, Factors], client_id: int) -> dict[str, Factors]:
        """A new local adapter: A_l uniform in +-1/sqrt(n) (peft's default for A), B_l = 0."""
        generator = torch.Generator().manual_seed(derive_seed(self._phase1["seed"], "FedDPA local adapter", client_id))
        fresh = {}
        for name, (a, b) in global_adapter.items():
            bound = a.shape[1] ** -0.5
            a_local = (torch.rand(a.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            fresh[name] = (a_local.to(a), torch.zeros_like(b))
        return fresh

    def local_start(self, client_state: Any, global_adapter: dict[str, Factors],
                    round_index: int) -> dict[str, Factors]:
        """Where the local adapter's training starts this round: a fresh one the first time, then the kept one."""
        if client_state.local is None:
            return self._fresh_local(global_adapter, client_state.client_id)
        return client_state.local

    def mixture(self, global_adapter: dict[str, Factors], local: dict[str, Factors],
                local_weight: float | None = None) -> dict[str, Factors]:
        """The stacked factors that compute (1 - a) s B_g A_g + a s B_l A_l at the rank-2r layer's scaling s / 2.

        a is ``local_weight``, the strategy's own (``self.local_weight``) unless given.
        """
        a = self.local_weight if local_weight is None else local_weight
        return {name: (torch.cat([a_g, local[name][0].to(a_g)], dim=0),
                       torch.cat([2 * (1 - a) * b_g, 2 * a * local[name][1].to(b_g)], dim=1))
                for name, (a_g, b_g) in global_adapter.items()}

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """Phase 1 (from round 2): the local adapter in the mixture, the global frozen; then phase 2 runs inside."""
        if self._clients is None:
            raise ValueError("FedDPA needs prepare (run it in a federation): "
                             "its first phase trains on the client's data")
        layers = adapter_io.lora_layers(model)
        r = next(iter(start.adapters.values()))[0].shape[0]
        scalings = {name: layer.scaling[adapter_io.ADAPTER] for name, layer in layers.items()}
        k = client_state.client_id
        try:
            if round_index > 0:
                local = self.local_start(client_state, start.adapters, round_index)
                stacked = {name: (torch.cat([a_g, local[name][0].to(a_g)], dim=0),
                                  torch.cat([b_g, local[name][1].to(b_g)], dim=1))
                           for name, (a_g, b_g) in start.adapters.items()}
                adapter_io.set_lora_factors(model, stacked)
                weights = {"global_weight": 2 * (1 - self.local_weight), "local_weight": 2 * self.local_weight}
                modules = {(name, side): getattr(layer, f"lora_{side}")[adapter_io.ADAPTER]
                           for name, layer in layers.items() for side in "AB"}
                training = [parameter for parameter in model.parameters() if parameter.requires_grad]
                try:
                    for parameter in training:  # the local adapter only: not the head, not the global adapter
                        parameter.requires_grad_(False)
                    for (_, side), module in modules.items():
                        parametrize.register_parametrization(
                            module, "weight", _Phase1Mix(r, side, **(weights if side == "B" else {})))
                        module.parametrizations.weight.original.requires_grad_(True)
                    settings = self._phase1
                    client_state.local_loss = local_train(
                        model, self._clients[k], steps=settings["steps"], batch_size=settings["batch_size"],
                        learning_rate=settings["learning_rate"], device=settings["device"],
                        seed=derive_seed(settings["seed"], "FedDPA local batches", round_index, k))
                    trained = {key: module.parametrizations.weight.original.detach().clone()
                               for key, module in modules.items()}
                finally:
                    for module in modules.values():
                        if parametrize.is_parametrized(module, "weight"):
                            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                    for parameter in training:
                        parameter.requires_grad_(True)
                client_state.local = {name: (trained[(name, "A")][r:].clone(), trained[(name, "B")][:, r:].clone())
                                      for name in layers}
                adapter_io.set_lora_factors(model, start.adapters)  # phase 2 starts from the server's global adapter
            for name, layer in layers.items():  # the global adapter alone, at alpha / r
                layer.scaling[adapter_io.ADAPTER] = 2 * scalings[name]
            yield
            for name, layer in layers.items():
                layer.scaling[adapter_io.ADAPTER] = scalings[name]
            self.after_local_training(model, start, client_state, round_index)
        finally:
            for name, layer in layers.items():
                layer.scaling[adapter_io.ADAPTER] = scalings[name]

    def after_local_training(self, model: nn.Module, start: ClientStart, client_state: Any,  # noqa: B027
                             round_index: int) -> None:
        """Client-side work after both phases (the trained global adapter in ``model``); none here (optional hook)."""

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        names = list(server.adapters)
        a_up, b_up = uniform_mean_factors(uploads, names)
        server.adapters = self._twice({name: (a_up[name].to(server.adapters[name][0]),
                                              b_up[name].to(server.adapters[name][1])) for name in names})
        self.aggregate_head(server, uploads)

    def personal_model(self, server: ServerState, client_id: int,
                       client_state: Any) -> tuple[dict[str, Factors], dict[str, Tensor]] | None:
        """The mixture of the server's global adapter and the client's local one; None before it has a local one."""
        if client_state.local is None:
            return None
        r = server.rank // 2
        global_adapter = {name: (a[:r], b[:, :r]) for name, (a, b) in server.adapters.items()}
        return (self.mixture(global_adapter, client_state.local, self.personal_weight(client_state)),
                {k: v.clone() for k, v in server.head.items()})

    def personal_weight(self, client_state: Any) -> float | None:
        """The weight a of client k's mixture: None, the strategy's ``local_weight``, for every client."""
        return None


def best_weight(weights: Sequence[float], loss: Callable[[float], float]) -> tuple[float, list[float]]:
    """Gradient-free search: the weight in ``weights`` of lowest ``loss`` (the first of equals), and all losses."""
    if not weights:
        raise ValueError("weights is empty: nothing to search")
    losses = [float(loss(w)) for w in weights]
    return float(weights[min(range(len(losses)), key=losses.__getitem__)]), losses


class FDLoRA(FedDPA):
    """FDLoRA (Qi et al. 2024, arXiv 2406.07925): dual LoRA, periodic synchronisation, adaptive fusion.

    Survey eq. 13 with theta a global LoRA adapter, shared and aggregated, and theta_k a personal
    adapter of the same rank that never leaves client k. What the survey and the abstract say
    (``METHOD_SOURCES.md``; no code was found): like FedDPA, two adapters per client and only the
    global one uploaded; unlike it, the personal adapter is *synchronised* with the global one
    every few rounds, and the two are merged by AdaFusion, a gradient-free search of the fusion
    weights on the client's own data.

    Built on :class:`FedDPA`'s two training phases (the personal adapter in the mixture with the
    global one frozen, then the global adapter alone) and its rank-2r layer. Our choices, where
    the paper's details are unknown:

    - Synchronisation: in every round ``t`` with ``t % sync_every == 0`` (t >= 1, 0-based), the
      personal adapter restarts its training from the global adapter the client downloaded
      (:meth:`local_start`), so it takes up what the federation learned and personalises it again.
    - AdaFusion: after both phases the client searches a in ``fusion_grid`` (0: the global adapter
      alone, 1: the personal one alone) for the mixture (1 - a) s B_g A_g + a s B_l A_l with the
      lowest loss on ``fusion_batches`` mini-batches of its *training* data (no gradient;
      :func:`best_weight`), with B_g A_g the global adapter it downloaded this round (the one it
      has just trained fits the same batches and would win the search for the wrong reason), and
      keeps it; its model (:meth:`personal_model`) is that mixture with
      the server's global adapter. Before its first search a client's weight is ``local_weight``.
    - Aggregation: the global adapters averaged with the clients' weights p_k (FedAvg's, the
      abstract states no other), A and B each, kept twice as FedDPA does.
    """

    name = "FDLoRA"
    paper = "Qi et al. 2024, arXiv 2406.07925"
    chapter = "book/part3/dual_adapters"

    @dataclass
    class ClientState(FedDPA.ClientState):
        """FedDPA's client state, with the fusion weight AdaFusion chose and the losses it compared."""

        fusion_weight: float | None = None
        fusion_losses: list[float] = field(default_factory=list)

    def __init__(self, rank: int | None = None, *, sync_every: int = 5,
                 fusion_grid: Sequence[float] = tuple(i / 10 for i in range(11)), fusion_batches: int = 2,
                 local_weight: float = 0.5, local_steps: int | None = None,
                 learning_rate: float | None = None) -> None:
        super().__init__(rank, local_weight=local_weight, local_steps=local_steps, learning_rate=learning_rate)
        for label, value in (("sync_every", sync_every), ("fusion_batches", fusion_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        grid = tuple(float(w) for w in fusion_grid)
        if not grid or not all(0.0 <= w <= 1.0 for w in grid):
            raise ValueError(f"fusion_grid must hold weights in [0, 1], got {fusion_grid!r}")
        self.sync_every = sync_every
        self.fusion_grid = grid
        self.fusion_batches = fusion_batches

    def synchronises(self, round_index: int) -> bool:
        """Whether the personal adapter restarts from the global one in round ``round_index`` (0-based)."""
        return round_index >= 1 and round_index % self.sync_every == 0

    def local_start(self, client_state: Any, global_adapter: dict[str, Factors],
                    round_index: int) -> dict[str, Factors]:
        """The global adapter on a synchronisation round, else FedDPA's start (fresh, then the kept one)."""
        if client_state.local is not None and self.synchronises(round_index):
            return {name: (a.clone(), b.clone()) for name, (a, b) in global_adapter.items()}
        return super().local_start(client_state, global_adapter, round_index)

    def after_local_training(self, model: nn.Module, start: ClientStart, client_state: Any, round_index: int) -> None:
        """AdaFusion: the fusion weight with the lowest loss on a few of the client's training batches.

        The mixture searched is of the new local adapter and the global adapter the client
        downloaded this round, the federation's, not the one it has just trained on the same data.
        """
        if client_state.local is None:  # round 1 trains the global adapter only: nothing to fuse yet
            return
        settings, k = self._phase1, client_state.client_id
        data = self._clients[k]
        rank = next(iter(start.adapters.values()))[0].shape[0]
        trained_global = adapter_io.get_lora_factors(model, rank=rank)
        sampler = BatchSampler(len(data), settings["batch_size"],
                               derive_seed(settings["seed"], "FDLoRA fusion batches", round_index, k))
        batches = [trim_batch(data.subset(sampler.next()), settings["device"]) for _ in range(self.fusion_batches)]

        @torch.no_grad()
        def loss(weight: float) -> float:
            adapter_io.set_lora_factors(model, self.mixture(start.adapters, client_state.local, weight))
            return sum(float(model(**batch).loss) for batch in batches) / len(batches)

        was_training = model.training
        model.eval()
        try:
            client_state.fusion_weight, client_state.fusion_losses = best_weight(self.fusion_grid, loss)
        finally:
            adapter_io.set_lora_factors(model, trained_global)
            model.train(was_training)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights = normalized_weights(uploads)
        merged = {}
        for name, (a, b) in server.adapters.items():
            merged[name] = (average_tensors([u.payload.tensors[f"{name}.A"].to(a) for u in uploads], weights),
                            average_tensors([u.payload.tensors[f"{name}.B"].to(b) for u in uploads], weights))
        server.adapters = self._twice(merged)
        self.aggregate_head(server, uploads)

    def personal_weight(self, client_state: Any) -> float | None:
        """The weight AdaFusion chose for the client (None before its first search: ``local_weight``)."""
        return client_state.fusion_weight


def uniform_mean_factors(uploads: list[Upload], names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plain (uniform) mean of the uploaded A's and B's of every layer, as FedDPA's server computes it."""
    if not uploads:
        raise ValueError("no uploads to average")
    weights = [1.0 / len(uploads)] * len(uploads)
    a_mean, b_mean = {}, {}
    for name in names:
        a_mean[name] = average_tensors([u.payload.tensors[f"{name}.A"] for u in uploads], weights)
        b_mean[name] = average_tensors([u.payload.tensors[f"{name}.B"] for u in uploads], weights)
    return a_mean, b_mean
