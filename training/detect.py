"""What a series' timestamps and training split say about it: candidate seasons and an evaluation stride.

Seasons. The candidates come from the calendar cycles of the step (a half-hourly series may repeat every
day, 48 rows, and every week, 336 rows; a daily one every week and every year; a monthly one every
year), and a candidate is kept only when the training split's autocorrelation supports it:

- The split must hold at least `MIN_SEASONS` (3) whole seasons.
- The autocorrelation is computed on the series minus its centred moving average over one season (the
  classical decomposition's detrending). That removes the trend and every slower movement, so a
  trending or wandering series (a random walk, a persistent AR process) does not make every lag look
  seasonal, while a component that repeats every `season` rows passes through untouched. First
  differences would also remove the trend, but they act as a high-pass filter: on a daily sine with
  noise of half its amplitude the ACF of first differences at lag 24 is 0.06, against 0.68 after the
  moving-average detrending. On random walks, white noise and a smoothed AR(1) process (10 seeds each,
  5,000 rows, steps 30 min, 1 h, 1 day and an index) the detrended ACF stayed below 0.22 at every
  candidate lag (within +-0.05 at the day and week lags) and no candidate was kept.
- At the season's lag the autocorrelation must be at least `MIN_ACF` (0.3) and outside the 2/sqrt(n)
  band, and exceed by `MIN_PEAK` (0.1) the larger of the autocorrelations half a season either side
  (where a cycle of that length is at its opposite phase): a peak, not a plateau.
- A candidate that is a multiple of a season already kept (a week over a day) is tested on the change
  over that shorter season (x[t] - x[t - day]), which removes the daily cycle: what is left repeats
  weekly only if the day of the week matters. That change is noisier and its neighbouring rows are
  strongly dependent, so the floor is `MIN_NESTED_ACF` (0.15) or 3/sqrt(n / shorter season), whichever is
  higher (on ETTh2's columns, random walks and a daily-only series it stays within +-0.08; on the hourly
  electricity series it is 0.22-0.29, on Taylor 0.85). A kept season that does not divide the candidate
  (a week under a year of days) is averaged away first with a moving average of its length.

Found on the public series at hand (training splits): Taylor half-hourly 48 (ACF 0.94) and 336 (0.85 on
the daily change); hourly electricity 24 (0.99) and 168 (0.24); ETTh2 OT 24 (0.79), its week rejected
(0.04).

The evaluation stride: see `default_eval_stride`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_SEASONS = 3
MIN_ACF = 0.3
MIN_PEAK = 0.1
MIN_NESTED_ACF = 0.15
# with no calendar (an integer index): cycles that are common in practice
INDEX_CANDIDATES = (4, 7, 12, 24, 52, 168, 365)

_DAY = pd.Timedelta(days=1)
_WEEK = pd.Timedelta(days=7)
_HOUR = pd.Timedelta(hours=1)
_YEAR_DAYS = 365.2425


@dataclass(frozen=True)
class SeasonScore:
    """Why a candidate season was kept or not: its autocorrelation and that of the lags it is compared with."""

    season: int
    cycle: str  # "day", "week", "year", ... or "index"
    acf: float | None  # None when the split is too short to tell
    neighbours: float | None  # the larger autocorrelation at the comparison lags
    kept: bool
    reason: str


def calendar_candidates(step: pd.Timedelta | None) -> list[tuple[int, str]]:
    """(season in rows, cycle name) for the calendar cycles a series with this step can have, shortest first.

    A cycle is a candidate when it is a whole number of steps (a day of 30-minute steps is 48); a year
    is rounded to whole steps (a daily series: 365, a weekly one: 52). Calendar steps (a month, a quarter)
    are recognised by their nominal length: 28-31 days is a month, 89-92 days a quarter; business days
    (`load_series` gives them their mean length, 7/5 days) have a week of 5 rows and a year of 261. An
    hour is a candidate only for steps of 5 minutes or less (12 rows or more).
    """
    if step is None:
        return [(m, "index") for m in INDEX_CANDIDATES]
    if step <= pd.Timedelta(0):
        raise ValueError(f"step must be positive, got {step}")
    days = step / _DAY
    if 28 <= days <= 31.5:
        return [(12, "year")]
    if 89 <= days <= 92.5:
        return [(4, "year")]
    if days >= 360:
        return []
    out: list[tuple[int, str]] = []
    for cycle, length in (("hour", _HOUR), ("day", _DAY), ("week", _WEEK)):
        ratio = length / step
        if ratio >= 2 and abs(ratio - round(ratio)) < 1e-6 and not (cycle == "hour" and ratio < 12):
            out.append((round(ratio), cycle))
    if days >= 1:
        year = round(_YEAR_DAYS / days)
        if year >= 2:
            out.append((year, "year"))
    return out


def _detrend(x: np.ndarray, season: int) -> np.ndarray:
    """x minus its centred moving average over `season` rows (2 x season for an even season), valid part."""
    c = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    if season % 2:
        ma = (c[season:] - c[:-season]) / season
        half = season // 2
        return x[half : half + len(ma)] - ma
    # even season: the mean of two adjacent windows of `season`, centred on a row (weights 1/2 at the ends)
    ma1 = (c[season:] - c[:-season]) / season
    ma = (ma1[1:] + ma1[:-1]) / 2
    half = season // 2
    return x[half : half + len(ma)] - ma


def _moving_average(x: np.ndarray, k: int) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    return (c[k:] - c[:-k]) / k


def _acf(r: np.ndarray, lags: list[int]) -> list[float]:
    """Sample autocorrelation (common mean and variance, the usual biased estimator) at each lag."""
    d = r - r.mean()
    denom = float(d @ d)
    if denom <= 0:
        return [0.0 for _ in lags]
    return [float(d[:-lag] @ d[lag:]) / denom if 0 < lag < len(d) else 0.0 for lag in lags]


def season_scores(train_target: np.ndarray, step: pd.Timedelta | None, max_lag: int | None = None) -> list[SeasonScore]:
    """Every candidate season for this step, with its autocorrelation evidence; see the module docstring."""
    x = np.asarray(train_target, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, 0]
    x = x[np.isfinite(x)] if not np.isfinite(x).all() else x
    n = len(x)
    kept: list[int] = []
    scores: list[SeasonScore] = []
    for season, cycle in calendar_candidates(step):
        if max_lag is not None and season > max_lag:
            scores.append(SeasonScore(season, cycle, None, None, False, f"longer than max_lag {max_lag}"))
            continue
        if n < MIN_SEASONS * season:
            scores.append(
                SeasonScore(
                    season, cycle, None, None, False, f"training split holds {n / season:.1f} seasons (< {MIN_SEASONS})"
                )
            )
            continue
        y, lag_of = x, 0
        for k in (k for k in kept if season % k):
            y = _moving_average(y, k)  # a kept season that does not divide this one: average it away
        divisors = [k for k in kept if season % k == 0]
        if divisors:  # compare like with like: the change over the longest kept season that divides this one
            lag_of = max(divisors)
            y = y[lag_of:] - y[:-lag_of]
        r = _detrend(y, season)
        if len(r) < 2 * season + 2:
            scores.append(SeasonScore(season, cycle, None, None, False, "training split too short after detrending"))
            continue
        near = [season - season // 2, season + season // 2]
        acf_s, *acf_near = _acf(r, [season, *near])
        neighbours = max(acf_near)
        floor = max(MIN_NESTED_ACF, 3 / math.sqrt(len(r) / lag_of)) if lag_of else max(MIN_ACF, 2 / math.sqrt(len(r)))
        of = f" of the change over {lag_of} rows" if lag_of else ""
        if acf_s < floor:
            ok, reason = False, f"autocorrelation{of} {acf_s:.2f} below {floor:.2f}"
        elif acf_s - neighbours < MIN_PEAK:
            ok, reason = (
                False,
                f"autocorrelation{of} {acf_s:.2f} not above lags {near} ({neighbours:.2f}) by {MIN_PEAK}",
            )
        else:
            ok, reason = True, f"autocorrelation{of} {acf_s:.2f} (>= {floor:.2f}; lags {near}: {neighbours:.2f})"
        if ok:
            kept.append(season)
        scores.append(SeasonScore(season, cycle, acf_s, neighbours, ok, reason))
    return scores


def find_seasons(train_target: np.ndarray, step: pd.Timedelta | None, max_lag: int) -> list[int]:
    """Seasons (rows) the training split supports, shortest first; [] for none. See the module docstring.

    `train_target` is the training split of the target ([rows] or [rows, targets]: the first target
    column decides); `step` is the series' step (None for an integer index: common cycles 4, 7, 12, 24,
    52, 168 and 365 are tried); seasons longer than `max_lag` rows are not considered.
    """
    return [s.season for s in season_scores(train_target, step, max_lag) if s.kept]


def default_eval_stride(horizon: int, seasons: list[int], n_test_origins: int) -> int:
    """Stride between test forecast origins: every origin while there are at most `ALL_ORIGINS` (4,000) of
    them, else about `TARGET_ORIGINS` (2,000) origins, with a stride that shares no factor with any season
    so the origins walk through every phase of every season (a stride of 48 on a half-hourly series would
    forecast from midnight only). The horizon does not change the rule: a forecast's cost grows with it,
    but 2,000 origins of even a long horizon score in seconds.
    """
    del horizon
    if n_test_origins <= ALL_ORIGINS:
        return 1
    stride = max(2, round(n_test_origins / TARGET_ORIGINS))
    while any(math.gcd(stride, s) > 1 for s in seasons if s > 1):
        stride += 1
    return stride


ALL_ORIGINS = 4000
TARGET_ORIGINS = 2000
