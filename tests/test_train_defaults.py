"""`gatecast train --data FILE --horizon H`: what a new user gets with no tuning by hand.

Each test trains for real, on the shipped Taylor file, within a small --budget-s.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gatecast.cli import main
from gatecast.graph import zero_states
from gatecast.manifest import Manifest
from gatecast.training.evaluate import evaluate_model_dir
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import TAYLOR, RunningServer, array, matrix, server_settings

QUICK = ["--budget-s", "12", "--no-progress", "--threads", "1", "--plot-windows", "1", "--max-train-windows", "600"]


def _train(tmp_path: Path, *args: str) -> int:
    return main(["train", *args, "--repo", str(tmp_path), *QUICK])


def test_defaults_find_target_seasons_and_name_and_evaluate_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(tmp_path, "--data", str(TAYLOR), "--horizon", "24") == 0
    out = capsys.readouterr().out
    assert "validation split" in out and "test split" in out and "candidates" in out
    folder = tmp_path / "taylor_halfhourly" / "1"  # the file's stem: never the served default "taylor"
    m = Manifest.read(folder)
    assert m.targets == ["demand_mw"] and m.step == "30min" and m.seasons == [48, 336]
    assert m.validation is not None and m.validation.split == "validation" and m.evaluation.split == "test"
    assert set(m.evaluation.scores) == {"model", "naive", "seasonal_naive_48", "seasonal_naive_336"}
    assert m.evaluation.stride == 1  # a short test split is scored at every origin
    assert m.history and {"train_loss", "val_loss", "lr", "grad_norm"} <= set(m.history[0])
    # the chosen model beats the better baseline on validation (Taylor is strongly seasonal)
    assert m.beats_baselines and not m.warnings
    # `gatecast evaluate` with the same (default) split flags reproduces the manifest's test scores
    evaluation, _ = evaluate_model_dir(folder, TAYLOR)
    for name, score in m.evaluation.scores.items():
        got = evaluation.scores[name]
        assert got.mae == pytest.approx(score.mae, rel=1e-4), name
        assert got.mase == pytest.approx(score.mase, rel=1e-4), name
    assert evaluation.origins == m.evaluation.origins
    # a second run appends a version; nothing else in the repository is touched
    assert _train(tmp_path, "--data", str(TAYLOR), "--horizon", "24", "--form", "level", "--max-epochs", "1") == 0
    assert sorted(p.name for p in (tmp_path / "taylor_halfhourly").iterdir()) == ["1", "2"]


def test_a_model_that_loses_to_naive_is_published_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a random walk: repeating the last value is the best forecast there is, and an untrained level model
    # (a learning rate too small to move it) only adds noise to it
    rng = np.random.default_rng(3)
    data = tmp_path / "walk.csv"
    stamps = np.datetime64("2021-01-01T00") + np.arange(3000).astype("timedelta64[h]")
    values = 100 + np.cumsum(rng.standard_normal(3000))
    data.write_text("time,value\n" + "".join(f"{t},{v:.4f}\n" for t, v in zip(stamps, values, strict=True)))
    args = ["--data", str(data), "--horizon", "6", "--form", "level", "--lr", "1e-9", "--max-epochs", "1"]
    assert _train(tmp_path, *args) == 0
    captured = capsys.readouterr()
    assert "does not beat the best naive baseline on validation" in captured.out
    m = Manifest.read(tmp_path / "walk" / "1")
    assert m.seasons == []  # a random walk has no season
    assert not m.beats_baselines and "naive" in m.warnings[0]


def test_quantiles_are_trained_exported_and_covered(tmp_path: Path) -> None:
    args = ["--data", str(TAYLOR), "--horizon", "12", "--form", "lookback", "--quantiles", "0.1,0.9"]
    assert _train(tmp_path, *args) == 0
    folder = tmp_path / "taylor_halfhourly" / "1"
    m = Manifest.read(folder)
    assert m.quantiles == [0.1, 0.9] and m.onnx.quantile_output == "q"
    cover = m.evaluation.coverage
    assert set(cover) == {"0.1", "0.9"}
    assert evaluate_model_dir(folder, TAYLOR)[0].coverage == pytest.approx(cover, abs=1e-9)  # evaluate agrees
    assert 0.0 < cover["0.1"] < 0.3 and 0.7 < cover["0.9"] < 1.0  # ordered and near nominal, even if quick
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()][-1] == "q"
    x = np.loadtxt(TAYLOR, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)[None, -m.context_length :, None]
    feed = {"x": x, **zero_states(m.states, 1)}
    y, *_, q = sess.run(None, feed)
    assert q.shape == (1, 12, 1, 2) and (q[..., 0] <= y).all() and (y <= q[..., 1]).all()
    # the server returns them beside the point forecast
    srv = RunningServer(server_settings(tmp_path))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.ForecasterStub(channel)
            reply = stub.Forecast(pb.ForecastRequest(model="taylor_halfhourly", series=[matrix(x[0])]))
            assert list(reply.quantiles) == pytest.approx([0.1, 0.9])
            np.testing.assert_allclose(array(reply.forecasts[0]), y[0], rtol=1e-5)
            np.testing.assert_allclose(array(reply.quantile_forecasts[0]), q[0, :, 0, :], rtol=1e-5)
    finally:
        srv.stop()


def test_tune_runs_optuna_trials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path, "--data", str(TAYLOR), "--horizon", "12", "--tune", "2", "--max-epochs", "1") == 0
    assert capsys.readouterr().out.count("trial ") >= 2
    m = Manifest.read(tmp_path / "taylor_halfhourly" / "1")
    assert str(m.training["candidate"]).startswith("trial ")


def test_test_fraction_zero_trains_on_everything(tmp_path: Path) -> None:
    args = ["--data", str(TAYLOR), "--horizon", "12", "--form", "level", "--max-epochs", "1", "--test-fraction", "0"]
    assert _train(tmp_path, *args) == 0
    m = Manifest.read(tmp_path / "taylor_halfhourly" / "1")
    assert m.data.test_rows == 0 and m.data.train_rows + m.data.validation_rows == m.data.rows
    assert m.evaluation.split == "validation"


def test_several_candidate_targets_need_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "two.csv"
    data.write_text("t,a,b\n" + "".join(f"2021-01-01 {h:02d}:00,{h},{h * 2}\n" for h in range(24)))
    assert _train(tmp_path, "--data", str(data), "--horizon", "2") == 2
    err = capsys.readouterr().err
    assert "'a'" in err and "'b'" in err and "--target" in err
