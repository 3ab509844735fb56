# A working image of one node. Hardening (multi-stage, pinned deps, healthcheck) comes later.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY presence_svc ./presence_svc
RUN pip install --no-cache-dir . && useradd --system --uid 10001 presence

USER presence
EXPOSE 8000
# Exec form, so SIGTERM reaches the node. Set PRESENCE_REDIS_URL and PRESENCE_JWT_SECRET.
ENTRYPOINT ["presence-svc", "serve", "--host", "0.0.0.0", "--port", "8000"]
