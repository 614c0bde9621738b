"""The testbed: its profile keeps what a chapter cut, and its federation is what the module says it is."""

from __future__ import annotations

import pytest

from fedlora_edu import build_testbed, get_profile
from fedlora_edu import testbed_profile as schedule_of  # not "test..." at module level: pytest would collect it
from fedlora_edu.teaching.comparison import Comparison
from fedlora_edu.testbed import (
    ADAPTED_LAYERS,
    CENTRALIZED_LEARNING_RATE,
    DATA,
    LEARNING_RATE,
    ROUNDS,
    SCHEDULE,
    TRAIN_EXAMPLES,
    centralized_learning_rate,
)


@pytest.mark.parametrize("name", sorted(ROUNDS))
def test_a_named_profile_takes_the_testbed_schedule(name):
    bed, named = schedule_of(name), get_profile(name)
    assert bed.rounds == ROUNDS[name] and bed.adapted_layers == ADAPTED_LAYERS[name]
    assert bed.name == name and bed.learning_rate == LEARNING_RATE.get(name, named.learning_rate)
    assert bed.train_examples == TRAIN_EXAMPLES.get(name, named.train_examples)
    assert schedule_of(bed) == bed  # applying it twice changes nothing
    untouched = set(vars(named)) - set(SCHEDULE) - {"description"}
    assert all(getattr(bed, field) == getattr(named, field) for field in untouched)


def test_what_a_chapter_cut_is_kept_before_or_after():
    cut_first = schedule_of(get_profile("cpu").with_overrides(rounds=3, batch_size=8))
    assert cut_first.rounds == 3 and cut_first.batch_size == 8 and cut_first.adapted_layers == ADAPTED_LAYERS["cpu"]
    cut_after = schedule_of("cpu").with_overrides(rounds=3, adapted_layers=None)
    assert schedule_of(cut_after) == cut_after
    every_layer = schedule_of(get_profile("cpu").with_overrides(adapted_layers=4))
    assert every_layer.adapted_layers == 4 and every_layer.rounds == ROUNDS["cpu"]
    slower = schedule_of(get_profile("cpu").with_overrides(learning_rate=5e-4))
    assert slower.learning_rate == 5e-4 and schedule_of("cpu").learning_rate == LEARNING_RATE["cpu"]
    smaller = schedule_of(get_profile("cpu").with_overrides(train_examples=400))
    assert smaller.train_examples == 400 and smaller.rounds == ROUNDS["cpu"]


@pytest.mark.parametrize("name", sorted(ROUNDS))
def test_a_centralised_run_has_its_own_rate_where_the_table_gives_one(name):
    federated = schedule_of(name).learning_rate
    assert centralized_learning_rate(name) == CENTRALIZED_LEARNING_RATE.get(name, federated)
    assert centralized_learning_rate(schedule_of(name)) == centralized_learning_rate(name)


def test_under_cpu_the_federation_trains_faster_than_one_learner():
    """The cpu testbed's two rates differ, and in the direction the stored study measured (docstring of testbed)."""
    assert centralized_learning_rate("cpu") < schedule_of("cpu").learning_rate


def test_an_unknown_profile_name_is_refused():
    with pytest.raises(ValueError, match="unknown profile"):
        schedule_of("laptop")


def test_the_testbed_federation():
    federation = build_testbed(profile="smoke", seed=0)
    assert federation.profile == schedule_of("smoke")
    assert len(federation.label_names) == 16  # health-news tweets: 16 outlets
    assert federation.probe is not None and not federation.train_head  # the probe, frozen, is the head
    assert federation.num_clients == get_profile("smoke").num_clients
    assert DATA == "health_tweets"


def test_the_stored_study_shows_lora_beating_the_probe_on_the_testbed():
    """The testbed's premise, from Part II's stored study (which test_studies keeps current): centralised LoRA,
    on the cpu testbed with as many steps as a federated run, ends above the probe on every seed, the
    interval over seeds excluding zero."""
    stored = Comparison("part2")
    assert stored.study["profile"].iloc[0] == "cpu" and len(stored.seeds) >= 3
    gain = stored.gain()
    assert gain.excludes(0) and gain.mean > 0, f"centralised LoRA does not beat the probe on the testbed: {gain}"
    assert stored.recoverable, "centralised LoRA ends at or below the probe on some seed"
