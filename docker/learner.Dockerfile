# syntax=docker/dockerfile:1
# The online learner, `policyloop learn` (reward join included). It needs exactly the serving
# image's code and dependencies (online/ and serving/ share policyloop/'s contract, bus and
# registry; none imports torch), so it is built on that image and changes only the health check and the command.
# Build the serving image first, then from the repository root:
#   docker build -f docker/learner.Dockerfile \
#     --build-arg SERVING_IMAGE=registry.example.com/policyloop/serving:0.1.0 \
#     -t registry.example.com/policyloop/learner:0.1.0 .
# The release pipeline passes SERVING_IMAGE by digest (...serving@sha256:...).
ARG SERVING_IMAGE=registry.example.com/policyloop/serving:0.1.0
FROM ${SERVING_IMAGE}
USER 10001:10001
EXPOSE 9464
# The learner serves nothing but its metrics (run it with --metrics-port 9464); they answer once
# it has loaded its policy and restored its checkpoint.
HEALTHCHECK --interval=20s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=4)"]
ENTRYPOINT ["python", "-m", "policyloop.cli"]
CMD ["learn", "--help"]
