"""The statistics behind every verdict: paired effects, their tests, multiplicity control and power.

Every claim compares two arms trained with the same seeds, so its evidence is a list of per-seed paired
differences ``d_i``, signed so that a positive difference favours the claim. From them:

* :func:`paired_test` gives the mean effect with a 95% t interval whose standard deviation has a floor
  (``max(sd, floor)``: three identical differences give an interval as wide as the floor allows, never a
  zero-width one), the two-sided t-test p-value on the same floored spread, the exact sign-flip
  permutation p-value (distribution-free; with n seeds it can never go below ``2 / 2**n``), the TOST
  equivalence p-value within the claim's declared margin, and the power statement: the smallest effect the
  test detects with 80% power at its n and spread.
* :func:`benjamini_hochberg` adjusts the p-values of a page's primary tests (q = 0.05).
* :func:`verdict` turns a test and its adjusted p-value into one of four verdicts: ``"supported"``,
  ``"opposite"`` (the opposite holds), ``"equivalent"`` (within the margin, by TOST) and ``"inconclusive"``.

Which p-value decides is :data:`PRIMARY_TEST`: ``"t"`` (the floored t test) today, because the committed
studies have 3-5 seeds, where a sign-flip test cannot reach 0.05 at all (``2 / 2**5 = 0.0625``) and would
call every effect inconclusive whatever its size; the sign-flip p-value is shown beside it. With >= 10
seeds per claim (issue 16), ``"sign_flip"`` is the stricter choice.

Pure Python (``math`` and ``statistics``); the tests check every function against scipy and by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
from typing import Dict, List, Optional, Sequence

__all__ = ["PairedTest", "paired_test", "paired_differences", "t_cdf", "t_quantile", "sign_flip_p", "tost_p",
           "benjamini_hochberg", "verdict", "median_interval", "VERDICTS", "ALPHA", "POWER", "PRIMARY_TEST"]

ALPHA = 0.05  # two-sided level of every test, and the BH false-discovery rate q
POWER = 0.8  # the power at which the smallest detectable effect is stated
PRIMARY_TEST = "t"  # "t" (floored t test) or "sign_flip" (exact permutation)
EXACT_FLIPS = 16  # up to this many pairs the sign-flip test enumerates all 2**n sign vectors
VERDICTS = ("supported", "opposite", "equivalent", "inconclusive", "insufficient")


# ---------------------------------------------------------------------------------------------- Student's t
def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _inc_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _inc_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"expected 0 < p < 1, got {p!r}")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------- tests
def sign_flip_p(diffs: Sequence[float], resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of mean(diffs) = 0: the share of sign vectors whose mean is
    at least as far from 0 as the observed one. Exact (all 2**n vectors) up to :data:`EXACT_FLIPS` pairs,
    otherwise ``resamples`` random vectors (the observed one counted in)."""
    n = len(diffs)
    if n == 0:
        return 1.0
    observed = abs(sum(diffs)) * (1 - 1e-12)
    if n <= EXACT_FLIPS:
        hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed
                   for signs in itertools.product((1.0, -1.0), repeat=n))
        return hits / 2 ** n
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed for _ in range(resamples))
    return (hits + 1) / (resamples + 1)


def tost_p(mean: float, se: float, df: float, margin: float) -> float:
    """TOST p-value that the true mean lies within (-margin, +margin): the larger of the two one-sided
    t-test p-values."""
    if margin <= 0:
        return 1.0
    p_low = 1.0 - t_cdf((mean + margin) / se, df)  # H0: mean <= -margin
    p_high = t_cdf((mean - margin) / se, df)  # H0: mean >= +margin
    return max(p_low, p_high)


@dataclasses.dataclass
class PairedTest:
    """The paired comparison of one claim (see :func:`paired_test`); effects are signed so that positive
    favours the claim, in the units of its metric."""

    n: int
    wins: int
    losses: int
    mean: Optional[float] = None
    sd: Optional[float] = None
    sd_used: Optional[float] = None  # max(sd, floor)
    low: Optional[float] = None  # 95% t interval
    high: Optional[float] = None
    p: Optional[float] = None  # two-sided floored t test
    p_sign_flip: Optional[float] = None
    p_tost: Optional[float] = None
    margin: float = 0.0
    detectable: Optional[float] = None  # smallest effect detected with POWER at ALPHA

    @property
    def p_primary(self) -> Optional[float]:
        return self.p_sign_flip if PRIMARY_TEST == "sign_flip" else self.p


