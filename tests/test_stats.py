"""mnistlab.stats: the Wilson interval's coverage, McNemar's exact test, Holm's adjustment,
and across seeds: the t interval's coverage and Welch's test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from mnistlab.stats import holm, mcnemar, seed_interval, welch, wilson_interval


def test_wilson_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    n, p, trials = 360, 0.95, 2000
    hits = rng.binomial(n, p, size=trials)  # correct predictions of 2,000 simulated test sets
    covered = 0
    for k in hits.tolist():
        lo, hi = wilson_interval(k, n)
        covered += lo <= p <= hi
    assert 0.93 <= covered / trials <= 0.97


def test_wilson_interval_bounds_and_errors():
    lo, hi = wilson_interval(342, 360)
    assert lo < 342 / 360 < hi and 0 < lo and hi < 1
    assert wilson_interval(360, 360)[1] == pytest.approx(1.0) and wilson_interval(360, 360)[0] < 1
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0)
    assert wilson_interval(342, 360, 0.99)[0] < lo  # a wider interval at a higher level
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(5, 0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


def outcomes(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of models a and b on the images of a 2x2 table, shuffled."""
    a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, dtype=bool)
    order = np.random.default_rng(1).permutation(len(a))
    return a[order], b[order]


@pytest.mark.parametrize(("b_only", "a_only"), [(10, 2), (2, 10), (7, 7), (0, 5), (40, 0), (1, 0)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs(b_only, a_only):
    a, b = outcomes(300, a_only, b_only, 20)
    t = mcnemar(a, b)
    assert (t.b_only, t.a_only) == (b_only, a_only)
    assert t.p_value == pytest.approx(binomtest(b_only, b_only + a_only, 0.5).pvalue)
    assert mcnemar(b, a).p_value == pytest.approx(t.p_value)  # two-sided: symmetric


def test_mcnemar_known_table_and_no_disagreement():
    a, b = outcomes(100, 2, 10, 5)
    assert mcnemar(a, b).p_value == pytest.approx(0.0386, abs=1e-4)
    assert mcnemar(a, a).p_value == 1.0 and mcnemar(a, a)[:2] == (0, 0)
    with pytest.raises(ValueError, match="one length"):
        mcnemar(a, b[:-1])


def test_holm_matches_a_hand_computed_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == pytest.approx([0.02])  # one test: unchanged
    assert holm([]).shape == (0,)
    p = np.random.default_rng(2).uniform(size=20)
    adj = holm(p)
    assert np.all(adj >= p) and np.all(np.diff(adj[np.argsort(p)]) >= 0)  # never smaller, ordered


def test_seed_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Five seeds' accuracies, simulated as normal around a true mean (seeded): the t interval
    covers it at the stated rate, where a normal (z) interval of five values would not."""
    rng = np.random.default_rng(0)
    mean, sd, trials = 0.97, 0.004, 4000
    covered = z_covered = 0
    for x in rng.normal(mean, sd, size=(trials, 5)):
        lo, hi = seed_interval(x)
        covered += lo <= mean <= hi
        half = 1.96 * x.std(ddof=1) / np.sqrt(5)
        z_covered += x.mean() - half <= mean <= x.mean() + half
    assert 0.94 <= covered / trials <= 0.96
    assert z_covered / trials < 0.91  # why Student's t: the z interval undercovers at n = 5


def test_seed_interval_known_values_and_edges():
    lo, hi = seed_interval([0.97, 0.98, 0.99])  # mean 0.98, sd 0.01, t(0.975, 2) = 4.302653
    assert (lo, hi) == pytest.approx((0.98 - 4.302653 * 0.01 / np.sqrt(3),
                                      0.98 + 4.302653 * 0.01 / np.sqrt(3)))
    assert seed_interval([0.9, 0.9, 0.9]) == (0.9, 0.9)  # nothing varied
    assert all(np.isnan(seed_interval([0.9])))  # one seed: no spread to speak of


def test_welch_is_the_welch_satterthwaite_test_and_needs_two_values_each():
    from scipy.stats import t as student

    a, b = [0.981, 0.983, 0.979, 0.984, 0.982], [0.975, 0.980, 0.969, 0.977, 0.972, 0.978]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)  # unequal variances and sizes
    t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert welch(a, b) == pytest.approx(2 * student.sf(abs(t), df), rel=1e-9)
    assert welch(a, b) < 0.01 and welch(a, a) == pytest.approx(1.0)
    assert welch(b, a) == pytest.approx(welch(a, b))  # two-sided
    assert np.isnan(welch([0.9], b)) and np.isnan(welch(a, [0.9]))
