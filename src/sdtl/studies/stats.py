"""Statistics over seeds: mean ± sample std, and paired differences with a t-interval.

Used by ``sdtl demo`` (method comparisons) and anything else that reports a result over several
seeds. Runs of two methods with the same seed share the split, the data order and (for pre-trained
runs) the initial encoder, so their difference is *paired*: the interval of the mean paired
difference is much tighter than comparing two independent means.
"""
from __future__ import annotations

import math
import statistics

# Two-sided 95% critical values of Student's t by degrees of freedom (df 1..30); beyond, 1.96 is
# within 2% of the exact value. A table keeps scipy out of the dependencies.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t_critical_95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none, or when a value is NaN)."""
    if not values or any(math.isnan(v) for v in values):  # statistics.stdev raises on a NaN
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_ci95(values: list[float]) -> dict:
    """``{mean, std, ci95: [low, high], n}``: t-interval of the mean (NaN bounds for fewer than 2 values)."""
    m, s = mean_std(values)
    n = len(values)
    half = t_critical_95(n - 1) * s / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": m, "std": s, "ci95": [m - half, m + half], "n": n}


def paired_difference(a: list[float], b: list[float], seeds: list[int] | None = None) -> dict:
    """``a − b`` per seed, with the mean, std and 95% t-interval of the mean difference."""
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same seeds on both sides ({len(a)} vs {len(b)} values)")
    diffs = [x - y for x, y in zip(a, b)]
    out = {"differences": diffs, **mean_ci95(diffs)}
    if seeds is not None:
        out["seeds"] = list(seeds)
    return out


def describe_difference(diff: dict, what: str, unit: str = " points") -> str:
    """One sentence stating a paired difference with its interval, whatever its sign."""
    m, (lo, hi), n = diff["mean"], diff["ci95"], diff["n"]
    if n < 2 or math.isnan(lo):
        return f"{what}: {m:+.1f}{unit} (one seed; no interval)."
    if lo > 0:
        verdict = "better"
    elif hi < 0:
        verdict = "worse"
    else:
        verdict = "not distinguishable from no difference at this number of seeds"
    return (f"{what}: {m:+.1f}{unit} (95% CI [{lo:+.1f}, {hi:+.1f}], paired over {n} seeds) — {verdict}.")
