"""Numbers a chapter may claim: accuracy relative to what LoRA can add, and intervals over seeds.

- :func:`gain_recovered`: a federated method's accuracy as the share of the centralized LoRA
  gain over the linear probe that it recovers, (acc - probe) / (centralized - probe): 0 means
  no better than the frozen features, 1 as good as fine-tuning on the pooled data.
- :func:`interval`: the mean over seeds with a two-sided Student-t confidence interval.
- :func:`paired_difference`: the difference of two methods run on the same seeds, with its
  interval, and whether that interval excludes zero: the only case in which a chapter says
  one method is ahead; otherwise it says "not distinguishable here".

Taught in ``book/part1/federated_learning.ipynb`` (what a probe and an adapter reach) and used by
every chapter that compares methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom (standard tables); beyond, the normal's.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_95(degrees_of_freedom: int) -> float:
    """The 97.5% quantile of Student's t (two-sided 95%); 1.96 from 31 degrees of freedom on."""
    if isinstance(degrees_of_freedom, bool) or not isinstance(degrees_of_freedom, int) or degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom must be an integer >= 1, got {degrees_of_freedom!r}")
    return _T95[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T95) else 1.96


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its 95% interval [``low``, ``high``]."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """True when ``value`` lies outside the interval."""
        return not self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half_width:.3f} (95%, n = {self.n})"


def _values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"{name} needs at least two values (seeds) for an interval, got {array.size}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or Inf: {array.tolist()}")
    return array


def interval(values: Sequence[float]) -> Interval:
    """Mean of ``values`` (one per seed) with the 95% Student-t interval, mean ± t s / sqrt(n)."""
    array = _values(values, "values")
    n = array.size
    half = t_quantile_95(n - 1) * array.std(ddof=1) / math.sqrt(n)
    mean = float(array.mean())
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """The interval of a - b over seeds run in pairs (seed s of ``a`` with seed s of ``b``).

    Runs with the same seed share clients, batches and starting adapter, so the paired
    difference has far less noise than the two means apart. ``excludes(0)`` is the test a
    chapter uses before it says that one method is ahead.
    """
    first, second = _values(a, "a"), _values(b, "b")
    if first.size != second.size:
        raise ValueError(f"a and b must hold one value per seed each, got {first.size} and {second.size}")
    return interval(first - second)


def gain_recovered(accuracy: float | Sequence[float] | np.ndarray, probe: float, centralized: float) -> np.ndarray:
    """(accuracy - probe) / (centralized - probe): the share of LoRA's centralized gain over the probe recovered.

    Raises when centralized LoRA does not beat the probe: then there is no gain to recover, and
    the testbed is not one where the adapter is what learns.
    """
    if not centralized > probe:
        raise ValueError(f"centralized accuracy {centralized:.4f} does not exceed the probe's {probe:.4f}: "
                         "no gain to recover")
    return (np.asarray(accuracy, dtype=float) - probe) / (centralized - probe)
