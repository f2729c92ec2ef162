"""One onnxruntime session per model version: providers from settings (a GPU provider only where it can
really start), the provider actually used reported, warm-up at load."""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gatecast.graph import session_options, zero_states
from gatecast.manifest import Manifest, sha256_file

from .settings import Settings

log = logging.getLogger(__name__)


# runs above this many rows (batch x time) give the memory arena's growth back afterwards
SHRINK_ABOVE_ROWS = 2048


class ModelLoadError(RuntimeError):
    pass


# providers that need an NVIDIA GPU and its driver; asking onnxruntime for one without them logs a red error
_NEEDS_GPU = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
# the CUDA provider links cuBLAS and the CUDA runtime but opens cuDNN only at its first RNN ("Require cuDNN 9.*")
_CUDNN = "libcudnn.so.9"


def _gpu_problem() -> str | None:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver sees no GPU"
    return None


def _library_problem(provider: str) -> str | None:
    """Loads the provider's shared library (and with it every library it links) the way onnxruntime would,
    so a missing library is found here, quietly, instead of by onnxruntime in red at session creation."""
    capi = Path(ort.__file__).parent / "capi"
    lib = capi / f"libonnxruntime_providers_{provider.removesuffix('ExecutionProvider').lower()}.so"
    if not lib.is_file():
        return None  # built into onnxruntime itself (CPU)
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(lib))
        if provider == "CUDAExecutionProvider":
            ctypes.CDLL(_CUDNN)
    except OSError as e:
        return str(e).removeprefix(str(capi) + "/")
    return None


@functools.cache
def select_providers(requested: tuple[str, ...]) -> tuple[str, ...]:
    """The requested providers that can run here, in order; says once which one runs and why the ones
    before it cannot. Raises ModelLoadError when none can."""
    available = ort.get_available_providers()
    usable: list[str] = []
    skipped: dict[str, str] = {}
    for provider in requested:
        if provider not in available:
            problem: str | None = f"not in this onnxruntime build (it has {', '.join(available)})"
        else:
            problem = (_gpu_problem() if provider in _NEEDS_GPU else None) or _library_problem(provider)
        if problem is None:
            usable.append(provider)
        elif not usable:  # a provider after the one that runs does not matter
            skipped[provider] = problem
    reasons = "; ".join(f"{p.removesuffix('ExecutionProvider')} not available: {why}" for p, why in skipped.items())
    if not usable:
        raise ModelLoadError(f"none of the providers {list(requested)} can run here: {reasons}")
    # a GPU left unused for want of its libraries is worth a warning; a machine without one is a CPU machine
    gpu_unused = not _NEEDS_GPU.isdisjoint(skipped) and _gpu_problem() is None
    log.log(
        logging.WARNING if gpu_unused else logging.INFO,
        "onnxruntime provider: %s%s",
        usable[0],
        f" ({reasons})" if reasons else "",
    )
    return tuple(usable)


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
        opts = session_options(settings.intra_op_threads, settings.inter_op_threads, settings.allow_spinning)
        wanted = select_providers(tuple(settings.providers))
        session = ort.InferenceSession(str(onnx_path), opts, providers=list(wanted))
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
        return list(zero_states(self.manifest.states, batch).values())

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
