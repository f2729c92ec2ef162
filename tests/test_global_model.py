"""One model over many series (`--series-column`): trained on a long-format file, served like any model.

The series are the shipped Taylor file cut into three pieces of different lengths, at three scales.
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
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import TAYLOR, RunningServer, array, matrix, server_settings, taylor_values

SCALES = {"north": 1.0, "south": 0.001, "east": 40.0}


@pytest.fixture(scope="module")
def global_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("global")
    raw = np.loadtxt(TAYLOR, delimiter=",", skiprows=1, usecols=(0, 1), dtype=str)
    pieces = {"north": raw[:1500], "south": raw[1000:3000], "east": raw[1800:]}  # different lengths and starts
    lines = ["region,timestamp,load"]
    for name, rows in pieces.items():
        lines += [f"{name},{t},{float(v) * SCALES[name]:.6g}" for t, v in rows]
    lines += [f"dead,{t},0" for t, _ in raw[:1200]]  # a sensor that never moved: left out, and said so
    data = tmp / "regions.csv"
    data.write_text("\n".join(lines) + "\n")
    repo = tmp / "repo"
    args = ["train", "--data", str(data), "--series-column", "region", "--horizon", "12", "--repo", str(repo)]
    assert main([*args, "--budget-s", "8", "--no-progress", "--threads", "1", "--max-train-windows", "500"]) == 0
    return repo / "regions" / "1"


def test_global_model_card(global_model: Path) -> None:
    m = Manifest.read(global_model)
    assert m.series_ids == ["north", "south", "east"] and m.series_column == "region"
    assert any("series dead left out: constant" in w for w in m.warnings)
    assert m.input_form == "lookback" and [s.input for s in m.states][-1] == "m0"
    assert m.evaluation.units == "z" and m.validation is not None
    scores = m.evaluation.scores
    # one model over three scales still beats repeating the last value, on each series' own scale
    assert scores["model"].mse is not None and scores["naive"].mse is not None
    assert scores["model"].mse < scores["naive"].mse


def test_one_graph_serves_every_scale(global_model: Path) -> None:
    m = Manifest.read(global_model)
    sess = ort.InferenceSession(str(global_model / "model.onnx"), providers=["CPUExecutionProvider"])
    x = taylor_values()[None, -m.context_length :, :]

    def run(window: np.ndarray) -> np.ndarray:
        feed = {"x": window, **zero_states(m.states, 1)}
        return np.asarray(sess.run(None, feed)[0])

    base = run(x)
    for scale in (0.001, 40.0):
        # the graph scales each series by what it has seen: a series 1000x smaller gets a forecast 1000x
        # smaller (to float32 rounding), with no scaler fitted to it
        np.testing.assert_allclose(run((x * scale).astype(np.float32)), base * scale, rtol=2e-3)


def test_global_model_over_grpc_forecast_and_session(global_model: Path) -> None:
    repo = global_model.parent.parent
    srv = RunningServer(server_settings(repo))
    try:
        m = Manifest.read(global_model)
        x = taylor_values()[-m.context_length :]
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.ForecasterStub(channel)
            reply = stub.Forecast(pb.ForecastRequest(model="regions", series=[matrix(x), matrix(x * 0.001)]))
            big, small = (array(f) for f in reply.forecasts)
            np.testing.assert_allclose(small, big * 0.001, rtol=2e-3)
            # a session fed the same rows one at a time ends with the same forecast (state m carried)
            opened = stub.OpenSession(pb.OpenSessionRequest(model="regions", history=matrix(x[:-5])))
            last = None
            for i in range(5):
                step = stub.Observe(
                    pb.ObserveRequest(session_id=opened.session_id, sequence=i + 1, rows=matrix(x[-5 + i :][:1]))
                )
                last = array(step.forecast)
            assert last is not None
            np.testing.assert_allclose(last, big, rtol=1e-4)
    finally:
        srv.stop()


def test_evaluate_reproduces_the_global_models_scores(global_model: Path) -> None:
    from gatecast.training.evaluate import evaluate_model_dir

    m = Manifest.read(global_model)
    evaluation, table = evaluate_model_dir(global_model, global_model.parent.parent.parent / "regions.csv")
    assert evaluation.units == "z" and "3 series" in table
    for name, score in m.evaluation.scores.items():
        assert evaluation.scores[name].mse == pytest.approx(score.mse, rel=1e-4), name
