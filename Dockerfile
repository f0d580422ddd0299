# syntax=docker/dockerfile:1
#
# idlegate container image: a slim Python runtime with the idlegate wheel and its
# dependencies, running as UID 10001. Build and run (see docs/deployment.md):
#
#   docker build -t idlegate:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/gateway.yaml:/etc/idlegate/gateway.yaml:ro" \
#     -e IDLEGATE_ADMIN__HOST=0.0.0.0 idlegate:0.1.0

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the source tree becomes one wheel ----------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --wheel-dir /dist .

# ---- runtime: the wheel and its dependencies, nothing else ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="idlegate" \
      org.opencontainers.image.description="Reverse-proxy gateway enforcing JWT idle timeouts" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    IDLEGATE_CONFIG=/etc/idlegate/gateway.yaml

RUN groupadd --system --gid 10001 idlegate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin idlegate \
 && mkdir -p /etc/idlegate

COPY --from=build /dist/ /tmp/dist/
# Dependencies come from PyPI as prebuilt wheels only: nothing is compiled here, and the
# image has no compiler. pip itself is removed afterwards; the app never needs it.
RUN pip install --only-binary=:all: /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && pip uninstall --yes pip setuptools wheel

# The read-only root filesystem of a hardened pod is fine: the process writes only to /tmp.
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 9090

# The admin port's liveness endpoint, checked with the interpreter already in the image.
# In a container the admin port must listen beyond loopback for probes from outside
# (IDLEGATE_ADMIN__HOST=0.0.0.0); this check runs inside, so 127.0.0.1 works either way.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status == 200 else 1)"]

# SIGTERM: readiness turns 503, in-flight requests finish (server.shutdown_grace), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["idlegate"]
CMD ["serve", "-c", "/etc/idlegate/gateway.yaml"]
