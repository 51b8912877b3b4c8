"""The committed stubs must be exactly what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = [
    "decision_pb2.py", "decision_pb2.pyi", "decision_pb2_grpc.py",
    "grpc_inference_pb2.py", "grpc_inference_pb2.pyi", "grpc_inference_pb2_grpc.py",
]


def test_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    env_python = Path(sys.executable)
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True, env={"PATH": f"{env_python.parent}:/usr/bin:/bin"},
    )
    stale = [name for name in GENERATED
             if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run scripts/gen_protos.sh and commit"


def test_inference_service_uses_the_v2_method_paths() -> None:
    from protos import grpc_inference_pb2

    service = grpc_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert grpc_inference_pb2.DESCRIPTOR.package == "inference"
    assert {m.name for m in service.methods} >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"
    }
    fields = {f.name: f.number for f in grpc_inference_pb2.ModelInferRequest.DESCRIPTOR.fields}
    assert fields == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4,
                      "inputs": 5, "outputs": 6, "raw_input_contents": 7}
