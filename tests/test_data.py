"""Tests for fedlora_edu.data: real text, offline, as the book's chapters load it."""

from __future__ import annotations

import re
from collections import Counter

import datasets
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlora_edu.assets import data

# A link, or what is left of one: scheme, "www.", or a shortened "host.tld/path".
URL_LIKE = re.compile(r"https?:|://|www\.|\b[a-z0-9-]+\.[a-z]{2,6}/\w", re.IGNORECASE)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def class_counts(dataset: datasets.Dataset) -> dict[str, int]:
    names = dataset.features["label"].names
    return {names[y]: n for y, n in Counter(list(dataset["label"])).items()}


def test_embedded_names_are_described():
    assert set(data.EMBEDDED_DATASETS) == {"bbc_news", "health_tweets", "tweet_sentiment"}
    assert all(isinstance(d, str) and d for d in data.EMBEDDED_DATASETS.values())


def test_bbc_news_has_2225_articles_in_5_topics():
    ds = data.load_text_classification("bbc_news")
    assert len(ds) == 2225
    assert ds.column_names == ["text", "label", "source"]
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert class_counts(ds) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    names = ds.features["label"].names
    frame = ds.to_pandas()
    assert (frame["source"] == [names[y] for y in frame["label"]]).all()
    assert frame["text"].str.len().min() > 100
    # The files are UTF-8 (one is latin-1): pound signs must not turn into mojibake.
    assert frame["text"].str.contains("£").sum() > 100
    assert not frame["text"].str.contains("Â£").any()
    assert frame["text"].iloc[0].startswith("Ad sales boost Time Warner profit")


def test_health_tweets_has_16_outlets_and_no_urls():
    ds = data.load_text_classification("health_tweets")
    frame = ds.to_pandas()
    names = ds.features["label"].names
    assert len(names) == 16
    assert names == sorted(set(frame["source"]))
    assert (frame["source"] == [names[y] for y in frame["label"]]).all()
    assert len(ds) == 63325  # 63,326 tweets less one that was only a link
    assert (frame["text"].str.len() > 0).all()
    leaks = frame["text"][frame["text"].str.contains(URL_LIKE)]
    assert leaks.empty, leaks.head().tolist()


# Characters that make or break a link, the Unicode case folds the regex ignores case through
# (long s, Kelvin sign), and whitespace of several kinds.
LINKISH = st.text(alphabet="abhtpsw:/.-_ HTPSW()\u2026\u017f\u212a09\t\n", max_size=40)


@given(LINKISH)
def test_strip_urls_word_by_word_is_the_whole_text_regex(text):
    # _strip_urls runs the regex only on words that could hold a link; it must remove exactly what
    # the regex removes from the whole text.
    assert data._strip_urls(text) == " ".join(data._URL.sub(" ", text).split())


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("Flu season http://nyti.ms/1abc is here", "Flu season is here"),
        ("Read (http\u2026", "Read ("),
        ("lat.ms/16ADjSS Ebola", "Ebola"),
        ("ttp://ow.ly/x and WWW.bbc.co.uk news", "and news"),
    ],
)
def test_strip_urls_examples(text, clean):
    assert data._strip_urls(text) == clean


def test_tweet_sentiment_has_3_classes():
    ds = data.load_text_classification("tweet_sentiment")
    assert len(ds) == 38158
    assert ds.features["label"].names == ["negative", "neutral", "positive"]
    assert class_counts(ds) == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert all(isinstance(t, str) for t in ds["text"][:100])


def test_max_examples_is_stratified_balanced_and_deterministic():
    full = data.load_text_classification("bbc_news")
    small = data.load_text_classification("bbc_news", max_examples=101, seed=1)
    assert len(small) == 101
    counts = sorted(class_counts(small).values())
    assert counts[-1] - counts[0] <= 1
    again = data.load_text_classification("bbc_news", max_examples=101, seed=1)
    other = data.load_text_classification("bbc_news", max_examples=101, seed=2)
    assert list(small["text"]) == list(again["text"])
    assert list(small["text"]) != list(other["text"])
    # The subsample keeps corpus order: it is a subsequence of the full data set.
    remaining = iter(full["text"])
    assert all(text in remaining for text in small["text"])


def test_max_examples_keeps_small_classes_whole():
    ds = data.load_text_classification("tweet_sentiment", max_examples=30000, seed=0)
    counts = class_counts(ds)
    assert counts["positive"] == 6954  # smaller than its 10,000 share: kept whole
    assert abs(counts["negative"] - counts["neutral"]) <= 1
    assert sum(counts.values()) == 30000


