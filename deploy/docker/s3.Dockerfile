# An S3-compatible store for deploy/compose.yaml: moto's server on the voxgate base.
# For trying ARCHIVE_STORE=s3 locally only (in memory, no authentication checks).
# deploy/containers.sh compose builds it from a context holding wheels/ (pip wheel
# 'moto[server]') and s3-server.py.

ARG BASE_IMAGE=localhost/voxgate-base@sha256:1396d4a275149e280b8a33a702c5224bf0bc9af1d9939b2c7b621c8513371c22

FROM ${BASE_IMAGE} AS build
COPY wheels/ /wheels/
# --no-index: the wheels were built on the host; nothing is downloaded in the build.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
      --find-links /wheels 'moto[server]'

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="voxgate-s3" \
      org.opencontainers.image.description="moto S3 server for trying voxgate's S3 archive store locally (not for production)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
RUN groupadd --system --gid 10001 s3 \
 && useradd --system --uid 10001 --gid s3 --no-create-home --shell /usr/sbin/nologin s3
COPY --from=build /opt/venv /opt/venv
COPY s3-server.py /usr/local/bin/s3-server
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    S3_PORT=9000
USER 10001:10001
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/', timeout=2)"]
ENTRYPOINT ["python3", "/usr/local/bin/s3-server"]
