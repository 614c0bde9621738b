"""Methods compared over seeds, from a stored study: what a chapter may say about accuracy.

A stored study (``studies/part2.py``) holds, per seed, every method's run on the testbed and two
anchors: the probe (where every run starts) and centralised LoRA on the pooled data.
:class:`Comparison` reads it and answers the questions a chapter asks:

- :meth:`Comparison.table`: per method, the final accuracy, what it gained over the probe, and
  the share of centralised LoRA's gain over the probe it recovers (only where centralised LoRA
  beat the probe on every seed, :attr:`Comparison.recoverable`), each as a mean over seeds with
  its 95% interval, and how it compares with a reference method on the same seeds;
- :meth:`Comparison.runs`: a method's runs, one per seed, at the study's own settings or at one of
  the settings it varies for some methods (:data:`VARIED`, for instance FedIT at another learning
  rate or number of local steps);
- :meth:`Comparison.reference_deviation`: what running a method as its authors' code does, where
  the package departs from it (``studies/deviations.py``), changes against the package's run;
- a study may hold runs under several profiles (``studies/part2.py --profile gpu`` appends to the same
  file); a :class:`Comparison` reads one, ``cpu`` unless told, and :attr:`Comparison.methods` says which
  methods it has on every seed;
- :meth:`Comparison.verdict`: whether methods are ahead of (or behind) a reference with the
  interval of the paired difference excluding zero: "agrees" with an expected side, "disagrees",
  or "not distinguishable here" (:func:`verdict_of_intervals` gives the same rule for any paired
  intervals, costs included);
- a study without anchors of its own (``studies/part4.py``) is read against another's anchors, seed
  by seed: ``Comparison("part2", also=("part4",), seeds=[0, 1, 2])``;
- :func:`pareto_front`: the points that no other point beats on cost and value at once (Part IV's
  cost of a federation).

Used by ``book/part2/at_a_glance.ipynb`` and the method chapters of Part II.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from fedlora_edu.simulation.metrics import Interval, interval, paired_difference
from fedlora_edu.studies import load_study

ANCHORS = "probe and centralized"
"""The study's name for the per-seed anchor runs (the probe's accuracy and centralised LoRA's)."""

VARIED = ("learning_rate", "local_steps")
"""Settings a study may change for some runs of a method (``studies/part2.py``'s ``VARIANTS``); a run that sets
none of them ran at the study's own settings, and only those enter the tables and verdicts."""

Measure = Callable[[pd.DataFrame], pd.Series]


def final_accuracy(rows: pd.DataFrame) -> pd.Series:
    """Accuracy after the last round, per seed."""
    return rows["final_accuracy"]


def mean_accuracy(rows: pd.DataFrame) -> pd.Series:
    """Mean accuracy over the rounds, per seed: an area under the curve, higher for a method that gets there sooner."""
    return rows["accuracy"].apply(np.mean)


def median_server_seconds(rows: pd.DataFrame) -> pd.Series:
    """The median server time of a round, per seed."""
    return rows["server_seconds"].apply(np.median)


def where_and_when(study: pd.DataFrame) -> str:
    """The machines, commits and dates of a stored study's rows, for a provenance line.

    A study filled over several sessions names every machine, its commits in the order they ran (the
    first and last of more than three) and its first and last date.
    """
    rows = study.sort_values("date")
    devices = ", ".join(dict.fromkeys(rows["device_name"]))
    commits = list(dict.fromkeys(rows["commit"]))
    commits_text = (f"commit {commits[0]}" if len(commits) == 1 else
                    f"commits {', '.join(commits)}" if len(commits) <= 3 else
                    f"{len(commits)} commits from {commits[0]} to {commits[-1]}")
    first, last = rows["date"].iloc[0][:10], rows["date"].iloc[-1][:10]
    return f"{devices}, {commits_text}, {first if first == last else f'{first} to {last}'}"


def side_of(gap: Interval) -> str | None:
    """``"ahead"`` when a paired interval lies above zero, ``"behind"`` below it, None when it holds zero."""
    return "ahead" if gap.low > 0 else "behind" if gap.high < 0 else None


def verdict_of(sides: Sequence[str | None], expected: str) -> str:
    """"agrees" when every side is ``expected``, "disagrees" when one is the other side, "not
    distinguishable here" otherwise (``sides`` as :func:`side_of` gives them, one per method of a claim)."""
    if expected not in ("ahead", "behind"):
        raise ValueError(f"expected must be 'ahead' or 'behind', got {expected!r}")
    if all(side == expected for side in sides):
        return "agrees"
    if any(side is not None and side != expected for side in sides):
        return "disagrees"
    return "not distinguishable here"


