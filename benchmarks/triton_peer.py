"""Triton's side of benchmarks/throughput.py: PyTriton serving a gatecast model folder's ONNX graph.

Runs in its own virtual environment (PyTriton and tritonclient pin protobuf below 7): it imports nothing
of gatecast and reads the manifest as JSON. The inference callable runs the graph on onnxruntime (the same
graph and the same library as gatecast), zero initial states, one instance per core, Triton's dynamic
batcher in front. Before serving it writes one serialized ModelInferRequest per window (4-byte length,
little-endian, then the bytes) so that the benchmark's client sends bytes only.

    triton-venv/bin/python benchmarks/triton_peer.py MODEL_FOLDER WINDOWS.npy REQUESTS.bin GRPC HTTP METRICS
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tritonclient.grpc import service_pb2

INSTANCES = 2
MAX_BATCH = 256
QUEUE_DELAY_US = 2000  # Triton waits this long for a batch to fill


def write_requests(windows: np.ndarray, path: Path, input_name: str, output_name: str) -> None:
    with path.open("wb") as f:
        for w in windows:
            req = service_pb2.ModelInferRequest(model_name="bench")
            req.inputs.add(name=input_name, datatype="FP32", shape=[1, *w.shape])
            req.outputs.add(name=output_name)
            req.raw_input_contents.append(np.ascontiguousarray(w, np.float32).tobytes())
            blob = req.SerializeToString()
            f.write(len(blob).to_bytes(4, "little") + blob)


def main() -> None:
    folder, windows_file, requests_file = (Path(p) for p in sys.argv[1:4])
    grpc_port, http_port, metrics_port = (int(p) for p in sys.argv[4:7])
    manifest = json.loads((folder / "manifest.json").read_text())
    onnx = manifest["onnx"]
    states = manifest["states"]
    windows = np.load(windows_file)
    write_requests(windows, requests_file, onnx["input"], onnx["output"])

    def make_instance() -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(folder / onnx["file"]), opts, providers=["CPUExecutionProvider"])

        @batch
        def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            x = inputs[onnx["input"]]
            feed = {onnx["input"]: x}
            feed.update({s["input"]: np.zeros((s["dims"][0], x.shape[0], s["dims"][1]), np.float32) for s in states})
            (y,) = session.run([onnx["output"]], feed)
            return {onnx["output"]: y}

        return infer

    n_features = windows.shape[-1]
    config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="bench",
            infer_func=[make_instance() for _ in range(INSTANCES)],
            inputs=[Tensor(name=onnx["input"], dtype=np.float32, shape=(-1, n_features))],
            outputs=[Tensor(name=onnx["output"], dtype=np.float32, shape=(-1, -1))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US)
            ),
            strict=False,
        )
        triton.run()  # returns once the model is ready
        print(f"triton listening on {grpc_port}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through the context: Triton stops
        while triton.is_alive():
            time.sleep(1)


if __name__ == "__main__":
    main()
