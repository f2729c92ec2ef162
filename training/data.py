"""Reading a time series file, checking it, splitting it in time, and cutting windows.

Every problem with the data is a DataError whose message names the file, the column and the row (rows
are counted as in the file: the header is row 1, the first data row is row 2).

What `load_series` finds when it is not told:

- The time column: the first column whose values are timestamps (a datetime column of a Parquet file,
  or text whose first value has a recognisable date format). An integer column is never taken for
  time on its own: with `time_index=True` the first integer column (or the one named) is the index,
  and then one row is one step (`Series.step` is None, `step_label` "").
- The target: when none is named, the only numeric column other than the time column and the
  covariates (a column of row numbers pandas wrote, "Unnamed: 0", does not count). When several could
  be it, a DataError lists them and asks for --target.
- The step: the most common difference between consecutive timestamps. Differences of 28-31 days are
  calendar months (and 89-92 days quarters, 365-366 days years): then every timestamp must fall on the
  same day of the month (or every one on a month's last day), and the step counts months (the label
  says "MS" even when that day is not the first). Daily rows on weekdays only that skip weekends are
  business days ("1B", step 7/5 days, their mean length; holidays are then missing rows). Every
  difference must be a whole number of steps, or the series is irregular: a DataError names the first
  row that is not. Differences of several steps are missing rows: with `fill="error"` (the default)
  that is a DataError at the first gap; with a fill policy (--fill ffill|interpolate|zero) the series is
  reindexed onto the full grid and the inserted rows are filled like missing values, provided they are
  at most `MAX_FILLED_FRACTION` (5%) of the result; more than that is a DataError (too many gaps to
  invent the data). `Series.filled_rows` counts the inserted rows.
- Timestamps with time zones must all carry the same UTC offset; mixed offsets (a local clock across a
  daylight-saving change) are a DataError at the first row whose offset differs: write the column in
  UTC.
- A file in long format (several series stacked, repeating timestamps beside an id column) is a
  DataError suggesting --series-column; `load_panel` reads it as one Series per id.

Memory: a CSV file is read once with pandas' type inference, only the columns needed, numbers parsed
straight to float64; text is inspected only in a numeric column where parsing failed (to name the
row). Loading 2,000,000 rows of a timestamp and three numbers peaks near 400 MB.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from gatecast.errors import UserError
from gatecast.manifest import sha256_file

FillPolicy = Literal["error", "ffill", "interpolate", "zero"]

NA_VALUES = ["", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "#N/A", "<NA>"]
SAMPLE_ROWS = 1000  # rows of a CSV file read to find the time column, the target and an id column
MAX_FILLED_FRACTION = 0.05  # with --fill, missing steps may be at most this share of the reindexed rows
_MONTH_NS = pd.Timedelta(days=365.2425 / 12)
_BDAY = pd.Timedelta(seconds=7 * 86_400 // 5)  # a business day's mean length: 5 rows a week
_FILL_HINT = "--fill ffill|interpolate|zero"


class DataError(UserError, ValueError):
    """Bad input data; the message is meant for the person who supplied the file."""


@dataclass(frozen=True)
class Series:
    """A checked, regular series: values [rows, features] with targets first, and its timestamps.

    `step` is the time between rows (for calendar months, quarters and years, their mean length; the
    label says which), None when the rows are indexed by an integer column (`time_index`). `step_label`
    is a pandas offset alias ("30min", "1h", "1D", "7D", "1MS", "3MS", "12MS"), "" for an index.
    """

    path: Path
    time_column: str
    times: pd.Series
    values: np.ndarray  # float32 [rows, features]
    features: list[str]
    targets: list[str]
    sha256: str
    step: pd.Timedelta | None = None
    step_label: str = ""
    time_index: bool = False
    filled_rows: int = 0  # rows inserted for missing steps (only with a fill policy)
    series_id: str | None = None  # the id, for one series of a long-format file

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def step_text(self) -> str:
        """The step in words, for logs and tables: "1h", or "1 row (integer index 'k')"."""
        if self.time_index:
            return f"1 row (integer index {self.time_column!r})"
        return self.step_label or "unknown (fewer than 2 rows)"


@dataclass(frozen=True)
class Panel:
    """The series of a long-format file, one per id in order of first appearance, all with one step."""

    path: Path
    series_column: str
    series: list[Series]
    sha256: str
    features: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [str(s.series_id) for s in self.series]

    @property
    def step(self) -> pd.Timedelta | None:
        return self.series[0].step

    @property
    def step_label(self) -> str:
        return self.series[0].step_label


@dataclass(frozen=True)
class Split:
    """Row boundaries: train [0, train_end), validation [train_end, val_end), test [val_end, rows)."""

    train_end: int
    val_end: int
    rows: int


# ---------------------------------------------------------------------------------------------- reading


def _suffix(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".txt", ".parquet", ".pq"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .csv or .parquet")
    return suffix


def _read(path: Path, columns: list[str] | None = None, nrows: int | None = None) -> pd.DataFrame:
    """The file's columns (all, or `columns`); for a CSV file `nrows` reads a sample. Numbers are parsed
    to int64/float64 by pandas; a column with anything else in it comes back as text (or, read in chunks,
    a mix of numbers and text) and is looked at row by row only then."""
    suffix = _suffix(path)
    try:
        if suffix in (".csv", ".txt"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", pd.errors.DtypeWarning)
                df = pd.read_csv(path, usecols=columns, nrows=nrows, keep_default_na=False, na_values=NA_VALUES)
        else:
            df = pd.read_parquet(path, columns=columns)
    except (ValueError, OSError, ImportError) as e:
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {e}") from e
    df.columns = [str(c) for c in df.columns]
    return df


def _is_text(col: pd.Series) -> bool:
    return bool(col.dtype == object or pd.api.types.is_string_dtype(col) or isinstance(col.dtype, pd.CategoricalDtype))


def _is_integer(col: pd.Series) -> bool:
    return bool(pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col))


def _is_datetime(col: pd.Series) -> bool:
    return bool(pd.api.types.is_datetime64_any_dtype(col))


def _quiet_to_datetime(values: pd.Series, **kwargs: object) -> pd.Series:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pd.to_datetime(values, errors="coerce", **kwargs)  # type: ignore[call-overload, no-any-return]


def _looks_like_time(col: pd.Series) -> bool:
    """A datetime column, or text whose first value has a date format and most of whose values parse."""
    if _is_datetime(col):
        return True
    if not _is_text(col):
        return False
    sample = col.dropna().astype(str).head(200)
    if sample.empty:
        return False
    from pandas.tseries.api import guess_datetime_format

    if guess_datetime_format(sample.iloc[0].strip()) is None:
        return False
    try:
        parsed = _quiet_to_datetime(sample, format="mixed", utc=True)
    except (ValueError, TypeError, OverflowError):
        return False
    return bool(parsed.notna().mean() >= 0.5)


def _looks_numeric(col: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(col) or _is_datetime(col) or pd.api.types.is_timedelta64_dtype(col):
        return False
    if pd.api.types.is_numeric_dtype(col):
        return True
    if not _is_text(col):
        return False
    sample = col.dropna().astype(str).str.strip().head(1000)
    return bool(len(sample) and pd.to_numeric(sample, errors="coerce").notna().mean() >= 0.5)


def _is_row_number(name: str, col: pd.Series) -> bool:
    """pandas' unnamed index column: "Unnamed: 0" holding 0, 1, 2, ... (or 1, 2, 3, ...)."""
    if not name.startswith("Unnamed:") or not _is_integer(col) or col.empty:
        return False
    v = col.to_numpy()
    return bool(v[0] in (0, 1) and (np.diff(v) == 1).all())


