"""What `gatecast train` does: read the data and find what was not said (target, step, seasons), choose
the model on validation within the budget, score validation and test against the naive baselines,
export, check the graph on real windows, publish."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from gatecast.manifest import (
    ONNX_FILE,
    DataFingerprint,
    Evaluation,
    Manifest,
    OnnxInfo,
    Scaler,
    next_version,
    sha256_file,
)

from .config import TrainConfig
from .data import DataError, Series, Split, load_series, split_rows
from .detect import default_eval_stride, find_seasons
from .distributed import world_size
from .export import OPSET, discard, export_onnx, publish, staging_dir, state_specs, verify
from .model import Forecaster
from .scoring import coverage, evaluate, format_table
from .search import Candidate, choose
from .train import Fitted, predict_all

log = logging.getLogger(__name__)
PLOT_FILE = "forecast.png"


@dataclass
class Published:
    path: Path
    manifest: Manifest
    table: str


def fingerprint(series: Series, split: Split) -> DataFingerprint:
    return DataFingerprint(
        file=series.path.name,
        sha256=series.sha256,
        rows=series.rows,
        time_column=series.time_column,
        first_time=str(series.times.iloc[0]),
        last_time=str(series.times.iloc[-1]),
        train_rows=split.train_end,
        validation_rows=split.val_end - split.train_end,
        test_rows=split.rows - split.val_end,
    )


def plot_forecasts(
    path: Path,
    title: str,
    series: Series,
    at: np.ndarray,
    forecasts: dict[str, np.ndarray],
    context: int,
    count: int,
) -> None:
    """Forecast against truth for `count` test origins spread over the test split (first target): each
    panel marks the forecast origin and states that window's error; legends sit below the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = np.linspace(0, len(at) - 1, num=min(count, len(at))).round().astype(int)
    fig, axes = plt.subplots(len(picks), 1, figsize=(10, 2.8 * len(picks) + 0.6), squeeze=False)
    horizon = forecasts["model"].shape[1]
    show = min(context, 2 * horizon)
    # the seasonal baseline that does best on these windows is drawn beside the model
    truth_all = forecasts["truth"]
    seasonal = sorted(
        (n for n in forecasts if n.startswith("seasonal_naive")),
        key=lambda n: float(np.abs(forecasts[n] - truth_all).mean()),
    )
    for ax, k in zip(axes[:, 0], picks, strict=True):
        o = int(at[k])
        ax.plot(series.times[o - show : o], series.values[o - show : o, 0], color="0.55", label="history")
        t = series.times[o : o + horizon]
        truth, model = forecasts["truth"][k, :, 0], forecasts["model"][k, :, 0]
        ax.plot(t, truth, color="black", label="truth")
        if "q_low" in forecasts:
            ax.fill_between(t, forecasts["q_low"][k, :, 0], forecasts["q_high"][k, :, 0], color="tab:blue", alpha=0.2)
        ax.plot(t, model, color="tab:blue", label="model")
        if seasonal:
            ax.plot(t, forecasts[seasonal[0]][k, :, 0], color="tab:orange", ls="--", label=seasonal[0])
        ax.axvline(series.times[o], color="tab:red", lw=0.8, ls=":", label="forecast origin")
        mae_m = float(np.abs(model - truth).mean())
        ax.set_title(f"origin {series.times[o]}: model MAE {mae_m:.4g}", fontsize=8, loc="left")
        ax.set_ylabel(series.targets[0])
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _split(cfg: TrainConfig, series: Series, context: int, horizon: int) -> Split:
    return split_rows(series, context, horizon, cfg.val_fraction, cfg.test_fraction, cfg.val_start, cfg.test_start)


@dataclass
class Prepared:
    series: Series
    split: Split
    seasons: list[int]
    cfg: TrainConfig  # data-dependent defaults filled in


