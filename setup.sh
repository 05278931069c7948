#!/usr/bin/env bash
# One-step set-up on a fresh machine with Python 3.11: `bash setup.sh` (runtime) or `bash setup.sh test` (+ tests).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
$PIP install -q -r requirements.txt
$PIP install -q --no-deps -r requirements-nodeps.txt
# bar_jax itself (editable): `import bar_jax`, `from configs import ...` and the experiments work from any directory.
$PIP install -q -e .
# The general domain's prose: the Python documentation's reST sources (Debian/Ubuntu package python3.11-doc, PSF).
if ! ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -q && $SUDO apt-get install -y -q python3.11-doc
  else
    echo "setup.sh: no apt-get; install the Python 3.11 documentation sources (python3.11-doc) for the general domain" >&2
  fi
fi
if [ "${1:-}" = "test" ]; then
  $PIP install -q -r requirements-test.txt
fi