def verdict_of_intervals(gaps: Sequence[Interval], expected: str) -> str:
    """:func:`verdict_of` the sides (:func:`side_of`) of paired intervals, one per method of a claim: the rule every
    at-a-glance chapter applies, for accuracy or for a cost (a method's figure minus the reference's, seed by seed)."""
    return verdict_of([side_of(gap) for gap in gaps], expected)


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[bool]:
    """Which points are on the Pareto front of lower cost and higher value: no other point has a cost at most
    this one's and a value at least this one's, with one of the two strictly better.

    Two points equal in both are both on the front (neither beats the other). NaN is refused: a point
    without a measurement is left out by the caller, not silently placed.
    """
    cost, value = np.asarray(costs, dtype=float), np.asarray(values, dtype=float)
    if cost.shape != value.shape or cost.ndim != 1:
        raise ValueError(f"costs and values must be two sequences of one length, got {cost.shape} and {value.shape}")
    if not (np.isfinite(cost).all() and np.isfinite(value).all()):
        raise ValueError("costs and values must be finite numbers")
    dominated = ((cost[None, :] <= cost[:, None]) & (value[None, :] >= value[:, None])
                 & ((cost[None, :] < cost[:, None]) | (value[None, :] > value[:, None])))
    return [not bool(row.any()) for row in dominated]


def _at_settings(rows: pd.DataFrame, varied: dict[str, float]) -> pd.DataFrame:
    """The ``rows`` run at the study's own settings, except those in ``varied`` (keywords of :data:`VARIED`), which
    must have the values given."""
    for setting in VARIED:
        column = rows[setting] if setting in rows.columns else pd.Series(np.nan, index=rows.index)
        rows = rows[column.isna()] if setting not in varied else rows[np.isclose(column, varied[setting])]
    return rows


