"""The cost of a federation (book/part4/cost): the Pareto front, the verdict rule on intervals, the joined studies,
and the stored costs study (studies/costs.py), current and complete."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import ROOT

from fedlora_edu import studies
from fedlora_edu.simulation.metrics import Interval
from fedlora_edu.studies import RESULTS, run_study, stale_rows
from fedlora_edu.teaching.comparison import ANCHORS, Comparison, pareto_front, verdict_of_intervals


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    #          cheap+good  dominated  costly+best  same cost, worse  a tie of the first
    costs = [1.0, 2.0, 5.0, 1.0, 1.0]
    values = [0.6, 0.5, 0.9, 0.4, 0.6]
    assert pareto_front(costs, values) == [True, False, True, False, True]
    # cheaper but worse stays on the front; a point cheaper and better removes it
    assert pareto_front([1, 2], [0.1, 0.2]) == [True, True]
    assert pareto_front([1, 2], [0.3, 0.2]) == [True, False]
    assert pareto_front([3.0], [0.0]) == [True]
    with pytest.raises(ValueError, match="finite"):
        pareto_front([1.0, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="one length"):
        pareto_front([1.0, 2.0], [0.1])


def test_the_verdict_rule_reads_each_paired_interval_against_zero():
    above, below = Interval(0.05, 0.01, 0.09, 3), Interval(-0.05, -0.09, -0.01, 3)
    across = Interval(0.0, -0.02, 0.02, 3)
    assert verdict_of_intervals([below, below], "behind") == "agrees"
    assert verdict_of_intervals([below, above], "behind") == "disagrees"  # one on the other side is enough
    assert verdict_of_intervals([below, across], "behind") == "not distinguishable here"
    assert verdict_of_intervals([above], "ahead") == "agrees"
    # an interval of zero width (a cost that does not change with the seed) is decisive unless it is zero itself
    assert verdict_of_intervals([Interval(-2.0, -2.0, -2.0, 3)], "behind") == "agrees"
    assert verdict_of_intervals([Interval(0.0, 0.0, 0.0, 3)], "behind") == "not distinguishable here"
    with pytest.raises(ValueError, match="expected"):
        verdict_of_intervals([above], "lower")


def test_a_study_without_anchors_is_read_against_anothers_seed_by_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RESULTS", tmp_path)
    probe, central = {0: 0.4, 1: 0.5, 2: 0.45, 3: 0.5}, {0: 0.6, 1: 0.7, 2: 0.65, 3: 0.6}

    def anchors_and_fedit(settings):
        seed = settings["seed"]
        if settings["method"] == ANCHORS:
            return {"probe_accuracy": probe[seed], "final_accuracy": central[seed]}
        return {"final_accuracy": probe[seed] + 0.1, "accuracy": [probe[seed], probe[seed] + 0.1]}

    run_study("part2", [{"method": m, "seed": s} for s in probe for m in (ANCHORS, "FedIT")], anchors_and_fedit,
              profile="smoke", progress=False, methods_of=lambda settings: [])
    run_study("part4", [{"method": "FLASC", "seed": s} for s in (0, 1, 2)],
              lambda settings: {"final_accuracy": probe[settings["seed"]] + 0.05, "accuracy": [0.0, 0.0]},
              profile="smoke", progress=False, methods_of=lambda settings: [])
    with pytest.raises(ValueError, match="lacks runs of 'FLASC'"):  # four anchor seeds, three runs
        Comparison("part2", profile="smoke", also=("part4",)).runs("FLASC")
    joint = Comparison("part2", profile="smoke", also=("part4",), seeds=[0, 1, 2])
    assert joint.seeds == [0, 1, 2] and joint.methods == ["FedIT", "FLASC"]
    gains = [central[s] - probe[s] for s in (0, 1, 2)]
    assert joint.recovered("FLASC").tolist() == pytest.approx([0.05 / g for g in gains])
    assert joint.side("FLASC", "FedIT") == "behind" and "part2 + part4" in joint.provenance()
    with pytest.raises(ValueError, match="no anchor runs on seeds \\[7\\]"):
        Comparison("part2", profile="smoke", seeds=[0, 7])
    with pytest.raises(ValueError, match="anchors of its own"):
        Comparison("part2", profile="smoke", also=("part2",))


def test_the_staleness_check_covers_the_costs_study():
    # tests/test_studies.py checks every stored study for stale rows, by the files in the results folder:
    # the costs study must be one of them, and current
    assert (RESULTS / "costs.jsonl") in sorted(RESULTS.glob("*.jsonl"))
    assert not stale_rows("costs"), "studies/costs.py's rows measured code that has changed since: run it again"


def _costs_script():
    spec = importlib.util.spec_from_file_location("costs_study", ROOT / "studies" / "costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_costs_study_counts_every_method_of_the_stored_studies_it_names():
    script = _costs_script()
    rows = [json.loads(line) for line in (RESULTS / "costs.jsonl").read_text(encoding="utf-8").splitlines()]
    stored = {(row["settings"]["federation"], row["settings"]["method"]) for row in rows}
    expected = {(federation, name) for federation in script.FEDERATIONS for name in script.methods_of(federation)}
    missing = sorted(expected - stored)
    # a method registered after the study last ran (the efficiency branch grows) is listed, not failed, by the
    # chapter; every method of Parts II and III must be there
    assert not [entry for entry in missing if entry[1] not in script.part4.PART4_METHODS], missing
    for row in rows:
        measured = row["measured"]
        assert row["depends_on"] == sorted(script.DEPENDS_ON)
        assert measured["flops"] == pytest.approx(measured["flops_per_step"] * measured["steps"])
        assert measured["peak_bytes"] == (measured["weight_bytes"] + measured["optimizer_bytes"]
                                          + measured["activation_bytes"])
