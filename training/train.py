"""The training loop: AdamW, a learning-rate schedule, gradient clipping, early stopping, seeded.

Windows are cut batch by batch from the series (never all at once), so memory grows with the series,
not with series x context. A wall-clock deadline ends training early like early stopping does.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .config import TrainConfig
from .data import DataError, Series, Split, fit_scaler, origins
from .distributed import Group
from .model import Forecaster, ModelConfig, SeriesScale

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    model: Forecaster
    epochs: int
    best_epoch: int
    best_val: float
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train loss, val loss) per epoch
    lrs: list[float] = field(default_factory=list)  # learning rate at the end of each epoch
    grad_norms: list[float] = field(default_factory=list)  # mean pre-clip gradient norm per epoch
    initial_val: float = float("inf")  # validation loss of the untrained model ("epoch 0")


@dataclass(kw_only=True)
class TrainResult(Fitted):
    series: Series
    split: Split


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WindowSource:
    """Windows x [n, context, features] and targets y [n, horizon, targets] cut on demand from one series."""

    def __init__(
        self,
        values: np.ndarray,
        at: np.ndarray,
        context: int,
        horizon: int,
        n_targets: int,
        unit: np.ndarray | None = None,
    ) -> None:
        self.values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        self.at = torch.from_numpy(at)
        # per window [n, targets]: the unit its error is measured in (a global model: its series' std)
        self.unit = torch.from_numpy(unit.astype(np.float32)) if unit is not None else None
        self.context, self.horizon, self.n_targets = context, horizon, n_targets
        self._ix = torch.arange(-context, 0)
        self._iy = torch.arange(horizon)

    def __len__(self) -> int:
        return int(self.at.numel())

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.at[idx]
        x = self.values[o[:, None] + self._ix[None, :]]
        y = self.values[o[:, None] + self._iy[None, :]][:, :, : self.n_targets]
        return x, y

    def units(self, idx: torch.Tensor) -> torch.Tensor | None:
        return None if self.unit is None else self.unit[idx][:, None, :]  # [B, 1, targets]


class StreamSource:
    """Truncated BPTT: rows [0, end) as `streams` parallel streams, each a consecutive stretch of the series
    walked in chunks of `chunk` rows; a chunk's target is the `horizon` rows after it. Each epoch shifts
    every chunk boundary by one random offset below `chunk`, so the boundaries are not always the same rows."""

    def __init__(self, values: np.ndarray, end: int, chunk: int, horizon: int, n_targets: int, streams: int) -> None:
        self.values = torch.from_numpy(np.ascontiguousarray(values[:end], dtype=np.float32))
        self.chunk, self.horizon, self.n_targets = chunk, horizon, n_targets
        self.stretch = (end - horizon - chunk) // streams  # rows each stream walks, whatever the offset
        self.streams = streams
        if self.stretch < chunk:
            raise DataError(
                f"tbptt {chunk} with {streams} streams needs at least {(streams + 1) * chunk + horizon} training rows,"
                f" the split has {end}: lower --tbptt or --tbptt-streams"
            )

    @property
    def chunks(self) -> int:
        """Optimisation steps per epoch."""
        return self.stretch // self.chunk

    def epoch(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """x [streams, chunk, features] and y [streams, horizon, targets] for each chunk in turn."""
        offset = int(torch.randint(self.chunk, (1,), generator=gen))
        starts = offset + self.stretch * torch.arange(self.streams)
        ix, iy = torch.arange(self.chunk), torch.arange(self.horizon)
        for k in range(self.chunks):
            at = starts + k * self.chunk  # [streams]: the first row of each stream's chunk
            x = self.values[at[:, None] + ix[None, :]]
            y = self.values[at[:, None] + self.chunk + iy[None, :]][:, :, : self.n_targets]
            yield x, y


def tbptt_chunk(
    model: Forecaster, state: tuple[torch.Tensor | None, ...], x: torch.Tensor, y: torch.Tensor, kind: str
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """One chunk from the carried state (h, c, s, m): its loss, and the new state detached, so the next
    chunk starts where this one ended but its gradient stops here."""
    out = model(x, *state)
    new = tuple(None if t is None else t.detach() for t in (out.h, out.c, out.s, out.m))
    return model.loss(out, y, kind), new


def forward_window(model: Forecaster, x: torch.Tensor) -> torch.Tensor:
    """The forecast for windows x [B, T, F] from a zero state, i.e. `model(x, *zero_state).y`."""
    return forward_window_out(model, x).y


def forward_window_out(model: Forecaster, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """`model(x, *zero_state)`, computed faster where the result is the same.

    With the seasonal form, one season and no level input, the first `season` rows of a window only fill
    the buffer: the network sees constant zeros there, so its state after them is the same for every
    window. That state is computed once at batch 1 and broadcast, and the buffer is filled directly,
    which makes a training step cost T - season recurrent steps instead of T.
    """
    cfg = model.cfg
    if not (cfg.season and not cfg.extra_seasons and not cfg.level_input and x.shape[1] > cfg.season):
        return model(x, *model.zero_state(x.shape[0]))
    b, s = x.shape[0], cfg.season
    h, c, buf, _ = model.zero_state(1)
    assert h is not None
    idle = model(x[:1, :s], h, c, buf)  # inputs are all zero while nothing is known
    fill = torch.cat([x[:, :s], torch.ones_like(x[:, :s, :1])], dim=2).transpose(0, 1)  # [S, B, F + 1]
    if cfg.recent:  # the buffer holds S + K rows; after S rows from a zero state the oldest K are empty
        fill = torch.cat([torch.zeros_like(fill[: cfg.recent]), fill], dim=0)
    h_b = idle.h.expand(-1, b, -1).contiguous()
    c_b = idle.c.expand(-1, b, -1).contiguous() if idle.c is not None else None
    return model(x[:, s:], h_b, c_b, fill)


@torch.no_grad()
def predict(model: Forecaster, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Forecasts from a zero state for windows x [n, time, features]."""
    return predict_all(model, x, batch)[0]


