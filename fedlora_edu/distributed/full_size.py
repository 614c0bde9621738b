"""Full-size matrix aggregation (survey section 3.1, eq. 6): FLoRA, FlexLoRA and FedPipe.

Instead of averaging A and B separately, these methods aggregate the full-size update
sum_k p_k B_k A_k itself, the right side of eq. 4, so the aggregate is exact:

- :class:`FLoRA` (Wang et al. 2024): stack the clients' factors (:func:`flora_stack`); the
  stack's product is the ideal update for any mix of ranks, and it is merged into W'.
- :class:`FlexLoRA` (Bai et al. 2024): form the ideal update and hand each client its best
  rank-r_k approximation by SVD (:func:`flexlora`, Eckart-Young), from the stacked factors
  without forming the m x n sum (:func:`~fedlora_edu.core.svd.factored_svd`).
- :class:`FedPipe` (Fang et al. 2024, "Automated Federated Pipeline for Parameter-Efficient
  Fine-Tuning of Large Language Models", arXiv 2404.06448), which the survey describes as
  full-size LoRA weight aggregation combined with quantizing the clients' local models to
  different bit levels.

The pure functions come first: :func:`flora_stack`, :func:`flexlora`, and FedPipe's

- :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`: symmetric uniform b-bit
  quantization with one float32 scale per row, and its error bound
  (:func:`quantization_error_bound`) and wire size (:func:`quantized_nbytes`);
- :func:`quantize_factors`: a LoRA adapter as a b-bit client would send it (rows of A and
  columns of B, one scale per rank component);
- :func:`fedpipe_aggregate`: sum_k p_k B^_k A^_k of the dequantized adapters (survey eq. 6),
  redistributed to each client's rank.

Taught in ``book/part2/full_size.ipynb`` (FLoRA and FlexLoRA first in
``book/part2/aggregation_discordance.ipynb``; the factored SVD in ``book/fast/factored_svd.ipynb``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlora_edu.core.checks import check_factors, check_ranks, check_weights
from fedlora_edu.core.factors import ideal_update
from fedlora_edu.core.merges import MergingClientState, MergingState, missed_merges
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import LocalResult, Payload, ServerState, Strategy, Upload, collect_factors
from fedlora_edu.core.svd import check_method, truncated_factors, truncated_factors_factored

FULL_PRECISION = 32
"""A bit width of 32 means the client sends float32, unquantized."""

SCALE_BYTES = 4
"""Each quantized row carries its scale as one float32."""


def flora_stack(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FLoRA (Wang et al. 2024): stack p_k A_k row-wise and B_k column-wise.

    Returns (A, B) with A of shape (sum r_k) x n and B m x (sum r_k); B A equals
    :func:`ideal_update` exactly (block matrix product), for any mix of ranks.
    """
    check_factors(As, Bs)
    p = check_weights(weights, len(As))
    return torch.cat([w * a for w, a in zip(p, As, strict=True)], dim=0), torch.cat(list(Bs), dim=1)


def flexlora(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], ranks: Sequence[int],
    method: str = "factored",
) -> list[tuple[Tensor, Tensor]]:
    """FlexLoRA (Bai et al. 2024), eq. 6: SVD of sum_k p_k B_k A_k, redistributed to each rank.

    Returns one (A_k, B_k) per entry of ``ranks``: the best rank-r_k approximation
    of the ideal update (clients may have different ranks). ``method="factored"`` (the
    default) takes the SVD from the stacked factors (:func:`factored_svd`) and never
    forms the m x n sum; ``method="dense"`` forms it and takes its SVD (the reference).
    When the total rank R = sum_k r_k reaches min(m, n), the factored route has nothing
    to save and takes the dense SVD. Both give the same products B_k A_k up to rounding.
    """
    check_method(method)
    rank_list = check_ranks(ranks, len(ranks))
    if not rank_list:
        raise ValueError("ranks is empty")
    a_stack, b_stack = flora_stack(As, Bs, weights)
    m, total_rank, n = b_stack.shape[0], b_stack.shape[1], a_stack.shape[1]
    # With R >= min(m, n) the QR core is as large as the product: the factored route saves
    # nothing (benchmarks/svd.py measures it slower), so it takes the dense SVD instead.
    if method == "dense" or total_rank >= min(m, n):
        a, b = truncated_factors(ideal_update(As, Bs, weights), max(rank_list))
    else:
        a, b = truncated_factors_factored(b_stack, a_stack, max(rank_list))
    return [(a[:r].clone(), b[:, :r].clone()) for r in rank_list]


