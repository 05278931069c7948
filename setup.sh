#!/usr/bin/env bash
# One-step set-up on a fresh machine with Python 3.11: `bash setup.sh` (runtime) or `bash setup.sh test` (+ tests).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
$PIP install -q -r requirements.txt
$PIP install -q --no-deps -r requirements-nodeps.txt
if [ "${1:-}" = "test" ]; then
  $PIP install -q -r requirements-test.txt
fi
