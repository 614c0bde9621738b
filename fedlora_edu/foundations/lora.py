"""LoRA written from scratch, for teaching.

The survey (arXiv 2505.13502) writes LoRA as its eq. 2:

    W = W' + dW = W' + B A,    A in R^{r x n},  B in R^{m x r},  r << min(m, n),

where W' (m x n, i.e. ``out_features x in_features``) is the frozen pretrained weight and only
A and B are trained (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685). Hu et al. scale the update by ``alpha / r`` so that changing the rank does
not force retuning the learning rate. The standard initialisation is the survey's eq. 9: A
random, B = 0, so training starts exactly from the pretrained model.

The chapter "book/part1/lora.ipynb" teaches this module and checks it against peft's layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "LoRALinear",
    "apply_lora",
    "full_parameter_count",
    "lora_parameter_count",
    "lora_state",
]

InitName = Literal["kaiming", "gaussian"]


def _check_positive_int(value: object, name: str) -> int:
    # bool is a subclass of int; True as a rank is almost certainly a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return value


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (survey eq. 2, Hu et al. 2021).

    Implements ``W = W' + dW = W' + (alpha / r) B A`` from the survey's eq. 2 (arXiv 2505.13502)
    and LoRA (Hu et al. 2021, arXiv 2106.09685). The base weight ``W'`` has shape ``m x n``
    (``out_features x in_features``); ``lora_A`` is ``r x n`` and ``lora_B`` is ``m x r``, plain
    ``nn.Parameter``s so that the math reads exactly like the equation. The update is scaled
    by ``scaling = alpha / r``, as in Hu et al. and peft.

    Initialisation follows the survey's eq. 9 (A random, B = 0), so a fresh layer computes
    exactly what the base layer computes:

    * ``init="kaiming"`` (default, what peft does with ``init_lora_weights=True``): A is drawn
      with ``nn.init.kaiming_uniform_(A, a=sqrt(5))``, the default init of ``nn.Linear``, i.e.
      uniform on ``[-1/sqrt(n), 1/sqrt(n)]``.
    * ``init="gaussian"`` (peft's ``init_lora_weights="gaussian"``, literally eq. 9): A is
      ``N(0, sigma^2)`` with ``sigma = 1 / r``.

    The random draw uses ``generator`` if given, else a fresh ``torch.Generator`` seeded with
    ``seed``; the global RNG is never touched, and A is drawn on the CPU in float32 before being
    moved to the base layer's device and dtype, so the same seed gives the same A everywhere.

    Args:
        base: the pretrained ``nn.Linear`` to adapt; its parameters are frozen in place.
        rank: r, the rank of the update (>= 1).
        alpha: LoRA's alpha (> 0); the update is scaled by ``alpha / rank``.
        dropout: dropout probability applied to the adapter's input, in ``[0, 1)``.
        init: ``"kaiming"`` or ``"gaussian"``, how A is drawn (B is always zero).
        seed: seed of the generator used for A when ``generator`` is None.
        generator: an explicit ``torch.Generator`` (CPU) for A, e.g. shared across layers.

    Taught in the chapter "book/part1/lora.ipynb".
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        init: InitName = "kaiming",
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
        rank = _check_positive_int(rank, "rank")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")

        self.base = base
        # W' stays frozen: only A and B are trained (the point of eq. 2).
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)

        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.merged = False

        m, n = base.out_features, base.in_features
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        a_init = torch.empty(rank, n, dtype=torch.float32)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a_init, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a_init, mean=0.0, std=1.0 / rank, generator=generator)
        weight = base.weight
        self.lora_A = nn.Parameter(a_init.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(m, rank, device=weight.device, dtype=weight.dtype))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> LoRALinear:
        """Wrap ``linear`` in a LoRA layer, ``W = W' + B A`` (survey eq. 2, Hu et al. 2021).

        Same as ``LoRALinear(linear, rank, alpha, dropout=dropout, seed=seed)``: A is
        Kaiming-uniform (peft's default), B is zero (survey eq. 9). See Hu et al. 2021, LoRA,
        arXiv 2106.09685. Taught in the chapter "book/part1/lora.ipynb".
        """
        return cls(linear, rank, alpha, dropout=dropout, seed=seed)

    @property
    def in_features(self) -> int:
        """n, the input size of the base weight W' (m x n) in survey eq. 2.

        Taught in the chapter "book/part1/lora.ipynb" (Hu et al. 2021, arXiv 2106.09685).
        """
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """m, the output size of the base weight W' (m x n) in survey eq. 2.

        Taught in the chapter "book/part1/lora.ipynb" (Hu et al. 2021, arXiv 2106.09685).
        """
        return self.base.out_features

    def set_factors(self, A: Tensor, B: Tensor) -> None:
        """Copy given factors into ``lora_A`` (r x n) and ``lora_B`` (m x r) of survey eq. 2.

        The shapes follow the survey's notation (and peft's ``lora_A.weight`` /
        ``lora_B.weight``); a transposed factor raises ValueError naming ``A`` or ``B``. Used
        to load factors received from a server or read from peft. Hu et al. 2021, LoRA,
        arXiv 2106.09685. Taught in the chapter "book/part1/lora.ipynb".
        """
        expected_a = (self.rank, self.in_features)
        expected_b = (self.out_features, self.rank)
        if tuple(A.shape) != expected_a:
            raise ValueError(f"A must have shape (r, n) = {expected_a}, got {tuple(A.shape)}")
        if tuple(B.shape) != expected_b:
            raise ValueError(f"B must have shape (m, r) = {expected_b}, got {tuple(B.shape)}")
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)

    def delta_weight(self) -> Tensor:
        """The weight update ``dW = (alpha / r) B A`` (m x n) of survey eq. 2.

        Hu et al. 2021 (LoRA, arXiv 2106.09685) scale ``B A`` by ``alpha / r``; this returns
        the scaled product, the quantity that ``merge`` adds to W'. Taught in the chapter
        "book/part1/lora.ipynb".
        """
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        """``y = W' x + b + (alpha / r) B A dropout(x)``, survey eq. 2 applied to an input.

        After ``merge`` W' already contains dW, so only the base layer runs. Hu et al. 2021,
        LoRA, arXiv 2106.09685. Taught in the chapter "book/part1/lora.ipynb".
        """
        result = self.base(x)
        if self.merged:
            return result
        # Multiply right to left, (x A^T) B^T, and never form B A: per token this costs
        # r n + m r = O(r (m + n)) operations instead of the O(m n) of a dense m x n product,
        # and no m x n matrix is materialised (nor its gradient during training).
        update = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T
        return result + self.scaling * update

    def merge(self) -> None:
        """Fold the update into the base weight, ``W' <- W' + (alpha / r) B A`` (survey eq. 2).

        After merging, ``forward`` runs only the base layer: inference costs exactly as much as
        the pretrained model (Hu et al. 2021, LoRA, arXiv 2106.09685, "no additional inference
        latency"). Raises RuntimeError if the layer is already merged. Taught in the chapter
        "book/part1/lora.ipynb".
        """
        if self.merged:
            raise RuntimeError("merge(): the adapter is already merged; call unmerge() first")
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge``: ``W' <- W' - (alpha / r) B A`` (survey eq. 2).

        Restores the pretrained weight up to floating-point rounding, so the adapter can be
        trained further or swapped (Hu et al. 2021, LoRA, arXiv 2106.09685). Raises
        RuntimeError if the layer is not merged. Taught in the chapter "book/part1/lora.ipynb".
        """
        if not self.merged:
            raise RuntimeError("unmerge(): the adapter is not merged; call merge() first")
        with torch.no_grad():
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling}, merged={self.merged}"
        )