def detect_series_column(df: pd.DataFrame, exclude: Sequence[str] = ()) -> str | None:
    """The id column of a long-format table: the first column that is neither numeric nor time and whose
    values repeat (at most half as many distinct values as rows); None when there is none."""
    n = len(df)
    if n < 2:
        return None
    for name in map(str, df.columns):
        if name in exclude:
            continue
        col = df[name]
        if not _is_text(col) or _looks_numeric(col) or _looks_like_time(col):
            continue
        distinct = col.nunique(dropna=True)
        if 1 <= distinct <= n / 2:
            return name
    return None


def _detect_time_column(path: Path, df: pd.DataFrame, time_index: bool, exclude: Sequence[str]) -> str:
    names = [c for c in map(str, df.columns) if c not in exclude]
    if time_index:
        for c in names:
            if _is_integer(df[c]):
                return c
        raise DataError(
            f"{path}: --time-index needs an integer column to use as the index; no column holds integers "
            f"(the file has {names}); name one with --time-column"
        )
    for c in names:
        if _looks_like_time(df[c]):
            return c
    ints = [c for c in names if _is_integer(df[c]) and not _is_row_number(c, df[c])]
    if ints:
        raise DataError(
            f"{path}: no column holds timestamps; column {ints[0]!r} holds integers: if it numbers the rows "
            f"(one row per step), pass --time-index (and --time-column {ints[0]} if it is not the first)"
        )
    raise DataError(f"{path}: no column holds timestamps (the file has {names}); name one with --time-column")


