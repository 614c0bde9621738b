"""The embedded model, hub names offline, LoRA wrapping, profiles and adapter I/O."""

from __future__ import annotations

import sys

import pytest
import torch

from fedlora_edu.assets.models import (
    MeanPoolingClassifier,
    add_lora,
    embedded_model_dir,
    load_classifier,
    resolve_model,
)
from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.foundations.fedavg import embed_texts
from fedlora_edu.simulation.profiles import PROFILES, describe_environment, get_profile, library_versions


@pytest.fixture(scope="module")
def lora_model():
    model, tokenizer = load_classifier(num_labels=3, seed=0)
    return add_lora(model, rank=4, alpha=8.0, seed=0), tokenizer


def test_embedded_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (embedded_model_dir() / "model.safetensors").is_file()
    model, tokenizer = load_classifier("all-MiniLM-L6-v2", num_labels=5)
    assert model.config.model_type == "bert" and model.num_labels == 5
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
    assert isinstance(model, MeanPoolingClassifier)  # a sentence-transformers checkpoint: mean pooling by default


TEXTS = ["the markets fell sharply", "a late goal won the cup final for the home side", "new phone, old battery"]


def test_mean_pooling_reads_the_probe_features_and_with_the_probe_head_is_the_probe():
    model, tokenizer = load_classifier(num_labels=3, seed=0)
    features = embed_texts(model, tokenizer, TEXTS, max_length=16, progress=False)  # Part I's probe features
    batch = tokenizer(TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        pooled = model.pooled(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(pooled, features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled.norm(dim=1), torch.ones(3))
        probe = torch.nn.Linear(features.shape[1], 3)
        model.classifier.load_state_dict(probe.state_dict())
        torch.testing.assert_close(model(**batch).logits, probe(features), atol=1e-5, rtol=1e-5)
        labels = torch.tensor([0, 1, 2])
        loss = model(**batch, labels=labels).loss
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(probe(features), labels), atol=1e-5,
                                   rtol=1e-5)


def test_pooling_can_be_the_models_own_head():
    model, _ = load_classifier(num_labels=3, seed=0, pooling="model")
    assert type(model).__name__ == "BertForSequenceClassification"
    with pytest.raises(ValueError, match="pooling must be one of"):
        load_classifier(num_labels=3, pooling="cls")


def test_hub_name_offline_fails_at_once_naming_the_embedded_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="embedded") as error:
        resolve_model("bert-base-uncased")
    assert "bert-base-uncased" in str(error.value)
    with pytest.raises(ValueError, match="num_labels"):
        load_classifier(num_labels=1)
    with pytest.raises(ValueError, match="model name"):
        resolve_model("")


def test_add_lora_starts_equal_to_the_pretrained_model(lora_model):
    model, tokenizer = lora_model
    batch = tokenizer(["the markets fell sharply"], return_tensors="pt")
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
    torch.testing.assert_close(adapted, plain)  # B = 0 (survey eq. 9)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)


