"""Bad data gets a message naming the file, the column and the row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.config import build_config
from training.data import DataError, load_series, origins, split_rows, windows
from training.scoring import naive, seasonal_naive


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
