#!/usr/bin/env bash
# An emulated Raspberry Pi OS: a Debian 12 (Bookworm) arm64 root, as the Pi's 64-bit OS is, built
# once with debootstrap and kept as a zstd tarball in a cache outside the repository, keyed by
# what goes into it (suite, mirror, packages, this file). Prints the tarball's path.
#
#   tests/arm64/root.sh            # build if missing, print the path
#   FIELDSCOPE_ARM64_CACHE=DIR     # where the tarball lives (default ~/.cache/fieldscope-arm64)
set -euo pipefail
SUITE=bookworm
MIRROR=${FIELDSCOPE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What Raspberry Pi OS Lite brings that install.sh relies on (python3 3.11, venv, pip, rsync,
# systemd for the unit, libusb for the Coral), nothing more: install.sh must do the rest.
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,rsync,systemd,libusb-1.0-0,procps
CACHE=${FIELDSCOPE_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldscope-arm64}
key=$( { echo "$SUITE $MIRROR $PACKAGES"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
tarball=$CACHE/root-$SUITE-arm64-$key.tar.zst
if [ -s "$tarball" ]; then
  echo "$tarball"
  exit 0
fi
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "arm64 root: building $SUITE with debootstrap (several minutes, once per cache key)" >&2
debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$work/root" "$MIRROR" >&2
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --numeric-owner -I 'zstd -T0 -3' -cf "$work/root.tar.zst" .
mv "$work/root.tar.zst" "$tarball"
echo "$tarball"
