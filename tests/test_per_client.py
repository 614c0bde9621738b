"""Per-client measurement (fedlora_edu.teaching.per_client): kept states, served models, numbers kept, verdicts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedlora_edu import METHODS, studies
from fedlora_edu.core.adapters import lora_layers
from fedlora_edu.heterogeneity.personalized import FedSALoRA
from fedlora_edu.teaching.per_client import (
    PerClientComparison,
    clients_mean,
    keeping_client_states,
    numbers_kept,
    served_accuracies,
    server_accuracy,
    worst_client,
)


def test_kept_states_are_the_runs_and_rebuild_what_the_simulator_scored(shards_federation):
    strategy = keeping_client_states(FedSALoRA)()
    assert isinstance(strategy, FedSALoRA) and strategy.name == "FedSA-LoRA"
    history = shards_federation.run(strategy, rounds=2, progress=False, evaluate_clients=True)
    states = strategy.client_states[-shards_federation.num_clients:]
    assert len(strategy.client_states) == shards_federation.num_clients
    accuracies, personal = served_accuracies(shards_federation, strategy, shards_federation.last_server, states)
    assert np.isclose(np.mean(accuracies), history["client_accuracy"].iloc[-1], atol=1e-12)
    # FedSA-LoRA serves a personal model to every client that trained (it keeps a B), the server's to the others.
    assert personal == [state.B is not None for state in states] and any(personal)
    # The same run without keeping: identical history (keeping changes nothing the method does).
    plain = shards_federation.run(FedSALoRA(), rounds=2, progress=False, evaluate_clients=True)
    pd.testing.assert_series_equal(plain["client_accuracy"], history["client_accuracy"])


def test_served_models_take_the_runs_base_weights_for_a_method_that_changes_them(shards_federation):
    # FLoRA merges each round's stack into W': the server's state holds only the last round's change, so the served
    # models rebuild the run's scores only with the run's W' (base=federation.last_model), not with the pre-trained one.
    strategy = keeping_client_states(METHODS["FLoRA"])()
    history = shards_federation.run(strategy, rounds=2, progress=False, evaluate_clients=True)
    states = strategy.client_states[-shards_federation.num_clients:]
    server, model = shards_federation.last_server, shards_federation.last_model
    with_base, _ = served_accuracies(shards_federation, strategy, server, states, base=model)
    assert np.isclose(np.mean(with_base), history["client_accuracy"].iloc[-1], atol=1e-12)
    fresh = shards_federation.fresh_model()
    changed = [name for name, layer in lora_layers(model).items()
               if not torch.equal(layer.get_base_layer().weight, lora_layers(fresh)[name].get_base_layer().weight)]
    assert changed  # W' did change, so the default (pre-trained W') serves other models
    with pytest.raises(ValueError, match="base must be a model of the same federation"):
        served_accuracies(shards_federation, strategy, server, states, base=torch.nn.Linear(2, 2))


def test_served_accuracies_checks_its_inputs(federation, shards_federation):
    strategy = METHODS["FedIT"]()
    with pytest.raises(ValueError, match="client_states has 1 entries"):
        served_accuracies(shards_federation, strategy, None, [None])
    if federation.client_tests is None:
        with pytest.raises(ValueError, match="client_tests"):
            served_accuracies(federation, strategy, None, [])


def test_numbers_kept_counts_floats_once_through_every_container():
    shared = torch.zeros(3, 4)

    class Holder:
        def __init__(self):
            self.a = shared
            self.again = shared  # the same tensor twice: counted once
            self.mask = torch.ones(5, dtype=torch.bool)  # structure, not numbers
            self.index = torch.arange(7)
            self.scalar = 0.5

    layer = torch.nn.Linear(4, 2)  # 8 + 2
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # moments: exp_avg and exp_avg_sq of 10 numbers each (and a float step)
    state = {"holder": Holder(), "list": [torch.ones(2), (torch.ones(3),)], "layer": layer, "optimizer": optimizer}
    steps = 2 if optimizer.state[layer.weight]["step"].is_floating_point() else 0  # a float tensor step per parameter
    assert numbers_kept(state) == 12 + 2 + 3 + 10 + 20 + steps
    assert numbers_kept(None) == 0 and numbers_kept(FedSALoRA.ClientState()) == 0


def _write_study(folder, rows):
    path = folder / "toy.jsonl"
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _row(method, seed, clients, server=0.5):
    return {"settings": {"method": method, "seed": seed, "profile": "cpu"},
            "measured": {"final_accuracy": server, "accuracy": [server], "client_accuracies": clients,
                         "probe_client_accuracies": [0.3] * len(clients), "bytes_up": [10], "bytes_down": [20]},
            "seconds": 1.0, "methods": [method], "code": "",
            "provenance": {"commit": "abc", "date": "2026-12-04T00:00:00", "device_name": "test cpu"}}


def test_comparison_pairs_by_seed_and_gives_verdicts(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RESULTS", tmp_path)
    rows = []
    for seed, shift in enumerate((0.0, 0.02, -0.01)):
        rows.append(_row("FedIT", seed, [0.2 + shift, 0.4 + shift], server=0.5 + shift))
        rows.append(_row("FedSA-LoRA", seed, [0.6 + shift, 0.5 + shift], server=0.5 + shift + 0.01 + 0.001 * seed))
        rows.append(_row("CE-LoRA", seed, [0.3 + 0.2 * (-1) ** seed, 0.3], server=0.5))
    _write_study(tmp_path, rows)
    stored = PerClientComparison("toy")
    assert stored.seeds == [0, 1, 2] and stored.methods == ["FedIT", "FedSA-LoRA", "CE-LoRA"]
    assert np.allclose(clients_mean(stored.runs("FedSA-LoRA")), [0.55, 0.57, 0.54])
    assert np.allclose(worst_client(stored.runs("FedIT")), [0.2, 0.22, 0.19])
    assert stored.side("FedSA-LoRA", "FedIT") == "ahead" and stored.side("FedIT", "FedSA-LoRA") == "behind"
    assert stored.side("CE-LoRA", "FedIT") is None
    assert stored.verdict(["FedSA-LoRA"], "FedIT", "ahead") == "agrees"
    assert stored.verdict(["FedSA-LoRA", "CE-LoRA"], "FedIT", "ahead") == "not distinguishable here"
    assert stored.verdict(["FedSA-LoRA"], "FedIT", "behind") == "disagrees"
    # +0.010, +0.011, +0.012: small but consistent
    assert stored.side("FedSA-LoRA", "FedIT", server_accuracy) == "ahead"
    table = stored.table(["FedIT", "FedSA-LoRA", "CE-LoRA"])
    assert table.loc["FedIT", "clients, mean vs FedIT"] == "reference"
    assert table.loc["FedSA-LoRA", "clients, mean vs FedIT"].startswith("ahead (+0.250")
    assert table.loc["CE-LoRA", "clients, mean vs FedIT"].startswith("not distinguishable")
    assert table.loc["FedSA-LoRA", "MB / round"] == pytest.approx(30e-6)
    assert "9 runs of 3 methods over seeds [0, 1, 2]" in stored.provenance()
    with pytest.raises(ValueError, match="no runs of 'PerFIT'"):
        stored.runs("PerFIT")
    with pytest.raises(ValueError, match="expected must be"):
        stored.verdict(["FedSA-LoRA"], "FedIT", "sideways")


def test_comparison_names_a_missing_seed_and_an_empty_study(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RESULTS", tmp_path)
    _write_study(tmp_path, [_row("FedIT", 0, [0.5]), _row("FedIT", 1, [0.5]), _row("FL-TAC", 0, [0.5])])
    with pytest.raises(ValueError, match=r"lacks runs of 'FL-TAC' for seeds \[1\]"):
        PerClientComparison("toy").runs("FL-TAC")
    with pytest.raises(FileNotFoundError, match="never_ran"):
        PerClientComparison("never_ran")
