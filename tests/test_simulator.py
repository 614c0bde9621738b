"""The simulator on the real embedded model: exactness of FLoRA and FedEx-LoRA in the effective
weights, discordance of FedIT vs FFA-LoRA, determinism, NaN handling, bytes and bad input."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from helpers import TINY, recording

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.factors import ideal_update
from fedlora_edu.core.strategy import Payload, Strategy, split_factors
from fedlora_edu.core.svd import truncated_factors
from fedlora_edu.distributed.corrective import FedExLoRA
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.distributed.full_size import FlexLoRA, FLoRA
from fedlora_edu.distributed.single_matrix import FFALoRA
from fedlora_edu.simulation.federation import build_federation

warnings.filterwarnings("ignore", category=FutureWarning)

def ideal_effective_weights(federation, strategy) -> dict[str, torch.Tensor]:
    """W'_0 + (alpha/r) sum_k p_k B_k A_k from the round's uploads (survey eq. 4, right side)."""
    pristine = federation.fresh_model()
    scaling = adapter_io.lora_scaling(pristine)
    names = list(adapter_io.lora_layers(pristine))
    total = sum(u.num_examples for u in strategy.uploads)
    weights = [u.num_examples / total for u in strategy.uploads]
    expected = {}
    for name in names:
        As, Bs = [], []
        for upload in strategy.uploads:
            a, b = split_factors(upload.payload, [name])
            As.append(a[name])
            Bs.append(b[name])
        expected[name] = adapter_io.base_weight(pristine, name).detach() + scaling * ideal_update(As, Bs, weights)
    return expected


def matches_ideal(federation, cls) -> bool:
    strategy = recording(cls)()
    federation.run(strategy, rounds=1, progress=False)
    expected = ideal_effective_weights(federation, strategy)
    return all(
        torch.allclose(adapter_io.effective_weight(federation.last_model, name), w, atol=1e-5, rtol=1e-4)
        for name, w in expected.items()
    )


@pytest.mark.parametrize("cls", [FedExLoRA, FLoRA])
def test_exact_methods_reproduce_the_ideal_update_in_the_effective_weights(federation, cls):
    assert matches_ideal(federation, cls)


def test_flexlora_global_weight_is_the_best_rank_r_approximation(federation):
    strategy = recording(FlexLoRA)()
    federation.run(strategy, rounds=1, progress=False)
    pristine = federation.fresh_model()
    scaling = adapter_io.lora_scaling(pristine)
    base = {n: adapter_io.base_weight(pristine, n).detach() for n in adapter_io.lora_layers(pristine)}
    ideal = {n: w - base[n] for n, w in ideal_effective_weights(federation, strategy).items()}
    for name, update in ideal.items():
        a, b = truncated_factors(update / scaling, TINY.rank)
        got = adapter_io.effective_weight(federation.last_model, name)
        torch.testing.assert_close(got, base[name] + scaling * (b @ a), atol=1e-5, rtol=1e-4)
        # Three rank-4 clients make a rank-12 sum: a rank-4 global weight cannot be exact.
        assert float(torch.linalg.matrix_norm(got - base[name] - update)) > 1e-6


def test_fedit_does_not_reproduce_the_ideal_update(federation):
    assert not matches_ideal(federation, FedIT)


def test_a_transposed_residual_fails_the_exactness_check(federation):
    class TransposedFedEx(FedExLoRA):
        def aggregate(self, server, uploads, round_index):
            super().aggregate(server, uploads, round_index)
            server.base_deltas = {n: d.T.contiguous() for n, d in server.base_deltas.items()}

    layer = next(iter(adapter_io.lora_layers(federation.fresh_model()).values()))
    assert layer.get_base_layer().weight.shape[0] == layer.get_base_layer().weight.shape[1]  # square: shapes fit
    assert not matches_ideal(federation, TransposedFedEx)


def test_ffa_lora_leaves_no_discordance_while_fedit_does(federation):
    fedit = federation.run(FedIT(), rounds=2, progress=False)
    ffa = federation.run(FFALoRA(), rounds=2, progress=False)
    assert (fedit["discordance"] > 1e-4).all()
    assert (ffa["discordance"] < 1e-6).all()
    # A never moves under FFA-LoRA.
    initial = adapter_io.get_lora_factors(federation.fresh_model())
    final = federation.last_server.adapters
    for name, (a, _) in initial.items():
        torch.testing.assert_close(final[name][0], a)


def test_same_seed_gives_the_same_history(federation):
    first = federation.run(FedIT(), rounds=2, progress=False, seed=3)
    second = federation.run(FedIT(), rounds=2, progress=False, seed=3)
    other = federation.run(FedIT(), rounds=2, progress=False, seed=4)
    columns = [c for c in first.columns if c != "server_seconds"]
    pd.testing.assert_frame_equal(first[columns], second[columns])
    assert not first[columns].equals(other[columns])


def test_a_run_without_evaluation_trains_and_aggregates_the_same(federation):
    """evaluate=False leaves accuracy and test loss NaN and changes nothing else the run measures."""
    evaluated = federation.run(FedIT(), rounds=2, progress=False, seed=1)
    skipped = federation.run(FedIT(), rounds=2, progress=False, seed=1, evaluate=False)
    assert evaluated[["accuracy", "test_loss"]].notna().all().all()
    assert skipped[["accuracy", "test_loss"]].isna().all().all()
    columns = ["train_loss", "bytes_up", "bytes_down", "discordance", "aggregation_error"]
    pd.testing.assert_frame_equal(skipped[columns], evaluated[columns])


def test_history_counts_real_bytes(federation):
    history = federation.run(FedIT(), rounds=1, progress=False)
    model = federation.fresh_model()
    adapter_bytes = adapter_io.tensor_bytes([t for f in adapter_io.get_lora_factors(model).values() for t in f])
    head_bytes = adapter_io.tensor_bytes(adapter_io.get_head_state(model))
    per_client = adapter_bytes + head_bytes
    assert history.loc[0, "bytes_up"] == 3 * per_client
    assert history.loc[0, "bytes_down"] == 3 * per_client
    ffa = federation.run(FFALoRA(), rounds=1, progress=False)
    assert ffa.loc[0, "bytes_up"] == 3 * (adapter_bytes // 2 + head_bytes)  # A and B have the same size here
    fedex = federation.run(FedExLoRA(), rounds=2, progress=False)
    full_size = sum(adapter_io.base_weight(model, n).numel() * 4 for n in adapter_io.lora_layers(model))
    assert fedex.loc[1, "bytes_down"] == 3 * (per_client + full_size)
    assert full_size > adapter_bytes


def test_nan_update_is_left_out_with_a_warning(federation):
    class Poisoned(FedIT):
        def client_upload(self, result, client_state, round_index):
            payload = super().client_upload(result, client_state, round_index)
            if result.client_id == 0:
                first = next(iter(payload.tensors))
                payload.tensors[first] = torch.full_like(payload.tensors[first], math.nan)
                return Payload(payload.tensors)
            return payload

    with pytest.warns(RuntimeWarning, match="client 0"):
        history = federation.run(Poisoned(), rounds=1, progress=False)
    assert history.loc[0, "excluded"] == 1
    for a, b in federation.last_server.adapters.values():
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert math.isfinite(history.loc[0, "accuracy"])


def test_heterogeneous_ranks_train_only_their_components(federation):
    strategy = recording(FlexLoRA)(ranks=[1, 2, 4])
    history = federation.run(strategy, rounds=1, progress=False)
    assert math.isnan(history.loc[0, "discordance"])  # separate averaging is undefined for mixed ranks
    by_client = {u.client_id: u for u in strategy.uploads}
    for client_id, rank in enumerate([1, 2, 4]):
        a, b = split_factors(by_client[client_id].payload, list(federation.last_server.adapters))
        assert all(t.shape[0] == rank for t in a.values())
        assert all(t.shape[1] == rank for t in b.values())
    assert all(a.shape[0] == 4 for a, _ in federation.last_server.adapters.values())


def test_flora_download_is_the_stacked_adapter(federation):
    history = federation.run(FLoRA(), rounds=2, progress=False)
    model = federation.fresh_model()
    head_bytes = adapter_io.tensor_bytes(adapter_io.get_head_state(model))
    adapter_bytes = adapter_io.tensor_bytes([t for f in adapter_io.get_lora_factors(model).values() for t in f])
    assert history.loc[0, "bytes_down"] == 3 * head_bytes  # nothing stacked yet
    assert history.loc[1, "bytes_down"] == 3 * (head_bytes + 3 * adapter_bytes)  # stack of 3 clients


def test_bad_run_arguments_are_named(federation):
    with pytest.raises(ValueError, match="rounds"):
        federation.run(FedIT(), rounds=0, progress=False)
    with pytest.raises(ValueError, match="clients_per_round"):
        federation.run(FedIT(), clients_per_round=10, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        federation.run(FedIT(), learning_rate=-1.0, progress=False)
    with pytest.raises(TypeError, match="strategy"):
        federation.run("FedIT", progress=False)


def test_bad_federation_arguments_are_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="num_clients"):
        build_federation("bbc_news", profile=TINY, num_clients=1000)
    with pytest.raises(ValueError, match="name"):
        build_federation("no_such_dataset_offline", profile=TINY)
    with pytest.raises(ValueError, match="scheme"):
        build_federation("bbc_news", profile=TINY, scheme="zipf")
    with pytest.raises(ValueError, match="alpha"):
        build_federation("bbc_news", profile=TINY, scheme="dirichlet", alpha=0.0)


def test_centralized_training_learns(federation):
    history = federation.centralized(steps=20, eval_every=10, batch_size=8, progress=False)
    assert list(history["step"]) == [10, 20]
    assert history["train_loss"].iloc[-1] < math.log(5)  # below the loss of a uniform guess


def test_the_interface_expresses_private_state_personal_models_and_compressed_payloads(federation):
    """A toy personalised method: each client keeps its trained adapter (never uploaded), is
    evaluated with it on its own split, and sends a head quantised to one byte per value."""
    @dataclass
    class Rounds:
        seen: int = 0

    @dataclass
    class Private:
        adapters: dict | None = None
        head: dict | None = None

    class PrivateAdapters(Strategy):
        name = "private"
        State = Rounds
        ClientState = Private

        def client_start(self, server, client_id, client_state, round_index):
            start = super().client_start(server, client_id, client_state, round_index)
            if client_state.adapters is not None:
                start.adapters = client_state.adapters
            start.download = Payload(nbytes=0)
            return start

        def client_upload(self, result, client_state, round_index):
            client_state.adapters = result.adapters
            client_state.head = result.head
            return Payload({f"head.{k}": v for k, v in result.head.items()},
                           nbytes=sum(v.numel() for v in result.head.values()))

        def aggregate(self, server, uploads, round_index):
            server.method_state.seen += 1
            self.aggregate_head(server, uploads)

        def personal_model(self, server, client_id, client_state):
            return None if client_state.adapters is None else (client_state.adapters, client_state.head)

    strategy = PrivateAdapters()
    history = federation.run(strategy, rounds=2, progress=False, evaluate_clients=True)
    head_values = sum(v.numel() for v in adapter_io.get_head_state(federation.fresh_model()).values())
    assert (history["bytes_up"] == 3 * head_values).all()
    assert (history["bytes_down"] == 0).all()
    assert history["client_accuracy"].between(0, 1).all()
    assert federation.last_server.method_state.seen == 2
    # The global adapter never moved: nothing was aggregated into it.
    for name, (a, _) in adapter_io.get_lora_factors(federation.fresh_model()).items():
        torch.testing.assert_close(federation.last_server.adapters[name][0], a)
        assert torch.count_nonzero(federation.last_server.adapters[name][1]) == 0


def test_centralized_evaluation_does_not_change_training(federation):
    coarse = federation.centralized(steps=6, eval_every=6, batch_size=4, progress=False)
    fine = federation.centralized(steps=6, eval_every=2, batch_size=4, progress=False)
    assert coarse["test_loss"].iloc[-1] == pytest.approx(fine["test_loss"].iloc[-1], abs=1e-6)


def test_prepare_sees_the_model_and_its_base_deltas_reach_w_prime_before_round_one(federation):
    """Strategy.prepare (survey 3.2, data- and weight-driven initialisation): what it puts in
    server.base_deltas is in W' when round 1 starts, and it sees the pre-trained model."""
    seen = {}

    class Shifted(FedIT):
        name = "FedIT shifted"

        def prepare(self, federation_, model, server, seed):
            layer = next(iter(server.adapters))
            seen["pretrained"] = adapter_io.base_weight(model, layer).detach().clone()
            seen["layer"] = layer
            server.base_deltas = {layer: torch.full_like(seen["pretrained"], 0.5)}

        def client_start(self, server, client_id, client_state, round_index):
            if round_index == 0 and "at_round_one" not in seen:
                seen["at_round_one"] = adapter_io.base_weight(federation.last_model_in_run, seen["layer"]).clone()
            return super().client_start(server, client_id, client_state, round_index)

    original_fresh = federation.fresh_model

    def remembering_fresh(*args, **kwargs):
        model = original_fresh(*args, **kwargs)
        federation.last_model_in_run = model
        return model

    federation.fresh_model = remembering_fresh
    try:
        federation.run(Shifted(), rounds=1, progress=False, engine="sequential")
    finally:
        federation.fresh_model = original_fresh
    torch.testing.assert_close(seen["pretrained"], adapter_io.base_weight(original_fresh(), seen["layer"]).detach())
    torch.testing.assert_close(seen["at_round_one"], seen["pretrained"] + 0.5)


