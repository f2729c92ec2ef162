"""Training to ONNX in seconds, export parity, state carry, reproducibility, and `gatecast evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gatecast.cli import main
from gatecast.manifest import Manifest
from gatecast.training.evaluate import evaluate_model_dir
from gatecast.training.export import ExportError, export_onnx, verify
from gatecast.training.model import CellName, Forecaster, ModelConfig
from gatecast.training.pipeline import run
from tests.conftest import TAYLOR, tiny_config


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_train_writes_a_versioned_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--data",
            str(TAYLOR),
            "--target",
            "demand_mw",
            "--cell",
            "gru",
            "--name",
            "X",
            "--max-epochs",
            "1",
            "--context",
            "48",
            "--horizon",
            "12",
            "--hidden-size",
            "8",
            "--train-stride",
            "16",
            "--season",
            "48",
            "--form",
            "level",
            "--repo",
            str(tmp_path),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "seasonal_naive_48" in out and "MASE(m=48)" in out
    folder = tmp_path / "X" / "1"
    for name in ("model.onnx", "manifest.json", "forecast.png"):
        assert (folder / name).is_file(), name
    m = Manifest.read(folder)
    assert (m.name, m.version, m.cell, m.horizon, m.context_length) == ("X", 1, "gru", 12, 48)
    assert set(m.evaluation.scores) == {"model", "naive", "seasonal_naive_48"}
    assert m.data.train_rows < m.data.train_rows + m.data.validation_rows < m.data.rows
    assert [s.input for s in m.states] == ["h0"]
    # the scaler comes from the training split only
    values = np.loadtxt(TAYLOR, delimiter=",", skiprows=1, usecols=1)
    assert m.scaler.mean[0] == pytest.approx(values[: m.data.train_rows].mean(), rel=1e-6)
    assert main(["train", "--config", str(_toml(tmp_path)), "--repo", str(tmp_path), "--name", "X"]) == 0
    assert Manifest.read(tmp_path / "X" / "2").version == 2
    assert not [p for p in (tmp_path / "X").iterdir() if p.name.startswith(".staging")]


def _toml(tmp_path: Path) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(
        f'data = "{TAYLOR}"\ncontext = 48\nhorizon = 12\nhidden_size = 8\nmax_epochs = 1\n'
        'train_stride = 16\nseasons = [48]\nprogress = false\nplot_windows = 0\nform = "level"\n'
    )
    return p


def test_training_is_reproducible(tmp_path: Path) -> None:
    a = run(tiny_config(tmp_path, name="a", plot_windows=0)).manifest.evaluation.scores["model"]
    b = run(tiny_config(tmp_path, name="b", plot_windows=0)).manifest.evaluation.scores["model"]
    assert a == b


FORMS = {
    "level": {},
    "seasonal": {"season": 10},
    "seasonal+recent": {"season": 10, "recent": 4},
    "seasonal, horizon > season, two seasons": {"season": 3, "extra_seasons": [7], "recent": 2},
    "lookback": {"lookback": 12},
    "lookback+quantiles": {"lookback": 12, "quantiles": [0.1, 0.5, 0.9]},
    "level+quantiles": {"quantiles": [0.25, 0.75]},
    "global (series scale)": {"lookback": 12, "series_scale": True, "quantiles": [0.2, 0.8]},
}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("form", list(FORMS))
def test_export_matches_torch_and_carries_state(tmp_path: Path, cell: CellName, form: str) -> None:
    torch.manual_seed(0)
    model = Forecaster(
        ModelConfig(
            cell=cell,
            n_features=2,
            n_targets=1,
            hidden_size=8,
            layers=2,
            horizon=5,
            mean=[300.0, 2.0],
            std=[40.0, 0.5],
            **FORMS[form],  # type: ignore[arg-type]
        )
    )
    if model.linear is not None:  # a non-zero map, so the check sees it
        torch.nn.init.normal_(model.linear.weight, std=0.1)
    if model.qhead is not None:
        torch.nn.init.normal_(model.qhead.weight, std=0.1)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, example_time=3)
    assert verify(model, path, context=24) < 1e-4
    # independently of verify(): a window in one call == the same rows one at a time, at a new length
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    rng = np.random.default_rng(5)
    x = (np.array([300.0, 2.0]) + np.array([40.0, 0.5]) * rng.standard_normal((3, 31, 2))).astype(np.float32)
    zero = {
        n: np.zeros((i.shape[0] if isinstance(i.shape[0], int) else 0, 3, i.shape[2]), np.float32)
        for n, i in zip(names, sess.get_inputs(), strict=True)
        if n != "x"
    }
    whole = sess.run(None, {"x": x, **zero})
    states = zero
    for t in range(x.shape[1]):
        step = sess.run(None, {"x": x[:, t : t + 1], **states})
        n_states = len(names) - 1
        states = dict(zip([n for n in names if n != "x"], step[1 : 1 + n_states], strict=True))
    np.testing.assert_allclose(step[0], whole[0], atol=1e-3, rtol=1e-5)  # raw units ~300 -> 3e-6 relative
    assert whole[0].shape == (3, 5, 1)
    if model.cfg.quantiles:
        q = whole[-1]
        assert q.shape == (3, 5, 1, len(model.cfg.quantiles))
        assert (np.diff(q, axis=-1) >= 0).all()  # quantiles never cross
        np.testing.assert_allclose(step[-1], q, atol=1e-3, rtol=1e-5)


def test_export_check_fails_on_a_wrong_graph(tmp_path: Path) -> None:
    a = Forecaster(ModelConfig(cell="gru", hidden_size=4, horizon=3))
    b = Forecaster(ModelConfig(cell="gru", hidden_size=4, horizon=3))
    export_onnx(a, tmp_path / "a.onnx", 4)
    with pytest.raises(ExportError, match="differs by"):
        verify(b, tmp_path / "a.onnx", context=8)


def test_evaluate_command_scores_the_onnx_model_like_training(
    model_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = model_repo / "tiny_lstm" / "1"
    m = Manifest.read(folder)
    evaluation, _ = evaluate_model_dir(folder, TAYLOR, test_fraction=0.15, stride=48, seasons=[48])
    # same rows as the training run's test split, so the onnxruntime scores match the torch ones
    assert evaluation.scores["model"].mae == pytest.approx(m.evaluation.scores["model"].mae, rel=1e-4)
    assert main(["evaluate", str(folder), "--data", str(TAYLOR)]) == 0
    assert "seasonal_naive" in capsys.readouterr().out


def test_cli_reports_bad_data_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("t,y\n2020-01-01,1\n2020-01-02,x\n")
    assert main(["train", "--data", str(bad), "--target", "y", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv: column 'y', row 3: 'x' is not a number" in err
    assert "Traceback" not in err
    assert main(["evaluate", str(tmp_path), "--data", str(bad)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_manifest_round_trip(model_repo: Path) -> None:
    folder = model_repo / "tiny_lstm" / "1"
    raw = json.loads((folder / "manifest.json").read_text())
    assert Manifest.model_validate(raw) == Manifest.read(folder)
    assert [s.input for s in Manifest.read(folder).states] == ["h0", "c0", "s0"]


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.rnns.parameters()])  # type: ignore[union-attr]


@pytest.mark.parametrize("clip", [{"clip_value": 1e-12, "clip_norm": None}, {"clip_norm": 1e-12}])
def test_gradient_clipping_is_applied(tmp_path: Path, clip: dict[str, float | None]) -> None:
    from gatecast.training.train import seed_everything, train

    seed_everything(0)
    start = _weights(Forecaster(ModelConfig(cell="gru", hidden_size=8, horizon=12)))
    free = train(tiny_config(tmp_path, weight_decay=0.0, clip_norm=None, schedule="none"))
    clipped = train(tiny_config(tmp_path, weight_decay=0.0, schedule="none", **clip))
    moved_free = (_weights(free.model) - start).abs().max()
    moved_clipped = (_weights(clipped.model) - start).abs().max()
    assert moved_free > 1e-3
    assert moved_clipped < 1e-5  # Adam turns a 1e-12 gradient into a step of ~1e-4 * lr


@pytest.mark.parametrize(("schedule", "changes"), [("none", False), ("cosine", True), ("plateau", False)])
def test_learning_rate_schedule(tmp_path: Path, schedule: str, changes: bool) -> None:
    from gatecast.training.train import train

    result = train(tiny_config(tmp_path, schedule=schedule, max_epochs=2, lr=1e-3))
    assert (result.lrs[-1] != 1e-3) == changes


def test_early_stopping_restores_the_best_weights(tmp_path: Path) -> None:
    from gatecast.training.data import origins, windows
    from gatecast.training.train import predict, train

    result = train(tiny_config(tmp_path, max_epochs=8, patience=2, lr=0.3, clip_norm=None, schedule="none"))
    vals = [result.initial_val] + [v for _, v in result.history]  # epoch 0: the untrained model
    assert result.best_val == min(vals) and result.best_epoch == vals.index(min(vals))
    at = origins(result.split.train_end, result.split.val_end, 64, 12)
    x, y = windows(result.series.values, at, 64, 12, 1)
    # the restored weights score best_val on every validation window (MSE in standardised units)
    std = result.model.target_scale().numpy()
    assert float((((predict(result.model, x) - y) / std) ** 2).mean()) == pytest.approx(result.best_val, rel=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("recent", [0, 3])
def test_fast_seasonal_window_is_the_same_computation(cell: CellName, recent: int) -> None:
    from gatecast.training.train import forward_window

    torch.manual_seed(0)
    model = Forecaster(
        ModelConfig(
            cell=cell,
            n_features=2,
            hidden_size=8,
            layers=2,
            horizon=4,
            season=12,
            level_input=False,
            recent=recent,
            mean=[100.0, 1.0],
            std=[10.0, 1.0],
            diff_std=[3.0, 1.0],
        )
    )
    x = 100 + 10 * torch.randn(5, 20, 2)
    slow = model(x, *model.zero_state(5)).y
    torch.testing.assert_close(forward_window(model, x), slow, atol=1e-5, rtol=1e-5)


def test_export_leaves_a_dropout_model_in_eval_mode(tmp_path: Path) -> None:
    model = Forecaster(ModelConfig(cell="lstm", hidden_size=8, layers=2, dropout=0.4, horizon=3))
    export_onnx(model, tmp_path / "d.onnx", 4)
    assert not model.training  # dropout left on would make every later check and forecast random
    assert verify(model, tmp_path / "d.onnx", context=8) < 1e-4


def test_seasonal_form_reaches_past_the_season_at_the_same_phase() -> None:
    """Horizon 10 with season 4: with the network's correction at zero, step k ahead repeats the value at the
    same phase of the most recent observed season, i.e. the seasonal-naive forecast, for k beyond S too."""
    from gatecast.training.scoring import seasonal_naive

    model = Forecaster(ModelConfig(cell="gru", hidden_size=4, horizon=10, season=4, extra_seasons=[6]))
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    values = np.arange(1, 31, dtype=np.float32)[:, None] ** 1.5
    x = torch.from_numpy(values[None, :20])
    y = model(x, *model.zero_state(1)).y.detach().numpy()
    expected = seasonal_naive(values, np.array([20]), 10, 1, 4)
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_a_manifest_with_an_infinite_or_nan_score_reads_back(tmp_path: Path) -> None:
    """Found in review: a manifest was written with non-finite floats as null (pydantic's default), which no
    float field takes, so a model whose MASE was infinite (a constant series) or whose loss was NaN could be
    written but never loaded. They are written as Infinity and NaN now, which json.loads reads."""
    from tests.conftest import DEFAULT_MODEL

    raw = Manifest.read(DEFAULT_MODEL / "1").model_dump()
    raw["evaluation"]["scores"]["model"]["mase"] = float("inf")
    raw["training"]["best_val_loss"] = float("nan")
    Manifest.model_validate(raw).write(tmp_path)
    back = Manifest.read(tmp_path)
    assert back.evaluation is not None and back.evaluation.scores["model"].mase == float("inf")
    assert np.isnan(back.training["best_val_loss"])
    assert "Infinity" in (tmp_path / "manifest.json").read_text()
