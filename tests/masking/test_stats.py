"""Paired statistics (masking/stats.py) against hand computations: closed-form t quantiles, Simpson
integration of the t density, an exact bootstrap enumeration, hand-worked intervals (no scipy)."""

import itertools
import math
import statistics

import pytest

from tl_backward.masking.stats import bootstrap_interval, paired_summary, quantile, t_cdf, t_interval, t_quantile


def t2_quantile(p):
    # df 2: F(t) = 1/2 + t / (2 sqrt(2 + t²))  =>  t = u sqrt(2 / (1 - u²)), u = 2p - 1
    u = 2 * p - 1
    return u * math.sqrt(2 / (1 - u * u))


def t_density_cdf(t, df, n=4000):
    """P(T <= t) by Simpson's rule on the t density from 0 to t (n even intervals)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    def f(x):
        return c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = t / n
    s = f(0) + f(t) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, n))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx(t2_quantile(p), rel=1e-10)
    assert t_quantile(1 - p, 2) == pytest.approx(-t2_quantile(p), rel=1e-10)


def test_t_quantile_table_values():
    # printed two-sided 95 % critical values (6 decimals)
    for df, value in [(3, 3.182446), (4, 2.776445), (9, 2.262157), (30, 2.042272)]:
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-6)
    # large df: the Cornish-Fisher expansion z + (z³ + z) / (4 df), next term O(1/df²) ~ 1e-9 here
    z = 1.959963984540054
    assert t_quantile(0.975, 20000) == pytest.approx(z + (z ** 3 + z) / 80000, abs=1e-7)


@pytest.mark.parametrize("df", [3, 4, 5, 6, 11])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_t_cdf_matches_integrated_density(df, t):
    assert t_cdf(t, df) == pytest.approx(t_density_cdf(t, df), abs=1e-10)
    assert t_cdf(-t, df) == pytest.approx(1 - t_cdf(t, df), abs=1e-15)
    assert t_cdf(0.0, df) == 0.5


def test_t_interval_by_hand():
    d = [0.1, 0.3, 0.2]  # mean 0.2, sample std 0.1, n 3, df 2
    half = t2_quantile(0.975) * 0.1 / math.sqrt(3)
    lo, hi = t_interval(d)
    assert lo == pytest.approx(0.2 - half, abs=1e-12) and hi == pytest.approx(0.2 + half, abs=1e-12)
    assert half == pytest.approx(0.248414, abs=1e-6)
    lo90, hi90 = t_interval(d, level=0.9)
    assert lo < lo90 < hi90 < hi


def test_quantile_by_hand():
    v = [4.0, 1.0, 3.0, 2.0]
    assert [quantile(v, q) for q in (0.0, 0.25, 0.5, 1.0)] == [1.0, 1.75, 2.5, 4.0]
    assert quantile([7.0], 0.3) == 7.0


def test_bootstrap_matches_the_exact_enumeration():
    d = [0.0, 0.05, 0.1, 0.3, -0.2]
    exact = [sum(c) / 5 for c in itertools.product(d, repeat=5)]  # all 3125 equally likely resamples
    lo, hi = bootstrap_interval(d, n_boot=40000, seed=1)
    # Monte-Carlo error of a 2.5 % quantile with 40000 draws: ~0.08 % probability; here < 0.02 in value
    assert lo == pytest.approx(quantile(exact, 0.025), abs=0.02)
    assert hi == pytest.approx(quantile(exact, 0.975), abs=0.02)
    assert min(d) <= lo < statistics.fmean(d) < hi <= max(d)
    assert bootstrap_interval(d, n_boot=500, seed=3) == bootstrap_interval(d, n_boot=500, seed=3)
    assert bootstrap_interval([0.2, 0.2, 0.2]) == (pytest.approx(0.2), pytest.approx(0.2))


def test_paired_summary_keeps_the_pairs():
    mas, causal = [0.5, 0.7, 0.6, 0.9], [0.4, 0.6, 0.5, 0.8]  # wide spread per arm, constant +0.1 per pair
    s = paired_summary(mas, causal, n_boot=200)
    assert s["diffs"] == pytest.approx([0.1] * 4) and s["mean"] == pytest.approx(0.1) and s["n"] == 4
    assert s["t_interval"] == pytest.approx([0.1, 0.1]) and s["bootstrap_interval"] == pytest.approx([0.1, 0.1])
    assert s["mas_mean"] == pytest.approx(0.675) and s["causal_std"] == pytest.approx(statistics.stdev(causal))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.9, 0)
    with pytest.raises(ValueError, match="p must"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([0.1])
    with pytest.raises(ValueError, match="level"):
        t_interval([0.1, 0.2], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval([0.1, 0.2], n_boot=0)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_summary([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        t_interval([0.1, float("nan")])