def test_every_registered_method_is_built_by_name():
    from fedlora_edu.registry import METHODS, make_strategy

    assert {"FedIT", "FFA-LoRA", "FLoRA", "FlexLoRA", "FedEx-LoRA", "CoLR", "RoLoRA", "LoRA-A2",
            "FedPipe"} <= set(METHODS)
    for name in METHODS:
        assert make_strategy(name).name == name


def test_aggregation_error_is_zero_for_exact_methods_and_fedit_discordance_for_fedit(federation):
    """history["aggregation_error"] = ||W_global - sum_k p_k W_k||_F after each round (survey eq. 4)."""
    errors = {}
    for cls in (FedIT, FFALoRA, FLoRA, FedExLoRA, FlexLoRA):
        history = federation.run(cls(), rounds=2, progress=False)
        errors[cls.name] = history
    scale = float(errors["FedIT"]["discordance"].max())
    assert scale > 0
    for name in ("FFA-LoRA", "FLoRA", "FedEx-LoRA"):
        assert float(errors[name]["aggregation_error"].max()) < 1e-4 * scale, name
    # FedIT's error is exactly its discordance; FlexLoRA's is a truncation tail, not zero.
    assert errors["FedIT"]["aggregation_error"].tolist() == pytest.approx(errors["FedIT"]["discordance"].tolist(),
                                                                         rel=1e-4)
    assert float(errors["FlexLoRA"]["aggregation_error"].min()) > 1e-4 * scale


