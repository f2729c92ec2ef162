"""Issue 11: the forget-gate bias option, and `gatecast diagnose gradients` (vanishing gradients)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gatecast.cli import main
from gatecast.training.config import build_config
from gatecast.training.data import DataError
from gatecast.training.diagnose import decay_per_step, diagnose_gradients
from gatecast.training.export import export_onnx, verify
from gatecast.training.model import CellName, Forecaster, ModelConfig


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forget_bias_sets_the_gate_slice_and_exports(cell: CellName, tmp_path: Path) -> None:
    torch.manual_seed(0)
    h = 6
    model = Forecaster(ModelConfig(cell=cell, hidden_size=h, layers=2, horizon=3, forget_bias=1.0))
    for rnn in model.rnns:
        b_ih, b_hh = (getattr(rnn, k).detach() for k in ("bias_ih_l0", "bias_hh_l0"))
        # torch's gate order: lstm i, f, g, o; gru r, z, n: the forget / update gate is rows [H:2H]
        assert torch.equal(b_ih[h : 2 * h], torch.ones(h))
        assert torch.equal(b_hh[h : 2 * h], torch.zeros(h))
        assert not torch.all(b_ih[:h] == 1.0)  # the other gates keep torch's initialisation
    export_onnx(model, tmp_path / "m.onnx", example_time=4)
    assert verify(model, tmp_path / "m.onnx", context=8) < 1e-4


def test_forget_bias_zero_leaves_the_initialisation_alone() -> None:
    torch.manual_seed(3)
    a = Forecaster(ModelConfig(cell="lstm", hidden_size=5, horizon=2))
    torch.manual_seed(3)
    b = Forecaster(ModelConfig(cell="lstm", hidden_size=5, horizon=2, forget_bias=0.0))
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_forget_bias_is_refused_for_a_plain_rnn(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no forget or update gate"):
        Forecaster(ModelConfig(cell="rnn", hidden_size=4, horizon=2, forget_bias=1.0))
    Forecaster(ModelConfig(cell="rnn", hidden_size=4, horizon=2, forget_bias=0.0))  # 0 is the default
    with pytest.raises(DataError, match="forget_bias"):
        build_config(None, {"cell": "rnn", "forget_bias": 1.0, "horizon": 4})
    assert build_config(None, {"cell": "gru", "forget_bias": 1.0, "horizon": 4}).forget_bias == 1.0


def test_decay_per_step_fits_the_slope() -> None:
    norms = list(np.exp(-0.3 * np.arange(50))[::-1])  # the last entry is the last step
    assert decay_per_step(norms) == pytest.approx(-0.3)


def test_plain_rnn_gradient_vanishes_and_the_lstm_keeps_it(tmp_path: Path) -> None:
    """The LSTM with the usual forget-gate bias of 1: with torch's default initialisation (f near 0.5) and
    a short training its gradient decays about as fast as the RNN's on this series (see the README)."""
    out_json, out_png = tmp_path / "g.json", tmp_path / "g.png"
    rnn, lstm = diagnose_gradients(
        ["rnn", "lstm"], steps=200, hidden=16, train_steps=60, json_path=out_json, png_path=out_png, forget_bias=1.0
    )
    assert rnn.forget_bias == 0.0 and lstm.forget_bias == 1.0  # the rnn has no gate and runs as it is
    for norms in (rnn.init, rnn.trained):
        assert norms[-1 - 150] < 1e-6 * norms[-1]  # 150 steps back: orders of magnitude below the last step
    assert rnn.decay_per_step_init < lstm.decay_per_step_init - 0.2
    assert rnn.decay_per_step_trained < lstm.decay_per_step_trained
    data = json.loads(out_json.read_text())
    assert set(data["rnn"]) >= {"init", "trained", "decay_per_step_init", "decay_per_step_trained"}
    assert len(data["lstm"]["init"]) == 200 and len(data["lstm"]["gate_trained"]) == 200
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["diagnose", "gradients", "--cell", "lstm", "--steps", "30", "--hidden", "8", "--train-steps", "3"]
    assert main([*args, "--json", str(tmp_path / "g.json")]) == 0
    assert "lstm" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "g.json").read_text())) >= {"lstm", "steps"}
    assert main(["diagnose", "gradients", "--cell", "rnn", "--steps", "30", "--forget-bias", "1"]) == 2
    assert main(["diagnose", "gradients", "--steps", "30", "--hidden", "0"]) == 2
    assert "--hidden must be at least 1" in capsys.readouterr().err
    assert main(["diagnose", "gradients", "--steps", "30", "--train-steps", "-1"]) == 2
    assert "--train-steps must be 0" in capsys.readouterr().err
