"""Each cell against the textbook equations, on random weights, to 1e-6."""

from __future__ import annotations

import pytest
import torch

from gatecast.training.model import CellName, Forecaster, ModelConfig


def _layer(cell: CellName) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    model = Forecaster(ModelConfig(cell=cell, n_features=3, hidden_size=5, horizon=2))
    for p in model.parameters():
        torch.nn.init.uniform_(p, -0.8, 0.8)
    rnn = model.rnns[0]
    return rnn, dict(rnn.named_parameters())


def _sigmoid(v: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g) * 0.5, torch.randn(4, 5, generator=g) * 0.5


def test_lstm_step_is_the_textbook_lstm() -> None:
    module, rnn = _layer("lstm")
    x, h, c = _inputs()
    w_i, w_h = rnn["weight_ih_l0"], rnn["weight_hh_l0"]
    b = rnn["bias_ih_l0"] + rnn["bias_hh_l0"]
    pre = x @ w_i.T + h @ w_h.T + b
    i, f, g, o = pre.chunk(4, dim=1)  # torch's gate order: input, forget, cell candidate, output
    i, f, o, g = _sigmoid(i), _sigmoid(f), _sigmoid(o), torch.tanh(g)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    with torch.no_grad():
        out, (h_t, c_t) = module(x[:, None, :], (h[None], c[None]))
    torch.testing.assert_close(h_t[0], h_next, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_t[0], c_next, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], h_next, atol=1e-6, rtol=0)


def test_gru_step_is_the_textbook_gru() -> None:
    module, rnn = _layer("gru")
    x, h, _ = _inputs()
    xr, xz, xn = (x @ rnn["weight_ih_l0"].T + rnn["bias_ih_l0"]).chunk(3, dim=1)
    hr, hz, hn = (h @ rnn["weight_hh_l0"].T + rnn["bias_hh_l0"]).chunk(3, dim=1)
    r = _sigmoid(xr + hr)  # reset gate
    z = _sigmoid(xz + hz)  # update gate
    candidate = torch.tanh(xn + r * hn)  # torch applies r after the recurrent matmul
    h_next = z * h + (1 - z) * candidate
    with torch.no_grad():
        _, h_t = module(x[:, None, :], h[None])
    torch.testing.assert_close(h_t[0], h_next, atol=1e-6, rtol=0)


def test_rnn_step_is_tanh_of_affine() -> None:
    module, rnn = _layer("rnn")
    x, h, _ = _inputs()
    h_next = torch.tanh(x @ rnn["weight_ih_l0"].T + rnn["bias_ih_l0"] + h @ rnn["weight_hh_l0"].T + rnn["bias_hh_l0"])
    with torch.no_grad():
        _, h_t = module(x[:, None, :], h[None])
    torch.testing.assert_close(h_t[0], h_next, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_returns_separate_states(cell: CellName) -> None:
    model = Forecaster(
        ModelConfig(
            cell=cell,
            n_features=2,
            n_targets=1,
            hidden_size=6,
            layers=3,
            horizon=4,
            mean=[0.0, 0.0],
            std=[1.0, 1.0],
            residual=True,
        )
    )
    h, c, s, _ = model.zero_state(5)
    out = model(torch.randn(5, 7, 2), h, c, s)
    assert out.y.shape == (5, 4, 1)
    assert out.h.shape == (3, 5, 6)
    assert (out.c is not None) == (cell == "lstm")
    if out.c is not None:
        assert out.c.shape == (3, 5, 6)
        assert not torch.equal(out.c, out.h)
    assert out.s is None
