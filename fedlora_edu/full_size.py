"""Full-size matrix aggregation (survey section 3.1), the third method: FedPipe.

FLoRA and FlexLoRA live in :mod:`fedlora_edu.aggregation`; this module adds FedPipe
(Fang et al. 2024, "Automated Federated Pipeline for Parameter-Efficient Fine-Tuning of
Large Language Models", arXiv 2404.06448), which the survey describes as full-size LoRA
weight aggregation combined with quantizing the clients' local models to different bit
levels. The pure functions come first:

- :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`: symmetric uniform b-bit
  quantization with one float32 scale per row, and its error bound
  (:func:`quantization_error_bound`) and wire size (:func:`quantized_nbytes`);
- :func:`quantize_factors`: a LoRA adapter as a b-bit client would send it (rows of A and
  columns of B, one scale per rank component);
- :func:`fedpipe_aggregate`: sum_k p_k B^_k A^_k of the dequantized adapters (survey eq. 6),
  redistributed to each client's rank.

Taught in ``book/part2/full_size.ipynb``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora_edu.aggregation import _collect, check_method, check_ranks, check_weights, flexlora
from fedlora_edu.strategy import LocalResult, Payload, ServerState, Strategy, Upload

FULL_PRECISION = 32
"""A bit width of 32 means the client sends float32, unquantized."""

SCALE_BYTES = 4
"""Each quantized row carries its scale as one float32."""


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
    rank-r approximation for each r in ``ranks`` (:func:`~fedlora_edu.aggregation.flexlora`).
    With every client at 32 bits this is exactly FlexLoRA.
    """
    if len(bits) != len(As):
        raise ValueError(f"bits has {len(bits)} entries for {len(As)} clients")
    check_weights(weights, len(As))
    received = [quantize_factors(a, b, check_bits(w, f"bits[{k}]"))
                for k, (a, b, w) in enumerate(zip(As, Bs, bits, strict=True))]
    return flexlora([a for a, _, _ in received], [b for _, b, _ in received], weights, ranks, method=method)


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
      :func:`~fedlora_edu.aggregation.factored_svd` by default), of which client k downloads the
      first r_k components, in float32;
    - the weight selection and the resource optimisation (the paper's MILP) are not implemented.

    With every client at 32 bits it is exactly FlexLoRA. Taught in ``book/part2/full_size.ipynb``.
    """

    name = "FedPipe"

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

    def client_upload(self, result: LocalResult, client_state: dict, round_index: int) -> Payload:
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
        weights, per_layer = _collect(server, uploads)
        server.adapters = {n: flexlora(a_list, b_list, weights, [server.rank], method=self.method)[0]
                           for n, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)


STRATEGIES: dict[str, type[Strategy]] = {"FedPipe": FedPipe}
