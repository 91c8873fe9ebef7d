# syntax=docker/dockerfile:1
#
# outbox-relay image: `docker build -t outbox-relay:0.1.0 .` from the repository root.
# Two stages: the first builds a virtualenv from the project (pip install .), the second
# copies only that virtualenv onto a fresh slim base, so no compiler, pip, setuptools, wheel
# cache or source tree reaches the final image. It runs as an unprivileged user with a
# numeric UID (Kubernetes' runAsNonRoot can verify it) and works with a read-only root
# filesystem.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# --without-pip: `python -m venv` would seed the venv with pip and, before Python 3.12,
# setuptools (with its distutils hook); the base image's pip installs into the venv instead
# (--python), so neither is ever in /opt/venv.
RUN python -m venv --without-pip /opt/venv
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY provider_adapters ./provider_adapters
COPY sql ./sql
# The production package only: the fake providers and the embedded PostgreSQL (pgserver)
# come with the `demo` extra (outbox-relay-demo), which a deployed relay has no use for.
RUN python -m pip --python /opt/venv/bin/python install .

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional-outbox relay for payments" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own pip (and setuptools, wheel where present) are not needed either.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin relay
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_LOG_FORMAT=json
# /metrics, /healthz, /readyz (RELAY_HTTP_PORT).
EXPOSE 9108
USER 10001:10001
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
