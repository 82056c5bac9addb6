#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh), then runs ruff, mypy and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy native stages gateway asr clients/python/voxgate_client
echo "== promtool"
promtool check rules deploy/prometheus/voxgate-rules.yaml
(cd deploy/prometheus && promtool test rules voxgate-rules.test.yaml)
echo "== helm chart (rendered by Helm's engine, validated against Kubernetes schemas)"
bash deploy/check-chart.sh
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is not a pass.
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $rc
