"""The long-range benchmark (issue 11): the adding problem's data and success criterion, and the report's
structure on toy sizes (`--quick`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.long_range import SUCCESS, AddingRun, adding_batch, adding_table, main, succeeded


def test_adding_batch_marks_one_value_in_each_half_and_sums_them() -> None:
    x, y = adding_batch(torch.Generator().manual_seed(0), 256, 30)
    assert x.shape == (256, 30, 2) and y.shape == (256, 1)
    marks = x[:, :, 1]
    assert torch.equal(marks[:, :15].sum(dim=1), torch.ones(256))  # one marker in the first half
    assert torch.equal(marks[:, 15:].sum(dim=1), torch.ones(256))  # and one in the second
    torch.testing.assert_close(y[:, 0], (x[:, :, 0] * marks).sum(dim=1))
    assert ((x[:, :, 0] >= 0) & (x[:, :, 0] < 1)).all()
    # the sum of two uniform values has variance 1/6: what predicting the mean scores
    _, big = adding_batch(torch.Generator().manual_seed(1), 20_000, 10)
    assert float(big.var()) == pytest.approx(1 / 6, rel=0.03)


def test_success_is_an_mse_below_one_percent_of_the_variance() -> None:
    assert SUCCESS == 0.01
    assert succeeded(0.0016, 1 / 6) and not succeeded(0.0017, 1 / 6)
    assert not succeeded(0.01, 1.0) and succeeded(0.0099, 1.0)


def _run(seed: int, mse: float, steps: int, cell: str = "lstm") -> AddingRun:
    return AddingRun(cell, 50, True, seed, steps, 600, mse, 0.2, succeeded(mse, 0.2), 3.0, 1.0)


def test_table_counts_successes_per_cell_clip_and_length() -> None:
    runs = [_run(0, 0.001, 300), _run(1, 0.1, 600), _run(2, 0.0005, 250), _run(0, 0.15, 600, "rnn")]
    table = {r["cell"]: r for r in adding_table(runs)}
    assert table["lstm"]["seeds"] == 3 and table["lstm"]["success_rate"] == pytest.approx(2 / 3)
    assert table["lstm"]["median_mse"] == pytest.approx(0.001) and table["lstm"]["median_steps"] == 300
    assert table["lstm"]["median_mse_ratio"] == pytest.approx(0.005)
    assert table["rnn"]["success_rate"] == 0.0 and table["rnn"]["median_mse_ratio"] == pytest.approx(0.75)


def test_quick_run_writes_the_table_the_real_data_case_and_the_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "long_range.json", tmp_path / "long_range.png"
    main(["--quick", "--out", str(out), "--png", str(png)])
    payload = json.loads(out.read_text())
    assert png.stat().st_size > 10_000 and payload["quick"] is True
    adding = payload["adding"]
    assert {(r["cell"], r["clip"], r["length"]) for r in adding["table"]} == {
        (c, k, n) for c in ("rnn", "lstm") for k in (True, False) for n in (8, 16)
    }
    for r in adding["runs"]:
        assert r["success"] == (r["mse"] < SUCCESS * r["variance"]) and r["ratio"] == r["mse"] / r["variance"]
        assert r["steps"] <= r["budget"] == 4
    (real,) = payload["real_data"]
    assert real["case"] == "quick" and real["pattern_rows_back"] > real["lookback"]
    variants = [(m["cell"], m["tbptt"], m["forget_bias"]) for m in real["models"]]
    assert variants == [("rnn", 0, 0.0), ("lstm", 0, 0.0), ("lstm", 0, 1.0), ("lstm", 24, 0.0)]
    assert set(real["reference"]) == {"skip only (ridge, lookback)", "ridge over the whole window"}
    for m in real["models"]:
        assert m["drift"] >= 0 and m["test_mse_window"] > 0 and m["test_mse_carried"] > 0
        assert 0 <= m["best_epoch"] <= m["epochs"] and m["val_mse"] <= m["val_mse_skip"]
