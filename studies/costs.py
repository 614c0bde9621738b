"""Study: what a client pays for a local step of every method the book's studies run, counted by one path.

For each method that ``studies/part2.py``, ``studies/part3.py`` and ``studies/part4.py`` run on the testbed, and
each seed: :func:`fedlora_edu.efficiency.costs.client_costs` (the package's one accounting path) runs the method in
the same federation as that study, with the same arguments, for two rounds of one client each, and counts the
last client's round: forward and backward FLOPs of its local steps, its trainable numbers, the weights it holds,
the activations a forward pass saves for the backward one, and so the peak memory of a local step (weights,
gradient and AdamW's two moments per trainable number, saved activations), and the bytes that client sent and
received. Part II and Part IV methods run on the testbed split by a Dirichlet(0.5) label skew (``federation``
``"testbed"``), Part III's on the testbed split two outlets per client with Part III's arguments (heavy-tailed rank
budgets for the heterogeneous-rank methods, the mixtures' experts: ``federation`` ``"shards"``); a method both
studies run (FedIT, FlexLoRA, FLoRA, FedInc) has a row on each.

Why three seeds, though a step's arithmetic is fixed by the model, the batch and what a method trains: the seed
picks which client is counted, and that changes a client's cost for the methods whose clients differ (a
heterogeneous rank budget, FedRA's random layers, Fed-piLot's memory budgets, the tokens of a batch, which set
the attention's length). The chapter reads each figure as its mean over the seeds and shows its spread; the
bytes per round on the Pareto chart are read from the accuracy studies' own rows (``part2``, ``part4``), summed
over a round's clients there, and this study's per-client bytes are a check on them.

One JSON line per run in ``fedlora_edu/results/costs.jsonl``, with the provenance of every study
(:func:`fedlora_edu.studies.run_study`); interrupt and rerun to continue (``FEDLORA_RESULTS=/tmp/trial`` writes
elsewhere). Shown in ``book/part4/cost.ipynb``.

    python studies/costs.py                          # the cpu profile, seeds 0 to 2, every method
    python studies/costs.py --methods FedIT FLASC    # some methods only (on every federation that runs them)
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import part2  # noqa: E402
import part3  # noqa: E402
import part4  # noqa: E402

from fedlora_edu import METHODS, build_testbed, make_strategy  # noqa: E402
from fedlora_edu.efficiency.costs import client_costs  # noqa: E402
from fedlora_edu.efficiency.split import SplitMethod, split_client_costs  # noqa: E402
from fedlora_edu.studies import run_study  # noqa: E402

FEDERATIONS = {"testbed": ("part2", "part4"), "shards": ("part3",)}
"""Where each study's methods run: the testbed of Parts II and IV, and Part III's split of two outlets per client."""
ROUNDS = 2
"""Rounds of one client each; the last one is counted (a method's steady state, after its first round)."""
DEPENDS_ON = ["efficiency/costs", "federations", "testbed"]
"""The modules a row measured beyond its method's own: the accounting path, the rank budgets, the testbed."""


def methods_of(federation: str) -> list[str]:
    """The methods the studies of ``federation`` run, in their order, each once."""
    names = {"part2": part2.PART2_METHODS, "part3": part3.PART3_METHODS, "part4": part4.PART4_METHODS}
    return list(dict.fromkeys(name for study in FEDERATIONS[federation] for name in names[study]))


def options(method: str, federation: str, profile: str) -> dict:
    """The arguments the method runs with in its accuracy study (its registered defaults otherwise)."""
    if federation == "shards":
        return part3.options(method, profile)
    return {**part2.OPTIONS.get(method, {}), **part4.OPTIONS.get(method, {})}


def grid(seeds: list[int], methods: list[str] | None, profile: str) -> list[dict]:
    """Per seed and federation, every method of that federation's studies (or those of ``methods`` among them)."""
    runs = []
    for seed in seeds:
        for federation in FEDERATIONS:
            chosen = [name for name in methods_of(federation) if methods is None or name in methods]
            runs += [{"method": name, "federation": federation, "seed": seed, "profile": profile} for name in chosen]
    return runs


@functools.lru_cache(maxsize=1)
def federation_for(federation: str, profile: str, seed: int):
    """The seed's federation as its accuracy study builds it (built once for all the runs of that seed)."""
    if federation == "shards":
        return part3.federation_for(profile, seed, "shards")
    return build_testbed(profile=profile, seed=seed)


def run_one(settings: dict) -> dict:
    profile, federation = settings["profile"], settings["federation"]
    arguments = options(settings["method"], federation, profile)
    strategy = make_strategy(settings["method"], **arguments)
    if isinstance(strategy, SplitMethod):  # split learning runs in its own loop; the client's side of the cut counted
        cost = split_client_costs(federation_for(federation, profile, settings["seed"]), strategy, rounds=ROUNDS,
                                  seed=settings["seed"])
    else:
        cost = client_costs(federation_for(federation, profile, settings["seed"]), strategy, rounds=ROUNDS,
                            seed=settings["seed"], evaluate=False)
    return {"steps": cost.steps, "flops": cost.flops, "flops_per_step": cost.flops_per_step,
            "trainable_parameters": cost.trainable_parameters, "weight_bytes": cost.weight_bytes,
            "trainable_bytes": cost.trainable_bytes, "optimizer_bytes": cost.optimizer_bytes,
            "activation_bytes": cost.activation_bytes, "peak_bytes": cost.peak_bytes,
            "bytes_up": cost.bytes_up, "bytes_down": cost.bytes_down, "rounds": ROUNDS, "options": arguments}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="default: every method of the part2, part3 and part4 studies")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods or ()) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    frame = run_study("costs", grid(args.seeds, args.methods, args.profile), run_one, profile=args.profile,
                      depends_on=DEPENDS_ON)
    frame["GFLOPs / step"] = frame["flops_per_step"] / 1e9
    frame["peak MB"] = frame["peak_bytes"] / 1e6
    print(frame.groupby(["federation", "method"])[["GFLOPs / step", "peak MB"]].agg(["mean", "min", "max"]).round(3))


if __name__ == "__main__":
    main()