def check_bits(bits: object, name: str = "bits") -> int:
    """Validate a bit width: an integer in 2..16 (uniform integer codes) or 32 (float32, unquantized)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 16 or bits == FULL_PRECISION):
        raise ValueError(f"{name} must be an integer in 2..16 or {FULL_PRECISION} (full precision), got {bits!r}")
    return bits


def _levels(bits: int) -> int:
    """Largest code magnitude of symmetric b-bit quantization: codes are -L..L with L = 2^(b-1) - 1."""
    return 2 ** (bits - 1) - 1


def _check_matrix(tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(f"tensor must be a matrix (2-D), got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("tensor holds NaN or Inf: it cannot be quantized")
    return tensor


def quantize(tensor: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric uniform quantization of each row to ``bits`` bits: (integer codes, float32 scales).

    Row i is stored as codes q_ij in -L..L (L = 2^(bits-1) - 1) and one scale
    s_i = max_j |x_ij| / L, so x_ij ~ s_i q_ij with q_ij = round(x_ij / s_i). An all-zero
    row gets scale 0 and codes 0. ``bits`` must be in 2..16 (use 32 for no quantization).
    """
    _check_matrix(tensor)
    check_bits(bits)
    if bits == FULL_PRECISION:
        raise ValueError("bits=32 is full precision: there is nothing to quantize (use fake_quantize)")
    levels = _levels(bits)
    scales = tensor.abs().amax(dim=1).to(torch.float32) / levels
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(tensor.to(torch.float32) / safe[:, None]).clamp(-levels, levels)
    return codes.to(torch.int32), scales


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """s_i q_ij: the float32 values a quantized matrix stands for."""
    if codes.ndim != 2 or scales.ndim != 1 or scales.shape[0] != codes.shape[0]:
        raise ValueError(f"codes must be rows x cols and scales one per row, got {tuple(codes.shape)} and "
                         f"{tuple(scales.shape)}")
    return codes.to(torch.float32) * scales[:, None]


def fake_quantize(tensor: Tensor, bits: int) -> Tensor:
    """What the receiver reconstructs from a ``bits``-bit row-wise quantized matrix (unchanged at 32 bits)."""
    _check_matrix(tensor)
    if check_bits(bits) == FULL_PRECISION:
        return tensor.clone()
    return dequantize(*quantize(tensor, bits)).to(tensor.dtype)


def quantization_error_bound(tensor: Tensor, bits: int) -> Tensor:
    """Per-row bound on |x_ij - Q(x)_ij|: half a step, max_j |x_ij| / (2 L); zero at 32 bits.

    Rounding to the nearest of the codes -L..L moves a value by at most half of the step
    s_i, and no value is clipped because the scale is the row's largest magnitude. The bound
    is exact arithmetic; in float32 the reconstruction adds a few ulps of the row's maximum.
    """
    _check_matrix(tensor)
    if check_bits(bits) == FULL_PRECISION:
        return torch.zeros(tensor.shape[0], dtype=tensor.dtype)
    return tensor.abs().amax(dim=1) / (2 * _levels(bits))


