#!/bin/sh
# Installs the Debian 12 packages prosody-native needs (tests, benchmarks and the demo
# share one list)
# when run as root; otherwise says exactly what to install.
set -eu
pkgs="build-essential pkg-config lua5.4 liblua5.4-dev luarocks lua-busted libsqlite3-dev sqlite3 libssl-dev
      prosody prosody-modules lua-dbi-sqlite3 lua-unbound python3 python3-pytest python3-slixmpp
      nsd unbound ldnsutils bind9-dnsutils
      nodejs chromium-headless-shell dns-root-data"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "prosody-native needs these Debian packages:$missing" >&2
	echo "install them with: sudo apt-get install$missing" >&2
	exit 1
fi
echo "Installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends $missing >/dev/null
# Debian starts the packaged Prosody; tests start their own throwaway servers.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prosody 2>/dev/null; then
	systemctl stop prosody || true
fi
