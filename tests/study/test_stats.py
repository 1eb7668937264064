import math

import pytest
import torch

from vitlab.study.calibration import DIFFICULTY_STD, Simulation, simulate_correctness
from vitlab.study.stats import mcnemar, mean_and_ci, paired_bootstrap, seed_aware_contrast, seed_aware_difference, t_quantile


def test_bootstrap_matches_the_enumerated_distribution():
    # Two images: A gets image 0 right, B gets neither. Resampling 2 indices with replacement gives
    # A's accuracy 100% (p=1/4), 50% (p=1/2) or 0% (p=1/4): mean 50 points, P(diff <= 0) = 1/4.
    result = paired_bootstrap(torch.tensor([1, 0]), torch.tensor([0, 0]), resamples=40_000)
    assert result.observed == 50.0
    assert result.mean == pytest.approx(50.0, abs=1.0)
    assert result.share_at_or_below_zero == pytest.approx(0.25, abs=0.01)
    assert (result.ci_low, result.ci_high) == (0.0, 100.0)


def test_bootstrap_is_paired():
    # Identical records differ by exactly zero in every resample, however noisy each accuracy is.
    record = torch.rand(500) < 0.6
    result = paired_bootstrap(record, record.clone(), resamples=2000)
    assert result.ci_low == result.ci_high == 0.0 and result.share_at_or_below_zero == 1.0


def test_bootstrap_interval_matches_the_normal_approximation():
    torch.manual_seed(0)
    a, b = torch.rand(4000) < 0.70, torch.rand(4000) < 0.65
    result = paired_bootstrap(a, b, resamples=4000)
    per_image = a.double() - b.double()
    standard_error = per_image.std().item() / math.sqrt(4000) * 100
    assert result.ci_high - result.ci_low == pytest.approx(2 * 1.96 * standard_error, rel=0.08)


def test_mcnemar_exact_p_value_by_hand():
    # 10 images only A gets right, 2 only B: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096.
    a = torch.tensor([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3)
    b = torch.tensor([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3)
    result = mcnemar(a, b)
    assert (result.only_a_right, result.only_b_right) == (10, 2)
    assert result.p_value == pytest.approx(158 / 4096)
    assert mcnemar(a, a).p_value == 1.0


def test_mean_and_ci_by_hand():
    spread = mean_and_ci([1.0, 2.0, 3.0])
    assert spread.mean == 2.0 and spread.std == 1.0
    assert spread.ci_high - 2.0 == pytest.approx(4.3026527 / math.sqrt(3))
    single = mean_and_ci([5.0])
    assert single.std is None and single.ci_low is None and "n/a" in single.describe()


@pytest.mark.parametrize(("dof", "quantile"), [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (30, 2.0422725), (31, 2.0395134),
                                                (100, 1.9839715)])
def test_t_quantiles_are_exact_for_every_degree_of_freedom(dof, quantile):
    # Reference values: R's qt(0.975, df). At 31 df the normal 1.96 would be 3.9% too narrow.
    assert t_quantile(0.975, dof) == pytest.approx(quantile, abs=1e-6)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)


def t_cdf_by_simpson(x: float, dof: float, steps: int = 20_000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus Simpson's rule over the t density from 0 to x."""
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (dof + 1) / 2 * math.log1p(t * t / dof))

    h = x / steps
    total = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("dof", [2.5, 3.7, 7.25])
def test_t_quantiles_for_fractional_degrees_of_freedom_invert_the_density(dof):
    # Welch-Satterthwaite degrees of freedom are fractional: check the quantile against the integrated density.
    assert t_cdf_by_simpson(t_quantile(0.975, dof), dof) == pytest.approx(0.975, abs=1e-7)


def test_seed_aware_difference_by_hand():
    # A: seeds at 60, 80 and 70% on 10 images; B: 50, 50, 50%. Per-seed means 70 and 50: observed +20.
    a = torch.tensor([[1] * 6 + [0] * 4, [1] * 8 + [0] * 2, [1] * 7 + [0] * 3], dtype=torch.bool)
    b = torch.tensor([[1] * 5 + [0] * 5] * 3, dtype=torch.bool)
    result = seed_aware_difference(a, b)
    seed_term = 100.0 / 3  # sample variance of (60, 80, 70) is 100 (points²), over 3 seeds; B's is 0
    per_image = (a.double().mean(0) - b.double().mean(0)) * 100
    image_term = per_image.var().item() / 10
    assert result.observed == pytest.approx(20.0)
    assert result.standard_error == pytest.approx(math.sqrt(seed_term + image_term))
    assert result.degrees_of_freedom == pytest.approx((seed_term + image_term) ** 2 / (seed_term ** 2 / 2))
    assert result.ci_high - 20.0 == pytest.approx(t_quantile(0.975, result.degrees_of_freedom) * result.standard_error)


def test_seed_aware_difference_needs_two_seeds_on_each_side():
    one, three = torch.rand(1, 50) < 0.5, torch.rand(3, 50) < 0.5
    result = seed_aware_difference(one, three)
    assert result.ci_low is None and not result.excludes_zero and "needs ≥2 seeds" in result.describe()
    with pytest.raises(ValueError):
        seed_aware_difference(torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool))


