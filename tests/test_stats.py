"""mnistlab.stats: the Wilson interval's coverage, McNemar's exact test, Holm's adjustment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from mnistlab.stats import holm, mcnemar, wilson_interval


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
