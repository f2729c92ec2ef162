"""Scoring an exported model with onnxruntime on any data file (`gatecast evaluate`). No torch here.

It takes the split flags `gatecast train` takes, so on the training file it reproduces the manifest's
numbers: the same test origins, the same baselines and MASE scale (from the training split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from gatecast.manifest import Evaluation, Manifest

from .data import DataError, FillPolicy, load_series
from .detect import default_eval_stride
from .scoring import evaluate, format_table
from .splits import resolve_split


def onnx_predictor(model_dir: Path, manifest: Manifest):  # type: ignore[no-untyped-def]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_dir / manifest.onnx.file), opts, providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray, batch: int = 512) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], batch):
            xb = np.ascontiguousarray(x[i : i + batch], dtype=np.float32)
            feed = {manifest.onnx.input: xb}
            for s in manifest.states:
                feed[s.input] = np.zeros((s.dims[0], xb.shape[0], s.dims[1]), np.float32)
            out.append(sess.run([manifest.onnx.output], feed)[0])
        return np.concatenate(out, axis=0)

    return predict


def evaluate_model_dir(
    model_dir: Path,
    data: Path,
    test_fraction: float = 0.15,
    stride: int | None = None,
    seasons: list[int] | None = None,
    fill: FillPolicy = "error",
    val_fraction: float = 0.15,
    val_start: str | None = None,
    test_start: str | None = None,
    time_index: bool = False,
) -> tuple[Evaluation, str]:
    """Rolling-origin scores on the test split of `data` (the validation split when there is no test)."""
    if not (model_dir / "manifest.json").is_file():
        raise DataError(f"{model_dir}: no manifest.json; expected a folder models/<name>/<version>/")
    manifest = Manifest.read(model_dir)
    series = load_series(
        data,
        manifest.targets,
        manifest.features[manifest.n_targets :],
        manifest.data.time_column,
        fill,
        time_index=time_index,
    )
    split = resolve_split(
        series, manifest.context_length, manifest.horizon, val_fraction, test_fraction, val_start, test_start
    )
    seasons = seasons if seasons is not None else list(manifest.seasons)
    if not seasons and not manifest.seasons and manifest.evaluation.mase_season > 1:
        seasons = [manifest.evaluation.mase_season]  # manifests from before seasons were recorded
    has_test = split.rows - split.val_end >= manifest.horizon
    start, end = (split.val_end, split.rows) if has_test else (split.train_end, split.val_end)
    stride = stride or default_eval_stride(manifest.horizon, seasons, max(1, end - start - manifest.horizon + 1))
    evaluation, _, _ = evaluate(
        onnx_predictor(model_dir, manifest),
        series.values[:end],
        split,
        manifest.context_length,
        manifest.horizon,
        manifest.n_targets,
        stride,
        seasons,
        start=start,
    )
    name = "test" if has_test else "validation"
    evaluation = evaluation.model_copy(update={"split": name})
    title = f"{manifest.name} v{manifest.version} on {data.name}, {name} split ({end - start} rows)"
    return evaluation, format_table(evaluation, title)