def lora_parameter_count(m: int, n: int, r: int) -> int:
    """Trainable parameters of one LoRA update, ``r (m + n)``: A is r x n, B is m x r (eq. 2).

    Compare with ``full_parameter_count(m, n) = m n`` for fine-tuning W' itself (survey eq. 2;
    Hu et al. 2021, LoRA, arXiv 2106.09685). Each argument must be a positive integer, else
    ValueError naming it. Taught in the chapter "book/part1/lora.ipynb".
    """
    m = _check_positive_int(m, "m")
    n = _check_positive_int(n, "n")
    r = _check_positive_int(r, "r")
    return r * (m + n)


def full_parameter_count(m: int, n: int) -> int:
    """Parameters of a full m x n weight W' (survey eq. 2), ``m n``: what full fine-tuning trains.

    The baseline against which ``lora_parameter_count`` is compared (Hu et al. 2021, LoRA,
    arXiv 2106.09685). Each argument must be a positive integer, else ValueError naming it.
    Taught in the chapter "book/part1/lora.ipynb".
    """
    m = _check_positive_int(m, "m")
    n = _check_positive_int(n, "n")
    return m * n


def _matches(name: str, targets: Sequence[str]) -> bool:
    # Match whole dotted components, like peft: "value" matches "attention.self.value" but not
    # "attention.self.key_value".
    return any(name == target or name.endswith("." + target) for target in targets)


def apply_lora(
    model: nn.Module,
    target_modules: Sequence[str],
    rank: int,
    alpha: float,
    *,
    seed: int = 0,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` in ``model`` by a ``LoRALinear`` (survey eq. 2).

    A module matches when its dotted name equals a target or ends with ``"." + target`` (e.g.
    ``["query", "value"]`` hits ``bert.encoder.layer.0.attention.self.query``). Every other
    parameter of the model is frozen, so only the A and B factors train (Hu et al. 2021, LoRA,
    arXiv 2106.09685). One generator seeded with ``seed`` draws all A factors in module order,
    so layers get different A but the same seed gives the same model. The model is changed in
    place and returned. Raises ValueError naming ``target_modules`` if it is empty or matches
    no ``nn.Linear``. Taught in the chapter "book/part1/lora.ipynb".
    """
    if isinstance(target_modules, str):
        raise ValueError(
            "target_modules must be a sequence of names such as ['query'], "
            f"got the string {target_modules!r}"
        )
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules must name at least one module")
    # Validate rank / alpha once, before touching the model.
    _check_positive_int(rank, "rank")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")

    matched = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, targets)
    ]
    if not matched:
        raise ValueError(f"target_modules {targets} matched no torch.nn.Linear in the model")

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in matched:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child_name)
        setattr(parent, child_name, LoRALinear(linear, rank, alpha, generator=generator))
    return model


def lora_state(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Copies of every LoRA factor pair in ``model``: module name -> (A (r x n), B (m x r)).

    These pairs are what a FedLoRA client uploads instead of the full weights (survey eq. 2;
    Hu et al. 2021, LoRA, arXiv 2106.09685). The tensors are detached clones, so changing them
    does not change the model. Taught in the chapter "book/part1/lora.ipynb".
    """
    return {
        name: (module.lora_A.detach().clone(), module.lora_B.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }
