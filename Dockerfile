# syntax=docker/dockerfile:1
# SecretFS node plugin. The builder compiles pyfuse3 against libfuse3 and the
# CSI stubs from protos/; the runtime gets the installed environment, fuse3,
# and no compilers.

FROM python:3.11.7-slim-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/secretfs
ENV PATH=/opt/secretfs/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY csi/ csi/
COPY fs/ fs/
RUN pip install --no-cache-dir . && pip uninstall -y pip setuptools

FROM python:3.11.7-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/secretfs /opt/secretfs
ENV PATH=/opt/secretfs/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="secretfs" \
      org.opencontainers.image.description="CSI node plugin serving Kubernetes Secrets from locked memory over a read-only FUSE filesystem" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENTRYPOINT ["secretfs-csi"]
# The DaemonSet passes `serve` and its flags; without them, say how to use it.
CMD ["--help"]
