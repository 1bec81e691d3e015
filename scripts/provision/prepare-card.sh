#!/usr/bin/env bash
# Copy FieldScope onto a freshly written Raspberry Pi OS card's boot partition.
#
#   scripts/provision/prepare-card.sh BOOT_MOUNT OFFLINE_DIR KIT_ENV
#
# BOOT_MOUNT: the mounted boot partition (e.g. /media/$USER/bootfs); OFFLINE_DIR: made by
# scripts/make-wheelhouse.sh; KIT_ENV: your filled-in copy of kit.env.example. Then enable the
# first-boot hook (Imager customisation or cloud-init) as docs/field-kit.md explains.
set -euo pipefail
BOOT=${1:?boot partition mount point}
OFFLINE=${2:?offline folder from make-wheelhouse.sh}
ENV=${3:?kit.env file}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST="$BOOT/fieldscope"
[ -d "$BOOT" ] || { echo "$BOOT is not a folder" >&2; exit 1; }
mkdir -p "$DEST/offline"
cp -r "$OFFLINE"/. "$DEST/offline/"
rsync -a --exclude .venv --exclude .git --exclude data --exclude runs --exclude __pycache__ \
  "$SRC"/ "$DEST/offline/fieldscope/"
cp "$SRC/scripts/provision/firstboot.sh" "$DEST/"
cp "$ENV" "$DEST/kit.env"
if [ -f "$BOOT/firstrun.sh" ] && ! grep -q fieldscope "$BOOT/firstrun.sh"; then
  # Imager's customisation script ends with cleanup lines; run ours before them.
  sed -i '/^rm -f \/boot.*firstrun.sh/i bash /boot/firmware/fieldscope/firstboot.sh' "$BOOT/firstrun.sh"
  echo "hooked into $BOOT/firstrun.sh"
elif [ -f "$BOOT/user-data" ] && ! grep -q fieldscope "$BOOT/user-data"; then
  sed 1d "$SRC/scripts/provision/user-data.example" >>"$BOOT/user-data"
  echo "hooked into $BOOT/user-data (cloud-init)"
else
  echo "no first-boot hook found: see docs/field-kit.md"
fi
echo "card prepared: $(du -sh "$DEST" | cut -f1) in $DEST"
