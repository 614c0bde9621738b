"""Study: Part III's personalization methods on the testbed split two outlets per client, client by client.

For each method and seed: a federated run on the testbed (health-news tweets, the probe as a frozen
head) split so that heterogeneity is extreme, as in Part III's chapters: every client holds the
tweets of only two of the 16 outlets (``scheme="shards"``) and keeps a fifth of them as its own
held-out test split. The testbed's rounds and schedule. Recorded per round: the accuracy of the
server's model on the shared test set, the mean over clients of each client's model on its own
held-out tweets (``client_accuracy``), bytes up and down. At the end of the run: each client's
accuracy, on its own held-out tweets, of the model the method serves it (its personal model, or
the server's where it has none) and whether that model was personal; and the probe's accuracy on
each client's tweets (where every run starts). The per-client numbers are computed here from the
run's final server state and client states, so the simulator is not changed for them.

With ``--federation languages`` the same measurements on the multilingual federation of Part III's
Languages chapter instead (ParlSpeech speeches in four languages, two clients per language, the
testbed's schedule; :func:`fedlora_edu.federations.build_multilingual`), for the methods that need
clients that know their language (FedLFC, FedHLT) beside FedIT and FL-TAC: study ``part3_languages``. With
``--federation tasks``, on the multi-task federation (:func:`fedlora_edu.federations.build_multitask`: two
clients each on BBC topics, tweet sentiment and health-tweet outlets, one joint label space), FedIT,
FL-TAC with one cluster per task (the paper's setting) and FedSA-LoRA: study ``part3_tasks``. FL-TAC's rows
also hold, per round, the matched accuracy of its clusters against the planted groups (tasks, or
language families).

One JSON line per run in ``fedlora_edu/results/part3.jsonl`` (``part3_languages.jsonl``); interrupt and
rerun to continue.
Shown in "Part III at a glance" (``book/part3/at_a_glance.ipynb``, through
:class:`fedlora_edu.teaching.per_client.PerClientComparison`).

    python studies/part3.py                               # the cpu profile, seeds 0 to 2
    python studies/part3.py --methods FedIT PerFIT        # some methods only
    FEDLORA_RESULTS=/tmp/second python studies/part3.py --methods ...   # a second process
    python studies/part3.py --federation languages        # FedIT, FL-TAC, FedLFC, FedHLT by language
    python studies/part3.py --federation tasks            # FedIT, FL-TAC, FedSA-LoRA, one task per client
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

import numpy as np  # noqa: E402

from fedlora_edu import METHODS, build_testbed, testbed_profile  # noqa: E402
from fedlora_edu.federations import (  # noqa: E402
    LANGUAGE_TREE,
    build_multilingual,
    build_multitask,
    language_path,
    rank_budgets,
)
from fedlora_edu.foundations.training import evaluate  # noqa: E402
from fedlora_edu.heterogeneity.clustering import matched_accuracy  # noqa: E402
from fedlora_edu.studies import run_study  # noqa: E402
from fedlora_edu.teaching.per_client import keeping_client_states, served_accuracies  # noqa: E402

PART3_METHODS = ("FedIT", "FedSA-LoRA", "CE-LoRA", "pFedLoRA", "FedDPA", "FDLoRA", "PerFIT", "HyperFloRA", "FL-TAC",
                 "HetLoRA", "replication padding", "FlexLoRA", "FLoRA", "FedInc", "FedLEASE", "FedMoE")
"""FedIT, one global adapter, the personalization methods of Part III that serve each client a model, the
heterogeneous-rank methods (one global model for all, each client training at its own rank: :func:`rank_budget`;
FlexLoRA, FLoRA and FedInc of Part II among them, run with that budget as section 4.1 says they can) and the two
mixtures of LoRA experts (each client served its own router over shared experts)."""
RANKED = ("HetLoRA", "replication padding", "FlexLoRA", "FLoRA", "FedInc")
"""The methods run with the heavy-tailed rank budget (:func:`rank_budget`)."""
EXPERTS = {"FedLEASE": 4, "FedMoE": 4}
"""The mixtures' expert slots, as in the structure chapter: FedLEASE chooses at most 4 clusters (one expert each, of
the profile's rank); FedMoE has 4 experts of half the profile's rank in each layer and 2 per client, so a client
trains the profile's rank in all, as FedIT's clients do."""
LANGUAGE_METHODS = ("FedIT", "FL-TAC", "FedLFC", "FedHLT")
"""On the multilingual federation: one global adapter, clusters found by k-means, and the two methods told each
client's language (FedLFC by family, FedHLT along the language tree)."""
CLIENTS = 8
"""Sixteen outlets, two per client; four languages, two clients each."""
TASK_METHODS = ("FedIT", "FL-TAC", "FedSA-LoRA")
"""On the multi-task federation: one global adapter, one per cluster found by k-means (the paper's setting: each
client holds one task), and a personal B per client."""
STUDIES = {"shards": "part3", "languages": "part3_languages", "tasks": "part3_tasks"}
"""The study each federation's runs are stored under."""


def rank_budget(profile: str) -> list[int]:
    """The clients' ranks for the heterogeneous-rank methods: heavy-tailed (most clients at rank 1 or 2, a few at the
    profile's rank), drawn once with seed 0, the same on every seed of the study (as in Part III at a glance)."""
    return rank_budgets("heavy-tailed", CLIENTS, np.random.default_rng(0), max_rank=testbed_profile(profile).rank)


