#!/usr/bin/env bash
# First boot of a FieldScope SD card: install offline, start a Wi-Fi access point, name the kit.
#
# Put this folder on the card's boot partition as /boot/firmware/fieldscope/ together with
#   offline/         made by scripts/make-wheelhouse.sh (wheels/, debs/, and the project)
#   kit.env          settings (see kit.env.example): SSID, Wi-Fi key, page password, hostname
# and have it run once at first boot: Raspberry Pi Imager's customisation runs
# /boot/firmware/firstrun.sh (add one line: bash /boot/firmware/fieldscope/firstboot.sh), or
# cloud-init's user-data (see user-data.example). It deletes the secrets it read when done.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG=/var/log/fieldscope-firstboot.log
exec > >(tee -a "$LOG") 2>&1

# shellcheck source=/dev/null
[ -r "$HERE/kit.env" ] && . "$HERE/kit.env"
KIT_HOSTNAME=${KIT_HOSTNAME:-fieldscope}
KIT_SSID=${KIT_SSID:-FieldScope-$(cut -c1-4 /etc/machine-id 2>/dev/null || echo kit)}
KIT_WIFI_KEY=${KIT_WIFI_KEY:?set KIT_WIFI_KEY (8-63 characters) in kit.env}
KIT_PASSWORD=${KIT_PASSWORD:?set KIT_PASSWORD (the page password) in kit.env}
KIT_COUNTRY=${KIT_COUNTRY:-}
KIT_SOURCE=${KIT_SOURCE:-picamera2}

echo "==> FieldScope first boot: $(date -u)"
hostnamectl set-hostname "$KIT_HOSTNAME" || echo "$KIT_HOSTNAME" >/etc/hostname
if [ -n "$KIT_COUNTRY" ]; then raspi-config nonint do_wifi_country "$KIT_COUNTRY" || true; fi

# The kit itself, from the card (no network needed).
SRC="$HERE/offline/fieldscope"
bash "$SRC/scripts/install.sh" --offline "$HERE/offline" --no-start

# Serve phones on the kit's own Wi-Fi, with the page password.
CONF=/etc/fieldscope/fieldscope.toml
sed -i -e 's/^host = .*/host = "0.0.0.0"/' -e "s/^kind = \"picamera2\"/kind = \"$KIT_SOURCE\"/" "$CONF"
printf 'FIELDSCOPE_PASSWORD=%s\n' "$KIT_PASSWORD" >/etc/fieldscope/environment
chmod 0640 /etc/fieldscope/environment
chgrp fieldscope /etc/fieldscope/environment

# Wi-Fi access point through NetworkManager (Bookworm's default): phones join it, DHCP and
# NAT-less sharing are done by NetworkManager's "shared" mode.
if command -v nmcli >/dev/null; then
  nmcli connection delete fieldscope-ap >/dev/null 2>&1 || true
  nmcli connection add type wifi ifname wlan0 con-name fieldscope-ap autoconnect yes \
    ssid "$KIT_SSID" mode ap 802-11-wireless.band bg ipv4.method shared \
    ipv4.addresses 10.42.0.1/24 wifi-sec.key-mgmt wpa-psk wifi-sec.psk "$KIT_WIFI_KEY"
  nmcli connection up fieldscope-ap || echo "access point will come up at next boot"
else
  echo "nmcli not found: no access point (the kit is still reachable on its wired network)"
fi

# fieldscope.local through Avahi (installed by install.sh).
systemctl enable --now avahi-daemon || true
systemctl enable --now fieldscope.service

# Secrets were read: remove them from the FAT boot partition.
shred -u "$HERE/kit.env" 2>/dev/null || rm -f "$HERE/kit.env"
echo "==> done: join Wi-Fi '$KIT_SSID', open http://$KIT_HOSTNAME.local:8080 (or http://10.42.0.1:8080)"