@torch.no_grad()
def predict_all(model: Forecaster, x: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """Point forecasts [n, horizon, targets] and quantiles [n, horizon, targets, q] (None without)."""
    model.eval()
    ys, qs = [], []
    for i in range(0, x.shape[0], batch):
        out = forward_window_out(model, torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
        ys.append(out.y.numpy())
        if out.q is not None:
            qs.append(out.q.numpy())
    return np.concatenate(ys, axis=0), (np.concatenate(qs, axis=0) if qs else None)


@torch.no_grad()
def _val_loss(model: Forecaster, source: WindowSource, group: Group | None = None) -> float:
    """The mean squared error in standardised units (or each window's own unit) over the windows (under
    torchrun: each rank scores its share, the sums are all-reduced, so every rank gets the same number)."""
    group = group or Group()
    model.eval()
    total, n = 0.0, 0
    for idx in group.shard(len(source)).split(512):
        xb, yb, unit = group.place(*source.batch(idx), source.units(idx))
        err = (forward_window(model, xb) - yb) / (model.target_scale() if unit is None else unit)
        total += float((err**2).sum())
        n += err.numel()
    total, count = group.sum(total, n)
    return total / max(count, 1)


def _relative(
    values: np.ndarray, at: np.ndarray, lookback: int, horizon: int, t: int, unit: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For target column t: the last `lookback` values before each origin and the next `horizon`, both
    relative to the last value and divided by the unit: `unit` (the training std) or, when None, each
    window's own mean absolute step (as the global model's graph computes it). Returns x, y, last, unit."""
    z = values[:, t].astype(np.float64)
    window = z[at[:, None] + np.arange(-lookback, 0)[None, :]]
    last = window[:, -1:]
    if unit is None:  # SeriesScale over the window, as the graph computes it from a zero state
        mad = np.abs(np.diff(window, axis=1)).mean(axis=1, keepdims=True) if lookback > 1 else 0 * last
        floor = SeriesScale.LEVEL_FLOOR * np.abs(window).mean(axis=1, keepdims=True)
        scale = np.maximum(mad, floor) + SeriesScale.EPS
    else:
        scale = np.full_like(last, unit)
    future = z[at[:, None] + np.arange(horizon)[None, :]] if horizon else window[:, :0]
    return (window - last) / scale, (future - last) / scale, last, scale


def ridge_fit(
    values: np.ndarray,
    at: np.ndarray,
    lookback: int,
    horizon: int,
    n_targets: int,
    std: np.ndarray | None,
    lams: tuple[float, ...] | float,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The lookback form's linear map in closed form, for each ridge strength in `lams`: the next
    `horizon` values relative to the last one, from the last `lookback` relative to it, in units of the
    training std (or, with std None, of each window's own mean absolute step), pooled over targets.
    Returns [(W [H, L], b [H])] in the order of `lams`."""
    gram = np.zeros((lookback + 1, lookback + 1))
    cross = np.zeros((lookback + 1, horizon))
    for t in range(n_targets):
        for part in np.array_split(at, max(1, at.size // 8192)):
            x, y, _, scale = _relative(values, part, lookback, horizon, t, None if std is None else float(std[t]))
            keep = scale[:, 0] > 10 * SeriesScale.EPS  # a window of zeros (a dead sensor) has no scale to learn in
            x, y = x[keep], y[keep]
            x1 = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
            gram += x1.T @ x1
            cross += x1.T @ y
    out = []
    for lam in (lams,) if isinstance(lams, float) else lams:
        reg = lam * np.eye(lookback + 1)
        reg[-1, -1] = 1e-6  # the intercept (a drift) is not shrunk
        w = np.linalg.solve(gram + reg, cross)  # [L + 1, H]
        out.append((w[:-1].T.astype(np.float32), w[-1].astype(np.float32)))
    return out


def ridge_predict(
    values: np.ndarray, at: np.ndarray, w: np.ndarray, b: np.ndarray, n_targets: int, std: np.ndarray | None
) -> np.ndarray:
    out = []
    for t in range(n_targets):
        x, _, last, scale = _relative(values, at, w.shape[1], 0, t, None if std is None else float(std[t]))
        out.append((x @ w.T + b) * scale + last)
    return np.stack(out, axis=2)  # [n, H, targets]


def model_config(
    cfg: TrainConfig, features: list[str], n_t: int, train_rows: np.ndarray, series_scale: bool = False
) -> ModelConfig:
    """The network's shape and the scalers, fitted on the training rows only (`series_scale`: the global
    model, which scales each series itself and takes no level input)."""
    mean, std = fit_scaler(train_rows)
    diff_std = None
    if cfg.season:
        diff_std = fit_scaler(train_rows[cfg.season :] - train_rows[: -cfg.season])[1]
    elif cfg.lookback:
        diff_std = fit_scaler(train_rows[1:] - train_rows[:-1])[1]
    assert cfg.horizon is not None
    return ModelConfig(
        cell=cfg.cell,
        n_features=len(features),
        n_targets=n_t,
        hidden_size=cfg.hidden_size,
        layers=cfg.layers,
        dropout=cfg.dropout,
        horizon=cfg.horizon,
        residual=cfg.residual,
        relative=cfg.relative,
        forget_bias=cfg.forget_bias,
        season=cfg.season,
        extra_seasons=list(cfg.extra_seasons),
        level_input=cfg.level_input and not series_scale,
        recent=cfg.recent,
        lookback=cfg.lookback,
        series_scale=series_scale,
        quantiles=list(cfg.quantiles),
        mean=mean,
        std=std,
        diff_std=diff_std,
    )


def default_stride(n_origins: int, max_windows: int) -> int:
    return max(1, math.ceil(n_origins / max_windows))


def train(
    cfg: TrainConfig,
    series: Series | None = None,
    split: Split | None = None,
    deadline: float | None = None,
    ridge: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainResult:
    """Fits one concrete candidate (form, sizes and context resolved in cfg); returns it with the best
    validation weights restored. `ridge` = (W, b) initialises the lookback form's linear map. Without a
    series and split, cfg's data file is read and split as `gatecast train` would."""
    if series is None or split is None:
        from .pipeline import prepare

        prep = prepare(cfg)
        cfg, series, split = prep.cfg, prep.series, prep.split
        if cfg.context is None:
            cfg = cfg.model_copy(update={"context": cfg.lookback or cfg.season + 2 * (cfg.horizon or 1)})
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    assert cfg.context is not None and cfg.horizon is not None
    context, horizon = cfg.context, cfg.horizon
    values, n_t = series.values, len(series.targets)
    model = Forecaster(model_config(cfg, series.features, n_t, values[: split.train_end]))
    if model.linear is not None and ridge is not None:
        with torch.no_grad():
            model.linear.weight.copy_(torch.from_numpy(ridge[0]))
            model.linear.bias.copy_(torch.from_numpy(ridge[1]))
        # the closed-form map is already the best linear one on the training split (at the ridge strength
        # validation chose); the network learns what it misses, which keeps the map from drifting
        model.linear.requires_grad_(False)
    all_train = origins(0, split.train_end, context, horizon, 1)
    va_at = origins(split.train_end, split.val_end, context, horizon, 1)
    fitted = fit(cfg, model, values, all_train, va_at, n_t, deadline)
    return TrainResult(series=series, split=split, **fitted.__dict__)


def _every(a: np.ndarray | None, stride: int) -> np.ndarray | None:
    return None if a is None else a[::stride]


def fit(
    cfg: TrainConfig,
    model: Forecaster,
    values: np.ndarray,
    train_at: np.ndarray,
    val_at: np.ndarray,
    n_t: int,
    deadline: float | None = None,
    train_unit: np.ndarray | None = None,
    val_unit: np.ndarray | None = None,
    group: Group | None = None,
) -> Fitted:
    """The training loop over windows of `values` ending at the given origins (stride-1 candidates: the
    train stride and the validation sample are taken here). `group`: the processes of a torchrun job
    (training/distributed.py), which share every batch and every validation pass."""
    group = group or Group()
    assert cfg.context is not None and cfg.horizon is not None
    context, horizon = cfg.context, cfg.horizon
    stride = cfg.train_stride or default_stride(train_at.size, cfg.max_train_windows)
    tr = WindowSource(values, train_at[::stride], context, horizon, n_t, _every(train_unit, stride))
    val_stride = default_stride(val_at.size, cfg.max_val_windows)
    va = WindowSource(values, val_at[::val_stride], context, horizon, n_t, _every(val_unit, val_stride))
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"no windows: train {len(tr)}, validation {len(va)} (context {context}, horizon {horizon})")
    log.info("windows: %d train (stride %d), %d validation", len(tr), stride, len(va))
    if model.qbias is not None:
        _init_quantiles(model, tr)
    streams = None
    if cfg.tbptt:
        if train_unit is not None:
            raise DataError("tbptt walks one series from start to end; the global model (series_column) has many")
        end = int(train_at[-1]) + horizon
        streams = StreamSource(values, end, cfg.tbptt, horizon, n_t, cfg.tbptt_streams)
        log.info("truncated BPTT: %d streams of %d rows in chunks of %d", cfg.tbptt_streams, streams.stretch, cfg.tbptt)

    model.to(group.device)
    net = group.wrap(model)  # the steps go through DDP under torchrun
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = streams.chunks if streams else (len(tr) + cfg.batch_size - 1) // cfg.batch_size
    # build only the schedule asked for: OneCycleLR rewrites the optimizer's lr as soon as it exists
    cosine = (
        torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=cfg.max_epochs * steps_per_epoch, pct_start=0.1
        )
        if cfg.schedule == "cosine"
        else None
    )
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 3))
        if cfg.schedule == "plateau"
        else None
    )
    gen = torch.Generator().manual_seed(cfg.seed)

    # an exponential moving average of the weights (ema_decay > 0) is what gets validated and kept:
    # on small, noisy series it is steadier than the last step's weights
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay)
        )
        if cfg.ema_decay > 0
        else None
    )
    scored: Forecaster = ema.module if ema is not None else model  # type: ignore[assignment]
    # epoch 0 is the untrained model: for the lookback form that is the ridge regression, which training
    # must beat on validation to replace
    initial_val = _val_loss(scored, va, group)
    best_val, best_epoch, best_state = initial_val, 0, copy.deepcopy(scored.state_dict())
    history: list[tuple[float, float]] = []
    lrs: list[float] = []
    grad_norms: list[float] = []
    start = time.monotonic()
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"{cfg.form} {cfg.cell}", disable=not cfg.progress, unit="epoch")
    for epoch in bar:
        model.train()
        total, norms, done = 0.0, [], 0.0
        for loss, n in _steps(cfg, net, tr, streams, gen, group):  # type: ignore[arg-type]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
            if cfg.clip_value is not None:
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip_value)
            if cfg.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            if cosine is not None:
                cosine.step()
            total += float(loss.detach()) * n
            done += n
            if group.any(deadline is not None and time.monotonic() > deadline):
                break  # the budget ends mid-epoch: validate what there is and stop
        total, done = group.sum(total, done)
        train_loss = total / max(done, 1)
        val = _val_loss(scored, va, group)
        if plateau is not None:
            plateau.step(val)
        history.append((train_loss, val))
        lrs.append(float(opt.param_groups[0]["lr"]))
        grad_norms.append(float(np.mean(norms)) if norms else 0.0)
        if val < best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(scored.state_dict())
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{best_val:.4f}@{best_epoch}")
        if epoch - best_epoch >= cfg.patience:
            log.info("early stop at epoch %d; best validation %.4f at epoch %d", epoch, best_val, best_epoch)
            break
        if group.any(deadline is not None and time.monotonic() > deadline):
            log.info("time budget reached at epoch %d; best validation %.4f at epoch %d", epoch, best_val, best_epoch)
            break
    model.load_state_dict(best_state)
    model.cpu().eval()
    return Fitted(
        model=model,
        epochs=len(history),
        best_epoch=best_epoch,
        best_val=best_val,
        seconds=time.monotonic() - start,
        history=history,
        lrs=lrs,
        grad_norms=grad_norms,
        initial_val=initial_val,
    )


