"""Recurrent forecasters: LSTM, GRU and a plain tanh RNN, with a direct multi-horizon head.

The module takes raw values and returns raw values: the scaler lives inside it as buffers, so the
exported graph carries it and the server never scales anything. The forecast is made relative to a
reference the data already gives, which keeps a drifting level out of the network's job. Three input
forms, each local in time, so a streaming step costs one step:

- `level` (no season, no lookback): the network sees standardised values; the forecast is the last
  observed target value plus the network's output (`relative=True`).
- `seasonal` (`season = S`): the module also carries the last rows as a state `s` [rows, batch,
  features + 1] (the extra column marks rows actually seen). The network is fed each row's difference
  to the row one season earlier (and to one `extra_seasons` earlier, when given), and the forecast for
  k steps ahead is the value at the same phase of the most recent observed season plus the network's
  correction, so any horizon works, also one longer than the season. `recent = K` adds a learned linear
  map of the last K seasonal differences.
- `lookback` (`lookback = L`): the state `s` carries the last L rows; the forecast is the last value plus
  a linear map of the last L values relative to it (fitted in closed form on the training split before
  the network trains, so it starts as a ridge regression that already knows every season inside L) plus
  the network's correction. The network is fed first differences.

With `quantiles`, a second output `q` [batch, horizon, targets, quantiles] holds quantile forecasts
around the point forecast, sorted so they never cross.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gatecast.manifest import Cell

from .peephole import PeepholeLSTM

# plstm: an LSTM whose gates also see the cell state (peepholes); it exports as ONNX's LSTM with input P
CellName = Cell  # one list of cells, in the manifest both sides read
_CELLS: dict[str, Callable[..., nn.Module]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "plstm": PeepholeLSTM}


@dataclass
class ModelConfig:
    cell: CellName = "gru"
    n_features: int = 1
    n_targets: int = 1
    hidden_size: int = 64
    layers: int = 1
    dropout: float = 0.0
    horizon: int = 48
    residual: bool = False  # add each stacked layer's input to its output (layers >= 2)
    relative: bool = True  # level form: forecast = last observed target + network output
    season: int = 0  # > 0: seasonal input form, see the module docstring
    extra_seasons: list[int] = field(default_factory=list)  # seasonal form: more seasonal differences as inputs
    level_input: bool = True  # also feed the standardised level, not only differences
    recent: int = 0  # seasonal form: also add a learned linear map of the last `recent` seasonal differences
    lookback: int = 0  # > 0: lookback input form with a linear map over this many rows
    # lookback form: scale each series by its own mean absolute step (carried in a state m), so one model
    # serves series of any scale (the global model over many series)
    series_scale: bool = False
    quantiles: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    diff_std: list[float] | None = None  # std of the differences the network is fed (seasonal, lookback)
    # LSTM: the forget gate's input bias (hidden bias 0) in every layer, e.g. 1.0 so the cell starts by
    # remembering; GRU: the update gate z's (a positive z-bias makes the unit keep its state). 0: torch's
    # default initialisation untouched. A plain RNN has no gate: nonzero is refused.
    forget_bias: float = 0.0

    @property
    def form(self) -> str:
        return "lookback" if self.lookback else "seasonal" if self.season else "level"

    @property
    def buffer_rows(self) -> int:
        """Rows of the carried buffer state s (0: none)."""
        if self.lookback:
            return self.lookback
        if self.season:
            return max([self.season, *self.extra_seasons]) + self.recent
        return 0


class Output(NamedTuple):
    y: Tensor  # [B, horizon, targets]
    h: Tensor  # [layers, B, H]
    c: Tensor | None  # [layers, B, H] for an LSTM
    s: Tensor | None  # [rows, B, features + 1] for the seasonal and lookback forms
    q: Tensor | None = None  # [B, horizon, targets, quantiles] when the model has quantiles
    m: Tensor | None = None  # [4, B, features]: running sums of the global model, see SeriesScale
    unit: Tensor | None = None  # [B, 1, targets]: each series' own scale (series_scale), for the loss


class SeriesScale:
    """The global model's per-series unit, from running sums carried in the state m [4, batch, features]:
    rows seen, the sum of their absolute values, steps seen, the sum of their absolute sizes. The unit is
    the mean absolute step, floored at 1% of the mean absolute level; the same formula serves training
    (numpy, per window) and the graph."""

    ROWS = 4
    LEVEL_FLOOR = 0.01
    EPS = 1e-6

    @staticmethod
    def size(rows: Tensor, levels: Tensor, steps: Tensor, total: Tensor) -> Tensor:
        mad = total / steps.clamp(min=1.0)
        floor = SeriesScale.LEVEL_FLOOR * levels / rows.clamp(min=1.0)
        return torch.maximum(mad, floor) + SeriesScale.EPS


class Forecaster(nn.Module):
    """forward(x, h, c, s) -> (y, h, c, s, q); c is None for GRU and RNN, s None in the level form.

    Layers are separate single-layer modules so that residual connections and dropout can sit between
    them; each still exports as one native ONNX recurrent node.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.season and cfg.lookback:
            raise ValueError("choose the seasonal or the lookback input form, not both")
        if cfg.extra_seasons and not cfg.season:
            raise ValueError("extra seasons need the seasonal input form (season > 0)")
        if cfg.series_scale and not cfg.lookback:
            raise ValueError("series_scale (the global model) needs the lookback form")
        n_f, n_t = cfg.n_features, cfg.n_targets
        n_diff = (1 + len(cfg.extra_seasons)) * n_f if cfg.season else n_f if cfg.lookback else 0
        n_in = n_f
        if n_diff:
            n_in = n_diff + (n_f if cfg.level_input and not cfg.series_scale else 0) + 1
        cls = _CELLS[cfg.cell]
        self.rnns = nn.ModuleList(
            [cls(n_in if i == 0 else cfg.hidden_size, cfg.hidden_size, batch_first=True) for i in range(cfg.layers)]
        )
        if cfg.forget_bias:
            self.init_forget_bias(cfg.forget_bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, cfg.horizon * n_t)
        # starts as "last season plus the mean recent seasonal difference"; training refines the weights
        self.skip = nn.Linear(cfg.recent, cfg.horizon, bias=False) if cfg.season and cfg.recent else None
        if self.skip is not None:
            nn.init.constant_(self.skip.weight, 1.0 / cfg.recent)
        # lookback form: the linear map is set by `init_linear` (ridge regression); the head starts at zero
        # so the untrained model is exactly that regression
        self.linear = nn.Linear(cfg.lookback, cfg.horizon) if cfg.lookback else None
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        n_q = len(cfg.quantiles)
        self.qhead = nn.Linear(cfg.hidden_size, cfg.horizon * n_t * n_q) if n_q else None
        self.qbias = nn.Parameter(torch.zeros(cfg.horizon, n_t, n_q)) if n_q else None
        if self.qhead is not None:
            nn.init.zeros_(self.qhead.weight)
            nn.init.zeros_(self.qhead.bias)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32))
        self.register_buffer("diff_std", torch.tensor(cfg.diff_std or cfg.std, dtype=torch.float32))
        if cfg.season:
            # the buffer row at the same phase of the most recent season, for each step ahead
            s_rows, s = cfg.buffer_rows, cfg.season
            phase = torch.tensor([s_rows - s + (k % s) for k in range(cfg.horizon)], dtype=torch.long)
            self.register_buffer("phase", phase)

    def init_forget_bias(self, value: float) -> None:
        """Set the forget gate's (LSTM) or update gate's (GRU) bias to `value` in every layer.

        Torch's gate order is i, f, g, o for an LSTM and r, z, n for a GRU, so the gate is rows [H:2H] of
        both biases in either case; the input bias takes the value and the hidden bias 0 (they add).
        An LSTM's forget gate f = sigmoid(... + b) multiplies the old cell state: b = 1 starts it near
        0.73 instead of 0.5, so the cell remembers and gradients flow back further (Gers et al., 2000;
        Jozefowicz et al., 2015). A GRU's update gate z weighs the old state, h' = (1 - z) n + z h, so a
        positive z-bias makes the unit keep its state, the GRU analogue.
        """
        if self.cfg.cell == "rnn":
            raise ValueError(f"forget_bias={value}: a plain RNN has no forget or update gate; use lstm or gru")
        h = self.cfg.hidden_size
        with torch.no_grad():
            for rnn in self.rnns:
                b_ih: Tensor = rnn.bias_ih_l0  # type: ignore[assignment]
                b_hh: Tensor = rnn.bias_hh_l0  # type: ignore[assignment]
                b_ih[h : 2 * h].fill_(value)
                b_hh[h : 2 * h].zero_()

    @property
    def is_lstm(self) -> bool:
        """The cell carries a cell state c beside h."""
        return self.cfg.cell in ("lstm", "plstm")

    def zero_state(self, batch: int) -> tuple[Tensor | None, ...]:
        """(h, c, s, m) from nothing seen; c, s and m are None where the model has no such state."""
        shape = (self.cfg.layers, batch, self.cfg.hidden_size)
        on = next(self.buffers()).device  # the model's (a GPU under torchrun)
        h = torch.zeros(shape, device=on)
        c = torch.zeros(shape, device=on) if self.is_lstm else None
        rows = self.cfg.buffer_rows
        s = torch.zeros(rows, batch, self.cfg.n_features + 1, device=on) if rows else None
        m = torch.zeros(SeriesScale.ROWS, batch, self.cfg.n_features, device=on) if self.cfg.series_scale else None
        return h, c, s, m

    def forward(
        self, x: Tensor, h: Tensor, c: Tensor | None = None, s: Tensor | None = None, m: Tensor | None = None
    ) -> Output:
        cfg = self.cfg
        n_t, n_f = cfg.n_targets, cfg.n_features
        mean: Tensor = self.mean  # type: ignore[assignment]
        std: Tensor = self.std  # type: ignore[assignment]
        d_std: Tensor = self.diff_std  # type: ignore[assignment]
        z = (x - mean) / std  # [B, T, F]
        s_n = m_n = unit = None
        n_buf = cfg.buffer_rows
        if cfg.series_scale:
            assert s is not None and m is not None, "the global model needs its states s and m"
            seen = torch.cat([x.transpose(0, 1), torch.ones_like(x[:, :, :1]).transpose(0, 1)], dim=2)
            rows = torch.cat([s, seen], dim=0)  # [rows + T, B, F + 1]
            prev = rows[n_buf - 1 : -1]  # [T, B, F + 1]: the row before each x
            known = prev[:, :, n_f:]  # [T, B, 1]
            step = (x.transpose(0, 1) - prev[:, :, :n_f]) * known  # [T, B, F]
            # running sums up to each row: rows seen, their absolute levels, steps seen, their absolute sizes
            rows_seen = m[0:1] + torch.cumsum(torch.ones_like(step), dim=0)
            levels = m[1:2] + torch.cumsum(x.transpose(0, 1).abs(), dim=0)
            count = m[2:3] + torch.cumsum(known.expand(-1, -1, n_f), dim=0)
            total = m[3:4] + torch.cumsum(step.abs(), dim=0)
            # each series' scale: its mean absolute step so far, never below 1% of its mean absolute level
            # (a flat stretch, a sensor stuck at one value, must not make every later change look huge)
            size = SeriesScale.size(rows_seen, levels, count, total)  # [T, B, F]
            z = torch.cat([(step / size).transpose(0, 1), known.transpose(0, 1)], dim=2)  # [B, T, F + 1]
            s_n = rows[-n_buf:]
            m_n = torch.cat([rows_seen[-1:], levels[-1:], count[-1:], total[-1:]], dim=0)  # [4, B, F]
            unit = size[-1:, :, :n_t].transpose(0, 1)  # [B, 1, targets]
        elif n_buf:
            assert s is not None, "the seasonal and lookback forms need their buffer state s"
            seen = torch.cat([x.transpose(0, 1), torch.ones_like(x[:, :, :1]).transpose(0, 1)], dim=2)
            rows = torch.cat([s, seen], dim=0)  # [rows + T, B, F + 1], oldest first
            lags = [cfg.season, *cfg.extra_seasons] if cfg.season else [1]
            diffs = []
            known = torch.ones_like(x[:, :, :1])
            for lag in lags:
                past = rows[n_buf - lag : -lag].transpose(0, 1)  # [B, T, F + 1]: the row `lag` before each x
                seen_past = past[:, :, n_f:]
                diffs.append((x - past[:, :, :n_f]) * seen_past / d_std)  # 0 where the earlier row is unknown
                known = known * seen_past
            z = torch.cat([z, *diffs, known] if cfg.level_input else [*diffs, known], dim=2)
            s_n = rows[-n_buf:]  # [rows, B, F + 1]
        hs, cs = [], []
        for i, rnn in enumerate(self.rnns):
            if self.is_lstm:
                assert c is not None, "an LSTM needs c"
                out, (h_i, c_i) = rnn(z, (h[i : i + 1], c[i : i + 1]))  # out [B, T, H]
                cs.append(c_i)
            else:
                out, h_i = rnn(z, h[i : i + 1])
            hs.append(h_i)  # [1, B, H]
            if i > 0 and cfg.residual:
                out = out + z
            z = self.drop(out) if i < len(self.rnns) - 1 else out
        last = self.drop(z[:, -1, :])  # [B, H]
        delta = self.head(last).view(-1, cfg.horizon, n_t)  # [B, horizon, targets]
        now = x[:, -1:, :n_t]  # [B, 1, targets]
        scale: Tensor = std[:n_t]
        if cfg.season:
            assert s_n is not None
            scale = d_std[:n_t]  # the correction to a season-ago value is on the scale of seasonal changes
            phase: Tensor = self.phase  # type: ignore[assignment]
            ahead = s_n.index_select(0, phase).transpose(0, 1)  # [B, horizon, F + 1]
            ref = torch.where(ahead[:, :, n_f:] > 0, ahead[:, :, :n_t], now)
            y = delta * scale + ref
            if self.skip is not None:
                k, lag = int(cfg.recent), int(cfg.season)
                recent_rows, before = s_n[n_buf - k :], s_n[n_buf - k - lag : n_buf - lag]
                both = recent_rows[:, :, n_f:] * before[:, :, n_f:]  # [K, B, 1]: 1 where both are known
                recent = ((recent_rows[:, :, :n_t] - before[:, :, :n_t]) * both).permute(1, 2, 0)  # [B, targets, K]
                y = y + self.skip(recent).transpose(1, 2)  # [B, horizon, targets]
        elif self.linear is not None:
            assert s_n is not None
            per_row = scale
            if unit is not None:
                scale, per_row = unit, unit.transpose(0, 1)  # [B, 1, targets]: the series' own scale
            # the last L rows relative to the last value, standardised; rows not seen yet count as "no change"
            rel = (s_n[:, :, :n_t] - now.transpose(0, 1)) * s_n[:, :, n_f:] / per_row  # [L, B, targets]
            lin = self.linear(rel.permute(1, 2, 0)).transpose(1, 2)  # [B, horizon, targets]
            y = now + (lin + delta) * scale
        else:
            y = delta * scale + (now if cfg.relative else mean[:n_t])
        q = None
        if self.qhead is not None and self.qbias is not None:
            spread = self.qhead(last).view(-1, cfg.horizon, n_t, len(cfg.quantiles)) + self.qbias
            q = torch.sort(y.unsqueeze(-1) + spread * scale.unsqueeze(-1), dim=-1).values
        h_n = torch.cat(hs, dim=0)  # [layers, B, H]
        c_n = torch.cat(cs, dim=0) if self.is_lstm else None
        return Output(y, h_n, c_n, s_n, q, m_n, unit)

    def target_scale(self) -> Tensor:
        """Per target: the unit the point loss is measured in (the standard deviation of the training split)."""
        std: Tensor = self.std  # type: ignore[assignment]
        return std[: self.cfg.n_targets]

    def loss(self, out: Output, y_true: Tensor, kind: str = "mse", unit: Tensor | None = None) -> Tensor:
        """Point loss in standardised units (every target weighs the same; `unit` [B, 1, targets] sets them
        per window, e.g. each series' own std for a global model), plus the pinball loss of the quantiles."""
        scale = self.target_scale() if unit is None else unit
        err = (out.y - y_true) / scale
        loss = (err**2).mean() if kind == "mse" else err.abs().mean()
        if out.q is not None:
            levels = torch.tensor(self.cfg.quantiles, dtype=y_true.dtype, device=y_true.device)
            miss = (y_true.unsqueeze(-1) - out.q) / scale.unsqueeze(-1)  # [B, H, T, Q]
            loss = loss + torch.maximum(levels * miss, (levels - 1) * miss).mean()
        return loss
