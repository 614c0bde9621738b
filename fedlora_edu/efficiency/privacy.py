"""Privacy as a cost: differentially private federated LoRA, and why FFA-LoRA freezes A.

Survey notation: a LoRA layer holds ``A`` (r x n) and ``B`` (m x r), ``dW = B A``. What a
client's round changed is ``(A_k - A, B_k - B)`` (and the head's change, when it trains).

- :class:`DPFedAvg`, user-level differential privacy for any method whose upload is its factors
  (DP-FedAvg, McMahan, Ramage, Talwar, Zhang 2018, ICLR, arXiv 1710.06963, Algorithm 1): each
  sampled client's change of the round is clipped to L2 norm ``C`` (:func:`clip_update`), the
  server adds Gaussian noise ``N(0, (z C)^2 I)`` to the sum of the clipped changes and divides by
  the number of clients of the round (:func:`noisy_mean`), then hands the result to the wrapped
  method's own aggregation as a single client holding ``global + noisy mean change``. Wrapping
  FedIT, noise falls on A and B; wrapping FFA-LoRA (A frozen, never sent), on B only.
- :func:`epsilon_spent` (and :func:`epsilon_curve` for several T): the privacy spent after T
  rounds, epsilon at a given delta, from a maintained accountant (opacus's RDP accountant,
  Mironov 2017; the sampled Gaussian mechanism, Mironov, Talwar, Zhang 2019) with sampling rate
  q = clients per round / clients and noise multiplier z, one composition step per round.
- :func:`product_noise_error` and :func:`expected_product_error`: FFA-LoRA's argument (Sun, Li,
  Li, Ding 2024, ICLR, arXiv 2403.12313, section 3): with noise ``E_A``, ``E_B`` on both factors,
  ``(B + E_B)(A + E_A) - B A = E_B A + B E_A + E_B E_A``, whose last term is a product of two
  noises; with A frozen, only ``E_B A`` remains, linear in the noise.

Which variant of DP-FedAvg, and the choices that are ours (the papers leave them open or the
simulator fixes them):

- The fixed-denominator estimator of McMahan et al. with every client weighted 1 (their
  ``w_k = 1``): the noisy sum is divided by the number of clients of the round, which the
  simulator fixes (``clients_per_round``), so the denominator is exact and public. Weighting by
  n_k, as FedIT does without privacy, would let one client's data size raise its influence, and
  the sensitivity would no longer be ``C``.
- Flat clipping: one norm over every tensor a client sends (all layers' factors and the head),
  not per layer (McMahan et al. describe both; flat is the simpler).
- Sampling: the simulator draws a fixed number of clients per round without replacement; the
  accountant's analysis is for Poisson sampling with rate q. We report the Poisson accountant's
  epsilon at q = clients per round / clients, as most DP federated code does; for fixed-size
  sampling this is an approximation, not a proof.
- The noise is added at the server (a trusted aggregator, or one behind secure aggregation);
  its generator is seeded from the run's seed and the round.
- No server optimiser: the noisy mean change is added as it is (server rate 1).

Taught in ``book/part4/privacy.ipynb``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import ClientStart, LocalResult, Payload, ServerState, Strategy, Upload
from fedlora_edu.distributed.discordance import FedIT

DEFAULT_DELTA = 1e-5


# ----- clipping and noise: the mechanism ---------------------------------------------------------------------------
def update_norm(tensors: Mapping[str, Tensor]) -> float:
    """The L2 norm of all ``tensors`` together, as one flat vector."""
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors.values()))


def clip_update(change: Mapping[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """``change * min(1, C / ||change||)`` over all its tensors together (flat clipping), and the norm before.

    After clipping the change's norm is at most ``clip_norm`` (DP-FedAvg, McMahan et al. 2018,
    Algorithm 1, ``ClipFn``); a change already inside the ball is returned unchanged.
    ``clip_norm=math.inf`` clips nothing.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    norm = update_norm(change)
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    return {key: value * factor for key, value in change.items()}, norm


