"""Comparison: methods read from a stored study, seed by seed, with verdicts only where intervals allow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedlora_edu import studies
from fedlora_edu.studies import run_study
from fedlora_edu.teaching.comparison import ANCHORS, Comparison, mean_accuracy, where_and_when


@pytest.fixture
def stored(tmp_path, monkeypatch):
    """Three seeds: FedIT, a method steadily 2 points ahead of it, and one whose gap changes sign."""
    monkeypatch.setattr(studies, "RESULTS", tmp_path)
    base = {0: 0.60, 1: 0.70, 2: 0.65}
    offsets = {"FedIT": {0: 0.0, 1: 0.0, 2: 0.0}, "FLoRA": {0: 0.02, 1: 0.021, 2: 0.019},
               "FFA-LoRA": {0: 0.03, 1: -0.03, 2: 0.0}}

    def run_one(settings):
        seed = settings["seed"]
        if settings["method"] == ANCHORS:
            return {"probe_accuracy": base[seed] - 0.10, "final_accuracy": base[seed] + 0.05}
        accuracy = base[seed] + offsets[settings["method"]][seed]
        return {"final_accuracy": accuracy, "accuracy": [accuracy - 0.1, accuracy]}

    runs = [{"method": method, "seed": seed} for seed in base for method in (ANCHORS, *offsets)]
    run_study("part2", runs, run_one, profile="smoke", progress=False,
              methods_of=lambda settings: [] if settings["method"] == ANCHORS else [settings["method"]])
    return Comparison("part2", profile="smoke")


def test_gain_recovered_runs_from_the_probe_to_centralised_lora(stored):
    assert stored.gain().mean == pytest.approx(0.15)
    assert stored.recovered("FedIT").tolist() == pytest.approx([10 / 15] * 3)
    table = stored.table(["FedIT", "FLoRA", "FFA-LoRA"])
    assert table.loc["FedIT", "vs FedIT"] == "reference"
    assert table.loc["FLoRA", "vs FedIT"].startswith("ahead")
    assert table.loc["FFA-LoRA", "vs FedIT"].startswith("not distinguishable")
    assert stored.over_probe("FLoRA").tolist() == pytest.approx([0.12, 0.121, 0.119])
    assert stored.recoverable and table.loc["FedIT", "gain recovered"].startswith("0.667")


def test_verdicts_need_every_method_on_the_expected_side(stored):
    assert stored.verdict(["FLoRA"], "FedIT", "ahead") == "agrees"
    assert stored.verdict(["FLoRA"], "FedIT", "behind") == "disagrees"
    assert stored.verdict(["FLoRA", "FFA-LoRA"], "FedIT", "ahead") == "not distinguishable here"
    assert stored.verdict(["FLoRA"], "FedIT", "ahead", measure=mean_accuracy) == "agrees"
    with pytest.raises(ValueError, match="expected"):
        stored.verdict(["FLoRA"], "FedIT", "above")
    with pytest.raises(ValueError, match="lacks runs of 'RoLoRA'"):
        stored.runs("RoLoRA")
    assert "seeds [0, 1, 2]" in stored.provenance() and stored.stale == 0


def test_gain_recovered_is_refused_where_lora_does_not_beat_the_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RESULTS", tmp_path)
    anchors = {0: (0.5, 0.6), 1: (0.5, 0.45)}  # seed 1: centralised LoRA below the probe

    def run_one(settings):
        probe, centralized = anchors[settings["seed"]]
        if settings["method"] == ANCHORS:
            return {"probe_accuracy": probe, "final_accuracy": centralized}
        return {"final_accuracy": 0.55, "accuracy": [0.55]}

    runs = [{"method": method, "seed": seed} for seed in anchors for method in (ANCHORS, "FedIT")]
    run_study("part2", runs, run_one, profile="smoke", progress=False,
              methods_of=lambda settings: [] if settings["method"] == ANCHORS else [settings["method"]])
    comparison = Comparison("part2", profile="smoke")
    assert not comparison.gain().excludes(0) and not comparison.recoverable
    assert "gain recovered" not in comparison.table(["FedIT"]).columns
    with pytest.raises(ValueError, match=r"on seeds \[1\]"):
        comparison.recovered("FedIT")


def test_a_study_without_anchors_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RESULTS", tmp_path)
    run_study("part2", [{"method": "FedIT", "seed": 0}], lambda s: {"final_accuracy": 0.5}, profile="smoke",
              progress=False)
    with pytest.raises(ValueError, match="no anchor runs"):
        Comparison("part2", profile="smoke")


def test_runs_at_varied_settings_are_kept_apart(stored, tmp_path):
    """FedIT once more at another learning rate: reachable by that setting, and never in the default runs."""
    run_study("part2", [{"method": "FedIT", "seed": seed, "learning_rate": 1e-3} for seed in stored.seeds],
              lambda settings: {"final_accuracy": 0.1 * (settings["seed"] + 1), "accuracy": [0.1]}, profile="smoke",
              progress=False)
    comparison = Comparison("part2", profile="smoke")
    assert comparison.runs("FedIT", learning_rate=1e-3)["final_accuracy"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert comparison.runs("FedIT")["final_accuracy"].tolist() == stored.runs("FedIT")["final_accuracy"].tolist()
    assert comparison.over_probe("FedIT", learning_rate=1e-3).tolist() == pytest.approx([-0.4, -0.4, -0.25])
    assert comparison.table(["FedIT", "FLoRA"]).equals(stored.table(["FedIT", "FLoRA"]))
    with pytest.raises(ValueError, match=r"lacks runs of 'FedIT' at \{'local_steps': 1\}"):
        comparison.runs("FedIT", local_steps=1)
    with pytest.raises(ValueError, match="varies only"):
        comparison.runs("FedIT", rank=2)


def test_a_reference_variant_is_paired_with_the_package_run_of_its_method(stored):
    run_study("deviations", [{"variant": "FLoRA as its authors run it", "method": "FLoRA", "seed": seed}
                             for seed in stored.seeds],
              lambda settings: {"final_accuracy": 0.9 - 0.1 * settings["seed"]}, profile="smoke", progress=False)
    difference = stored.reference_deviation("FLoRA as its authors run it")
    flora = stored.runs("FLoRA")["final_accuracy"].to_numpy()
    assert difference.mean == pytest.approx(float((0.9 - 0.1 * np.arange(3) - flora).mean()))
    with pytest.raises(ValueError, match="has no variant 'FedIT reversed'"):
        stored.reference_deviation("FedIT reversed")


def test_each_profile_is_read_apart(stored):
    """Runs under another profile in the same file (a GPU study appended to a CPU one) never mix with these."""
    run_study("part2", [{"method": method, "seed": seed, "profile": "gpu"} for seed in (0, 1, 2)
                        for method in (ANCHORS, "FedIT")],
              lambda settings: ({"probe_accuracy": 0.2, "final_accuracy": 0.9} if settings["method"] == ANCHORS
                                else {"final_accuracy": 0.5, "accuracy": [0.5]}), profile="gpu", progress=False,
              methods_of=lambda settings: [] if settings["method"] == ANCHORS else [settings["method"]])
    at_gpu = Comparison("part2", profile="gpu")
    assert at_gpu.methods == ["FedIT"] and "(profile gpu)" in at_gpu.provenance()
    assert at_gpu.gain().mean == pytest.approx(0.7)
    again = Comparison("part2", profile="smoke")
    assert again.methods == ["FedIT", "FLoRA", "FFA-LoRA"]
    assert again.table(again.methods).equals(stored.table(stored.methods))
    with pytest.raises(ValueError, match=r"no runs under the profile 'cpu'; it has \['gpu', 'smoke'\]"):
        Comparison("part2")


def test_provenance_names_every_machine_commit_and_date_of_a_study_filled_over_sessions():
    def rows(entries):
        return pd.DataFrame([{"device_name": device, "commit": commit, "date": date}
                             for device, commit, date in entries])

    one = rows([("H200", "aaa", "2026-12-04T10:00:00")] * 2)
    assert where_and_when(one) == "H200, commit aaa, 2026-12-04"
    two = rows([("H200", "bbb", "2026-12-05T10:00:00"), ("H200", "aaa", "2026-12-04T10:00:00"),
                ("EPYC", "aaa", "2026-12-04T11:00:00")])
    assert where_and_when(two) == "H200, EPYC, commits aaa, bbb, 2026-12-04 to 2026-12-05"
    many = rows([("cpu", f"c{i}", f"2026-12-0{i}T00:00:00") for i in range(1, 6)])
    assert where_and_when(many) == "cpu, 5 commits from c1 to c5, 2026-12-01 to 2026-12-05"
