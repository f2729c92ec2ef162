"""Recurrent forecasters: LSTM, GRU and a plain tanh RNN, with a direct multi-horizon head.

The module takes raw values and returns raw values: the scaler lives inside it as buffers, so the
exported graph carries it and the server never scales anything. The forecast is made relative to a
reference the data already gives, which keeps a drifting level out of the network's job:

- `season == 0` ("level" input): the reference is the last observed target value (`relative=True`).
- `season == S` ("seasonal" input): the module also carries the last S rows as a state `s`
  [S, batch, features + 1] (the extra column marks rows actually seen). The network is fed each row's
  difference to the row one season earlier, and the forecast is that season-ago value plus the network's
  correction. A streaming step still costs one step: the buffer shifts by the rows given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

CellName = Literal["lstm", "gru", "rnn"]
_CELLS: dict[str, Callable[..., nn.Module]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


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
    relative: bool = True  # forecast = last observed target + network output
    season: int = 0  # > 0: seasonal input form, see the module docstring
    level_input: bool = True  # seasonal form: also feed the standardised level, not only differences
    recent: int = 0  # seasonal form: also add a learned linear map of the last `recent` seasonal differences
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    diff_std: list[float] | None = None  # std of seasonal differences per feature (seasonal form)


class Output(NamedTuple):
    y: Tensor  # [B, horizon, targets]
    h: Tensor  # [layers, B, H]
    c: Tensor | None  # [layers, B, H] for an LSTM
    s: Tensor | None  # [season, B, features + 1] for the seasonal input form


class Forecaster(nn.Module):
    """forward(x, h, c, s) -> (y, h, c, s); c is None for GRU and RNN, s None without a season.

    Layers are separate single-layer modules so that residual connections and dropout can sit between
    them; each still exports as one native ONNX recurrent node.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.season and cfg.season < cfg.horizon:
            raise ValueError(f"season {cfg.season} must be at least the horizon {cfg.horizon}")
        n_in = cfg.n_features
        if cfg.season:
            n_in = (2 if cfg.level_input else 1) * cfg.n_features + 1
        cls = _CELLS[cfg.cell]
        self.rnns = nn.ModuleList(
            [cls(n_in if i == 0 else cfg.hidden_size, cfg.hidden_size, batch_first=True) for i in range(cfg.layers)]
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, cfg.horizon * cfg.n_targets)
        # starts as "last season plus the mean recent seasonal difference"; training refines the weights
        self.skip = nn.Linear(cfg.recent, cfg.horizon, bias=False) if cfg.season and cfg.recent else None
        if self.skip is not None:
            nn.init.constant_(self.skip.weight, 1.0 / cfg.recent)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32))
        self.register_buffer("diff_std", torch.tensor(cfg.diff_std or cfg.std, dtype=torch.float32))

    @property
    def is_lstm(self) -> bool:
        return self.cfg.cell == "lstm"

    def zero_state(self, batch: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        shape = (self.cfg.layers, batch, self.cfg.hidden_size)
        h = torch.zeros(shape)
        c = torch.zeros(shape) if self.is_lstm else None
        s = torch.zeros(self.cfg.season + self.cfg.recent, batch, self.cfg.n_features + 1) if self.cfg.season else None
        return h, c, s

    def forward(self, x: Tensor, h: Tensor, c: Tensor | None = None, s: Tensor | None = None) -> Output:
        n_t, n_f = self.cfg.n_targets, self.cfg.n_features
        mean: Tensor = self.mean  # type: ignore[assignment]
        std: Tensor = self.std  # type: ignore[assignment]
        d_std: Tensor = self.diff_std  # type: ignore[assignment]
        z = (x - mean) / std  # [B, T, F]
        s_n = None
        if self.cfg.season:
            assert s is not None, "the seasonal form needs its buffer state s"
            seen = torch.cat([x.transpose(0, 1), torch.ones_like(x[:, :, :1]).transpose(0, 1)], dim=2)
            rows = torch.cat([s, seen], dim=0)  # [S + T, B, F + 1], oldest first
            k = self.cfg.recent
            past = rows[k : -self.cfg.season].transpose(0, 1)  # [B, T, F + 1]: the row one season before each x
            known = past[:, :, n_f:]  # [B, T, 1]
            diff = (x - past[:, :, :n_f]) * known / d_std  # seasonal difference, 0 where unknown
            z = torch.cat([z, diff, known] if self.cfg.level_input else [diff, known], dim=2)  # [B, T, (2)F + 1]
            s_n = rows[-(self.cfg.season + k) :]  # [S + K, B, F + 1]
        hs, cs = [], []
        for i, rnn in enumerate(self.rnns):
            if self.is_lstm:
                assert c is not None, "an LSTM needs c"
                out, (h_i, c_i) = rnn(z, (h[i : i + 1], c[i : i + 1]))  # out [B, T, H]
                cs.append(c_i)
            else:
                out, h_i = rnn(z, h[i : i + 1])
            hs.append(h_i)  # [1, B, H]
            if i > 0 and self.cfg.residual:
                out = out + z
            z = self.drop(out) if i < len(self.rnns) - 1 else out
        last = z[:, -1, :]  # [B, H]
        delta = self.head(self.drop(last)).view(-1, self.cfg.horizon, n_t)  # [B, horizon, targets]
        y = delta * std[:n_t]
        ref = x[:, -1:, :n_t] if self.cfg.relative else mean[:n_t]  # [B, 1, targets] or [targets]
        if s_n is not None:
            y = delta * d_std[:n_t]  # the correction to a season-ago value is on the scale of seasonal changes
            k = self.cfg.recent
            ahead = s_n[k : k + self.cfg.horizon].transpose(0, 1)  # [B, horizon, F + 1]: a season before each y
            ref = torch.where(ahead[:, :, n_f:] > 0, ahead[:, :, :n_t], x[:, -1:, :n_t])
            if self.skip is not None:
                now, before = s_n[self.cfg.season :], s_n[:k]  # the last K rows and the rows a season before
                both = now[:, :, n_f:] * before[:, :, n_f:]  # [K, B, 1]: 1 where both are known
                recent = ((now[:, :, :n_t] - before[:, :, :n_t]) * both).permute(1, 2, 0)  # [B, targets, K]
                y = y + self.skip(recent).transpose(1, 2)  # [B, horizon, targets]
        h_n = torch.cat(hs, dim=0)  # [layers, B, H]
        c_n = torch.cat(cs, dim=0) if self.is_lstm else None
        return Output(y + ref, h_n, c_n, s_n)

    def scaled_error(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        """L1 loss in standardised units, so every target weighs the same."""
        std: Tensor = self.std  # type: ignore[assignment]
        return ((y_pred - y_true).abs() / std[: self.cfg.n_targets]).mean()
