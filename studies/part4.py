"""Study: Part IV's efficiency methods on the testbed, over seeds, paired by seed with the ``part2`` study.

For each method of the package's efficiency branch and each seed: a federated run on the testbed
exactly as ``studies/part2.py`` runs Part II's methods (health-news tweets split over the profile's
clients by a Dirichlet(0.5) label skew, the probe as a frozen head, the testbed's rounds and schedule,
each method with its registered defaults unless :data:`OPTIONS` says otherwise), recording per round
the accuracy on the shared test set, bytes up and down, and the aggregation error. The federation,
seeds and schedule are ``part2``'s, so a method here is read against FedIT, the probe and centralised
LoRA of the same seed there (the share of centralised LoRA's gain over the probe that it recovers);
this study runs no anchors of its own. One JSON line per run in ``fedlora_edu/results/part4.jsonl``;
interrupt and rerun to continue (``FEDLORA_RESULTS=/tmp/trial`` writes elsewhere, for a trial).
For the cost side of Part IV's comparison (bytes are measured here; compute and memory per local
step are counted by :func:`fedlora_edu.efficiency.costs.client_costs`, the same for every seed).

    python studies/part4.py                          # the cpu profile, seeds 0 to 3, every efficiency method
    python studies/part4.py --methods FLASC FedRA    # some methods only
    FEDLORA_RESULTS=/tmp/second python studies/part4.py --methods ...   # a second process
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedlora_edu import METHODS, build_testbed, make_strategy  # noqa: E402
from fedlora_edu.efficiency.split import SplitMethod, run_split  # noqa: E402
from fedlora_edu.registry import methods_in_branch  # noqa: E402
from fedlora_edu.studies import run_study  # noqa: E402

PART4_METHODS = list(methods_in_branch("efficiency"))
"""Part IV's methods: those of the survey's section 5 (the efficiency branch of the package)."""
OPTIONS: dict[str, dict] = {}
"""The arguments a method runs with here; every other argument is the registered default (empty: all defaults)."""
RECORDED = ("accuracy", "bytes_up", "bytes_down", "aggregation_error")
"""The history columns stored per round."""


@functools.lru_cache(maxsize=1)
def testbed(profile: str, seed: int):
    """The seed's federation, built once for all the runs of that seed (a run never changes it)."""
    return build_testbed(profile=profile, seed=seed)


def grid(seeds: list[int], methods: list[str], profile: str) -> list[dict]:
    """The runs, seed-major: every method of ``methods`` for each seed in turn."""
    return [{"method": name, "seed": seed, "profile": profile} for seed in seeds for name in methods]


def run_one(settings: dict, profile: str) -> dict:
    federation = testbed(profile, settings["seed"])
    strategy = make_strategy(settings["method"], **OPTIONS.get(settings["method"], {}))
    if isinstance(strategy, SplitMethod):  # split learning: its own loop, on the same data, model and evaluation
        history = run_split(federation, strategy, seed=settings["seed"])
    else:
        history = federation.run(strategy, seed=settings["seed"], progress=False)
    measured = {column: history[column].tolist() for column in RECORDED}
    measured["final_accuracy"] = float(history["accuracy"].iloc[-1])
    measured["engine"] = history["engine"].iloc[0]
    measured["options"] = OPTIONS.get(settings["method"], {})
    return measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=PART4_METHODS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    frame = run_study("part4", grid(args.seeds, args.methods, args.profile),
                      lambda settings: run_one(settings, args.profile), profile=args.profile,
                      depends_on=["testbed"])
    print(frame.groupby("method")["final_accuracy"].agg(["mean", "std", "count"]).round(3))


if __name__ == "__main__":
    main()
