"""The seed-aware interval keeps its promise in simulated studies with known truth (no training)."""

from vitlab.study.calibration import Simulation, run_calibration


def test_equal_configurations_are_called_different_in_at_most_7_5_percent_of_studies():
    result = run_calibration(studies=400, true_difference=0.0, sim=Simulation(seeds=3), seed=0)
    assert result["mean_seed_spread_points"] >= 1.0  # the noise the issue asks for: ≥ 1 point between seeds
    assert result["seed_aware_excludes_zero"] <= 0.075
    assert result["image_only_excludes_zero"] > 0.2  # the old image-only bootstrap is fooled by seed noise


def test_a_true_difference_of_two_points_is_covered_in_at_least_92_5_percent_of_studies():
    result = run_calibration(studies=400, true_difference=2.0, sim=Simulation(seeds=3), seed=1)
    assert abs(result["true_difference"] - 2.0) < 1e-6
    assert result["seed_aware_covers"] >= 0.925
