"""Scoring an exported model with onnxruntime on any data file (`gatecast evaluate`). No torch here.

It takes the split flags `gatecast train` takes, so on the training file it reproduces the manifest's
numbers: the same test origins, the same baselines and MASE scale (from the training split), the same
quantile coverage; a global model is scored per series on each series' z-scale, as in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gatecast.graph import cpu_session, zero_states
from gatecast.manifest import MANIFEST_FILE, Evaluation, Manifest

from .data import DataError, FillPolicy, Series, Split, load_panel, load_series, split_rows
from .detect import default_eval_stride
from .scoring import coverage, evaluate, format_table, pooled_evaluation


class OnnxPredictor:
    """Zero-state forecasts from the exported graph; the last quantile forecasts are kept in `.q`."""

    def __init__(self, model_dir: Path, manifest: Manifest) -> None:
        self.manifest = manifest
        self.sess = cpu_session(model_dir / manifest.onnx.file)
        self.q: np.ndarray | None = None

    def __call__(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        m = self.manifest
        outputs = [m.onnx.output] + ([m.onnx.quantile_output] if m.onnx.quantile_output else [])
        ys, qs = [], []
        for i in range(0, x.shape[0], batch):
            xb = np.ascontiguousarray(x[i : i + batch], dtype=np.float32)
            feed = {m.onnx.input: xb, **zero_states(m.states, xb.shape[0])}
            got = self.sess.run(outputs, feed)
            ys.append(got[0])
            if len(got) > 1:
                qs.append(got[1])
        self.q = np.concatenate(qs, axis=0) if qs else None
        return np.concatenate(ys, axis=0)


def evaluate_model_dir(
    model_dir: Path,
    data: Path,
    test_fraction: float = 0.15,
    stride: int | None = None,
    seasons: list[int] | None = None,
    fill: FillPolicy | None = None,
    val_fraction: float = 0.15,
    val_start: str | None = None,
    test_start: str | None = None,
    time_index: bool | None = None,
) -> tuple[Evaluation, str]:
    """Rolling-origin scores on the test split of `data` (the validation split when there is no test).
    `fill` and `time_index` default to what the model was trained with."""
    if not (model_dir / MANIFEST_FILE).is_file():
        raise DataError(f"{model_dir}: no {MANIFEST_FILE}; expected a folder models/<name>/<version>/")
    manifest = Manifest.read(model_dir)
    policy: FillPolicy = fill or manifest.training.get("fill", "error")  # type: ignore[assignment]
    time_index = bool(manifest.training.get("time_index", False)) if time_index is None else time_index
    covariates = manifest.features[manifest.n_targets :]
    seasons = seasons if seasons is not None else list(manifest.seasons)
    if not seasons and manifest.evaluation.mase_season > 1:
        seasons = [manifest.evaluation.mase_season]  # manifests from before seasons were recorded
    predict = OnnxPredictor(model_dir, manifest)
    h, context = manifest.horizon, manifest.context_length

    def split_of(s: Series) -> Split:
        return split_rows(s, context, h, val_fraction, test_fraction, val_start, test_start)

    if manifest.series_column:  # a global model: every series of the long-format file, as in training
        panel = load_panel(
            data, manifest.series_column, manifest.data.time_column, manifest.targets, covariates, policy, time_index
        )
        trained = set(manifest.series_ids)  # the series training kept (it leaves out constant or short ones)
        parts = [(s, split_of(s)) for s in panel.series if str(s.series_id) in trained]
        which = "test" if any(sp.rows - sp.val_end >= h for _, sp in parts) else "validation"
        evaluation, _ = pooled_evaluation(predict, parts, context, h, manifest.n_targets, seasons, which)
        title = f"{manifest.name} v{manifest.version} on {data.name}, {which} split of {len(parts)} series"
        return evaluation, format_table(evaluation, title)

    series = load_series(data, manifest.targets, covariates, manifest.data.time_column, policy, time_index=time_index)
    split = split_of(series)
    has_test = split.rows - split.val_end >= h
    start, end = (split.val_end, split.rows) if has_test else (split.train_end, split.val_end)
    stride = stride or default_eval_stride(h, seasons, max(1, end - start - h + 1))
    evaluation, forecasts, _ = evaluate(
        predict, series.values[:end], split, context, h, manifest.n_targets, stride, seasons, start=start
    )
    name = "test" if has_test else "validation"
    updates: dict[str, object] = {"split": name}
    if predict.q is not None:
        updates["coverage"] = coverage(forecasts["truth"], predict.q, manifest.quantiles)
    evaluation = evaluation.model_copy(update=updates)
    title = f"{manifest.name} v{manifest.version} on {data.name}, {name} split ({end - start} rows)"
    return evaluation, format_table(evaluation, title)