def _check_time_kind(path: Path, df: pd.DataFrame, column: str, time_index: bool) -> None:
    col = df[column]
    if time_index:
        if _is_integer(col) or pd.api.types.is_float_dtype(col) or _looks_numeric(col):
            return  # a value that is not an integer is named by its row when the column is read
        raise DataError(f"{path}: column {column!r} ({col.dtype}) is not an integer column; --time-index needs one")
    if _is_integer(col) or pd.api.types.is_float_dtype(col):
        raise DataError(
            f"{path}: column {column!r} holds numbers ({col.dtype}), not timestamps; if it numbers the rows "
            "(one row per step), pass --time-index"
        )


def _pick_targets(
    path: Path, df: pd.DataFrame, targets: Sequence[str] | str | None, exclude: Sequence[str]
) -> list[str]:
    if isinstance(targets, str):
        return [targets]
    if targets:
        return list(targets)
    numeric = [
        c for c in map(str, df.columns) if c not in exclude and _looks_numeric(df[c]) and not _is_row_number(c, df[c])
    ]
    if not numeric:
        raise DataError(f"{path}: no numeric column to forecast (the file has {list(map(str, df.columns))})")
    if len(numeric) > 1:
        raise DataError(f"{path}: several numeric columns could be the target: {numeric}; pass --target (one or more)")
    return numeric


def _check_columns(path: Path, df: pd.DataFrame, names: Sequence[str]) -> None:
    for col in names:
        if col not in df.columns:
            raise DataError(f"{path}: no column {col!r}; the file has {list(map(str, df.columns))}")


# ------------------------------------------------------------------------------------------- parsing


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _offsets(text: pd.Series) -> pd.Series:
    return text.astype(str).str.extract(r"(Z|[+-]\d{2}:?\d{2})\s*$", expand=False).fillna("none")


def _mixed_offsets(path: Path, column: str, raw: pd.Series) -> DataError:
    off = _offsets(raw)
    differ = (off != off.iloc[0]).to_numpy()
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        where = f"row {i + 2}: {str(raw.iloc[i])!r} has UTC offset {off.iloc[i]} but row 2 has {off.iloc[0]}"
    else:
        where = "timestamps carry different time zones"
    return DataError(
        f"{path}: column {column!r}, {where}; mixed offsets (a local clock across a daylight-saving change?) "
        "leave the step ambiguous: write the column in UTC or with one fixed offset"
    )


