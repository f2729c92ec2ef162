"""Reading a time series file, checking it, splitting it in time, and cutting windows.

Every problem with the data is a DataError whose message names the file, the column and the row (rows
are counted as in the file: the header is row 1, the first data row is row 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from gatecast.errors import UserError
from gatecast.manifest import sha256_file

FillPolicy = Literal["error", "ffill", "interpolate", "zero"]


class DataError(UserError, ValueError):
    """Bad input data; the message is meant for the person who supplied the file."""


@dataclass(frozen=True)
class Series:
    """A checked series: values [rows, features] with targets first, and its timestamps."""

    path: Path
    time_column: str
    times: pd.Series
    values: np.ndarray  # float32 [rows, features]
    features: list[str]
    targets: list[str]
    sha256: str

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class Split:
    """Row boundaries: train [0, train_end), validation [train_end, val_end), test [val_end, rows)."""

    train_end: int
    val_end: int
    rows: int


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".txt"):
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {e}") from e
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected .csv or .parquet")


def _numeric_column(df: pd.DataFrame, column: str, path: Path, fill: FillPolicy) -> np.ndarray:
    raw = df[column]
    if raw.dtype == object or pd.api.types.is_string_dtype(raw):
        text = raw.astype(str).str.strip()
        missing = text.isin(["", "NA", "NaN", "nan", "null", "None"])
        values = pd.to_numeric(text.where(~missing), errors="coerce")
        bad = values.isna() & ~missing
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: column {column!r}, row {i + 2}: {text.iloc[i]!r} is not a number")
    else:
        values = pd.to_numeric(raw, errors="coerce").astype(float)
    values = values.astype(float)
    if not np.isfinite(values.dropna().to_numpy()).all():
        i = int(np.flatnonzero(np.isinf(values.to_numpy()))[0])
        raise DataError(f"{path}: column {column!r}, row {i + 2}: value is infinite")
    nan = values.isna().to_numpy()
    if nan.any():
        if fill == "error":
            i = int(np.flatnonzero(nan)[0])
            raise DataError(
                f"{path}: column {column!r}, row {i + 2}: missing value ({int(nan.sum())} in the column); "
                "choose a fill policy with --fill ffill|interpolate|zero"
            )
        if fill == "ffill":
            values = values.ffill().bfill()
        elif fill == "interpolate":
            values = values.interpolate(limit_direction="both")
        else:
            values = values.fillna(0.0)
    return values.to_numpy(dtype=np.float32)


def load_series(
    path: Path,
    targets: list[str],
    covariates: list[str] | None = None,
    time_column: str | None = None,
    fill: FillPolicy = "error",
) -> Series:
    """Reads and checks a CSV or Parquet file. The time column defaults to the first column."""
    covariates = covariates or []
    df = _read_table(path)
    if df.empty:
        raise DataError(f"{path}: the file has no data rows")
    time_column = time_column or str(df.columns[0])
    for col in [time_column, *targets, *covariates]:
        if col not in df.columns:
            raise DataError(f"{path}: no column {col!r}; the file has {list(map(str, df.columns))}")
    if not targets:
        raise DataError(f"{path}: no target column given; the file has {list(map(str, df.columns))}")
    overlap = set(targets) & set(covariates)
    if overlap:
        raise DataError(f"{path}: columns {sorted(overlap)} are given both as targets and as covariates")

    times = pd.to_datetime(df[time_column], errors="coerce")
    if times.isna().any():
        i = int(np.flatnonzero(times.isna().to_numpy())[0])
        raw_time = df[time_column].iloc[i]
        raise DataError(f"{path}: column {time_column!r}, row {i + 2}: {raw_time!r} is not a timestamp")
    dup = times.duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError(f"{path}: column {time_column!r}, row {i + 2}: duplicate timestamp {times.iloc[i]}")
    back = (times.diff() < pd.Timedelta(0)).to_numpy()
    if back.any():
        i = int(np.flatnonzero(back)[0])
        raise DataError(
            f"{path}: column {time_column!r}, row {i + 2}: timestamps are not sorted "
            f"({times.iloc[i]} comes after {times.iloc[i - 1]})"
        )
    features = [*targets, *covariates]
    values = np.stack([_numeric_column(df, c, path, fill) for c in features], axis=1)
    return Series(
        path=path,
        time_column=time_column,
        times=times.reset_index(drop=True),
        values=values,
        features=features,
        targets=list(targets),
        sha256=sha256_file(path),
    )


def split_rows(
    series: Series,
    context: int,
    horizon: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    val_start: str | None = None,
    test_start: str | None = None,
) -> Split:
    """Chronological split by fractions, or by explicit start timestamps of validation and test."""
    n = series.rows
    if n < context + horizon:
        raise DataError(f"{series.path}: the series has {n} rows, shorter than context + horizon = {context + horizon}")
    if val_start is not None or test_start is not None:
        if val_start is None or test_start is None:
            raise DataError("give both --val-start and --test-start, or neither")
        train_end = int(np.searchsorted(series.times.to_numpy(), np.datetime64(pd.Timestamp(val_start))))
        val_end = int(np.searchsorted(series.times.to_numpy(), np.datetime64(pd.Timestamp(test_start))))
    else:
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataError(f"split fractions must be in (0, 1) and sum below 1: {val_fraction}, {test_fraction}")
        val_end = int(n * (1 - test_fraction))
        train_end = int(n * (1 - test_fraction - val_fraction))
    if train_end < context + horizon:
        raise DataError(
            f"{series.path}: the training split has {train_end} rows; it needs at least "
            f"context + horizon = {context + horizon}"
        )
    if val_end - train_end < horizon or n - val_end < horizon:
        raise DataError(
            f"{series.path}: validation ({val_end - train_end} rows) and test ({n - val_end} rows) "
            f"must each hold at least one horizon ({horizon} rows)"
        )
    return Split(train_end=train_end, val_end=val_end, rows=n)


def origins(start: int, end: int, context: int, horizon: int, stride: int = 1) -> np.ndarray:
    """Forecast origins o (first forecast row) with o - context >= 0, start <= o and o + horizon <= end."""
    first = max(start, context)
    return np.arange(first, end - horizon + 1, stride, dtype=np.int64)


def windows(
    values: np.ndarray, at: np.ndarray, context: int, horizon: int, n_targets: int
) -> tuple[np.ndarray, np.ndarray]:
    """x [n, context, features] ending just before each origin, y [n, horizon, targets] from it."""
    ix = at[:, None] + np.arange(-context, 0)[None, :]
    iy = at[:, None] + np.arange(horizon)[None, :]
    return values[ix], values[iy][:, :, :n_targets]


def fit_scaler(train: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and std per feature on the training rows; a constant column gets std 1."""
    mean = train.mean(axis=0).astype(np.float64)
    std = train.std(axis=0).astype(np.float64)
    std[std < 1e-8] = 1.0
    return mean.tolist(), std.tolist()
