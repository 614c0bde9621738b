"""studies/part2.py: the grid of runs, FedIT's variants per profile, and the shards processes share."""

from __future__ import annotations

import pytest

from tests.helpers import load_script

part2 = load_script("studies/part2.py")


def test_variants_are_the_profiles_own_and_only_variants_runs_them_alone():
    assert part2.variants_of("gpu") == part2.PROFILE_VARIANTS["gpu"]
    assert part2.variants_of("cpu") == part2.VARIANTS
    assert {"learning_rate": 1e-3} not in part2.variants_of("gpu")  # the gpu testbed's own rate is its base run
    runs = part2.grid([0, 1], ["FedIT", "FLoRA"], "gpu", only_variants=True)
    assert len(runs) == 2 * len(part2.PROFILE_VARIANTS["gpu"])
    assert all(run["method"] == "FedIT" and run["profile"] == "gpu" and set(run) - {"method", "seed", "profile"}
               for run in runs)
    full = part2.grid([0, 1], ["FedIT", "FLoRA"], "gpu")
    assert [run for run in full if set(run) - {"method", "seed", "profile"}] == runs
    assert len(full) == 2 * (len(part2.ANCHORS) + 2) + len(runs)


def test_shards_split_the_grid_by_priority_without_overlap():
    methods = ["FedIT", "FLoRA", "FedEx-LoRA"]
    runs = part2.grid([0, 1, 2], methods, "gpu")
    shards = [part2.shard(runs, f"{i}/4", methods) for i in range(4)]
    keys = [tuple(sorted(run.items())) for piece in shards for run in piece]
    assert sorted(keys) == sorted(tuple(sorted(run.items())) for run in runs)
    ordered = part2.by_priority(runs, methods)
    assert [run["method"] for run in ordered[:3]] == [part2.ANCHORS[0]] * 3  # anchors first, each seed
    assert all(len(set(run) - {"method", "seed", "profile"}) == 1 for run in ordered[-12:])  # variants last
    with pytest.raises(ValueError, match="i/n"):
        part2.shard(runs, "4/4", methods)


def test_only_variants_without_fedit_is_refused_before_any_run(capsys):
    with pytest.raises(SystemExit):
        part2.main(["--only-variants", "--methods", "FLoRA"])
    assert "--only-variants" in capsys.readouterr().err
