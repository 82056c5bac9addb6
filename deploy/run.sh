#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh), starts the embedded default (`voxgate serve`:
# gateway + local ASR service, bundled models, local archive), streams a bundled
# recording through it with `voxgate stream`, and keeps serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh

DEMO=/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav
log=$(mktemp)
.venv/bin/voxgate serve --port "${VOXGATE_PORT:-8080}" --http-port "${VOXGATE_HTTP_PORT:-8081}" >"$log" &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null || true; wait "$pid" || true; rm -f "$log"' EXIT
until grep -q '^ws://' "$log"; do
  kill -0 "$pid" 2>/dev/null || { echo "voxgate serve exited early" >&2; exit 1; }
  sleep 0.5
done
url=$(grep -m1 '^ws://' "$log")
echo "voxgate serve is ready: $url"
echo "demo: voxgate stream $DEMO"
.venv/bin/voxgate stream --url "$url" "$DEMO"
echo "voxgate serve keeps running at $url (Ctrl-C stops it)"
wait "$pid"