def parse_times(path: Path, column: str, raw: pd.Series) -> pd.Series:
    """Timestamps of a datetime or text column; every failure names its row."""
    if _is_datetime(raw):
        times = raw
    else:
        try:
            times = _quiet_to_datetime(raw)
            bad = times.isna() & raw.notna()
            if bad.any():  # text in more than one format: parse those rows one by one
                retry = _quiet_to_datetime(raw[bad], format="mixed")
                if retry.notna().any():
                    if str(retry.dt.tz) != str(times.dt.tz):
                        raise ValueError("Mixed timezones detected")
                    times = times.dt.as_unit("ns")
                    times[bad] = retry.dt.as_unit("ns")
        except (ValueError, TypeError) as e:
            message = str(e).lower()
            if "timezone" in message or "tz-aware" in message or "utc=true" in message:
                raise _mixed_offsets(path, column, raw) from e
            raise DataError(f"{path}: column {column!r}: cannot read timestamps: {e}") from e
    nat = times.isna().to_numpy()
    if nat.any():
        i = int(np.flatnonzero(nat)[0])
        value = raw.iloc[i]
        if pd.isna(value):
            raise DataError(f"{path}: column {column!r}, row {i + 2}: missing timestamp")
        raise DataError(f"{path}: column {column!r}, row {i + 2}: {_show(value)} is not a timestamp")
    return times.reset_index(drop=True)


def _parse_index(path: Path, column: str, raw: pd.Series) -> pd.Series:
    """An integer index column; a missing or non-integer value names its row."""
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(values) | (np.mod(values, 1) != 0) | (np.abs(values) > 2**53)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = raw.iloc[i]
        what = "missing index value" if pd.isna(value) else f"{_show(value)} is not an integer index"
        raise DataError(f"{path}: column {column!r}, row {i + 2}: {what}")
    if _is_integer(raw):
        return raw.astype(np.int64).reset_index(drop=True)
    return pd.Series(values.astype(np.int64), name=raw.name)


def _numeric_values(path: Path, column: str, raw: pd.Series) -> np.ndarray:
    """float64 values with NaN where missing; a value that is not a number is an error naming its row."""
    if pd.api.types.is_bool_dtype(raw):
        raise DataError(f"{path}: column {column!r} holds true/false values ({raw.dtype}), not numbers")
    if _is_datetime(raw) or pd.api.types.is_timedelta64_dtype(raw):
        raise DataError(f"{path}: column {column!r} holds timestamps ({raw.dtype}), not numbers")
    if pd.api.types.is_numeric_dtype(raw):
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        failed = np.flatnonzero(np.isnan(values) & raw.notna().to_numpy())
        if len(failed):  # only here is text looked at: blanks, padded numbers, missing markers, or garbage
            text = raw.iloc[failed].astype(str).str.strip()
            missing = text.isin(NA_VALUES).to_numpy()
            parsed = pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            wrong = np.isnan(parsed) & ~missing
            if wrong.any():
                k = int(np.flatnonzero(wrong)[0])
                i = int(failed[k])
                raise DataError(f"{path}: column {column!r}, row {i + 2}: {text.iloc[k]!r} is not a number")
            values[failed] = parsed
    inf = np.isinf(values)
    if inf.any():
        raise DataError(f"{path}: column {column!r}, row {int(np.flatnonzero(inf)[0]) + 2}: value is infinite")
    return values


def _check_missing(path: Path, features: list[str], matrix: np.ndarray, rows: np.ndarray, fill: FillPolicy) -> None:
    if fill != "error":
        return
    for j, name in enumerate(features):
        nan = np.isnan(matrix[:, j])
        if nan.any():
            i = int(rows[int(np.flatnonzero(nan)[0])])
            raise DataError(
                f"{path}: column {name!r}, row {i + 2}: missing value ({int(nan.sum())} in the column); "
                f"choose a fill policy with {_FILL_HINT}"
            )


def _apply_fill(matrix: np.ndarray, fill: FillPolicy) -> np.ndarray:
    if not np.isnan(matrix).any():
        return matrix.astype(np.float32)
    df = pd.DataFrame(matrix)
    if fill == "ffill":
        df = df.ffill().bfill()
    elif fill == "interpolate":
        df = df.interpolate(limit_direction="both")
    else:
        df = df.fillna(0.0)
    return df.to_numpy(dtype=np.float32)


# ---------------------------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class _Grid:
    kind: Literal["fixed", "months", "bdays", "index"]
    unit: int  # nanoseconds, months, business days or index units between rows
    step: pd.Timedelta | None
    label: str
    month_end: bool = False


def _alias(ns: int) -> str:
    for unit, size in (
        ("D", 86_400 * 10**9),
        ("h", 3600 * 10**9),
        ("min", 60 * 10**9),
        ("s", 10**9),
        ("ms", 10**6),
        ("us", 10**3),
    ):
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns}ns"


