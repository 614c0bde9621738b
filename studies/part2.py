"""Study: every method of Part II on the testbed, over seeds, with centralised LoRA and the probe as anchors.

For each registered method and seed: a federated run on the testbed (health-news tweets split
over the profile's clients by a Dirichlet(0.5) label skew, the probe as a frozen head, the
testbed's rounds), recording accuracy, bytes, discordance, the size of the ideal update and the
aggregation error per round. For each seed also the probe's accuracy (where every run starts)
and centralised LoRA on the pooled data with as many steps as a federated run (at the testbed's
centralised learning rate), so that a method's result can be read as the share of centralised LoRA's
gain over the probe that it recovers. And FedIT once more per seed at each of :data:`VARIANTS`: the
centralised rate and three times the testbed's federated rate (what the choice of the federated rate
changes), and fewer or more local steps (how the discordance grows with them); under ``gpu``
:data:`PROFILE_VARIANTS`. One JSON line per
run in ``fedlora_edu/results/part2.jsonl``; interrupt and rerun to continue
(``FEDLORA_RESULTS=/tmp/trial`` writes elsewhere, for a trial). Shown in
``book/part2/at_a_glance.ipynb`` and the method chapters.

    python studies/part2.py                          # the cpu profile, seeds 0 to 3
    python studies/part2.py --methods FedIT FLoRA    # some methods only
    FEDLORA_RESULTS=/tmp/second python studies/part2.py --no-anchors --methods ...   # a second process
    FEDLORA_RESULTS=/tmp/s1 python studies/part2.py --profile gpu --shard 1/4    # one of four processes on a GPU

``--shard i/n`` runs every n-th run of the grid (from the i-th, counting from 0) taken in order of
priority (the anchors, then the methods in the order given, each with all its seeds, then FedIT's
variants), so that n processes sharing one GPU each store the most important runs first; each
writes its own results folder (``FEDLORA_RESULTS``), and the rows are merged afterwards
(one JSON line per run: the files concatenate).
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

from fedlora_edu import METHODS, build_testbed, centralized_learning_rate, make_strategy, testbed_profile  # noqa: E402
from fedlora_edu.foundations.training import evaluate  # noqa: E402
from fedlora_edu.registry import methods_in_branch  # noqa: E402
from fedlora_edu.studies import run_study  # noqa: E402

# The arguments a method runs with here (everything else is its default), as in Part II at a glance.
OPTIONS = {"FedLoRU": {"tau": 2}, "pFedLoRU": {"tau": 2}, "mFedLoRU": {"tau": 2}}
ANCHORS = ("probe and centralized",)
VARIANTS: tuple[dict, ...] = ({"learning_rate": 3e-3}, {"learning_rate": 3e-2}, {"local_steps": 1}, {"local_steps": 10})
"""FedIT's runs with one setting changed from the testbed's (learning rate 1e-2, 5 local steps under cpu): the
centralised runs' rate and a rate three times the testbed's, and fewer or more local steps."""
PROFILE_VARIANTS: dict[str, tuple[dict, ...]] = {
    "gpu": ({"learning_rate": 3e-3}, {"learning_rate": 1e-2}, {"local_steps": 1}, {"local_steps": 10})}
""":data:`VARIANTS` for the profiles that need others. Under ``gpu`` (learning rate 1e-3, every layer adapted, 20
local steps) the federated rate is the question: three and ten times the testbed's (1e-2 is the ``cpu``
testbed's federated rate), and fewer or more local steps."""


def variants_of(profile: str) -> tuple[dict, ...]:
    """FedIT's variant settings under ``profile``: :data:`PROFILE_VARIANTS` where it names it, else :data:`VARIANTS`."""
    return PROFILE_VARIANTS.get(profile, VARIANTS)
VARIED_METHOD = "FedIT"
PART2_METHODS = list(methods_in_branch("distributed"))
"""Part II's methods: those of the survey's section 3 (the distributed branch of the package)."""


def grid(seeds: list[int], methods: list[str], profile: str, anchors: bool = True,
         variants: bool = True, only_variants: bool = False) -> list[dict]:
    """The runs: per seed the anchors (unless not ``anchors``), ``methods`` and, if ``methods`` holds
    :data:`VARIED_METHOD`, its :func:`variants_of` the profile (unless not ``variants``); with
    ``only_variants``, those variants alone."""
    names = [] if only_variants else [*ANCHORS, *methods] if anchors else list(methods)
    runs = []
    for seed in seeds:
        runs += [{"method": name, "seed": seed} for name in names]
        if (variants or only_variants) and VARIED_METHOD in methods:
            runs += [{"method": VARIED_METHOD, "seed": seed, **variant} for variant in variants_of(profile)]
    return [{**run, "profile": profile} for run in runs]