def test_seed_aware_difference_accepts_unequal_seed_counts():
    torch.manual_seed(1)
    result = seed_aware_difference(torch.rand(2, 400) < 0.7, torch.rand(4, 400) < 0.6)
    assert (result.seeds_a, result.seeds_b) == (2, 4) and result.ci_low < result.observed < result.ci_high


def test_bootstrap_over_seeds_averages_each_image_over_seeds():
    # Two seeds, three images. Per image, the seed-averaged difference is (1, 0.5, 0): observed mean 50 points.
    # Enumerating all 27 resamples of 3 indices gives the exact mean (50) and P(diff <= 0) = P(all picks are image 2) = 1/27.
    a = torch.tensor([[1, 1, 0], [1, 0, 0]])
    b = torch.tensor([[0, 0, 0], [0, 0, 0]])
    result = paired_bootstrap(a, b, resamples=60_000)
    assert result.observed == pytest.approx(50.0)
    assert result.mean == pytest.approx(50.0, abs=0.5)
    assert result.share_at_or_below_zero == pytest.approx(1 / 27, abs=0.004)


def test_bootstrap_rejects_mismatched_records():
    with pytest.raises(ValueError):
        paired_bootstrap(torch.ones(2, 5), torch.ones(5))


def test_mcnemar_with_thousands_of_discordant_pairs_matches_the_normal_approximation():
    # 3,000 discordant images (as between two CIFAR-10 models): exact binomial vs the continuity-corrected z-test.
    a = torch.tensor([True] * 1550 + [False] * 1450)
    b = ~a
    exact = mcnemar(a, b)
    z = (abs(1550 - 1450) - 1) / math.sqrt(3000)
    normal = math.erfc(z / math.sqrt(2))
    assert exact.p_value == pytest.approx(normal, rel=0.05)
    assert mcnemar(torch.ones(5000, dtype=torch.bool), torch.zeros(5000, dtype=torch.bool)).p_value == 0.0  # underflows, no error


def test_a_two_term_contrast_is_the_difference_and_weights_scale_it():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 500, generator=generator) < 0.7, torch.rand(4, 500, generator=generator) < 0.6
    difference, contrast = seed_aware_difference(a, b), seed_aware_contrast([(1.0, a), (-1.0, b)])
    assert (contrast.observed, contrast.ci_low, contrast.ci_high, contrast.degrees_of_freedom) == (
        difference.observed, difference.ci_low, difference.ci_high, difference.degrees_of_freedom)
    doubled = seed_aware_contrast([(2.0, a), (-2.0, b)])
    assert doubled.observed == pytest.approx(2 * difference.observed) and doubled.standard_error == pytest.approx(2 * difference.standard_error)
    assert seed_aware_contrast([(1.0, a[:1]), (-1.0, b)]).ci_low is None  # one seed: no interval


def test_a_difference_of_differences_with_no_true_change_excludes_zero_in_at_most_7_5_percent_of_studies():
    """Does the gap between two models change with data? Four configurations of equal true accuracy, 3 seeds
    each, seed spread above 1 point: the interval of (A2 − B2) − (A1 − B1) must rarely exclude 0."""
    sim = Simulation(seeds=3)
    generator = torch.Generator().manual_seed(7)
    studies, excluded = 300, 0
    for _ in range(studies):
        difficulty = torch.randn(sim.images, generator=generator, dtype=torch.float64) * DIFFICULTY_STD
        a1, b1, a2, b2 = (simulate_correctness(sim.base_logit, difficulty, sim, generator) for _ in range(4))
        excluded += seed_aware_contrast([(1.0, a2), (-1.0, b2), (-1.0, a1), (1.0, b1)]).excludes_zero
    assert excluded / studies <= 0.075
