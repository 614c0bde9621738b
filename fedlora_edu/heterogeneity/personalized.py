"""Personalized LoRA (survey section 4.2, eq. 13): a shared part every client learns from, a personal part it keeps.

The survey's Dual-LoRA family learns, for each client k, a global model theta shared by all and
a personal theta_k fitted to the client's own data (eq. 13). The methods differ in what is
shared and what stays. :class:`FedSALoRA` splits one LoRA adapter: A, which its authors find
to learn what the clients have in common, is shared; B, which learns what is client-specific,
never leaves the client. Taught, and measured client by client, in ``book/part3/personalized.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.factors import average_tensors
from fedlora_edu.core.strategy import (
    ClientStart,
    LocalResult,
    Payload,
    ServerState,
    Strategy,
    Upload,
    normalized_weights,
)


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
