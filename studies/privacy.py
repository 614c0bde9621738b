"""Study: accuracy against the privacy spent, for FedIT and FFA-LoRA under DP-FedAvg, over seeds.

For each method, noise multiplier z and seed: a federated run on the testbed exactly as
``studies/part4.py`` runs Part IV's methods (health-news tweets split over the profile's clients by
a Dirichlet(0.5) label skew, the probe as a frozen head, the testbed's rounds and schedule), with
the method wrapped in :class:`~fedlora_edu.efficiency.privacy.DPFedAvg` at clip norm
:data:`CLIP_NORM` and noise multiplier z (z = 0: clipped only, no guarantee). Each row stores the
accuracy per round, the bytes, the clients' update norms before clipping (their quartiles and the
share clipped) and the epsilon that opacus's RDP accountant gives for the run's sampling rate,
noise and rounds (:func:`~fedlora_edu.efficiency.privacy.epsilon_spent`, delta
:data:`~fedlora_edu.efficiency.privacy.DEFAULT_DELTA`). This is the stored, full-length version of
the one-round live experiment of ``book/part4/privacy.ipynb``. One JSON line per run in
``fedlora_edu/results/privacy.jsonl``; interrupt and rerun to continue
(``FEDLORA_RESULTS=/tmp/trial`` writes elsewhere, for a trial).

    python studies/privacy.py                                # the cpu profile, seeds 0 to 2, every z
    python studies/privacy.py --noise 0.1 0.3 --seeds 0      # some runs only
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

from fedlora_edu import build_testbed, make_strategy  # noqa: E402
from fedlora_edu.efficiency.privacy import DEFAULT_DELTA, DPFedAvg, epsilon_spent  # noqa: E402
from fedlora_edu.studies import run_study  # noqa: E402

METHODS = ("FedIT", "FFA-LoRA")
"""The methods the survey's privacy argument compares (FFA-LoRA: noise on B alone is not amplified in B A)."""
NOISE_MULTIPLIERS = (0.0, 0.3, 1.0)
"""z, the noise's standard deviation over the clip norm (0: clipped only, epsilon infinite)."""
CLIP_NORM = 1.0
"""C, DP-FedAvg's registered default."""
RECORDED = ("accuracy", "bytes_up", "bytes_down")
"""The history columns stored per round."""


@functools.lru_cache(maxsize=1)
def testbed(profile: str, seed: int):
    """The seed's federation, built once for all the runs of that seed (a run never changes it)."""
    return build_testbed(profile=profile, seed=seed)


def grid(seeds: list[int], methods: list[str], noise: list[float], profile: str) -> list[dict]:
    """The runs, seed-major: every method at every noise multiplier for each seed in turn."""
    return [{"method": method, "noise_multiplier": z, "clip_norm": CLIP_NORM, "seed": seed, "profile": profile}
            for seed in seeds for method in methods for z in noise]


def run_one(settings: dict) -> dict:
    federation = testbed(settings["profile"], settings["seed"])
    strategy = DPFedAvg(make_strategy(settings["method"]), clip_norm=settings["clip_norm"],
                        noise_multiplier=settings["noise_multiplier"])
    history = federation.run(strategy, seed=settings["seed"], progress=False)
    rounds = len(history)
    sample_rate = float(history["clients"].iloc[0]) / federation.num_clients
    norms = [row["norm"] for row in strategy.update_norms]
    ordered = sorted(norms)
    measured = {column: history[column].tolist() for column in RECORDED}
    measured.update({
        "final_accuracy": float(history["accuracy"].iloc[-1]),
        "rounds": rounds,
        "sample_rate": sample_rate,
        "delta": DEFAULT_DELTA,
        # json has no infinity: no noise, no guarantee is stored as None
        "epsilon": (epsilon_spent(settings["noise_multiplier"], sample_rate, rounds)
                    if settings["noise_multiplier"] > 0 else None),
        "norm_quartiles": [ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75)],
        "clipped_share": sum(norm > settings["clip_norm"] for norm in norms) / len(norms),
    })
    return measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--noise", type=float, nargs="+", default=list(NOISE_MULTIPLIERS))
    args = parser.parse_args(argv)
    if any(z < 0 for z in args.noise):
        parser.error(f"--noise: noise multipliers must be >= 0, got {args.noise}")
    frame = run_study("privacy", grid(args.seeds, args.methods, args.noise, args.profile), run_one,
                      profile=args.profile, methods_of=lambda settings: ["DP-FedAvg", settings["method"]],
                      depends_on=["testbed"])
    print(frame.groupby(["method", "noise_multiplier"])["final_accuracy"].agg(["mean", "std", "count"]).round(3))


if __name__ == "__main__":
    main()
