#!/usr/bin/env bash
# Runs a command inside the project's locked environment (uv run), whether uv is on PATH or
# was installed by scripts/bootstrap.sh as a Python module.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null 2>&1; then exec uv run --frozen --extra train "$@"; fi
exec python3 -m uv run --frozen --extra train "$@"
