"""Study: which federation, learning rate and adapted depth make a testbed where the adapter is what learns.

For every embedded data set, under one profile, and for each seed: the best linear probe on the
frozen encoder's mean-pooled features (the accuracy any run starts from when the probe is the
head), and centralized LoRA on the pooled clients' data, at several learning rates, with LoRA in
the top ``adapted`` layers (the layers below cached), with the probe's head frozen or a fresh head
trained beside the adapter. Then, on the testbed's data only, the same runs with more training
data and a larger test set (:data:`SIZES`, five seeds): whether the adapter's lead over the probe
grows with the data it learns from, and by how much the probe's own does. One JSON line per run
in ``fedlora_edu/results/testbed.jsonl``; interrupt and rerun to continue. Shown in
``book/part1/lora.ipynb``, section "What the adapter adds over a probe".

    python studies/testbed.py                     # the cpu profile: seeds 0 1 2, and 0 to 4 for the sizes
    python studies/testbed.py --profile smoke --seeds 0 --size-seeds 0   # a quick check
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedlora_edu import build_federation, get_profile  # noqa: E402
from fedlora_edu.foundations.training import evaluate  # noqa: E402
from fedlora_edu.studies import run_study  # noqa: E402

DATA = ("health_tweets", "tweet_sentiment", "bbc_news")
STEPS = 600
EVAL_EVERY = 100
SIZES: tuple[tuple[int, int], ...] = ((800, 1000), (2400, 1000))
"""(training, test) examples of the size runs: the cpu profile's 800 and three times as many, each scored on
1000 test tweets (one tweet is 0.1 point, against 0.5 on the profile's 200)."""
SIZE_RATES = {800: (3e-3, 1e-2), 2400: (1e-3, 3e-3, 1e-2)}
"""The learning rates of the size runs, per training size."""


def grid(seeds: list[int]) -> list[dict]:
    """Per data set and seed, with the probe as a frozen head: LoRA in the top 2 layers (cheap) at the
    profiles' learning rate 1e-3 and at the earlier 1e-2, and in every layer at 1e-3 (what the cut
    costs). On the testbed's data (health tweets) also 3e-3 and a head trained beside the adapter
    (what the frozen probe head changes)."""
    runs = []
    for seed, data in itertools.product(seeds, DATA):
        rates = (1e-3, 3e-3, 1e-2) if data == "health_tweets" else (1e-3, 1e-2)
        for learning_rate in rates:
            runs.append({"data": data, "seed": seed, "head": "probe", "adapted": 2, "lr": learning_rate})
        runs.append({"data": data, "seed": seed, "head": "probe", "adapted": 6, "lr": 1e-3})
        if data == "health_tweets":
            runs.append({"data": data, "seed": seed, "head": "trained", "adapted": 6, "lr": 1e-3})
    return runs


def size_grid(seeds: list[int]) -> list[dict]:
    """On health tweets, probe head frozen, LoRA in the top 2 layers: each of :data:`SIZES` at its
    :data:`SIZE_RATES`. The settings name ``train`` and ``test``; the runs of :func:`grid` name neither
    (they ran at the profile's sizes)."""
    return [{"data": "health_tweets", "seed": seed, "head": "probe", "adapted": 2, "lr": learning_rate,
             "train": train, "test": test}
            for seed in seeds for train, test in SIZES for learning_rate in SIZE_RATES[train]]


@functools.lru_cache(maxsize=1)
def federation_for(data: str, profile: str, head: str, adapted: int, seed: int, train: int | None, test: int | None):
    """The federation of a run, built once for consecutive runs that share it (a run never changes it)."""
    sized = get_profile(profile)
    if train is not None:
        sized = sized.with_overrides(train_examples=train, test_examples=test)
    return build_federation(data, profile=sized, head=head, adapted_layers=adapted, seed=seed)


def run_one(settings: dict, profile: str) -> dict:
    federation = federation_for(settings["data"], profile, settings["head"], settings["adapted"], settings["seed"],
                                settings.get("train"), settings.get("test"))
    start = evaluate(federation.fresh_model(seed=settings["seed"]), federation.test)[0]
    history = federation.centralized(steps=STEPS, eval_every=EVAL_EVERY, learning_rate=settings["lr"],
                                     seed=settings["seed"], progress=False)
    measured = {"start_accuracy": start, "steps": history["step"].tolist(), "accuracy": history["accuracy"].tolist(),
                "final_accuracy": float(history["accuracy"].iloc[-1]), "test_examples": len(federation.test),
                "classes": len(federation.label_names)}
    if federation.probe is not None:
        measured["probe_penalty"] = federation.probe.penalty
        measured["probe_validation_accuracy"] = federation.probe.validation_accuracy
    return measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds of the data-set runs (none: skip them)")
    parser.add_argument("--size-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                        help="seeds of the size runs (none: skip them)")
    args = parser.parse_args(argv)
    frame = run_study("testbed", grid(args.seeds) + size_grid(args.size_seeds),
                      lambda settings: run_one(settings, args.profile), profile=args.profile)
    for column in ("train", "test"):
        frame[column] = frame[column].fillna(-1).astype(int) if column in frame else -1  # -1: the profile's size
    print(frame.groupby(["data", "head", "adapted", "train", "lr"])[["start_accuracy", "final_accuracy"]]
          .mean().round(3))


if __name__ == "__main__":
    main()
