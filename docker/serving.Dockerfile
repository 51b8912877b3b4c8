# syntax=docker/dockerfile:1
# The decision server, `policyloop serve`, without torch: only pyproject.toml's base
# dependencies, exactly as uv.lock pins them (with their hashes), and only the modules serving
# imports. Build from the repository root:
#   docker build -f docker/serving.Dockerfile -t registry.example.com/policyloop/serving:0.1.0 .
#   docker build -f docker/serving.Dockerfile --build-arg VARIANT=gpu \
#     -t registry.example.com/policyloop/serving-gpu:0.1.0 .
# VARIANT=gpu installs onnxruntime-gpu (the `gpu` extra) instead of onnxruntime; the server
# then uses the CUDA provider on a node with a GPU (the NVIDIA container runtime supplies the
# driver) and logs the provider at start-up.
#
# The base image is pinned by exact tag here; the release pipeline pins it by digest as well
# (PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...), since no digest can be checked here.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ARG VARIANT=cpu
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
# No dev group, no train extra (torch), not the project itself nor its workspace member the
# client library (their modules are copied below).
RUN set -eu; \
    extra=""; \
    if [ "$VARIANT" = gpu ]; then extra="--extra gpu --no-emit-package onnxruntime"; fi; \
    uv export --frozen --no-dev --no-emit-workspace $extra --output-file requirements.txt; \
    python -m venv /opt/venv; \
    /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.txt

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 policyloop \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin policyloop
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
# Whole folders, all torch-free; models/ (training and export, torch) stays in the trainer
# image. tests/test_layers.py proves none of these imports torch.
COPY protos/ protos/
COPY policyloop/ policyloop/
COPY online/ online/
COPY serving/ serving/
# the app-side client library, which `policyloop simulate` drives traffic through
COPY clients/python/policyloop_client/ policyloop_client/
USER 10001:10001
EXPOSE 50051 9464
# The standard gRPC health service, overall status, over plaintext on the default port (with
# --tls-cert or another --port, override this check). Kubernetes uses its own grpc probe.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service=''), timeout=4).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["python", "-m", "policyloop.cli"]
CMD ["serve", "--host", "0.0.0.0"]