def test_a_probe_head_is_fitted_frozen_and_never_sent():
    """head='probe': the head is the best linear probe on the frozen features, the run starts at the probe's
    accuracy (B = 0), only LoRA factors train and cross the network, and the head never moves."""
    probe_federation = build_federation("bbc_news", scheme="iid", profile=TINY, seed=0, head="probe")
    fit = probe_federation.probe
    assert fit is not None and not probe_federation.train_head
    model = probe_federation.fresh_model()
    assert adapter_io.get_head_state(model) == {}  # nothing of the head is trainable
    classifier = model.base_model.model.classifier
    torch.testing.assert_close(classifier.weight, fit.weight)
    from fedlora_edu.foundations.training import evaluate
    from fedlora_edu.simulation.federation import pooled_features

    start_accuracy = evaluate(model, probe_federation.test)[0]
    features = pooled_features(probe_federation.base_model, probe_federation.test)
    assert start_accuracy == pytest.approx(fit.accuracy(features, probe_federation.test.labels))
    for engine in ("sequential", "batched"):
        history = probe_federation.run(FedIT(), rounds=1, progress=False, engine=engine)
        factors = adapter_io.get_lora_factors(model)
        assert history.loc[0, "bytes_up"] == 3 * adapter_io.tensor_bytes([t for f in factors.values() for t in f])
        torch.testing.assert_close(probe_federation.last_model.base_model.model.classifier.weight, fit.weight)
    with pytest.raises(ValueError, match="head must be one of"):
        build_federation("bbc_news", profile=TINY, head="linear")