def quantized_nbytes(shape: Sequence[int], bits: int) -> int:
    """Bytes on the wire of a rows x cols matrix at ``bits`` bits: packed codes plus one float32 scale per row.

    At 32 bits the matrix is sent as plain float32 (4 bytes per entry, no scales).
    """
    if len(shape) != 2 or any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape must be (rows, cols) of non-negative integers, got {tuple(shape)}")
    rows, cols = shape
    if check_bits(bits) == FULL_PRECISION:
        return 4 * rows * cols
    return math.ceil(rows * cols * bits / 8) + SCALE_BYTES * rows


def quantize_factors(a: Tensor, b: Tensor, bits: int) -> tuple[Tensor, Tensor, int]:
    """A LoRA adapter as a ``bits``-bit client sends it: (A^, B^, bytes).

    One scale per rank component: rows of A (r x n) and columns of B (m x r) are quantized,
    so each of the r components a_i, b_i keeps its own range.
    """
    a_hat = fake_quantize(a, bits)
    b_hat = fake_quantize(b.T, bits).T.contiguous()
    nbytes = quantized_nbytes(tuple(a.shape), bits) + quantized_nbytes((b.shape[1], b.shape[0]), bits)
    return a_hat, b_hat, nbytes


def fedpipe_aggregate(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], bits: Sequence[int],
    ranks: Sequence[int], method: str = "factored",
) -> list[tuple[Tensor, Tensor]]:
    """FedPipe's server step: full-size aggregation of the clients' quantized adapters.

    Client k's factors are quantized to ``bits[k]`` bits (:func:`quantize_factors`), the server
    forms sum_k p_k B^_k A^_k (survey eq. 6 on what it received) and returns its best
    rank-r approximation for each r in ``ranks`` (:func:`flexlora`).
    With every client at 32 bits this is exactly FlexLoRA.
    """
    if len(bits) != len(As):
        raise ValueError(f"bits has {len(bits)} entries for {len(As)} clients")
    check_weights(weights, len(As))
    received = [quantize_factors(a, b, check_bits(w, f"bits[{k}]"))
                for k, (a, b, w) in enumerate(zip(As, Bs, bits, strict=True))]
    return flexlora([a for a, _, _ in received], [b for _, b, _ in received], weights, ranks, method=method)


