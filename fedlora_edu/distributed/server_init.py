"""Server-side LoRA initialisation (survey section 3.2, eqs. 9 and 10): standard, FeDeRA and SLoRA.

Before round 1 the server decides what every client's adapter starts from. The survey
(arXiv 2505.13502) names three choices:

- the **standard** initialisation of LoRA (Hu et al. 2021), eq. 9: A ~ N(0, sigma^2), B = 0
  (:func:`standard_init`, :class:`StandardInit`); the model starts exactly pre-trained;
- **FeDeRA** (Yan, Yang, Tang, Shi 2024, arXiv 2404.18848), eq. 10: A and B from the
  truncated SVD of each adapted layer's pre-trained weight W_pre (:func:`svd_init`,
  :class:`FeDeRA`); the top-r part s B A is subtracted from the frozen weight, so the model
  still starts exactly pre-trained;
- **SLoRA** (Babakniya, Elkordy, Ezzeldin, Liu, Song, El-Khamy, Avestimehr 2023, arXiv
  2308.06522): stage 1 fine-tunes a sparse subset of the adapted base weights federatedly
  (:func:`random_masks`, :func:`sparse_local_train`); stage 2 initialises A and B from the
  SVD of the learned sparse update (:func:`slora_factors`), then ordinary FedLoRA rounds
  follow (:class:`SLoRA`).

Sources. Neither paper's method section (its equations, algorithm and hyper-parameters)
could be read when this module was checked; what could be read is: FeDeRA's arXiv abstract
(v3, https://arxiv.org/abs/2404.18848), the abstract of its ICLR 2025 submission
(https://openreview.net/forum?id=GtlRN48XYA) and reviewers' descriptions of a conference
submission of it (a public collection of OpenReview reviews); SLoRA's arXiv abstract
(https://arxiv.org/abs/2308.06522); the survey's section 3.2; and the description of both in
Mao et al., "A Survey on LoRA of Large Language Models" (arXiv 2407.11046, section 6.1).
:class:`FeDeRA` and :class:`SLoRA` each say which of their choices rests on one of these and
which is this package's own.

Every strategy here averages A and B as FedIT does once the rounds start: only the start
differs. They do their work in :meth:`~fedlora_edu.core.strategy.Strategy.prepare`, which the
simulator calls once with the freshly built peft model; what they put in
``server.base_deltas`` there is added to the frozen weights W' before round 1.

Notation of the survey: A is r x n, B is m x r, dW = B A, and the model applies
W = W' + s B A with LoRA's constant s = alpha / r (survey eq. 2). :func:`update_spread`
measures the spread of the clients' weight updates in a round (the "weight divergence" the
survey says data-driven and SVD initialisation mitigate).

Taught in ``book/part2/server_initialization.ipynb``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import Factors
from fedlora_edu.core.checks import check_rank, check_weights
from fedlora_edu.core.factors import average_tensors
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import Payload, ServerState
from fedlora_edu.core.svd import truncated_factors
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.foundations.training import evaluate, local_train

SEED_BYTES = 8
"""A seed crosses the network as one 64-bit integer (SLoRA's mask is regenerated from it)."""
SPLITS = ("balanced", "B")


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------
def check_sigma(sigma: object) -> float:
    """Validate a standard deviation: a finite number > 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def check_density(density: object) -> float:
    """Validate SLoRA's mask density d: a number in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return float(density)


def check_scaling(scaling: object) -> float:
    """Validate LoRA's constant s = alpha / r: a finite number > 0."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) \
            or scaling <= 0:
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
    return float(scaling)


def check_split(split: object) -> str:
    """Validate where the singular values go: ``"balanced"`` (sqrt on each side) or ``"B"`` (all in B)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return str(split)


def _check_matrix(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.ndim != 2 or min(value.shape) < 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a non-empty matrix (m x n), got {shape}")


# ----------------------------------------------------------------------------------------
# Eq. 9: the standard initialisation
# ----------------------------------------------------------------------------------------
def standard_init(
    rank: int, m: int, n: int, *, sigma: float, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Factors:
    """Survey eq. 9 (LoRA, Hu et al. 2021, arXiv 2106.09685): A ~ N(0, sigma^2) (r x n), B = 0 (m x r).

    B = 0 makes dW = B A = 0, so the model starts exactly as pre-trained, whatever A is.
    ``generator`` makes the draw reproducible (``None``: torch's global generator).

    Compared with peft: ``init_lora_weights="gaussian"`` draws A ~ N(0, (1/r)^2), standard
    deviation 1/r, from torch's global generator, and B = 0; so ``standard_init(r, m, n,
    sigma=1 / r)`` with a generator seeded s gives exactly peft's A after
    ``torch.manual_seed(s)`` (tested). peft's default, ``init_lora_weights=True`` (the
    reference implementation's), is *not* eq. 9: A is Kaiming-uniform with a = sqrt(5), i.e.
    uniform on [-1/sqrt(n), 1/sqrt(n)], of variance 1/(3n) but not Gaussian.
    Taught in ``book/part2/server_initialization.ipynb``.
    """
    check_rank(rank)
    for name, size in (("m", m), ("n", n)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}")
    sigma = check_sigma(sigma)
    a = torch.empty(rank, n, dtype=dtype).normal_(0.0, sigma, generator=generator)
    return a, torch.zeros(m, rank, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Eq. 10: FeDeRA, the SVD of the pre-trained weight
# ----------------------------------------------------------------------------------------
def svd_init(weight: Tensor, rank: int, *, scaling: float = 1.0, split: str = "balanced") -> Factors:
    """Survey eq. 10 (FeDeRA, Yan, Yang, Tang, Shi 2024, arXiv 2404.18848): A and B from the SVD of W_pre.

    With W_pre = U S V^T (m x n) and s = ``scaling`` (LoRA's alpha / r), the factors satisfy

        s B A = U[:, :r] S[:r, :r] V[:, :r]^T,

    the top-r part of W_pre, its best rank-r approximation (Eckart-Young). Written in the
    survey's shapes (A r x n, B m x r), eq. 10 is A = V[:, :r]^T and B = U[:, :r] S[:r, :r];
    the survey prints A = V[:, :r] (n x r) and B = U[:r, :] S[:r], which are transposed or
    sliced the wrong way for those shapes.

    ``split`` says where the singular values go. How FeDeRA's own text splits them could not
    be checked (its method section was not reachable; see :class:`FeDeRA`), so both
    readings are offered: ``"balanced"`` (default) puts sqrt(S_r / s) on each side,
    A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), the convention of PiSSA (Meng et al.
    2024, arXiv 2404.02948) and of peft's ``init_lora_weights="pissa"`` (tested equal);
    ``"B"`` puts them all into B, A = V_r^T and B = U_r S_r / s, as the survey's eq. 10
    writes it. The product, and so the initial model, is the same; the split changes only
    how fast each factor moves under training. Dividing by s is this package's convention
    (the paper's handling of alpha / r was not checked either). Computed in float64,
    returned in ``weight``'s dtype. Taught in ``book/part2/server_initialization.ipynb``.
    """
    _check_matrix("weight", weight)
    check_rank(rank)
    scaling = check_scaling(scaling)
    split = check_split(split)
    if rank > min(weight.shape):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(weight.shape)} of the weight {tuple(weight.shape)}")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    u_r, s_r, vh_r = u[:, :rank], s[:rank] / scaling, vh[:rank]
    if split == "balanced":
        root = s_r.sqrt()
        a, b = root[:, None] * vh_r, u_r * root[None, :]
    else:
        a, b = vh_r, u_r * s_r[None, :]
    return a.to(weight.dtype), b.to(weight.dtype)


def top_r_part(weight: Tensor, rank: int) -> Tensor:
    """U[:, :r] S[:r, :r] V[:, :r]^T of ``weight``: what FeDeRA moves from W' into the adapter."""
    _check_matrix("weight", weight)
    check_rank(rank)
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return ((u[:, :rank] * s[None, :rank]) @ vh[:rank]).to(weight.dtype)


def spectrum_share(weight: Tensor, rank: int) -> float:
    """sum_{i<=r} sigma_i^2 / sum_i sigma_i^2: the share of ||W||_F^2 held by the top-r part."""
    _check_matrix("weight", weight)
    check_rank(rank)
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return float((s[:rank] ** 2).sum() / (s**2).sum())


# ----------------------------------------------------------------------------------------
# SLoRA: a sparse stage, then the SVD of its update
# ----------------------------------------------------------------------------------------
def random_masks(shapes: Mapping[str, Sequence[int]], density: float, seed: int) -> dict[str, Tensor]:
    """SLoRA's fixed random sparse masks: per layer, exactly max(1, round(d * m * n)) entries set.

    One generator seeded with ``seed`` draws the layers in the order of ``shapes``, so every
    client regenerates the same masks from the seed the server broadcasts (8 bytes); the
    masks' positions never cross the network. Returns boolean m x n tensors (CPU).
    """
    density = check_density(density)
    generator = torch.Generator().manual_seed(int(seed))
    masks = {}
    for name, shape in shapes.items():
        m, n = (int(x) for x in shape)
        if m < 1 or n < 1:
            raise ValueError(f"shape of {name!r} must be two positive sizes, got {tuple(shape)}")
        count = max(1, int(round(density * m * n)))
        mask = torch.zeros(m * n, dtype=torch.bool)
        mask[torch.randperm(m * n, generator=generator)[:count]] = True
        masks[name] = mask.reshape(m, n)
    return masks


def sparse_bytes(masks: Mapping[str, Tensor], element_size: int = 4) -> int:
    """Bytes of one sparse update: one value per masked entry (positions come from the seed)."""
    if element_size < 1:
        raise ValueError(f"element_size must be >= 1, got {element_size}")
    return int(sum(int(mask.sum()) for mask in masks.values())) * element_size


def sparse_average(values: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_k p_k v_k per layer: FedAvg of the clients' masked values (exact: the mask is shared)."""
    if len(values) == 0:
        raise ValueError("values is empty: need at least one client's update")
    p = check_weights(weights, len(values))
    names = list(values[0])
    for k, v in enumerate(values):
        if list(v) != names:
            raise ValueError(f"values[{k}] has layers {list(v)[:3]}..., expected {names[:3]}...")
    return {name: average_tensors([v[name] for v in values], p) for name in names}


def scatter(values: Tensor, mask: Tensor) -> Tensor:
    """The dense m x n update with ``values`` at the masked positions and exact zeros elsewhere."""
    if values.ndim != 1 or values.numel() != int(mask.sum()):
        raise ValueError(f"values has shape {tuple(values.shape)}; the mask has {int(mask.sum())} entries")
    dense = values.new_zeros(mask.shape)
    dense[mask.to(values.device)] = values
    return dense


def slora_factors(delta: Tensor, rank: int, *, scaling: float = 1.0, split: str = "balanced") -> Factors:
    """SLoRA's stage 2 for one layer: (A, B) with s B A the best rank-r approximation of dW.

    ``delta`` is the update dW accumulated in stage 1 (m x n; Mao et al. 2024, section 6.1,
    describe SLoRA as decomposing "the accumulated gradient updates" by SVD). Truncated SVD,
    so ||dW - s B A||_F^2 = sum_{i>r} sigma_i(dW)^2, the least possible (Eckart-Young).
    ``split``: ``"balanced"`` (default) splits the singular values evenly between the
    factors (:func:`~fedlora_edu.core.svd.truncated_factors`); ``"B"`` puts them all in B,
    A = V_r^T, as the survey's eq. 10 writes its generalisation of SLoRA and FeDeRA. SLoRA's
    own split could not be checked; the product is the same either way.
    """
    _check_matrix("delta", delta)
    scaling = check_scaling(scaling)
    split = check_split(split)
    a, b = truncated_factors(delta.detach().to(torch.float64) / scaling, rank)
    if split == "B":
        # Each row of the balanced A is sqrt(sigma_i) v_i^T: move sqrt(sigma_i) into B's column i.
        root = torch.linalg.vector_norm(a, dim=1)
        a = torch.where(root[:, None] > 0, a / root.clamp_min(1e-300)[:, None], a)
        b = b * root[None, :]
    return a.to(delta.dtype), b.to(delta.dtype)


def sparse_local_train(
    model: torch.nn.Module, data: object, masks: Mapping[str, Tensor], *, steps: int, batch_size: int,
    learning_rate: float, seed: int, device: torch.device | None = None,
) -> float:
    """One client's SLoRA stage-1 training: AdamW on the masked entries of the adapted base weights and the head.

    The LoRA factors are frozen (their B is zero, so they add nothing); each adapted
    layer's W' trains with its gradient multiplied by the layer's mask, so an entry outside
    the mask gets a zero gradient and (AdamW without weight decay, zero moments) never
    moves. Uses the clients' :func:`~fedlora_edu.foundations.training.local_train` (same
    batches and optimiser as a LoRA round). Returns the mean loss; ``model``'s base weights and
    head are left trained, and every ``requires_grad`` flag as it was.
    """
    layers = adapter_io.lora_layers(model)
    if set(masks) != set(layers):
        raise ValueError(f"masks must name every LoRA layer of the model, got {sorted(masks)[:3]}...")
    lora_params = [p for layer in layers.values() for p in (layer.lora_A[adapter_io.ADAPTER].weight,
                                                            layer.lora_B[adapter_io.ADAPTER].weight)]
    flags = [p.requires_grad for p in lora_params]
    hooks = []
    try:
        for p in lora_params:
            p.requires_grad_(False)
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            mask = masks[name].to(weight.device, weight.dtype)
            weight.requires_grad_(True)
            hooks.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
        return local_train(model, data, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                           seed=seed, device=device)
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers.values():
            layer.get_base_layer().weight.requires_grad_(False)
        for p, flag in zip(lora_params, flags, strict=True):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------
# Weight divergence
# ----------------------------------------------------------------------------------------
def update_spread(deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> tuple[float, float]:
    """Spread of the clients' weight updates in one round: (absolute, relative).

    ``deltas[k][layer]`` is client k's change of the effective weight in the round,
    s (B_k A_k - B_0 A_0). Absolute: sqrt(sum_k p_k sum_layers ||D_k - D_bar||_F^2) with
    D_bar = sum_k p_k D_k, the weighted standard deviation of the updates. Relative: the same
    divided by sqrt(sum_k p_k sum_layers ||D_k||_F^2), in [0, 1]: 0 when every client moved the
    same way, 1 when the updates cancel on average. The relative value does not depend on
    how large the updates are, so methods whose factors start at different scales compare.
    """
    if len(deltas) == 0:
        raise ValueError("deltas is empty: need at least one client's update")
    p = check_weights(weights, len(deltas))
    spread = size = 0.0
    for name in deltas[0]:
        mean = average_tensors([d[name].double() for d in deltas], p)
        spread += sum(w * float(torch.linalg.matrix_norm(d[name].double() - mean) ** 2) for w, d in zip(p, deltas,
                                                                                                      strict=True))
        size += sum(w * float(torch.linalg.matrix_norm(d[name].double()) ** 2) for w, d in zip(p, deltas,
                                                                                             strict=True))
    absolute = math.sqrt(spread)
    return absolute, (absolute / math.sqrt(size) if size > 0 else 0.0)


# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------
def _layer_shapes(server: ServerState) -> dict[str, tuple[int, int, int]]:
    """(r, m, n) of every adapted layer, from the server's adapter."""
    return {name: (int(a.shape[0]), int(b.shape[0]), int(a.shape[1])) for name, (a, b) in server.adapters.items()}


class StandardInit(FedIT):
    """The standard server-side initialisation, survey eq. 9 (Hu et al. 2021): A ~ N(0, sigma^2), B = 0.

    The server draws every layer's A from a generator seeded with the run's seed (clients
    regenerate it from the seed) and sets B = 0; then FedIT's averaging. ``sigma`` is one
    standard deviation for every layer; ``None`` (default) takes sigma = 1 / sqrt(3 n) per
    layer, the variance of peft's default (Kaiming-uniform) A, so the only change from the
    simulator's usual start is the Gaussian shape that eq. 9 names.
    Taught in ``book/part2/server_initialization.ipynb``.
    """

    name = "standard init"
    paper = "Hu et al. 2021, ICLR 2022, arXiv 2106.09685"
    chapter = "book/part2/server_initialization"

    def __init__(self, rank: int | None = None, sigma: float | None = None) -> None:
        super().__init__(rank)
        self.sigma = None if sigma is None else check_sigma(sigma)

    def prepare(self, federation, model, server, seed):
        generator = torch.Generator().manual_seed(derive_seed(seed, "standard init"))
        adapters = {}
        for name, (r, m, n) in _layer_shapes(server).items():
            a0, b0 = server.adapters[name]
            sigma = self.sigma if self.sigma is not None else 1.0 / math.sqrt(3.0 * n)
            a, b = standard_init(r, m, n, sigma=sigma, generator=generator, dtype=a0.dtype)
            adapters[name] = (a.to(a0.device), b.to(b0.device))
        server.adapters = adapters


class FeDeRA(FedIT):
    """FeDeRA (Yan, Yang, Tang, Shi 2024, arXiv 2404.18848), survey eq. 10: LoRA from the SVD of W_pre.

    Before round 1 the server takes the truncated SVD of every adapted layer's pre-trained
    weight and sets A and B so that s B A is its top-r part (:func:`svd_init`), and
    subtracts that part from the frozen weight, W' = W_pre - s B A (``server.base_deltas``),
    so the model before round 1 is exactly the pre-trained one and the adapter trains the
    principal subspace of each weight. Then FedIT's averaging. Clients can compute the same
    factors from the pre-trained weights they hold, so nothing extra crosses the network.

    What rests on a source (the method section itself could not be read):

    - A and B come from the SVD of the pre-trained weights: the abstract (arXiv v3) says
      FeDeRA "initializes these matrices by the results of performing singular value
      decomposition (SVD) on the pre-trained weight matrices"; survey eq. 10.
    - The subtraction: a reviewer of the paper's conference submission writes "The purpose
      of adjusting W0<-W0-BA is to ensure that the model output is unchanged at the
      beginning" (OpenReview reviews stored in a public GitHub collection). A reader's
      account, not the paper's words, and it leaves the scaling s out.

    What could not be checked, and the package's choice:

    - where the singular values go: ``split="balanced"`` (default) sqrt(S_r) on each side,
      as PiSSA and peft's ``init_lora_weights="pissa"``; ``split="B"`` all in B, as the
      survey's eq. 10 writes it. Same product, same initial model;
    - the LoRA constant: s = alpha / r is divided out of the singular values so that s B A,
      what the model applies, is the top-r part;
    - which layers: every layer the adapter targets (in this book MiniLM's query and value).

    ``preserve=False`` keeps W' = W_pre (the model then starts at W_pre + top-r part, not
    pre-trained); it is there to show why the subtraction matters.
    Taught in ``book/part2/server_initialization.ipynb``.
    """

    name = "FeDeRA"
    paper = "Yan, Yang, Tang, Shi 2024, arXiv 2404.18848"
    chapter = "book/part2/server_initialization"

    def __init__(self, rank: int | None = None, split: str = "balanced", preserve: bool = True) -> None:
        super().__init__(rank)
        self.split = check_split(split)
        self.preserve = bool(preserve)

    def prepare(self, federation, model, server, seed):
        adapters, deltas = {}, {}
        for name, (r, _, _) in _layer_shapes(server).items():
            weight = adapter_io.base_weight(model, name).detach()
            a, b = svd_init(weight, r, scaling=server.scaling, split=self.split)
            adapters[name] = (a, b)
            if self.preserve:
                deltas[name] = -server.scaling * (b @ a)
        server.adapters = adapters
        server.base_deltas = deltas


class SLoRA(FedIT):
    """SLoRA (Babakniya, Elkordy, Ezzeldin, Liu, Song, El-Khamy, Avestimehr 2023, arXiv 2308.06522).

    Survey section 3.2, "data-driven initialisation". Two stages, stage 1 inside
    :meth:`prepare`, stage 2 the simulator's ordinary rounds:

    1. **Sparse fine-tuning.** The server broadcasts a seed; every client regenerates the
       same fixed random mask of density d on every adapted base weight
       (:func:`random_masks`). For ``stage1_rounds`` rounds, the sampled clients train only
       the masked entries (and the head) from the current global sparse update
       (:func:`sparse_local_train`) and send only the masked values; the server averages
       them (:func:`sparse_average`, exact since the mask is shared).
    2. **SVD initialisation.** The accumulated update dW (zero outside the mask) is factored
       by truncated SVD, s B A = best rank-r approximation of dW (:func:`slora_factors`), and
       by default the rest is folded into the frozen weight, W' = W_pre + dW - s B A, so the
       effective weight W' + s B A = W_pre + dW is exactly the model after stage 1. Ordinary
       FedLoRA (FedIT) rounds follow.

    What rests on a source (SLoRA's method section could not be read):

    - the two stages: the survey (section 3.2) says SLoRA "begins with sparse fine-tuning to
      find a mature starting point for LoRA, and then applies SVD to the fine-tuned
      parameters to initialize the low-rank matrices A and B for continual conventional LoRA
      tuning in FL"; Mao et al. 2024 (arXiv 2407.11046, section 6.1) that it "first performs
      sparse federated fine-tuning before applying LoRA and then performs SVD to decompose
      the accumulated gradient updates into low-rank matrices for LoRA initialization". So
      stage 1 is federated, and the SVD is of the update dW, not of the weights;
    - the density: the abstract reports "sparse updates with approximately ~1% density",
      hence ``density=0.01``; stage 1 sends sparse updates, stage 2 LoRA's A and B.

    What could not be checked, and the package's choice:

    - how the sparse entries are chosen: a fixed uniform random mask per adapted weight,
      regenerated from a broadcast seed, so only values cross the network;
    - what stage 1 trains: the masked entries of the adapted base weights and the task
      head; every other weight stays frozen;
    - its length: ``stage1_rounds`` (2), with the simulator's local steps, batch size,
      learning rate and clients per round unless overridden;
    - where the singular values go: ``split="balanced"`` (default) or ``"B"`` (survey eq. 10);
    - what becomes of dW beyond rank r: ``fold_residual=True`` (default) keeps it in W', so
      nothing stage 1 learned is lost; ``fold_residual=False`` starts stage 2 from
      W' = W_pre with the factors only, the plainest reading of "initialize the low-rank
      matrices A and B for continual conventional LoRA tuning", which loses the part of dW
      beyond rank r (the model after stage 1 is then not preserved).

    Bytes of stage 1 are counted at their real sparse size (one float32 value per masked
    entry, the positions come from the seed) and kept in ``server.method_state.record``: rounds,
    clients, ``bytes_up`` and ``bytes_down`` (values, head and the 8-byte seed), the sparse
    part alone (``sparse_bytes_up``), and per stage-1 round the test accuracy if
    ``evaluate`` is set. The simulator's history counts only stage 2; a chapter adds these.
    In stage 2, a client's first download also carries the final sparse update (its values,
    and the 8-byte mask seed): with ``fold_residual=True`` its frozen weight must become
    W_pre + dW - s B A, which it computes from dW and the A and B it downloads.

    Deviation from the reference code: SLoRA's authors published no code; the reference is the
    re-implementation in FlexLoRA's official code (alibaba/FederatedScope, branch FlexLoRA,
    commit 4643e1a5d972d0624b40ea2483b70863ee3807c8; ``main.py``, ``get_sparse`` and
    ``create_sparse_mask`` in ``fed_utils/client.py``, ``load_weight_SLoRA`` in
    ``fed_utils/adaptive_peft.py``). There stage 1 masks every parameter of the model, with a
    mask drawn afresh for each client and round (density 0.0012 in its homogeneous setting,
    ``--R_1`` = 5 rounds); at the switch the pre-trained model is reloaded and only the LoRA
    start carries stage 1 over, A = V_r^T and B = U_r S_r / s (all singular values in B), so
    the rest of what stage 1 learned is dropped. Ours trains the masked entries of the adapted
    weights (and the head) under one mask shared through a seed, for 2 rounds at density 0.01
    (the abstract's ~1%), splits the singular values evenly and folds dW - s B A into W';
    ``split="B"`` with ``fold_residual=False`` comes closest to the reference's switch. Why
    ours: a shared mask makes the average exact and sends only values, the folded residual keeps
    the model after stage 1 intact, and symmetric factors suit one learning rate. Stage 1's
    learning rate is not a deviation: like that code (one ``--local_learning_rate`` for both
    stages), ours reuses the LoRA rounds' learning rate on the dense weights unless
    ``stage1_learning_rate`` is given. The effect of the differences on accuracy is not yet
    measured; a study will measure it.
    Taught in ``book/part2/server_initialization.ipynb``.
    """

    name = "SLoRA"
    paper = "Babakniya et al. 2023, arXiv 2308.06522"
    chapter = "book/part2/server_initialization"

    @dataclass
    class State:
        """What stage 1 did: its record (rounds, clients, bytes, losses), the learned sparse update
        dW of every adapted layer, and the masks of the entries it trained."""

        record: dict = field(default_factory=dict)
        delta: dict[str, Tensor] = field(default_factory=dict)
        masks: dict[str, Tensor] = field(default_factory=dict)
        sparse_bytes: int = 0  # the final sparse update as it crosses the network: values and the mask seed

    @dataclass
    class ClientState:
        """Whether this client already holds stage 1's final sparse update (it needs it once, to build W')."""

        has_sparse_update: bool = False

    def __init__(
        self, rank: int | None = None, density: float = 0.01, stage1_rounds: int = 2, *,
        stage1_steps: int | None = None, stage1_learning_rate: float | None = None,
        clients_per_round: int | None = None, fold_residual: bool = True, split: str = "balanced",
        evaluate: bool = False,
    ) -> None:
        super().__init__(rank)
        self.density = check_density(density)
        self.split = check_split(split)
        for name, value in (("stage1_rounds", stage1_rounds), ("stage1_steps", stage1_steps),
                            ("clients_per_round", clients_per_round)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if stage1_learning_rate is not None and not stage1_learning_rate > 0:
            raise ValueError(f"stage1_learning_rate must be > 0, got {stage1_learning_rate!r}")
        self.stage1_rounds = stage1_rounds
        self.stage1_steps = stage1_steps
        self.stage1_learning_rate = stage1_learning_rate
        self.clients_per_round = clients_per_round
        self.fold_residual = bool(fold_residual)
        self.evaluate = bool(evaluate)

    def prepare(self, federation, model, server, seed):
        profile = federation.profile
        steps = self.stage1_steps or profile.local_steps
        learning_rate = self.stage1_learning_rate or profile.learning_rate
        per_round = min(self.clients_per_round or profile.clients_per_round, federation.num_clients)
        layers = adapter_io.lora_layers(model)
        pretrained = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
        mask_seed = derive_seed(seed, "SLoRA masks")
        masks = {name: mask.to(pretrained[name].device)
                 for name, mask in random_masks({n: w.shape for n, w in pretrained.items()}, self.density,
                                                mask_seed).items()}
        values = {name: pretrained[name].new_zeros(int(mask.sum())) for name, mask in masks.items()}
        head = {k: v.clone() for k, v in server.head.items()}
        saved_factors = adapter_io.get_lora_factors(model)
        adapter_io.set_lora_factors(model, {n: (a, torch.zeros_like(b)) for n, (a, b) in saved_factors.items()})
        element_size = pretrained[next(iter(pretrained))].element_size()
        value_bytes = sparse_bytes(masks, element_size)
        head_bytes = adapter_io.tensor_bytes(head)
        rng = np.random.default_rng(derive_seed(seed, "SLoRA stage-1 clients"))
        record = {"rounds": self.stage1_rounds, "density": self.density, "clients": 0, "bytes_up": 0,
                  "bytes_down": 0, "sparse_bytes_up": 0, "entries": value_bytes // element_size, "accuracy": [],
                  "train_loss": []}
        for t in range(self.stage1_rounds):
            sampled = sorted(rng.choice(federation.num_clients, size=per_round, replace=False).tolist())
            client_values, client_heads, sizes, losses = [], [], [], []
            for k in sampled:
                self._load(layers, pretrained, masks, values)
                adapter_io.set_head_state(model, head)
                loss = sparse_local_train(model, federation.clients[k], masks, steps=steps,
                                          batch_size=profile.batch_size, learning_rate=learning_rate,
                                          seed=derive_seed(seed, "SLoRA stage-1 batches", t, k),
                                          device=federation.device)
                client_values.append({name: (layer.get_base_layer().weight.detach() - pretrained[name])[masks[name]]
                                      for name, layer in layers.items()})
                client_heads.append(adapter_io.get_head_state(model))
                sizes.append(len(federation.clients[k]))
                losses.append(loss)
            weights = [s / sum(sizes) for s in sizes]
            values = sparse_average(client_values, weights)
            head = {key: average_tensors([h[key] for h in client_heads], weights) for key in head}
            record["clients"] += len(sampled)
            record["sparse_bytes_up"] += len(sampled) * value_bytes
            record["bytes_up"] += len(sampled) * (value_bytes + head_bytes)
            # Down: the seed, the head and the current sparse values (none before the first aggregation).
            record["bytes_down"] += len(sampled) * (SEED_BYTES + head_bytes + (value_bytes if t > 0 else 0))
            record["train_loss"].append(float(np.mean(losses)))
            if self.evaluate:
                self._load(layers, pretrained, masks, values)
                adapter_io.set_head_state(model, head)
                record["accuracy"].append(evaluate(model, federation.test, device=federation.device)[0])
        # Back to W_pre and the original adapter; stage 2 starts from the factors of dW.
        with torch.no_grad():
            for name, layer in layers.items():
                layer.get_base_layer().weight.copy_(pretrained[name])
        adapter_io.set_lora_factors(model, saved_factors)
        deltas = {name: scatter(values[name], masks[name]) for name in layers}
        adapters, base_deltas = {}, {}
        for name, (r, _, _) in _layer_shapes(server).items():
            a, b = slora_factors(deltas[name], r, scaling=server.scaling, split=self.split)
            adapters[name] = (a, b)
            base_deltas[name] = deltas[name] - server.scaling * (b @ a) if self.fold_residual \
                else torch.zeros_like(deltas[name])
        server.adapters = adapters
        server.head = head
        server.base_deltas = base_deltas
        server.method_state.record = record
        server.method_state.delta = deltas
        server.method_state.masks = masks
        server.method_state.sparse_bytes = value_bytes + SEED_BYTES if self.fold_residual else 0

    def client_start(self, server, client_id, client_state, round_index):
        """FedIT's download, plus stage 1's final sparse update the first time a client takes part in stage 2."""
        start = super().client_start(server, client_id, client_state, round_index)
        if not client_state.has_sparse_update:
            client_state.has_sparse_update = True
            start.download = Payload(start.download.tensors,
                                     nbytes=start.download.nbytes + server.method_state.sparse_bytes)
        return start

    @staticmethod
    def _load(layers, pretrained, masks, values) -> None:
        """W' <- W_pre + scatter(values) in every adapted layer (the global model of stage 1)."""
        with torch.no_grad():
            for name, layer in layers.items():
                layer.get_base_layer().weight.copy_(pretrained[name] + scatter(values[name], masks[name]))

