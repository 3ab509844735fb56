# syntax=docker/dockerfile:1
# One presence-svc node. Build from the repository root: docker build -t presence-svc .
#
# Base: pinned to a Python patch release and Debian release by tag. Pin it by digest
# (python:3.11.17-slim-trixie@sha256:...) once you have resolved the digest from your registry;
# the same image must be used by both stages, since the builder's virtualenv is copied as is.

# --- builder: resolves nothing, installs only hash-checked wheels from the lock files ----------
FROM python:3.11.17-slim-trixie AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies before the source, so that a code change reuses the dependency layer.
COPY deploy/build-requirements.lock deploy/requirements.lock ./deploy/

# The build tools come from the lock too, not from whatever pip/setuptools the base ships.
# --only-binary: every pin has wheels for linux amd64 and arm64, and building an sdist would pull
# unpinned build dependencies.
RUN pip install --require-hashes --no-deps --only-binary=:all: \
        -r deploy/build-requirements.lock

# A pip-less virtualenv, so the runtime image carries only the service and its dependencies.
RUN python -m venv --without-pip /opt/presence \
    && pip --python /opt/presence/bin/python install --require-hashes --no-deps \
        --only-binary=:all: -r deploy/requirements.lock

COPY pyproject.toml README.md ./
COPY presence_svc ./presence_svc

# --no-build-isolation: build with the pinned setuptools above instead of fetching one.
# --no-index --no-deps: the project wheel must not pull anything the lock did not pin.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && pip --python /opt/presence/bin/python install --no-index --no-deps /wheels/presence_svc-*.whl

# --- runtime: the base image plus the installed virtualenv, nothing else ----------------------
FROM python:3.11.17-slim-trixie AS runtime

# PYTHONDONTWRITEBYTECODE: the bytecode was compiled at install time, and the root filesystem
# may be read-only (the Kubernetes manifests make it so).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/presence/bin:$PATH \
    PRESENCE_LOG_FORMAT=json

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 presence \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin presence

COPY --from=builder /opt/presence /opt/presence

USER 10001:10001
WORKDIR /opt/presence
EXPOSE 8000

# The slim image has no curl or wget; Python's stdlib is enough. Exits 1 on any error.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# Exec form: the node is PID 1 and gets SIGTERM itself, so it drains (closes sockets with 1012,
# releases its sessions) within PRESENCE_DRAIN_TIMEOUT. Set PRESENCE_REDIS_URL and
# PRESENCE_JWT_SECRET: the image has no embedded dev Redis, so it refuses to start without one.
ENTRYPOINT ["presence-svc", "serve", "--host", "0.0.0.0", "--port", "8000"]