def test_max_examples_larger_than_corpus_returns_everything():
    assert len(data.load_text_classification("bbc_news", max_examples=10**6)) == 2225


def test_parsed_corpus_is_cached():
    data.load_text_classification("bbc_news")
    before = data._read_embedded.cache_info().hits
    data.load_text_classification("bbc_news", max_examples=50)
    assert data._read_embedded.cache_info().hits == before + 1


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_name_offline_fails_with_embedded_alternatives(monkeypatch, variable):
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv(variable, "1")

    def no_network(*args, **kwargs):
        raise AssertionError("must not touch the network when offline")

    monkeypatch.setattr(data, "_hub_reachable", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(ValueError, match="name") as error:
        data.load_text_classification("stanfordnlp/sst2")
    message = str(error.value)
    assert "stanfordnlp/sst2" in message
    for name in data.EMBEDDED_DATASETS:
        assert name in message


def test_hub_name_unreachable_fails_with_embedded_alternatives(monkeypatch):
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="name") as error:
        data.load_text_classification("ag_news")
    assert "bbc_news" in str(error.value)


def test_hub_data_set_is_converted(monkeypatch):
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    fake = datasets.Dataset.from_dict(
        {"sentence": ["good", "bad", "fine", "meh", "?"], "label": [1, 0, 1, 0, -1]},
        features=datasets.Features(
            {
                "sentence": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["negative", "positive"]),
            }
        ),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: fake)
    ds = data.load_text_classification("someone/sst2-like")
    assert ds.column_names == ["text", "label", "source"]
    assert list(ds["text"]) == ["good", "bad", "fine", "meh"]  # the unlabelled row is dropped
    assert ds.features["label"].names == ["negative", "positive"]
    assert list(ds["source"]) == ["positive", "negative", "positive", "negative"]


def test_hub_data_set_with_plain_labels_gets_class_names(monkeypatch):
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    fake = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [3, 7, 3]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: fake)
    ds = data.load_text_classification("someone/plain")
    assert ds.features["label"].names == ["3", "7"]
    assert list(ds["label"]) == [0, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": None}, "name"),
        ({"name": 3}, "name"),
        ({"name": "bbc_news", "max_examples": 0}, "max_examples"),
        ({"name": "bbc_news", "max_examples": 2.5}, "max_examples"),
        ({"name": "bbc_news", "max_examples": True}, "max_examples"),
        ({"name": "bbc_news", "seed": -1}, "seed"),
        ({"name": "bbc_news", "seed": "0"}, "seed"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=parameter):
        data.load_text_classification(name, **kwargs)


def test_train_test_split_is_stratified_and_deterministic():
    ds = data.load_text_classification("bbc_news")
    train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(ds)
    # Together the parts are the whole corpus, each article once (BBC has duplicate texts,
    # hence multisets rather than sets).
    assert Counter(train["text"]) + Counter(test["text"]) == Counter(ds["text"])
    full, held_out = class_counts(ds), class_counts(test)
    for name, n in full.items():
        assert abs(held_out[name] - 0.2 * n) <= 1
    train_again, test_again = data.train_test_split(ds, test_fraction=0.2, seed=0)
    assert list(test["text"]) == list(test_again["text"])
    assert list(train["text"]) == list(train_again["text"])


def test_train_test_split_falls_back_when_a_class_is_tiny():
    tiny = datasets.Dataset.from_dict(
        {"text": list("abcdefghij"), "label": [0] * 6 + [1] * 3 + [2]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=3)}
        ),
    )
    train, test = data.train_test_split(tiny, test_fraction=0.34, seed=0)
    assert sorted(list(train["text"]) + list(test["text"])) == list("abcdefghij")
    assert set(train["label"]) == {0, 1, 2}  # every class keeps a training example
    assert Counter(test["label"]) == {0: 2, 1: 1}


@pytest.mark.parametrize(
    ("dataset", "kwargs", "parameter"),
    [
        ([{"text": "a", "label": 0}], {}, "dataset"),
        (None, {"test_fraction": 0.0}, "test_fraction"),
        (None, {"test_fraction": 1.0}, "test_fraction"),
        (None, {"test_fraction": "0.2"}, "test_fraction"),
        (None, {"seed": -3}, "seed"),
    ],
)
def test_train_test_split_bad_arguments_name_the_parameter(dataset, kwargs, parameter):
    if dataset is None:
        dataset = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    with pytest.raises(ValueError, match=parameter):
        data.train_test_split(dataset, **kwargs)
