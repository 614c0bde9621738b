"""Compressed learning (survey section 5.3): send a smaller encoding of the update, or estimate it without backprop.

Survey notation: a LoRA layer holds ``A`` (r x n) and ``B`` (m x r), ``dW = B A``, client k's
weight is p_k = n_k / sum_j n_j (eq. 1). Every method here except FwdLLM trains the adapter as
FedIT does and compresses the client's *change* of the round, ``(A_k - A, B_k - B)``; the server
decodes each change and adds the p_k-weighted mean to the global adapter. With nothing lost in
the encoding, that is FedIT's separate averaging (eq. 4): ``A + sum_k p_k (A_k - A) = sum_k p_k A_k``.
What each payload costs is the size of the tensors it really carries (packed integer codes,
values and indices, autoencoder codes), so the simulator's byte count is the serialized size.

- :class:`QuantizedUpdates`, a baseline: b-bit uniform quantization of each factor's change on a
  per-tensor grid between its minimum and maximum (two float32 numbers sent with it), with
  stochastic rounding so that the decoded change is unbiased, as QSGD's (Alistarh et al. 2017,
  arXiv 1610.02132, Lemma 3.1); the codes are bit-packed. Our choices: the min-max grid (QSGD
  scales by the norm and sends signs) and quantizing every factor separately.
- :class:`TopKUpdates`, a baseline: the k entries of largest magnitude over all factors' changes
  together (Aji and Heafield 2017, arXiv 1704.05021; one threshold for the model, as FLASC's
  upload in :mod:`fedlora_edu.efficiency.sparse`), sent as k float32 values and k int32 indices,
  optionally with the error feedback of Stich et al. 2018 (arXiv 1809.07599): what was not sent
  is added to the next round's change.
- :class:`CGFedLLM` (Wu et al. 2024, arXiv 2405.13746): an autoencoder compresses each client's
  update, the encoder on the client, the decoder on the server; it is first pre-trained on
  updates from several training steps (TGAP, "temporal-ensemble gradient-aware pre-training"),
  then used during federated fine-tuning (FAF). The paper's code was not available to us; what
  is trained where and when here is ours and said in the class's docstring.
- :class:`FwdLLM` (Xu et al. 2024, arXiv 2308.13894): no backpropagation. Each client estimates
  the gradient of its loss with respect to the adapter from pairs of perturbed forward passes,
  ``(f(x + h v) - f(x - h v)) / (2 h) * v`` with v ~ N(0, I) (the paper's forward gradient, the
  estimator of Baydin et al. 2022; we did not check its equation number in the paper), as a
  central difference with h = 0.01 as in the authors' code (UbiquitousLearning/FwdLLM@36ecdbc3,
  ``forward_training/utils/fwdgrad_utils.py::calculate_jvp``), and optionally draws its
  directions among more candidates, keeping those closest in cosine to the previous round's
  global gradient (the paper's discriminative perturbation sampling,
  ``tc_transformer_trainer_distribute.py``). The server averages the estimates and takes a
  gradient step (FedSGD, as in the authors' ``FedSgdAggregator``); optionally it first checks the
  estimates' variance and, while it is above a threshold, keeps them and waits for more (the
  paper's variance-controlled pacing, ``FedSgdAggregator.aggregate``'s ``var_threthod``).

Taught in ``book/part4/compression.ipynb``.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors
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
from fedlora_edu.core.threads import one_thread
from fedlora_edu.efficiency.sparse import top_k_mask

VALUE_BYTES = 4
INDEX_BYTES = 4


# ----- the change a client sends, flattened -----------------------------------------------------------------------
def flatten_factors(adapters: Mapping[str, Factors]) -> dict[str, Tensor]:
    """``{"<layer>.A": A, "<layer>.B": B}``: every factor under its own key, in layer order."""
    out = {}
    for name, (a, b) in adapters.items():
        out[f"{name}.A"], out[f"{name}.B"] = a, b
    return out


def _change(result: LocalResult, start: Mapping[str, Factors] | None) -> dict[str, Tensor]:
    """Per factor, trained minus start: what the client's round changed."""
    if start is None:
        raise ValueError(f"client {result.client_id} uploads without having started a round")
    return flatten_factors({name: (a - start[name][0].to(a), b - start[name][1].to(b))
                            for name, (a, b) in result.adapters.items()})


