#!/usr/bin/env bash
# Regenerates the Python stubs in protos/ from the .proto files beside them, and the client
# library's own copy of the decision stubs in clients/python/policyloop_client/_proto/.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root, i.e. in place)
# The stale-stub tests run this into a temporary folder and compare the files.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
cd "$root"
python -m grpc_tools.protoc -I. \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/decision.proto protos/grpc_inference.proto

# The client's stubs are generated from the same path (protos/decision.proto), so both copies
# register one identical file in protobuf's descriptor pool and can be imported in one process;
# only their Python imports and module names move inside the package.
client="$out/clients/python/policyloop_client/_proto"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python -m grpc_tools.protoc -I. \
  --python_out="$scratch" --pyi_out="$scratch" --grpc_python_out="$scratch" \
  protos/decision.proto
mkdir -p "$client"
for name in decision_pb2.py decision_pb2.pyi decision_pb2_grpc.py; do
  sed -e 's/^from protos import /from policyloop_client._proto import /' \
      -e "s/'protos\.decision_pb2'/'policyloop_client._proto.decision_pb2'/" \
      -e 's#code in protos/decision_pb2_grpc\.py#code in policyloop_client/_proto/decision_pb2_grpc.py#' \
      "$scratch/protos/$name" > "$client/$name"
done
