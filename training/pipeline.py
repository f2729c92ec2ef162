"""train -> evaluate -> export -> verify -> publish: what `gatecast train` does."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from gatecast.manifest import ONNX_FILE, DataFingerprint, Evaluation, Manifest, OnnxInfo, Scaler, sha256_file

from .config import TrainConfig
from .data import Series, Split
from .export import OPSET, discard, export_onnx, publish, staging_dir, state_specs, verify
from .model import Forecaster
from .scoring import evaluate, format_table
from .train import TrainResult, predict, train

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
    path: Path, series: Series, at: np.ndarray, forecasts: dict[str, np.ndarray], context: int, count: int
) -> None:
    """Forecast against truth for `count` test origins spread over the test split (first target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = np.linspace(0, len(at) - 1, num=min(count, len(at))).round().astype(int)
    fig, axes = plt.subplots(len(picks), 1, figsize=(10, 2.6 * len(picks)), squeeze=False)
    show = min(context, 2 * forecasts["model"].shape[1])
    for ax, k in zip(axes[:, 0], picks, strict=True):
        o = int(at[k])
        horizon = forecasts["model"].shape[1]
        ax.plot(series.times[o - show : o], series.values[o - show : o, 0], color="0.5", label="history")
        t = series.times[o : o + horizon]
        ax.plot(t, forecasts["truth"][k, :, 0], color="black", label="truth")
        ax.plot(t, forecasts["model"][k, :, 0], color="tab:blue", label="model")
        seasonal = [n for n in forecasts if n.startswith("seasonal_naive")]
        if seasonal:
            ax.plot(t, forecasts[seasonal[-1]][k, :, 0], color="tab:orange", ls="--", label=seasonal[-1])
        ax.set_ylabel(series.targets[0])
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def build_manifest(
    cfg: TrainConfig, result: TrainResult, evaluation: Evaluation, onnx_path: Path, version: int
) -> Manifest:
    model: Forecaster = result.model
    return Manifest(
        name=cfg.name,
        version=version,
        cell=cfg.cell,
        layers=cfg.layers,
        hidden_size=cfg.hidden_size,
        dropout=cfg.dropout,
        residual=cfg.residual,
        features=result.series.features,
        targets=result.series.targets,
        horizon=cfg.horizon,
        context_length=cfg.context,
        input_form="seasonal" if cfg.season else "level",
        season=cfg.season,
        states=state_specs(model),
        scaler=Scaler(mean=list(model.cfg.mean), std=list(model.cfg.std), diff_std=list(model.cfg.diff_std or [])),
        data=fingerprint(result.series, result.split),
        evaluation=evaluation,
        onnx=OnnxInfo(file=ONNX_FILE, sha256=sha256_file(onnx_path), opset=OPSET),
        training={
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val,
            "seconds": round(result.seconds, 2),
            "seed": cfg.seed,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "schedule": cfg.schedule,
            "relative": cfg.relative,
            "level_input": cfg.level_input,
            "weight_decay": cfg.weight_decay,
            "train_stride": cfg.train_stride,
        },
        created=datetime.now(UTC),
    )


def run(cfg: TrainConfig) -> Published:
    result = train(cfg)
    evaluation, forecasts, at = evaluate(
        lambda x: predict(result.model, x),
        result.series.values,
        result.split,
        cfg.context,
        cfg.horizon,
        len(result.series.targets),
        cfg.eval_stride,
        cfg.seasons,
    )
    staging = staging_dir(cfg.repo, cfg.name)
    try:
        onnx_path = staging / ONNX_FILE
        export_onnx(result.model, onnx_path, example_time=min(cfg.context, 8))
        worst = verify(result.model, onnx_path, cfg.context)
        log.info("export verified: worst difference %.2g (standardised units)", worst)
        if cfg.plot_windows:
            plot_forecasts(staging / PLOT_FILE, result.series, at, forecasts, cfg.context, cfg.plot_windows)
        manifest = build_manifest(cfg, result, evaluation, onnx_path, version=1)
        path, manifest = publish(staging, cfg.repo, cfg.name, manifest)
    except BaseException:
        discard(staging)
        raise
    title = (
        f"{cfg.name} v{manifest.version} ({cfg.cell}, {cfg.layers}x{cfg.hidden_size}) — test split, "
        f"{result.epochs} epochs in {result.seconds:.0f} s"
    )
    return Published(path=path, manifest=manifest, table=format_table(evaluation, title))
