"""Running an exported graph, for every side that does (server, export check, evaluation, benchmarks):
the onnxruntime session options and the zero-state feed, each written once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gatecast.manifest import StateSpec


def session_options(
    intra_op_threads: int = 0, inter_op_threads: int = 0, allow_spinning: bool = True
) -> ort.SessionOptions:
    """Options for one graph; 0 threads is onnxruntime's own choice. onnxruntime's warnings are kept out of
    the log (severity 3: errors only)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.log_severity_level = 3
    return opts


def cpu_session(path: Path, opts: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """The graph on the CPU provider: what export checks and offline evaluation run on."""
    return ort.InferenceSession(str(path), opts or session_options(), providers=["CPUExecutionProvider"])


def zero_states(specs: Iterable[StateSpec], batch: int) -> dict[str, np.ndarray]:
    """The feed of every state input at zero for `batch` series, in the manifest's order: a window from
    the start, a new session."""
    return {s.input: np.zeros((s.dims[0], batch, s.dims[1]), np.float32) for s in specs}