@functools.lru_cache(maxsize=1)
def testbed(profile: str, seed: int):
    """The seed's federation, built once for all the runs of that seed (a run never changes it)."""
    return build_testbed(profile=profile, seed=seed)


def by_priority(runs: list[dict], methods: list[str]) -> list[dict]:
    """``runs`` ordered method by method (anchors first, then ``methods`` in order, FedIT's variants last),
    each method's seeds together."""
    names = [*ANCHORS, *methods]

    def rank(run: dict) -> tuple[int, int]:
        variants = variants_of(run["profile"])
        variant = next((i for i, v in enumerate(variants) if all(run.get(k) == x for k, x in v.items())), -1)
        place = len(names) + variant if variant >= 0 else names.index(run["method"])
        return place, run["seed"]

    return sorted(runs, key=rank)


def shard(runs: list[dict], spec: str, methods: list[str]) -> list[dict]:
    """The runs of shard ``spec`` ("i/n": every n-th run from the i-th) of ``runs`` taken :func:`by_priority`."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n with whole numbers, for instance 0/4; got {spec!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard i/n needs n >= 1 and 0 <= i < n; got {spec!r}")
    return by_priority(runs, methods)[index::count]


def run_one(settings: dict, profile: str) -> dict:
    federation = testbed(profile, settings["seed"])
    bed = testbed_profile(profile)
    steps_per_round = bed.clients_per_round * bed.local_steps
    if settings["method"] in ANCHORS:
        probe = evaluate(federation.fresh_model(seed=settings["seed"]), federation.test)[0]
        history = federation.centralized(steps=bed.rounds * steps_per_round, eval_every=steps_per_round,
                                         learning_rate=centralized_learning_rate(profile),
                                         seed=settings["seed"], progress=False)
        return {"probe_accuracy": probe, "accuracy": history["accuracy"].tolist(),
                "final_accuracy": float(history["accuracy"].iloc[-1]), "test_examples": len(federation.test)}
    strategy = make_strategy(settings["method"], **OPTIONS.get(settings["method"], {}))
    varied = {key: settings[key] for key in ("learning_rate", "local_steps") if key in settings}
    history = federation.run(strategy, seed=settings["seed"], progress=False, **varied)
    measured = {column: history[column].tolist()
                for column in ("accuracy", "bytes_up", "bytes_down", "discordance", "update_size", "aggregation_error",
                               "server_seconds")}
    measured["final_accuracy"] = float(history["accuracy"].iloc[-1])
    measured["engine"] = history["engine"].iloc[0]
    return measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=PART2_METHODS)
    parser.add_argument("--no-anchors", action="store_true",
                        help="skip the probe and centralised runs (for a second process that runs other methods)")
    parser.add_argument("--no-variants", action="store_true",
                        help=f"skip {VARIED_METHOD}'s runs at other settings ({VARIANTS}; {PROFILE_VARIANTS})")
    parser.add_argument("--only-variants", action="store_true",
                        help=f"run only {VARIED_METHOD}'s runs at other settings (for a process of their own)")
    parser.add_argument("--shard", metavar="I/N",
                        help="run only every N-th run of the grid by priority, from the I-th (0 <= I < N)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    if args.only_variants and (args.no_variants or VARIED_METHOD not in args.methods):
        parser.error(f"--only-variants runs {VARIED_METHOD}'s variants: it needs {VARIED_METHOD} among --methods "
                     "and no --no-variants")
    runs = grid(args.seeds, args.methods, args.profile, anchors=not args.no_anchors, variants=not args.no_variants,
                only_variants=args.only_variants)
    if args.shard:
        try:
            runs = shard(runs, args.shard, args.methods)
        except ValueError as error:
            parser.error(str(error))
    frame = run_study("part2", runs,
                      lambda settings: run_one(settings, args.profile),
                      profile=args.profile,
                      methods_of=lambda settings: [] if settings["method"] in ANCHORS else [settings["method"]],
                      depends_on=["testbed"])
    print(frame.groupby("method")["final_accuracy"].agg(["mean", "std", "count"]).round(3))


if __name__ == "__main__":
    main()