def prepare(cfg: TrainConfig) -> Prepared:
    """Reads the data and fills in what was left to the data: target, seasons, evaluation stride, name."""
    if cfg.data is None:
        raise DataError("no data: give --data FILE (CSV or Parquet with a time column and value columns)")
    series = load_series(cfg.data, cfg.targets, cfg.covariates, cfg.time_column, cfg.fill, cfg.time_index)
    if cfg.horizon is None:
        raise DataError("no horizon: give --horizon H (rows to forecast)")
    horizon = cfg.horizon
    # a provisional split (context = horizon) to look at the training rows only
    probe = _split(cfg, series, horizon, horizon)
    if cfg.seasons is not None:
        seasons = list(cfg.seasons)
    else:
        seasons = find_seasons(
            series.values[: probe.train_end, : len(series.targets)], series.step, probe.train_end // 3
        )
        log.info("seasons found in the training split: %s", seasons or "none")
    longest = max([*seasons, cfg.season, cfg.lookback, cfg.context or 0, horizon])
    split = _split(cfg, series, min(longest, probe.train_end // 2), horizon)
    updates: dict[str, object] = {"targets": list(series.targets), "seasons": seasons, "name": cfg.model_name}
    cfg = cfg.model_copy(update=updates)
    return Prepared(series, split, seasons, cfg)


def _evaluation(
    model: Forecaster, prep: Prepared, context: int, start: int, end: int, stride: int, split_name: str
) -> tuple[Evaluation, dict[str, np.ndarray], np.ndarray]:
    cfg, s = prep.cfg, prep.series
    assert cfg.horizon is not None
    q_store: dict[str, np.ndarray] = {}

    def forecast(x: np.ndarray) -> np.ndarray:
        y, q = predict_all(model, x)
        if q is not None:
            q_store["q"] = q
        return y

    evaluation, forecasts, at = evaluate(
        forecast,
        s.values[:end],
        prep.split,
        context,
        cfg.horizon,
        len(s.targets),
        stride,
        prep.seasons,
        start=start,
    )
    updates: dict[str, object] = {"split": split_name}
    if "q" in q_store:
        truth = forecasts["truth"]
        q = q_store["q"]
        updates["coverage"] = coverage(truth, q, cfg.quantiles)
        forecasts["q_low"], forecasts["q_high"] = q[..., 0], q[..., -1]
    return evaluation.model_copy(update=updates), forecasts, at


def run(cfg: TrainConfig, started: float | None = None) -> Published:
    """Trains, scores and publishes; --budget-s counts from `started` (default: now)."""
    started = time.monotonic() if started is None else started
    if cfg.series_column:
        from .panel import run_global

        return run_global(cfg, started)
    if world_size() > 1:
        raise DataError("several processes (torchrun) train the global model only: give --series-column")
    prep = prepare(cfg)
    cfg = prep.cfg
    assert cfg.horizon is not None
    best, cands, _ = choose(cfg, prep.series, prep.split, prep.seasons, started)
    result = best.result
    assert result is not None and best.cfg.context is not None
    context = best.cfg.context
    split = prep.split
    # validation: what chose the model; every origin the data allows at the default stride
    n_val = max(1, split.val_end - split.train_end - cfg.horizon + 1)
    # at most ~2,000 origins: this table reports what chose the model, the test split below is the measure
    val_stride = max(default_eval_stride(cfg.horizon, prep.seasons, n_val), n_val // 2000)
    validation, _, _ = _evaluation(
        result.model, prep, context, split.train_end, split.val_end, val_stride, "validation"
    )
    has_test = split.rows - split.val_end >= cfg.horizon
    if has_test:
        n_test = split.rows - split.val_end - cfg.horizon + 1
        stride = cfg.eval_stride or default_eval_stride(cfg.horizon, prep.seasons, n_test)
        evaluation, forecasts, at = _evaluation(result.model, prep, context, split.val_end, split.rows, stride, "test")
    else:  # --test-fraction 0: production training; the card carries the validation scores
        evaluation, forecasts, at = _evaluation(
            result.model, prep, context, split.train_end, split.val_end, val_stride, "validation"
        )
    warnings = _baseline_warnings(validation)
    if cfg.covariates and best.cfg.form == "lookback" and result.best_epoch == 0:
        warnings.append(
            f"covariates {cfg.covariates} are not used by the published model: its lookback map reads the "
            "targets only, and the network that reads the covariates did not improve on it on validation"
        )
    for w in warnings:
        log.warning("%s", w)
    size = f"{best.cfg.cell} {best.cfg.layers}x{best.cfg.hidden_size}"
    title = f"{cfg.model_name} ({best.label}, {size}) on {prep.series.path.name}"

    def plot(folder: Path, version: int) -> None:
        if cfg.plot_windows:
            named = title.replace(cfg.model_name, f"{cfg.model_name} v{version}", 1)
            plot_forecasts(folder / PLOT_FILE, named, prep.series, at, forecasts, context, cfg.plot_windows)

    def card(onnx_path: Path) -> Manifest:
        return build_manifest(
            best.cfg,
            best.label,
            cfg.model_name,
            result,
            prep.series.features,
            prep.series.targets,
            prep.seasons,
            prep.series.step_label,
            fingerprint(prep.series, split),
            evaluation,
            validation,
            warnings,
            onnx_path,
        )

    path, manifest = export_and_publish(result.model, context, _real_windows(prep, context), cfg, card, plot)
    lines = [format_table(validation, f"{manifest.name} v{manifest.version}: {best.label} — validation split")]
    if has_test:
        lines.append(format_table(evaluation, "test split"))
    else:
        lines.append("no test split (--test-fraction 0): the validation scores above are the card's")
    lines.append(_candidates_table(cands, validation))
    lines.extend(f"WARNING: {w}" for w in warnings)
    lines.extend(f"NOTE: {n}" for n in _test_notes(evaluation if has_test else None))
    return Published(path=path, manifest=manifest, table="\n\n".join(lines))


def export_and_publish(
    model: Forecaster,
    context: int,
    real: np.ndarray,
    cfg: TrainConfig,
    card: Callable[[Path], Manifest],
    plot: Callable[[Path, int], None],
) -> tuple[Path, Manifest]:
    """Export to a staging folder, check the graph on real windows, plot, write the card, and publish the
    folder as the next version with one rename; nothing is left behind when any step fails."""
    staging = staging_dir(cfg.repo, cfg.model_name)
    try:
        onnx_path = staging / ONNX_FILE
        export_onnx(model, onnx_path, example_time=min(context, 8))
        worst = verify(model, onnx_path, context, real=real)
        log.info("export verified: worst difference %.2g (relative to the output scale)", worst)
        plot(staging, next_version(cfg.repo, cfg.model_name))
        return publish(staging, cfg.repo, cfg.model_name, card(onnx_path))
    except BaseException:
        discard(staging)
        raise


def _baseline_warnings(validation: Evaluation) -> list[str]:
    model = validation.scores["model"]
    baselines = {k: v for k, v in validation.scores.items() if k != "model"}
    name, best = min(baselines.items(), key=lambda kv: kv[1].rmse)
    if model.rmse < best.rmse or (best.rmse == 0.0 and model.rmse <= 1e-6):  # a constant series: both exact
        return []
    return [
        f"the model does not beat the best naive baseline on validation ({name}: RMSE {best.rmse:.4g}, "
        f"model {model.rmse:.4g}); it is published all the same, marked beats_baselines=false"
    ]


def _test_notes(test: Evaluation | None) -> list[str]:
    """Said, not marked: the choice is made on validation, but a user should see a test-split loss."""
    if test is None:
        return []
    model = test.scores["model"]
    name, best = min(((k, v) for k, v in test.scores.items() if k != "model"), key=lambda kv: kv[1].rmse)
    if model.rmse <= best.rmse:
        return []
    return [f"on the test split {name} does better (RMSE {best.rmse:.4g} against {model.rmse:.4g})"]


def _candidates_table(cands: list[Candidate], validation: Evaluation) -> str:
    lines = ["candidates (validation MSE in standardised units; the lowest is published)"]
    for c in cands:
        r = c.result
        took = f"{c.seconds:6.1f} s, {r.epochs} epochs (best {r.best_epoch})" if r else c.note
        lines.append(f"  {c.label:<24}{c.val_mse:>10.4f}   {took}")
    return "\n".join(lines)


def _real_windows(prep: Prepared, context: int) -> np.ndarray:
    """Windows from the data itself (validation split) for the export check."""
    end = prep.split.val_end
    starts = np.linspace(max(0, prep.split.train_end - context), end - context, num=8).astype(int)
    return np.stack([prep.series.values[s : s + context] for s in starts]).astype(np.float32)


def build_manifest(
    cfg: TrainConfig,
    label: str,
    name: str,
    result: Fitted,
    features: list[str],
    targets: list[str],
    seasons: list[int],
    step: str,
    data: DataFingerprint,
    evaluation: Evaluation,
    validation: Evaluation,
    warnings: list[str],
    onnx_path: Path,
    series_ids: list[str] | None = None,
    series_column: str = "",
) -> Manifest:
    model: Forecaster = result.model
    assert cfg.horizon is not None and cfg.context is not None
    history = [
        {"epoch": i + 1, "train_loss": tr, "val_loss": va, "lr": lr, "grad_norm": g}
        for i, ((tr, va), lr, g) in enumerate(zip(result.history, result.lrs, result.grad_norms, strict=True))
    ]
    return Manifest(
        name=name,
        version=1,
        cell=cfg.cell,
        layers=cfg.layers,
        hidden_size=cfg.hidden_size,
        dropout=cfg.dropout,
        residual=cfg.residual,
        features=features,
        targets=targets,
        horizon=cfg.horizon,
        context_length=cfg.context,
        input_form=model.cfg.form,  # type: ignore[arg-type]
        season=cfg.season,
        seasons=seasons,
        step=step,
        series_ids=series_ids or [],
        series_column=series_column,
        quantiles=list(cfg.quantiles),
        states=state_specs(model),
        scaler=Scaler(mean=list(model.cfg.mean), std=list(model.cfg.std), diff_std=list(model.cfg.diff_std or [])),
        data=data,
        evaluation=evaluation,
        validation=validation,
        beats_baselines=not warnings,
        warnings=warnings,
        history=history,
        onnx=OnnxInfo(
            file=ONNX_FILE,
            sha256=sha256_file(onnx_path),
            opset=OPSET,
            quantile_output="q" if cfg.quantiles else None,
        ),
        training={
            "candidate": label,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val,
            "seconds": round(result.seconds, 2),
            "seed": cfg.seed,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "schedule": cfg.schedule,
            "loss": cfg.loss,
            "lookback": cfg.lookback,
            "recent": cfg.recent,
            "relative": cfg.relative,
            "level_input": cfg.level_input,
            "weight_decay": cfg.weight_decay,
            "clip_norm": cfg.clip_norm,
            "forget_bias": cfg.forget_bias,
            "tbptt": cfg.tbptt,
            "tbptt_streams": cfg.tbptt_streams if cfg.tbptt else 0,  # the card takes no None
            "budget_s": cfg.budget_s,
            "fill": cfg.fill,
            "time_index": cfg.time_index,
        },
        created=datetime.now(UTC),
    )
