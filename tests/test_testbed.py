"""The testbed: its profile keeps what a chapter cut, and its federation is what the module says it is."""

from __future__ import annotations

import pytest

from fedlora_edu import build_testbed, get_profile, testbed_profile
from fedlora_edu.simulation.metrics import paired_difference
from fedlora_edu.studies import load_study
from fedlora_edu.testbed import ADAPTED_LAYERS, DATA, HEAD, LEARNING_RATE, ROUNDS


@pytest.mark.parametrize("name", sorted(ROUNDS))
def test_a_named_profile_takes_the_testbed_schedule(name):
    bed = testbed_profile(name)
    assert bed.rounds == ROUNDS[name] and bed.adapted_layers == ADAPTED_LAYERS[name]
    assert bed.name == name and bed.learning_rate == LEARNING_RATE.get(name, get_profile(name).learning_rate)
    assert testbed_profile(bed) == bed  # applying it twice changes nothing


def test_what_a_chapter_cut_is_kept_before_or_after():
    cut_first = testbed_profile(get_profile("cpu").with_overrides(rounds=3, batch_size=8))
    assert cut_first.rounds == 3 and cut_first.batch_size == 8 and cut_first.adapted_layers == ADAPTED_LAYERS["cpu"]
    cut_after = testbed_profile("cpu").with_overrides(rounds=3, adapted_layers=None)
    assert testbed_profile(cut_after) == cut_after
    every_layer = testbed_profile(get_profile("cpu").with_overrides(adapted_layers=4))
    assert every_layer.adapted_layers == 4 and every_layer.rounds == ROUNDS["cpu"]
    slower = testbed_profile(get_profile("cpu").with_overrides(learning_rate=3e-3))
    assert slower.learning_rate == 3e-3 and testbed_profile("cpu").learning_rate == LEARNING_RATE["cpu"]


def test_an_unknown_profile_name_is_refused():
    with pytest.raises(ValueError, match="unknown profile"):
        testbed_profile("laptop")


def test_the_testbed_federation():
    federation = build_testbed(profile="smoke", seed=0)
    assert federation.profile == testbed_profile("smoke")
    assert len(federation.label_names) == 16  # health-news tweets: 16 outlets
    assert federation.probe is not None and not federation.train_head  # the probe, frozen, is the head
    assert federation.num_clients == get_profile("smoke").num_clients
    assert DATA == "health_tweets"


def test_the_stored_study_shows_lora_beating_the_probe_on_the_testbed():
    """The testbed's premise, from the stored study (which test_studies keeps current): centralised LoRA,
    as the cpu testbed runs it, ends above the probe on the same seeds, the interval excluding zero."""
    study = load_study("testbed")
    cpu = testbed_profile("cpu")
    at_profile_size = study["train"].isna() if "train" in study else True  # the size runs name their sizes
    runs = study[(study["data"] == DATA) & (study["head"] == HEAD) & (study["adapted"] == cpu.adapted_layers)
                 & (study["lr"] == cpu.learning_rate) & at_profile_size].sort_values("seed")
    assert len(runs) >= 3, "the stored testbed study lacks the testbed's own setting over three seeds"
    gain = paired_difference(runs["final_accuracy"], runs["start_accuracy"])
    assert gain.excludes(0) and gain.mean > 0, f"centralised LoRA does not beat the probe on the testbed: {gain}"
