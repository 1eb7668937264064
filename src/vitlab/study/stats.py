"""Statistics for comparing training configurations on one test set.

Two sources of noise separate a measured accuracy difference from the true one:

- **training seeds**: the same configuration trained with another seed lands elsewhere (often by a
  point or more on CIFAR-10);
- **the test set**: 10,000 images are a sample of the images the models will meet.

`seed_aware_difference` (the default for every difference vitlab reports) accounts for both. Its
variance is a decomposition, in the spirit of Bouthillier et al. 2021 ("Accounting for variance in
machine learning benchmarks") and Dror et al. 2018: the between-seed variance of each configuration's
accuracy divided by its number of seeds (Welch's unequal-variance form), plus the variance of the mean
per-image difference of the seed-averaged correctness (what a paired bootstrap over the test images
estimates; it is computed here in closed form). The interval uses Student's t with Welch–Satterthwaite
degrees of freedom from the seed terms; the image term is treated as known, which only raises the
degrees of freedom. With fewer than two seeds of either configuration the seed variance cannot be
estimated and no interval is given. Its calibration is checked by simulation (`vitlab.study.calibration`,
tests/study/test_calibration.py).

The image-only paired bootstrap and McNemar's exact test (per seed pair) remain as diagnostics: they
answer "do these two trained networks differ on this test set?", not "do these two configurations
differ?", and ignore seed noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def t_quantile(probability: float, degrees_of_freedom: float) -> float:
    """Student's t quantile, exact for any (also fractional) degrees of freedom; the normal for df = inf."""
    from scipy.stats import norm, t

    if math.isinf(degrees_of_freedom):
        return float(norm.ppf(probability))
    return float(t.ppf(probability, degrees_of_freedom))


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
    """Mean, sample standard deviation and a 95% t-interval of the mean, over seeds (no interval for one seed)."""

    mean: float
    std: float | None  # None for a single value
    ci_low: float | None
    ci_high: float | None
    count: int

    def describe(self, digits: int = 2) -> str:
        if self.count < 2:
            return f"{self.mean:.{digits}f} (n=1; interval n/a, needs ≥2 seeds)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] (n={self.count})"


def mean_and_ci(values: list[float], level: float = 0.95) -> Spread:
    count = len(values)
    if count == 0:
        raise ValueError("need at least one value")
    mean = sum(values) / count
    if count == 1:
        return Spread(mean, None, None, None, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))
    half_width = t_quantile(0.5 + level / 2, count - 1) * std / math.sqrt(count)
    return Spread(mean, std, mean - half_width, mean + half_width, count)


@dataclass
class Difference:
    """Accuracy of configuration A minus configuration B (percentage points), with a seed-aware interval."""

    observed: float  # mean over A's seeds minus mean over B's seeds
    ci_low: float | None  # None when either side has fewer than 2 seeds
    ci_high: float | None
    standard_error: float | None
    degrees_of_freedom: float | None
    seeds_a: int
    seeds_b: int
    seed_variance_share: float | None  # share of the variance that comes from training seeds (the rest: test images)

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)

    def describe(self) -> str:
        if self.ci_low is None:
            return f"{self.observed:+.2f} [n/a — needs ≥2 seeds]"
        return f"{self.observed:+.2f} [{self.ci_low:+.2f}, {self.ci_high:+.2f}]"


def seed_aware_difference(correct_a: torch.Tensor, correct_b: torch.Tensor, level: float = 0.95) -> Difference:
    """Accuracy(A) − accuracy(B) of two configurations, each trained with several seeds and tested on the same images.

    Args:
        correct_a: (S_a, N) booleans, whether each of A's seeds got test image i right.
        correct_b: (S_b, N), the same images in the same order; S_a and S_b may differ (every finished
            seed of each configuration is used: the same rule as the mean column of vitlab's tables).
    """
    contrast = seed_aware_contrast([(1.0, correct_a), (-1.0, correct_b)], level)
    return Difference(contrast.observed, contrast.ci_low, contrast.ci_high, contrast.standard_error, contrast.degrees_of_freedom,
                      correct_a.shape[0], correct_b.shape[0], contrast.seed_variance_share)


def seed_aware_contrast(terms: list[tuple[float, torch.Tensor]], level: float = 0.95) -> Difference:
    """Σ_k w_k · accuracy(configuration k), with the seed-aware interval of `seed_aware_difference`.

    A difference is the contrast (+1, A), (−1, B). A difference of differences, (+1, A@n2), (−1, B@n2),
    (−1, A@n1), (+1, B@n1), asks whether the gap between A and B changes from n1 to n2: the seed
    variance of every configuration enters with weight w_k², the test-image variance through the
    per-image combination Σ_k w_k · (seed-averaged correctness of k), and the degrees of freedom follow
    Welch–Satterthwaite over the seed terms. `seeds_a` / `seeds_b` of the result: the fewest seeds among
    the positive / negative terms.

    Args:
        terms: (weight, correctness) pairs; each correctness is (S_k, N) booleans on the same N test images.
    """
    if not terms or any(c.ndim != 2 for _, c in terms) or len({c.shape[1] for _, c in terms}) != 1 or terms[0][1].shape[1] == 0:
        raise ValueError(f"need (S, N) correctness for every configuration on the same N images, got {[tuple(c.shape) for _, c in terms]}")
    weights = [float(w) for w, _ in terms]
    correct = [c.double() for _, c in terms]
    seeds = [c.shape[0] for c in correct]
    images = correct[0].shape[1]
    per_seed = [c.mean(dim=1) * 100.0 for c in correct]  # (S_k,) accuracies in points
    observed = sum(w * float(acc.mean()) for w, acc in zip(weights, per_seed, strict=True))
    seeds_a = min((s for w, s in zip(weights, seeds, strict=True) if w > 0), default=0)
    seeds_b = min((s for w, s in zip(weights, seeds, strict=True) if w < 0), default=0)
    if min(seeds) < 2:
        return Difference(observed, None, None, None, None, seeds_a, seeds_b, None)
    seed_terms = [w * w * float(acc.var(unbiased=True)) / s for w, acc, s in zip(weights, per_seed, seeds, strict=True)]
    per_image = sum(w * c.mean(dim=0) for w, c in zip(weights, correct, strict=True)) * 100.0  # (N,)
    image_term = float(per_image.var(unbiased=True)) / images
    variance = sum(seed_terms) + image_term
    seed_part = sum(term ** 2 / (s - 1) for term, s in zip(seed_terms, seeds, strict=True))
    dof = variance ** 2 / seed_part if seed_part > 0 else math.inf
    error = math.sqrt(variance)
    half_width = t_quantile(0.5 + level / 2, dof) * error
    return Difference(observed, observed - half_width, observed + half_width, error, dof, seeds_a, seeds_b,
                      sum(seed_terms) / variance if variance > 0 else None)
