"""Small, pure statistics for comparing classifiers on one test set (no mnistlab imports).

Why these three and not more:

- :func:`wilson_interval`: how precisely a test accuracy is known. Accuracy on N test
  images is a binomial proportion, and Wilson's score interval has close to nominal
  coverage even at N of a few hundred and accuracies near 1, where the textbook
  normal ("Wald") interval is too narrow and can pass 1.0. It is closed-form:
  deterministic, no seed and no resampling, unlike a bootstrap, so the same
  predictions always give the same interval (and ``dvc metrics diff`` shows no noise).
- :func:`mcnemar`: whether two models differ on *the same* test images. Two
  accuracies' intervals overlap long before the models are indistinguishable,
  because most images are right (or wrong) for both; only the images on which they
  disagree carry evidence. McNemar's exact test is the two-sided binomial test of
  those discordant images against 1/2.
- :func:`seed_interval` and :func:`welch`: with several training seeds per arch, how
  precisely the *mean over seeds* is known and whether two archs' means differ. The
  seeds are a small sample (3-10) with unknown variance, so Student's t interval (not
  a normal one) and Welch's t-test (no equal-variance assumption: a BatchNorm network
  and a sigmoid LeNet vary by different amounts), both from scipy. This is training
  variance on a fixed test set; the Wilson interval is test-set variance of one run.
- :func:`holm`: a leaderboard makes many such comparisons at once; Holm's step-down
  keeps the chance of any false "worse" at or below alpha, uniformly more powerful
  than Bonferroni and valid under any dependence between the tests (scipy only
  ships Benjamini-Hochberg, which controls the false discovery rate instead).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import binomtest, t, ttest_ind


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: ``k`` successes in ``n`` trials.

    Args:
        k: Correct predictions (0 <= k <= n).
        n: Test images (n >= 1).
        level: Confidence level.

    Returns:
        ``(low, high)``, within [0, 1].
    """
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


class McNemar(NamedTuple):
    """McNemar's exact test of two classifiers on the same images.

    Attributes:
        b_only: Images only ``b`` gets right.
        a_only: Images only ``a`` gets right.
        p_value: Two-sided exact p-value (1.0 when they never disagree).
    """

    b_only: int
    a_only: int
    p_value: float


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> McNemar:
    """McNemar's exact test: the discordant pairs against a fair coin (two-sided binomial).

    Args:
        a_correct: bool [N], whether model ``a`` got each test image right.
        b_correct: bool [N], the same for model ``b``, on the same images in the same order.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    b_only, a_only = int((b & ~a).sum()), int((a & ~b).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(b_only, n, 0.5).pvalue)
    return McNemar(b_only, a_only, min(p, 1.0))


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (reject where adjusted <= alpha).

    Sorted ascending, the i-th smallest of m p-values (i from 0) is multiplied by
    ``m - i``; a running maximum keeps the adjusted values in the same order as the
    raw ones (step-down: a hypothesis is only rejected if all smaller ones are),
    and they are capped at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def seed_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student's t interval for the mean of per-seed results (NaN below two values).

    Zero spread (every seed the same) gives the mean itself at both ends: nothing was seen
    to vary. Not clipped: the caller knows the range of what it averages (an accuracy's is
    [0, 1]: :func:`mnistlab.stages.compare.aggregate` clips).
    """
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float("nan"), float("nan")
    mean, se = float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))
    if se == 0.0:
        return mean, mean
    lo, hi = t.interval(level, len(x) - 1, loc=mean, scale=se)
    return float(lo), float(hi)


def welch(a, b) -> float:
    """Two-sided p-value of Welch's t-test of two samples' means (NaN if either has < 2 values)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float(ttest_ind(a, b, equal_var=False).pvalue)