def noisy_mean(changes: Sequence[Mapping[str, Tensor]], clip_norm: float, noise_multiplier: float,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """``(sum_k clipped_k + N(0, (z C)^2 I)) / K`` per tensor: the server's step of DP-FedAvg (fixed denominator K).

    ``changes`` are the clients' changes, already clipped to ``clip_norm`` (``C``); ``K`` is their
    number; every entry of the sum gets its own independent noise of standard deviation
    ``z C``, whatever the number of entries. ``noise_multiplier=0`` returns the plain mean.
    """
    if not changes:
        raise ValueError("noisy_mean needs at least one client's change")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    std = noise_multiplier * clip_norm
    if noise_multiplier > 0 and not math.isfinite(std):
        raise ValueError("noise needs a finite clip_norm")
    out = {}
    for key in changes[0]:
        total = sum(change[key].detach().float() for change in changes)
        if noise_multiplier > 0:
            total = total + std * torch.randn(total.shape, generator=generator).to(total)
        out[key] = total / len(changes)
    return out


# ----- the accountant ----------------------------------------------------------------------------------------------
def _check_accounting(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> None:
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of DP-FedAvg, by opacus's RDP accountant.

    One step of the sampled Gaussian mechanism per round, with sampling rate ``sample_rate``
    (q = clients per round / clients) and noise multiplier ``noise_multiplier`` (z, the noise's
    standard deviation over the clip norm): what ``opacus.accountants.RDPAccountant`` reports
    after ``rounds`` steps. No noise, no guarantee: ``math.inf`` for z = 0; nothing released,
    nothing spent: 0 for no rounds. Where the best Renyi order is at an end of opacus's default
    orders (very little or very much noise), opacus warns that more orders could tighten the bound;
    the warning is silenced here, the epsilon is still a valid upper bound.
    """
    return epsilon_curve(noise_multiplier, sample_rate, [rounds], delta)[0]


def epsilon_curve(noise_multiplier: float, sample_rate: float, rounds: Sequence[int],
                  delta: float = DEFAULT_DELTA) -> list[float]:
    """:func:`epsilon_spent` after each number of rounds in ``rounds``, the accountant's analysis run once.

    Renyi DP composes by addition, so T rounds spend T times one round's RDP at every order
    (opacus's ``compute_rdp`` multiplies by the steps the same way); the analysis of one round,
    which takes most of the time, is computed once for all T.
    """
    for count in rounds:
        _check_accounting(noise_multiplier, sample_rate, count, delta)
    if noise_multiplier == 0:
        return [0.0 if count == 0 else math.inf for count in rounds]
    # imported here, not at the top: importing opacus takes seconds (it loads its whole training stack), and the
    # registry imports this module, so every chapter would pay for it
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    one_round = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)
    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        for count in rounds:
            out.append(0.0 if count == 0 else float(get_privacy_spent(orders=orders, rdp=one_round * count,
                                                                       delta=delta)[0]))
    return out


def noise_multiplier_for(epsilon: float, sample_rate: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """The smallest noise multiplier z that spends at most ``epsilon`` at ``delta`` in ``rounds`` rounds.

    opacus's search (``get_noise_multiplier``, RDP accountant, tolerance 0.01 in epsilon).
    """
    _check_accounting(1.0, sample_rate, rounds, delta)
    if not epsilon > 0 or rounds < 1:
        raise ValueError(f"need epsilon > 0 and rounds >= 1, got {epsilon!r} and {rounds!r}")
    from opacus.accountants.utils import get_noise_multiplier  # imported here: see epsilon_spent

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=rounds, accountant="rdp"))


# ----- FFA-LoRA's argument: noise in the product ---------------------------------------------------------------------
def _check_sides(noise_on: str) -> str:
    if noise_on not in ("AB", "B"):
        raise ValueError(f"noise_on must be 'AB' (both factors) or 'B' (B only), got {noise_on!r}")
    return noise_on


def product_noise_error(A: Tensor, B: Tensor, std: float, noise_on: str = "AB",
                        generator: torch.Generator | None = None) -> float:
    """``||(B + E_B)(A + E_A) - B A||_F`` for one draw of i.i.d. N(0, std^2) noise on the factors.

    ``noise_on="AB"``: noise on both factors (FedIT under DP), so the error is
    ``E_B A + B E_A + E_B E_A``; ``"B"``: A frozen and noiseless (FFA-LoRA), the error is ``E_B A``,
    linear in the noise.
    """
    _check_sides(noise_on)
    noise_b = std * torch.randn(B.shape, generator=generator, dtype=torch.float64)
    noise_a = std * torch.randn(A.shape, generator=generator, dtype=torch.float64) if noise_on == "AB" else 0.0
    A, B = A.double(), B.double()
    return float(torch.linalg.matrix_norm((B + noise_b) @ (A + noise_a) - B @ A))


def expected_product_error(A: Tensor, B: Tensor, std: float, noise_on: str = "AB") -> float:
    """``sqrt(E ||(B + E_B)(A + E_A) - B A||_F^2)`` in closed form, A r x n, B m x r.

    The three terms are uncorrelated with mean zero, so their expected squares add:
    ``E||E_B A||^2 = std^2 m ||A||^2``, ``E||B E_A||^2 = std^2 n ||B||^2`` and
    ``E||E_B E_A||^2 = std^4 m r n``; with noise on B only, the first alone.
    """
    _check_sides(noise_on)
    (r, n), m = A.shape, B.shape[0]
    square = std ** 2 * m * float(A.double().square().sum())
    if noise_on == "AB":
        square += std ** 2 * n * float(B.double().square().sum()) + std ** 4 * m * r * n
    return math.sqrt(square)


# ----- the wrapper -------------------------------------------------------------------------------------------------
def _flat_start(start: ClientStart) -> dict[str, Tensor]:
    tensors = {}
    for name, (a, b) in start.adapters.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = a.detach().clone(), b.detach().clone()
    tensors.update({f"head.{key}": value.detach().clone() for key, value in start.head.items()})
    return tensors


def _server_tensor(server: ServerState, key: str) -> Tensor:
    """The server's current tensor under an upload's key (``<layer>.A``, ``<layer>.B``, ``head.<key>``)."""
    if key.startswith("head."):
        return server.head[key.removeprefix("head.")]
    name, _, side = key.rpartition(".")
    if side not in ("A", "B") or name not in server.adapters:
        raise ValueError(f"DP-FedAvg wraps methods whose upload is the factors and the head; got the key {key!r}")
    return server.adapters[name][0 if side == "A" else 1]


class DPFedAvg(Strategy):
    """User-level DP-FedAvg (McMahan et al. 2018) around a method whose upload is its factors: FedIT by default.

    Each client trains as the wrapped method (``inner``) says; its upload becomes its change of the
    round, clipped to L2 norm ``clip_norm`` over everything it sends (:func:`clip_update`). The
    server adds ``N(0, (noise_multiplier * clip_norm)^2 I)`` to the sum of the clipped changes,
    divides by the number of clients (:func:`noisy_mean`) and lets ``inner`` aggregate one
    upload, ``global + noisy mean change``: for FedIT (A and B sent) and FFA-LoRA (B sent, A frozen)
    that is the global adapter plus the noisy mean change of what was sent. The payload has the
    shape of ``inner``'s, so its bytes are the same. ``inner`` must upload dense factors of the
    server's shapes (FedIT, FFA-LoRA, RoLoRA, ...) and may not override ``local_training``.
    The privacy spent is :func:`epsilon_spent`. Each client's norm before clipping is kept in
    :attr:`update_norms` (one dict per client and round, reset at the start of a run). The
    variant and what is our choice: the module docstring.
    """

    name = "DP-FedAvg"
    paper = "McMahan, Ramage, Talwar, Zhang 2018, ICLR, arXiv 1710.06963"
    chapter = "book/part4/privacy"

    @dataclass
    class ClientState:
        """The wrapped method's client state, and where the client started its round (flattened)."""

        inner: Any = None
        start: dict[str, Tensor] = field(default_factory=dict)

    def __init__(self, inner: Strategy | None = None, *, clip_norm: float = 1.0, noise_multiplier: float = 1.0) -> None:
        inner = FedIT() if inner is None else inner
        if not isinstance(inner, Strategy) or isinstance(inner, DPFedAvg):
            raise TypeError(f"inner must be a Strategy other than DP-FedAvg, got {inner!r}")
        if type(inner).local_training is not Strategy.local_training:
            raise ValueError(f"{inner.name} trains in a reparametrisation (local_training); DP-FedAvg cannot wrap it")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
        if noise_multiplier < 0 or (noise_multiplier > 0 and not math.isfinite(clip_norm)):
            raise ValueError(f"noise_multiplier must be >= 0 (and > 0 needs a finite clip_norm), "
                             f"got {noise_multiplier!r}")
        super().__init__(inner.rank)
        self.inner, self.clip_norm, self.noise_multiplier = inner, float(clip_norm), float(noise_multiplier)
        self.update_norms: list[dict[str, float]] = []

    # the wrapped method decides everything but the upload and the server's step
    def new_state(self) -> Any:
        return self.inner.new_state()

    def new_client_state(self) -> Any:
        return self.ClientState(inner=self.inner.new_client_state())

    def batched_training_obstacle(self) -> str | None:
        return self.inner.batched_training_obstacle()

    def client_rank(self, client_id: int, server: ServerState) -> int:
        return self.inner.client_rank(client_id, server)

    def max_rank(self, num_clients: int) -> int | None:
        return self.inner.max_rank(num_clients)

    def init_server(self, server: ServerState, seed: int) -> None:
        self.update_norms = []
        self.inner.init_server(server, seed)

    def prepare(self, federation: object, model: torch.nn.Module, server: ServerState, seed: int) -> None:
        self.inner.prepare(federation, model, server, seed)

    def sample_clients(self, round_index, num_clients, clients_per_round, rng):
        return self.inner.sample_clients(round_index, num_clients, clients_per_round, rng)

    def trainable(self, round_index: int) -> frozenset[str]:
        return self.inner.trainable(round_index)

    def personal_model(self, server, client_id, client_state):
        return self.inner.personal_model(server, client_id, client_state.inner)

    def serving(self, model, server, client_id, client_state):
        return self.inner.serving(model, server, client_id, client_state.inner)

    def client_start(self, server: ServerState, client_id: int, client_state: Any, round_index: int) -> ClientStart:
        start = self.inner.client_start(server, client_id, client_state.inner, round_index)
        client_state.start = _flat_start(start)
        return start

    def client_upload(self, result: LocalResult, client_state: Any, round_index: int) -> Payload:
        """The wrapped method's upload turned into its change of the round, clipped to ``clip_norm`` (flat)."""
        sent = self.inner.client_upload(result, client_state.inner, round_index).tensors
        missing = sorted(set(sent) - set(client_state.start))
        if missing:
            raise ValueError(f"DP-FedAvg wraps methods whose upload is the factors and the head; got {missing}")
        change = {key: value.detach() - client_state.start[key].to(value) for key, value in sent.items()}
        clipped, norm = clip_update(change, self.clip_norm)
        self.update_norms.append({"round": round_index + 1, "client": result.client_id, "norm": norm})
        return Payload(clipped)

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        """The noisy mean of the clipped changes (weights 1), added to the global tensors by ``inner``'s own rule."""
        generator = torch.Generator().manual_seed(derive_seed(server.seed, "DP-FedAvg noise", round_index))
        mean = noisy_mean([upload.payload.tensors for upload in uploads], self.clip_norm, self.noise_multiplier,
                          generator)
        tensors = {}
        for key, value in mean.items():
            current = _server_tensor(server, key)
            if current.shape != value.shape:
                raise ValueError(f"DP-FedAvg needs uploads of the server's shapes; {key} is {tuple(value.shape)}, "
                                 f"the server's {tuple(current.shape)}")
            tensors[key] = current + value.to(current)
        self.inner.aggregate(server, [Upload(uploads[0].client_id, 1, Payload(tensors), server.rank)], round_index)
