"""The peephole LSTM (issue 11): torch against the equations, its export as one ONNX LSTM node with
peepholes (input P), parity with torch, and served like any other model."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gatecast.manifest import Manifest
from gatecast.training.export import export_onnx, verify
from gatecast.training.model import Forecaster, ModelConfig
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, array, matrix, server_settings, taylor_values, tiny_config

PARITY = 1e-5


def _model(layers: int = 2, **kw: object) -> Forecaster:
    torch.manual_seed(11)
    shape = dict(n_features=2, hidden_size=5, layers=layers, horizon=3, mean=[0.0, 0.0], std=[1.0, 1.0])
    model = Forecaster(ModelConfig(cell="plstm", **shape, **kw))  # type: ignore[arg-type]
    for p in model.parameters():  # large peepholes, so a wrong gate order or a missing P would show
        torch.nn.init.uniform_(p, -0.8, 0.8)
    return model.eval()


def test_the_step_is_the_peephole_equations() -> None:
    model = _model(layers=1)
    layer, g = model.rnns[0], torch.Generator().manual_seed(2)
    x, h, c = torch.randn(4, 1, 2, generator=g), torch.randn(1, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    w = dict(layer.named_parameters())
    pre = x[:, 0] @ w["weight_ih_l0"].T + h[0] @ w["weight_hh_l0"].T + w["bias_ih_l0"] + w["bias_hh_l0"]
    pi, pf, po = w["weight_peep_l0"].chunk(3)
    a_i, a_f, a_g, a_o = pre.chunk(4, dim=1)
    c_next = torch.sigmoid(a_f + pf * c[0]) * c[0] + torch.sigmoid(a_i + pi * c[0]) * torch.tanh(a_g)
    h_next = torch.sigmoid(a_o + po * c_next) * torch.tanh(c_next)  # the output gate sees the new cell state
    with torch.no_grad():
        out, (h_t, c_t) = layer(x, (h, c))
    torch.testing.assert_close(c_t[0], c_next, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_t[0], h_next, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], h_next, atol=1e-6, rtol=0)


def test_forget_bias_sets_the_peephole_lstm_forget_gate() -> None:
    model = Forecaster(ModelConfig(cell="plstm", hidden_size=4, horizon=2, forget_bias=1.0))
    assert torch.equal(model.rnns[0].bias_ih_l0.detach()[4:8], torch.ones(4))
    assert model.is_lstm and model.zero_state(3)[1] is not None  # it carries c like an LSTM


def test_export_is_one_native_lstm_node_with_peepholes(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, example_time=6)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("LSTM") == 2 and not {"Loop", "Scan", "If"} & set(ops)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node, layer in zip([n for n in graph.node if n.op_type == "LSTM"], model.rnns, strict=True):
        assert len(node.input) == 8 and node.input[7]  # X, W, R, B, sequence_lens, initial_h, initial_c, P
        p = weights[node.input[7]]  # [num_directions, 3H], ONNX's order i, o, f
        pi, pf, po = layer.weight_peep_l0.detach().numpy().reshape(3, 5)
        np.testing.assert_array_equal(p, np.concatenate([pi, po, pf])[None])
        w = weights[node.input[1]][0]  # [4H, in], ONNX's order i, o, f, c from torch's i, f, g, o
        wi, wf, wg, wo = layer.weight_ih_l0.detach().numpy().reshape(4, 5, -1)
        np.testing.assert_array_equal(w, np.concatenate([wi, wo, wf, wg]))
    # the checks every export passes: real-shaped windows, random states, window == row by row
    assert verify(model, path, context=12) < PARITY


def test_onnxruntime_matches_torch_window_carry_and_batch(tmp_path: Path) -> None:
    model = _model(lookback=4)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, example_time=6)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((5, 30, 2)).astype(np.float32)
    zero = {n: t.numpy() for n, t in zip(("h0", "c0", "s0"), model.zero_state(5), strict=False) if t is not None}
    with torch.no_grad():
        want = model(torch.from_numpy(x), *model.zero_state(5))
    y, hn, cn, _ = sess.run(None, {"x": x, **zero})
    np.testing.assert_allclose(y, want.y.numpy(), atol=PARITY, rtol=0)  # batch 5, a window of 30
    np.testing.assert_allclose(hn, want.h.numpy(), atol=PARITY, rtol=0)
    np.testing.assert_allclose(cn, want.c.numpy(), atol=PARITY, rtol=0)  # type: ignore[union-attr]
    state = zero
    for t in range(x.shape[1]):  # one row at a time, the state carried
        y_t, h_t, c_t, s_t = sess.run(None, {"x": x[:, t : t + 1], **state})
        state = {"h0": h_t, "c0": c_t, "s0": s_t}
    np.testing.assert_allclose(y_t, y, atol=PARITY, rtol=0)
    np.testing.assert_allclose(c_t, cn, atol=PARITY, rtol=0)
    alone = sess.run(None, {"x": x[2:3], **{k: v[:, 2:3] for k, v in zero.items()}})[0]
    np.testing.assert_allclose(alone, y[2:3], atol=PARITY, rtol=0)  # a row of the batch on its own


def test_a_trained_peephole_model_is_served_like_any_other(tmp_path: Path) -> None:
    from gatecast.training.pipeline import run

    run(tiny_config(tmp_path, cell="plstm", name="peephole", context=48))
    folder = next((tmp_path / "peephole").iterdir())
    m = Manifest.read(folder)
    assert m.cell == "plstm" and [s.input for s in m.states] == ["h0", "c0"]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    history = taylor_values()[300:420]

    def graph(rows: np.ndarray) -> np.ndarray:
        zero = {s.input: np.zeros((s.dims[0], 1, s.dims[1]), np.float32) for s in m.states}
        return np.asarray(sess.run(["y"], {"x": rows[None], **zero})[0][0])

    srv = RunningServer(server_settings(tmp_path))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.ForecasterStub(channel)
            reply = stub.Forecast(pb.ForecastRequest(model="peephole", series=[matrix(history), matrix(history[:7])]))
            np.testing.assert_allclose(array(reply.forecasts[0]), graph(history), rtol=1e-5)
            np.testing.assert_allclose(array(reply.forecasts[1]), graph(history[:7]), rtol=1e-5)
            opened = stub.OpenSession(pb.OpenSessionRequest(model="peephole", history=matrix(history[:100])))
            step = stub.Observe(pb.ObserveRequest(session_id=opened.session_id, sequence=1, rows=matrix(history[100:])))
            np.testing.assert_allclose(array(step.forecast), graph(history), rtol=1e-5)
            info = stub.GetModel(pb.GetModelRequest(name="peephole"))
            assert info.cell == "plstm"
    finally:
        srv.stop()


def test_peephole_needs_batch_first() -> None:
    from gatecast.training.peephole import PeepholeLSTM

    with pytest.raises(ValueError, match="batch first"):
        PeepholeLSTM(2, 3, batch_first=False)
