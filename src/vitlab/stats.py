"""Statistics for comparing classifiers on one test set.

Accuracy differences between two models tested on the *same* images are paired: resampling the
test images once and scoring both models on that resample (paired bootstrap) gives much tighter
intervals than treating the two accuracies as independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Two-sided 95% Student-t quantiles for 1..30 degrees of freedom (above 30, the normal 1.96 is within 2%).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass
class BootstrapDifference:
    """Accuracy of model A minus model B, in percentage points, over paired resamples of the test set."""

    observed: float  # the difference on the test set itself
    mean: float  # mean over resamples
    ci_low: float  # 2.5th percentile
    ci_high: float  # 97.5th percentile
    share_at_or_below_zero: float  # share of resamples where A is not better than B
    resamples: int


def paired_bootstrap(correct_a: torch.Tensor, correct_b: torch.Tensor, resamples: int = 10_000, seed: int = 0) -> BootstrapDifference:
    """Paired bootstrap of accuracy(A) − accuracy(B): both models are scored on the same resampled indices.

    Args:
        correct_a, correct_b: (N,) booleans, whether each model got test image i right; or (S, N) for
            S seeds each, in which case the difference is that of the seed-averaged accuracies (each
            image's share of seeds that got it right is resampled as one unit).
    """
    if correct_a.shape != correct_b.shape or correct_a.numel() == 0 or correct_a.ndim not in (1, 2):
        raise ValueError(f"need two equally shaped, non-empty (N,) or (S, N) records, got {tuple(correct_a.shape)} and {tuple(correct_b.shape)}")
    a, b = correct_a.double(), correct_b.double()
    if a.ndim == 2:
        a, b = a.mean(dim=0), b.mean(dim=0)
    per_image = a - b  # (N,) in [-1, 1]
    generator = torch.Generator().manual_seed(seed)
    differences = torch.empty(resamples, dtype=torch.float64)
    chunk = max(1, 20_000_000 // per_image.numel())  # bound memory: indices for `chunk` resamples at a time
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = torch.randint(0, per_image.numel(), (count, per_image.numel()), generator=generator)
        differences[start:start + count] = per_image[index].mean(dim=1) * 100.0
    low, high = torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return BootstrapDifference(
        observed=float(per_image.mean() * 100.0), mean=float(differences.mean()), ci_low=low, ci_high=high,
        share_at_or_below_zero=float((differences <= 0).double().mean()), resamples=resamples,
    )


@dataclass
class McNemar:
    """McNemar's test on paired predictions: only the images exactly one model gets right count."""

    only_a_right: int
    only_b_right: int
    p_value: float  # two-sided, exact binomial


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> McNemar:
    a, b = correct_a.bool().flatten(), correct_b.bool().flatten()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return McNemar(only_a, only_b, 1.0)
    # Exact: under H0 each discordant image is a fair coin, so min(only_a, only_b) ~ Binomial(n, 1/2).
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    return McNemar(only_a, only_b, min(1.0, (2 * tail) / 2**discordant))  # int / int: exact for thousands of discordant pairs


@dataclass
class Spread:
    """Mean, sample standard deviation and a 95% t-interval of the mean, over seeds."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    count: int


def mean_and_ci(values: list[float]) -> Spread:
    count = len(values)
    if count == 0:
        raise ValueError("need at least one value")
    mean = sum(values) / count
    if count == 1:
        return Spread(mean, 0.0, mean, mean, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))
    half_width = (T_975[count - 2] if count - 1 <= len(T_975) else 1.96) * std / math.sqrt(count)
    return Spread(mean, std, mean - half_width, mean + half_width, count)