def test_bad_lora_arguments_are_named(lora_model):
    model, _ = load_classifier(num_labels=2)
    for kwargs, name in [({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"), ({"dropout": 1.0}, "dropout")]:
        with pytest.raises(ValueError, match=name):
            add_lora(model, **kwargs)


def test_factor_round_trip_and_zero_padding(lora_model):
    model, _ = lora_model
    factors = adapter_io.get_lora_factors(model)
    name, (a, b) = next(iter(factors.items()))
    assert a.shape == (4, 384) and b.shape == (384, 4)  # A is r x n, B is m x r
    low = {n: (torch.ones(2, a.shape[1]), torch.ones(b.shape[0], 2)) for n, (a, b) in factors.items()}
    adapter_io.set_lora_factors(model, low)
    padded = adapter_io.get_lora_factors(model)
    assert torch.equal(padded[name][0][2:], torch.zeros(2, a.shape[1]))
    assert torch.equal(adapter_io.get_lora_factors(model, rank=2)[name][0], torch.ones(2, a.shape[1]))
    scaling = adapter_io.lora_scaling(model)
    assert scaling == pytest.approx(2.0)
    expected = adapter_io.base_weight(model, name) + scaling * torch.ones(384, 2) @ torch.ones(2, 384)
    torch.testing.assert_close(adapter_io.effective_weight(model, name), expected.detach())
    with pytest.raises(ValueError, match="do not fit"):
        adapter_io.set_lora_factors(model, {n: (b.T, a.T.T) for n, (a, b) in factors.items()} | {
            name: (torch.ones(4, 10), torch.ones(384, 4))})
    adapter_io.set_lora_factors(model, factors)


def test_profiles_are_chosen_by_environment(monkeypatch):
    monkeypatch.setenv("FEDLORA_PROFILE", "smoke")
    assert get_profile().name == "smoke"
    monkeypatch.setenv("FEDLORA_PROFILE", "huge")
    with pytest.raises(ValueError, match="FEDLORA_PROFILE"):
        get_profile()
    assert get_profile("cpu") is PROFILES["cpu"]
    text = describe_environment(PROFILES["cpu"])
    assert "profile: cpu" in text and "torch" in text and "peft" in text
    with pytest.raises(ValueError, match="unknown profile field"):
        PROFILES["cpu"].with_overrides(clients=3)
    small, big = PROFILES["smoke"], PROFILES["gpu"]
    assert small.num_clients < big.num_clients and small.rounds < big.rounds and small.max_length < big.max_length


def test_library_versions_name_a_missing_library_instead_of_failing(monkeypatch):
    """A GPU machine without ``datasets`` still records a benchmark's provenance."""
    import datasets
    import peft

    versions = library_versions()
    assert versions["datasets"] == datasets.__version__ and versions["peft"] == peft.__version__
    monkeypatch.setitem(sys.modules, "datasets", None)  # what Python does for a module it cannot import
    with pytest.raises(ModuleNotFoundError):
        import datasets  # noqa: F401, F811
    versions = library_versions()
    assert versions["datasets"] == "not installed"
    assert versions["torch"] == torch.__version__ and versions["peft"] == peft.__version__


def test_any_model_folder_goes_through_the_same_call(tmp_path):
    """Hub names and local folders share one path: a small BERT saved to disk loads like a hub model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=4)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(tmp_path)
    model, _ = load_classifier(str(tmp_path), num_labels=4)
    wrapped = add_lora(model, rank=2, alpha=4.0)
    assert len(adapter_io.lora_layers(wrapped)) == 4  # query and value in 2 layers


@pytest.mark.parametrize("frozen", [0, 1, 4, 5])
def test_the_frozen_bottom_and_the_adapted_top_give_the_whole_encoder(frozen):
    model, tokenizer = load_classifier(num_labels=3, seed=0, frozen_layers=frozen)
    batch = tokenizer(TEXTS, truncation=True, max_length=16, padding="max_length", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        whole = model.pooled(batch["input_ids"], batch["attention_mask"])
        cached = model.bottom(batch["input_ids"], batch["attention_mask"])
        split = model.pooled(None, batch["attention_mask"], hidden_states=cached)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    assert model.adapted_layers == list(range(frozen, 6))
    adapted = {name.split(".layer.")[1].split(".")[0] for name in adapter_io.lora_layers(add_lora(model, rank=2))}
    assert adapted == {str(i) for i in range(frozen, 6)}  # LoRA only where the encoder is not cached


def test_frozen_layers_are_checked():
    with pytest.raises(ValueError, match="frozen_layers must be an integer in 0..5"):
        load_classifier(num_labels=3, frozen_layers=6)
    with pytest.raises(ValueError, match="needs pooling='mean'"):
        load_classifier(num_labels=3, pooling="model", frozen_layers=2)
