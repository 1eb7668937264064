import math

import pytest
import torch

from vitlab.stats import mcnemar, mean_and_ci, paired_bootstrap


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
    assert spread.ci_high - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert mean_and_ci([5.0]).std == 0.0


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