def _ns(times: pd.Series) -> np.ndarray:
    return np.asarray(pd.DatetimeIndex(times).as_unit("ns").asi8, dtype=np.int64)


def _month_ticks(times: pd.Series) -> np.ndarray:
    t = pd.DatetimeIndex(times)
    return np.asarray(t.year * 12 + t.month - 1, dtype=np.int64)


def _mode(diffs: np.ndarray) -> int:
    values, counts = np.unique(diffs, return_counts=True)
    return int(values[int(np.argmax(counts))])


def _detect_grid(path: Path, column: str, parts: list[tuple[pd.Series, np.ndarray]], time_index: bool) -> _Grid:
    """The step of one or more series (given as (times, file rows)); the most common difference decides."""
    if time_index:
        diffs = np.concatenate([np.diff(t.to_numpy(dtype=np.int64)) for t, _ in parts])
        unit = _mode(diffs) if len(diffs) else 1
        return _Grid("index", max(unit, 1), None, "")
    diffs = np.concatenate([np.diff(_ns(t)) for t, _ in parts])
    if not len(diffs):
        return _Grid("fixed", 1, None, "")
    step_ns = _mode(diffs)
    days = step_ns / 86_400e9
    if 28 <= days <= 31.5 or 89 <= days <= 92.5 or 365 <= days <= 366.5:
        month_diffs = np.concatenate([np.diff(_month_ticks(t)) for t, _ in parts])
        months = max(_mode(month_diffs), 1)
        ref = parts[0][0].iloc[0]
        month_end = all(pd.DatetimeIndex(t).is_month_end.all() for t, _ in parts) and ref.day >= 28
        for t, rows in parts:
            idx = pd.DatetimeIndex(t)
            same_time = (idx - idx.normalize()) == (ref - ref.normalize())
            on_day = idx.is_month_end if month_end else (idx.day == ref.day)
            wrong = ~(np.asarray(same_time) & np.asarray(on_day))
            if wrong.any():
                i = int(np.flatnonzero(wrong)[0])
                raise DataError(
                    f"{path}: column {column!r}, row {int(rows[i]) + 2}: {t.iloc[i]} breaks the monthly step: "
                    f"rows fall on {'the last day of the month' if month_end else f'day {ref.day}'} at {ref.time()}"
                )
        label = f"{months}{'ME' if month_end else 'MS'}"
        return _Grid("months", months, _MONTH_NS * months, label, month_end)
    if step_ns == 86_400 * 10**9 and all(_business_days(t) for t, _ in parts):
        return _Grid("bdays", 1, _BDAY, "1B")
    return _Grid("fixed", step_ns, pd.Timedelta(step_ns, unit="ns"), _alias(step_ns))


def _business_days(times: pd.Series) -> bool:
    """Daily rows on weekdays only, at one time of day, skipping weekends (Friday to Monday somewhere)."""
    idx = pd.DatetimeIndex(times)
    if len(idx) < 2 or (idx.dayofweek >= 5).any():
        return False
    tod = np.asarray(idx - idx.normalize())
    if (tod != tod[0]).any():
        return False
    d = np.diff(idx.normalize().asi8)
    day = pd.Timedelta(days=1) // pd.Timedelta(1, unit=idx.unit)
    return bool(((d == 3 * day) & (idx.dayofweek[:-1] == 4)).any())


def _bday_ticks(times: pd.Series) -> np.ndarray:
    days = pd.DatetimeIndex(times).normalize().as_unit("s").values.astype("datetime64[D]")
    return np.asarray(np.busday_count(np.datetime64("1970-01-05"), days), dtype=np.int64)


def _ticks(grid: _Grid, times: pd.Series) -> np.ndarray:
    if grid.kind == "index":
        return times.to_numpy(dtype=np.int64)
    if grid.kind == "bdays":
        return _bday_ticks(times)
    if grid.kind == "months":
        return _month_ticks(times)
    return _ns(times)


