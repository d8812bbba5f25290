# syntax=docker/dockerfile:1
# aiproxy: one image for the proxy (default), the reference agent and the Envoy edge.
#
#   docker build -t aiproxy .
#   docker run -p 50051:50051 -p 9091:9091 aiproxy                  # the proxy
#   docker run aiproxy agent --listen 0.0.0.0:50052                   # the reference agent
#   docker run -p 8080:8080 aiproxy envoy --listen 0.0.0.0:8080 --proxy proxy:50051
#
# Stage 1 builds wheels (the project's, with its generated stubs and Envoy descriptor
# set, and every dependency's); stage 2 installs them into a clean venv on a slim base
# with no compilers, no pip cache and no build tools, and runs as a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY pyproject.toml README.md ./
# Versions are the ranges pyproject.toml declares (the same resolution as `make`).
# hadolint ignore=DL3013
RUN python -m pip install --upgrade pip setuptools wheel \
 && python -m pip install "grpcio-tools>=1.85,<2" "googleapis-common-protos>=1.66"
COPY proto/ proto/
COPY scripts/ scripts/
COPY core/ core/
COPY server/ server/
COPY interceptors/ interceptors/
COPY agent/ agent/
# The one installed name: aiproxy/ holds links to the folders above (pyproject.toml maps them).
COPY aiproxy/ aiproxy/
COPY envoy/ envoy/
# Generated code is never committed: generate it here, as `make gen` does.
RUN python scripts/gen_protos.py \
 && python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/aiproxy/bin:$PATH \
    # Containers listen on every interface; everything else comes from the defaults,
    # a mounted --config file or AIPROXY_* variables (see .env.example).
    AIPROXY_SERVER__LISTEN=0.0.0.0:50051
COPY --from=build /wheels /tmp/wheels
RUN python -m venv /opt/aiproxy \
 && /opt/aiproxy/bin/pip install --no-index --find-links /tmp/wheels aiproxy \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin aiproxy
USER 10001:10001
WORKDIR /tmp
# 50051 gRPC (proxy), 9091 Prometheus metrics, 50052 the agent, 8080 Envoy.
EXPOSE 50051 9091
# The standard gRPC health service, not a TCP probe: healthy = can serve AgentService.
HEALTHCHECK --interval=10s --timeout=4s --start-period=10s --retries=3 \
  CMD ["aiproxy", "health", "--address", "127.0.0.1:50051", "--service", "ai.agent.v1.AgentService"]
# Exec form: SIGTERM reaches aiproxy itself, which drains (NOT_SERVING, then grace).
ENTRYPOINT ["aiproxy"]
CMD ["serve"]
