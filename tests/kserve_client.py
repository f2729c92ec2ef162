"""Talks to a gatecast server with NVIDIA's tritonclient, as a KServe v2 user would; run by
tests/test_kserve.py in tritonclient's own virtual environment (its protobuf pin differs from ours).

Usage: python kserve_client.py ADDRESS WINDOWS.npy QUANTILE_INPUT.npy -> one JSON object on stdout.
Imports nothing from gatecast: only tritonclient and numpy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def failure(call: Callable[[], Any]) -> dict[str, str] | None:
    """The status and message of a call that should fail (None when it did not)."""
    try:
        call()
    except InferenceServerException as e:
        return {"status": str(e.status()), "message": str(e.message())}
    return None


def infer(
    client: tc.InferenceServerClient, model: str, x: np.ndarray, outputs: list[str] | None = None
) -> tc.InferResult:
    window = tc.InferInput("x", list(x.shape), "FP32")
    window.set_data_from_numpy(x)
    wanted = None if outputs is None else [tc.InferRequestedOutput(name) for name in outputs]
    return client.infer(model, [window], outputs=wanted, request_id="req-7")


def main() -> None:
    address, windows_file, quantile_file = sys.argv[1:4]
    windows = np.load(windows_file)  # [batch, time, 1] float32
    qx = np.load(quantile_file)
    client = tc.InferenceServerClient(address)
    result = infer(client, "taylor", windows)
    quantiles = infer(client, "qsum", qx, outputs=["q"])
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("taylor"),
        "version_ready": client.is_model_ready("taylor", "1"),
        "unknown_version_ready": client.is_model_ready("taylor", "7"),
        "unknown_model_ready": client.is_model_ready("nope"),
        "server": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata("taylor", as_json=True),
        "quantile_metadata": client.get_model_metadata("qsum", "1", as_json=True),
        "y": result.as_numpy("y").tolist(),
        "response": result.get_response(as_json=True),
        "q": quantiles.as_numpy("q").tolist(),
        "q_outputs": [o.name for o in quantiles.get_response().outputs],
        "bad_shape": failure(lambda: infer(client, "taylor", windows[0])),
        "unknown_model": failure(lambda: infer(client, "nope", windows)),
        "unknown_metadata": failure(lambda: client.get_model_metadata("nope")),
    }
    report["response"].pop("raw_output_contents", None)  # bytes: the arrays above carry them
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
