"""Uncertainty of speed figures: seeded bootstrap intervals at the level of whole trials.

Step times inside one latency trial are correlated (another tenant's burst slows many steps at once), so a
trial is the unit: a cell's TPOT is the median over its trials of each trial's median step, and every
interval resamples trials (or paired trial differences), never single steps. The bootstrap is
``scipy.stats.bootstrap`` with the percentile method, seeded, so a report rebuilt from the same raw
timings gives the same intervals. The percentile method is used because the BCa correction is undefined
for the handful of trials a CPU run can afford (it needs jackknife variance, which vanishes when trials tie).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

#: Seed of every bootstrap: intervals are reproducible from the raw timings alone.
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 9999
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% bootstrap interval; the interval is None with fewer than 2 values."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def significant(self) -> bool:
        """True when the interval exists and excludes 0 (for changes in %)."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def bootstrap(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    seed: int = BOOTSTRAP_SEED,
) -> Estimate:
    """``statistic`` of ``values`` with a seeded percentile-bootstrap 95% interval.

    Values that are not finite are dropped. With one value the interval is None (nothing to resample);
    when every value is the same, the interval is that value.
    """
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return Estimate(None, None, None, 0)
    point = float(statistic(data))
    if data.size == 1:
        return Estimate(point, None, None, 1)
    if np.all(data == data[0]):
        return Estimate(point, point, point, int(data.size))
    from scipy.stats import bootstrap as scipy_bootstrap  # scipy is slow to import; only intervals need it

    result = scipy_bootstrap(
        (data,),
        lambda sample, axis: statistic(sample, axis=axis),  # type: ignore[call-arg]
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return Estimate(point, float(interval.low), float(interval.high), int(data.size))


def median_estimate(values: Sequence[float] | np.ndarray, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """Median over trials with its interval: the cell summary of a speed metric."""
    return bootstrap(values, np.median, seed)


def mean_estimate(values: Sequence[float] | np.ndarray, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """Mean over paired changes with its interval: a relative change against the baseline."""
    return bootstrap(values, np.mean, seed)


def change_pct(value: float, base: float) -> float | None:
    """100 × (value − base) / base, or None without a usable base."""
    return None if not base else 100.0 * (value - base) / base
