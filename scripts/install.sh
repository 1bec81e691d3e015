#!/usr/bin/env bash
# Install FieldScope on Raspberry Pi OS Bookworm (arm64) or Debian 12, online or offline.
#
#   sudo scripts/install.sh                       # online: apt + PyPI + Coral's apt repository
#   sudo scripts/install.sh --offline /media/usb/fieldscope-offline   # no network at all
#   scripts/install.sh --dry-run                  # print what would be done, change nothing
#   sudo scripts/install.sh --uninstall [--purge] # remove (keep data and config unless --purge)
#
# Options: --edgetpu std|max|none (Coral runtime; default std), --prefix DIR (/opt/fieldscope),
#          --no-start (install and enable, do not start), --yes (no questions),
#          --with-clinic (also DICOM to a PACS and the DICOM/FHIR exports: docs/fleet.md).
# Idempotent: running it again updates the code and keeps /etc/fieldscope and the data.
set -euo pipefail

PREFIX=/opt/fieldscope
CONF_DIR=/etc/fieldscope
STATE_DIR=/var/lib/fieldscope
UNIT=/etc/systemd/system/fieldscope.service
UDEV=/etc/udev/rules.d/99-fieldscope-coral.rules
SERVICE_USER=fieldscope
EDGETPU=std
OFFLINE=""
DRY_RUN=0
UNINSTALL=0
PURGE=0
START=1
EXTRAS=edge
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
say() { printf '==> %s\n' "$*"; }
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}
write_file() {  # write_file DEST MODE < content
  local dest=$1 mode=$2 tmp
  if [ "$DRY_RUN" = 1 ]; then printf '+ write %s (mode %s)\n' "$dest" "$mode"; cat >/dev/null; return; fi
  tmp=$(mktemp)
  cat >"$tmp"
  install -m "$mode" "$tmp" "$dest"
  rm -f "$tmp"
}

while [ $# -gt 0 ]; do
  case $1 in
    --offline) OFFLINE=${2:?--offline needs a folder}; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --edgetpu) EDGETPU=${2:?--edgetpu needs std, max or none}; shift ;;
    --prefix) PREFIX=${2:?--prefix needs a folder}; shift ;;
    --no-start) START=0 ;;
    --with-clinic) EXTRAS=edge,clinic ;;
    --yes|-y) ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option: $1" >&2; usage 2 ;;
  esac
  shift
done

case $EDGETPU in std|max|none) ;; *) echo "--edgetpu must be std, max or none" >&2; exit 2 ;; esac
if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "run as root (sudo), or with --dry-run to see what it would do" >&2
  exit 1
fi
# What the kit runs on: a 64-bit OS (the wheels it needs exist for aarch64 and x86-64 only) and
# Python 3.11 or newer (Raspberry Pi OS Bookworm has 3.11).
check_platform() {
  local arch py
  arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
  case $arch in
    arm64|aarch64|amd64|x86_64) ;;
    armhf|armel|armv7l|armv6l)
      echo "this is a 32-bit OS ($arch): FieldScope needs 64-bit Raspberry Pi OS (Bookworm," \
           "arm64); flash it with Raspberry Pi Imager (Raspberry Pi OS (64-bit)) and run this" \
           "again (Pi 3, 4, 5, 400, Zero 2 W and CM4 all run it)" >&2
      exit 3 ;;
    *) echo "unsupported architecture $arch: FieldScope runs on arm64 or amd64" >&2; exit 3 ;;
  esac
  py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "FieldScope needs Python 3.11 or newer (found: $py); Raspberry Pi OS Bookworm has" \
         "3.11: upgrade the OS image (Bullseye and older are too old)" >&2
    exit 3
  fi
}
[ "$UNINSTALL" = 1 ] || check_platform

if [ -n "$OFFLINE" ] && [ ! -d "$OFFLINE" ]; then
  echo "offline folder $OFFLINE not found (make it with scripts/make-wheelhouse.sh)" >&2
  exit 1
fi

uninstall() {
  say "removing FieldScope"
  run systemctl disable --now fieldscope.service || true
  run rm -f "$UNIT" "$UDEV"
  run systemctl daemon-reload
  run udevadm control --reload-rules || true
  run rm -rf "$PREFIX"
  if [ "$PURGE" = 1 ]; then
    run rm -rf "$CONF_DIR" "$STATE_DIR"
    run userdel "$SERVICE_USER" || true
  else
    say "kept $CONF_DIR and $STATE_DIR (results); --purge removes them"
  fi
}