def _add_mean_change(server: ServerState, changes: list[Mapping[str, Tensor]], weights: list[float]) -> None:
    """The global factors plus the p_k-weighted mean of the decoded changes (FedIT's average when nothing is lost)."""
    adapters = {}
    for name, (a, b) in server.adapters.items():
        adapters[name] = (a + sum(p * change[f"{name}.A"].to(a) for p, change in zip(weights, changes, strict=True)),
                          b + sum(p * change[f"{name}.B"].to(b) for p, change in zip(weights, changes, strict=True)))
    server.adapters = adapters


def _head_tensors(head: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"head.{key}": value for key, value in head.items()}


class _ChangeUploads(Strategy):
    """FedIT's download and local training; the upload is an encoding of the change, which the server decodes.

    A subclass implements :meth:`encode` (client side) and :meth:`decode` (server side).
    """

    @dataclass
    class ClientState:
        """Where the client started its round, and the seed of the round's random choices."""

        start: dict[str, Factors] | None = None
        seed: int = 0
        residual: dict[str, Tensor] | None = None

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        client_state.start = {name: (a.clone(), b.clone()) for name, (a, b) in start.adapters.items()}
        client_state.seed = derive_seed(server.seed, f"{self.name} encoding", round_index, client_id)
        return start

    def encode(self, change: dict[str, Tensor], client_state: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, tensors: Mapping[str, Tensor], shapes: Mapping[str, torch.Size],
               server: ServerState) -> dict[str, Tensor]:
        raise NotImplementedError

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The encoded change of A and B, and the head (dense, when it trains)."""
        tensors = self.encode(_change(result, client_state.start), client_state)
        tensors.update(_head_tensors(result.head))
        return Payload(tensors)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Decode each client's change; add their p_k-weighted mean to the global A and B (eq. 4 on the changes)."""
        shapes = {key: value.shape for key, value in flatten_factors(server.adapters).items()}
        changes = [self.decode(upload.payload.tensors, shapes, server) for upload in uploads]
        _add_mean_change(server, changes, normalized_weights(uploads))
        self.aggregate_head(server, uploads)


# ----- quantization -----------------------------------------------------------------------------------------------
def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    return bits


def quantize(tensor: Tensor, bits: int, *, stochastic: bool = True,
             generator: torch.Generator | None = None) -> tuple[Tensor, float, float]:
    """b-bit uniform quantization on the grid ``low + step * {0, ..., 2^b - 1}`` spanning the tensor's range.

    Returns the integer codes (int64, the tensor's shape), ``low`` and ``step``. With
    ``stochastic`` a value between two grid points is rounded up with probability equal to its
    distance from the lower one, so that ``dequantize`` is unbiased (QSGD's stochastic rounding,
    Alistarh et al. 2017, Lemma 3.1) and off by less than one step; otherwise it is rounded to the
    nearest point (off by at most half a step, biased).
    """
    bits = _check_bits(bits)
    values = tensor.detach().double()  # float64 on the way, so that 16-bit grids are not blurred by float32 rounding
    low, high = float(values.min()), float(values.max())
    levels = 2 ** bits - 1
    step = (high - low) / levels
    if step == 0.0:  # a constant tensor: every code is 0 and low is exact
        return torch.zeros(values.shape, dtype=torch.int64), low, 0.0
    scaled = ((values - low) / step).clamp(0, levels)
    if stochastic:
        below = scaled.floor()
        up = torch.rand(scaled.shape, generator=generator) < (scaled - below)
        codes = below + up
    else:
        codes = scaled.round()
    return codes.clamp(0, levels).to(torch.int64), low, step


def dequantize(codes: Tensor, low: float, step: float) -> Tensor:
    """``low + step * codes``: the values the codes stand for (computed in float64, returned as float32)."""
    return (low + step * codes.double()).float()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """The codes' lowest ``bits`` bits, packed 8 to a byte: a uint8 tensor of ``ceil(numel * bits / 8)`` bytes."""
    bits = _check_bits(bits)
    flat = codes.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in 0..{2 ** bits - 1} to fit {bits} bits")
    planes = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # bit j of each code, lowest first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The inverse of :func:`pack_codes`: ``count`` codes of ``bits`` bits each (int64)."""
    bits = _check_bits(bits)
    planes = np.unpackbits(packed.cpu().numpy(), bitorder="little", count=count * bits).reshape(count, bits)
    return torch.from_numpy((planes.astype(np.int64) << np.arange(bits)).sum(axis=1))


