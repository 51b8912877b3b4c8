# syntax=docker/dockerfile:1
# Offline training and export (`policyloop train`, `policyloop export`): the base dependencies
# plus the `train` extra (torch, onnxscript, rich, matplotlib) as uv.lock pins them. uv.lock
# resolves torch from PyPI, whose Linux x86_64 wheel is the CUDA build: it trains on a GPU when
# one is visible and on the CPU otherwise (a large image; a CPU-only build would need the
# PyTorch CPU index in the lock). Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t registry.example.com/policyloop/trainer:0.1.0 .
# The base image is pinned by exact tag; the release pipeline adds its digest.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN set -eu; \
    uv export --frozen --no-dev --no-emit-workspace --extra train --output-file requirements.txt; \
    python -m venv /opt/venv; \
    /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.txt

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 policyloop \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/policyloop \
       --shell /usr/sbin/nologin policyloop
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY models/ models/
COPY protos/ protos/
COPY policyloop/ policyloop/
COPY online/ online/
COPY serving/ serving/
COPY clients/python/policyloop_client/ policyloop_client/
USER 10001:10001
# Writes its registry and checkpoints under the working directory given at run time, e.g.
#   docker run -v "$PWD/var:/work" -w /work IMAGE train --scenario recsys --registry registry
WORKDIR /home/policyloop
# A batch job: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "policyloop.cli"]
CMD ["train", "--help"]
