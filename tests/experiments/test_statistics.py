"""The statistics module against hand computation and scipy: intervals, tests, TOST, BH, power, verdicts."""

from __future__ import annotations

import itertools
import math
import statistics as stdlib_statistics

import numpy as np
import pytest
from scipy import stats

import recnorm.experiments.statistics as st


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("t", [-6.0, -1.3, 0.0, 0.7, 2.5, 12.0])
def test_t_cdf_matches_scipy(t, df):
    assert st.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-10)


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("p", [0.025, 0.2, 0.8, 0.975])
def test_t_quantile_matches_scipy(p, df):
    assert st.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-8)


def test_interval_and_p_match_a_one_sample_t_test():
    diffs = [0.03, 0.01, 0.05, -0.01, 0.02]
    test = st.paired_test(diffs, margin=0.001)
    ref = stats.ttest_1samp(diffs, 0.0)
    ci = ref.confidence_interval(0.95)
    assert test.p == pytest.approx(ref.pvalue, rel=1e-8)
    assert (test.low, test.high) == pytest.approx((ci.low, ci.high), rel=1e-8)
    assert test.mean == pytest.approx(0.02) and test.sd == pytest.approx(stdlib_statistics.stdev(diffs))
    assert (test.wins, test.losses, test.n) == (4, 1, 5)


def test_zero_spread_has_no_shortcut():
    # Three identical binary outcomes (+1 each): the old report said "+1.000 [+1.000, +1.000] supported".
    test = st.paired_test([1.0, 1.0, 1.0], margin=0.1, floor=0.5)
    assert test.sd == 0 and test.sd_used == 0.5
    half = stats.t.ppf(0.975, 2) * 0.5 / math.sqrt(3)  # by hand: the floored t interval
    assert (test.low, test.high) == pytest.approx((1 - half, 1 + half))
    assert test.p == pytest.approx(2 * stats.t.sf(1.0 / (0.5 / math.sqrt(3)), 2))
    assert test.p > st.ALPHA and st.verdict(test) == "inconclusive"
    assert test.p_sign_flip == pytest.approx(2 / 8)  # the two all-equal sign vectors of 8


def test_sign_flip_p_by_enumeration_and_scipy():
    diffs = [0.4, -0.1, 0.3, 0.25, 0.05, 0.2]
    hand = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= abs(sum(diffs)) - 1e-12
               for signs in itertools.product((1, -1), repeat=len(diffs))) / 2 ** len(diffs)
    assert st.sign_flip_p(diffs) == pytest.approx(hand)
    ref = stats.permutation_test((np.array(diffs),), np.mean, permutation_type="samples", n_resamples=np.inf)
    assert st.sign_flip_p(diffs) == pytest.approx(ref.pvalue)
    assert st.sign_flip_p([1.0] * 5) == pytest.approx(2 / 32)  # the floor of 5 seeds: never below 0.05
    big = [0.1 + 0.01 * i for i in range(20)]  # Monte Carlo beyond 16 pairs: all positive -> tiny p
    assert st.sign_flip_p(big) < 0.001


def test_tost_matches_two_one_sided_scipy_tests():
    diffs = [0.002, -0.003, 0.001, 0.004, -0.001, 0.0, 0.002]
    margin = 0.01
    test = st.paired_test(diffs, margin=margin, floor=0.0)
    lower = stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(diffs, margin, alternative="less").pvalue
    assert test.p_tost == pytest.approx(max(lower, upper), rel=1e-8)
    assert test.p_tost < 0.05 and st.verdict(test) == "equivalent"
    # A larger effect is not equivalent within the same margin.
    shifted = st.paired_test([d + 0.012 for d in diffs], margin=margin, floor=0.0)
    assert shifted.p_tost > 0.05 and st.verdict(shifted) == "supported"


def test_benjamini_hochberg_matches_scipy_and_hand():
    p = [0.01, 0.04, 0.03, 0.005, 0.2, None]
    adjusted = st.benjamini_hochberg(p)
    assert adjusted[-1] is None
    assert adjusted[:-1] == pytest.approx(list(stats.false_discovery_control(p[:-1], method="bh")))
    # by hand: sorted 0.005 0.01 0.03 0.04 0.2 (m = 5): 0.025 0.025 0.05 0.05 0.2
    assert adjusted[:-1] == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])


def test_power_is_the_effect_detected_four_times_in_five():
    sd, n = 0.02, 8
    test = st.paired_test([0.0 + sd * (1 if i % 2 else -1) for i in range(n)], margin=0.0, floor=0.0)
    se = test.sd / math.sqrt(n)
    expected = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * se
    assert test.detectable == pytest.approx(expected, rel=1e-8)
    # Simulated: a true effect of that size is found in about 80% of experiments (t-approximation).
    rng = np.random.default_rng(0)
    found = sum(stats.ttest_1samp(rng.normal(expected, test.sd, n), 0.0).pvalue < 0.05 for _ in range(4000))
    assert 0.72 < found / 4000 < 0.85


def test_four_verdicts_and_the_direction():
    up = st.paired_test([0.05, 0.06, 0.055, 0.052, 0.058], margin=0.01)
    down = st.paired_test([-0.05, -0.06, -0.055, -0.052, -0.058], margin=0.01)
    noisy = st.paired_test([0.05, -0.06, 0.03, -0.02, 0.01], margin=0.01)
    assert (st.verdict(up), st.verdict(down), st.verdict(noisy)) == ("supported", "opposite", "inconclusive")
    assert st.verdict(up, p_adjusted=0.2) == "inconclusive"  # BH can take a verdict away
    assert st.verdict(st.paired_test([0.1], margin=0.01)) == "insufficient"


def test_paired_differences_count_each_seed_once_and_sign_by_direction():
    a, b = {0: 0.9, 1: None, 2: 0.7, 5: 1.0}, {0: 0.8, 1: 0.5, 2: 0.9}
    assert st.paired_differences(a, b, "higher") == pytest.approx([0.1, -0.2])  # seed 1 dropped, 5 unpaired
    assert st.paired_differences(a, b, "lower", worst=0.1) == pytest.approx([-0.1, 0.4, 0.2])
    with pytest.raises(ValueError, match="expected 'higher' or 'lower'"):
        st.paired_differences(a, b, "up")


@pytest.mark.parametrize("n", [3, 5, 6, 7, 9, 10, 15, 21, 27, 40])
def test_median_interval_is_the_widest_order_statistic_pair_with_the_coverage(n):
    values = [float((7 * i) % n) for i in range(n)]  # 0 .. n-1, shuffled
    got = st.median_interval(values)
    xs = sorted(values)

    def coverage(k):  # [x_(k), x_(n+1-k)] covers the median with probability 1 - 2 P(Bin(n, 1/2) <= k - 1)
        return 1 - 2 * stats.binom.cdf(k - 1, n, 0.5)

    ks = [k for k in range(1, n // 2 + 1) if coverage(k) >= 0.95]
    if not ks:
        assert got is None
        return
    k = max(ks)
    assert got == (xs[k - 1], xs[n - k])
    assert coverage(k + 1) < 0.95 or k + 1 > n // 2  # the narrowest such pair


def test_median_interval_covers_the_median_as_stated():
    import random

    rng = random.Random(1)
    hits = 0
    for _ in range(4000):  # a skewed distribution with median exp(0) = 1
        lo, hi = st.median_interval([math.exp(rng.gauss(0, 1)) for _ in range(9)])
        hits += lo <= 1.0 <= hi
    assert 0.95 <= hits / 4000 <= 0.975  # stated coverage 0.961 for n = 9