class QuantizedUpdates(_ChangeUploads):
    """A baseline: each factor's change quantized to ``bits`` bits per entry on its own min-max grid.

    The payload carries, per factor, the packed codes (``ceil(numel * bits / 8)`` bytes) and
    ``low`` and ``step`` as two float32 numbers; the head, when it trains, dense. The server
    dequantizes and adds the p_k-weighted mean change. ``stochastic`` (default) rounds at random,
    unbiased (QSGD, Alistarh et al. 2017, arXiv 1610.02132); otherwise to the nearest grid point.
    See the module docstring for what is our choice.
    """

    name = "Quantized"
    paper = "Alistarh et al. 2017 (QSGD), arXiv 1610.02132"
    chapter = "book/part4/compression"

    def __init__(self, bits: int = 4, *, stochastic: bool = True) -> None:
        super().__init__(None)
        self.bits = _check_bits(bits)
        self.stochastic = bool(stochastic)

    def encode(self, change: dict[str, Tensor], client_state: Any) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(client_state.seed)
        tensors = {}
        for key, value in change.items():
            codes, low, step = quantize(value.cpu(), self.bits, stochastic=self.stochastic, generator=generator)
            tensors[f"{key}.codes"] = pack_codes(codes, self.bits)
            tensors[f"{key}.grid"] = torch.tensor([low, step], dtype=torch.float32)
        return tensors

    def decode(self, tensors: Mapping[str, Tensor], shapes: Mapping[str, torch.Size],
               server: ServerState) -> dict[str, Tensor]:
        out = {}
        for key, shape in shapes.items():
            low, step = (float(x) for x in tensors[f"{key}.grid"])
            codes = unpack_codes(tensors[f"{key}.codes"], self.bits, math.prod(shape))
            out[key] = dequantize(codes, low, step).reshape(shape)
        return out


# ----- top-k ------------------------------------------------------------------------------------------------------
def top_k_encode(tensors: Mapping[str, Tensor], density: float) -> tuple[Tensor, Tensor]:
    """The ``ceil(density * total)`` entries of largest magnitude over all ``tensors`` together.

    Returns their values (float32) and their positions in the tensors' concatenated flattening
    (int32): exactly k of each, what the payload carries. One threshold for every tensor, ties
    broken by position (:func:`fedlora_edu.efficiency.sparse.top_k_mask`).
    """
    masks = top_k_mask(tensors, density)
    flat = torch.cat([tensors[key].detach().reshape(-1).float().cpu() for key in tensors])
    keep = torch.cat([masks[key].reshape(-1).cpu() for key in tensors])
    indices = torch.nonzero(keep).reshape(-1)
    return flat[indices], indices.to(torch.int32)


