"""`gatecast diagnose gradients`: how far back through time the loss gradient reaches, per cell.

One recurrent layer (rnn, lstm or gru, `hidden` units) reads a long window of the shipped half-hourly
demand series (data/taylor_halfhourly.csv, standardised: real data, so the inputs have the scale and
the autocorrelation the forecasters see) and a linear readout of its LAST hidden state predicts the next
value (MSE). The layer is stepped one row at a time as an nn.RNNCell/LSTMCell/GRUCell holding the same
weights, in float64 (a plain RNN's gradient 150 steps back is far below float32's range), and every
hidden state keeps its gradient (`retain_grad`), which gives ||dLoss/dh_t|| for every step t, averaged
over a batch of windows. That is measured at initialisation and after a short training (Adam on windows
of the same length, with the fused nn.RNN/LSTM/GRU layer). The decay per step is the least-squares slope
of ln ||dLoss/dh_t|| against steps back, T - 1 - t: about -0.5 means the gradient shrinks by e^-0.5 each
step back (a plain RNN), about 0 means it survives (the gates).

Beside it the mean gate activation over time: the LSTM's forget gate f_t (the share of the cell state
kept each step) and the GRU's update gate z_t (h_t = (1 - z_t) n_t + z_t h_{t-1}: the share of the state
kept). Both near 1 are what lets the gradient through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .model import Forecaster, ModelConfig

DATA = Path(__file__).resolve().parent.parent / "data" / "taylor_halfhourly.csv"
CELLS = ("rnn", "lstm", "gru")
_CELL_STEP: dict[str, type[nn.Module]] = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


@dataclass
class CellGradients:
    cell: str
    init: list[float]  # ||dLoss/dh_t|| for t = 0 .. T-1 (the last entry is the last step)
    trained: list[float]
    decay_per_step_init: float  # least-squares slope of ln norm per step back (negative: vanishing)
    decay_per_step_trained: float
    gate_init: list[float] = field(default_factory=list)  # mean forget (lstm) / update (gru) gate per step
    gate_trained: list[float] = field(default_factory=list)
    loss_init: float = float("nan")
    loss_trained: float = float("nan")
    forget_bias: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.cell} bias {self.forget_bias:g}" if self.forget_bias else self.cell

    def as_json(self) -> dict[str, object]:
        return {
            "init": self.init,
            "trained": self.trained,
            "decay_per_step_init": self.decay_per_step_init,
            "decay_per_step_trained": self.decay_per_step_trained,
            "gate_init": self.gate_init,
            "gate_trained": self.gate_trained,
            "loss_init": self.loss_init,
            "loss_trained": self.loss_trained,
            "forget_bias": self.forget_bias,
        }


def load_series(path: Path = DATA) -> np.ndarray:
    """The demand column, standardised."""
    v = np.loadtxt(path, delimiter=",", skiprows=1, usecols=1, dtype=np.float64)
    return (v - v.mean()) / v.std()


def windows(series: np.ndarray, steps: int, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """n random windows x [n, steps, 1] and the value right after each, y [n, 1]."""
    start = rng.integers(0, series.size - steps - 1, size=n)
    idx = start[:, None] + np.arange(steps + 1)[None, :]
    w = torch.from_numpy(series[idx])
    return w[:, :steps, None], w[:, steps:]


def decay_per_step(norms: list[float] | np.ndarray) -> float:
    """The least-squares slope of ln(norm) against steps back (0 at the last step); zero norms are left out."""
    g = np.asarray(norms, dtype=np.float64)[::-1]  # index k: k steps back
    k = np.arange(g.size, dtype=np.float64)
    keep = g > 0
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(k[keep], np.log(g[keep]), 1)[0])


def _stepper(layer: nn.Module, cell: str) -> nn.Module:
    """A float64 nn.*Cell with the weights of a single-layer nn.RNN/LSTM/GRU."""
    step = _CELL_STEP[cell](layer.input_size, layer.hidden_size).double()  # type: ignore[arg-type]
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(step, name).copy_(getattr(layer, f"{name}_l0"))
    return step


def _gate(step: nn.Module, cell: str, x: Tensor, h: Tensor) -> Tensor | None:
    """Mean forget gate (lstm) or update gate (gru) activation at this step, over batch and units."""
    if cell == "rnn":
        return None
    n = h.shape[1]
    w_ih, w_hh, b_ih, b_hh = (getattr(step, k)[n : 2 * n] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    return torch.sigmoid(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).mean()


def hidden_gradients(
    layer: nn.Module, readout: nn.Linear, cell: str, x: Tensor, y: Tensor
) -> tuple[list[float], list[float], float]:
    """Per step t: mean over the batch of ||dLoss/dh_t||; the mean gate activation per step; the loss."""
    step = _stepper(layer, cell)
    lin = nn.Linear(readout.in_features, readout.out_features).double()
    lin.load_state_dict(readout.state_dict())
    b = x.shape[0]
    h = torch.zeros(b, readout.in_features, dtype=torch.float64)
    c = torch.zeros_like(h)
    states: list[Tensor] = []
    gates: list[float] = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        with torch.no_grad():
            g = _gate(step, cell, xt, h)
        if g is not None:
            gates.append(float(g))
        if cell == "lstm":
            h, c = step(xt, (h, c))
        else:
            h = step(xt, h)
        h.retain_grad()
        states.append(h)
    loss = ((lin(h) - y) ** 2).mean()
    loss.backward()
    norms = [float(s.grad.norm(dim=1).mean()) for s in states]  # type: ignore[union-attr]
    return norms, gates, float(loss.detach())


def diagnose_cell(
    cell: str,
    steps: int,
    hidden: int = 32,
    seed: int = 0,
    train_steps: int = 200,
    batch: int = 32,
    lr: float = 3e-3,
    forget_bias: float = 0.0,
    series: np.ndarray | None = None,
) -> CellGradients:
    """Gradient norms per step for one cell, at initialisation and after `train_steps` Adam steps."""
    z = load_series() if series is None else series
    torch.manual_seed(seed)
    # the layer as the forecasters build it (so --forget-bias means the same thing here)
    net = Forecaster(ModelConfig(cell=cell, hidden_size=hidden, horizon=1, forget_bias=forget_bias))  # type: ignore[arg-type]
    layer: nn.Module = net.rnns[0]
    readout = nn.Linear(hidden, 1)
    rng = np.random.default_rng(seed)
    x_eval, y_eval = windows(z, steps, 64, rng)
    init, gate_init, loss_init = hidden_gradients(layer, readout, cell, x_eval, y_eval)
    opt = torch.optim.Adam([*layer.parameters(), *readout.parameters()], lr=lr)
    for _ in range(train_steps):
        xb, yb = windows(z, steps, batch, rng)
        out = layer(xb.float())[0]
        loss = ((readout(out[:, -1]) - yb.float()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_([*layer.parameters(), *readout.parameters()], 1.0)
        opt.step()
    trained, gate_trained, loss_trained = hidden_gradients(layer, readout, cell, x_eval, y_eval)
    return CellGradients(
        cell=cell,
        init=init,
        trained=trained,
        decay_per_step_init=decay_per_step(init),
        decay_per_step_trained=decay_per_step(trained),
        gate_init=gate_init,
        gate_trained=gate_trained,
        loss_init=loss_init,
        loss_trained=loss_trained,
        forget_bias=forget_bias,
    )


def plot(results: list[CellGradients], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"rnn": "tab:red", "lstm": "tab:blue", "gru": "tab:green"}
    fig, (ax, ag) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        for norms, style, when, d in (
            (r.init, "-", "init", r.decay_per_step_init),
            (r.trained, "--", "trained", r.decay_per_step_trained),
        ):
            g = np.asarray(norms)[::-1]
            ax.semilogy(
                np.arange(g.size), g / g[0], style, color=colours[r.cell], label=f"{r.label} {when} ({d:+.3f}/step)"
            )
        for gates, style, when in ((r.gate_init, "-", "init"), (r.gate_trained, "--", "trained")):
            if gates:
                name = "forget f" if r.cell == "lstm" else "update z"
                ag.plot(np.arange(len(gates)), gates, style, color=colours[r.cell], label=f"{r.label} {name} {when}")
    ax.set_xlabel("steps back from the last step")
    ax.set_ylabel("||dLoss/dh_t|| / last step's")
    ax.set_title("gradient reaching back through time")
    ax.legend(fontsize=7)
    ag.set_xlabel("time step t")
    ag.set_ylabel("mean gate activation")
    ag.set_ylim(0, 1)
    ag.set_title("forget (lstm) / update (gru) gate")
    if ag.get_legend_handles_labels()[0]:
        ag.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def diagnose_gradients(
    cells: list[str],
    steps: int,
    hidden: int = 32,
    seed: int = 0,
    train_steps: int = 200,
    json_path: Path | None = None,
    png_path: Path | None = None,
    forget_bias: float = 0.0,
) -> list[CellGradients]:
    if steps < 2:
        raise ValueError("--steps must be at least 2")
    z = load_series()
    # the forget-gate bias goes to the gated cells; a plain RNN has no gate and runs as it is, for comparison
    results = [
        diagnose_cell(c, steps, hidden, seed, train_steps, forget_bias=0.0 if c == "rnn" else forget_bias, series=z)
        for c in cells
    ]
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, object] = {
            "steps": steps,
            "hidden": hidden,
            "seed": seed,
            "train_steps": train_steps,
            "forget_bias": forget_bias,
        }
        payload.update({r.cell: r.as_json() for r in results})
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
    if png_path is not None:
        plot(results, png_path)
    return results


def table(results: list[CellGradients]) -> str:
    """Decay per step (slope of ln norm per step back) and the norm T-1 steps back relative to the last."""
    w = max(5, *(len(r.label) for r in results))
    lines = [f"{'cell':<{w}} {'decay/step init':>16} {'trained':>9} {'first/last init':>16} {'trained':>9}"]
    for r in results:
        ratio_i = r.init[0] / r.init[-1]
        ratio_t = r.trained[0] / r.trained[-1]
        lines.append(
            f"{r.label:<{w}} {r.decay_per_step_init:>16.4f} {r.decay_per_step_trained:>9.4f}"
            f" {ratio_i:>16.2e} {ratio_t:>9.2e}"
        )
    return "\n".join(lines)
