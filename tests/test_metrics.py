"""Intervals over seeds and the share of LoRA's gain a method recovers."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_edu.simulation.metrics import gain_recovered, interval, paired_difference, t_quantile_95


def test_interval_is_mean_plus_minus_t_times_the_standard_error():
    values = [0.70, 0.74, 0.72]
    result = interval(values)
    half = 4.303 * np.std(values, ddof=1) / np.sqrt(3)
    assert result.mean == pytest.approx(0.72) and result.half_width == pytest.approx(half)
    assert result.n == 3 and result.excludes(0.5) and not result.excludes(0.72)
    assert "± " in str(result)


def test_the_t_quantile_has_its_table_values_and_tends_to_the_normal():
    assert t_quantile_95(1) == 12.706 and t_quantile_95(2) == 4.303 and t_quantile_95(30) == 2.042
    assert t_quantile_95(200) == 1.96
    with pytest.raises(ValueError, match="degrees_of_freedom"):
        t_quantile_95(0)


def test_a_paired_difference_sees_a_small_steady_gap_that_two_means_would_hide():
    seeds_a = [0.60, 0.80, 0.70, 0.90]  # large seed-to-seed noise ...
    seeds_b = [a - 0.02 for a in seeds_a]  # ... and a steady gap of two points
    assert interval(seeds_a).low < interval(seeds_b).high  # the two intervals overlap
    gap = paired_difference(seeds_a, seeds_b)
    assert gap.mean == pytest.approx(0.02) and gap.excludes(0.0)
    assert not paired_difference([0.6, 0.7, 0.8], [0.7, 0.6, 0.8]).excludes(0.0)  # no steady gap


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least two values"):
        interval([0.5])
    with pytest.raises(ValueError, match="NaN"):
        interval([0.5, float("nan")])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


def test_gain_recovered_runs_from_the_probe_to_centralized_lora():
    assert gain_recovered(0.60, probe=0.60, centralized=0.80) == pytest.approx(0.0)
    assert gain_recovered(0.80, probe=0.60, centralized=0.80) == pytest.approx(1.0)
    np.testing.assert_allclose(gain_recovered([0.7, 0.5], probe=0.6, centralized=0.8), [0.5, -0.5])
    with pytest.raises(ValueError, match="no gain to recover"):
        gain_recovered(0.7, probe=0.8, centralized=0.8)