def paired_test(diffs: Sequence[float], margin: float, floor: Optional[float] = None) -> PairedTest:
    """Test the per-seed differences ``diffs`` (positive favours the claim).

    Args:
        diffs: one paired difference per seed.
        margin: the claim's equivalence margin (TOST), in the metric's units.
        floor: the smallest standard deviation the interval and tests use (default: ``margin``).

    Returns:
        A :class:`PairedTest`; with fewer than 2 differences only ``n``, ``wins`` and ``losses`` are set.
    """
    diffs = [float(d) for d in diffs]
    n = len(diffs)
    out = PairedTest(n=n, wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs), margin=margin)
    if n < 2:
        return out
    floor = margin if floor is None else floor
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    sd_used = max(sd, floor)
    if sd_used <= 0:
        raise ValueError(f"paired_test: every difference is equal and the floor is {floor!r}; expected a "
                         f"positive floor or margin")
    df, se = n - 1, sd_used / math.sqrt(n)
    half = t_quantile(1 - ALPHA / 2, df) * se
    out.mean, out.sd, out.sd_used, out.low, out.high = mean, sd, sd_used, mean - half, mean + half
    out.p = 2.0 * (1.0 - t_cdf(abs(mean) / se, df))
    out.p_sign_flip = sign_flip_p(diffs)
    out.p_tost = tost_p(mean, se, df, margin)
    out.detectable = (t_quantile(1 - ALPHA / 2, df) + t_quantile(POWER, df)) * se
    return out


def paired_differences(a: Dict[int, Optional[float]], b: Dict[int, Optional[float]], better: str,
                       worst: Optional[float] = None) -> List[float]:
    """Per-seed ``a - b`` (seeds present in both), signed so that positive favours ``a``: ``better`` is
    ``"higher"`` or ``"lower"``. A failed run (None) counts as ``worst``, or drops its pair when that is
    None. Each seed's pair counts once."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better: expected 'higher' or 'lower', got {better!r}")
    sign = 1.0 if better == "higher" else -1.0
    out = []
    for seed in sorted(a, key=str):
        if seed not in b:
            continue
        va, vb = (worst if a[seed] is None else a[seed]), (worst if b[seed] is None else b[seed])
        if va is not None and vb is not None:
            out.append(sign * (va - vb))
    return out


def median_interval(values: Sequence[float], level: float = 1 - ALPHA) -> Optional[tuple]:
    """A distribution-free confidence interval for the median of the distribution ``values`` were drawn from
    (independent draws): the order statistics ``(x_(k), x_(n+1-k))`` with the largest ``k`` whose coverage
    ``1 - 2 P(Binomial(n, 1/2) <= k - 1)`` is at least ``level``. It assumes nothing about the shape of the
    distribution (the benchmark's per-round time ratios are skewed and sometimes bimodal), and it narrows as
    the number of values grows. None where even ``(min, max)`` covers less than ``level`` (fewer than 6 values
    at 95%)."""
    n = len(values)
    xs = sorted(values)
    below, k = 0.0, 0  # below: P(Binomial(n, 1/2) <= k - 1) for the candidate k + 1
    best = None
    while 2 * k < n:
        below += math.comb(n, k) / 2 ** n
        if 1 - 2 * below < level:
            break
        k += 1
        best = k
    if best is None:
        return None
    return (xs[best - 1], xs[n - best])


# ---------------------------------------------------------------------------------------------- a page of tests
def benjamini_hochberg(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Benjamini-Hochberg adjusted p-values (None stays None and does not count among the tests):
    ``p_(i) * m / i``, made monotone from the largest down, capped at 1."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 1.0
    for rank in range(m, 0, -1):
        p, i = present[rank - 1]
        running = min(running, p * m / rank)
        out[i] = running
    return out


def verdict(test: PairedTest, p_adjusted: Optional[float] = None) -> str:
    """One of :data:`VERDICTS` for ``test``, judged on ``p_adjusted`` (default: its own primary p).

    *supported* / *opposite*: the adjusted p is below :data:`ALPHA` and the mean effect is positive /
    negative. *equivalent*: otherwise, TOST shows the effect within the declared margin. *inconclusive*:
    neither. *insufficient*: fewer than 2 pairs."""
    if test.n < 2 or test.mean is None:
        return "insufficient"
    p = test.p_primary if p_adjusted is None else p_adjusted
    if p < ALPHA and test.mean != 0:
        return "supported" if test.mean > 0 else "opposite"
    if test.p_tost is not None and test.p_tost < ALPHA:
        return "equivalent"
    return "inconclusive"
