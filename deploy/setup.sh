#!/usr/bin/env bash
# Sets up everything voxgate needs on a fresh Debian machine with Python 3.11:
# apt packages, the virtual environment in .venv/, the compiled extensions and
# the prepared models. Safe to run again: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus: promtool checks the rules and both services' /metrics in the tests, and the
# live-Prometheus test scrapes a gateway and an ASR service with the real server.
# chromium: tests/integration/test_browser.py drives the browser client in it (headless);
# chromium-driver for those who drive it with WebDriver instead.
# openssl: the TLS and mTLS tests make their certificates with its command line.
APT_PACKAGES=(build-essential pkg-config libopus-dev libopusenc-dev libsndfile1 espeak-ng sox pocketsphinx-testdata prometheus chromium chromium-driver openssl)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

# Reinstall only when the project metadata or native sources changed.
stamp=.venv/.voxgate-install-stamp
want=$(cat pyproject.toml build_ext.py deploy/requirements-nodeps.txt clients/python/pyproject.toml native/*.h native/*.c 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! ls native/_*.so >/dev/null 2>&1; then
  echo "setup: installing voxgate and its dependencies into .venv"
  .venv/bin/python -m pip install -q -e ".[test,bench]"
  .venv/bin/python -m pip install -q --no-deps -r deploy/requirements-nodeps.txt
  # The client SDK is its own distribution (clients/python); the tests use it.
  .venv/bin/python -m pip install -q -e clients/python
  echo "$want" > "$stamp"
fi

# Model preparation hook: runs once the ASR engine provides it.
if .venv/bin/voxgate models --help >/dev/null 2>&1; then
  .venv/bin/voxgate models prepare
fi
echo "setup: ready (.venv/bin/voxgate)"
