"""The Open Inference Protocol v2 path, driven by the real ``tritonclient`` package.

The client runs as its own process (``tests/triton_probe.py``): see that file for why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.server_harness import ServerThread, make_registry, serve_config

ROOT = Path(__file__).resolve().parents[1]


def test_tritonclient_scores_a_served_model_and_gets_clear_errors(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry")
    server = ServerThread(serve_config(tmp_path))
    try:
        out = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_probe.py"),
                              server.target], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["live"] and report["ready"]
    assert report["recsys_ready"] and report["routing_ready"] and not report["nope_ready"]
    assert report["server_name"] == "policyloop"
    assert report["inputs"] == [["context", "FP32", [-1, 8]],
                                ["action_features", "FP32", [-1, -1, 6]]]
    assert report["versions"] == ["1"] and report["platform"] == "onnxruntime_onnx"
    assert report["model_version"] == "1"

    session = ort.InferenceSession(registry.current("recsys").read_model())
    (expected,) = session.run(["scores"], {
        "context": np.asarray(report["context"], np.float32),
        "action_features": np.asarray(report["items"], np.float32)})
    np.testing.assert_array_equal(np.asarray(report["scores"], np.float32), expected)

    assert "datatype 'FP64'" in report["wrong_dtype"]
    assert "shape [1, 4] does not fit" in report["wrong_shape"]
    assert "not served" in report["unknown_model"]
