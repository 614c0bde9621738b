"""studies/privacy.py: what one run of the accuracy-against-epsilon study stores, on the tiny federation."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from helpers import tiny_federation

from fedlora_edu.efficiency.privacy import DEFAULT_DELTA, epsilon_spent

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("privacy_study", ROOT / "studies" / "privacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_is_every_method_at_every_noise_for_each_seed(script):
    runs = script.grid([0, 1], list(script.METHODS), [0.0, 1.0], "cpu")
    assert len(runs) == 2 * len(script.METHODS) * 2
    assert {(run["method"], run["noise_multiplier"], run["seed"]) for run in runs} == {
        (method, z, seed) for method in script.METHODS for z in (0.0, 1.0) for seed in (0, 1)}
    assert all(run["clip_norm"] == script.CLIP_NORM for run in runs)


def test_a_run_stores_the_accountants_epsilon_and_the_norms_before_clipping(script, monkeypatch):
    federation = tiny_federation()
    monkeypatch.setattr(script, "testbed", lambda profile, seed: federation)
    clean = script.run_one({"method": "FFA-LoRA", "noise_multiplier": 0.0, "clip_norm": 0.01, "seed": 0,
                            "profile": "smoke"})
    noisy = script.run_one({"method": "FFA-LoRA", "noise_multiplier": 1.0, "clip_norm": 0.01, "seed": 0,
                            "profile": "smoke"})
    rounds, q = noisy["rounds"], noisy["sample_rate"]
    assert rounds == federation.profile.rounds and q == federation.profile.clients_per_round / federation.num_clients
    assert clean["epsilon"] is None  # no noise, no guarantee (json has no infinity)
    assert noisy["epsilon"] == epsilon_spent(1.0, q, rounds) and noisy["delta"] == DEFAULT_DELTA
    assert math.isfinite(noisy["epsilon"]) and noisy["epsilon"] > 0
    # at a clip norm this small every client's change is clipped; the norms before clipping are what it sent
    low, median, high = clean["norm_quartiles"]
    assert 0.01 < low <= median <= high and clean["clipped_share"] == 1.0
    assert len(clean["accuracy"]) == rounds and clean["final_accuracy"] == clean["accuracy"][-1]
