#!/usr/bin/env bash
# Regenerates the Python stubs in protos/ from the .proto files beside them.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root, i.e. in place)
# The stale-stub test runs this into a temporary folder and compares the files.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
cd "$root"
python -m grpc_tools.protoc -I. \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/decision.proto protos/grpc_inference.proto
