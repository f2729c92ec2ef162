"""ONNX export with the recurrent state as explicit inputs and outputs, checked before it is kept.

The graph: x [batch, time, features] raw values, h0 [layers, batch, hidden] (and c0 for an LSTM) ->
y [batch, horizon, targets] raw values, hn (and cn). Batch and time are dynamic. The TorchScript
exporter (dynamo=False) is used: it emits native LSTM/GRU/RNN nodes, and the dynamo exporter can freeze
the time axis when a second recurrent model is exported in the same process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from gatecast.errors import UserError
from gatecast.graph import cpu_session, zero_states
from gatecast.manifest import Manifest, StateSpec, next_version

from .model import Forecaster, SeriesScale

OPSET = 17
TOLERANCE = 1e-4
RANDOM_TOLERANCE = 1e-2


class ExportError(UserError, RuntimeError):
    """The exported graph does not behave like the torch model; nothing is written."""


class _Graph(nn.Module):
    """Fixes the graph's signature: x then the state tensors in manifest order, y then their successors."""

    def __init__(self, model: Forecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        rest = list(states)
        h = rest.pop(0)
        c = rest.pop(0) if m.is_lstm else None
        s = rest.pop(0) if m.cfg.buffer_rows else None
        stats = rest.pop(0) if m.cfg.series_scale else None
        out = m(x, h, c, s, stats)
        return (out.y, *(t for t in (out.h, out.c, out.s, out.m, out.q) if t is not None))


def state_specs(model: Forecaster) -> list[StateSpec]:
    dims = (model.cfg.layers, model.cfg.hidden_size)
    specs = [StateSpec(input="h0", output="hn", dims=dims)]
    if model.is_lstm:
        specs.append(StateSpec(input="c0", output="cn", dims=dims))
    if model.cfg.buffer_rows:
        specs.append(StateSpec(input="s0", output="sn", dims=(model.cfg.buffer_rows, model.cfg.n_features + 1)))
    if model.cfg.series_scale:
        specs.append(StateSpec(input="m0", output="mn", dims=(SeriesScale.ROWS, model.cfg.n_features)))
    return specs


def _torch_states(model: Forecaster, states: dict[str, np.ndarray]) -> tuple[Tensor | None, ...]:
    return tuple(torch.from_numpy(states[k]) if k in states else None for k in ("h0", "c0", "s0", "m0"))


def export_onnx(model: Forecaster, path: Path, example_time: int) -> None:
    model.eval()
    x = torch.randn(2, example_time, model.cfg.n_features)
    specs = state_specs(model)
    # the wrapper must be in eval mode too: the exporter restores the wrapper's mode afterwards, and a new
    # module is in training mode, which would switch the model's dropout back on
    graph = _Graph(model).eval()
    args = (x, *(t for t in model.zero_state(2) if t is not None))
    dynamic = {"x": {0: "batch", 1: "time"}, "y": {0: "batch"}}
    outputs = ["y", *(s.output for s in specs)]
    if model.cfg.quantiles:
        dynamic["q"] = {0: "batch"}
        outputs.append("q")
    for s in specs:
        dynamic[s.input] = {1: "batch"}
        dynamic[s.output] = {1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=["x", *(s.input for s in specs)],
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def _ort_run(sess: ort.InferenceSession, x: np.ndarray, states: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a) for a in sess.run(None, {"x": x, **states})]


def verify(model: Forecaster, path: Path, context: int, real: np.ndarray | None = None, seed: int = 1234) -> float:
    """Raises ExportError unless onnxruntime matches torch and a window equals the same rows stepped one
    at a time with carried state. Returns the worst difference, relative to the output scale.

    Real windows from the data (`real` [n, context, features]) are the check that matters: there the
    tolerance is TOLERANCE. Random inputs and states also run, to catch wiring faults on shapes the data
    does not show (batch 37, one row, a buffer half seen); inputs unlike the data can amplify float32
    rounding a thousandfold in a correct recurrent net, so those answer to RANDOM_TOLERANCE.
    """
    model.eval()
    sess = cpu_session(path)
    specs = state_specs(model)
    rng = np.random.default_rng(seed)
    mean = model.mean.numpy()  # type: ignore[operator]
    std = model.std.numpy()  # type: ignore[operator]
    n_t, worst = model.cfg.n_targets, 0.0

    def check(what: str, a: np.ndarray, b: np.ndarray, scale: np.ndarray | float, tolerance: float) -> None:
        nonlocal worst
        diff = float(np.max(np.abs((a - b) / scale)))
        worst = max(worst, diff if tolerance == TOLERANCE else diff * TOLERANCE / tolerance)
        if not diff <= tolerance:
            raise ExportError(f"{path.name}: {what} differs by {diff:.3g} (tolerance {tolerance})")

    def out_scale(y: np.ndarray) -> np.ndarray:
        # the output's own spread, never below the training data's standard deviation
        spread = y.reshape(-1, n_t).std(axis=0) if y.size > n_t else 0.0
        return np.maximum(std[:n_t], spread)

    def compare(x: np.ndarray, states: dict[str, np.ndarray], where: str, tolerance: float) -> None:
        with torch.no_grad():
            out = model(torch.from_numpy(x), *_torch_states(model, states))
        expected = [t.numpy() for t in (out.h, out.c, out.s, out.m) if t is not None]
        got = _ort_run(sess, x, states)
        y_scale = out_scale(out.y.numpy())
        check(f"y ({where})", got[0], out.y.numpy(), y_scale, tolerance)
        for spec, g, e in zip(specs, got[1 : 1 + len(specs)], expected, strict=True):
            check(f"{spec.output} ({where})", g, e, _state_scale(spec, std, e), tolerance)
        if out.q is not None:
            check(f"q ({where})", got[-1], out.q.numpy(), y_scale[..., None], tolerance)

    if real is not None and real.size:
        compare(np.ascontiguousarray(real, np.float32), zero_states(specs, real.shape[0]), "real windows", TOLERANCE)
    for batch in (1, 37):
        for time_len in (1, context):
            x = (mean + std * rng.standard_normal((batch, time_len, len(mean)))).astype(np.float32)
            states = {s.input: _random_state(rng, s, batch, mean, std) for s in specs}
            compare(x, states, f"random, batch {batch}, time {time_len}", RANDOM_TOLERANCE)

    # one call over a window == the same rows one at a time with the state carried between calls
    if real is not None and real.size:
        x, tolerance, what = np.ascontiguousarray(real[:5], np.float32), TOLERANCE, "real windows"
    else:
        x = (mean + std * rng.standard_normal((5, context, len(mean)))).astype(np.float32)
        tolerance, what = RANDOM_TOLERANCE, "random windows"
    whole = _ort_run(sess, x, zero_states(specs, x.shape[0]))
    states = zero_states(specs, x.shape[0])
    step: list[np.ndarray] = []
    for t in range(x.shape[1]):
        step = _ort_run(sess, x[:, t : t + 1], states)
        states = {s.input: step[1 + i] for i, s in enumerate(specs)}
    check(f"{what}, window vs one row at a time: y", whole[0], step[0], out_scale(whole[0]), tolerance)
    for i, s in enumerate(specs):
        scale = _state_scale(s, std, whole[1 + i])
        check(f"{what}, window vs one row at a time: {s.output}", whole[1 + i], step[1 + i], scale, tolerance)
    return worst


def _state_scale(spec: StateSpec, std: np.ndarray, expected: np.ndarray) -> np.ndarray | float:
    """What a state's differences are measured against: the data's std for the row buffer, the size of
    the running sums for the step statistics, 1 for hidden states (they live in [-1, 1])."""
    if spec.input == "s0":
        return _buffer_scale(std)
    if spec.input == "m0":
        return np.maximum(1.0, np.abs(expected))
    return 1.0


def _buffer_scale(std: np.ndarray) -> np.ndarray:
    return np.concatenate([std, [1.0]]).astype(np.float32)


def _random_state(
    rng: np.random.Generator, spec: StateSpec, batch: int, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    if spec.input == "m0":  # rows and steps seen, sums of their absolute sizes: non-negative, of the data's scale
        count = rng.integers(0, 50, (1, batch, spec.dims[1])).astype(float)
        sums = [count + 1, (count + 1) * np.abs(mean), count, count * std * 0.2]
        return np.concatenate(sums, axis=0).astype(np.float32)
    if spec.input != "s0":
        return rng.uniform(-0.5, 0.5, (spec.dims[0], batch, spec.dims[1])).astype(np.float32)
    # a season buffer: plausible raw values, and a "seen" flag that is 0 for the oldest rows
    values = mean + std * rng.standard_normal((spec.dims[0], batch, len(mean)))
    seen = (np.arange(spec.dims[0])[:, None, None] >= rng.integers(0, spec.dims[0], (1, batch, 1))).astype(float)
    return np.concatenate([values * seen, seen], axis=2).astype(np.float32)


def publish(staging: Path, repo: Path, name: str, manifest: Manifest) -> tuple[Path, Manifest]:
    """Moves a finished version folder into repo/name/<next version> with one rename, so a server polling
    the repository never sees half a version. The manifest is written with the version claimed."""
    for _ in range(10):
        version = next_version(repo, name)
        claimed = manifest.model_copy(update={"version": version})
        claimed.write(staging)
        target = repo / name / str(version)
        try:
            os.rename(staging, target)
            return target, claimed
        except OSError:
            continue  # another export claimed that version first
    raise ExportError(f"could not claim a version folder under {repo / name}")


def staging_dir(repo: Path, name: str) -> Path:
    """A scratch folder beside the versions; its name is not a number, so servers ignore it."""
    (repo / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=repo / name))
    staging.chmod(0o755)  # mkdtemp makes it private; a published version must be readable by the server's user
    return staging


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
