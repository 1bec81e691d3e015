#!/usr/bin/env bash
# On a machine with internet: collect everything a clinic install needs, for a Pi.
#
#   scripts/make-wheelhouse.sh [OUT] [--python 3.11] [--platform manylinux_2_36_aarch64]
#                              [--with-clinic]   (DICOM/FHIR too; then install.sh --with-clinic)
#
# OUT (default dist/fieldscope-offline) gets wheels/ (the kit's Python dependencies for the Pi's
# Python and CPU, plus setuptools to build the kit itself) and debs/ (drop libedgetpu1-std and
# any missing system packages there: on a Pi with internet, `apt-get download libedgetpu1-std`).
# Copy OUT to a USB stick and run `sudo scripts/install.sh --offline /media/.../fieldscope-offline`.
set -euo pipefail
OUT=dist/fieldscope-offline
PYVER=3.11
PLATFORM=manylinux_2_36_aarch64
EXTRAS=edge
while [ $# -gt 0 ]; do
  case $1 in
    --with-clinic) EXTRAS=edge,clinic ;;
    --python) PYVER=${2:?}; shift ;;
    --platform) PLATFORM=${2:?}; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) OUT=$1 ;;
  esac
  shift
done
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT/wheels" "$OUT/debs"

# The extras' requirements, read from pyproject.toml (one list, no copy to keep in sync).
mapfile -t REQS < <("$PY" - "$SRC/pyproject.toml" "$EXTRAS" <<'PYEOF'
import sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
for extra in sys.argv[2].split(","):
    for req in data["project"]["optional-dependencies"][extra]:
        print(req)
PYEOF
)
echo "==> downloading ${#REQS[@]} requirements for cp${PYVER/./} on $PLATFORM into $OUT/wheels"
# Raspberry Pi OS Bookworm has glibc 2.36: every manylinux tag up to 2_36 runs there, and
# listing them lets pip pick the newest build (ai-edge-litert 2.x needs a recent tag).
plats=(--platform "$PLATFORM")
for v in 36 35 34 31 28 27 17; do plats+=(--platform "manylinux_2_${v}_aarch64"); done
plats+=(--platform manylinux2014_aarch64 --platform linux_aarch64)
"$PY" -m pip download --dest "$OUT/wheels" --only-binary=:all: "${plats[@]}" \
  --python-version "$PYVER" --implementation cp "${REQS[@]}"
# Build backend for installing the kit itself without network.
"$PY" -m pip download --dest "$OUT/wheels" --only-binary=:all: setuptools wheel
cp "$SRC/scripts/install.sh" "$OUT/"
echo "==> $(find "$OUT/wheels" -name '*.whl' | wc -l) wheels in $OUT/wheels"
echo "==> add libedgetpu1-std_*.deb (and python3-picamera2 if your image lacks it) to $OUT/debs"