def _steps(
    cfg: TrainConfig,
    model: Forecaster,
    tr: WindowSource,
    streams: StreamSource | None,
    gen: torch.Generator,
    group: Group | None = None,
) -> Iterator[tuple[torch.Tensor, float]]:
    """One epoch's losses, one per optimisation step, and the forecasts each covers: shuffled windows from
    a zero state, or (truncated BPTT) the streams' chunks in order with the state carried between them."""
    if streams is None:
        group = group or Group()
        for idx in torch.randperm(len(tr), generator=gen).split(cfg.batch_size):
            # under torchrun each rank takes its share of the batch (the same permutation everywhere); its
            # loss is weighted so that DDP's gradient average is the whole batch's, and counted as
            # len(idx) / world windows so that the summed train loss is the batch's mean
            mine, weight = group.split(idx)
            xb, yb, unit = group.place(*tr.batch(mine), tr.units(mine))
            yield weight * model.loss(forward_window_out(model, xb), yb, cfg.loss, unit), len(idx) / group.world
        return
    state = model.zero_state(streams.streams)
    for xb, yb in streams.epoch(gen):
        loss, state = tbptt_chunk(model, state, xb, yb, cfg.loss)
        yield loss, streams.streams


@torch.no_grad()
def _init_quantiles(model: Forecaster, tr: WindowSource) -> None:
    """Starts each quantile at the empirical quantile of the untrained model's errors on training windows,
    per step ahead, so coverage is right before training sharpens it."""
    assert model.qbias is not None
    model.eval()
    idx = torch.arange(len(tr))[:: max(1, len(tr) // 2000)]
    xb, yb = tr.batch(idx)
    out = forward_window_out(model, xb)
    scale = model.cfg.diff_std if model.cfg.season and model.cfg.diff_std else model.cfg.std
    unit = torch.tensor(scale[: model.cfg.n_targets]).view(1, 1, -1)
    err = (yb - out.y) / unit  # [n, H, T]
    levels = torch.tensor(model.cfg.quantiles)
    model.qbias.copy_(torch.quantile(err, levels, dim=0).permute(1, 2, 0))
