"""Runs the real ``tritonclient`` against a server, in its own process.

tritonclient registers the ``inference.*`` protobuf messages in the default descriptor pool,
as policyloop's own stubs do, so the two cannot be imported into one process; the test runs
this script as a client process and reads its JSON report.
Usage: python tests/triton_probe.py HOST:PORT
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def error_of(call: Callable[[], object]) -> str:
    try:
        call()
    except InferenceServerException as exc:
        return str(exc)
    return ""


def main(target: str) -> None:
    client = triton.InferenceServerClient(url=target)
    meta = client.get_model_metadata("recsys")
    rng = np.random.default_rng(0)
    context = rng.standard_normal((3, 8)).astype(np.float32)
    items = rng.standard_normal((3, 7, 6)).astype(np.float32)
    inputs = [triton.InferInput("context", list(context.shape), "FP32"),
              triton.InferInput("action_features", list(items.shape), "FP32")]
    inputs[0].set_data_from_numpy(context)
    inputs[1].set_data_from_numpy(items)
    result = client.infer("recsys", inputs, outputs=[triton.InferRequestedOutput("scores")])

    wrong_dtype = triton.InferInput("context", [1, 5], "FP64")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 5), np.float64))
    wrong_shape = triton.InferInput("context", [1, 4], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 4), np.float32))
    report = {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "recsys_ready": client.is_model_ready("recsys"),
        "routing_ready": client.is_model_ready("routing"),
        "nope_ready": client.is_model_ready("nope"),
        "server_name": client.get_server_metadata().name,
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
        "versions": list(meta.versions), "platform": meta.platform,
        "context": context.tolist(), "items": items.tolist(),
        "scores": result.as_numpy("scores").tolist(),
        "model_version": result.get_response().model_version,
        "wrong_dtype": error_of(lambda: client.infer("routing", [wrong_dtype])),
        "wrong_shape": error_of(lambda: client.infer("routing", [wrong_shape])),
        "unknown_model": error_of(lambda: client.infer("nope", [wrong_shape])),
    }
    client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