def _check_order(
    path: Path, column: str, times: pd.Series, ticks: np.ndarray, rows: np.ndarray, long_hint: str | None
) -> None:
    d = np.diff(ticks)
    bad = np.flatnonzero(d <= 0)
    if not len(bad):
        return
    i = int(bad[0]) + 1
    where = f"{path}: column {column!r}, row {int(rows[i]) + 2}"
    if d[i - 1] == 0:
        what = f"duplicate timestamp {times.iloc[i]}"
    else:
        what = f"timestamps are not sorted ({times.iloc[i]} comes after {times.iloc[i - 1]})"
    if long_hint:
        raise DataError(
            f"{where}: {what}; the file looks like several series stacked (long format) with ids in column "
            f"{long_hint!r}: pass --series-column {long_hint}"
        )
    raise DataError(f"{where}: {what}")


def _positions(
    path: Path, column: str, grid: _Grid, times: pd.Series, ticks: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Each row's place on the regular grid from the first row; a difference that is not a whole number of
    steps is an error at that row."""
    offset = ticks - ticks[0]
    off_grid = offset % grid.unit != 0
    if off_grid.any():
        i = int(np.flatnonzero(off_grid)[0])
        gap = times.iloc[i] - times.iloc[i - 1] if grid.kind != "months" else f"{ticks[i] - ticks[i - 1]} months"
        step = grid.label or f"{grid.unit} (index)"
        raise DataError(
            f"{path}: column {column!r}, row {int(rows[i]) + 2}: {times.iloc[i]} is {gap} after the row before, not a "
            f"whole number of steps ({step}, the most common difference): the series is irregular; resample it "
            "to one step first"
        )
    return offset // grid.unit


def _regular(
    path: Path,
    column: str,
    grid: _Grid,
    times: pd.Series,
    matrix: np.ndarray,
    rows: np.ndarray,
    fill: FillPolicy,
    label: str,
) -> tuple[pd.Series, np.ndarray, int]:
    """Times and values on the full grid; missing steps are an error, or filled (at most 5% of rows)."""
    ticks = _ticks(grid, times)
    pos = _positions(path, column, grid, times, ticks, rows)
    n = len(pos)
    total = int(pos[-1]) + 1 if n else 0
    missing = total - n
    if missing == 0:
        return times, matrix, 0
    jumps = np.flatnonzero(np.diff(pos) > 1) + 1
    i = int(jumps[0])
    first = (
        f"row {int(rows[i]) + 2}: {int(pos[i] - pos[i - 1] - 1)} step(s) of {grid.label or 'the index'} missing before "
        f"{times.iloc[i]} ({missing} missing in {len(jumps)} gap(s){label})"
    )
    if fill == "error":
        raise DataError(
            f"{path}: column {column!r}, {first}; pass {_FILL_HINT} to fill up to "
            f"{MAX_FILLED_FRACTION:.0%} of the rows, or fix the file"
        )
    if missing > MAX_FILLED_FRACTION * total:
        raise DataError(
            f"{path}: column {column!r}, {first}: {missing / total:.0%} of the rows would be invented; --fill fills "
            f"at most {MAX_FILLED_FRACTION:.0%}: the series has too many gaps"
        )
    full = np.full((total, matrix.shape[1]), np.nan)
    full[pos] = matrix
    start = times.iloc[0]
    if grid.kind == "index":
        new_times = pd.Series(int(start) + grid.unit * np.arange(total, dtype=np.int64), name=times.name)
    elif grid.kind == "bdays":
        new_times = pd.Series(pd.date_range(start, periods=total, freq="B"), name=times.name)
    elif grid.kind == "months":
        freq = pd.offsets.MonthEnd(grid.unit) if grid.month_end else None
        if freq is not None:
            idx = pd.date_range(start, periods=total, freq=freq)
        else:
            idx = pd.DatetimeIndex([start + pd.DateOffset(months=grid.unit * j) for j in range(total)])
        new_times = pd.Series(idx, name=times.name)
    else:
        new_times = pd.Series(
            pd.date_range(start, periods=total, freq=pd.Timedelta(grid.unit, unit="ns")), name=times.name
        )
    return new_times, full, missing


def _build(
    path: Path,
    time_column: str,
    grid: _Grid,
    times: pd.Series,
    matrix: np.ndarray,
    rows: np.ndarray,
    features: list[str],
    targets: list[str],
    fill: FillPolicy,
    sha: str,
    series_id: str | None = None,
) -> Series:
    _check_missing(path, features, matrix, rows, fill)
    label = f" of series {series_id!r}" if series_id is not None else ""
    times, matrix, filled = _regular(path, time_column, grid, times, matrix, rows, fill, label)
    return Series(
        path=path,
        time_column=time_column,
        times=times.reset_index(drop=True),
        values=_apply_fill(matrix, fill),
        features=features,
        targets=targets,
        sha256=sha,
        step=grid.step,
        step_label=grid.label,
        time_index=grid.kind == "index",
        filled_rows=filled,
        series_id=series_id,
    )


def _prepare(
    path: Path,
    targets: Sequence[str] | str | None,
    covariates: Sequence[str] | None,
    time_column: str | None,
    time_index: bool,
    series_column: str | None,
) -> tuple[pd.DataFrame, pd.DataFrame, str, list[str], list[str]]:
    """(sample, full table of the needed columns, time column, targets, covariates)."""
    path = Path(path)
    suffix = _suffix(path)
    sample = _read(path, nrows=SAMPLE_ROWS) if suffix in (".csv", ".txt") else _read(path)
    if sample.empty:
        raise DataError(f"{path}: the file has no data rows")
    covs = list(covariates or [])
    given = [c for c in (time_column, series_column) if c] + (
        [targets] if isinstance(targets, str) else list(targets or [])
    )
    _check_columns(path, sample, [*given, *covs])
    skip = [c for c in (series_column,) if c]
    time_column = time_column or _detect_time_column(path, sample, time_index, [*skip, *covs])
    _check_time_kind(path, sample, time_column, time_index)
    tgts = _pick_targets(path, sample, targets, [time_column, *skip, *covs])
    if time_column in tgts or time_column in covs:
        raise DataError(f"{path}: column {time_column!r} is the time column; it cannot also be a target or covariate")
    overlap = set(tgts) & set(covs)
    if overlap:
        raise DataError(f"{path}: columns {sorted(overlap)} are given both as targets and as covariates")
    needed = list(dict.fromkeys([*skip, time_column, *tgts, *covs]))
    full = _read(path, columns=needed) if suffix in (".csv", ".txt") else sample[needed]
    if full.empty:
        raise DataError(f"{path}: the file has no data rows")
    return sample, full, time_column, tgts, covs


def load_series(
    path: Path,
    targets: Sequence[str] | str | None = None,
    covariates: Sequence[str] | None = None,
    time_column: str | None = None,
    fill: FillPolicy = "error",
    time_index: bool = False,
) -> Series:
    """Reads and checks a CSV or Parquet file holding one series; see the module docstring for what it
    finds when not told (time column, target, step) and what it refuses."""
    path = Path(path)
    sample, df, time_column, tgts, covs = _prepare(path, targets, covariates, time_column, time_index, None)
    features = [*tgts, *covs]
    raw_times = df[time_column]
    times = _parse_index(path, time_column, raw_times) if time_index else parse_times(path, time_column, raw_times)
    rows = np.arange(len(times))
    ticks = times.to_numpy(dtype=np.int64) if time_index else _ns(times)
    d = np.diff(ticks)
    long_hint = detect_series_column(sample, exclude=[time_column, *features]) if (d <= 0).any() else None
    _check_order(path, time_column, times, ticks, rows, long_hint)
    matrix = np.stack([_numeric_values(path, c, df[c]) for c in features], axis=1)
    del df, raw_times
    grid = _detect_grid(path, time_column, [(times, rows)], time_index)
    return _build(path, time_column, grid, times, matrix, rows, features, tgts, fill, sha256_file(path))


def load_panel(
    path: Path,
    series_column: str,
    time_column: str | None = None,
    target: Sequence[str] | str | None = None,
    covariates: Sequence[str] | None = None,
    fill: FillPolicy = "error",
    time_index: bool = False,
) -> Panel:
    """Reads a long-format file (an id column, a time column, values): one Series per id, in order of
    first appearance, each with its own rows and times (lengths and starts may differ), all on the step
    the file's series share. Within each series the rules of `load_series` hold; rows are counted in the
    file."""
    path = Path(path)
    _, df, time_column, tgts, covs = _prepare(path, target, covariates, time_column, time_index, series_column)
    features = [*tgts, *covs]
    raw_ids = df[series_column]
    missing_id = raw_ids.isna().to_numpy()
    if missing_id.any():
        raise DataError(
            f"{path}: column {series_column!r}, row {int(np.flatnonzero(missing_id)[0]) + 2}: missing series id"
        )
    codes, uniques = pd.factorize(raw_ids, sort=False)
    raw_times = df[time_column]
    times = _parse_index(path, time_column, raw_times) if time_index else parse_times(path, time_column, raw_times)
    matrix = np.stack([_numeric_values(path, c, df[c]) for c in features], axis=1)
    del df, raw_times
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    groups = np.split(order, bounds)
    parts: list[tuple[pd.Series, np.ndarray]] = []
    for rows in groups:
        t = times.iloc[rows].reset_index(drop=True)
        ticks = t.to_numpy(dtype=np.int64) if time_index else _ns(t)
        _check_order(path, time_column, t, ticks, rows, None)
        parts.append((t, rows))
    grid = _detect_grid(path, time_column, parts, time_index)
    sha = sha256_file(path)
    series = [
        _build(path, time_column, grid, t, matrix[rows], rows, features, tgts, fill, sha, str(uniques[k]))
        for k, (t, rows) in enumerate(parts)
    ]
    return Panel(path=path, series_column=series_column, series=series, sha256=sha, features=features, targets=tgts)


# -------------------------------------------------------------------------------------- splits, windows


def _row_at(series: Series, when: str) -> int:
    if series.time_index:
        try:
            return int(np.searchsorted(series.times.to_numpy(dtype=np.int64), int(when)))
        except ValueError as e:
            raise DataError(f"{series.path}: {when!r} is not a row index (the series is indexed by integers)") from e
    try:
        ts = pd.Timestamp(when)
    except ValueError as e:
        raise DataError(f"{when!r} is not a timestamp") from e
    idx = pd.DatetimeIndex(series.times)
    if idx.tz is not None and ts.tz is None:
        ts = ts.tz_localize(idx.tz)
    elif idx.tz is None and ts.tz is not None:
        ts = ts.tz_convert(None)
    return int(idx.searchsorted(ts))


def split_rows(
    series: Series,
    context: int,
    horizon: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    val_start: str | None = None,
    test_start: str | None = None,
) -> Split:
    """Chronological split by fractions, or by explicit start timestamps (row indexes with a time index)
    of validation and test. `test_fraction` 0 keeps no test split: validation is then the last rows."""
    n = series.rows
    if n < context + horizon:
        raise DataError(f"{series.path}: the series has {n} rows, shorter than context + horizon = {context + horizon}")
    if val_start is not None or test_start is not None:
        if val_start is None or test_start is None:
            raise DataError("give both --val-start and --test-start, or neither")
        train_end = _row_at(series, val_start)
        val_end = _row_at(series, test_start)
    else:
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataError(f"split fractions must be in (0, 1) and sum below 1: {val_fraction}, {test_fraction}")
        val_end = int(n * (1 - test_fraction))
        train_end = int(n * (1 - test_fraction - val_fraction))
    if train_end < context + horizon:
        raise DataError(
            f"{series.path}: the training split has {train_end} rows; it needs at least "
            f"context + horizon = {context + horizon}"
        )
    # test_fraction 0 keeps no test split (training for production once the evaluation is done)
    no_test = test_fraction == 0 and test_start is None
    if val_end - train_end < horizon or (n - val_end < horizon and not no_test):
        raise DataError(
            f"{series.path}: validation ({val_end - train_end} rows) and test ({n - val_end} rows) "
            f"must each hold at least one horizon ({horizon} rows); lower --horizon or raise --val-fraction / "
            "--test-fraction"
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
