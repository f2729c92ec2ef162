"""One onnxruntime session per model version: providers from settings, the provider actually used
reported, warm-up at load."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gatecast.manifest import Manifest, sha256_file

from .settings import Settings

log = logging.getLogger(__name__)


# runs above this many rows (batch x time) give the memory arena's growth back afterwards
SHRINK_ABOVE_ROWS = 2048


class ModelLoadError(RuntimeError):
    pass


@dataclass
class ModelRuntime:
    """A loaded graph. `run` is blocking and thread-safe (onnxruntime sessions allow concurrent run)."""

    manifest: Manifest
    path: Path
    session: ort.InferenceSession
    provider: str
    _output_names: list[str]
    settings: Settings | None = None  # the limits the batcher applies to this model
    _shrink: ort.RunOptions | None = None

    @classmethod
    def load(cls, folder: Path, settings: Settings) -> ModelRuntime:
        manifest = Manifest.read(folder)
        onnx_path = folder / manifest.onnx.file
        if sha256_file(onnx_path) != manifest.onnx.sha256:
            raise ModelLoadError(f"{onnx_path}: sha256 differs from the manifest's; refusing to load")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads
        opts.inter_op_num_threads = settings.inter_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        wanted = [p for p in settings.providers if p in available]
        if not wanted:
            raise ModelLoadError(
                f"none of the providers {settings.providers} is available; onnxruntime has {available}"
            )
        session = ort.InferenceSession(str(onnx_path), opts, providers=wanted)
        # onnxruntime falls back to CPU without raising: the first active provider is the truth
        provider = session.get_providers()[0]
        if provider != wanted[0]:
            log.warning("%s: asked for %s, running on %s (onnxruntime fell back)", onnx_path, wanted[0], provider)
        names = {i.name for i in session.get_inputs()}
        expected = {manifest.onnx.input, *(s.input for s in manifest.states)}
        if names != expected:
            raise ModelLoadError(f"{onnx_path}: graph inputs {sorted(names)} != manifest {sorted(expected)}")
        outputs = [manifest.onnx.output, *(s.output for s in manifest.states)]
        if manifest.onnx.quantile_output:
            outputs.append(manifest.onnx.quantile_output)
        missing = set(outputs) - {o.name for o in session.get_outputs()}
        if missing:
            raise ModelLoadError(f"{onnx_path}: graph has no output(s) {sorted(missing)} named in the manifest")
        # a run bigger than the arena has seen grows it; give the growth back after such runs
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        rt = cls(manifest, folder, session, provider, outputs, settings, shrink)
        rt.warm_up()
        log.info("loaded %s v%d from %s on %s", manifest.name, manifest.version, folder, provider)
        return rt

    def zero_states(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((s.dims[0], batch, s.dims[1]), np.float32) for s in self.manifest.states]

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
        """x [batch, time, features], states [dim0, batch, dim1] each -> y [batch, horizon, targets], states,
        and for a quantile model q [batch, horizon, targets, quantiles] (else None)."""
        feed = {self.manifest.onnx.input: x}
        for spec, s in zip(self.manifest.states, states, strict=True):
            feed[spec.input] = s
        big = x.shape[0] * x.shape[1] > SHRINK_ABOVE_ROWS
        out = self.session.run(self._output_names, feed, self._shrink if big else None)
        n = 1 + len(self.manifest.states)
        return out[0], list(out[1:n]), out[n] if len(out) > n else None

    def warm_up(self) -> None:
        m = self.manifest
        for batch, time in ((1, 1), (1, m.context_length), (8, 1)):
            x = np.tile(np.asarray(m.scaler.mean, np.float32), (batch, time, 1))
            self.run(x, self.zero_states(batch))
