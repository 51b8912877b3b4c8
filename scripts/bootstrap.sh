#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine: uv, the locked Python environment
# (with torch for training), and the Kafka broker jars. Idempotent; later runs are fast.
# Usage: scripts/bootstrap.sh [--no-kafka]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! command -v uv >/dev/null 2>&1; then
  if ! python3 -m uv --version >/dev/null 2>&1; then
    echo "bootstrap: installing uv from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check uv==0.13.9
  fi
fi
uv() { if command -v uv >/dev/null 2>&1; then command uv "$@"; else python3 -m uv "$@"; fi; }

uv sync --frozen --extra train
if [ "${1:-}" != "--no-kafka" ]; then
  bash scripts/kafka.sh fetch
fi