class Comparison:
    """The stored study ``name``, seed by seed, ready to compare methods (see the module docstring)."""

    def __init__(self, name: str = "part2", profile: str = "cpu", also: Sequence[str] = (),
                 seeds: Sequence[int] | None = None) -> None:
        """``name``'s runs under ``profile``, with the runs of the studies ``also`` names (same federation and
        seeds, no anchors of their own) read against ``name``'s anchors; ``seeds``: only those anchor seeds."""
        study = load_study(name)
        stale = study.attrs["stale"]
        for other in also:
            extra = load_study(other)
            stale += extra.attrs["stale"]
            if (extra["method"] == ANCHORS).any():
                raise ValueError(f"study {other!r} has anchors of its own: read it as a Comparison by itself")
            study = pd.concat([study, extra], ignore_index=True)
        study.attrs.update({"stale": stale, "name": " + ".join([name, *also])})
        if profile not in set(study["profile"]):
            raise ValueError(f"study {name!r} has no runs under the profile {profile!r}; it has "
                             f"{sorted(set(study['profile']))} (run studies/{name}.py --profile {profile})")
        self.profile = profile
        self.study = study[study["profile"] == profile]
        self.study.attrs.update(study.attrs)
        self.anchors = self.study[self.study["method"] == ANCHORS].set_index("seed").sort_index()
        if seeds is not None:
            absent = sorted(set(seeds) - set(self.anchors.index))
            if absent:
                raise ValueError(f"study {name!r} has no anchor runs on seeds {absent} under the profile {profile!r}")
            self.anchors = self.anchors.loc[sorted(set(seeds))]
        if self.anchors.empty:
            raise ValueError(f"study {name!r} has no anchor runs ({ANCHORS!r}) under the profile {profile!r}: "
                             f"run studies/{name}.py --profile {profile}")
        self.seeds = list(self.anchors.index)

    @property
    def methods(self) -> list[str]:
        """The methods with a run at the study's own settings on every seed of the anchors, in the order stored."""
        rows = _at_settings(self.study[self.study["method"] != ANCHORS], {})
        seeds = rows.groupby("method", sort=False)["seed"].agg(set)
        return [method for method, have in seeds.items() if set(self.seeds) <= have]

    @property
    def stale(self) -> int:
        """How many stored rows measured code that has changed since."""
        return int(self.study.attrs["stale"])

    def runs(self, method: str, **varied: float) -> pd.DataFrame:
        """The method's runs, one row per seed of the anchors (a ValueError if a seed is missing).

        By default the runs at the study's own settings; ``varied`` (keywords of :data:`VARIED`, for
        instance ``local_steps=1``) selects the runs that changed those settings, and only those.
        """
        unknown = sorted(set(varied) - set(VARIED))
        if unknown:
            raise ValueError(f"a study varies only {VARIED}, not {unknown}")
        rows = _at_settings(self.study[self.study["method"] == method], varied).set_index("seed").reindex(self.seeds)
        if rows["final_accuracy"].isna().any():
            at = f" at {varied}" if varied else ""
            raise ValueError(f"the stored study lacks runs of {method!r}{at} for some of the seeds {self.seeds}")
        return rows

    def over_probe(self, method: str, **varied: float) -> pd.Series:
        """accuracy - probe, per seed: what the method's adapter added to the frozen features (``varied``: as
        in :meth:`runs`)."""
        return self.runs(method, **varied)["final_accuracy"] - self.anchors["probe_accuracy"]

    @property
    def recoverable(self) -> bool:
        """Whether gain recovered is defined: centralised LoRA above the probe on every seed."""
        return bool(((self.anchors["final_accuracy"] - self.anchors["probe_accuracy"]) > 0).all())

    def recovered(self, method: str) -> pd.Series:
        """(accuracy - probe) / (centralised - probe), per seed: the share of LoRA's gain the method recovers."""
        rows = self.runs(method)
        gain = self.anchors["final_accuracy"] - self.anchors["probe_accuracy"]
        if (gain <= 0).any():
            raise ValueError(f"gain recovered needs centralised LoRA above the probe on every seed; on seeds "
                             f"{list(gain.index[gain <= 0])} it is not (gain {gain.round(3).tolist()})")
        return (rows["final_accuracy"] - self.anchors["probe_accuracy"]) / gain

    def gain(self) -> Interval:
        """Centralised LoRA's gain over the probe, over the seeds (the testbed's premise: above zero)."""
        return interval(self.anchors["final_accuracy"] - self.anchors["probe_accuracy"])

    def side(self, method: str, reference: str, measure: Measure = final_accuracy) -> str | None:
        """``"ahead"`` or ``"behind"`` of ``reference`` when the paired interval excludes zero, else None."""
        return side_of(paired_difference(measure(self.runs(method)), measure(self.runs(reference))))

    def verdict(self, methods: Sequence[str], reference: str, expected: str,
                measure: Measure = final_accuracy) -> str:
        """"agrees" when every method is on the ``expected`` side of ``reference``, "disagrees" when one is on
        the other side, "not distinguishable here" otherwise."""
        return verdict_of([self.side(method, reference, measure) for method in methods], expected)

    def table(self, methods: Sequence[str], reference: str = "FedIT") -> pd.DataFrame:
        """Per method: final accuracy, its gain over the probe and (where :attr:`recoverable`) the gain
        recovered, as means with 95% intervals, and the paired comparison with ``reference``."""
        rows = []
        for method in methods:
            if method == reference:
                versus = "reference"
            else:
                gap = paired_difference(final_accuracy(self.runs(method)), final_accuracy(self.runs(reference)))
                versus = f"{side_of(gap) or 'not distinguishable'} ({gap.mean:+.3f})"
            row = {"method": method, "final accuracy": str(interval(final_accuracy(self.runs(method)))),
                   "over the probe": str(interval(self.over_probe(method)))}
            if self.recoverable:
                row["gain recovered"] = str(interval(self.recovered(method)))
            rows.append({**row, f"vs {reference}": versus})
        return pd.DataFrame(rows).set_index("method")

    def reference_deviation(self, variant: str, study: str = "deviations") -> Interval:
        """Final accuracy of ``variant`` (a method run as its authors' code runs it, ``studies/deviations.py``)
        minus the package's run of the same method, paired over this study's seeds."""
        rows = load_study(study)
        rows = rows[rows["profile"] == self.profile]
        if "variant" not in rows.columns or variant not in set(rows["variant"]):
            known = sorted(set(rows["variant"])) if "variant" in rows.columns else []
            raise ValueError(f"study {study!r} has no variant {variant!r}; it has {known}")
        rows = rows[rows["variant"] == variant].set_index("seed").reindex(self.seeds)
        if rows["final_accuracy"].isna().any():
            raise ValueError(f"study {study!r} lacks runs of {variant!r} for some of the seeds {self.seeds}")
        method = rows["method"].iloc[0]
        return paired_difference(rows["final_accuracy"], self.runs(method)["final_accuracy"])

    def provenance(self) -> str:
        """One line: how many runs, on which machines, at which commits and dates, and how many are stale."""
        return (f"stored study {self.study.attrs['name']} (profile {self.profile}): {len(self.study)} runs over seeds "
                f"{self.seeds}, {where_and_when(self.study)}; rows whose code has changed since: {self.stale}")