def top_k_decode(values: Tensor, indices: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Dense tensors of ``shapes`` (in their order), zero except the sent entries."""
    total = sum(math.prod(shape) for shape in shapes.values())
    flat = torch.zeros(total)
    flat[indices.long()] = values.float()
    out, start = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape)
        out[key] = flat[start:start + size].reshape(shape)
        start += size
    return out


class TopKUpdates(_ChangeUploads):
    """A baseline: the top share ``density`` of all factors' change entries, by magnitude, as values and indices.

    The payload carries exactly k = ``ceil(density * total)`` float32 values and k int32
    indices (8 bytes per kept entry, whatever the density), and the head when it trains. With
    ``error_feedback`` the client keeps what it did not send and adds it to its next change
    (Stich et al. 2018, arXiv 1809.07599); a client's memory is kept across rounds by the
    simulator. See the module docstring for the sources.
    """

    name = "Top-k"
    paper = "Aji & Heafield 2017, arXiv 1704.05021"
    chapter = "book/part4/compression"

    def __init__(self, density: float = 0.1, *, error_feedback: bool = False) -> None:
        super().__init__(None)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        self.density = float(density)
        self.error_feedback = bool(error_feedback)

    def encode(self, change: dict[str, Tensor], client_state: Any) -> dict[str, Tensor]:
        if self.error_feedback and client_state.residual is not None:
            change = {key: value + client_state.residual[key].to(value) for key, value in change.items()}
        values, indices = top_k_encode(change, self.density)
        if self.error_feedback:
            sent = top_k_decode(values, indices, {key: value.shape for key, value in change.items()})
            client_state.residual = {key: (value.cpu() - sent[key]).detach() for key, value in change.items()}
        return {"values": values, "indices": indices}

    def decode(self, tensors: Mapping[str, Tensor], shapes: Mapping[str, torch.Size],
               server: ServerState) -> dict[str, Tensor]:
        return top_k_decode(tensors["values"], tensors["indices"], shapes)


# ----- CG-FedLLM: an autoencoder of updates ------------------------------------------------------------------------
class UpdateAutoencoder(nn.Module):
    """CG-FedLLM's autoencoder (Wu et al. 2024), applied to chunks of ``chunk`` consecutive entries of an update.

    The encoder (on the clients) maps a chunk to ``code`` numbers, the decoder (on the server)
    maps them back: a compression of ``chunk / code``. Our choice of architecture (the paper's
    is not known to us): one hidden layer of ``hidden`` units with tanh on each side.
    """

    def __init__(self, chunk: int = 64, code: int = 8, hidden: int = 64, *, seed: int = 0) -> None:
        super().__init__()
        for value, what in ((chunk, "chunk"), (code, "code"), (hidden, "hidden")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
        if code >= chunk:
            raise ValueError(f"code ({code}) must be smaller than chunk ({chunk}) to compress")
        self.chunk, self.code = chunk, code
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(chunk, hidden), nn.Tanh(), nn.Linear(hidden, code))
        self.decoder = nn.Sequential(nn.Linear(code, hidden), nn.Tanh(), nn.Linear(hidden, chunk))
        torch.random.set_rng_state(generator_state)

    def forward(self, chunks: Tensor) -> Tensor:
        return self.decoder(self.encoder(chunks))


def to_chunks(tensor: Tensor, chunk: int) -> tuple[Tensor, float]:
    """The tensor divided by its root mean square, flattened, zero-padded and cut into rows of ``chunk`` entries.

    Returns the rows and the scale (the RMS; 1 for a zero tensor), which is sent with the codes
    (our choice: the autoencoder sees updates of one scale whatever the round).
    """
    flat = tensor.detach().reshape(-1).float().cpu()
    scale = float(flat.pow(2).mean().sqrt()) if flat.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    padded = torch.zeros(math.ceil(flat.numel() / chunk) * chunk)
    padded[:flat.numel()] = flat / scale
    return padded.reshape(-1, chunk), scale


def from_chunks(rows: Tensor, scale: float, shape: torch.Size) -> Tensor:
    """The inverse of :func:`to_chunks` (up to what the rows lost)."""
    return (rows.reshape(-1)[:math.prod(shape)] * scale).reshape(shape)


@one_thread()  # a small network: several threads' hand-offs cost more than its arithmetic
def pretrain_autoencoder(autoencoder: UpdateAutoencoder, updates: Sequence[Mapping[str, Tensor]], *, steps: int = 300,
                         learning_rate: float = 3e-3, batch_size: int = 256, seed: int = 0) -> list[float]:
    """TGAP (our reading): fit the autoencoder to reconstruct the chunks of ``updates`` pooled over time (MSE, Adam).

    ``updates`` are full updates from several rounds or steps (the "temporal ensemble");
    returns the loss per step. The updates are cut with :func:`to_chunks`.
    """
    rows = torch.cat([to_chunks(value, autoencoder.chunk)[0] for update in updates for value in update.values()])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=learning_rate)
    losses = []
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (min(batch_size, len(rows)),), generator=generator)]
        loss = (autoencoder(batch) - batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def encode_update(update: Mapping[str, Tensor], encoder: nn.Module, chunk: int) -> dict[str, Tensor]:
    """The client's side: per tensor, the codes of its chunks (float32) and its scale (one float32)."""
    out = {}
    with torch.no_grad(), one_thread():
        for key, value in update.items():
            rows, scale = to_chunks(value, chunk)
            out[f"{key}.code"] = encoder(rows).float()
            out[f"{key}.scale"] = torch.tensor([scale], dtype=torch.float32)
    return out


def decode_update(tensors: Mapping[str, Tensor], decoder: nn.Module,
                  shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """The server's side: each tensor of ``shapes`` decoded from its codes and scale."""
    with torch.no_grad(), one_thread():
        return {key: from_chunks(decoder(tensors[f"{key}.code"]), float(tensors[f"{key}.scale"][0]), shape)
                for key, shape in shapes.items()}


class CGFedLLM(_ChangeUploads):
    """CG-FedLLM (Wu et al. 2024, arXiv 2405.13746): clients encode their update, the server decodes it.

    What is trained where and when, here (the paper's code and most details were not available
    to us, so every point below but the first is our choice):

    1. The paper's split: the encoder runs on the clients, the decoder on the server; the
       autoencoder (:class:`UpdateAutoencoder`) works on chunks of ``chunk`` entries of each
       factor's change, scaled to unit RMS (:func:`to_chunks`), and sends ``code`` float32
       numbers per chunk and one scale per factor: about ``chunk / code`` times fewer bytes.
    2. TGAP, the pre-training, runs on the server, once, at the end of round ``warmup_rounds``:
       the paper pre-trains on gradients of the target model; we have no public data on the
       server, so during the first ``warmup_rounds`` rounds the clients upload their change
       uncompressed (FedIT's bytes, counted), and the server fits the autoencoder to all the
       changes of those rounds pooled (the "temporal ensemble"; :func:`pretrain_autoencoder`,
       ``pretrain_steps`` Adam steps, MSE).
    3. FAF, the federated fine-tuning: from then on each client downloads the encoder once (its
       parameters counted in that round's download), encodes its change and uploads the codes;
       the server decodes and adds the p_k-weighted mean change. The autoencoder is frozen after
       TGAP (the paper adapts it during FAF in a way we could not recover).
    """

    name = "CG-FedLLM"
    paper = "Wu et al. 2024, arXiv 2405.13746"
    chapter = "book/part4/compression"

    @dataclass
    class State:
        """The autoencoder (built at the first round), the warm-up updates it is fitted to, and its losses."""

        autoencoder: UpdateAutoencoder | None = None
        warmup_updates: list[dict[str, Tensor]] = field(default_factory=list)
        pretrain_losses: list[float] = field(default_factory=list)
        trained: bool = False

    @dataclass
    class ClientState(_ChangeUploads.ClientState):
        """Besides the start: the encoder the client holds (None until it downloads it)."""

        encoder: nn.Module | None = None

    def __init__(self, chunk: int = 64, code: int = 8, hidden: int = 64, *, warmup_rounds: int = 1,
                 pretrain_steps: int = 300, learning_rate: float = 3e-3) -> None:
        super().__init__(None)
        UpdateAutoencoder(chunk, code, hidden)  # checks the sizes
        if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 1:
            raise ValueError(f"warmup_rounds must be an integer >= 1 (TGAP needs updates), got {warmup_rounds!r}")
        if isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int) or pretrain_steps < 1:
            raise ValueError(f"pretrain_steps must be an integer >= 1, got {pretrain_steps!r}")
        self.chunk, self.code, self.hidden = chunk, code, hidden
        self.warmup_rounds, self.pretrain_steps, self.learning_rate = warmup_rounds, pretrain_steps, learning_rate

    def init_server(self, server: ServerState, seed: int) -> None:
        server.method_state.autoencoder = UpdateAutoencoder(self.chunk, self.code, self.hidden,
                                                            seed=derive_seed(seed, "cg-fedllm autoencoder"))

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        state = server.method_state
        if state.trained:  # FAF: the client holds the frozen encoder, downloaded once
            if client_state.encoder is None:
                encoder = state.autoencoder.encoder
                extra = {f"encoder.{key}": value.detach().clone() for key, value in encoder.state_dict().items()}
                start.download = Payload({**start.download.tensors, **extra})
            client_state.encoder = state.autoencoder.encoder
        return start

    def encode(self, change: dict[str, Tensor], client_state: Any) -> dict[str, Tensor]:
        if client_state.encoder is None:  # warm-up: the change itself, dense
            return {f"{key}.dense": value for key, value in change.items()}
        return encode_update(change, client_state.encoder, self.chunk)

    def decode(self, tensors: Mapping[str, Tensor], shapes: Mapping[str, torch.Size],
               server: ServerState) -> dict[str, Tensor]:
        if f"{next(iter(shapes))}.dense" in tensors:
            dense = {key: tensors[f"{key}.dense"] for key in shapes}
            if server.round < self.warmup_rounds:
                server.method_state.warmup_updates.append({key: value.detach().cpu() for key, value in dense.items()})
            return dense
        return decode_update(tensors, server.method_state.autoencoder.decoder, shapes)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """Decode and average (see :class:`_ChangeUploads`); after the warm-up rounds, TGAP fits the autoencoder."""
        super().aggregate(server, uploads, round_index)
        state = server.method_state
        if not state.trained and round_index + 1 >= self.warmup_rounds:
            state.pretrain_losses = pretrain_autoencoder(state.autoencoder, state.warmup_updates,
                                                         steps=self.pretrain_steps, learning_rate=self.learning_rate,
                                                         seed=derive_seed(server.seed, "cg-fedllm tgap"))
            state.autoencoder.requires_grad_(False)
            state.trained, state.warmup_updates = True, []


# ----- FwdLLM: gradients from forward passes ---------------------------------------------------------------------
def perturbation_directions(shapes: Sequence[torch.Size], count: int, generator: torch.Generator, *,
                            previous: Sequence[Tensor] | None = None, candidates: int = 1) -> list[list[Tensor]]:
    """``count`` directions v ~ N(0, I), each a list of tensors of ``shapes``.

    With ``previous`` (the last global gradient) and ``candidates`` > 1, each tensor's
    directions are the ``count`` of ``candidates * count`` Gaussian draws closest in cosine to
    that tensor's previous gradient (FwdLLM's discriminative perturbation sampling, as in the
    authors' ``tc_transformer_trainer_distribute.py``: 10 candidates per direction there).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    per_tensor = []
    for i, shape in enumerate(shapes):
        if previous is None or candidates == 1 or not bool(previous[i].any()):
            per_tensor.append(torch.randn((count, *shape), generator=generator))
            continue
        drawn = torch.randn((candidates * count, *shape), generator=generator)
        similarity = torch.cosine_similarity(drawn.reshape(len(drawn), -1),
                                             previous[i].reshape(1, -1).float().cpu(), dim=1)
        per_tensor.append(drawn[torch.argsort(similarity, descending=True)[:count]])
    return [[tensors[j] for tensors in per_tensor] for j in range(count)]


def forward_gradient(loss: Callable[[], Tensor | float], parameters: Sequence[Tensor],
                     directions: Sequence[Sequence[Tensor]], step: float = 0.01) -> tuple[list[Tensor], float]:
    """FwdLLM's gradient estimate from forward passes only: the mean over directions v of ``jvp(v) * v``.

    ``jvp(v) = (f(x + h v) - f(x - h v)) / (2 h)`` is the central difference of ``loss`` along v
    with ``h = step`` (the authors' ``calculate_jvp``); for v ~ N(0, I), E[(g . v) v] = g, so the
    estimate is unbiased up to the difference's error. ``parameters`` are changed in place during
    the evaluations and restored exactly. Returns the estimate (one tensor per parameter) and the
    mean of the evaluated losses. No autograd graph is built.
    """
    if not directions:
        raise ValueError("directions is empty: at least one perturbation is needed")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    estimate = [torch.zeros_like(p) for p in parameters]
    originals = [p.detach().clone() for p in parameters]
    losses = []
    with torch.no_grad():
        try:
            for direction in directions:
                values = []
                for sign in (1.0, -1.0):
                    for p, x, v in zip(parameters, originals, direction, strict=True):
                        p.copy_(x + sign * step * v.to(x))
                    values.append(float(loss()))
                slope = (values[0] - values[1]) / (2 * step)
                for e, v in zip(estimate, direction, strict=True):
                    e.add_(slope * v.to(e))
                losses.extend(values)
        finally:
            for p, x in zip(parameters, originals, strict=True):
                p.copy_(x)
    return [e / len(directions) for e in estimate], float(np.mean(losses))


def _trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What the client trains, by payload key: ``<layer>.A`` and ``<layer>.B`` of every LoRA layer, ``head.<name>``."""
    out = {}
    for name, layer in adapter_io.lora_layers(model).items():
        for side in "AB":
            parameter = getattr(layer, f"lora_{side}")[adapter_io.ADAPTER].weight
            if parameter.requires_grad:
                out[f"{name}.{side}"] = parameter
    for name, parameter in adapter_io.head_parameters(model).items():
        if parameter.requires_grad:
            out[f"head.{name}"] = parameter
    return out


class FwdLLM(Strategy):
    """FwdLLM (Xu et al. 2024, arXiv 2308.13894): federated LoRA without backpropagation.

    Each local step (one batch of the simulator's), the client draws ``perturbations``
    directions over everything it trains (A and B of every layer, and the head if it trains)
    and adds :func:`forward_gradient`'s estimate from ``2 * perturbations`` forward passes; it
    uploads the mean estimate over its steps, dense. The server steps the global adapter (and
    head) by ``-server_learning_rate`` times the p_k-weighted mean estimate (FedSGD, as the
    authors' ``FedSgdAggregator``). With ``candidates`` > 1 the client draws its directions
    among ``candidates`` times more, keeping those closest in cosine to the last global gradient,
    which it downloads with the adapter (:func:`perturbation_directions`). With
    ``variance_threshold`` the server paces the steps: while the variance of the estimates it holds
    (:func:`estimate_variance`) is above the threshold it keeps them, does not step, and adds the
    next round's; then it steps with the weighted mean of all it kept (the paper's
    variance-controlled pacing; the authors compute the variance on the clients, from one layer's
    per-batch estimates: ours is the server's, over every trained tensor and the clients' estimates).

    As the authors' code: central differences with ``step`` 0.01, Gaussian directions, all
    trainable parameters perturbed at once. Our choices: the perturbed passes run with dropout
    off (both sides of a difference must be the same function); the mean over steps instead of
    the code's sum divided by the number of examples; a constant server rate instead of its
    warm-up and decay; the variance for the pacing computed on the server (see above).

    In the simulator: local training runs inside :meth:`local_training`, where the client's
    forward pass is replaced by the estimate's forward passes and returns their mean loss as a
    constant, so the simulator's optimiser step moves nothing and no backward pass runs through
    the model (it is sequential-only, like every method with its own ``local_training``).
    """

    name = "FwdLLM"
    paper = "Xu et al. 2024, arXiv 2308.13894"
    chapter = "book/part4/compression"

    @dataclass
    class State:
        """The last global gradient estimate (None before the first step), the estimates kept while their variance
        was above the threshold (as (n_k, estimate)), and per round the variance seen and whether the server stepped."""

        gradient: dict[str, Tensor] | None = None
        kept: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
        variances: list[float] = field(default_factory=list)
        stepped: list[bool] = field(default_factory=list)

    @dataclass
    class ClientState:
        """This round's seed, the global gradient downloaded, the running sum of estimates and how many."""

        seed: int = 0
        previous: dict[str, Tensor] | None = None
        estimate: dict[str, Tensor] | None = None
        steps: int = 0

    def __init__(self, perturbations: int = 4, *, step: float = 0.01, server_learning_rate: float = 0.05,
                 candidates: int = 1, variance_threshold: float | None = None) -> None:
        super().__init__(None)
        if isinstance(perturbations, bool) or not isinstance(perturbations, int) or perturbations < 1:
            raise ValueError(f"perturbations must be an integer >= 1, got {perturbations!r}")
        if not (isinstance(step, (int, float)) and step > 0):
            raise ValueError(f"step must be > 0, got {step!r}")
        if not (isinstance(server_learning_rate, (int, float)) and server_learning_rate > 0):
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate!r}")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
        if variance_threshold is not None and not (isinstance(variance_threshold, (int, float))
                                                   and variance_threshold >= 0):
            raise ValueError(f"variance_threshold must be None or >= 0, got {variance_threshold!r}")
        self.variance_threshold = None if variance_threshold is None else float(variance_threshold)
        self.perturbations, self.step = perturbations, float(step)
        self.server_learning_rate, self.candidates = float(server_learning_rate), candidates

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = super().client_start(server, client_id, client_state, round_index)
        client_state.seed = derive_seed(server.seed, "fwdllm perturbations", round_index, client_id)
        client_state.estimate, client_state.steps = None, 0
        client_state.previous = None
        gradient = server.method_state.gradient
        if self.candidates > 1 and gradient is not None:
            client_state.previous = {key: value.clone() for key, value in gradient.items()}
            start.download = Payload({**start.download.tensors,
                                      **{f"gradient.{key}": value for key, value in gradient.items()}})
        return start

    @contextlib.contextmanager
    def local_training(self, model: nn.Module, start: ClientStart, client_state: Any,
                       round_index: int) -> Iterator[None]:
        """The client's steps as forward-gradient estimates (the class docstring says how the simulator runs them)."""
        parameters = _trained_parameters(model)
        keys = list(parameters)
        generator = torch.Generator().manual_seed(client_state.seed)
        original = model.forward

        def estimate_step(*args: Any, **batch: Any) -> Any:
            was_training = model.training
            model.eval()
            try:
                previous = None if client_state.previous is None else [client_state.previous[k] for k in keys]
                directions = perturbation_directions([parameters[k].shape for k in keys], self.perturbations,
                                                     generator, previous=previous, candidates=self.candidates)
                estimate, loss = forward_gradient(lambda: original(*args, **batch).loss,
                                                  [parameters[k] for k in keys], directions, self.step)
            finally:
                model.train(was_training)
            if client_state.estimate is None:
                client_state.estimate = {k: torch.zeros_like(parameters[k]) for k in keys}
            for k, value in zip(keys, estimate, strict=True):
                client_state.estimate[k] += value.detach()
            client_state.steps += 1
            # A constant: the simulator's backward pass and optimiser step then leave every parameter as it is.
            return types.SimpleNamespace(loss=torch.tensor(loss, requires_grad=True))

        model.forward = estimate_step
        try:
            yield
        finally:
            del model.forward

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The mean gradient estimate over the round's steps, one dense tensor per trained parameter."""
        if client_state.estimate is None:
            raise ValueError(f"client {result.client_id} uploads without having estimated a gradient")
        return Payload({f"gradient.{key}": value / client_state.steps for key, value in client_state.estimate.items()})

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """One gradient step with the weighted mean of the clients' estimates (FedSGD), paced by their variance.

        The weights are the p_k of the estimates held: this round's, and those kept from rounds whose
        variance was above ``variance_threshold`` (without a threshold, only this round's).
        """
        state = server.method_state
        keys = [key.removeprefix("gradient.") for key in uploads[0].payload.tensors]
        held = state.kept + [(u.num_examples, {key: u.payload.tensors[f"gradient.{key}"].detach().cpu()
                                                for key in keys}) for u in uploads]
        variance = estimate_variance([estimate for _, estimate in held])
        state.variances.append(variance)
        if self.variance_threshold is not None and variance > self.variance_threshold:
            state.kept, state.stepped = held, [*state.stepped, False]  # not yet: wait for more estimates
            return
        state.kept, state.stepped = [], [*state.stepped, True]
        total = sum(n for n, _ in held)
        gradient = {key: sum(n / total * estimate[key] for n, estimate in held) for key in keys}
        rate = self.server_learning_rate
        adapters = {}
        for name, (a, b) in server.adapters.items():
            adapters[name] = (a - rate * gradient[f"{name}.A"].to(a) if f"{name}.A" in gradient else a,
                              b - rate * gradient[f"{name}.B"].to(b) if f"{name}.B" in gradient else b)
        server.adapters = adapters
        server.head = {key: value - rate * gradient[f"head.{key}"].to(value) if f"head.{key}" in gradient else value
                       for key, value in server.head.items()}
        state.gradient = gradient


def estimate_variance(estimates: Sequence[Mapping[str, Tensor]]) -> float:
    """FwdLLM's check of a set of gradient estimates: the variance between the means of its two halves.

    As the authors' ``calculate_var``: the estimates in order, split into a first and a second half,
    each half averaged, and the unbiased variance of the two means taken entry by entry and averaged
    over the entries (here over every tensor of the estimates). NaN for fewer than two estimates.
    """
    if len(estimates) < 2:
        return math.nan
    half = len(estimates) // 2
    flat = [torch.cat([estimate[key].reshape(-1).double() for key in sorted(estimate)]) for estimate in estimates]
    first, second = torch.stack(flat[:half]).mean(0), torch.stack(flat[half:]).mean(0)
    return float(torch.var(torch.stack([first, second]), dim=0).mean())
