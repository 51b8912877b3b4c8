#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine: uv, the locked Python environment
# (with torch for training, and the client library clients/python installed editable as a uv
# workspace member), and the Kafka broker jars. Idempotent; later runs are fast.
# Also: Prometheus and promtool (Debian's package, for the observability tests) and kustomize
# (built from the Go module proxy into .tools/bin, for rendering k8s/).
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

# Prometheus + promtool: the observability tests run a real server and check the alert rules.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing prometheus (Debian package)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "bootstrap: promtool not found; install Debian's 'prometheus' package (needs root)" >&2
  fi
fi

# kustomize, pinned, built once into .tools/bin (the k8s tests render every overlay with it).
KUSTOMIZE_VERSION=v5.7.1
if ! .tools/bin/kustomize version 2>/dev/null | grep -q "$KUSTOMIZE_VERSION"; then
  echo "bootstrap: building kustomize $KUSTOMIZE_VERSION" >&2
  GOBIN="$root/.tools/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
fi
