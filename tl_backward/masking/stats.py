"""Paired statistics for the MAS-vs-causal protocol: per-seed differences, a t interval and a paired
bootstrap interval (pure Python; no scipy).

With ``d_i = mas_i − causal_i`` for the n seeds (both arms of seed i share the data order, the
adapter initialisation and the dropout seed), the mean difference is ``d̄ = Σ d_i / n`` and

* **t interval**: ``d̄ ± t_{1−α/2, n−1} · s / √n`` with the sample std ``s`` (n − 1 in the
  denominator); the Student-t quantile comes from the exact CDF for integer degrees of freedom
  (Abramowitz & Stegun 26.7.3-4, a finite sum in θ = atan(t/√ν)), inverted by bisection;
* **paired bootstrap**: resample the n seeds with replacement ``n_boot`` times (a seeded
  ``random.Random``; the pairs stay together), take each resample's mean difference, report the
  α/2 and 1 − α/2 quantiles (linear interpolation between order statistics, numpy's default).

Both need n ≥ 2; with few seeds the bootstrap interval is too narrow (it cannot see more spread
than the seeds show), the t interval is the one to quote.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Sequence

from ..errors import TLBackwardError

__all__ = ["t_cdf", "t_quantile", "t_interval", "quantile", "bootstrap_interval", "paired_summary"]


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with integer ``df`` ≥ 1 (exact finite series, A&S 26.7.3-4)."""
    df = _df(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: A = 2/π [θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...)]
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: A = sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        a = s * total
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """The t value with ``t_cdf(t, df) = p`` (0 < p < 1), by bisection to ~1e-12 relative."""
    df = _df(df)
    if not 0.0 < p < 1.0:
        raise TLBackwardError(f"p must be in (0, 1), got {p!r}", argument="p")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the Cauchy (df 1) 0.9995 quantile is ~637
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(diffs: Sequence[float], *, level: float = 0.95) -> tuple[float, float]:
    """``d̄ ± t_{(1+level)/2, n−1} · s/√n`` over the paired differences ``diffs`` (n ≥ 2)."""
    d = _values(diffs)
    level = _level(level)
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    half = t_quantile(0.5 + level / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return mean - half, mean + half


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 ≤ q ≤ 1) with linear interpolation between order statistics:
    position ``q·(n−1)`` in the sorted values (numpy's default "linear" method)."""
    v = sorted(_values(values, minimum=1))
    if not 0.0 <= q <= 1.0:
        raise TLBackwardError(f"q must be in [0, 1], got {q!r}", argument="q")
    pos = q * (len(v) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(v) - 1)
    return v[i] + (pos - i) * (v[j] - v[i])


def bootstrap_interval(diffs: Sequence[float], *, level: float = 0.95, n_boot: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``diffs`` over ``n_boot`` resamples (with replacement,
    n of n, ``random.Random(seed)``): the (1−level)/2 and (1+level)/2 quantiles."""
    d = _values(diffs)
    level = _level(level)
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise TLBackwardError(f"n_boot must be a positive int, got {n_boot!r}", argument="n_boot")
    rng, n = random.Random(seed), len(d)
    means = [math.fsum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot)]
    return quantile(means, (1 - level) / 2), quantile(means, (1 + level) / 2)


def paired_summary(mas: Sequence[float], causal: Sequence[float], *, level: float = 0.95,
                   n_boot: int = 10000, seed: int = 0) -> dict:
    """Per-seed ``diffs`` = mas − causal (seed order kept), their ``mean``, ``std`` (sample),
    ``t_interval``, ``bootstrap_interval``, ``n`` and ``level``, plus each arm's mean and std."""
    m, c = _values(mas), _values(causal)
    if len(m) != len(c):
        raise TLBackwardError(f"mas and causal need one value per seed each, got {len(m)} and {len(c)}",
                              argument="causal")
    diffs = [a - b for a, b in zip(m, c)]
    return {"n": len(diffs), "level": level, "diffs": diffs, "mean": statistics.fmean(diffs),
            "std": statistics.stdev(diffs), "t_interval": list(t_interval(diffs, level=level)),
            "bootstrap_interval": list(bootstrap_interval(diffs, level=level, n_boot=n_boot, seed=seed)),
            "mas_mean": statistics.fmean(m), "mas_std": statistics.stdev(m),
            "causal_mean": statistics.fmean(c), "causal_std": statistics.stdev(c)}


def _df(df: int) -> int:
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise TLBackwardError(f"df must be an int >= 1 (degrees of freedom, n - 1), got {df!r}", argument="df")
    return df


def _level(level: float) -> float:
    if not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise TLBackwardError(f"level must be in (0, 1), e.g. 0.95, got {level!r}", argument="level")
    return float(level)


def _values(values: Sequence[float], minimum: int = 2) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise TLBackwardError(f"values must be a sequence of numbers, got {values!r:.60}", argument="values") from exc
    if len(out) < minimum or not all(math.isfinite(v) for v in out):
        raise TLBackwardError(f"need at least {minimum} finite values (one per seed), got {out!r:.60}",
                              argument="values")
    return out
