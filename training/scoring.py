"""Forecast accuracy and the naive baselines, in numpy only (the ONNX evaluator uses them too).

sMAPE is in percent on the 0-200 scale. MASE divides the MAE by the in-sample (training split) MAE of
the seasonal-naive forecast with season m, so 1.0 means "as good as repeating last season in-sample".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gatecast.manifest import Evaluation, Score

from .data import DataError, Series, Split, origins, windows
from .detect import default_eval_stride

Predict = Callable[[np.ndarray], np.ndarray]  # x [n, context, features] -> y [n, horizon, targets]


def mase_scale(train: np.ndarray, season: int) -> np.ndarray:
    """In-sample seasonal-naive MAE per target column of the training rows [rows, targets]."""
    if train.shape[0] <= season:
        raise ValueError(f"the training split ({train.shape[0]} rows) is shorter than the MASE season {season}")
    scale = np.abs(train[season:] - train[:-season]).mean(axis=0)
    return np.where(scale > 0, scale, 1.0)


def score(y_true: np.ndarray, y_pred: np.ndarray, scale: np.ndarray) -> Score:
    """y [n, horizon, targets]; scale [targets]. Each metric is averaged over all points and targets."""
    err = y_pred.astype(np.float64) - y_true.astype(np.float64)
    denom = np.abs(y_true) + np.abs(y_pred)
    smape = np.where(denom > 0, 2.0 * np.abs(err) / np.where(denom > 0, denom, 1.0), 0.0)
    return Score(
        mae=float(np.abs(err).mean()),
        rmse=float(np.sqrt((err**2).mean())),
        smape=float(100.0 * smape.mean()),
        mase=float((np.abs(err).mean(axis=(0, 1)) / scale).mean()),
        mse=float((err**2).mean()),
    )


def naive(values: np.ndarray, at: np.ndarray, horizon: int, n_targets: int) -> np.ndarray:
    """The last observed value, repeated."""
    last = values[at - 1, :n_targets]  # [n, targets]
    return np.repeat(last[:, None, :], horizon, axis=1)


def seasonal_naive(values: np.ndarray, at: np.ndarray, horizon: int, n_targets: int, season: int) -> np.ndarray:
    """y(o + h) = y(o + h - season * k), with k the smallest count of seasons that reaches the past."""
    h = np.arange(horizon)
    lag = season * (h // season + 1)
    idx = at[:, None] + h[None, :] - lag[None, :]
    return values[idx][:, :, :n_targets]


def evaluate(
    predict: Predict,
    values: np.ndarray,
    split: Split,
    context: int,
    horizon: int,
    n_targets: int,
    stride: int,
    seasons: list[int],
    start: int | None = None,
) -> tuple[Evaluation, dict[str, np.ndarray], np.ndarray]:
    """Rolling-origin evaluation over the test split (or from `start`), model and baselines.

    Returns the manifest's Evaluation, the forecasts by forecaster name and the origins used.
    MASE uses the first season of `seasons` (1, the naive forecast, when there is none).
    """
    first = split.val_end if start is None else start
    history = max([context, *seasons])
    at = origins(first, values.shape[0], history, horizon, stride)
    if at.size == 0:
        raise ValueError(f"no test origins: the test part needs {horizon} rows and {history} rows of history")
    x, y_true = windows(values, at, context, horizon, n_targets)
    forecasts: dict[str, np.ndarray] = {"model": predict(x), "naive": naive(values, at, horizon, n_targets)}
    for m in seasons:
        forecasts[f"seasonal_naive_{m}"] = seasonal_naive(values, at, horizon, n_targets, m)
    mase_season = seasons[0] if seasons else 1
    scale = mase_scale(values[: split.train_end, :n_targets], mase_season)
    scores = {name: score(y_true, f, scale) for name, f in forecasts.items()}
    forecasts["truth"] = y_true
    evaluation = Evaluation(origins=int(at.size), stride=stride, mase_season=mase_season, scores=scores)
    return evaluation, forecasts, at


def format_table(evaluation: Evaluation, title: str = "") -> str:
    """The scores as a fixed-width text table."""
    lines = [title] if title else []
    header = f"{'forecaster':<22}{'MSE':>14}{'MAE':>12}{'RMSE':>12}{'sMAPE %':>10}"
    lines.append(header + f"{f'MASE(m={evaluation.mase_season})':>14}")
    for name, s in evaluation.scores.items():
        mse = s.mse if s.mse is not None else s.rmse**2
        lines.append(f"{name:<22}{mse:>14.5g}{s.mae:>12.4g}{s.rmse:>12.4g}{s.smape:>10.3f}{s.mase:>14.4f}")
    cover = ", ".join(f"q{k}: {v:.3f}" for k, v in evaluation.coverage.items())
    lines.append(f"({evaluation.origins} origins, stride {evaluation.stride}{'; coverage ' + cover if cover else ''})")
    return "\n".join(lines)


def pooled_evaluation(
    predict: Predict,
    parts: list[tuple[Series, Split]],
    context: int,
    horizon: int,
    n_t: int,
    seasons: list[int],
    which: str,
) -> tuple[Evaluation, list[str]]:
    """Scores per series on its own z-scale, averaged over the series."""
    per: list[Evaluation] = []
    rows = []
    for s, sp in parts:
        start, end = (sp.train_end, sp.val_end) if which == "validation" else (sp.val_end, sp.rows)
        if end - start < horizon:
            continue
        stride = default_eval_stride(horizon, seasons, end - start - horizon + 1)
        ev, _, _ = evaluate(predict, s.values[:end], sp, context, horizon, n_t, stride, seasons, start=start)
        std = float(s.values[: sp.train_end, :n_t].std()) or 1.0
        scaled = {
            k: Score(mae=v.mae / std, rmse=v.rmse / std, smape=v.smape, mase=v.mase, mse=(v.mse or 0.0) / std**2)
            for k, v in ev.scores.items()
        }
        per.append(ev.model_copy(update={"scores": scaled}))
        best = min((v.mse or 0.0) for k, v in scaled.items() if k != "model")
        rows.append(f"  {s.series_id}: {scaled['model'].mse:.4f} / {best:.4f}")
    if not per:
        raise DataError(f"no series has a {which} split of at least {horizon} rows")
    names = set.intersection(*(set(e.scores) for e in per))
    mean = {
        k: Score(
            mae=float(np.mean([e.scores[k].mae for e in per])),
            rmse=float(np.mean([e.scores[k].rmse for e in per])),
            smape=float(np.mean([e.scores[k].smape for e in per])),
            mase=float(np.mean([e.scores[k].mase for e in per])),
            mse=float(np.mean([e.scores[k].mse or 0.0 for e in per])),
        )
        for k in sorted(names, key=lambda n: (n != "model", n))
    }
    pooled = Evaluation(
        split=which,
        origins=int(sum(e.origins for e in per)),
        stride=per[0].stride,
        mase_season=per[0].mase_season,
        scores=mean,
        units="z",
    )
    return pooled, rows


def coverage(truth: np.ndarray, q: np.ndarray, levels: list[float]) -> dict[str, float]:
    """Share of true values at or below each quantile forecast; truth [n, H, T], q [n, H, T, Q]."""
    return {f"{lv:g}": float((truth <= q[..., i]).mean()) for i, lv in enumerate(levels)}