def options(method: str, profile: str, federation=None) -> dict:
    """The arguments a method runs with here, as in its chapter (everything else is its default).

    On the multilingual ``federation`` (which knows each client's language): FL-TAC with one cluster per
    language family, FedLFC grouping the clients by family, FedHLT along each client's path in the tree.
    """
    bed = testbed_profile(profile)
    if getattr(federation, "client_tasks", None) is not None and method == "FL-TAC":
        return {"num_clusters": len(federation.tasks)}
    languages = getattr(federation, "client_languages", None)
    if languages is not None and method in ("FL-TAC", "FedLFC", "FedHLT"):
        return {"FL-TAC": {"num_clusters": len(LANGUAGE_TREE)},
                "FedLFC": {"groups": [language_path(language)[1] for language in languages]},
                "FedHLT": {"paths": [language_path(language) for language in languages]}}[method]
    if method in RANKED:  # HetLoRA's own penalty and tail (lambda 1e-3, gamma 0.99)
        return {"ranks": rank_budget(profile)}
    if method in ("FedDPA", "FDLoRA", "PerFIT", "pFedLoRA"):
        return {"rank": bed.rank}  # each adapter (or the budget, or the shared adapter) of the profile's rank
    if method == "HyperFloRA":
        return {"server_learning_rate": bed.learning_rate}
    if method == "FedLEASE":  # its warm-up as long as a round's local training (the default)
        return {"rank": bed.rank, "max_experts": EXPERTS[method]}
    if method == "FedMoE":
        return {"rank": max(1, bed.rank // 2), "num_experts": EXPERTS[method], "experts_per_client": 2}
    return {}


def grid(seeds: list[int], methods: list[str], profile: str) -> list[dict]:
    return [{"method": method, "seed": seed, "profile": profile} for seed in seeds for method in methods]


@functools.lru_cache(maxsize=1)
def federation_for(profile: str, seed: int, kind: str = "shards"):
    """The seed's federation, built once for all the runs of that seed (a run never changes it)."""
    if kind == "languages":
        return build_multilingual(profile=testbed_profile(profile), clients_per_language=CLIENTS // 4, seed=seed)
    if kind == "tasks":
        return build_multitask(profile=testbed_profile(profile), clients_per_task=2, seed=seed)
    split = testbed_profile(profile).with_overrides(num_clients=CLIENTS)
    return build_testbed(scheme="shards", classes_per_client=2, profile=split, seed=seed)


def run_one(settings: dict, profile: str, kind: str = "shards") -> dict:
    federation = federation_for(profile, settings["seed"], kind)
    method = settings["method"]
    cls = METHODS[method]
    strategy = keeping_client_states(cls)(**options(method, profile, federation))
    history = federation.run(strategy, seed=settings["seed"], progress=False, evaluate_clients=True)
    states = strategy.client_states[-federation.num_clients:]
    accuracies, personal = served_accuracies(federation, strategy, federation.last_server, states,
                                             base=federation.last_model)  # FLoRA's merges into W'
    if abs(sum(accuracies) / len(accuracies) - float(history["client_accuracy"].iloc[-1])) > 1e-9:
        raise RuntimeError(f"{method}: the served models rebuilt after the run do not score what the simulator "
                           "recorded in the last round; the client states kept are not the run's")
    probe = federation.fresh_model()
    measured = {column: history[column].tolist()
                for column in ("accuracy", "client_accuracy", "bytes_up", "bytes_down")}
    measured.update({
        "final_accuracy": float(history["accuracy"].iloc[-1]),
        "client_accuracies": accuracies,
        "client_personal": personal,
        "probe_client_accuracies": [evaluate(probe, data)[0] for data in federation.client_tests],
        "client_test_sizes": [len(data) for data in federation.client_tests],
        "engine": history["engine"].iloc[0],
    })
    planted = planted_groups(federation)
    if method == "FL-TAC" and planted is not None:  # did k-means find the planted groups, round by round?
        measured["cluster_matched"] = [
            matched_accuracy([labels[k] for k in sorted(labels)], [planted[k] for k in sorted(labels)])
            for labels in federation.last_server.method_state.history]
    return measured


def planted_groups(federation) -> list[int] | None:
    """Each client's planted group, where the federation has one: its task, or its language's family."""
    if getattr(federation, "client_tasks", None) is not None:
        return [federation.tasks.index(task) for task in federation.client_tasks]
    if getattr(federation, "client_languages", None) is not None:
        return [list(LANGUAGE_TREE).index(language_path(language)[1]) for language in federation.client_languages]
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--federation", choices=sorted(STUDIES), default="shards",
                        help="two outlets per client (study part3), one language per client (part3_languages) or "
                             "one task per client (part3_tasks)")
    parser.add_argument("--methods", nargs="+",
                        help=f"default: {', '.join(PART3_METHODS)} (shards); {', '.join(LANGUAGE_METHODS)} "
                             f"(languages); {', '.join(TASK_METHODS)} (tasks)")
    args = parser.parse_args(argv)
    methods = args.methods or list({"languages": LANGUAGE_METHODS, "tasks": TASK_METHODS}.get(args.federation,
                                                                                           PART3_METHODS))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    frame = run_study(STUDIES[args.federation], grid(args.seeds, methods, args.profile),
                      lambda settings: run_one(settings, args.profile, args.federation),
                      profile=args.profile,
                      depends_on=["testbed"] if args.federation == "shards" else ["testbed", "federations"])
    frame["mean_over_clients"] = frame["client_accuracies"].map(lambda values: sum(values) / len(values))
    print(frame.groupby("method")["mean_over_clients"].agg(["mean", "std", "count"]).round(3))


if __name__ == "__main__":
    main()