class FLoRA(Strategy):
    """FLoRA (Wang et al. 2024, NeurIPS): stack the clients' adapters, merge the stack into W'.

    The server broadcasts the stacked adapter (rank sum_k r_k); every client adds its
    product to its frozen weight and starts the next round from a fresh LoRA (A random,
    B zero). Clients may have different ranks.

    Bytes down: the head, and every stack merged since the client last took part (a client
    that skipped rounds must apply all of them to keep its W' equal to the server's), counted
    as the stacks or as one dense m x n change per layer, whichever is smaller
    (:func:`~fedlora_edu.core.merges.missed_merges`). The fresh adapter is drawn from the run's
    seed and the round, which every client knows, so it is not counted.
    """

    name = "FLoRA"
    paper = "Wang et al. 2024, NeurIPS, arXiv 2409.05976"
    chapter = "book/part2/full_size"
    State = MergingState
    ClientState = MergingClientState

    def __init__(self, rank: int | None = None, ranks: Sequence[int] | None = None) -> None:
        super().__init__(rank)
        self.ranks = None if ranks is None else check_ranks(ranks, len(ranks))

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return self.ranks[client_id] if self.ranks is not None else super().client_rank(client_id, server)

    def max_rank(self, num_clients: int) -> int | None:
        return max(self.ranks) if self.ranks is not None else self.rank

    def client_start(self, server, client_id, client_state, round_index):
        start = super().client_start(server, client_id, client_state, round_index)
        # The fresh adapter comes from the shared seed; what is downloaded is every stack the client missed.
        head = {f"head.{k}": v for k, v in server.head.items()}
        merged, merged_bytes = missed_merges(server.method_state, client_state)
        start.download = Payload({**merged, **head}, nbytes=Payload(head).nbytes + merged_bytes)
        return start

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads)
        stacked = {n: flora_stack(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        server.method_state.merges.append(stacked)
        server.method_state.merge_rounds.append(round_index + 1)
        server.base_deltas = {n: server.scaling * (b @ a) for n, (a, b) in stacked.items()}
        # Fresh adapter for the next round: a new random A (survey eq. 9), zero B. Drawn on the CPU, where the
        # generator lives, then moved to the adapter's device (a CPU generator cannot fill a CUDA tensor).
        generator = torch.Generator().manual_seed(derive_seed(server.seed, "FLoRA fresh adapter", round_index + 1))
        server.adapters = {
            n: ((torch.empty(a.shape, dtype=a.dtype).uniform_(-1.0, 1.0, generator=generator) / a.shape[1] ** 0.5)
                .to(a.device), torch.zeros_like(b))
            for n, (a, b) in server.adapters.items()
        }
        self.aggregate_head(server, uploads)


class FlexLoRA(Strategy):
    """FlexLoRA (Bai et al. 2024, NeurIPS): full-size aggregation, SVD redistributed to each rank (eq. 6).

    ``ranks[k]`` is client k's rank (default: all equal). The global adapter kept by
    the server is the best rank-max(r_k) approximation of sum_k p_k B_k A_k; client k
    starts from its first r_k components, which are its best rank-r_k approximation.
    ``method`` picks the SVD route of :func:`flexlora` (``"factored"`` by default, never
    forming the m x n sum on the server; ``"dense"`` is the reference).

    Deviation from the reference code: the authors' code (alibaba/FederatedScope, branch
    FlexLoRA, commit 4643e1a5d972d0624b40ea2483b70863ee3807c8; ``FlexLoRA`` in
    ``fed_utils/model_aggregation.py`` and ``distribute_weight_fast`` in
    ``fed_utils/adaptive_peft.py``) gives each client its own LoRA constant s_k = alpha / r_k:
    the server takes the SVD of sum_k p_k s_k B_k A_k and sends client k A_k = V_{r_k}^T and
    B_k = U_{r_k} S_{r_k} / s_k, all singular values in B. Ours uses one s = alpha / r for every
    client (clients of all ranks share one model of the largest rank r) and splits the singular
    values evenly, B_k = U_{r_k} S_{r_k}^(1/2) and A_k = S_{r_k}^(1/2) V_{r_k}^T
    (:func:`~fedlora_edu.core.svd.truncated_factors`). In both, the update client k's model
    applies is the best rank-r_k approximation of the weighted sum of the clients' applied
    updates; with equal ranks only the split differs. Why ours: eq. 6 as the survey writes it
    has no per-client constant, and symmetric factors have the same scale, so one learning rate
    suits A and B here as in every other method of the comparison. The effect of the difference
    on accuracy is measured by ``studies/deviations.py`` (the authors' way, on the testbed, paired
    over seeds with this class's runs in ``studies/part2.py``) and reported in
    ``book/part2/full_size.ipynb``.
    """

    name = "FlexLoRA"
    paper = "Bai et al. 2024, NeurIPS, arXiv 2402.11505"
    chapter = "book/part2/full_size"

    def __init__(self, rank: int | None = None, ranks: Sequence[int] | None = None, method: str = "factored") -> None:
        super().__init__(rank)
        self.ranks = None if ranks is None else check_ranks(ranks, len(ranks))
        self.method = check_method(method)

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return self.ranks[client_id] if self.ranks is not None else super().client_rank(client_id, server)

    def max_rank(self, num_clients: int) -> int | None:
        if self.ranks is not None and len(self.ranks) != num_clients:
            raise ValueError(f"ranks has {len(self.ranks)} entries for {num_clients} clients")
        return max(self.ranks) if self.ranks is not None else self.rank

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads)
        server.adapters = {n: flexlora(a_list, b_list, weights, [server.rank], method=self.method)[0]
                           for n, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)


class FedPipe(Strategy):
    """FedPipe (Fang et al. 2024, arXiv 2404.06448): full-size aggregation from clients of different bit widths.

    What the paper does (survey 3.1, "full-size matrix"): FedPipe picks the weights worth
    fine-tuning, gives each edge server a LoRA rank (and batch size) that fits its compute,
    quantizes each server's copy of the pre-trained model to the number of bits its memory
    allows, and aggregates the clients' full-size LoRA weights B_k A_k on the server.

    What this class implements, and where it differs:

    - per-client ranks ``ranks[k]`` and bit widths ``bits[k]`` (an int gives every client the
      same; a sequence one value per client, cycled when shorter than the federation);
    - client k's **upload** is quantized to ``bits[k]`` bits (symmetric uniform, one float32
      scale per rank component; :func:`quantize_factors`) and counted at that size; the head
      goes as float32. The paper quantizes the frozen pre-trained weights on the client (with
      NormalFloat codes) to save memory; the simulator's strategy interface cannot change one
      client's frozen weights, so here quantization acts on what crosses the network, which is
      also where it shows in the survey's Table 1 (communication);
    - the server dequantizes and aggregates the full-size update sum_k p_k B^_k A^_k (eq. 6);
      the survey does not say how the full-size result returns to the clients' low ranks, so we
      take FlexLoRA's choice: the best rank-max(r_k) approximation by SVD (the factored route of
      :func:`~fedlora_edu.core.svd.factored_svd` by default), of which client k downloads the
      first r_k components, in float32;
    - the weight selection and the resource optimisation (the paper's MILP) are not implemented.

    With every client at 32 bits it is exactly FlexLoRA. Taught in ``book/part2/full_size.ipynb``.
    """

    name = "FedPipe"
    paper = "Fang et al. 2024, arXiv 2404.06448"
    chapter = "book/part2/full_size"

    def __init__(self, rank: int | None = None, ranks: Sequence[int] | None = None,
                 bits: int | Sequence[int] = 8, method: str = "factored") -> None:
        super().__init__(rank)
        self.ranks = None if ranks is None else check_ranks(ranks, len(ranks))
        if isinstance(bits, int):
            self.bits = [check_bits(bits)]
        else:
            self.bits = [check_bits(b, f"bits[{k}]") for k, b in enumerate(bits)]
            if not self.bits:
                raise ValueError("bits is empty: give one bit width, or one per client")
        self.method = check_method(method)

    def client_bits(self, client_id: int) -> int:
        """The bit width b_k at which client k uploads (the list is cycled over the clients)."""
        return self.bits[client_id % len(self.bits)]

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return self.ranks[client_id] if self.ranks is not None else super().client_rank(client_id, server)

    def max_rank(self, num_clients: int) -> int | None:
        if self.ranks is not None and len(self.ranks) != num_clients:
            raise ValueError(f"ranks has {len(self.ranks)} entries for {num_clients} clients")
        return max(self.ranks) if self.ranks is not None else self.rank

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The adapter quantized to b_k bits (sent as its dequantized values, counted at its quantized size)."""
        bits = self.client_bits(result.client_id)
        tensors: dict[str, Tensor] = {}
        nbytes = 0
        for name, (a, b) in result.adapters.items():
            a_hat, b_hat, size = quantize_factors(a, b, bits)
            tensors[f"{name}.A"], tensors[f"{name}.B"] = a_hat, b_hat
            nbytes += size
        head = {f"head.{k}": v for k, v in result.head.items()}
        tensors.update(head)
        return Payload(tensors, nbytes=nbytes + Payload(head).nbytes)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        # The uploads already hold the dequantized A^_k, B^_k: aggregate them in full size (eq. 6).
        weights, per_layer = collect_factors(server, uploads)
        server.adapters = {n: flexlora(a_list, b_list, weights, [server.rank], method=self.method)[0]
                           for n, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)

