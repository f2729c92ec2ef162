"""The training loop: AdamW, a learning-rate schedule, gradient clipping, early stopping, seeded."""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .config import TrainConfig
from .data import Series, Split, fit_scaler, load_series, origins, split_rows, windows
from .model import Forecaster, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Forecaster
    series: Series
    split: Split
    epochs: int
    best_epoch: int
    best_val: float
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train loss, val loss) per epoch
    lrs: list[float] = field(default_factory=list)  # learning rate at the end of each epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(n: int, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(size))


def forward_window(model: Forecaster, x: torch.Tensor) -> torch.Tensor:
    """The forecast for windows x [B, T, F] from a zero state, i.e. `model(x, *zero_state).y`.

    With the seasonal form and no level input, the first `season` rows of a window only fill the buffer:
    the network sees constant zeros there, so its state after them is the same for every window. That
    state is computed once at batch 1 and broadcast, and the buffer is filled directly, which makes a
    training step cost T - season recurrent steps instead of T. The result is the same computation.
    """
    cfg = model.cfg
    if not (cfg.season and not cfg.level_input and x.shape[1] > cfg.season):
        return model(x, *model.zero_state(x.shape[0])).y
    b, s = x.shape[0], cfg.season
    h, c, buf = model.zero_state(1)
    idle = model(x[:1, :s], h, c, buf)  # inputs are all zero while nothing is known
    fill = torch.cat([x[:, :s], torch.ones_like(x[:, :s, :1])], dim=2).transpose(0, 1)  # [S, B, F + 1]
    if cfg.recent:  # the buffer holds S + K rows; after S rows from a zero state the oldest K are empty
        fill = torch.cat([torch.zeros_like(fill[: cfg.recent]), fill], dim=0)
    h_b = idle.h.expand(-1, b, -1).contiguous()
    c_b = idle.c.expand(-1, b, -1).contiguous() if idle.c is not None else None
    return model(x[:, s:], h_b, c_b, fill).y


@torch.no_grad()
def predict(model: Forecaster, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Forecasts from a zero state for windows x [n, time, features]."""
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch):
        xb = torch.from_numpy(x[i : i + batch])
        out.append(forward_window(model, xb).numpy())
    return np.concatenate(out, axis=0)


def _val_loss(model: Forecaster, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        model.eval()
        return float(model.scaled_error(forward_window(model, x), y))


def train(cfg: TrainConfig) -> TrainResult:
    """Fits one model as cfg says; returns it with the best validation weights restored."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    series = load_series(cfg.data, cfg.targets, cfg.covariates, cfg.time_column, cfg.fill)
    split = split_rows(
        series, cfg.context, cfg.horizon, cfg.val_fraction, cfg.test_fraction, cfg.val_start, cfg.test_start
    )
    values, n_t = series.values, len(series.targets)
    mean, std = fit_scaler(values[: split.train_end])
    diff_std = None
    if cfg.season:
        train_rows = values[: split.train_end]
        diff_std = fit_scaler(train_rows[cfg.season :] - train_rows[: -cfg.season])[1]
    model = Forecaster(
        ModelConfig(
            cell=cfg.cell,
            n_features=len(series.features),
            n_targets=n_t,
            hidden_size=cfg.hidden_size,
            layers=cfg.layers,
            dropout=cfg.dropout,
            horizon=cfg.horizon,
            residual=cfg.residual,
            relative=cfg.relative,
            season=cfg.season,
            level_input=cfg.level_input,
            recent=cfg.recent,
            mean=mean,
            std=std,
            diff_std=diff_std,
        )
    )
    tr_at = origins(0, split.train_end, cfg.context, cfg.horizon, cfg.train_stride)
    va_at = origins(split.train_end, split.val_end, cfg.context, cfg.horizon, 1)
    xt, yt = (torch.from_numpy(a) for a in windows(values, tr_at, cfg.context, cfg.horizon, n_t))
    xv, yv = (torch.from_numpy(a) for a in windows(values, va_at, cfg.context, cfg.horizon, n_t))
    log.info("windows: %d train, %d validation", len(tr_at), len(va_at))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(tr_at) + cfg.batch_size - 1) // cfg.batch_size
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
    best_val, best_epoch, best_state = float("inf"), 0, copy.deepcopy(model.state_dict())
    history: list[tuple[float, float]] = []
    lrs: list[float] = []
    start = time.monotonic()
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"{cfg.cell}", disable=not cfg.progress, unit="epoch")
    for epoch in bar:
        model.train()
        total = 0.0
        for idx in _batches(len(tr_at), cfg.batch_size, gen):
            loss = model.scaled_error(forward_window(model, xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_value is not None:
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip_value)
            if cfg.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            if cosine is not None:
                cosine.step()
            total += float(loss.detach()) * len(idx)
        train_loss = total / len(tr_at)
        val = _val_loss(scored, xv, yv)
        if plateau is not None:
            plateau.step(val)
        history.append((train_loss, val))
        lrs.append(float(opt.param_groups[0]["lr"]))
        if val < best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(scored.state_dict())
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{best_val:.4f}@{best_epoch}")
        if epoch - best_epoch >= cfg.patience:
            log.info("early stop at epoch %d; best validation %.4f at epoch %d", epoch, best_val, best_epoch)
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model,
        series=series,
        split=split,
        epochs=len(history),
        best_epoch=best_epoch,
        best_val=best_val,
        seconds=time.monotonic() - start,
        history=history,
        lrs=lrs,
    )