apt_packages() {
  local pkgs=(python3 python3-venv python3-pip libusb-1.0-0 avahi-daemon rsync)
  if [ -r /etc/os-release ] && grep -qi raspbian /etc/os-release /etc/apt/sources.list.d/*.list 2>/dev/null \
     || apt-cache show python3-picamera2 >/dev/null 2>&1; then
    pkgs+=(python3-picamera2)
  else
    say "python3-picamera2 not available here (not Raspberry Pi OS): CSI cameras disabled"
  fi
  if [ -n "$OFFLINE" ]; then
    say "installing packages from $OFFLINE/debs"
    if compgen -G "$OFFLINE/debs/*.deb" >/dev/null; then
      run apt-get install -y --no-download "$OFFLINE"/debs/*.deb || run dpkg -i "$OFFLINE"/debs/*.deb
    else
      say "no .deb files in $OFFLINE/debs: assuming the system packages are present"
    fi
  else
    run apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}"
  fi
}

coral_runtime() {
  [ "$EDGETPU" = none ] && { say "Edge TPU runtime: skipped (--edgetpu none)"; return; }
  local pkg=libedgetpu1-$EDGETPU
  if dpkg -s "$pkg" >/dev/null 2>&1; then say "$pkg already installed"; return; fi
  if [ -n "$OFFLINE" ]; then
    if compgen -G "$OFFLINE/debs/${pkg}_*.deb" >/dev/null; then
      run dpkg -i "$OFFLINE"/debs/"${pkg}"_*.deb
    else
      say "no $pkg .deb in $OFFLINE/debs: the kit will run on the CPU (see docs/field-kit.md)"
    fi
    return
  fi
  say "adding Coral's apt repository for $pkg"
  run install -d -m 0755 /etc/apt/keyrings
  run sh -c "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | gpg --dearmor -o /etc/apt/keyrings/coral-edgetpu.gpg"
  echo "deb [signed-by=/etc/apt/keyrings/coral-edgetpu.gpg] https://packages.cloud.google.com/apt coral-edgetpu-stable main" \
    | write_file /etc/apt/sources.list.d/coral-edgetpu.list 0644
  run apt-get update
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" \
    || say "could not install $pkg: the kit will run on the CPU"
}

service_user() {
  getent group plugdev >/dev/null || run groupadd --system plugdev
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin \
      --user-group "$SERVICE_USER"
  fi
  local groups=video,plugdev
  getent group render >/dev/null && groups=$groups,render
  run usermod -aG "$groups" "$SERVICE_USER"
}

project_and_venv() {
  say "installing the project into $PREFIX"
  run install -d -m 0755 "$PREFIX"
  run rsync -a --delete --exclude .venv --exclude .git --exclude data --exclude runs \
    --exclude __pycache__ "$SRC"/ "$PREFIX"/
  # --system-site-packages: picamera2 (and libcamera) come from apt, not pip.
  [ -x "$PREFIX/.venv/bin/python" ] || run python3 -m venv --system-site-packages "$PREFIX/.venv"
  local pip=("$PREFIX/.venv/bin/pip" install --upgrade)
  # Keep numpy at the system's version when the system has one: picamera2's compiled helpers
  # (simplejpeg, python3-av) are built against it, and a pip numpy 2 would break them.
  local sysnp constraints
  constraints=$(mktemp)
  sysnp=$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)
  if [ -n "$sysnp" ]; then
    echo "numpy==$sysnp" >"$constraints"
    say "pinning numpy to the system's $sysnp"
  fi
  if [ -n "$OFFLINE" ]; then
    pip+=(--no-index --find-links "$OFFLINE/wheels")
  fi
  run "${pip[@]}" -c "$constraints" "${PREFIX}[${EXTRAS}]"
  rm -f "$constraints"
}

config_files() {
  run install -d -m 0750 "$CONF_DIR"
  if [ ! -e "$CONF_DIR/fieldscope.toml" ]; then
    say "writing $CONF_DIR/fieldscope.toml (edit it; kept on updates)"
    sed -e "s#/opt/fieldscope#$PREFIX#g" "$SRC/docs/fieldscope.example.toml" \
      | write_file "$CONF_DIR/fieldscope.toml" 0640
  else
    say "keeping existing $CONF_DIR/fieldscope.toml"
  fi
  run chgrp "$SERVICE_USER" "$CONF_DIR" "$CONF_DIR/fieldscope.toml"
  run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
  sed -e "s#/opt/fieldscope#$PREFIX#g" "$SRC/systemd/fieldscope.service" | write_file "$UNIT" 0644
  # An image without udev yet (a minimal or chroot-built one) has no rules folder.
  run install -d -m 0755 "$(dirname "$UDEV")"
  write_file "$UDEV" 0644 <"$SRC/systemd/99-fieldscope-coral.rules"
  run udevadm control --reload-rules || true
  run udevadm trigger --subsystem-match=usb || true
  if [ "$DRY_RUN" = 0 ] && [ ! -d /run/systemd/system ]; then
    # An image being built, or a chroot: enable for the next boot, nothing to start now.
    say "systemd is not running here: the service is enabled and starts at the next boot"
    run systemctl enable fieldscope.service
    return
  fi
  run systemctl daemon-reload
  if [ "$START" = 1 ]; then
    run systemctl enable --now fieldscope.service
  else
    run systemctl enable fieldscope.service
  fi
}

address() {
  local host ips
  host=$(hostname 2>/dev/null || echo fieldscope)
  ips=$(hostname -I 2>/dev/null || true)
  say "done. The page: http://127.0.0.1:8080 on the Pi"
  say "from a phone on the kit's network (after setting [web] host and password): http://$host.local:8080 ${ips:+(or http://${ips%% *}:8080)}"
  say "check the device: $PREFIX/.venv/bin/python -m edge doctor"
}

if [ "$UNINSTALL" = 1 ]; then uninstall; exit 0; fi
[ "$DRY_RUN" = 1 ] && say "dry run: nothing is changed"
apt_packages
coral_runtime
service_user
project_and_venv
config_files
address
