"""Scoring an exported model with onnxruntime on any data file (`gatecast evaluate`). No torch here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from gatecast.manifest import Evaluation, Manifest

from .data import DataError, FillPolicy, Split, load_series
from .scoring import evaluate, format_table


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
    stride: int = 48,
    seasons: list[int] | None = None,
    fill: FillPolicy = "error",
) -> tuple[Evaluation, str]:
    """Rolling-origin scores over the last `test_fraction` of `data`; MASE is scaled on the rows before it."""
    if not (model_dir / "manifest.json").is_file():
        raise DataError(f"{model_dir}: no manifest.json; expected a folder models/<name>/<version>/")
    manifest = Manifest.read(model_dir)
    series = load_series(data, manifest.targets, manifest.features[manifest.n_targets :], None, fill)
    seasons = seasons or [manifest.evaluation.mase_season]
    cut = int(series.rows * (1 - test_fraction))
    evaluation, _, _ = evaluate(
        onnx_predictor(model_dir, manifest),
        series.values,
        Split(train_end=cut, val_end=cut, rows=series.rows),
        manifest.context_length,
        manifest.horizon,
        manifest.n_targets,
        stride,
        seasons,
    )
    title = f"{manifest.name} v{manifest.version} on {data.name}, last {test_fraction:.0%}"
    return evaluation, format_table(evaluation, title)