def test_adapting_the_top_layers_on_cached_inputs_is_the_whole_model_run_on_tokens():
    """adapted_layers=2: the frozen bottom's output is computed once per example; with dropout off a run on
    those cached inputs equals the same run that pushes every batch through the whole encoder."""
    from fedlora_edu.foundations.training import ClientData
    from fedlora_edu.simulation.engine import disable_dropout
    from fedlora_edu.simulation.federation import Federation

    cached = build_federation("bbc_news", scheme="iid", profile=TINY, seed=0, adapted_layers=2)
    assert cached.base_model.frozen_layers == 4 and all(c.hidden is not None for c in cached.clients)
    assert cached.test.hidden.shape == (*cached.test.input_ids.shape, 384)
    disable_dropout(cached.base_model)
    def strip(data):
        return ClientData(data.input_ids, data.attention_mask, data.labels)

    whole = Federation(cached.base_model, [strip(c) for c in cached.clients], strip(cached.test), profile=TINY)
    for engine in ("sequential", "batched"):
        fast = cached.run(FedIT(), rounds=2, progress=False, engine=engine)
        slow = whole.run(FedIT(), rounds=2, progress=False, engine=engine)
        assert fast["accuracy"].tolist() == slow["accuracy"].tolist()
        pd.testing.assert_series_equal(fast["train_loss"], slow["train_loss"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="adapted_layers must be an integer in 1..6"):
        build_federation("bbc_news", profile=TINY, adapted_layers=7)


def test_update_size_is_the_weighted_change_the_clients_trained(federation):
    """Round 1 of FedIT starts every client at B = 0, so the ideal update is s sum_k p_k B_k A_k of the uploads."""
    strategy = recording(FedIT)()
    history = federation.run(strategy, rounds=1, progress=False)
    uploads = strategy.rounds[0][1]
    weights = [u.num_examples / sum(v.num_examples for v in uploads) for u in uploads]
    names = list(strategy.rounds[0][0])
    total = 0.0
    for name in names:
        pairs = [split_factors(u.payload, [name]) for u in uploads]
        total += float(ideal_update([a[name] for a, _ in pairs], [b[name] for _, b in pairs], weights).square().sum())
    scaling = federation.last_server.scaling
    assert history.loc[0, "update_size"] == pytest.approx(scaling * math.sqrt(total), rel=1e-5)


def test_evaluate_scores_every_example_as_if_alone_whatever_the_batching():
    """``evaluate`` visits the examples shortest first and cuts each batch to its own longest example:
    accuracy and loss are those of scoring each example alone, untrimmed, for any batch size."""
    from fedlora_edu.foundations.training import ClientData, evaluate

    federation = build_federation("health_tweets", profile=TINY, seed=0)  # tweets of many lengths
    model = federation.fresh_model()
    adapter_io.set_lora_factors(model, {name: (a, torch.randn_like(b)) for name, (a, b)
                                        in adapter_io.get_lora_factors(model).items()})
    data = federation.test
    model.eval()
    correct, losses = 0, []
    with torch.no_grad():
        for i in range(len(data)):
            one = data.subset([i])
            batch = {"input_ids": one.input_ids, "attention_mask": one.attention_mask, "labels": one.labels}
            if one.hidden is not None:
                batch["hidden_states"] = one.hidden
            output = model(**batch)
            correct += int(output.logits.argmax(dim=-1).item() == one.labels.item())
            losses.append(float(output.loss))
    lengths = data.attention_mask.sum(dim=1)
    assert int(lengths.min()) < int(lengths.max())  # the batches are really trimmed differently
    for batch_size in (1, 3, 64, len(data) + 5):
        accuracy, loss = evaluate(model, data, batch_size=batch_size)
        assert accuracy == correct / len(data)
        assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, data, batch_size=0)
    assert isinstance(data, ClientData)
